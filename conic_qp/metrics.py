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

import dataclasses
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


# --------------------------------------------------------------------------------------------
# literature metrics for whole images (HoVer-Net, Graham et al. 2019: PQ/DQ/SQ, AJI, type F1)

#: HoVer-Net's detection radius: 12 px at 40x (0.25 um/px), i.e. 3 um.
HOVERNET_RADIUS_UM = 3.0


def aji(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) of one image, as HoVer-Net computes it.

    Every truth nucleus is paired with the prediction of highest IoU among those it overlaps
    (ties: the lowest id); the intersections and unions of the pairs are summed, and the areas of
    unpaired truth nuclei and of predictions paired with no truth nucleus are added to the union.
    A prediction may pair with several truth nuclei (it then counts in each union), as in
    HoVer-Net's ``get_fast_aji``. An image with neither truth nor prediction scores 0 (the PQ
    convention).
    """
    t = _as_int64(np.asarray(true_inst), "truth instance ids")
    p = _as_int64(np.asarray(pred_inst), "prediction instance ids")
    _check_pair(t, p, 2, "aji")
    t_ids, t_idx = np.unique(t, return_inverse=True)
    p_ids, p_idx = np.unique(p, return_inverse=True)
    t_idx, p_idx = t_idx.ravel(), p_idx.ravel()
    t_area = np.bincount(t_idx, minlength=len(t_ids)).astype(np.float64)
    p_area = np.bincount(p_idx, minlength=len(p_ids)).astype(np.float64)
    t_fg = np.flatnonzero(t_ids > 0)
    p_fg = np.flatnonzero(p_ids > 0)
    union_total = 0.0
    inter_total = 0.0
    used = np.zeros(len(p_ids), dtype=bool)
    both = (t.ravel() > 0) & (p.ravel() > 0)
    if both.any():
        pairs, inter = np.unique(t_idx[both] * len(p_ids) + p_idx[both], return_counts=True)
        ti, pi = pairs // len(p_ids), pairs % len(p_ids)
        union = t_area[ti] + p_area[pi] - inter
        iou = inter / union
        # best prediction per truth nucleus: sort by (truth, -iou, prediction id) and take firsts
        order = np.lexsort((pi, -iou, ti))
        first = np.r_[True, ti[order][1:] != ti[order][:-1]]
        best = order[first]
        inter_total = float(inter[best].sum())
        union_total = float(union[best].sum())
        used[pi[best]] = True
        paired_truth = np.zeros(len(t_ids), dtype=bool)
        paired_truth[ti[best]] = True
    else:
        paired_truth = np.zeros(len(t_ids), dtype=bool)
    union_total += float(t_area[t_fg][~paired_truth[t_fg]].sum())
    union_total += float(p_area[p_fg][~used[p_fg]].sum())
    return inter_total / union_total if union_total > 0 else 0.0


def instance_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, (y, x) centroids and classes of the instances of one (H, W, 2) label map.

    The class of an instance is the most frequent class id among its pixels.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3 or lab.shape[-1] != 2:
        raise ConicQPError(f"labels have shape {lab.shape}; expected (H, W, 2)")
    inst = _as_int64(lab[..., 0], "instance ids").ravel()
    cls = _as_int64(lab[..., 1], "class ids", allow_negative=True).ravel()
    fg = inst > 0
    ids, idx = np.unique(inst[fg], return_inverse=True)
    if ids.size == 0:
        return ids, np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    yy, xx = np.divmod(np.flatnonzero(fg), lab.shape[1])
    area = np.bincount(idx).astype(np.float64)
    centroids = np.stack(
        [np.bincount(idx, weights=yy) / area, np.bincount(idx, weights=xx) / area], axis=1
    )
    c = np.clip(cls[fg], 0, None)
    votes = np.zeros((ids.size, int(c.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(votes, (idx, c), 1)
    return ids, centroids, votes.argmax(axis=1)


def pair_centroids(
    true_xy: np.ndarray, pred_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairing of centroids within ``radius`` (Hungarian on distances, as HoVer-Net).

    Returns the (K, 2) index pairs (truth, prediction), the unpaired truth and the unpaired
    prediction indices.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    t = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if len(t) == 0 or len(p) == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return empty, np.arange(len(t)), np.arange(len(p))
    dist = cdist(t, p)
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    return (
        pairs,
        np.setdiff1d(np.arange(len(t)), pairs[:, 0]),
        np.setdiff1d(np.arange(len(p)), pairs[:, 1]),
    )


def type_f1(
    paired_true: np.ndarray,
    paired_pred: np.ndarray,
    unpaired_true: np.ndarray,
    unpaired_pred: np.ndarray,
    class_id: int,
) -> float:
    """HoVer-Net's per-class classification F1 of pooled centroid pairings.

    ``2 TP / (2 TP + 2 FP + 2 FN + FP_d + FN_d)``: TP/FP/FN over paired nuclei whose true or
    predicted class is ``class_id``, FP_d/FN_d the unpaired predictions/truths of that class
    (HoVer-Net's weights [2, 2, 1, 1]; its TN term is always 0 on these pairs).
    """
    t, p = np.asarray(paired_true), np.asarray(paired_pred)
    sel = (t == class_id) | (p == class_id)
    t, p = t[sel], p[sel]
    tp = int(((t == class_id) & (p == class_id)).sum())
    fp = int(((t != class_id) & (p == class_id)).sum())
    fn = int(((t == class_id) & (p != class_id)).sum())
    fp_d = int((np.asarray(unpaired_pred) == class_id).sum())
    fn_d = int((np.asarray(unpaired_true) == class_id).sum())
    den = 2 * tp + 2 * fp + 2 * fn + fp_d + fn_d
    return 2 * tp / den if den else 0.0


@dataclass(frozen=True)
class WholeImageResult:
    """Scores of whole images in HoVer-Net's protocol, plus the CoNIC class-pooled mPQ+.

    Attributes
    ----------
    pq, dq, sq, aji : means over images of the binary per-image values.
    mpq_plus, pq_per_class : CoNIC pooling over the images (as :class:`EvaluationResult`).
    f1_detection : pooled centroid-detection F1 (pairs within the radius).
    f1_per_class : HoVer-Net's classification F1 per class (:func:`type_f1`), pooled.
    accuracy : fraction of paired nuclei with the right class.
    per_image : name -> {"pq", "dq", "sq", "aji"}.
    """

    pq: float
    dq: float
    sq: float
    aji: float
    mpq_plus: float
    pq_per_class: dict[str, float]
    f1_detection: float
    f1_per_class: dict[str, float]
    accuracy: float
    per_image: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_whole_images(
    images: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    radius: float,
) -> WholeImageResult:
    """Score whole images: ``(name, true (H, W, 2), pred (H, W, 2))`` per image.

    Images may differ in size. ``radius`` is the centroid pairing distance in pixels of these
    maps (HoVer-Net: :data:`HOVERNET_RADIUS_UM` divided by the um/px).
    """
    names = [str(n) for n in class_names]
    if not images:
        raise ConicQPError("no images to evaluate")
    per_image: dict[str, dict[str, float]] = {}
    class_stats = np.zeros((len(names), 4), dtype=np.float64)
    paired_t: list[np.ndarray] = []
    paired_p: list[np.ndarray] = []
    unpaired_t: list[np.ndarray] = []
    unpaired_p: list[np.ndarray] = []
    for name, true, pred in images:
        t, p = np.asarray(true), np.asarray(pred)
        _check_pair(t, p, 3, f"image {name}")
        stats = match_instances(t[..., 0], p[..., 0])
        per_image[str(name)] = {
            "pq": stats.pq,
            "dq": stats.dq,
            "sq": stats.sq,
            "aji": aji(t[..., 0], p[..., 0]),
        }
        class_stats += multi_pq_stats(t, p, len(names))
        _, t_xy, t_cls = instance_centroids(t)
        _, p_xy, p_cls = instance_centroids(p)
        pairs, ut, up = pair_centroids(t_xy, p_xy, radius)
        paired_t.append(t_cls[pairs[:, 0]])
        paired_p.append(p_cls[pairs[:, 1]])
        unpaired_t.append(t_cls[ut])
        unpaired_p.append(p_cls[up])
    pt, pp = np.concatenate(paired_t), np.concatenate(paired_p)
    ut_all, up_all = np.concatenate(unpaired_t), np.concatenate(unpaired_p)
    tp_d, fp_d, fn_d = len(pt), len(up_all), len(ut_all)
    pq_class = pq_from_stats(class_stats)
    rows = list(per_image.values())
    return WholeImageResult(
        pq=float(np.mean([r["pq"] for r in rows])),
        dq=float(np.mean([r["dq"] for r in rows])),
        sq=float(np.mean([r["sq"] for r in rows])),
        aji=float(np.mean([r["aji"] for r in rows])),
        mpq_plus=float(pq_class.mean()),
        pq_per_class={n: float(v) for n, v in zip(names, pq_class, strict=True)},
        f1_detection=2 * tp_d / (2 * tp_d + fp_d + fn_d) if tp_d + fp_d + fn_d else 0.0,
        f1_per_class={n: type_f1(pt, pp, ut_all, up_all, i + 1) for i, n in enumerate(names)},
        accuracy=float((pt == pp).mean()) if len(pt) else 0.0,
        per_image=per_image,
    )
