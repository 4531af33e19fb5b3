"""Whole-image literature metrics (HoVer-Net protocol): AJI, centroid pairing, type F1."""

from __future__ import annotations

import numpy as np
import pytest

from conic_qp.metrics import (
    aji,
    evaluate_whole_images,
    instance_centroids,
    pair_centroids,
    type_f1,
)


def test_aji_matches_a_hand_computed_value() -> None:
    true = np.array([[1, 1, 1, 1, 0, 2, 2, 0, 0, 0]])
    pred = np.array([[0, 1, 1, 1, 1, 0, 0, 3, 3, 3]])
    # G1-P1: intersection 3, union 5; G2 overlaps nothing (+2); P3 is never paired (+3)
    assert aji(true, pred) == pytest.approx(3 / (5 + 2 + 3))


def test_aji_counts_a_merging_prediction_in_every_union() -> None:
    true = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[5, 5, 5, 5, 5]])
    assert aji(true, pred) == pytest.approx((2 + 2) / (5 + 5))


def test_aji_pairs_each_truth_with_its_best_iou() -> None:
    true = np.array([[1, 1, 1, 1, 0, 0]])
    pred = np.array([[7, 4, 4, 4, 4, 4]])  # P4: inter 3, union 6 (0.5); P7: inter 1, union 4
    assert aji(true, pred) == pytest.approx(3 / (6 + 1))  # P7 unpaired: its area joins U


def test_aji_of_identical_maps_is_one_and_of_empty_maps_zero() -> None:
    m = np.array([[0, 3, 3], [2, 2, 0]])
    assert aji(m, m) == 1.0
    assert aji(np.zeros((2, 2), int), np.zeros((2, 2), int)) == 0.0


def test_centroids_pairing_and_type_f1() -> None:
    lab = np.zeros((4, 6, 2), dtype=np.int32)
    lab[0:2, 0:2] = (1, 3)
    lab[2:4, 4:6] = (9, 2)
    ids, xy, cls = instance_centroids(lab)
    assert ids.tolist() == [1, 9] and cls.tolist() == [3, 2]
    assert np.allclose(xy, [[0.5, 0.5], [2.5, 4.5]])

    pairs, ut, up = pair_centroids([[0, 0], [10, 10]], [[1, 0], [30, 30]], radius=5)
    assert pairs.tolist() == [[0, 0]] and ut.tolist() == [1] and up.tolist() == [1]

    # paired (true, pred): (2, 2), (2, 3), (3, 3); unpaired truth of class 3, prediction of 2
    t, p = np.array([2, 2, 3]), np.array([2, 3, 3])
    assert type_f1(t, p, np.array([3]), np.array([2]), 2) == pytest.approx(2 / (2 + 2 + 1))
    assert type_f1(t, p, np.array([3]), np.array([2]), 3) == pytest.approx(2 / (2 + 2 + 1))


def test_whole_image_scores_of_a_perfect_and_a_shifted_prediction() -> None:
    true = np.zeros((20, 20, 2), dtype=np.int32)
    true[2:8, 2:8] = (1, 1)
    true[10:16, 10:16] = (2, 2)
    shifted = np.zeros_like(true)
    shifted[3:9, 2:8] = (5, 1)  # IoU 30/42 > 0.5, same class
    shifted[10:16, 10:16] = (6, 1)  # exact outline, wrong class
    res = evaluate_whole_images([("a", true, true), ("b", true, shifted)], ["c1", "c2"], radius=2)
    assert res.per_image["a"]["aji"] == 1.0 and res.per_image["a"]["pq"] == pytest.approx(1.0)
    assert res.per_image["b"]["dq"] == pytest.approx(1.0)
    assert res.per_image["b"]["sq"] == pytest.approx((30 / 42 + 1.0) / 2)
    assert res.per_image["b"]["aji"] == pytest.approx((30 + 36) / (42 + 36))
    assert res.f1_detection == pytest.approx(1.0)
    assert res.accuracy == pytest.approx(3 / 4)
    # class 2: pairs (2,2) in a, (2,1) in b -> 2*1 / (2 + 2*1) = 0.5
    assert res.f1_per_class["c2"] == pytest.approx(0.5)
