"""Slide formats tiffslide cannot read, through openslide-python (+ the openslide-bin library).

tiffslide reads TIFF-based formats in pure Python; vendor formats outside TIFF (3DHistech MIRAX
``.mrxs``, Hamamatsu ``.vms``/``.vmu``, Sakura ``.svslide``) and TIFF variants it refuses (some
Leica ``.scn`` and Ventana ``.bif`` layouts) are read by OpenSlide, the field's C library, which
``openslide-bin`` ships as a wheel. :func:`openslide_format` says whether OpenSlide recognises a
file; :class:`OpenSlideSource` maps its levels to :class:`~conic_qp.slides.PyramidSource` with
the same checks as for files (um/px from ``openslide.mpp-x/y``, one pixel decoded at open).

OpenSlide addresses regions in level-0 coordinates and returns RGBA with transparent pixels
where nothing was scanned (MIRAX slides are mostly empty); those are glass, composited on white.
Level pixels are addressed exactly when the downsample is an integer (the pyramids of these
formats are powers of two); other downsamples round to the nearest level-0 pixel.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from conic_qp.errors import ConicQPError
from conic_qp.pyramid import PyramidSource, composite_alpha, pair_mpp, resolve_mpp

log = logging.getLogger(__name__)

__all__ = ["OpenSlideSource", "has_openslide", "openslide_format"]

INSTALL = "install OpenSlide: pip install 'conic-qp[openslide]' (openslide-python, openslide-bin)"


def has_openslide() -> bool:
    return importlib.util.find_spec("openslide") is not None


def _openslide() -> Any:
    try:
        return importlib.import_module("openslide")
    except ImportError:
        raise ConicQPError(f"reading this slide format needs OpenSlide; {INSTALL}") from None
    except OSError as exc:  # openslide-python without the C library
        raise ConicQPError(f"OpenSlide's library cannot be loaded ({exc}); {INSTALL}") from None


def openslide_format(path: str | os.PathLike[str]) -> str | None:
    """The vendor OpenSlide detects for ``path`` (e.g. ``"mirax"``), or None (also when
    OpenSlide is not installed)."""
    if not has_openslide():
        return None
    try:
        fmt = _openslide().OpenSlide.detect_format(os.fspath(path))
    except (ConicQPError, OSError, Exception):  # detection must never fail a batch
        return None
    return str(fmt) if fmt else None


class OpenSlideSource(PyramidSource):
    """A slide read through OpenSlide.

    Parameters
    ----------
    path : any file OpenSlide opens (for MIRAX the ``.mrxs`` file beside its data folder).
    mpp : level-0 um/px overriding ``openslide.mpp-x/y``.
    force_mpp : accept an ``mpp`` outside the plausible range (as for files).
    """

    def __init__(
        self, path: str | os.PathLike[str], mpp: float | None = None, *, force_mpp: bool = False
    ) -> None:
        openslide = _openslide()
        self._path = Path(path)
        self._name = self._path.name
        try:
            self._slide: Any = openslide.OpenSlide(os.fspath(self._path))
        except Exception as err:
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise ConicQPError(
                f"cannot read {self._path}: OpenSlide cannot open it ({reason}); the file (or the "
                "data folder beside a .mrxs/.vms file) may be incomplete: copy it again"
            ) from err
        try:
            props = self._slide.properties
            self._level_dims = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
            self._downsamples = [float(d) for d in self._slide.level_downsamples]
            meta_mpp = pair_mpp(
                props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
            )
            force = {"force": True} if force_mpp else {}
            self._mpp = resolve_mpp(self._name, meta_mpp, mpp, **force)
            self._read_level(len(self._level_dims) - 1, 0, 0, 1, 1)  # fail at open time
        except BaseException:
            self.close()
            raise
        self.vendor = str(props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"))
        log.debug("opened %s (%s): levels %s, %.4g um/px", path, self.vendor, self._level_dims,
                  self._mpp)  # fmt: skip

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._slide is None:
            raise ConicQPError(f"{self._name} was closed; open it again to read")
        ds = self._downsamples[level]
        location = (round(x0 * ds), round(y0 * ds))
        try:
            image = self._slide.read_region(location, level, (x1 - x0, y1 - y0))
        except Exception as err:
            raise ConicQPError(
                f"cannot read level {level} [{x0}:{x1}, {y0}:{y1}] of {self._path}: {err}; the "
                "file may be incomplete or corrupt"
            ) from err
        return composite_alpha(np.asarray(image.convert("RGBA"), dtype=np.uint8))

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
