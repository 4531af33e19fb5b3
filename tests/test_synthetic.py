"""Synthetic H&E tiles: determinism, exact labels, class-dependent appearance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import regionprops

from conic_qp.errors import ConicQPError
from conic_qp.synthetic import synthetic_dataset, synthetic_slide_image, synthetic_tile


@pytest.fixture(scope="module")
def tiles() -> list:
    return [synthetic_tile(256, seed=s) for s in range(4)]


def test_deterministic_by_seed() -> None:
    a, b = synthetic_tile(96, seed=7), synthetic_tile(96, seed=7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.inst_map, b.inst_map)
    np.testing.assert_array_equal(a.inst_classes, b.inst_classes)
    assert not np.array_equal(a.image, synthetic_tile(96, seed=8).image)


def test_labels_are_exact_and_consistent(tiles: list) -> None:
    touching = 0
    for t in tiles:
        assert t.image.shape == (256, 256, 3) and t.image.dtype == np.uint8
        assert t.inst_map.dtype == np.int32 and t.class_map.dtype == np.int32
        k = len(t.inst_classes)
        assert k > 20
        np.testing.assert_array_equal(np.unique(t.inst_map), np.arange(k + 1))
        assert ((t.class_map == 0) == (t.inst_map == 0)).all()
        for region in regionprops(t.inst_map):
            values = np.unique(t.class_map[t.inst_map == region.label])
            assert values.tolist() == [t.inst_classes[region.label - 1]]
            # one piece per nucleus: never split by a neighbour painted later
            assert ndi.label(region.image)[1] == 1
        # neighbouring pixels with two different nucleus ids = touching nuclei
        a, b = t.inst_map[:, :-1], t.inst_map[:, 1:]
        touching += int(((a > 0) & (b > 0) & (a != b)).sum())
    assert touching > 0


def test_all_classes_present_over_a_few_tiles(tiles: list) -> None:
    present = set(np.concatenate([t.inst_classes for t in tiles]).tolist())
    assert present == {1, 2, 3, 4, 5, 6}


def test_classes_differ_in_size_shape_and_darkness(tiles: list) -> None:
    stats: dict[int, list[tuple[float, float, float]]] = {c: [] for c in range(1, 7)}
    for t in tiles:
        grey = t.image.mean(axis=-1)
        for r in regionprops(t.inst_map):
            c = int(t.inst_classes[r.label - 1])
            stats[c].append((r.area, r.eccentricity, grey[t.inst_map == r.label].mean()))
    mean = {c: np.mean(v, axis=0) for c, v in stats.items()}
    epithelial, lymphocyte, connective = mean[2], mean[3], mean[6]
    assert epithelial[0] > 2 * lymphocyte[0]  # larger
    assert connective[1] > 0.85 > lymphocyte[1]  # elongated vs round
    assert lymphocyte[2] < epithelial[2] - 20  # darker


def test_stain_colours(tiles: list) -> None:
    t = tiles[0]
    nuc = t.image[t.inst_map > 0].astype(float).mean(axis=0)
    bg = t.image[t.inst_map == 0].astype(float).mean(axis=0)
    assert nuc.sum() < bg.sum() - 100  # nuclei darker
    assert nuc[2] > nuc[0]  # hematoxylin: blue-purple
    assert bg[0] > bg[1] + 40  # eosin: pink


def test_mpp_scales_nucleus_size() -> None:
    half = synthetic_tile(128, n_nuclei=12, seed=1, mpp=0.5)
    quarter = synthetic_tile(256, n_nuclei=12, seed=1, mpp=0.25)
    ratio = (np.bincount(quarter.inst_map.ravel())[1:].mean()) / (
        np.bincount(half.inst_map.ravel())[1:].mean()
    )
    assert 2.5 < ratio < 6


def test_dataset_in_conic_layout() -> None:
    images, labels = synthetic_dataset(3, size=64, seed=5)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (3, 64, 64, 2) and labels.dtype == np.int32
    assert labels[..., 1].max() <= 6 and (labels[..., 0] > 0).any()
    np.testing.assert_array_equal(labels[..., 1] > 0, labels[..., 0] > 0)
    again = synthetic_dataset(3, size=64, seed=5)[1]
    np.testing.assert_array_equal(labels, again)
    assert not np.array_equal(labels[0], labels[1])


def test_n_classes_and_bad_input() -> None:
    t = synthetic_tile(128, n_nuclei=30, n_classes=2, seed=0)
    assert set(t.inst_classes.tolist()) <= {1, 2}
    with pytest.raises(ConicQPError):
        synthetic_tile(64, class_probs=[1.0, 2.0])
    with pytest.raises(ConicQPError):
        synthetic_tile(4)


def test_slide_image_tissue_and_background() -> None:
    s = synthetic_slide_image(400, 600, seed=3, tissue_fraction=0.4)
    assert s.image.shape == (400, 600, 3)
    assert 0.3 < s.tissue_mask.mean() < 0.5
    glass = s.image[~ndi.binary_dilation(s.tissue_mask, iterations=5)]
    assert glass.mean() > 235
    assert s.image[s.tissue_mask].mean() < glass.mean() - 30
    centres = np.array([r.centroid for r in regionprops(s.inst_map)]).round().astype(int)
    near_tissue = ndi.binary_dilation(s.tissue_mask, iterations=3)
    assert near_tissue[centres[:, 0], centres[:, 1]].all()
    assert len(s.inst_classes) == s.inst_map.max() > 50


@pytest.mark.slow
def test_large_slide_has_slide_scale_nuclei() -> None:
    s = synthetic_slide_image(2000, 3000, seed=0)
    assert s.inst_map.max() > 1000
    assert len(np.unique(s.inst_map)) - 1 == s.inst_map.max()  # ids 1..K, none lost
