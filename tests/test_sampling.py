"""Importance sampling (paper eq. 1-2) and the per-epoch sampler."""

from __future__ import annotations

import numpy as np
import pytest

from conic_qp.errors import ConicQPError
from conic_qp.train.sampling import EpochSampler, class_pixel_fractions, importance_weights

# Three tiles x three classes (background, A, B), worked by hand:
# column sums 2, 0.75, 0.25 -> shares [1/4, 2/3, 0], [1/2, 0, 0], [1/4, 1/3, 1]
# -> p = [11/36, 6/36, 19/36].
X = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
P = np.array([11, 6, 19]) / 36


def test_importance_weights_literal_example() -> None:
    p = importance_weights(X)
    np.testing.assert_allclose(p, P, rtol=0, atol=1e-12)
    assert p.sum() == pytest.approx(1.0)
    assert p.argmax() == 2  # the only tile with the rare class B


def test_class_absent_from_set_contributes_nothing() -> None:
    with_empty = np.concatenate([X, np.zeros((3, 1))], axis=1)
    np.testing.assert_allclose(importance_weights(with_empty), P, atol=1e-12)


def test_importance_weights_rejects_unlabelled_sets() -> None:
    with pytest.raises(ConicQPError, match="no tile has any labelled pixel"):
        importance_weights(np.zeros((4, 3)))
    with pytest.raises(ConicQPError):
        importance_weights(np.array([[0.5, -0.1]]))


def test_class_pixel_fractions_ignores_ignore_label() -> None:
    maps = np.array(
        [
            [[0, 1], [1, -1]],  # 3 labelled pixels: 1 background, 2 of class 1
            [[-1, -1], [-1, -1]],  # nothing labelled
            [[2, 2], [0, 0]],
        ]
    )
    f = class_pixel_fractions(maps, n_classes=2)
    np.testing.assert_allclose(f, [[1 / 3, 2 / 3, 0], [0, 0, 0], [0.5, 0, 0.5]])


def test_class_pixel_fractions_chunks_agree_and_check_range() -> None:
    rng = np.random.default_rng(0)
    maps = rng.integers(-1, 4, size=(7, 8, 8))
    np.testing.assert_allclose(
        class_pixel_fractions(maps, 3, chunk=2), class_pixel_fractions(maps, 3, chunk=64)
    )
    with pytest.raises(ConicQPError, match="outside"):
        class_pixel_fractions(maps, 2)


def test_sampler_reproducible_and_new_subset_each_epoch() -> None:
    a = EpochSampler(P, size=50, seed=3)
    b = EpochSampler(P, size=50, seed=3)
    np.testing.assert_array_equal(a.indices(0), b.indices(0))
    assert not np.array_equal(a.indices(0), a.indices(1))
    assert not np.array_equal(a.indices(0), EpochSampler(P, size=50, seed=4).indices(0))
    assert len(a) == 50 and len(a.indices(5)) == 50


def test_sampler_frequencies_follow_eq2_and_uniform_when_disabled() -> None:
    n = 30000
    drawn = np.bincount(EpochSampler(P, size=n, seed=1).indices(0), minlength=3) / n
    np.testing.assert_allclose(drawn, P, atol=0.015)
    off = EpochSampler(P, size=n, seed=1, enabled=False)
    np.testing.assert_allclose(off.p, [1 / 3] * 3)
    np.testing.assert_allclose(
        np.bincount(off.indices(0), minlength=3) / n, [1 / 3] * 3, atol=0.015
    )


def test_sampler_zero_weight_tiles_and_uniform_mix() -> None:
    w = np.array([0.0, 1.0, 1.0])
    assert 0 not in EpochSampler(w, size=500).indices(0)
    mixed = EpochSampler(w, size=500, uniform_mix=0.3)
    assert mixed.p[0] == pytest.approx(0.1)
    assert 0 in mixed.indices(0)


def test_sampler_iterates_like_a_torch_sampler() -> None:
    s = EpochSampler(P, size=10, seed=0)
    s.set_epoch(2)
    assert list(s) == s.indices(2).tolist()


def test_sampler_from_class_maps_prefers_rare_class_tiles() -> None:
    maps = np.zeros((4, 8, 8), int)
    maps[:, :4] = 1  # every tile half class 1
    maps[3, 0, 0] = 2  # one pixel of a rare class in tile 3
    s = EpochSampler.from_class_maps(maps, n_classes=2, size=10)
    assert s.p.argmax() == 3
    assert s.p[3] > 2 * s.p[0]


@pytest.mark.parametrize(
    "kwargs",
    [{"weights": np.array([])}, {"weights": np.array([0.0, 0.0])}, {"weights": P, "size": 0}],
)
def test_sampler_bad_input(kwargs: dict) -> None:
    with pytest.raises(ConicQPError):
        EpochSampler(**kwargs)
