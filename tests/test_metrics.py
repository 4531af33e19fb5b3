"""CoNIC metrics: hand-computed cases, and agreement with a slow per-instance reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conic_qp.classes import CONIC
from conic_qp.errors import ConicQPError
from conic_qp.metrics import (
    EvaluationResult,
    PQStats,
    binary_pq,
    evaluate,
    match_instances,
    multi_pq_stats,
    pq_from_stats,
    r2_scores,
    task2_counts,
)

# --------------------------------------------------------------------------------------------
# independent reference: straightforward per-instance loops, as in the official CoNIC code


def ref_stats(true: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, float]:
    true_ids = [int(i) for i in np.unique(true) if i != 0]
    pred_ids = [int(i) for i in np.unique(pred) if i != 0]
    boxes = ndi.find_objects(true.astype(np.int64))
    tp, iou_sum = 0, 0.0
    for t in true_ids:
        box = boxes[t - 1]
        cand = np.unique(pred[box][true[box] == t])
        t_mask = true == t
        for p in cand:
            if p == 0:
                continue
            p_mask = pred == p
            inter = int((t_mask & p_mask).sum())
            total = int(t_mask.sum()) + int(p_mask.sum())
            iou = inter / (total - inter)
            if iou > 0.5:
                tp += 1
                iou_sum += iou
    return tp, len(pred_ids) - tp, len(true_ids) - tp, iou_sum


def ref_pq(tp: float, fp: float, fn: float, iou_sum: float) -> float:
    dq = tp / ((tp + 0.5 * fp + 0.5 * fn) + 1.0e-6)
    sq = iou_sum / (tp + 1.0e-6)
    return dq * sq


def ref_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((labels.shape[0], n_classes), dtype=np.int64)
    h, w = labels.shape[1:3]
    for i, lab in enumerate(labels):
        inst = lab[16 : h - 16, 16 : w - 16, 0]
        cls = lab[16 : h - 16, 16 : w - 16, 1]
        for c in range(1, n_classes + 1):
            out[i, c - 1] = len(set(np.unique(inst * (cls == c)).tolist()) - {0})
    return out


def ref_evaluate(pred: np.ndarray, true: np.ndarray, n_classes: int) -> dict[str, object]:
    from sklearn.metrics import r2_score

    pqs, pooled = [], np.zeros((n_classes, 4))
    for t, p in zip(true, pred, strict=True):
        pqs.append(ref_pq(*ref_stats(t[..., 0], p[..., 0])))
        for c in range(1, n_classes + 1):
            pooled[c - 1] += ref_stats(t[..., 0] * (t[..., 1] == c), p[..., 0] * (p[..., 1] == c))
    per_class = [ref_pq(*row) for row in pooled]
    tc, pc = ref_counts(true, n_classes), ref_counts(pred, n_classes)
    r2 = [r2_score(tc[:, c], pc[:, c]) for c in range(n_classes)]
    return {
        "pq": float(np.mean(pqs)),
        "mpq_plus": float(np.mean(per_class)),
        "pq_per_class": per_class,
        "r2": float(np.mean(r2)),
        "r2_per_class": r2,
        "pooled": pooled,
    }


def assert_matches_reference(res: EvaluationResult, ref: dict[str, object]) -> None:
    assert res.pq == pytest.approx(ref["pq"], abs=1e-6)
    assert res.mpq_plus == pytest.approx(ref["mpq_plus"], abs=1e-6)
    np.testing.assert_allclose(list(res.pq_per_class.values()), ref["pq_per_class"], atol=1e-6)
    np.testing.assert_allclose(list(res.r2_per_class.values()), ref["r2_per_class"], atol=1e-6)
    assert res.r2 == pytest.approx(ref["r2"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# hand-computed cases


def test_match_instances_hand_computed() -> None:
    true = np.zeros((6, 6), np.int32)
    true[0:2, 0:2] = 1  # 4 px
    true[0:3, 4:6] = 2  # 6 px
    true[4:6, 0:3] = 3  # 6 px, missed
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 0:2] = 7  # exact: IoU 1
    pred[0:2, 4:6] = 9  # 4 px inside 6: IoU 4/6
    pred[5, 5] = 4  # spurious
    s = match_instances(true, pred)
    assert s == PQStats(tp=2, fp=1, fn=1, iou_sum=pytest.approx(1 + 4 / 6))
    dq = 2 / (2 + 0.5 + 0.5 + 1e-6)
    sq = (1 + 4 / 6) / (2 + 1e-6)
    assert s.dq == pytest.approx(dq) and s.sq == pytest.approx(sq)
    assert binary_pq(true, pred) == pytest.approx(dq * sq)
    # ids are arbitrary: swapping roles swaps FP and FN
    assert match_instances(pred, true) == PQStats(2, 1, 1, pytest.approx(1 + 4 / 6))


def test_iou_exactly_half_is_not_a_match() -> None:
    true = np.zeros((6, 6), np.int32)
    true[0:2, 0:2] = 1  # 4 px
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 0:3] = 1  # 6 px, inter 4, union 6 -> 0.667 matched
    assert match_instances(true, pred).tp == 1
    pred[0:2, 0:4] = 1  # 8 px, inter 4, union 8 -> exactly 0.5
    assert match_instances(true, pred) == PQStats(0, 1, 1, 0.0)
    assert binary_pq(true, pred) == 0.0


@pytest.mark.parametrize("empty_true, empty_pred", [(True, True), (True, False), (False, True)])
def test_empty_images_score_zero(empty_true: bool, empty_pred: bool) -> None:
    full = np.zeros((6, 6), np.uint16)
    full[1:4, 1:4] = 3
    true = np.zeros_like(full) if empty_true else full
    pred = np.zeros_like(full) if empty_pred else full
    s = match_instances(true, pred)
    assert s.tp == 0 and s.fp == int(not empty_pred) and s.fn == int(not empty_true)
    assert binary_pq(true, pred) == 0.0


def test_no_background_counts_every_instance() -> None:
    true = np.ones((4, 4), np.int64)
    true[:, 2:] = 2
    assert match_instances(true, true) == PQStats(2, 0, 0, 2.0)
    pred = true.copy()
    pred[0, 0] = 0
    huge = 2**62  # forces the id compaction path
    assert match_instances(true + huge, pred + np.where(pred > 0, huge, 0)) == match_instances(
        true, pred
    )


def test_multi_pq_stats_per_class_and_mixed_pixels() -> None:
    true = np.zeros((6, 6, 2), np.int32)
    true[0:2, 0:2] = (1, 1)
    true[3:6, 3:6] = (2, 2)
    pred = np.zeros((6, 6, 2), np.int32)
    pred[0:2, 0:2] = (5, 2)  # right shape, wrong class: FN for class 1, FP for class 2
    pred[3:6, 3:6] = (6, 2)
    pred[5, 5, 1] = 3  # one pixel of instance 6 carries class 3: its own class-3 segment
    stats = multi_pq_stats(true, pred, n_classes=3)
    np.testing.assert_allclose(stats[0], [0, 0, 1, 0])
    np.testing.assert_allclose(stats[1], [1, 1, 0, 8 / 9])
    np.testing.assert_allclose(stats[2], [0, 1, 0, 0])
    np.testing.assert_allclose(pq_from_stats(stats), [0, ref_pq(1, 1, 0, 8 / 9), 0])


def test_absent_class_scores_zero_in_mpq_plus() -> None:
    lab = np.zeros((2, 40, 40, 2), np.int32)
    lab[0, 5:15, 5:15] = (1, 1)
    lab[1, 20:30, 20:30] = (1, 1)
    res = evaluate(lab, lab, ["a", "b"])
    assert res.pq_per_class["a"] == pytest.approx(1.0, abs=1e-5)
    assert res.pq_per_class["b"] == 0.0  # absent from truth and prediction: 0, not skipped
    assert res.mpq_plus == pytest.approx(0.5, abs=1e-5)
    assert res.pq == pytest.approx(1.0, abs=1e-5)


def test_mpq_plus_pools_over_images() -> None:
    # class 1: image 0 perfect, image 1 all missed. Pooled PQ = DQ(1,0,1) * 1, not the image mean.
    true = np.zeros((2, 40, 40, 2), np.int32)
    true[:, 5:15, 5:15] = (1, 1)
    pred = true.copy()
    pred[1] = 0
    res = evaluate(pred, true, ["a"])
    assert res.mpq_plus == pytest.approx(ref_pq(1, 0, 1, 1.0))
    assert res.pq == pytest.approx(ref_pq(1, 0, 0, 1.0) / 2)


def test_r2_constant_truth_semantics() -> None:
    t = np.array([[3, 1], [3, 2], [3, 5]])
    exact = r2_scores(t, t)
    np.testing.assert_allclose(exact, [1.0, 1.0])
    off = r2_scores(t, np.array([[3, 1], [4, 2], [3, 5]]))
    assert off[0] == 0.0 and off[1] == 1.0
    p = np.array([[3, 2], [3, 2], [3, 2]])
    mean = t[:, 1].mean()
    expected = 1 - ((t[:, 1] - 2) ** 2).sum() / ((t[:, 1] - mean) ** 2).sum()
    assert r2_scores(t, p)[1] == pytest.approx(expected)
    assert np.isnan(r2_scores(t[:1], t[:1])).all()  # one image: undefined, like sklearn


def test_r2_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t = rng.integers(0, 30, (25, 6))
    t[:, 4] = 2  # constant column
    p = t + rng.integers(-4, 5, t.shape)
    ours = r2_scores(t, p)
    theirs = [sklearn_metrics.r2_score(t[:, c], p[:, c]) for c in range(6)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_task2_counts_any_pixel_in_crop() -> None:
    lab = np.zeros((1, 40, 40, 2), np.int32)
    lab[0, 10:16, 10:16] = (1, 1)  # ends at row/col 15: just outside the 16 px margin
    lab[0, 10:17, 20:24] = (2, 1)  # one row (16) inside the crop: counts
    lab[0, 20:24, 20:24] = (3, 2)
    lab[0, 20:24, 30:34] = (4, 0)  # unclassified: not counted
    lab[0, 24:40, 0:12] = (5, 2)  # bottom-left, out of the crop on both axes
    lab[0, 23:25, 23:25, 1] = 3  # pixels of instance 3 with class 3: a class-3 nucleus too
    np.testing.assert_array_equal(task2_counts(lab, 3), [[1, 1, 1]])
    np.testing.assert_array_equal(task2_counts(lab, 3, margin=0), [[2, 2, 1]])
    with pytest.raises(ConicQPError, match="too small"):
        task2_counts(lab, 3, margin=20)


def test_evaluate_result_and_json() -> None:
    rng = np.random.default_rng(1)
    true = random_labels(rng, 3, 48, n_classes=6)
    res = evaluate(true, true)
    assert list(res.pq_per_class) == CONIC.names
    data = res.to_json()
    assert set(data) == {"pq", "mpq_plus", "pq_per_class", "r2", "r2_per_class"}
    assert data["pq"] == pytest.approx(1.0, abs=1e-5)
    json.dumps(data)
    single = evaluate(true[:1], true[:1]).to_json()
    assert single["r2"] is None and all(v is None for v in single["r2_per_class"].values())
    json.dumps(single)


def test_bad_shapes_raise() -> None:
    a = np.zeros((2, 8, 8, 2), np.int32)
    with pytest.raises(ConicQPError, match="differs"):
        evaluate(a, a[:1])
    with pytest.raises(ConicQPError, match="expected"):
        evaluate(a[..., 0], a[..., 0])
    with pytest.raises(ConicQPError, match="dtype"):
        match_instances(a[0, ..., 0].astype(float), a[0, ..., 0])
    with pytest.raises(ConicQPError, match="negative"):
        match_instances(a[0, ..., 0] - 1, a[0, ..., 0])
    with pytest.raises(ConicQPError, match="match_iou"):
        match_instances(a[0, ..., 0], a[0, ..., 0], match_iou=0.3)


# --------------------------------------------------------------------------------------------
# property tests on random label maps


def random_labels(rng: np.random.Generator, n: int, size: int, n_classes: int) -> np.ndarray:
    """Random overlapping discs with sparse ids, classes per instance and a few odd pixels."""
    out = np.zeros((n, size, size, 2), np.int64)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(0, 14)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.uniform(1.5, size / 6)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            out[i, disc] = (rng.integers(1, 10_000), rng.integers(0, n_classes + 1))
    return out


def perturb(rng: np.random.Generator, lab: np.ndarray, n_classes: int) -> np.ndarray:
    out = lab.copy()
    for i in range(len(out)):
        out[i] = np.roll(out[i], rng.integers(-2, 3, 2), axis=(0, 1))
        ids = np.unique(out[i, ..., 0])[1:]
        for k in ids:
            m = out[i, ..., 0] == k
            u = rng.random()
            if u < 0.15:
                out[i][m] = 0
            elif u < 0.3:
                out[i, ..., 1][m] = rng.integers(0, n_classes + 1)
            elif u < 0.4:
                out[i, ..., 0][m & (np.arange(lab.shape[2]) % 2 == 0)] = k + 20_000
        noise = rng.random(out.shape[1:3]) < 0.01
        out[i, ..., 1][noise] = rng.integers(1, n_classes + 1)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_maps_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(1, 5))
    true = random_labels(rng, 6, 48, n_classes)
    pred = perturb(rng, true, n_classes)
    if seed % 2:
        pred = pred.astype(np.uint16)
    res = evaluate(pred, true, [f"c{i}" for i in range(n_classes)], chunk_size=4)
    ref = ref_evaluate(pred.astype(np.int64), true, n_classes)
    assert_matches_reference(res, ref)
    for t, p in zip(true, pred, strict=True):
        s = match_instances(t[..., 0], p[..., 0])
        r = ref_stats(t[..., 0], p[..., 0].astype(np.int64))
        assert (s.tp, s.fp, s.fn) == r[:3] and s.iou_sum == pytest.approx(r[3])
    total = sum(multi_pq_stats(t, p, n_classes) for t, p in zip(true, pred, strict=True))
    np.testing.assert_allclose(total, ref["pooled"])
    np.testing.assert_array_equal(task2_counts(true, n_classes), ref_counts(true, n_classes))


def test_huge_ids_do_not_overflow() -> None:
    rng = np.random.default_rng(7)
    true = random_labels(rng, 3, 40, 2)
    pred = perturb(rng, true, 2)
    big = np.int64(2**61)
    true_big, pred_big = true.copy(), pred.copy()
    true_big[..., 0] = np.where(true[..., 0] > 0, true[..., 0] + big, 0)
    pred_big[..., 0] = np.where(pred[..., 0] > 0, pred[..., 0] + big, 0)
    assert evaluate(pred_big, true_big, ["a", "b"]) == evaluate(pred, true, ["a", "b"])


# --------------------------------------------------------------------------------------------
# real CoNSeP tiles


def _load_consep(root: Path, n_tiles: int) -> np.ndarray:
    from PIL import Image
    from scipy.io import loadmat

    pngs = sorted((root / "consep" / "inst_png" / "test").glob("*.png"))[::7][:n_tiles]
    tiles = []
    for png in pngs:
        inst = np.asarray(Image.open(png)).astype(np.int64)
        mat = loadmat(str(root / "consep" / "type_mat" / "test" / (png.stem + ".mat")))
        types = np.concatenate([[0], np.asarray(mat["inst_type"]).ravel().astype(np.int64)])
        tiles.append(np.stack([inst, types[inst]], axis=-1))
    return np.stack(tiles)


def _merge_neighbours(inst: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = inst.copy()
    a, b = inst[:, :-1], inst[:, 1:]
    touch = (a > 0) & (b > 0) & (a != b)
    pairs = np.unique(np.stack([a[touch], b[touch]], axis=1), axis=0)
    for x, y in pairs[rng.random(len(pairs)) < 0.5]:
        out[out == y] = x
    return out


def _split(inst: np.ndarray) -> np.ndarray:
    out = inst.copy()
    offset = inst.max() + 1
    for k, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None or k % 3:
            continue
        box = out[sl]
        cols = np.arange(box.shape[1]) >= box.shape[1] // 2
        box[(box == k) & cols[None, :]] = k + offset
    return out


@pytest.mark.shared_data
def test_consep_tiles_match_reference(shared_data: Path) -> None:
    from skimage.morphology import disk
    from skimage.segmentation import expand_labels

    true = _load_consep(shared_data, 20)
    assert true.shape == (20, 256, 256, 2) and true[..., 0].max() > 0
    rng = np.random.default_rng(3)
    pred = true.copy()
    for i in range(len(pred)):
        inst, cls = pred[i, ..., 0], pred[i, ..., 1]
        kind = i % 7
        if kind == 0:  # eroded: borders between and around nuclei
            fg = ndi.binary_erosion(inst > 0, disk(2))
            inst[~fg] = 0
        elif kind == 1:  # dilated
            grown = expand_labels(inst, 3)
            cls[:] = np.where(grown > 0, np.take(_class_lut(true[i]), grown), 0)
            inst[:] = grown
        elif kind == 2:  # dropped nuclei
            ids = np.unique(inst)[1:]
            inst[np.isin(inst, ids[rng.random(len(ids)) < 0.3])] = 0
        elif kind == 3:
            inst[:] = _merge_neighbours(inst, rng)
        elif kind == 4:
            inst[:] = _split(inst)
        elif kind == 5:  # re-classed nuclei
            ids = np.unique(inst)[1:]
            moved = np.isin(inst, ids[rng.random(len(ids)) < 0.3])
            cls[moved] = cls[moved] % 4 + 1
        cls[inst == 0] = 0
    pred[6] = 0  # an empty prediction
    pred[..., 1][pred[..., 1] == 4] = 2  # spindle never predicted
    names = ["other", "inflammatory", "epithelial", "spindle"]
    res = evaluate(pred, true, names, chunk_size=8)
    ref = ref_evaluate(pred, true, 4)
    assert_matches_reference(res, ref)
    assert res.pq_per_class["spindle"] == 0.0
    assert 0.0 < res.pq < 1.0 and 0.0 < res.mpq_plus < 1.0
    perfect = evaluate(true, true, names)
    assert perfect.pq == pytest.approx(1.0, abs=1e-5) and perfect.r2 == 1.0


def _class_lut(lab: np.ndarray) -> np.ndarray:
    lut = np.zeros(int(lab[..., 0].max()) + 1, np.int64)
    lut[lab[..., 0]] = lab[..., 1]
    return lut


def test_small_images_count_whole_image_and_chunks_do_not_matter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(11)
    true = random_labels(rng, 5, 24, 3)
    pred = perturb(rng, true, 3)
    with caplog.at_level("WARNING", logger="conic_qp.metrics"):
        res = evaluate(pred, true, ["a", "b", "c"], chunk_size=2)
    assert "too small" in caplog.text
    expected = r2_scores(task2_counts(true, 3, margin=0), task2_counts(pred, 3, margin=0))
    np.testing.assert_allclose(list(res.r2_per_class.values()), expected)
    one = evaluate(pred, true, ["a", "b", "c"], chunk_size=1)
    assert (one.pq, one.mpq_plus) == pytest.approx((res.pq, res.mpq_plus), abs=1e-12)
    assert one.r2_per_class == res.r2_per_class
