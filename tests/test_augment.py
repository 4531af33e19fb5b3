"""Tests of conic_qp.train.augment: labels stay on their nuclei under every transform."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from conic_qp.errors import ConicQPError
from conic_qp.train.augment import (
    AugmentConfig,
    Augmenter,
    affine_matrix,
    apply_dihedral,
    colour_jitter_matrix,
    dihedral_matrix,
    elastic_field,
    hed_jitter,
    keep_largest_piece,
    warp,
)

BACKGROUND, NUCLEUS = 220, 60


def synthetic_tile(
    size: int = 96, n: int = 40, seed: int = 0, radius: tuple[float, float] = (3.0, 6.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bright tile with ``n`` dark, non-touching disks; returns image, inst, class map, lut."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    inst = np.zeros((size, size), dtype=np.int32)
    centres: list[tuple[float, float, float]] = []
    while len(centres) < n:
        r, c, rad = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(*radius)
        if all((r - r2) ** 2 + (c - c2) ** 2 > (rad + rad2 + 2) ** 2 for r2, c2, rad2 in centres):
            centres.append((r, c, rad))
            inst[(rows - r) ** 2 + (cols - c) ** 2 <= rad**2] = len(centres)
    image = np.where(inst[..., None] > 0, NUCLEUS, BACKGROUND).astype(np.float64)
    image = image + rng.normal(0, 3, (size, size, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    lut = np.r_[0, rng.integers(1, 7, n)].astype(np.int32)
    # one instance is whole-ignore (-1), as data sets may mark unlabelled nuclei
    lut[n] = -1
    return image, inst, lut[inst], lut


def only(**overrides: object) -> AugmentConfig:
    """Identity config with some steps switched on."""
    return dataclasses.replace(AugmentConfig.identity(), **overrides)  # type: ignore[arg-type]


GEOMETRIC = {
    "flip": only(flip_p=1.0),
    "rot90": only(rot90=True),
    "rotate": only(rotate_p=1.0, rotate_deg=45.0),
    "zoom": only(zoom_p=1.0, zoom=(0.8, 1.25)),
    "scale": only(scale_p=1.0, scale=0.15),
    "shear": only(shear_p=1.0, shear_deg=12.0),
    "translate": only(translate_p=1.0, translate=0.15),
    "elastic": only(elastic_p=1.0, elastic_alpha=3.0, elastic_sigma=20.0),
    "default": AugmentConfig(),
}


def components_per_instance(inst: np.ndarray) -> dict[int, int]:
    """Number of 4-connected components of every instance id."""
    out = {}
    for i, box in enumerate(ndi.find_objects(inst), start=1):
        if box is not None:
            out[i] = int(ndi.label(inst[box] == i)[1])
    return out


# ----------------------------------------------------------------------------------- colour


def test_hed_jitter_matches_skimage() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    same = hed_jitter(image, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(same, hed2rgb(rgb2hed(image)), atol=1e-5)
    scale, bias = np.array([1.2, 0.85, 1.0]), np.array([0.01, -0.008, 0.0])
    expected = np.clip(hed2rgb(rgb2hed(image) * scale + bias), 0, 1)
    got = hed_jitter(image, scale, bias)
    assert got.dtype == np.float32 and got.shape == image.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_colour_jitter_matrix_matches_torchvision_blends() -> None:
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    import torch

    rng = np.random.default_rng(2)
    rgb = rng.uniform(0.3, 0.7, (8, 9, 3)).astype(np.float32)  # mid-range: no clamping
    t = torch.from_numpy(rgb).permute(2, 0, 1)
    grey = float(np.mean(rgb @ np.array([0.299, 0.587, 0.114])))
    for b, c, s, tv in [
        (1.1, 1.0, 1.0, tvf.adjust_brightness(t, 1.1)),
        (1.0, 0.9, 1.0, tvf.adjust_contrast(t, 0.9)),
        (1.0, 1.0, 1.15, tvf.adjust_saturation(t, 1.15)),
    ]:
        m, offset = colour_jitter_matrix(b, c, s, 0.0, grey)
        np.testing.assert_allclose(rgb @ m.T + offset, tv.permute(1, 2, 0).numpy(), atol=2e-3)
    # hue rotates about the grey axis: luma and grey pixels stay, colours change
    m, offset = colour_jitter_matrix(1.0, 1.0, 1.0, 0.1, grey)
    out = rgb @ m.T + offset
    luma = np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out @ luma, rgb @ luma, atol=1e-5)
    np.testing.assert_allclose(np.full(3, 0.5) @ m.T + offset, np.full(3, 0.5), atol=1e-6)
    assert np.abs(out - rgb).max() > 0.01


def test_colour_only_changes_image_not_labels() -> None:
    image, inst, cls, _ = synthetic_tile(64, 12)
    strong = AugmentConfig(hed_p=1.0, jitter_p=1.0, blur_p=1.0, noise_p=1.0)
    aug = Augmenter(strong, seed=3, geometric=False)
    for _ in range(5):
        out, out_inst, out_cls = aug(image, inst, cls)
        assert out.dtype == np.uint8 and out.shape == image.shape and out.flags.c_contiguous
        assert np.abs(out.astype(int) - image).mean() > 1.0
        np.testing.assert_array_equal(out_inst, inst)
        np.testing.assert_array_equal(out_cls, cls)
        assert out_inst.dtype == np.int32 and out_cls is not None and out_cls.dtype == np.int32
        # nuclei stay darker than background after any colour change
        assert out[inst > 0].mean() + 40 < out[inst == 0].mean()


def test_colour_steps_alone_change_image() -> None:
    image, inst, cls, _ = synthetic_tile(48, 6)
    for overrides in (
        {"hed_p": 1.0, "hed_scale": 0.2, "hed_bias": 0.02},
        {"jitter_p": 1.0, "brightness": 0.3},
        {"blur_p": 1.0, "blur_sigma": (1.0, 1.5)},
        {"noise_p": 1.0, "noise_std": 0.05},
    ):
        aug = Augmenter(only(**overrides), seed=4)
        changes = []
        for _ in range(5):  # a single draw may land close to the identity
            out, _, _ = aug(image, inst, cls)
            assert out.shape == image.shape and out.dtype == np.uint8
            changes.append(np.abs(out.astype(int) - image).max())
        assert max(changes) >= 3, overrides


def test_zero_strength_or_switched_off_is_identity() -> None:
    image, inst, cls, _ = synthetic_tile(64, 10)
    for aug in (
        Augmenter(AugmentConfig.identity(), seed=5),
        Augmenter(seed=5, colour=False, geometric=False),
    ):
        out, out_inst, out_cls = aug(image, inst, cls)
        np.testing.assert_array_equal(out, image)
        np.testing.assert_array_equal(out_inst, inst)
        np.testing.assert_array_equal(out_cls, cls)
        assert out is not image and out_inst is not inst  # copies, callers may mutate


# --------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("flip_rows", [False, True])
@pytest.mark.parametrize("flip_cols", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_dihedral_matrix_path_equals_numpy(flip_rows: bool, flip_cols: bool, k: int) -> None:
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 9, (12, 12)).astype(np.int32)
    expected = np.rot90(
        np.flip(labels, tuple(a for a, f in ((0, flip_rows), (1, flip_cols)) if f)), k
    )
    np.testing.assert_array_equal(apply_dihedral(labels, flip_rows, flip_cols, k), expected)
    sampling = dihedral_matrix(flip_rows, flip_cols, k)
    out, (out_labels,), valid = warp(image, [labels], sampling, np.zeros(2))
    np.testing.assert_array_equal(out_labels, expected)
    np.testing.assert_allclose(out * 255, apply_dihedral(image, flip_rows, flip_cols, k), atol=0.01)
    assert valid.all()


def test_flip_and_rot90_alone_are_exact() -> None:
    image, inst, cls, _ = synthetic_tile(40, 5)
    out, out_inst, out_cls = Augmenter(only(flip_p=1.0), seed=7)(image, inst, cls)
    np.testing.assert_array_equal(out, np.flip(image, (0, 1)))
    np.testing.assert_array_equal(out_inst, np.flip(inst, (0, 1)))
    np.testing.assert_array_equal(out_cls, np.flip(cls, (0, 1)))
    aug = Augmenter(only(rot90=True), seed=8)
    seen = set()
    for _ in range(12):
        out, out_inst, out_cls = aug(image, inst, cls)
        k = next(k for k in range(4) if np.array_equal(out_inst, np.rot90(inst, k)))
        np.testing.assert_array_equal(out, np.rot90(image, k))
        np.testing.assert_array_equal(out_cls, np.rot90(cls, k))
        seen.add(k)
    assert len(seen) >= 3


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_labels_stay_on_nuclei(name: str) -> None:
    image, inst, cls, lut = synthetic_tile(96, 30, seed=9)
    aug = Augmenter(GEOMETRIC[name], seed=10, colour=False)
    for _ in range(4):
        out, out_inst, out_cls, valid = aug(image, inst, cls, return_valid=True)
        assert out.shape == image.shape and out_inst.shape == inst.shape
        assert out_cls is not None and out_cls.shape == cls.shape
        ids = np.unique(out_inst[out_inst > 0])
        assert ids.size > 5
        assert set(ids) <= set(np.unique(inst[inst > 0]))  # no new ids
        # every instance keeps its one class; background keeps class 0
        for i in ids:
            np.testing.assert_array_equal(np.unique(out_cls[out_inst == i]), [lut[i]])
        assert not out_cls[out_inst == 0].any()
        assert not out_inst[~valid].any()
        # image and labels moved together: labelled pixels are dark, unlabelled in-tile bright
        grey = out.mean(axis=2)
        mid = (BACKGROUND + NUCLEUS) / 2
        assert np.mean(grey[out_inst > 0] < mid) > 0.9
        assert np.mean(grey[(out_inst == 0) & valid] > mid) > 0.9
        assert grey[out_inst > 0].mean() < 100 and grey[(out_inst == 0) & valid].mean() > 180


@pytest.mark.parametrize("zoom", [0.8, 1.25])
def test_area_scales_with_zoom_squared(zoom: float) -> None:
    size = 96
    rows, cols = np.mgrid[:size, :size]
    inst = ((rows - 47.5) ** 2 + (cols - 47.5) ** 2 <= 15**2).astype(np.int32)
    image = np.where(inst[..., None] > 0, NUCLEUS, BACKGROUND).astype(np.uint8).repeat(3, 2)
    aug = Augmenter(only(zoom_p=1.0, zoom=(zoom, zoom), rotate_p=1.0, rotate_deg=30.0), seed=11)
    _, out_inst, _ = aug(image, inst, None)
    ratio = (out_inst == 1).sum() / (inst == 1).sum()
    assert ratio == pytest.approx(zoom**2, rel=0.04)


def test_no_instance_split_by_default_parameters() -> None:
    image, inst, cls, _ = synthetic_tile(128, 40, seed=12)
    assert set(components_per_instance(inst).values()) == {1}
    aug = Augmenter(seed=13, colour=False)
    strong_elastic = Augmenter(only(elastic_p=1.0, rotate_p=1.0, shear_p=1.0), seed=14)
    for a in (aug, strong_elastic):
        for _ in range(25):
            _, out_inst, _ = a(image, inst, cls)
            split = {i: n for i, n in components_per_instance(out_inst).items() if n > 1}
            assert not split


def test_raw_warp_only_detaches_slivers() -> None:
    """Without the clean-up, splits are discretisation slivers (<= 3 px), never folded halves."""
    image, inst, _, _ = synthetic_tile(128, 40, seed=24)
    rng = np.random.default_rng(25)
    for _ in range(20):
        field = elastic_field((128, 128), alpha=4.0, sigma=16.0, rng=rng)
        content = affine_matrix(rng.uniform(-45, 45), rng.uniform(0.8, 1.25), (1.0, 1.0), 10.0)
        inv = np.linalg.inv(content)
        _, (out_inst,), _ = warp(image, [inst], inv, np.zeros(2), field)
        for i, box in enumerate(ndi.find_objects(out_inst), start=1):
            if box is None:
                continue
            pieces, n = ndi.label(out_inst[box] == i)
            if n > 1:
                assert np.sort(np.bincount(pieces.ravel())[1:])[:-1].max() <= 3


def test_keep_largest_piece() -> None:
    inst = np.array(
        [
            [1, 1, 0, 2, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 3],
            [2, 2, 0, 0, 3],
        ],
        dtype=np.int32,
    )
    cls = np.where(inst > 0, inst + 10, 0)
    out_inst, out_cls = keep_largest_piece(inst, [cls])
    expected = inst.copy()
    expected[2, 2] = 0  # diagonal-only sliver of 1
    expected[0, 3] = 0  # smaller piece of 2
    np.testing.assert_array_equal(out_inst, expected)
    np.testing.assert_array_equal(out_cls, np.where(expected > 0, expected + 10, 0))
    same = np.array([[1, 1, 0], [0, 2, 2]], dtype=np.int32)
    assert keep_largest_piece(same, [])[0] is same


def test_elastic_field_is_smooth_and_bounded() -> None:
    from conic_qp.train.augment import _MAX_STRAIN

    rng = np.random.default_rng(15)
    field = elastic_field((80, 64), alpha=30.0, sigma=12.0, rng=rng)  # asks for too much
    assert field.shape == (2, 80, 64) and field.dtype == np.float32
    grads = [np.abs(np.diff(field, axis=a)).max() for a in (1, 2)]
    assert max(grads) <= _MAX_STRAIN + 1e-4
    mild = elastic_field((80, 64), alpha=2.0, sigma=20.0, rng=rng)
    assert np.sqrt(np.mean(mild**2)) == pytest.approx(2.0, rel=0.1)


def test_translation_cuts_nuclei_and_reports_valid() -> None:
    image, inst, cls, _ = synthetic_tile(64, 15, seed=16)
    aug = Augmenter(only(translate_p=1.0, translate=0.2), seed=17)
    out, out_inst, out_cls, valid = aug(image, inst, cls, return_valid=True)
    assert 0.6 < valid.mean() < 0.999
    assert not out_inst[~valid].any() and out_cls is not None and not out_cls[~valid].any()
    # reflect padding: the image outside the tile is content, not a constant fill
    assert out[~valid].std() > 10


def test_non_square_tiles_keep_shape() -> None:
    image, inst, cls, _ = synthetic_tile(64, 8)
    image, inst, cls = image[:, :40], inst[:, :40], cls[:, :40]
    aug = Augmenter(seed=18)
    for _ in range(8):
        out, out_inst, out_cls = aug(image, inst, cls)
        assert out.shape == image.shape and out_inst.shape == inst.shape
        assert out_cls is not None and out_cls.shape == cls.shape


# ------------------------------------------------------------------------- seeds and errors


def test_reproducible_per_seed_and_reseed() -> None:
    image, inst, cls, _ = synthetic_tile(64, 10)
    runs = []
    for seed in (19, 19, 20):
        aug = Augmenter(seed=seed)
        runs.append([aug(image, inst, cls) for _ in range(3)])
    for a, b in zip(runs[0], runs[1], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(a[0], c[0]) for a, c in zip(runs[0], runs[2], strict=True))
    workers = []
    for worker in (0, 1, 0):
        aug = Augmenter(seed=19)
        aug.reseed(worker)
        workers.append(aug(image, inst, cls)[0])
    np.testing.assert_array_equal(workers[0], workers[2])
    assert not np.array_equal(workers[0], workers[1])


def test_colour_switch_keeps_geometry_of_a_seed() -> None:
    image, inst, cls, _ = synthetic_tile(64, 10)
    with_colour, without = Augmenter(seed=26), Augmenter(seed=26, colour=False)
    for _ in range(4):
        a, b = with_colour(image, inst, cls), without(image, inst, cls)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])


def test_bad_input_raises_one_line_error() -> None:
    image, inst, cls, _ = synthetic_tile(32, 3)
    aug = Augmenter(seed=21)
    bad_calls = [
        (image.astype(np.float32), inst, cls),
        (image[..., :2], inst, cls),
        (image, inst[:-1], cls),
        (image, inst.astype(np.float32), cls),
        (image, inst, cls[:, :-1]),
    ]
    for args in bad_calls:
        with pytest.raises(ConicQPError) as err:
            aug(*args)
        assert "\n" not in str(err.value)
    for bad in ({"hed_p": 1.5}, {"zoom": (1.2, 0.9)}, {"rotate_deg": -1.0}, {"brightness": 1.0}):
        with pytest.raises(ConicQPError):
            AugmentConfig(**bad)


def test_recomputed_vectors_point_to_nuclei_on_image() -> None:
    targets = pytest.importorskip("conic_qp.targets")
    image, inst, cls, _ = synthetic_tile(96, 25, seed=22)
    aug = Augmenter(AugmentConfig(rotate_p=1.0, zoom_p=1.0, elastic_p=1.0), seed=23)
    out, out_inst, out_cls = aug(image, inst, cls)
    assert out_cls is not None
    t = targets.make_targets(out_inst, np.maximum(out_cls, 0))  # targets reject the -1 ignore
    rows, cols = np.nonzero(out_inst)
    tips_r = rows + t.vectors[0, rows, cols] * targets.VECTOR_SCALE
    tips_c = cols + t.vectors[1, rows, cols] * targets.VECTOR_SCALE
    grey = out.mean(axis=2)
    mid = (BACKGROUND + NUCLEUS) / 2
    # every vector points to its nucleus centroid, and that point is on a dark nucleus in the image
    for i in np.unique(out_inst[out_inst > 0]):
        sel = out_inst[rows, cols] == i
        if sel.sum() < 20 or (out_inst[0] == i).any() or (out_inst[-1] == i).any():
            continue  # skip slivers and nuclei cut by the border (centroid may be off-nucleus)
        assert np.ptp(tips_r[sel]) < 1e-3 and np.ptp(tips_c[sel]) < 1e-3
        r, c = round(float(tips_r[sel][0])), round(float(tips_c[sel][0]))
        assert out_inst[r, c] == i and grey[r, c] < mid
