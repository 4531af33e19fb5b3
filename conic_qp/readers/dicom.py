"""DICOM whole-slide images (VL Whole Slide Microscopy) through wsidicom.

A DICOM WSI is usually a folder with one file (instance) per pyramid level, sometimes a single
file. wsidicom (a maintained reader of the standard) finds the levels, decodes the frames and
fills the tiles a sparse image lacks; this module only maps its levels to
:class:`~conic_qp.slides.PyramidSource` and applies the same checks as for files: 8-bit RGB,
a level-0 um/px from the metadata (``PixelSpacing``) that is plausible or an explicit ``mpp``,
one pixel decoded at open time so a broken file fails there.

wsidicom numbers levels by their scale (level ``n`` is ``2**n`` times coarser than the base);
the reader keeps those numbers and addresses each level in its own pixels.
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
from conic_qp.pyramid import PyramidSource, not_rgb_error, pair_mpp, resolve_mpp

log = logging.getLogger(__name__)

__all__ = ["DicomSource", "has_wsidicom"]

INSTALL = "install wsidicom (pip install 'conic-qp[dicom]') or convert the slide to pyramidal TIFF"


def has_wsidicom() -> bool:
    return importlib.util.find_spec("wsidicom") is not None


def _wsidicom() -> Any:
    try:
        return importlib.import_module("wsidicom")
    except ImportError:
        raise ConicQPError(f"reading DICOM whole-slide images needs wsidicom; {INSTALL}") from None


def _describe(path: Path, err: BaseException, wsidicom: Any) -> ConicQPError:
    """Why wsidicom refused ``path``, in the user's terms."""
    errors = wsidicom.errors
    detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    if isinstance(err, errors.WsiDicomNoResolutionError):
        what = "has no pixel spacing (PixelSpacing), so its um/px is unknown"
    elif isinstance(err, errors.WsiDicomNotFoundError):
        what = (
            "holds no whole-slide image level (VL Whole Slide Microscopy instances with "
            "ImageType VOLUME and their pixel positions)"
        )
    elif isinstance(err, errors.WsiDicomNotSupportedError | NotImplementedError):
        what = f"uses a DICOM encoding wsidicom does not read ({detail})"
    else:
        what = f"is not a DICOM whole-slide image wsidicom can read ({detail})"
    return ConicQPError(
        f"cannot read {path}: it {what}; re-export it as DICOM WSI (e.g. with wsidicomizer) or "
        "as pyramidal TIFF"
    )


def _force(force_mpp: bool) -> dict[str, bool]:
    return {"force": True} if force_mpp else {}


class DicomSource(PyramidSource):
    """A DICOM WSI (folder of instances or single file) read through wsidicom.

    Parameters
    ----------
    path : a ``.dcm`` file or a folder of the slide's ``.dcm`` files.
    mpp : level-0 um/px overriding ``PixelSpacing``.
    force_mpp : accept an ``mpp`` outside the plausible range (as for files).
    """

    def __init__(
        self, path: str | os.PathLike[str], mpp: float | None = None, *, force_mpp: bool = False
    ) -> None:
        wsidicom = _wsidicom()
        self._path = Path(path)
        self._name = self._path.name
        try:
            self._wsi: Any = wsidicom.WsiDicom.open(self._path)
        except Exception as err:  # wsidicom and pydicom raise many types for bad files
            raise _describe(self._path, err, wsidicom) from err
        try:
            levels = list(self._wsi.levels)
            self._level_numbers = [int(level.level) for level in levels]
            self._level_dims = [(int(lv.size.width), int(lv.size.height)) for lv in levels]
            meta_mpp = pair_mpp(self._wsi.mpp.width, self._wsi.mpp.height)
            self._mpp = resolve_mpp(self._name, meta_mpp, mpp, **_force(force_mpp))
            probe = self._raw(len(levels) - 1, 0, 0, 1, 1)
            if probe.dtype != np.uint8 or probe.ndim != 3 or probe.shape[-1] not in (3, 4):
                channels = probe.shape[-1] if probe.ndim == 3 else 1
                raise not_rgb_error(self._name, f"{channels}-channel {probe.dtype} (DICOM)")
        except BaseException:
            self.close()
            raise
        log.debug("opened %s: levels %s, %.4g um/px", path, self._level_dims, self._mpp)

    def _raw(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._wsi is None:
            raise ConicQPError(f"{self._name} was closed; open it again to read")
        try:
            arr = self._wsi.read_region(
                (x0, y0), self._level_numbers[level], (x1 - x0, y1 - y0), as_array=True
            )
        except Exception as err:
            raise ConicQPError(
                f"cannot read level {level} [{x0}:{x1}, {y0}:{y1}] of {self._path}: {err}; the "
                "file may be incomplete or corrupt"
            ) from err
        return np.asarray(arr)

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        arr = self._raw(level, x0, y0, x1, y1)
        if arr.ndim == 2:
            raise not_rgb_error(self._name, f"1-channel {arr.dtype} (DICOM)")
        return np.ascontiguousarray(arr[..., :3])

    def close(self) -> None:
        wsi = getattr(self, "_wsi", None)
        if wsi is not None:
            wsi.close()
            self._wsi = None
