"""Tissue detection on a slide thumbnail, so background tiles are never sent to the network.

Pure numpy / scikit-image. Stained tissue is coloured and absorbs light; glass is white (low
saturation, low optical density); black scanner padding and grey dust are unsaturated, and
near-black noise (whatever its hue) is not stain. A pixel is tissue when its HSV saturation
exceeds an Otsu threshold (clamped to a sane range, so an all-glass or all-tissue thumbnail is
not split in half), its optical density is above the faint-glass level and it is not near-black.
Small specks are removed and holes (lumens, fat) filled: missing a little tissue loses nuclei,
an extra tile only costs time.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.measure import label

from conic_qp.pyramid import Rect

log = logging.getLogger(__name__)

__all__ = ["box_in_mask", "has_tissue", "mask_region", "tissue_fraction", "tissue_mask"]

#: Saturation thresholds are clamped to this range: glass is below 0.05, H&E tissue above 0.2.
SATURATION_RANGE = (0.05, 0.2)
#: Mean optical density below this is glass even if its hue is tinted (e.g. coloured glass edge).
MIN_OPTICAL_DENSITY = 0.05
#: Pixels whose brightest channel is below this are scanner padding, ink or shadow, not stain.
MIN_VALUE = 0.15


def tissue_mask(
    thumbnail_rgb: np.ndarray,
    *,
    min_object_fraction: float = 0.0005,
    fill_holes: bool = True,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Parameters
    ----------
    thumbnail_rgb : (h, w, 3) uint8.
    min_object_fraction : connected tissue pieces smaller than this fraction of the thumbnail
        (default 0.05%, i.e. ~30 px of a 256x256 thumbnail) are dust and removed.
    fill_holes : fill enclosed holes (lumens, fat) so their rims are not cut off.

    Returns
    -------
    (h, w) bool, True on tissue. An all-False mask means the slide has no tissue (see
    :func:`has_tissue`); callers decide how to report it.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"tissue detection needs an (h, w, 3) uint8 RGB thumbnail, got {rgb.shape} {rgb.dtype}"
        )
    hsv = rgb2hsv(rgb)
    saturation, value = hsv[..., 1], hsv[..., 2]
    optical_density = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    lo, hi = SATURATION_RANGE
    threshold = hi
    if np.ptp(saturation) > 0:
        threshold = float(np.clip(threshold_otsu(saturation), lo, hi))
    mask = (saturation > threshold) & (optical_density > MIN_OPTICAL_DENSITY) & (value > MIN_VALUE)
    min_size = max(1, round(min_object_fraction * mask.size))
    mask = remove_small(mask, min_size)
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    log.debug("tissue: saturation threshold %.3f, %.1f%% tissue", threshold, 100 * mask.mean())
    return np.asarray(mask, dtype=bool)


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels.

    (``skimage.morphology.remove_small_objects`` renamed its size argument in 0.26; this keeps
    the semantics fixed across the supported scikit-image versions.)
    """
    labels = label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return np.asarray(keep[labels], dtype=bool)


def has_tissue(mask: np.ndarray, min_fraction: float = 0.0) -> bool:
    """True when more than ``min_fraction`` of the mask is tissue."""
    m = np.asarray(mask, dtype=bool)
    return bool(m.size) and float(m.mean()) > min_fraction


def _mask_window(
    mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """The mask pixels covering ``box`` (y0, x0, y1, x1) of a grid of ``shape``.

    The mask and the grid cover the same area at different scales; the window is rounded
    outwards so a box never misses the tissue pixels it touches.
    """
    mh, mw = mask.shape[:2]
    gh, gw = shape
    y0, x0, y1, x1 = box
    if not (0 <= y0 < y1 <= gh and 0 <= x0 < x1 <= gw):
        raise ValueError(f"box {box} is not inside the grid {shape}")
    sy, sx = mh / gh, mw / gw
    my0 = min(int(np.floor(y0 * sy)), mh - 1)
    mx0 = min(int(np.floor(x0 * sx)), mw - 1)
    my1 = max(int(np.ceil(y1 * sy)), my0 + 1)
    mx1 = max(int(np.ceil(x1 * sx)), mx0 + 1)
    return mask[my0:my1, mx0:mx1]


def tissue_fraction(
    mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int] | None = None
) -> float:
    """Fraction of tissue under ``box`` = (y0, x0, y1, x1).

    ``box`` is in a pixel grid of ``shape`` (H, W) covering the same area as ``mask`` (default:
    the mask's own grid), so boxes at the model's resolution can be tested against a thumbnail.
    """
    m = np.asarray(mask, dtype=bool)
    window = _mask_window(m, box, shape if shape is not None else (m.shape[0], m.shape[1]))
    return float(window.mean())


def box_in_mask(
    mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int] | None = None
) -> bool:
    """True when ``box`` (grid of ``shape``, see :func:`tissue_fraction`) touches any tissue."""
    m = np.asarray(mask, dtype=bool)
    return bool(
        _mask_window(m, box, shape if shape is not None else (m.shape[0], m.shape[1])).any()
    )


def mask_region(mask: np.ndarray, downsample: float, region: Rect) -> np.ndarray:
    """Crop a whole-slide mask to a level-0 ``region`` (x, y, w, h).

    ``downsample`` is level-0 pixels per mask pixel (what ``SlideSource.thumbnail`` returns).
    Rounded outwards; the result covers the region (up to one mask pixel more) and can be given
    to :func:`conic_qp.tissue.box_in_mask` (as :func:`conic_qp.plan.plan_slide` does).
    """
    if downsample <= 0:
        raise ValueError(f"mask downsample must be positive, got {downsample}")
    x, y, w, h = region
    mh, mw = mask.shape[:2]
    x0 = int(np.clip(np.floor(x / downsample), 0, mw - 1))
    y0 = int(np.clip(np.floor(y / downsample), 0, mh - 1))
    x1 = int(np.clip(np.ceil((x + w) / downsample), x0 + 1, mw))
    y1 = int(np.clip(np.ceil((y + h) / downsample), y0 + 1, mh))
    return np.asarray(mask[y0:y1, x0:x1], dtype=bool)
