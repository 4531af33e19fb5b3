"""The slide interface and what every reader shares: level choice, resampling, um/px checks.

Every source (a file through tiffslide, OpenSlide, wsidicom or Pillow, an OMERO image) satisfies
the :class:`SlideSource` protocol, so the inference engine only ever asks for "this level-0
region at that um/px". :class:`PyramidSource` implements it over any pyramid of levels: reading
picks the coarsest level that is still at least as fine as the requested resolution and
resamples it with an anti-aliasing filter (Pillow's box-aware Lanczos), so a 40x slide read at
0.5 um/px looks like a 20x scan rather than an aliased subsample. A reader only lists its levels
and reads level pixels (:mod:`conic_qp.slides` for files, :mod:`conic_qp.readers`).

Coordinates: regions are ``(x, y, w, h)`` in level-0 pixels and may be fractional, so a tile of
the model's pixel grid maps to the slide without rounding drift; ``size=(w, h)`` fixes the output
shape exactly. Parts of a region outside the slide are white (glass).

Guards shared by all readers: a level-0 um/px outside :data:`MPP_RANGE` (metadata or override)
is refused unless forced (:func:`check_mpp`), because a typo (50 for 0.5) means a 100-fold
resampling; every read first checks that the memory it would allocate is available
(:func:`available_memory`), so a wrong um/px fails with one line instead of a MemoryError.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from conic_qp.errors import ConicQPError, MppError, option

log = logging.getLogger(__name__)

__all__ = [
    "MPP_RANGE",
    "ImageSource",
    "PyramidSource",
    "Rect",
    "SlideSource",
    "as_rgb",
    "available_memory",
    "check_mpp",
    "composite_alpha",
    "not_rgb_error",
    "pair_mpp",
    "resolve_mpp",
    "scaled_size",
]

#: Plausible level-0 resolutions of brightfield scans (um/px); outside it metadata is wrong.
MPP_RANGE: tuple[float, float] = (0.1, 2.0)
#: A level up to 1% coarser than requested is still used (pyramids have non-exact downsamples).
LEVEL_EPS = 0.01
#: Level pixels read at once when a whole slide is resampled (thumbnail), to bound memory.
_BAND_PIXELS = 64 * 1024 * 1024
#: Share of the available memory one read may use.
_MEMORY_SHARE = 0.8

Rect = tuple[float, float, float, float]
"""A level-0 rectangle ``(x, y, w, h)`` in pixels (floats allowed): what a read asks for.

(Pixel boxes of an array at the model's resolution are :class:`conic_qp.tiling.Box`;
:meth:`~conic_qp.tiling.Box.to_level0` turns one into a ``Rect``. Areas that nuclei belong to are
:class:`conic_qp.regions.Region`.)"""


@runtime_checkable
class SlideSource(Protocol):
    """A readable H&E slide with a known level-0 resolution."""

    @property
    def name(self) -> str:
        """Display name (the file name for files)."""
        ...

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        ...

    @property
    def mpp(self) -> float:
        """Level-0 resolution in um/px."""
        ...

    def read(self, region: Rect, mpp: float, size: tuple[int, int] | None = None) -> np.ndarray:
        """Return ``region`` resampled to ``mpp`` um/px as (h, w, 3) uint8."""
        ...

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """Return the whole slide with its longer side <= ``max_size`` and its downsample."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideSource: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def scaled_size(size: tuple[float, float], from_mpp: float, to_mpp: float) -> tuple[int, int]:
    """Pixel size ``(w, h)`` of an area measured at ``from_mpp`` once resampled to ``to_mpp``.

    The single rounding rule shared by :meth:`SlideSource.read` and the tiling, so the shape of a
    region at the model's resolution is the same wherever it is computed.
    """
    f = from_mpp / to_mpp
    return max(1, round(size[0] * f)), max(1, round(size[1] * f))


class PyramidSource:
    """A :class:`SlideSource` over a pyramid of levels: level choice and resampling.

    Subclasses only provide the level sizes and raw reads of in-bounds level pixels.
    """

    _name: str
    _mpp: float
    _level_dims: list[tuple[int, int]]

    # -- subclass interface -------------------------------------------------------------------
    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Return level pixels [y0:y1, x0:x1] (in bounds) as (h, w, 3) uint8."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; reading afterwards is an error."""

    # -- public API ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._level_dims[0]

    @property
    def mpp(self) -> float:
        return self._mpp

    @property
    def level_mpps(self) -> tuple[float, ...]:
        """um/px of each pyramid level (level 0 first)."""
        w0, h0 = self._level_dims[0]
        return tuple(self._mpp * (w0 / w + h0 / h) / 2 for w, h in self._level_dims)

    def best_level(self, mpp: float) -> int:
        """Coarsest level whose um/px is <= ``mpp`` (within 1%); 0 when ``mpp`` is finer."""
        best = 0
        for level, level_mpp in enumerate(self.level_mpps):
            if level_mpp <= mpp * (1 + LEVEL_EPS):
                best = level
        return best

    def read(self, region: Rect, mpp: float, size: tuple[int, int] | None = None) -> np.ndarray:
        """Read a level-0 region resampled to ``mpp`` um/px.

        Parameters
        ----------
        region : ``(x, y, w, h)`` in level-0 pixels, fractional allowed, may leave the slide
            (outside is white).
        mpp : target resolution in um/px.
        size : output ``(w, h)``; default :func:`scaled_size` of the region.

        Returns
        -------
        (h, w, 3) uint8 RGB.
        """
        x, y, w, h = (float(v) for v in region)
        if not (w > 0 and h > 0 and mpp > 0 and math.isfinite(mpp)):
            raise ConicQPError(
                f"cannot read region {region} at {mpp} um/px from {self._name}: width, height "
                "and um/px must be positive"
            )
        out_w, out_h = size if size is not None else scaled_size((w, h), self._mpp, mpp)
        if out_w < 1 or out_h < 1:
            raise ValueError(f"output size {size} must be at least 1x1 px")
        level = self.best_level(mpp)
        lw, lh = self._level_dims[level]
        w0, h0 = self._level_dims[0]
        sx, sy = lw / w0, lh / h0  # level px per level-0 px
        box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
        if w * h * sx * sy > _BAND_PIXELS and out_h > 1:
            self._ensure_memory(3.0 * out_w * out_h, region, (out_w, out_h))
            return self._read_banded(level, box, out_w, out_h, region)
        return self._resample(level, box, out_w, out_h, region)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """Whole slide, longer side <= ``max_size``; returns ``(rgb, level-0 px per thumb px)``."""
        if max_size < 1:
            raise ValueError(f"thumbnail size must be >= 1 px, got {max_size}")
        w0, h0 = self._level_dims[0]
        downsample = max(1.0, max(w0, h0) / max_size)
        size = (max(1, math.floor(w0 / downsample)), max(1, math.floor(h0 / downsample)))
        image = self.read((0, 0, w0, h0), self._mpp * downsample, size=size)
        return image, downsample

    def __enter__(self) -> PyramidSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({self._name!r}, {w}x{h}, {self._mpp:.4g} um/px)"

    # -- internals ----------------------------------------------------------------------------
    def _read_banded(
        self,
        level: int,
        box: tuple[float, float, float, float],
        out_w: int,
        out_h: int,
        region: Rect,
    ) -> np.ndarray:
        """Resample in horizontal bands so huge single-level reads stay within memory."""
        bx0, by0, bx1, by1 = box
        rows_per_band = max(1, int(_BAND_PIXELS / max(1.0, (bx1 - bx0) * (by1 - by0) / out_h)))
        step = (by1 - by0) / out_h
        bands = []
        for r0 in range(0, out_h, rows_per_band):
            r1 = min(out_h, r0 + rows_per_band)
            band_box = (bx0, by0 + r0 * step, bx1, by0 + r1 * step)
            band = self._resample(level, band_box, out_w, r1 - r0, region, (out_w, out_h))
            bands.append(band)
        return np.concatenate(bands, axis=0)

    def _ensure_memory(self, nbytes: float, region: Rect | None, out: tuple[int, int]) -> None:
        """Refuse a read that would need more memory than is available (before allocating)."""
        free = available_memory()
        if free is None or nbytes <= _MEMORY_SHARE * free:
            return
        where = "a region" if region is None else "region " + ",".join(f"{v:.4g}" for v in region)
        raise ConicQPError(
            f"reading {where} of {self._name} into {out[0]} x {out[1]} px needs "
            f"{_size(nbytes)} of memory, "
            f"more than the {_size(free)} available; the slide's {self._mpp:.4g} um/px is "
            f"probably wrong (check {option('mpp')}), or read a smaller region"
        )

    def _resample(
        self,
        level: int,
        box: tuple[float, float, float, float],
        out_w: int,
        out_h: int,
        region: Rect | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        lw, lh = self._level_dims[level]
        out_size = out_size or (out_w, out_h)
        bx0, by0, bx1, by1 = box
        # Integer window [wx0, wx1) x [wy0, wy1) holding the box; the part outside the level is
        # glass (white). Around it, the Lanczos support (3 output px) is read where it exists.
        wx0, wy0, wx1, wy1 = math.floor(bx0), math.floor(by0), math.ceil(bx1), math.ceil(by1)
        if wx1 <= 0 or wy1 <= 0 or wx0 >= lw or wy0 >= lh:
            return np.full((out_h, out_w, 3), 255, np.uint8)
        aligned = (bx0, by0, bx1, by1) == (wx0, wy0, wx1, wy1)
        inside = 0 <= wx0 and 0 <= wy0 and wx1 <= lw and wy1 <= lh
        if aligned and inside and (out_w, out_h) == (wx1 - wx0, wy1 - wy0):
            self._ensure_memory(3.0 * out_w * out_h, region, out_size)
            return self._read_level(level, wx0, wy0, wx1, wy1)  # a plain crop of this level
        margin = math.ceil(3 * max((bx1 - bx0) / out_w, (by1 - by0) / out_h, 1.0)) + 1
        rx0, ry0 = max(0, wx0 - margin), max(0, wy0 - margin)
        rx1, ry1 = min(lw, wx1 + margin), min(lh, wy1 + margin)
        ax0, ay0 = min(rx0, wx0), min(ry0, wy0)
        ax1, ay1 = max(rx1, wx1), max(ry1, wy1)
        # read + white padding + Pillow's intermediate (one pass per axis) + output
        window = float(rx1 - rx0) * (ry1 - ry0)
        padded = float(ax1 - ax0) * (ay1 - ay0)
        padded = padded if padded != window else 0.0  # the white canvas exists only if needed
        need = 3.0 * (window + padded + out_w * float(ay1 - ay0) + out_w * out_h)
        self._ensure_memory(need, region, out_size)
        pixels = self._read_level(level, rx0, ry0, rx1, ry1)
        if (ax0, ay0, ax1, ay1) != (rx0, ry0, rx1, ry1):
            full = np.full((ay1 - ay0, ax1 - ax0, 3), 255, np.uint8)
            full[ry0 - ay0 : ry1 - ay0, rx0 - ax0 : rx1 - ax0] = pixels
            pixels = full
        resized = Image.fromarray(pixels).resize(
            (out_w, out_h),
            Image.Resampling.LANCZOS,
            box=(bx0 - ax0, by0 - ay0, bx1 - ax0, by1 - ay0),
        )
        return np.asarray(resized, dtype=np.uint8)


class ImageSource(PyramidSource):
    """A single-level image held in memory (PNG/JPEG, non-pyramidal TIFF, arrays in tests)."""

    def __init__(self, image: np.ndarray, mpp: float, name: str = "image") -> None:
        self._name = name
        self._image = as_rgb(image, name)
        self._mpp = mpp
        self._level_dims = [(self._image.shape[1], self._image.shape[0])]

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._image[y0:y1, x0:x1].copy()


def pair_mpp(mpp_x: Any, mpp_y: Any) -> float | None:
    """Combine x/y um/px from metadata; anisotropic pixels are averaged with a warning."""
    try:
        vx = float(mpp_x) if mpp_x not in (None, "") else None
        vy = float(mpp_y) if mpp_y not in (None, "") else None
    except (TypeError, ValueError):
        return None
    if vx is None and vy is None:
        return None
    if vx is None or vy is None:
        return vx if vx is not None else vy
    if vx > 0 and vy > 0 and abs(vx - vy) / max(vx, vy) > 0.01:
        log.warning("anisotropic pixels (%.4g x %.4g um/px); using their mean", vx, vy)
    return (vx + vy) / 2


def check_mpp(mpp: float, *, force: bool = False) -> float:
    """Validate a level-0 um/px given by the user (the CLI's ``--mpp``); returns it as a float.

    Refuses non-positive and non-finite values always, and values outside :data:`MPP_RANGE`
    unless ``force``: brightfield scanners give 0.1-2.0 um/px, so 50 is a typo for 0.5 (a
    100-fold upsampling that would run for days) and 1e-9 a unit mistake. Callers validate
    options with it before they touch any output.
    """
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ConicQPError(
            f"{option('mpp')} {mpp} is not a positive number of um/px (e.g. 0.25 for 40x)"
        )
    lo, hi = MPP_RANGE
    if not force and not lo <= mpp <= hi:
        raise ConicQPError(
            f"{option('mpp')} {mpp:g} is outside the {lo:g}-{hi:g} um/px of brightfield scans "
            f"(0.25 for 40x, 0.5 for 20x); give the scan's real um/px, or force {mpp:g} "
            f"({option('force_mpp')}) if it is right"
        )
    return float(mpp)


def resolve_mpp(
    name: str, meta_mpp: float | None, override: float | None, *, force: bool = False
) -> float:
    """The level-0 um/px every reader uses: the user's ``override`` (checked by
    :func:`check_mpp`), else the metadata's when plausible; raises :class:`MppError` naming
    the rescue (``mpp``) otherwise, so every format fails the same way."""
    lo, hi = MPP_RANGE
    if override is not None:
        check_mpp(override, force=force)
        if not lo <= override <= hi:
            log.warning("%s: um/px %.4g is outside %g-%g um/px (forced)", name, override, lo, hi)
        if meta_mpp is not None and abs(meta_mpp - override) / override > 0.05:
            log.info("%s: metadata says %.4g um/px; using the given %.4g", name, meta_mpp, override)
        return float(override)
    hint = (
        f"pass {option('mpp')} with the scan's real resolution (e.g. {option('mpp')} 0.25 for "
        "40x, 0.5 for 20x)"
    )
    if meta_mpp is None:
        raise MppError(f"slide {name} has no um/px in its metadata; {hint}")
    if not (math.isfinite(meta_mpp) and lo <= meta_mpp <= hi):
        raise MppError(
            f"slide {name} reports {meta_mpp:.4g} um/px, which is implausible "
            f"(expected {lo}-{hi}); {hint}"
        )
    return float(meta_mpp)


def as_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """Validate an image as 8-bit RGB(A); alpha is composited on white."""
    array = np.asarray(array)
    channels = 1 if array.ndim == 2 else (array.shape[-1] if array.ndim == 3 else 0)
    if array.dtype != np.uint8 or channels not in (3, 4):
        raise not_rgb_error(name, f"{channels}-channel {array.dtype}")
    return composite_alpha(array) if channels == 4 else np.ascontiguousarray(array)


def composite_alpha(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGB(A) array, alpha composited on white (scanners mark empty areas with it)."""
    if rgba.shape[-1] == 3:
        return np.ascontiguousarray(rgba)
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def not_rgb_error(name: str, what: str) -> ConicQPError:
    """The one error every reader raises for a non-H&E image (``what``: e.g. "1-channel
    uint16")."""
    return ConicQPError(
        f"{name} is a {what} image; H&E RGB (8-bit, 3 channels) is required; fluorescence or "
        "grayscale images cannot be analysed with an H&E model"
    )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (None when the OS does not say).

    Linux: ``MemAvailable`` of ``/proc/meminfo`` (free plus reclaimable cache), capped by a
    cgroup limit; elsewhere psutil when installed.
    """
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except Exception:
            return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max":
                continue
            room = int(limit_text) - int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if 0 < room < avail:
            avail = room
    return avail


def _size(nbytes: float) -> str:
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= factor:
            return f"{nbytes / factor:.3g} {unit}"
    return f"{int(nbytes)} bytes"
