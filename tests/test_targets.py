"""Tests of conic_qp.targets: 3-label, centre-vector and semantic training targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse

from conic_qp.errors import ConicQPError
from conic_qp.targets import (
    VECTOR_SCALE,
    Targets,
    center_vectors,
    make_targets,
    semantic_map,
    three_label_map,
)

# two nuclei touching along a vertical line (columns 2-3 | 4-6)
TWO = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.int32,
)


def touching_scene() -> np.ndarray:
    """64x64 map with touching disks/ellipses (same and different classes) and one lone disk."""
    inst = np.zeros((64, 64), dtype=np.int32)
    for k, (rr, cc) in enumerate(
        [
            disk((16, 14), 7, shape=inst.shape),
            disk((16, 27), 7, shape=inst.shape),
            ellipse(45, 18, 6, 9, shape=inst.shape),
            ellipse(45, 34, 8, 6, rotation=0.4, shape=inst.shape),
            disk((20, 50), 5, shape=inst.shape),
        ],
        start=1,
    ):
        inst[rr, cc] = k
    return inst


def test_three_label_literal_two_touching_nuclei() -> None:
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 2, 2, 2, 2, 2, 0],
            [0, 2, 1, 2, 2, 1, 2, 0],
            [0, 2, 1, 2, 2, 1, 2, 0],
            [0, 2, 2, 2, 2, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    out = three_label_map(TWO)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_three_label_interior_components_are_the_instances() -> None:
    inst = touching_scene()
    tl = three_label_map(inst)
    np.testing.assert_array_equal(tl > 0, inst > 0)  # inner boundary: foreground not inflated
    comps, n = ndi.label(tl == 1, structure=np.ones((3, 3)))  # even 8-connected
    assert n == inst.max()
    for k in range(1, n + 1):
        assert len(np.unique(inst[comps == k])) == 1


def test_three_label_image_border_is_not_a_boundary() -> None:
    inst = np.zeros((5, 5), dtype=np.uint16)
    inst[:3, :3] = 7  # nucleus cut by the top-left tile corner
    tl = three_label_map(inst)
    assert tl[0, 0] == 1 and tl[1, 1] == 1
    assert tl[2, 2] == 2 and tl[0, 2] == 2


def test_vectors_point_to_centroid() -> None:
    inst = touching_scene()
    vec = center_vectors(inst)
    assert vec.shape == (2, 64, 64) and vec.dtype == np.float32
    rows, cols = np.indices(inst.shape)
    for k in range(1, inst.max() + 1):
        m = inst == k
        cy, cx = rows[m].mean(), cols[m].mean()
        np.testing.assert_allclose(rows[m] + vec[0][m] * VECTOR_SCALE, cy, atol=1e-4)
        np.testing.assert_allclose(cols[m] + vec[1][m] * VECTOR_SCALE, cx, atol=1e-4)
    assert not vec[:, inst == 0].any()


def test_vectors_literal_and_huge_sparse_ids() -> None:
    inst = np.zeros((3, 4), dtype=np.int64)
    inst[1, 0:3] = 10**12  # ids far beyond the pixel count take the np.unique path
    vec = center_vectors(inst)
    np.testing.assert_allclose(vec[1, 1, 0:3] * VECTOR_SCALE, [1.0, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(vec[0, 1, 0:3], 0.0)
    assert not vec[:, 0].any() and not vec[:, 2].any()


def test_semantic_map_from_dict_lookup_and_class_map() -> None:
    by_dict = semantic_map(TWO, {1: 3, 2: 1})
    lut = np.array([0, 3, 1])
    by_lut = semantic_map(TWO, lut)
    expected = np.where(TWO == 1, 3, np.where(TWO == 2, 1, 0))
    np.testing.assert_array_equal(by_dict, expected)
    np.testing.assert_array_equal(by_lut, expected)
    assert by_dict.dtype == np.int64
    class_map = np.full(TWO.shape, 2)  # nonzero outside nuclei: forced to background
    np.testing.assert_array_equal(semantic_map(TWO, class_map), np.where(TWO > 0, 2, 0))


def test_semantic_map_errors() -> None:
    with pytest.raises(ConicQPError, match="no class"):
        semantic_map(TWO, {1: 3})
    with pytest.raises(ConicQPError, match="lookup has 2 entries"):
        semantic_map(TWO, np.array([0, 1]))
    with pytest.raises(ConicQPError, match=r"np\.r_"):
        semantic_map(TWO, np.array([[3], [1]]))  # CoNSeP inst_type column passed as-is
    with pytest.raises(ConicQPError, match="negative"):
        semantic_map(TWO, np.array([0, -1, 2]))


def test_make_targets_with_and_without_classes() -> None:
    t = make_targets(TWO, {1: 2, 2: 2})
    assert isinstance(t, Targets)
    assert t.three_label.shape == TWO.shape and t.vectors.shape == (2, *TWO.shape)
    assert t.semantic is not None and set(np.unique(t.semantic)) == {0, 2}
    assert make_targets(TWO).semantic is None
    with pytest.raises(ConicQPError, match="shape"):
        make_targets(TWO, np.zeros((4, 4), dtype=np.int64))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 3, 3), dtype=np.int32), "2-D"),
        (np.zeros((3, 3), dtype=np.float32), "dtype"),
        (np.zeros((3, 3), dtype=bool), "dtype"),
        (np.array([[0, -2], [1, 1]]), "negative"),
    ],
)
def test_invalid_instance_maps(bad: np.ndarray, message: str) -> None:
    for fn in (three_label_map, center_vectors, make_targets):
        with pytest.raises(ConicQPError, match=message):
            fn(bad)


@pytest.mark.shared_data
def test_consep_targets_are_consistent(shared_data: Path) -> None:
    from PIL import Image
    from scipy.io import loadmat

    for png in sorted((shared_data / "consep/inst_png/test").glob("*.png"))[:5]:
        inst = np.array(Image.open(png))
        inst_type = loadmat(shared_data / "consep/type_mat/test" / (png.stem + ".mat"))["inst_type"]
        t = make_targets(inst, np.r_[0, inst_type.ravel()])
        assert t.semantic is not None
        np.testing.assert_array_equal(t.three_label > 0, inst > 0)
        np.testing.assert_array_equal(t.semantic > 0, inst > 0)
        assert set(np.unique(t.semantic[inst > 0])) <= {1, 2, 3, 4}
        assert not t.vectors[:, inst == 0].any()
        # a vector never points further than the image diagonal
        assert np.abs(t.vectors).max() * VECTOR_SCALE < np.hypot(*inst.shape)
