"""The ``conic-qp evaluate`` command's library side: load label stacks, check them, score them.

Validation lives here rather than in :mod:`conic_qp.metrics` because the metrics follow the
official code's tolerant behaviour (class ids outside 1..C are ignored, classes are per pixel),
while a user handing us files deserves to hear about data that is almost certainly malformed.
Arrays are memory-mapped and checked a chunk of images at a time, so a full CoNIC test set
(~5000 x 256 x 256 x 2) never needs to fit in memory twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conic_qp.classes import CONIC, ClassScheme
from conic_qp.errors import ConicQPError, option
from conic_qp.inputs import load_npy
from conic_qp.metrics import EvaluationResult, evaluate

log = logging.getLogger(__name__)

CHUNK = 16


def parse_class_names(text: str | None) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; ``None`` gives the CoNIC classes."""
    if text is None:
        return list(CONIC.names)
    names = [part.strip() for part in text.split(",")]
    if not names or any(not n for n in names):
        raise ConicQPError(
            f"{option('classes')} {text!r} has an empty name; give comma-separated names for ids "
            "1..C"
        )
    ClassScheme.from_names("custom", names)  # rejects duplicates with a one-line message
    return names


def load_labels(path: str | Path, what: str) -> np.ndarray:
    """Memory-map an (N, H, W, 2) ``.npy`` label stack; ``what`` names it in error messages."""
    p = Path(path)
    if not p.is_file():
        raise ConicQPError(f"{what} file {p} does not exist; pass an existing .npy file")
    if p.suffix.lower() != ".npy":
        raise ConicQPError(f"{what} file {p} is not a .npy file; save the labels with numpy.save")
    arr = load_npy(p, what, mmap_mode="r")  # never unpickles; says what a non-.npy file is
    check_shape(arr, what)
    return arr


def check_shape(arr: np.ndarray, what: str) -> None:
    """Label stacks are (N, H, W, 2): instance ids, then class ids."""
    if arr.ndim != 4 or arr.shape[-1] != 2:
        raise ConicQPError(
            f"{what} labels have shape {arr.shape}; expected (N, H, W, 2) with channel 0 instance "
            "ids and channel 1 class ids"
        )
    if 0 in arr.shape:
        raise ConicQPError(f"{what} labels have shape {arr.shape}; there is nothing to evaluate")


def check_pair(pred: np.ndarray, true: np.ndarray) -> None:
    """Prediction and truth must describe the same images."""
    if pred.shape[0] != true.shape[0]:
        raise ConicQPError(
            f"prediction has {pred.shape[0]} images but truth has {true.shape[0]}; "
            "they must match one to one"
        )
    if pred.shape[1:3] != true.shape[1:3]:
        raise ConicQPError(
            f"prediction images are {pred.shape[1]}x{pred.shape[2]} px but truth images are "
            f"{true.shape[1]}x{true.shape[2]} px; they must be the same size"
        )


def check_values(arr: np.ndarray, n_classes: int, what: str, chunk_size: int = CHUNK) -> None:
    """Integer ids >= 0, class ids <= C, and one class per instance, checked chunk by chunk."""
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        for start in range(0, arr.shape[0], chunk_size):
            if np.isnan(arr[start : start + chunk_size]).any():
                raise ConicQPError(
                    f"{what} labels contain NaN; label maps must be integer ids (0 = background)"
                )
        raise ConicQPError(
            f"{what} labels have float dtype {arr.dtype}; save integer ids (e.g. int32)"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConicQPError(
            f"{what} labels have non-integer dtype {arr.dtype}; save integer ids (e.g. int32)"
        )
    for start in range(0, arr.shape[0], chunk_size):
        chunk = np.asarray(arr[start : start + chunk_size])
        inst, cls = chunk[..., 0], chunk[..., 1]
        if inst.min() < 0:
            raise ConicQPError(f"{what} labels have negative instance ids; use 0 for background")
        if cls.min() < 0:
            raise ConicQPError(f"{what} labels have negative class ids; class ids are 0..C")
        if arr.dtype == np.uint64 and inst.max() > np.iinfo(np.int64).max:
            raise ConicQPError(f"{what} labels have instance ids above 2**63; renumber them")
        top = int(cls.max())
        if top > n_classes:
            raise ConicQPError(
                f"{what} labels have class id {top} but only {n_classes} "
                f"class{'es' if n_classes != 1 else ''} known; "
                f"pass the class names with {option('classes')} name1,name2,..."
            )
        _check_one_class(inst, cls, start, what)


def _n_distinct(keys: np.ndarray, space: int) -> int:
    if space <= 4 * keys.size + 65536:
        return int(np.count_nonzero(np.bincount(keys, minlength=space)))
    return len(np.unique(keys))


def _check_one_class(inst: np.ndarray, cls: np.ndarray, start: int, what: str) -> None:
    """Raise if any instance's pixels carry more than one class id (class 0 included).

    Fast path: as many distinct (image, instance, class) triples as (image, instance) pairs.
    Only when that fails (or keys would overflow) are the pixels sorted to name the culprit.
    """
    n = inst.shape[0]
    inst64, cls64 = inst.astype(np.int64), cls.astype(np.int64)
    m, k = int(inst64.max(initial=0)) + 1, int(cls64.max(initial=0)) + 1
    if n * m * k < 2**62:
        fg = inst64 > 0
        key = (inst64 + (np.arange(n, dtype=np.int64) * m)[:, None, None])[fg]
        if _n_distinct(key, n * m) == _n_distinct(key * k + cls64[fg], n * m * k):
            return
    img, yy, xx = np.nonzero(inst)
    ids = inst[img, yy, xx].astype(np.int64)
    cl = cls[img, yy, xx].astype(np.int64)
    order = np.lexsort((cl, ids, img))
    img, ids, cl = img[order], ids[order], cl[order]
    same = (img[1:] == img[:-1]) & (ids[1:] == ids[:-1])
    bad = np.flatnonzero(same & (cl[1:] != cl[:-1]))
    if bad.size:
        j = bad[0] + 1
        group = (img == img[j]) & (ids == ids[j])
        found = np.unique(cl[group]).tolist()
        raise ConicQPError(
            f"{what} labels: image {start + int(img[j])} instance {int(ids[j])} carries several "
            f"class ids {found}; every instance must have a single class"
        )


def evaluate_arrays(
    pred: np.ndarray, true: np.ndarray, class_names: Sequence[str] = tuple(CONIC.names)
) -> EvaluationResult:
    """Validate two (N, H, W, 2) label stacks, then compute the CoNIC metrics."""
    names = list(class_names)
    check_shape(pred, "prediction")
    check_shape(true, "truth")
    check_pair(pred, true)
    check_values(pred, len(names), "prediction")
    check_values(true, len(names), "truth")
    log.info("evaluating %d images of %dx%d px, %d classes", *true.shape[:3], len(names))
    return evaluate(pred, true, names, chunk_size=CHUNK)


def evaluate_files(
    pred_path: str | Path, true_path: str | Path, class_names: Sequence[str] = tuple(CONIC.names)
) -> EvaluationResult:
    """Load (memory-mapped), validate and score ``.npy`` prediction and truth label stacks."""
    pred = load_labels(pred_path, "prediction")
    true = load_labels(true_path, "truth")
    return evaluate_arrays(pred, true, class_names)
