"""CoNIC 2022 challenge metrics: PQ, mPQ+, per-class PQ and R2 of the Task-2 counts.

The numbers reproduce the official challenge code (TissueImageAnalytics/CoNIC,
``metrics/stats_utils.py``, ``compute_stats.py``, ``extract_patches.py``) but are computed from
one joint histogram of overlapping label pairs instead of per-instance mask loops, so a whole test
set takes seconds rather than minutes. Behaviour kept from the official code:

- a prediction matches a truth instance when their IoU is *strictly* greater than 0.5; such
  matches are unique, so no assignment problem needs solving;
- ``DQ = TP / (TP + FP/2 + FN/2 + 1e-6)``, ``SQ = sum IoU / (TP + 1e-6)``, ``PQ = DQ * SQ``: an
  image with empty truth or empty prediction (or both) scores 0;
- binary PQ is computed per image and averaged over images;
- mPQ+ pools TP, FP, FN and summed IoU of every class over all images before computing the PQ of
  each class, then averages the classes; a class absent from truth and prediction scores 0;
- classes are taken per pixel (an instance's pixels of class ``c`` form its class-``c`` segment),
  exactly like the official ``inst * (class == c)`` masking; class ids outside 1..C are ignored;
- Task-2 counts: per class, the number of distinct instances with at least one pixel of that class
  inside the central crop (16 px off every side, i.e. 224x224 of a 256x256 patch);
- R2 follows ``sklearn.metrics.r2_score`` per class (constant truth: 1.0 if predicted exactly,
  else 0.0; fewer than two images: NaN), averaged over classes.

The one deliberate difference: the official code assumes every map has background (label 0) and
fails or skips an instance otherwise; here every non-zero id is an instance.

All functions are pure numpy; no I/O.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from conic_qp.classes import CONIC
from conic_qp.errors import ConicQPError

log = logging.getLogger(__name__)

#: Pixels removed from every side of a patch before Task-2 counting (256 -> 224).
TASK2_MARGIN = 16

_EPS = 1.0e-6
_KEY_LIMIT = 2**62


class PQStats(NamedTuple):
    """Matching counts of one comparison, enough to pool over images before computing PQ."""

    tp: int
    fp: int
    fn: int
    iou_sum: float

    @property
    def dq(self) -> float:
        return float(self.tp / (self.tp + 0.5 * self.fp + 0.5 * self.fn + _EPS))

    @property
    def sq(self) -> float:
        return float(self.iou_sum / (self.tp + _EPS))

    @property
    def pq(self) -> float:
        return self.dq * self.sq


@dataclass(frozen=True)
class EvaluationResult:
    """CoNIC scores of a set of predicted label maps against the truth.

    Attributes
    ----------
    pq : binary PQ, mean over images.
    mpq_plus : mPQ+, mean over classes of the PQ of class-pooled statistics.
    pq_per_class : class name -> pooled PQ of that class.
    r2 : mean over classes of the R2 of the Task-2 counts (NaN with fewer than two images).
    r2_per_class : class name -> R2 of that class's counts.
    """

    pq: float
    mpq_plus: float
    pq_per_class: dict[str, float]
    r2: float
    r2_per_class: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict; NaN (undefined R2) becomes ``None`` because JSON has no NaN."""

        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "pq": num(self.pq),
            "mpq_plus": num(self.mpq_plus),
            "pq_per_class": {k: num(v) for k, v in self.pq_per_class.items()},
            "r2": num(self.r2),
            "r2_per_class": {k: num(v) for k, v in self.r2_per_class.items()},
        }


# --------------------------------------------------------------------------------------------
# core: one joint histogram of overlapping segment pairs


def _pq_values(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, iou_sum: np.ndarray) -> np.ndarray:
    """Vectorised official PQ formula (keeps its epsilons so the numbers match)."""
    dq = tp / (tp + 0.5 * fp + 0.5 * fn + _EPS)
    sq = iou_sum / (tp + _EPS)
    return np.asarray(dq * sq, dtype=np.float64)


def _count_ids(keys: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct non-negative keys below ``space`` and their counts (bincount when dense)."""
    if space <= 4 * keys.size + 65536:
        counts = np.bincount(keys, minlength=space)
        ids = np.flatnonzero(counts)
        return ids, counts[ids]
    return np.unique(keys, return_counts=True)


def _index_of(ids: np.ndarray, keys: np.ndarray, space: int) -> np.ndarray:
    """Position of each key in the sorted ``ids`` (every key is known to be among them)."""
    if space <= 4 * keys.size + 65536:
        lut = np.zeros(space, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        return lut[keys]
    return np.searchsorted(ids, keys)


def _matched_pairs(
    t_key: np.ndarray, p_key: np.ndarray, overlap: np.ndarray, space: int, match_iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Match segments given as flat keys in ``[0, space)`` (0 = none).

    ``overlap`` marks the pixels where a truth and a prediction segment may pair. Returns the
    truth keys, prediction keys, and for every matched pair its truth key, prediction key and IoU.
    One histogram of overlapping key pairs replaces the official per-instance loops.
    """
    t_ids, t_area = _count_ids(t_key[t_key > 0], space)
    p_ids, p_area = _count_ids(p_key[p_key > 0], space)
    n_p = max(len(p_ids), 1)
    ti = _index_of(t_ids, t_key[overlap], space)
    pi = _index_of(p_ids, p_key[overlap], space)
    pairs, inter = _count_ids(ti * n_p + pi, len(t_ids) * n_p)
    ti, pi = pairs // n_p, pairs % n_p
    # same integer arithmetic as the official inter / (total - inter): identical float IoUs
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    keep = iou > match_iou
    return t_ids, p_ids, t_ids[ti[keep]], p_ids[pi[keep]], iou[keep]


def _as_int64(a: np.ndarray, what: str, allow_negative: bool = False) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ConicQPError(f"{what} have dtype {a.dtype}; label maps must be integer arrays")
    out = np.ascontiguousarray(a, dtype=np.int64)
    if not allow_negative and out.size and out.min() < 0:
        raise ConicQPError(f"{what} are negative; ids must be >= 0 (0 = background)")
    return out


def _compact(inst: np.ndarray) -> np.ndarray:
    """Renumber ids to 0..K keeping 0 as background (only needed when keys would overflow)."""
    u, inv = np.unique(inst, return_inverse=True)
    inv = inv.reshape(inst.shape).astype(np.int64)
    return inv if u[0] == 0 else inv + 1


class _Keys(NamedTuple):
    """Segment keys of a chunk of n images: ``img * m + id`` (binary), ``that * k + class``."""

    t_bin: np.ndarray
    p_bin: np.ndarray
    t_cls: np.ndarray
    p_cls: np.ndarray
    n: int
    m: int
    k: int


def _make_keys(true: np.ndarray, pred: np.ndarray | None, n_classes: int) -> _Keys:
    """(n, H, W, 2) label maps -> per-chunk unique segment keys (0 = no segment).

    Class keys are taken per pixel (instance id, class id) like the official
    ``inst * (class == c)`` masks; pixels with a class outside 1..C belong to no class segment.
    Without ``pred`` the prediction keys mirror the truth (used for counting only).
    """
    n, k = true.shape[0], n_classes + 1
    t_inst = _as_int64(true[..., 0], "truth instance ids")
    p_inst = t_inst if pred is None else _as_int64(pred[..., 0], "prediction instance ids")
    m = int(max(t_inst.max(initial=0), p_inst.max(initial=0))) + 1
    if n * m * k >= _KEY_LIMIT:
        t_inst = _compact(t_inst)
        p_inst = t_inst if pred is None else _compact(p_inst)
        m = int(max(t_inst.max(initial=0), p_inst.max(initial=0))) + 1
    offs = (np.arange(n, dtype=np.int64) * m)[:, None, None]
    t_bin = np.where(t_inst > 0, t_inst + offs, 0)
    p_bin = t_bin if pred is None else np.where(p_inst > 0, p_inst + offs, 0)
    keys: list[np.ndarray] = []
    for b, c in ((t_bin, true[..., 1]), (p_bin, None if pred is None else pred[..., 1])):
        if c is None:
            keys.append(keys[0])
            continue
        cls = _as_int64(c, "class ids", allow_negative=True)
        keys.append(np.where((b > 0) & (cls >= 1) & (cls <= n_classes), b * k + cls, 0))
    return _Keys(t_bin, p_bin, keys[0], keys[1], n, m, k)


def _binary_stats(keys: _Keys, match_iou: float) -> np.ndarray:
    """Per-image [tp, fp, fn, iou_sum], shape (n, 4)."""
    n, m = keys.n, keys.m
    t, p = keys.t_bin.ravel(), keys.p_bin.ravel()
    t_ids, p_ids, mt, _, iou = _matched_pairs(t, p, (t > 0) & (p > 0), n * m, match_iou)
    tp = np.bincount(mt // m, minlength=n)
    out = np.empty((n, 4), dtype=np.float64)
    out[:, 0] = tp
    out[:, 1] = np.bincount(p_ids // m, minlength=n) - tp
    out[:, 2] = np.bincount(t_ids // m, minlength=n) - tp
    out[:, 3] = np.bincount(mt // m, weights=iou, minlength=n)
    return out


def _class_stats(keys: _Keys, match_iou: float) -> np.ndarray:
    """Per-class [tp, fp, fn, iou_sum] summed over the chunk, shape (C, 4).

    Segments of different classes never share a pixel pair, so one pass scores every class.
    """
    k = keys.k
    t, p = keys.t_cls.ravel(), keys.p_cls.ravel()
    overlap = (t > 0) & (p > 0) & (t % k == p % k)
    t_ids, p_ids, mt, _, iou = _matched_pairs(t, p, overlap, keys.n * keys.m * k, match_iou)
    tp = np.bincount(mt % k, minlength=k)[1:]
    out = np.empty((k - 1, 4), dtype=np.float64)
    out[:, 0] = tp
    out[:, 1] = np.bincount(p_ids % k, minlength=k)[1:] - tp
    out[:, 2] = np.bincount(t_ids % k, minlength=k)[1:] - tp
    out[:, 3] = np.bincount(mt % k, weights=iou, minlength=k)[1:]
    return out


def _counts(cls_key: np.ndarray, keys: _Keys, margin: int) -> np.ndarray:
    """Task-2 counts (n, C) from class keys: distinct class segments touching the crop."""
    h, w = cls_key.shape[1:3]
    crop = cls_key[:, margin : h - margin, margin : w - margin]
    segs, _ = _count_ids(crop[crop > 0], keys.n * keys.m * keys.k)
    n_classes = keys.k - 1
    flat = segs // keys.k // keys.m * n_classes + segs % keys.k - 1
    return np.bincount(flat, minlength=keys.n * n_classes).reshape(keys.n, n_classes)


def _check_match_iou(match_iou: float) -> None:
    if not 0.5 <= match_iou < 1.0:
        raise ConicQPError(
            f"match_iou={match_iou} is unsupported; use a value in [0.5, 1) so matches are unique"
        )


def _check_pair(true: np.ndarray, pred: np.ndarray, ndim: int, what: str) -> None:
    for name, a in (("truth", true), ("prediction", pred)):
        if a.ndim != ndim or (ndim >= 3 and a.shape[-1] != 2):
            want = {2: "(H, W)", 3: "(H, W, 2)", 4: "(N, H, W, 2)"}[ndim]
            raise ConicQPError(f"{what}: {name} has shape {a.shape}; expected {want}")
    if true.shape != pred.shape:
        raise ConicQPError(
            f"{what}: truth shape {true.shape} differs from prediction shape {pred.shape}"
        )


# --------------------------------------------------------------------------------------------
# public API


def pq_from_stats(stats: np.ndarray) -> np.ndarray:
    """PQ of each row of ``[tp, fp, fn, iou_sum]`` statistics, e.g. of :func:`multi_pq_stats`."""
    s = np.asarray(stats, dtype=np.float64)
    if s.shape[-1] != 4:
        raise ConicQPError(f"PQ statistics have shape {s.shape}; expected (..., 4)")
    return _pq_values(s[..., 0], s[..., 1], s[..., 2], s[..., 3])


def match_instances(
    true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5
) -> PQStats:
    """Match the instances of two (H, W) maps (IoU > ``match_iou``, strictly).

    Parameters
    ----------
    true_inst, pred_inst : (H, W) integer instance maps, 0 = background; ids need not be
        contiguous.
    match_iou : threshold in [0.5, 1); 0.5 is the CoNIC value.
    """
    _check_match_iou(match_iou)
    t, p = np.asarray(true_inst), np.asarray(pred_inst)
    _check_pair(t, p, 2, "match_instances")
    zeros = np.zeros_like(t)
    keys = _make_keys(np.stack([t, zeros], -1)[None], np.stack([p, zeros], -1)[None], 1)
    tp, fp, fn, iou_sum = _binary_stats(keys, match_iou)[0]
    return PQStats(int(tp), int(fp), int(fn), float(iou_sum))


def binary_pq(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Binary (class-agnostic) PQ of one image; 0 when truth or prediction is empty."""
    return match_instances(true_inst, pred_inst).pq


def multi_pq_stats(
    true: np.ndarray, pred: np.ndarray, n_classes: int, match_iou: float = 0.5
) -> np.ndarray:
    """Per-class matching statistics of one image, to be summed over images for mPQ+.

    Parameters
    ----------
    true, pred : (H, W, 2) label maps: channel 0 instance ids, channel 1 class ids (1..C; other
        values are ignored, as in the official code).
    n_classes : C.

    Returns
    -------
    (n_classes, 4) float64 array; row ``c - 1`` is ``[tp, fp, fn, iou_sum]`` of class ``c``.
    """
    _check_match_iou(match_iou)
    t, p = np.asarray(true), np.asarray(pred)
    _check_pair(t, p, 3, "multi_pq_stats")
    return _class_stats(_make_keys(t[None], p[None], int(n_classes)), match_iou)


def _check_margin(h: int, w: int, margin: int) -> None:
    if margin < 0 or 2 * margin >= min(h, w):
        raise ConicQPError(
            f"images of {h}x{w} px are too small for a Task-2 crop of {margin} px per side"
        )


def task2_counts(labels: np.ndarray, n_classes: int, margin: int = TASK2_MARGIN) -> np.ndarray:
    """Nuclei per class in the central crop of each patch (CoNIC Task 2).

    A nucleus counts for class ``c`` when any of its class-``c`` pixels lies inside the crop
    ``[margin:H-margin, margin:W-margin]``, so nuclei cut by the crop border are counted.

    Parameters
    ----------
    labels : (N, H, W, 2) label maps (instance ids, class ids).
    n_classes : C.
    margin : pixels removed from each side; 16 turns a 256x256 patch into the official 224x224.

    Returns
    -------
    (N, n_classes) int64 counts.
    """
    lab = np.asarray(labels)
    if lab.ndim != 4 or lab.shape[-1] != 2:
        raise ConicQPError(f"task2_counts: labels have shape {lab.shape}; expected (N, H, W, 2)")
    _check_margin(lab.shape[1], lab.shape[2], margin)
    keys = _make_keys(lab, None, int(n_classes))
    return _counts(keys.t_cls, keys, margin)


def r2_scores(true_counts: np.ndarray, pred_counts: np.ndarray) -> np.ndarray:
    """Coefficient of determination of each column, with ``sklearn.metrics.r2_score`` semantics.

    A column whose truth is constant scores 1.0 when predicted exactly and 0.0 otherwise; with
    fewer than two rows R2 is undefined and every column is NaN.

    Parameters
    ----------
    true_counts, pred_counts : (N, C) counts (N images, C classes).

    Returns
    -------
    (C,) float64.
    """
    t = np.asarray(true_counts, dtype=np.float64)
    p = np.asarray(pred_counts, dtype=np.float64)
    if t.ndim != 2 or t.shape != p.shape:
        raise ConicQPError(
            f"r2_scores: truth {t.shape} and prediction {p.shape} must be the same (N, C) shape"
        )
    if t.shape[0] < 2:
        return np.full(t.shape[1], np.nan)
    num = ((t - p) ** 2).sum(axis=0)
    den = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    out = np.where(num == 0, 1.0, 0.0)
    nz = den != 0
    out[nz] = 1.0 - num[nz] / den[nz]
    return out


def evaluate(
    pred: np.ndarray,
    true: np.ndarray,
    class_names: Sequence[str] = tuple(CONIC.names),
    *,
    chunk_size: int = 16,
) -> EvaluationResult:
    """All CoNIC scores of predicted label maps against the truth.

    Parameters
    ----------
    pred, true : (N, H, W, 2) label maps (instance ids, class ids 0..C); may be memory-mapped,
        they are read ``chunk_size`` images at a time.
    class_names : names of classes 1..C; their number sets C.
    chunk_size : images per vectorised pass (bounds memory; does not change the result).
    """
    names = [str(n) for n in class_names]
    n_classes = len(names)
    if n_classes == 0:
        raise ConicQPError("no class names given; pass at least one class")
    _check_pair(true, pred, 4, "evaluate")
    n = true.shape[0]
    if n == 0:
        raise ConicQPError("no images to evaluate (N = 0)")
    chunk_size = max(int(chunk_size), 1)
    pq_img = np.empty(n, dtype=np.float64)
    class_stats = np.zeros((n_classes, 4), dtype=np.float64)
    t_counts = np.empty((n, n_classes), dtype=np.int64)
    p_counts = np.empty((n, n_classes), dtype=np.int64)
    h, w = true.shape[1:3]
    margin = TASK2_MARGIN if 2 * TASK2_MARGIN < min(h, w) else 0
    if not margin:
        log.warning("%dx%d px images are too small for the Task-2 crop; R2 uses whole images", h, w)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        keys = _make_keys(np.asarray(true[sl]), np.asarray(pred[sl]), n_classes)
        pq_img[sl] = pq_from_stats(_binary_stats(keys, 0.5))
        class_stats += _class_stats(keys, 0.5)
        t_counts[sl] = _counts(keys.t_cls, keys, margin)
        p_counts[sl] = _counts(keys.p_cls, keys, margin)
    pq_class = pq_from_stats(class_stats)
    r2_class = r2_scores(t_counts, p_counts)
    if n < 2:
        log.warning("R2 is undefined for a single image; it is reported as NaN")
    log.debug("pooled per-class [tp, fp, fn, iou_sum]: %s", class_stats.tolist())
    return EvaluationResult(
        pq=float(pq_img.mean()),
        mpq_plus=float(pq_class.mean()),
        pq_per_class={nm: float(v) for nm, v in zip(names, pq_class, strict=True)},
        r2=float(r2_class.mean()),
        r2_per_class={nm: float(v) for nm, v in zip(names, r2_class, strict=True)},
    )
