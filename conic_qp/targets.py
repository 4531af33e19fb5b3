"""Training targets (paper II.C): instance map (+ classes) -> 3-label, centre-vector, semantic maps.

Pure numpy / scipy / scikit-image; no I/O and no torch. The network's instance decoder learns the
3-label map (background, nucleus interior, nucleus boundary) and, as an auxiliary task, the vector
from every nucleus pixel to its nucleus centre; its semantic decoder learns the class map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from skimage.segmentation import find_boundaries

from conic_qp.errors import ConicQPError

log = logging.getLogger(__name__)

#: Centre vectors are stored in units of ``VECTOR_SCALE`` pixels so that the regression target of a
#: typical nucleus (radius 3-10 px at 0.5 um/px, up to ~20 px at 0.25 um/px) is of order 1, the
#: range in which an L2 loss balances with the two cross-entropy terms.
VECTOR_SCALE: float = 10.0

#: Values of the 3-label map (and channel order of the network's 3-label head).
BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2

#: Instance classes: a class map (H, W) of the same shape, a mapping ``{instance id: class id}``,
#: or a 1-D lookup array whose entry ``k`` is the class of instance id ``k`` (entry 0 is ignored).
InstanceClasses = np.ndarray | Mapping[int, int]


@dataclass
class Targets:
    """Training targets of one image.

    Attributes
    ----------
    three_label : (H, W) uint8; 0 background, 1 nucleus interior, 2 nucleus boundary.
    vectors : (2, H, W) float32; dy, dx from each nucleus pixel to its centroid / ``VECTOR_SCALE``.
    semantic : (H, W) int64 class ids (0 background), or None for data sets without classes
        (the semantic loss then skips the image).
    """

    three_label: np.ndarray
    vectors: np.ndarray
    semantic: np.ndarray | None


def _check_inst_map(inst_map: np.ndarray) -> np.ndarray:
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise ConicQPError(
            f"instance map has shape {inst_map.shape}; expected a 2-D (H, W) array of instance ids"
        )
    if inst_map.dtype == bool or not np.issubdtype(inst_map.dtype, np.integer):
        raise ConicQPError(
            f"instance map has dtype {inst_map.dtype}; "
            "expected integer instance ids (0 = background)"
        )
    if inst_map.size and np.issubdtype(inst_map.dtype, np.signedinteger) and inst_map.min() < 0:
        raise ConicQPError("instance map contains negative ids; use 0 for background and ids > 0")
    return inst_map


def _dense_ids(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids of each pixel in 0..K, original id of each dense id) without huge bincounts."""
    flat = inst_map.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 16:
        present = np.zeros(top + 1, dtype=bool)
        present[flat] = True
        present[0] = True
        originals = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[originals] = np.arange(originals.size)
        return lut[flat], originals
    originals, dense = np.unique(flat, return_inverse=True)
    if originals[0] != 0:  # keep dense id 0 = background even when the map has no background
        originals = np.concatenate([[0], originals])
        dense = dense + 1
    return dense.ravel(), originals


def three_label_map(inst_map: np.ndarray) -> np.ndarray:
    """3-label map: 0 background, 1 nucleus interior, 2 nucleus boundary.

    The boundary is the inner, 4-connected outline of every instance (pixels of an instance with a
    4-neighbour of another label or of background; ``find_boundaries(mode="inner",
    connectivity=1)``). Inner keeps interior + boundary equal to the nuclei (the foreground is not
    inflated); the 1-px outline keeps the interior of small nuclei (5-10 px across at 0.5 um/px);
    and two touching nuclei are separated by two boundary pixels, so interiors of different
    instances are not even 8-adjacent: connected components of the interior are the instances.
    The image border is not a boundary: a nucleus cut by a tile edge continues outside it.
    """
    inst_map = _check_inst_map(inst_map)
    boundary = find_boundaries(inst_map, connectivity=1, mode="inner", background=0)
    out = (inst_map > 0).astype(np.uint8)
    out[boundary & (inst_map > 0)] = BOUNDARY
    return out


def center_vectors(inst_map: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 offsets (dy, dx) from each nucleus pixel to its centroid / VECTOR_SCALE.

    The centroid is the mean pixel coordinate of the instance (all of its components, if an
    annotation has several); background pixels are 0.
    """
    inst_map = _check_inst_map(inst_map)
    h, w = inst_map.shape
    dense, originals = _dense_ids(inst_map)
    n = originals.size
    rows, cols = np.indices((h, w), dtype=np.float64)
    counts = np.bincount(dense, minlength=n).astype(np.float64)
    counts[counts == 0] = 1.0
    cy = np.bincount(dense, weights=rows.ravel(), minlength=n) / counts
    cx = np.bincount(dense, weights=cols.ravel(), minlength=n) / counts
    fg = (dense > 0).reshape(h, w)
    dense2 = dense.reshape(h, w)
    out = np.zeros((2, h, w), dtype=np.float32)
    out[0] = np.where(fg, (cy[dense2] - rows) / VECTOR_SCALE, 0.0)
    out[1] = np.where(fg, (cx[dense2] - cols) / VECTOR_SCALE, 0.0)
    return out


def semantic_map(inst_map: np.ndarray, classes: InstanceClasses) -> np.ndarray:
    """(H, W) int64 class map (0 background) from instance classes or an existing class map.

    ``classes`` is a class map of the same shape (pixels outside nuclei are forced to 0 so the
    semantic and 3-label targets agree on the foreground), a mapping ``{instance id: class id}``,
    or a 1-D lookup array with the class of instance id ``k`` at index ``k`` (for CoNSeP's
    ``inst_type`` (N, 1), whose row ``k - 1`` is instance ``k``, pass
    ``np.r_[0, inst_type.ravel()]``).
    """
    inst_map = _check_inst_map(inst_map)
    fg = inst_map > 0
    if isinstance(classes, Mapping):
        ids = np.unique(inst_map[fg])
        missing = [int(i) for i in ids if int(i) not in classes]
        if missing:
            raise ConicQPError(
                f"instance ids {missing[:5]} have no class in the class mapping; "
                "give a class for every instance id of the map"
            )
        values = np.array([int(classes[int(i)]) for i in ids], dtype=np.int64)
        if values.size and values.min() < 0:
            raise ConicQPError(
                "negative class id in the class mapping; use ids 1..C (0 background)"
            )
        out = np.zeros(inst_map.shape, dtype=np.int64)
        out[fg] = values[np.searchsorted(ids, inst_map[fg])]
        return out
    arr = np.asarray(classes)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if arr.size and np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ConicQPError(f"classes have dtype {arr.dtype}; expected integer class ids")
    if arr.size and arr.min() < 0:
        raise ConicQPError("negative class id; use class ids 1..C and 0 for background")
    if arr.ndim == 2 and arr.shape == inst_map.shape:
        return np.where(fg, arr, 0).astype(np.int64)
    if arr.ndim == 2 and arr.shape[1] == 1 and arr.shape != inst_map.shape:
        raise ConicQPError(
            f"classes of shape {arr.shape} look like a per-instance column "
            "(e.g. CoNSeP inst_type); "
            "pass a 1-D lookup indexed by instance id, e.g. np.r_[0, inst_type.ravel()]"
        )
    if arr.ndim != 1:
        raise ConicQPError(
            f"classes have shape {arr.shape}; expected a class map of shape {inst_map.shape}, "
            "a 1-D lookup indexed by instance id, or a mapping {instance id: class id}"
        )
    top = int(inst_map.max()) if inst_map.size else 0
    if top >= arr.size:
        raise ConicQPError(
            f"class lookup has {arr.size} entries but the instance map has id {top}; "
            "the lookup needs an entry for every id (index = instance id)"
        )
    out = arr.astype(np.int64)[inst_map]
    out[~fg] = 0
    return out


def make_targets(inst_map: np.ndarray, classes: InstanceClasses | None = None) -> Targets:
    """All training targets of one image; ``semantic`` is None when no classes are given."""
    inst_map = _check_inst_map(inst_map)
    if isinstance(classes, np.ndarray) and classes.ndim == 2 and classes.shape[1] != 1:
        if classes.shape != inst_map.shape:
            raise ConicQPError(
                f"class map has shape {classes.shape} but the instance map has {inst_map.shape}; "
                "give both maps for the same image"
            )
    semantic = None if classes is None else semantic_map(inst_map, classes)
    return Targets(three_label_map(inst_map), center_vectors(inst_map), semantic)
