"""Post-processing (paper II.G): network probabilities -> classified nucleus instances.

Pipeline (:func:`postprocess` = :func:`watershed_instances` then :func:`refine_instances`):

1. Class regions. Every pixel belongs to the nucleus class with the largest semantic
   probability, background excluded (``argmax(semantic_prob[1:]) + 1``). These regions partition
   the image, so instances delineated separately per class can never overlap. Whether a pixel is
   nucleus at all is decided by the instance head (P(interior) + P(boundary) > fg_c of the
   pixel's class), not by the semantic background channel: that head is trained for exactly
   this and for separating touching nuclei, and the two heads then cannot disagree about
   which pixels are foreground.
2. Per class c, seeds are the 8-connected components of P(interior) > seed_c inside class c's
   foreground; a seeded watershed on -P(interior) (flooding uphill from nucleus centres, meeting
   at the predicted boundaries) restricted to class c's foreground delineates its instances.
   Foreground without a seed stays background. With ``per_class_watershed`` off, seeds and
   foreground connect across class regions (each pixel still judged by its class's
   thresholds), so a nucleus whose class maps are split between two classes is one instance,
   not two cut at the class border; touching nuclei are still separated by the predicted
   boundaries. Measured on the bundled model's validation tiles: +0.02 PQ, +0.03 mPQ+.
3. Connected components of every instance mask become separate instances (false merges of
   distant parts), instances outside the class's [min_size, max_size] are removed, holes of
   every instance are filled, then instances below the class's solidity threshold are removed.
   Size and solidity thresholds are those of the class the instance was delineated in.
   Sizes are counted before hole filling, so a speck removed by size inside a nucleus leaves a
   hole that is then filled; solidity is measured after it, so a nucleus whose pale centre was
   not predicted is not rejected as a ring. Solidity equals ``regionprops(...).solidity``.
   The split is a no-op on this module's own watershed output (a basin grows 4-connected from
   its 8-connected seed), so :func:`postprocess` skips it; :func:`refine_instances` applies it
   to any label map.
4. Class of an instance = argmax of the nucleus-class softmax summed over its pixels, which can
   differ from the class region it was delineated in; ``Instances.probs`` are those sums
   normalised to 1. Instances are numbered 1..K.

Everything works on whole-image arrays, on the foreground pixels or on instance row runs;
nothing loops over instances in Python. Only foreground components holding several seeds go
through skimage's watershed (a component with one seed is that seed's basin); the exact convex
hulls of the solidity filter are built for all undecided instances in one shapely call. Typical
cost on one CPU core: ~35 us per nucleus plus ~4 ms per 512x512 tile, about 25,000 nuclei/s on
real tissue (``benchmarks/postprocess_bench.py``). Numpy, scipy, scikit-image and shapely (for
convex hulls) only; no I/O, no torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from skimage.segmentation import watershed

from conic_qp.errors import ConicQPError

log = logging.getLogger(__name__)

#: Version of the ``thresholds.json`` layout written by :meth:`PostprocessParams.to_json`.
THRESHOLDS_VERSION = 1

#: Largest ``seed_dynamic``: a higher one would drop nuclei whose interior probability peaks
#: below it, whatever their seed threshold.
MAX_DYNAMIC = 0.5

# Probabilities may exceed [0, 1] by float rounding (e.g. averaged TTA passes in float16).
_PROB_TOL = 1e-3


@dataclass
class Instances:
    """Classified nucleus instances of one image region, in that region's pixel grid.

    Attributes
    ----------
    labels : (H, W) int32 instance map, 0 = background, instances numbered 1..K.
    classes : (K,) int64, class id (1..C) of instance ``k + 1``.
    probs : (K, C) float32, per-class probability of instance ``k + 1``: the summed nucleus-class
        softmax over its pixels, normalised to sum to 1 (its argmax is ``classes - 1``).
    """

    labels: np.ndarray
    classes: np.ndarray
    probs: np.ndarray

    @property
    def n(self) -> int:
        return int(self.classes.shape[0])


# --------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class ClassThresholds:
    """Post-processing thresholds of one nucleus class (sizes in pixels at the model's um/px).

    Attributes
    ----------
    fg : foreground threshold on P(interior) + P(boundary).
    seed : seed threshold on P(interior).
    min_size : instances with fewer pixels are removed.
    max_size : instances with more pixels are removed; None = no upper limit.
    min_solidity : instances whose area / convex-hull area is below this are removed.
    """

    fg: float = 0.5
    seed: float = 0.7
    min_size: int = 10
    max_size: int | None = 2000
    min_solidity: float = 0.7

    def __post_init__(self) -> None:
        for name in ("fg", "seed", "min_solidity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConicQPError(f"threshold {name}={v!r} must be a number in [0, 1]")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)):
            raise ConicQPError(f"min_size={self.min_size!r} must be an integer number of pixels")
        if self.min_size < 0:
            raise ConicQPError(f"min_size={self.min_size} must be >= 0 pixels")
        if self.max_size is not None:
            if isinstance(self.max_size, bool) or not isinstance(self.max_size, (int, np.integer)):
                raise ConicQPError(f"max_size={self.max_size!r} must be an integer or null")
            if self.max_size < max(self.min_size, 1):
                raise ConicQPError(
                    f"max_size={self.max_size} is below min_size={self.min_size} (or < 1); "
                    "no instance could be kept"
                )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CLASS_KEYS = {f.name for f in dataclasses.fields(ClassThresholds)}
_FLAG_KEYS = (
    "class_specific_fg",
    "class_specific_seed",
    "split_and_size_filter",
    "solidity_filter",
    "per_class_watershed",
)


@dataclass(frozen=True)
class PostprocessParams:
    """Per-class post-processing thresholds plus the switches of the paper's table IV ablation.

    This is a checkpoint's ``thresholds.json`` (:meth:`to_json` / :meth:`from_json`).

    Attributes
    ----------
    classes : thresholds of classes 1..C, in class-id order.
    agnostic_fg, agnostic_seed : class-agnostic thresholds used for every class when
        ``class_specific_fg`` / ``class_specific_seed`` are off.
    class_specific_fg, class_specific_seed : use each class's own fg / seed threshold.
    split_and_size_filter : split instance masks into connected components and remove instances
        outside the class's size range.
    solidity_filter : remove instances below the class's solidity threshold.
    per_class_watershed : delineate instances inside each class region separately (the
        paper). Off: seeds and foreground are connected across class regions (the thresholds
        stay those of each pixel's class), so a nucleus whose pixels straddle two class regions
        stays one instance; its size and solidity thresholds are those of the class most of its
        seed pixels have.
    seed_dynamic : 0 keeps every seed (the paper). Above 0, where several seeds share one
        foreground component, only the maxima of P(interior) that rise at least this much above
        the pass to a higher maximum mark nuclei (h-maxima, :func:`skimage.morphology.h_maxima`):
        a nucleus whose interior probability dips in the middle (pale, vesicular nuclei) is
        then one instance rather than two fragments. Measured on the bundled model's validation
        tiles: 0.2 gains +0.04 binary PQ.
    """

    classes: tuple[ClassThresholds, ...]
    agnostic_fg: float = 0.5
    agnostic_seed: float = 0.7
    class_specific_fg: bool = True
    class_specific_seed: bool = True
    split_and_size_filter: bool = True
    solidity_filter: bool = True
    per_class_watershed: bool = True
    seed_dynamic: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) < 1 or not all(isinstance(c, ClassThresholds) for c in self.classes):
            raise ConicQPError("post-processing parameters need ClassThresholds for classes 1..C")
        for name in ("agnostic_fg", "agnostic_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConicQPError(f"threshold {name}={v!r} must be a number in [0, 1]")
        for name in _FLAG_KEYS:
            if not isinstance(getattr(self, name), bool):
                raise ConicQPError(f"{name}={getattr(self, name)!r} must be true or false")
        v = self.seed_dynamic
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= MAX_DYNAMIC:
            raise ConicQPError(
                f"seed_dynamic={v!r} must be a number from 0 (off) to {MAX_DYNAMIC}; "
                "re-run `conic-qp tune`"
            )

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def fg(self, class_id: int) -> float:
        """Foreground threshold applied in class ``class_id``'s region."""
        return self.classes[class_id - 1].fg if self.class_specific_fg else self.agnostic_fg

    def seed(self, class_id: int) -> float:
        """Seed threshold applied in class ``class_id``'s region."""
        return self.classes[class_id - 1].seed if self.class_specific_seed else self.agnostic_seed

    @classmethod
    def uniform(cls, n_classes: int, **thresholds: Any) -> PostprocessParams:
        """The same :class:`ClassThresholds` (``thresholds`` override defaults) for every class."""
        if (
            isinstance(n_classes, bool)
            or not isinstance(n_classes, (int, np.integer))
            or n_classes < 1
        ):
            raise ConicQPError(f"n_classes={n_classes!r} must be a positive integer")
        unknown = set(thresholds) - _CLASS_KEYS
        if unknown:
            raise ConicQPError(f"unknown threshold(s) {sorted(unknown)}; use {sorted(_CLASS_KEYS)}")
        t = ClassThresholds(**thresholds)
        return cls(tuple(t for _ in range(int(n_classes))), agnostic_fg=t.fg, agnostic_seed=t.seed)

    @classmethod
    def default(cls, n_classes: int) -> PostprocessParams:
        """Untuned defaults for 0.5 um/px (nuclei ~30-700 px); grid-search them per model."""
        return cls.uniform(n_classes)

    def with_class(self, class_id: int, **changes: Any) -> PostprocessParams:
        """Copy with class ``class_id``'s thresholds changed (for grid searches)."""
        if not 1 <= class_id <= self.n_classes:
            raise ConicQPError(f"class id {class_id} is not in 1..{self.n_classes}")
        unknown = set(changes) - _CLASS_KEYS
        if unknown:
            raise ConicQPError(f"unknown threshold(s) {sorted(unknown)}; use {sorted(_CLASS_KEYS)}")
        new = list(self.classes)
        new[class_id - 1] = dataclasses.replace(new[class_id - 1], **changes)
        return dataclasses.replace(self, classes=tuple(new))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the content of ``thresholds.json``)."""
        out: dict[str, Any] = {"version": THRESHOLDS_VERSION}
        keys = (*_FLAG_KEYS, "agnostic_fg", "agnostic_seed", "seed_dynamic")
        out.update({k: getattr(self, k) for k in keys})
        out["classes"] = [{"id": i + 1, **c.to_json()} for i, c in enumerate(self.classes)]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PostprocessParams:
        """Parse :meth:`to_json` output; unknown or missing keys raise ConicQPError."""
        if not isinstance(data, Mapping):
            raise ConicQPError(
                "thresholds.json must hold a JSON object; rewrite it with `conic-qp tune`"
            )
        version = data.get("version", THRESHOLDS_VERSION)
        if version != THRESHOLDS_VERSION:
            raise ConicQPError(
                f"thresholds.json has version {version!r}; this conic-qp reads version "
                f"{THRESHOLDS_VERSION}: upgrade conic-qp or re-run `conic-qp tune`"
            )
        scalars = ("agnostic_fg", "agnostic_seed", "seed_dynamic", *_FLAG_KEYS)
        known = {"version", "classes", *scalars}
        unknown = set(data) - known
        if unknown:
            raise ConicQPError(
                f"thresholds.json has unknown keys {sorted(unknown)}; expected {sorted(known)}"
            )
        entries = data.get("classes")
        if not isinstance(entries, list) or not entries:
            raise ConicQPError(
                "thresholds.json needs a non-empty 'classes' list (one entry per class)"
            )
        classes = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ConicQPError(f"thresholds.json classes[{i}] is not an object")
            if entry.get("id", i + 1) != i + 1:
                raise ConicQPError(
                    f"thresholds.json classes[{i}] has id {entry.get('id')!r}; "
                    "list classes 1..C in order"
                )
            bad = set(entry) - _CLASS_KEYS - {"id"}
            if bad:
                raise ConicQPError(f"thresholds.json class {i + 1} has unknown keys {sorted(bad)}")
            classes.append(ClassThresholds(**{k: v for k, v in entry.items() if k != "id"}))
        kwargs = {k: data[k] for k in scalars if k in data}
        return cls(tuple(classes), **kwargs)


# --------------------------------------------------------------------------------------------
# validation


def _check_probs(
    semantic_prob: np.ndarray, three_label_prob: np.ndarray, params: PostprocessParams
) -> None:
    for name, arr in (("semantic_prob", semantic_prob), ("three_label_prob", three_label_prob)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 3:
            raise ConicQPError(
                f"{name} must be a (channels, H, W) numpy array, got "
                f"{getattr(arr, 'shape', type(arr).__name__)}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConicQPError(f"{name} has dtype {arr.dtype}; pass softmax probabilities (float)")
    if three_label_prob.shape[0] != 3:
        raise ConicQPError(
            f"three_label_prob has {three_label_prob.shape[0]} channels; expected 3 "
            "(background, interior, boundary)"
        )
    if semantic_prob.shape[1:] != three_label_prob.shape[1:]:
        raise ConicQPError(
            f"semantic_prob {semantic_prob.shape[1:]} and three_label_prob "
            f"{three_label_prob.shape[1:]} cover different pixel grids; "
            "pass both heads of the same region"
        )
    if semantic_prob.shape[0] != params.n_classes + 1:
        raise ConicQPError(
            f"semantic_prob has {semantic_prob.shape[0]} channels but the thresholds are for "
            f"{params.n_classes} classes (+ background); "
            "use the thresholds.json of the same checkpoint"
        )
    _check_values("semantic_prob", semantic_prob)
    _check_values("three_label_prob", three_label_prob)


def _check_values(name: str, arr: np.ndarray) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConicQPError(f"{name} has dtype {arr.dtype}; pass softmax probabilities (float)")
    if arr.size == 0:
        return
    lo, hi = float(arr.min()), float(arr.max())
    if not (lo >= -_PROB_TOL and hi <= 1.0 + _PROB_TOL):  # also catches NaN / inf
        raise ConicQPError(
            f"{name} has values in [{lo}, {hi}] (NaN/inf or not probabilities); "
            "apply softmax to the network logits first"
        )


# --------------------------------------------------------------------------------------------
# step 1-2: per-class seeded watershed


def watershed_instances(
    semantic_prob: np.ndarray, three_label_prob: np.ndarray, params: PostprocessParams
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded watershed (steps 1-2 of the module docstring).

    Returns
    -------
    labels : (H, W) int32, instance ids (not consecutive; 0 background).
    label_class : (labels.max() + 1,) int64, class region each id was delineated in (0 for 0).
    """
    _check_probs(semantic_prob, three_label_prob, params)
    return _watershed(semantic_prob, three_label_prob, params)


def _watershed(
    semantic_prob: np.ndarray, three_label_prob: np.ndarray, params: PostprocessParams
) -> tuple[np.ndarray, np.ndarray]:
    n = params.n_classes
    h, w = three_label_prob.shape[1:]
    interior = three_label_prob[1].ravel()
    fg_prob = (three_label_prob[1] + three_label_prob[2]).ravel()
    fg_thr = np.array([1.0] + [params.fg(c) for c in range(1, n + 1)], dtype=np.float64)
    seed_thr = np.array([1.0] + [params.seed(c) for c in range(1, n + 1)], dtype=np.float64)
    # classes are only needed where some class could call the pixel foreground
    cand = np.flatnonzero(fg_prob > fg_thr[1:].min())
    region = np.argmax(semantic_prob[1:].reshape(n, -1)[:, cand], axis=0).astype(np.int32) + 1
    fg = fg_prob[cand] > fg_thr[region]
    fg_class = np.zeros(h * w, dtype=np.int32)
    fg_class[cand] = np.where(fg, region, 0)
    fg_region = fg_class  # the class region of every foreground pixel (0: background)
    is_seed = fg & (interior[cand] > seed_thr[region])
    seed_pix = cand[is_seed]
    seed_class = np.zeros(h * w, dtype=np.int32)
    seed_class[seed_pix] = region[is_seed]
    fg_pix = cand[fg]
    fg_class, seed_class = fg_class.reshape(h, w), seed_class.reshape(h, w)
    # one labelling for all classes: touching pixels of different value get different labels
    per_class = params.per_class_watershed
    markers, n_markers = sk_label(
        seed_class if per_class else seed_class > 0,
        connectivity=2,
        background=0,
        return_num=True,
    )
    markers = markers.astype(np.int32, copy=False)
    seed_lab = markers.ravel()[seed_pix]
    if per_class:
        label_class = np.zeros(n_markers + 1, dtype=np.int64)
        label_class[seed_lab] = region[is_seed]
    else:  # the class most of a seed's pixels have (ties: the lower class id)
        votes = np.zeros((n_markers + 1, n + 1), dtype=np.int64)
        np.add.at(votes, (seed_lab, region[is_seed]), 1)
        label_class = votes.argmax(axis=1).astype(np.int64)
    labels = np.zeros((h, w), dtype=np.int32)
    if n_markers == 0:
        return labels, label_class
    # Each 4-connected single-class foreground component is flooded independently of all
    # others. A component holding one seed label is flooded entirely by it (no watershed
    # needed: most nuclei); the components with several seeds are packed side by side (1 px
    # apart) on a small canvas and flooded by one watershed call, so the cost scales with the
    # touching nuclei, not with (number of classes) x (image size).
    comps, n_comps = sk_label(
        fg_class if per_class else fg_class > 0, connectivity=1, background=0, return_num=True
    )
    flat_comps = comps.ravel()
    seed_comp = flat_comps[seed_pix]
    # one of each component's seed labels; a component is flooded by it alone unless another
    # of its seed pixels carries a different label
    some = np.zeros(n_comps + 1, dtype=np.int32)
    some[seed_comp] = seed_lab
    multi = np.bincount(seed_comp[seed_lab != some[seed_comp]], minlength=n_comps + 1) > 0
    single = np.where(multi, 0, some)
    fg_comp = flat_comps[fg_pix]
    labels.ravel()[fg_pix] = single[fg_comp]
    if not multi.any():
        log.debug("watershed: %d seeds, no touching seeds", n_markers)
        return labels, label_class
    in_multi = multi[fg_comp]
    pix = fg_pix[in_multi]
    comp_of = fg_comp[in_multi]
    comp_ids, j = np.unique(comp_of, return_inverse=True)
    rows, cols = pix // w, pix % w
    r0 = np.full(comp_ids.size, h, dtype=np.int64)
    c0 = np.full(comp_ids.size, w, dtype=np.int64)
    r1 = np.zeros(comp_ids.size, dtype=np.int64)
    c1 = np.zeros(comp_ids.size, dtype=np.int64)
    np.minimum.at(r0, j, rows)
    np.minimum.at(c0, j, cols)
    np.maximum.at(r1, j, rows)
    np.maximum.at(c1, j, cols)
    bh, bw = r1 - r0 + 1, c1 - c0 + 1
    oy, ox, canvas_h, canvas_w = _shelf_pack(bh, bw, width=max(w, int(bw.max())))
    cidx = (oy[j] + rows - r0[j]) * canvas_w + (ox[j] + cols - c0[j])
    size = canvas_h * canvas_w
    elev = np.zeros(size, dtype=np.float64)
    elev[cidx] = -interior[pix]
    mask = np.zeros(size, dtype=bool)
    mask[cidx] = True
    mark = np.zeros(size, dtype=np.int32)
    if params.seed_dynamic > 0:
        mark, label_class = _dynamic_markers(
            -elev.reshape(canvas_h, canvas_w),
            cidx,
            seed_class.ravel()[pix],
            region_of=fg_region.ravel()[pix],
            params=params,
            label_class=label_class,
            first=n_markers + 1,
        )
    else:
        mark[cidx] = markers.ravel()[pix]
    ws = watershed(
        elev.reshape(canvas_h, canvas_w),
        mark.reshape(canvas_h, canvas_w),
        mask=mask.reshape(canvas_h, canvas_w),
        connectivity=1,
    )
    labels.ravel()[pix] = ws.ravel()[cidx]
    log.debug("watershed: %d seeds, canvas %dx%d", n_markers, canvas_h, canvas_w)
    return labels, label_class


def _dynamic_markers(
    interior: np.ndarray,
    cidx: np.ndarray,
    seed_class: np.ndarray,
    region_of: np.ndarray,
    params: PostprocessParams,
    label_class: np.ndarray,
    first: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Markers of the packed multi-seed components: the h-maxima of P(interior)
    (``params.seed_dynamic``) that hold a seed pixel, labelled from ``first`` on; ``label_class``
    extended with their classes (the class most of their seed pixels have).

    A marker is a regional maximum of the h-maxima transform (the top ``seed_dynamic`` of a
    peak, cut off where it meets another peak's): two equally high peaks joined by a pass
    less deep than ``seed_dynamic`` are one marker (skimage's ``h_maxima`` would return their
    two summit pixels apart). ``interior`` is the packed canvas (0 between components),
    ``cidx`` the canvas index of each component pixel, ``seed_class`` its seed class (0: not a
    seed) and ``region_of`` its class region.
    """
    from skimage.morphology import local_maxima, reconstruction

    flat = interior.ravel()
    raised = reconstruction(np.maximum(interior - params.seed_dynamic, 0.0), interior)
    tops = local_maxima(raised, connectivity=2, allow_borders=True).ravel()[cidx] & (flat[cidx] > 0)
    if params.per_class_watershed:  # a marker stays inside one class region
        key = np.where(tops, region_of, 0)
    else:
        key = tops.astype(np.int32)
    lab_in = np.zeros(interior.size, dtype=np.int32)
    lab_in[cidx] = key
    plateaus, n_new = sk_label(
        lab_in.reshape(interior.shape), connectivity=2, background=0, return_num=True
    )
    ids = plateaus.ravel()[cidx]
    seeded = np.zeros(n_new + 1, dtype=bool)
    seeded[ids[seed_class > 0]] = True  # plateaus without a seed pixel mark nothing
    seeded[0] = False
    n = params.n_classes
    votes = np.zeros((n_new + 1, n + 1), dtype=np.int64)
    is_seed = seed_class > 0
    np.add.at(votes, (ids[is_seed], seed_class[is_seed]), 1)
    relabel = np.zeros(n_new + 1, dtype=np.int32)
    kept = np.flatnonzero(seeded)
    relabel[kept] = np.arange(first, first + kept.size, dtype=np.int32)
    mark = np.zeros(interior.size, dtype=np.int32)
    mark[cidx] = relabel[ids]
    out_class = np.concatenate([label_class[:first], votes[kept].argmax(axis=1).astype(np.int64)])
    return mark, out_class


def _shelf_pack(
    heights: np.ndarray, widths: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Top-left corners packing boxes in rows ("shelves") of ``width``, 1 px apart; canvas size."""
    oy = np.zeros(heights.size, dtype=np.int64)
    ox = np.zeros(heights.size, dtype=np.int64)
    y = x = shelf = 0
    for i in np.argsort(-heights, kind="stable"):
        hi, wi = int(heights[i]), int(widths[i])
        if x > 0 and x + wi > width:
            y, x, shelf = y + shelf + 1, 0, 0
        oy[i], ox[i] = y, x
        x += wi + 1
        shelf = max(shelf, hi)
    return oy, ox, y + shelf, width


# --------------------------------------------------------------------------------------------
# step 3-4: split, filter, fill, classify


def fill_instance_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background pockets enclosed by a single instance (4-connected, as binary_fill_holes).

    A pocket touching the image border or bordered by several instances is not a hole of any one
    of them and stays background. Done on the whole map at once instead of per instance.
    """
    return _fill_holes(labels)[0]


def _fill_holes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fill_instance_holes` and the (sorted) flat indices of the pixels it filled."""
    none = np.zeros(0, dtype=np.int64)
    bg = labels == 0
    pockets, n = ndi.label(bg)
    if n == 0:
        return labels, none
    border = np.concatenate([pockets[0], pockets[-1], pockets[:, 0], pockets[:, -1]])
    inner = np.ones(n + 1, dtype=bool)
    inner[0] = False
    inner[border] = False
    if not inner.any():
        return labels, none
    # pixels of inner pockets are never on the image border: their 4 neighbours are in range
    w = labels.shape[1]
    flat_pockets = pockets.ravel()
    idx = np.flatnonzero(inner[flat_pockets])
    nb = labels.ravel()[idx[:, None] + np.array([-w, w, -1, 1])]
    owner = np.repeat(flat_pockets[idx], 4)
    nb = nb.ravel()
    sel = nb > 0
    lo = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.zeros(n + 1, dtype=np.int64)
    np.minimum.at(lo, owner[sel], nb[sel])
    np.maximum.at(hi, owner[sel], nb[sel])
    fill = inner & (lo == hi)
    if not fill.any():
        return labels, none
    lut = np.where(fill, hi, 0).astype(labels.dtype)
    out = labels.copy()
    values = lut[flat_pockets[idx]]
    out.ravel()[idx] = values
    return out, idx[values > 0]


def _row_runs(
    labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leftmost/rightmost pixel of every (instance, row), grouped by instance.

    Returns run label, row, min col, max col (sorted by label then row) and, per label
    0..max, the start of its runs (``starts[l]:starts[l + 1]``).
    """
    h, w = labels.shape
    fg = labels > 0
    change = np.ones((h, w + 1), dtype=bool)  # change[:, c]: label differs between c-1 and c
    np.not_equal(labels[:, 1:], labels[:, :-1], out=change[:, 1:-1])
    seg_start = np.flatnonzero(change[:, :-1] & fg)  # horizontal segments of one label
    seg_end = np.flatnonzero(change[:, 1:] & fg)
    seg_lab = labels.ravel()[seg_start].astype(np.int64)
    key = seg_lab * h + seg_start // w
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    c0 = np.minimum.reduceat(seg_start[order] % w, first) if first.size else first
    c1 = np.maximum.reduceat(seg_end[order] % w, first) if first.size else first
    run_lab = key[first] // h
    starts = np.searchsorted(run_lab, np.arange(int(labels.max()) + 2))
    return run_lab, key[first] % h, c0, c1, starts


def _hull_pixel_counts(
    row: np.ndarray, c0: np.ndarray, c1: np.ndarray, starts: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """Pixel centres inside the convex hull of each instance ``ids``, as skimage's ``area_convex``.

    Like ``convex_hull_image``: the hull of the pixels' edge midpoints ("diamond" points),
    borders included. Only the row extremes (runs of :func:`_row_runs`) matter. The hulls of all
    instances are built in one vectorised shapely call; every hull edge then gives its x at the
    integer rows it spans, and each (instance, row) counts the integers between its extremes.
    """
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros(ids.size, dtype=np.int64)
    if ids.size == 0:
        return out
    s, e = starts[ids], starts[ids + 1]
    n_runs = e - s
    run = np.repeat(s - np.r_[0, np.cumsum(n_runs)[:-1]], n_runs) + np.arange(int(n_runs.sum()))
    owner = np.repeat(np.arange(ids.size), n_runs)
    r = row[run].astype(np.float64)
    left, right = c0[run].astype(np.float64), c1[run].astype(np.float64)
    ys = np.stack([r - 0.5, r, r + 0.5, r - 0.5, r, r + 0.5], axis=1)
    xs = np.stack([left, left - 0.5, left, right, right + 0.5, right], axis=1)
    # a linestring through the points is built straight from the coordinates (a multipoint
    # would first make one geometry per point); its hull is the hull of the points
    lines = shapely.linestrings(
        np.column_stack([xs.ravel(), ys.ravel()]), indices=np.repeat(owner, 6)
    )
    hulls = shapely.convex_hull(lines)
    xy, ring = shapely.get_coordinates(hulls, return_index=True)
    # consecutive vertices of one closed ring are the hull's edges
    same = ring[1:] == ring[:-1]
    x0, y0 = xy[:-1, 0][same], xy[:-1, 1][same]
    x1, y1 = xy[1:, 0][same], xy[1:, 1][same]
    inst = ring[:-1][same]
    lo_y = np.ceil(np.minimum(y0, y1) - 1e-9).astype(np.int64)
    hi_y = np.floor(np.maximum(y0, y1) + 1e-9).astype(np.int64)
    n_y = np.maximum(hi_y - lo_y + 1, 0)
    edge = np.repeat(np.arange(n_y.size), n_y)
    y = lo_y[edge] + np.arange(int(n_y.sum())) - np.repeat(np.r_[0, np.cumsum(n_y)[:-1]], n_y)
    dy = (y1 - y0)[edge]
    flat = dy == 0
    t = np.divide(y - y0[edge], dy, out=np.zeros(y.size), where=~flat)
    x = x0[edge] + t * (x1 - x0)[edge]
    # a horizontal edge contributes both of its ends
    x = np.concatenate([x, x1[edge][flat]])
    y = np.concatenate([y, y[flat]])
    who = np.concatenate([inst[edge], inst[edge][flat]])
    # one key per (instance, row): rows are offset into disjoint per-instance ranges
    y_first = row[s].astype(np.int64) - 1
    span = row[e - 1].astype(np.int64) - y_first + 2
    key = (y - y_first[who]) + np.r_[0, np.cumsum(span)[:-1]][who]
    order = np.argsort(key, kind="stable")
    key, x, who = key[order], x[order], who[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    lo = np.minimum.reduceat(x, first)
    hi = np.maximum.reduceat(x, first)
    count = np.maximum(np.floor(hi + 1e-9) - np.ceil(lo - 1e-9) + 1, 0).astype(np.int64)
    np.add.at(out, who[first], count)
    return out


def instance_solidity(labels: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Solidity (area / convex-hull area, as ``regionprops``) of instances ``ids`` (default all).

    Returns an array indexed by label (0..max), NaN for labels not requested or absent. Only the
    row extremes of each instance enter the hull, so no per-instance full-image work is done.
    """
    top = int(labels.max()) if labels.size else 0
    out = np.full(top + 1, np.nan)
    if top == 0:
        return out
    _, row, c0, c1, starts = _row_runs(labels)
    area = np.bincount(labels.ravel(), minlength=top + 1)
    want = np.arange(1, top + 1) if ids is None else np.asarray(ids, dtype=np.int64)
    want = want[starts[want] < starts[want + 1]]
    out[want] = area[want] / _hull_pixel_counts(row, c0, c1, starts, want)
    return out


def refine_instances(
    labels: np.ndarray,
    label_class: np.ndarray,
    semantic_prob: np.ndarray,
    params: PostprocessParams,
    *,
    connected: bool = False,
) -> Instances:
    """Split, filter, fill and classify watershed instances (steps 3-4 of the module docstring).

    Parameters
    ----------
    labels : (H, W) integer instance map (ids need not be consecutive; 0 background).
    label_class : class region (1..C) each id of ``labels`` was delineated in; it selects the
        size and solidity thresholds. Indexed by id.
    semantic_prob : (C+1, H, W) softmax of the semantic head.
    params : thresholds and ablation switches.
    connected : promise that every instance of ``labels`` is 8-connected, which skips the
        connected-component split (a no-op then). True for :func:`watershed_instances` output:
        a watershed basin grows 4-connected from its seed, and seeds are 8-connected.
    """
    labels = np.asarray(labels)
    label_class = np.asarray(label_class)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ConicQPError(
            f"labels must be a 2-D integer instance map, got {labels.dtype} {labels.shape}"
        )
    if not isinstance(semantic_prob, np.ndarray) or semantic_prob.ndim != 3:
        raise ConicQPError("semantic_prob must be a (C+1, H, W) numpy array of probabilities")
    if semantic_prob.shape[1:] != labels.shape:
        raise ConicQPError(
            f"semantic_prob {semantic_prob.shape} does not cover labels {labels.shape}; "
            "pass (C+1, H, W) probabilities of the same region"
        )
    if semantic_prob.shape[0] != params.n_classes + 1:
        raise ConicQPError(
            f"semantic_prob has {semantic_prob.shape[0]} channels but the thresholds are for "
            f"{params.n_classes} classes (+ background)"
        )
    _check_values("semantic_prob", semantic_prob)
    if labels.size and labels.min() < 0:
        raise ConicQPError("labels contain negative ids; use 0 for background")
    if label_class.ndim != 1 or not np.issubdtype(label_class.dtype, np.integer):
        raise ConicQPError("label_class must be a 1-D integer array indexed by label id")
    ids, dense = np.unique(labels, return_inverse=True)
    if ids[-1] >= label_class.size:
        raise ConicQPError(f"label_class needs a class for every label id up to {ids[-1]}")
    classes = label_class[ids]
    if ids[0] == 0:
        classes = classes.copy()
        classes[0] = 0
    else:  # keep dense id 0 for background
        ids, classes, dense = np.r_[0, ids], np.r_[0, classes], dense + 1
    if classes.size > 1 and not (classes[1:].min() >= 1 and classes[1:].max() <= params.n_classes):
        raise ConicQPError(
            f"label_class must map every instance to a class in 1..{params.n_classes}"
        )
    dense_labels = dense.reshape(labels.shape).astype(np.int32)
    return _refine(dense_labels, classes.astype(np.int64), semantic_prob, params, connected)


def _refine(
    labels: np.ndarray,
    label_class: np.ndarray,
    semantic_prob: np.ndarray,
    params: PostprocessParams,
    connected: bool,
) -> Instances:
    cls_of = label_class.astype(np.int64)
    lab = labels.astype(np.int32, copy=False)
    if params.split_and_size_filter and not connected:
        # every connected component of a mask becomes its own instance (labels of equal value only)
        split = sk_label(lab, connectivity=2, background=0).astype(np.int32)
        parent = np.zeros(int(split.max()) + 1, dtype=np.int64)
        parent[split.ravel()] = lab.ravel()
        cls_of = cls_of[parent]
        lab = split
    # the instance pixels (flat, ascending) and their labels follow every step, so the filters
    # touch the foreground only; the map is rebuilt where a whole-map step needs it
    idx = np.flatnonzero(lab)
    vals = lab.ravel()[idx]
    if params.split_and_size_filter:
        area = np.bincount(vals, minlength=cls_of.size)
        min_size = np.array([0] + [t.min_size for t in params.classes])[cls_of]
        max_size = np.array(
            [0]
            + [
                t.max_size if t.max_size is not None else np.iinfo(np.int64).max
                for t in params.classes
            ]
        )[cls_of]
        drop = (area < min_size) | (area > max_size)
        keep = ~drop[vals]
        if not keep.all():
            idx, vals = idx[keep], vals[keep]
            lab = np.zeros(lab.shape, dtype=np.int32)
            lab.ravel()[idx] = vals
    lab, filled = _fill_holes(lab)
    if filled.size:
        idx = np.concatenate([idx, filled])
        vals = np.concatenate([vals, lab.ravel()[filled]])
        order = np.argsort(idx, kind="stable")  # two sorted runs: a linear merge
        idx, vals = idx[order], vals[order]
    if params.solidity_filter:
        low = _solidity_drop(lab, vals, cls_of, params)
        if low is not None:
            keep = ~low[vals]
            idx, vals = idx[keep], vals[keep]

    # consecutive ids 1..K
    present = np.zeros(cls_of.size, dtype=bool)
    present[vals] = True
    old_ids = np.flatnonzero(present)
    relabel = np.zeros(cls_of.size, dtype=np.int32)
    relabel[old_ids] = np.arange(1, old_ids.size + 1, dtype=np.int32)
    ids = relabel[vals]
    final = np.zeros(lab.shape, dtype=np.int32)
    final.ravel()[idx] = ids
    k = old_ids.size

    # class = argmax of the summed nucleus-class softmax over the instance's pixels
    c = params.n_classes
    sums = np.empty((k, c), dtype=np.float64)
    flat_sem = semantic_prob.reshape(semantic_prob.shape[0], -1)
    for j in range(c):
        sums[:, j] = np.bincount(ids, weights=flat_sem[j + 1, idx], minlength=k + 1)[1:]
    totals = sums.sum(axis=1, keepdims=True)
    probs = np.divide(sums, totals, out=np.full_like(sums, 1.0 / c), where=totals > 0)
    classes = np.argmax(probs, axis=1).astype(np.int64) + 1
    log.debug("post-processing kept %d instances", k)
    return Instances(final, classes, probs.astype(np.float32))


# directions (a, b) of the lines a*r + b*c = const bounding a 16-gon around each instance
_BOUND_DIRECTIONS = ((0, 1), (1, 1), (1, -1), (1, 2), (2, 1), (1, -2), (2, -1))


def _polygon_bound_count(
    row: np.ndarray, c0: np.ndarray, c1: np.ndarray, s: np.ndarray
) -> np.ndarray:
    """Pixel centres in a 16-gon around each instance that contains its convex hull.

    The hull's extent along ``a*r + b*c`` is the pixels' extent +- max(|a|, |b|) / 2 (hull of
    the pixels' edge midpoints), so area / this count is a lower bound of the solidity and
    the compact majority of nuclei pass the solidity filter without a hull computation.
    ``s`` are the first run of each instance (instances' runs are consecutive).
    """
    rmin = row[s]
    rmax = np.r_[row[s[1:] - 1], row[-1]]
    y = rmin[:, None] + np.arange(int((rmax - rmin).max()) + 1)[None, :]
    lo = np.full(y.shape, -np.inf)
    hi = np.full(y.shape, np.inf)
    tol = 1e-9
    for a, b in _BOUND_DIRECTIONS:
        v_lo = a * row + b * (c0 if b > 0 else c1)
        v_hi = a * row + b * (c1 if b > 0 else c0)
        e = 0.5 * max(abs(a), abs(b))
        m = np.minimum.reduceat(v_lo, s)[:, None] - e
        big = np.maximum.reduceat(v_hi, s)[:, None] + e
        first, second = (m - a * y) / b, (big - a * y) / b
        if b < 0:
            first, second = second, first
        lo = np.maximum(lo, first)
        hi = np.minimum(hi, second)
    width = np.floor(hi + tol) - np.ceil(lo - tol) + 1
    width[(width < 0) | (y > rmax[:, None])] = 0
    return width.sum(axis=1)


def _solidity_drop(
    lab: np.ndarray, vals: np.ndarray, cls_of: np.ndarray, params: PostprocessParams
) -> np.ndarray | None:
    """Per label: below its class's solidity threshold (None: nothing to drop).

    ``vals`` are the labels of ``lab``'s instance pixels. Cheap bounds settle most instances;
    only those between the bounds get an exact convex hull.
    """
    if vals.size == 0:
        return None
    top = int(vals.max())
    thr = np.array([0.0] + [t.min_solidity for t in params.classes])[cls_of[: top + 1]]
    thr[0] = 0.0
    if not (thr > 0).any():
        return None
    _, row, c0, c1, starts = _row_runs(lab)
    area = np.bincount(vals, minlength=top + 1)
    ids = np.flatnonzero(np.r_[False, starts[1:-1] < starts[2:]])
    if ids.size == 0:
        return None
    s = starts[ids]
    # hull >= rows filled between their extremes: an upper bound of the solidity
    row_fill = np.add.reduceat(c1 - c0 + 1, s)
    upper = area[ids] / row_fill
    lower = area[ids] / _polygon_bound_count(row, c0, c1, s)
    t = thr[ids]
    drop = np.zeros(top + 1, dtype=bool)
    drop[ids[upper < t]] = True
    exact = ids[(t > 0) & (lower < t) & (upper >= t)]
    drop[exact] = area[exact] / _hull_pixel_counts(row, c0, c1, starts, exact) < thr[exact]
    return drop if drop.any() else None


def postprocess(
    semantic_prob: np.ndarray, three_label_prob: np.ndarray, params: PostprocessParams
) -> Instances:
    """Classified nucleus instances from the softmax outputs of one region (paper II.G).

    Parameters
    ----------
    semantic_prob : (C+1, H, W) float softmax of the semantic head (channel 0 background).
    three_label_prob : (3, H, W) float softmax of the 3-label head (background, interior,
        boundary).
    params : per-class thresholds (a checkpoint's thresholds.json) and ablation switches.
    """
    _check_probs(semantic_prob, three_label_prob, params)
    labels, label_class = _watershed(semantic_prob, three_label_prob, params)
    return _refine(labels, label_class, semantic_prob, params, connected=True)
