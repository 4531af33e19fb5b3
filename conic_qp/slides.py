"""Open slide files: tiffslide (TIFF family), OpenSlide and wsidicom (fallback and DICOM), Pillow.

:func:`open_slide` looks at the file and picks the reader: DICOM (a ``.dcm`` file, or a folder
of them) through wsidicom (:mod:`conic_qp.readers.dicom`); TIFF-based files through tiffslide,
falling back to OpenSlide (:mod:`conic_qp.readers.openslide`) for vendor variants tiffslide
cannot read; vendor formats outside TIFF (MIRAX, Hamamatsu VMS, ...) through OpenSlide; plain
images through Pillow. Every reader is a :class:`~conic_qp.pyramid.PyramidSource` (the shared
level choice, resampling and um/px checks live in :mod:`conic_qp.pyramid`, re-exported here).

Files are checked at open time, so a bad one fails there with one line: not RGB, truncated or
incomplete (tile data beyond the end of the file), a declared size its data cannot hold, no
plausible um/px; a file that cannot be opened is described in the user's terms (empty file,
text, incomplete copy).
"""

from __future__ import annotations

import logging
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import tiffslide
from PIL import Image, UnidentifiedImageError

from conic_qp.errors import ConicQPError
from conic_qp.inputs import describe_content
from conic_qp.pyramid import (
    _MEMORY_SHARE,
    LEVEL_EPS,
    MPP_RANGE,
    ImageSource,
    PyramidSource,
    Rect,
    SlideSource,
    _size,
    as_rgb,
    available_memory,
    check_mpp,
    composite_alpha,
    not_rgb_error,
    pair_mpp,
    resolve_mpp,
    scaled_size,
)

log = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "LEVEL_EPS",
    "MPP_RANGE",
    "SLIDE_SUFFIXES",
    "ImageSource",
    "PyramidSource",
    "Rect",
    "SlideSource",
    "TiffSlideSource",
    "UnreadableSlideError",
    "as_rgb",
    "available_memory",
    "check_mpp",
    "composite_alpha",
    "is_dicom_folder",
    "not_rgb_error",
    "open_slide",
    "pair_mpp",
    "resolve_mpp",
    "scaled_size",
]

#: File suffixes taken from a folder given as input: what tiffslide, OpenSlide (fallback) and
#: Pillow open, and single-file DICOM. A folder holding only ``.dcm`` files is one DICOM slide.
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".scn",
    ".bif",
    ".qptiff",
    ".mrxs",
    ".vms",
    ".vmu",
    ".svslide",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
)
DICOM_SUFFIXES: tuple[str, ...] = (".dcm",)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_LENGTH_UM = {"nm": 1e-3, "um": 1.0, "µm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


class _LevelCoordTiffSlide(tiffslide.TiffSlide):
    """TiffSlide whose ``read_region`` location is given in the level's own pixels.

    tiffslide documents ``_read_region_loc_transform`` as the hook for this; it avoids the
    off-by-one of ``int(x0 * ds / ds)`` with non-integer downsamples.
    """

    def _read_region_loc_transform(self, location: tuple[int, int], level: int) -> tuple[int, int]:
        return int(location[0]), int(location[1])


class TiffSlideSource(PyramidSource):
    """Any TIFF that tiffslide opens (SVS, generic and OME pyramidal TIFF, plain TIFF)."""

    def __init__(self, path: Path, mpp: float | None = None, *, force_mpp: bool = False) -> None:
        self._name = path.name
        self._path = path
        try:
            slide = _LevelCoordTiffSlide(path)
            self._slide: _LevelCoordTiffSlide | None = slide
            props = slide.properties
            axes = str(props["tiffslide.series-axes"])
            tf = slide.ts_tifffile
            series = tf.series[int(props["tiffslide.series-index"])]
            self._level_dims = [(int(w), int(h)) for w, h in slide.level_dimensions]
        except Exception as err:
            described = _describe_tiff_pixels(path)
            if described is not None:
                raise not_rgb_error(self._name, described) from err
            raise _unreadable(path, err) from err
        try:
            self._check_pixels(axes, series.dtype, series.shape)
            _check_truncated(path, series)
            _check_declared_size(path, series)
            self._alpha = axes == "YXS" and int(series.shape[-1]) == 4
            meta_mpp = _ome_mpp(tf) if tf.is_ome else None
            if meta_mpp is None:
                meta_mpp = pair_mpp(
                    props.get(tiffslide.PROPERTY_NAME_MPP_X),
                    props.get(tiffslide.PROPERTY_NAME_MPP_Y),
                )
            self._mpp = resolve_mpp(self._name, meta_mpp, mpp, force=force_mpp)
            # Decode one pixel of the coarsest level now, so a broken codec fails at open time.
            self._read_level(len(self._level_dims) - 1, 0, 0, 1, 1)
        except BaseException:
            self.close()
            raise
        log.debug("opened %s: levels %s, %.4g um/px", path, self._level_dims, self._mpp)

    def _check_pixels(self, axes: str, dtype: Any, shape: Sequence[int]) -> None:
        samples = {"YXS": int(shape[-1]), "CYX": int(shape[0]), "YX": 1}.get(axes, 0)
        if np.dtype(dtype) != np.uint8 or samples not in (3, 4) or (axes == "CYX" and samples != 3):
            raise not_rgb_error(self._name, f"{samples}-channel {np.dtype(dtype)} ({axes})")

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._slide is None:
            raise ConicQPError(f"{self._name} was closed; open it again to read")
        try:
            arr = self._slide.read_region((x0, y0), level, (x1 - x0, y1 - y0), as_array=True)
        except Exception as err:
            raise ConicQPError(
                f"cannot read level {level} [{x0}:{x1}, {y0}:{y1}] of {self._path}: {err}; the "
                "file may be truncated or corrupt"
            ) from err
        arr = np.asarray(arr)
        return composite_alpha(arr) if self._alpha else np.ascontiguousarray(arr[..., :3])

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


def is_dicom_folder(path: str | Path) -> bool:
    """True for a folder holding ``.dcm`` files and no other slide files: one DICOM WSI
    (one file per pyramid level, as DICOM stores them)."""
    p = Path(path)
    if not p.is_dir():
        return False
    has_dicom = False
    for q in p.iterdir():
        if not q.is_file() or q.name.startswith("."):
            continue
        suffix = q.suffix.lower()
        if suffix in DICOM_SUFFIXES:
            has_dicom = True
        elif suffix in SLIDE_SUFFIXES:
            return False
    return has_dicom


def open_slide(
    path: str | Path, mpp: float | None = None, *, force_mpp: bool = False
) -> PyramidSource:
    """Open a slide or image file as a :class:`SlideSource`.

    Parameters
    ----------
    path : SVS / pyramidal TIFF / OME-TIFF / any TIFF tiffslide reads, or PNG/JPEG.
    mpp : level-0 um/px overriding the metadata (the CLI's ``--mpp``); required when the file
        has no plausible resolution (0.1-2.0 um/px) in its metadata, e.g. PNG/JPEG.
    force_mpp : accept an ``mpp`` outside :data:`MPP_RANGE` (see :func:`check_mpp`).

    Raises
    ------
    ConicQPError
        Missing, empty, unreadable, incomplete or non-RGB file; DICOM without a reader; missing
        or implausible um/px; a read larger than the available memory.
    """
    path = Path(path)
    if not path.exists():
        raise ConicQPError(f"slide file {path} does not exist; check the path")
    if mpp is not None:
        check_mpp(mpp, force=force_mpp)
    if path.is_dir():
        if is_dicom_folder(path):
            return _open_dicom(path, mpp, force_mpp)
        raise ConicQPError(f"{path} is a folder, not a slide file; pass the slide file itself")
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise _unreadable(path, err) from err
    if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
        return _open_dicom(path, mpp, force_mpp)
    if head[:4] in _TIFF_MAGIC:
        try:
            return TiffSlideSource(path, mpp, force_mpp=force_mpp)
        except UnreadableSlideError:
            if _openslide_vendor(path) is None:
                raise
        return _open_openslide(path, mpp, force_mpp)
    if _openslide_vendor(path) is not None:
        return _open_openslide(path, mpp, force_mpp)
    return _open_pil(path, mpp, force_mpp)


def _openslide_vendor(path: Path) -> str | None:
    """A vendor format OpenSlide reads and tiffslide/Pillow do not (None: not one, or no
    OpenSlide); OpenSlide's "generic-tiff" adds nothing over tiffslide."""
    from conic_qp.readers.openslide import openslide_format

    vendor = openslide_format(path)
    return None if vendor in (None, "generic-tiff") else vendor


def _open_openslide(path: Path, mpp: float | None, force_mpp: bool) -> PyramidSource:
    from conic_qp.readers.openslide import OpenSlideSource

    log.debug("%s: read through OpenSlide", path)
    return OpenSlideSource(path, mpp, force_mpp=force_mpp)


def _open_dicom(path: Path, mpp: float | None, force_mpp: bool) -> PyramidSource:
    from conic_qp.readers.dicom import DicomSource, has_wsidicom

    if not has_wsidicom():
        raise ConicQPError(
            f"{path.name} is a DICOM whole-slide image, which needs a DICOM reader: "
            "`pip install wsidicom`, or convert it to pyramidal TIFF"
        )
    return DicomSource(path, mpp, force_mpp=force_mpp)


def _open_pil(path: Path, mpp: float | None, force_mpp: bool = False) -> ImageSource:
    try:
        with Image.open(path) as opened:
            w, h = opened.size
            need = 2.0 * w * h * max(3, len(opened.getbands()))  # decoded + RGB copy
            free = available_memory()
            if free is not None and need > _MEMORY_SHARE * free:
                raise ConicQPError(
                    f"{path} declares {w} x {h} px, which needs {_size(need)} of memory to "
                    f"decode, more than the {_size(free)} available; a plain image is decoded "
                    "whole, so convert it to a tiled pyramidal TIFF (e.g. with vips or QuPath)"
                )
            opened.load()
            dpi = opened.info.get("dpi")
            im: Image.Image = opened
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                alpha = "A" in im.mode or "transparency" in im.info
                im = im.convert("RGBA" if alpha else "RGB")
            array = np.asarray(im)
    except Image.DecompressionBombError as err:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ConicQPError(
            f"{path} declares an image of more than {limit:,} px, more than conic-qp decodes "
            "whole from a plain (not tiled) image; convert it to a tiled pyramidal TIFF (e.g. "
            "with vips or QuPath)"
        ) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise _unreadable(path, err) from err
    meta_mpp = None
    if dpi:
        try:
            meta_mpp = pair_mpp(25400.0 / float(dpi[0]), 25400.0 / float(dpi[1]))
        except (ZeroDivisionError, TypeError, ValueError, IndexError):
            meta_mpp = None
    resolved = resolve_mpp(path.name, meta_mpp, mpp, force=force_mpp)
    return ImageSource(array, resolved, name=path.name)


# -- metadata helpers ---------------------------------------------------------------------------


def _ome_mpp(tf: Any) -> float | None:
    """PhysicalSizeX/Y of the first OME ``Pixels`` element, in um/px."""
    try:
        root = ET.fromstring(tf.ome_metadata)
    except (ET.ParseError, TypeError, ValueError):
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        values = []
        for axis in ("X", "Y"):
            size = element.get(f"PhysicalSize{axis}")
            unit = element.get(f"PhysicalSize{axis}Unit", "µm")
            factor = _LENGTH_UM.get(unit)
            values.append(None if size is None or factor is None else float(size) * factor)
        return pair_mpp(*values)
    return None


# -- pixel / file checks ------------------------------------------------------------------------


def _check_truncated(path: Path, series: Any) -> None:
    """Fail at open time if tile/strip data of any level lies beyond the end of the file."""
    size = path.stat().st_size
    end = 0
    for level in series.levels:
        for page in level.pages:
            if page is None:
                continue
            offsets = getattr(page, "dataoffsets", ())
            counts = getattr(page, "databytecounts", ())
            if len(offsets):
                end = max(end, max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False)))
    if end > size:
        raise ConicQPError(
            f"cannot read {path}: it is an incomplete copy (truncated at {size:,} bytes; its "
            f"image data runs to byte {end:,}); copy or download it again"
        )


def _check_declared_size(path: Path, series: Any) -> None:
    """Refuse a TIFF whose dimensions do not fit its data, or whose blocks exceed memory.

    An uncompressed page must store width x height x samples bytes; fewer means a wrong header
    (e.g. 200000 x 200000 px declared over a few kB). Each strip or tile is decoded whole, so a
    single strip of gigabytes cannot be read on this machine at all.
    """
    free = available_memory()
    for level in series.levels:
        page = level.pages[0] if level.pages else None
        if page is None:
            continue
        width, length = int(getattr(page, "imagewidth", 0)), int(getattr(page, "imagelength", 0))
        item = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
        declared = float(np.prod(page.shape, dtype=np.float64)) * item
        stored = float(sum(int(c) for c in getattr(page, "databytecounts", ())))
        if int(getattr(page, "compression", 1)) == 1 and stored < declared:
            raise ConicQPError(
                f"cannot read {path}: it declares {width} x {length} px ({_size(declared)} of "
                f"pixels) but holds only {_size(stored)} of image data; its header is wrong or "
                "the file is incomplete: re-export or copy it again"
            )
        chunk = float(np.prod(getattr(page, "chunks", ()) or (0,), dtype=np.float64)) * item
        if free is not None and chunk > _MEMORY_SHARE * free:
            raise ConicQPError(
                f"cannot read {path}: it stores {width} x {length} px in blocks of "
                f"{_size(chunk)} that are decoded whole, more than the {_size(free)} of memory "
                "available; convert it to a tiled pyramidal TIFF (e.g. with vips or QuPath)"
            )


def _tiff_structure_problem(path: Path) -> str | None:
    """What is wrong with the TIFF directory chain of ``path`` (None if it is complete)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(16)
            if len(head) < 8:
                return f"an incomplete copy (truncated at {size} bytes)"
            order = "<" if head[:2] == b"II" else ">"
            big = head[2:4] in (b"+\x00", b"\x00+")
            if big and len(head) < 16:
                return f"an incomplete copy (truncated at {size} bytes)"
            offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[
                0
            ]
            count_fmt, entry, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
            count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
            seen: set[int] = set()
            while offset and len(seen) < 100_000:
                if offset in seen:
                    return "a damaged TIFF (its list of images loops)"
                seen.add(offset)
                if offset + count_size > size:
                    return _incomplete(size, offset + count_size)
                fh.seek(offset)
                (count,) = struct.unpack(order + count_fmt, fh.read(count_size))
                end = offset + count_size + count * entry + next_size
                if end > size:
                    return _incomplete(size, end)
                fh.seek(offset + count_size + count * entry)
                (offset,) = struct.unpack(order + next_fmt, fh.read(next_size))
    except (OSError, struct.error):
        return None
    return None


def _incomplete(size: int, needed: int) -> str:
    return (
        f"an incomplete copy (truncated at {size:,} bytes; its TIFF structure refers to byte "
        f"{needed:,})"
    )


def _describe_tiff_pixels(path: Path) -> str | None:
    """Describe a TIFF that tiffslide refused if it is readable but not RGB (else None)."""
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            dtype, shape, axes = np.dtype(series.dtype), tuple(series.shape), series.axes
    except Exception:
        return None
    if dtype == np.uint8 and axes.endswith("YXS") and shape[-1] in (3, 4):
        return None
    return f"{axes} {shape} {dtype}"


class UnreadableSlideError(ConicQPError):
    """The file is not an image this reader decodes (empty, text, damaged, another format)."""


def _unreadable(path: Path, err: BaseException) -> ConicQPError:
    """Say what the file is, in the user's terms, rather than what the decoder tripped on."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    content = describe_content(path)
    if content is not None and content.startswith("an empty file"):
        return UnreadableSlideError(
            f"cannot read {path}: it is an empty file (0 bytes), so its copy or download did not "
            "complete; copy it again"
        )
    if content is not None:
        return UnreadableSlideError(
            f"cannot read {path}: it is not an image but {content}; a failed download often "
            "saves an error page: download the slide again, or check that this is the slide file"
        )
    try:
        with path.open("rb") as fh:
            is_tiff = fh.read(4) in _TIFF_MAGIC
    except OSError:
        is_tiff = False
    if is_tiff:
        problem = _tiff_structure_problem(path)
        if problem is not None:
            return UnreadableSlideError(
                f"cannot read {path}: it is {problem}; copy or download it again"
            )
        return UnreadableSlideError(
            f"cannot read {path}: the TIFF is damaged or uses a layout tiffslide cannot read "
            f"({reason[:120]}); copy it again, or re-export it as pyramidal TIFF"
        )
    return UnreadableSlideError(
        f"cannot read {path}: it is not an image format conic-qp reads (SVS, TIFF, OME-TIFF, "
        f"PNG, JPEG) or it is damaged ({reason[:120]}); convert it to pyramidal TIFF"
    )
