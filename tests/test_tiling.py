"""TileGrid geometry and the ownership rule that makes tiled output equal whole-image output."""

from __future__ import annotations

import numpy as np
import pytest

from conic_qp.errors import ConicQPError
from conic_qp.postprocess import Instances
from conic_qp.tiling import (
    Box,
    TileGrid,
    filter_owned,
    min_halo,
    owned_instances,
    reference_points,
)

GEOMETRIES = [
    # (H, W, tile_size, halo)
    (1, 1, 32, 0),
    (5, 300, 64, 8),
    (100, 100, 64, 8),
    (192, 193, 64, 16),
    (64, 64, 64, 0),
    (48, 200, 128, 60),  # core of 8 px, region smaller than a tile vertically
    (257, 255, 256, 16),
    (31, 1000, 96, 20),
]


def _random_geometries(n: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tile = 32 * int(rng.integers(1, 6))
        halo = int(rng.integers(0, tile // 2))
        out.append((int(rng.integers(1, 400)), int(rng.integers(1, 400)), tile, halo))
    return out


@pytest.mark.parametrize(("h", "w", "tile", "halo"), GEOMETRIES + _random_geometries(40))
def test_cores_partition_region_and_read_boxes_are_consistent(
    h: int, w: int, tile: int, halo: int
) -> None:
    grid = TileGrid((h, w), tile, halo)
    cover = np.zeros((h, w), dtype=np.int32)
    assert grid.n_tiles == grid.rows * grid.cols == len(list(grid.tiles()))
    for i, t in enumerate(grid.tiles()):
        assert t.index == i and (t.row, t.col) == divmod(i, grid.cols)
        cover[t.core.slices] += 1
        r, c, p = t.read, t.core, t.pad
        # read box inside the region and containing the core plus up to `halo` around it
        assert 0 <= r.y0 < r.y1 <= h and 0 <= r.x0 < r.x1 <= w
        assert r.y0 <= c.y0 and c.y1 <= r.y1 and r.x0 <= c.x0 and c.x1 <= r.x1
        assert r.y0 == max(0, c.y0 - halo) and r.x0 == max(0, c.x0 - halo)
        assert r.y1 >= min(h, c.y1 + halo) and r.x1 >= min(w, c.x1 + halo)
        # padding makes a full tile, and the core sits at (halo, halo) of the network input
        assert p.top + r.height + p.bottom == tile and p.left + r.width + p.right == tile
        assert min(p) >= 0
        assert p.top + (c.y0 - r.y0) == halo and p.left + (c.x0 - r.x0) == halo
        # padding only where the region border clipped the window
        assert (p.top > 0) == (r.y0 == 0 and c.y0 - halo < 0)
        assert (p.bottom > 0) <= (r.y1 == h)
        assert (p.right > 0) <= (r.x1 == w)
    np.testing.assert_array_equal(cover, 1)


@pytest.mark.parametrize(("h", "w", "tile", "halo"), GEOMETRIES[:5])
def test_owner_of_returns_the_core_containing_the_pixel(
    h: int, w: int, tile: int, halo: int
) -> None:
    grid = TileGrid((h, w), tile, halo)
    owners = np.full((h, w), -1)
    for t in grid.tiles():
        owners[t.core.slices] = t.index
    rng = np.random.default_rng(1)
    for y, x in zip(rng.integers(0, h, 50), rng.integers(0, w, 50), strict=True):
        assert grid.owner_of(int(y), int(x)).index == owners[y, x]
    with pytest.raises(ConicQPError):
        grid.owner_of(h, 0)


@pytest.mark.parametrize(
    ("shape", "tile", "halo", "match"),
    [
        ((100, 100), 48, 8, "multiple of 32"),
        ((100, 100), 0, 0, "multiple of 32"),
        ((100, 100), 64, -1, ">= 0"),
        ((100, 100), 64, 32, "twice the halo"),
        ((100, 100), 64, 40, "twice the halo"),
        ((0, 100), 64, 8, "empty region"),
    ],
)
def test_invalid_geometry_is_refused(
    shape: tuple[int, int], tile: int, halo: int, match: str
) -> None:
    with pytest.raises(ConicQPError, match=match):
        TileGrid(shape, tile, halo)


def test_min_halo_is_enforced_and_combines_size_and_context() -> None:
    assert min_halo(20, 12) == 32
    assert min_halo(19.2) == 20
    with pytest.raises(ConicQPError, match="seam-free"):
        TileGrid((100, 100), 128, 16, min_halo=min_halo(20, 12))
    assert TileGrid((100, 100), 128, 32, min_halo=32).halo == 32


def test_pad_input_and_crop_output_round_trip() -> None:
    grid = TileGrid((70, 50), 64, 12)
    rng = np.random.default_rng(0)
    region = rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)
    for t in grid.tiles():
        patch = region[t.read.slices]
        for mode in ("reflect", "constant"):
            x = t.pad_input(patch, mode=mode)
            assert x.shape == (64, 64, 3)
            # core at (halo, halo) of the network input
            core = region[t.core.slices]
            np.testing.assert_array_equal(x[12 : 12 + core.shape[0], 12 : 12 + core.shape[1]], core)
            out = np.moveaxis(x, -1, 0)  # a (C, size, size) network output
            np.testing.assert_array_equal(np.moveaxis(t.crop_output(out), 0, -1), patch)
        if t.pad.top:
            assert (t.pad_input(patch, mode="constant")[: t.pad.top] == 255).all()
    with pytest.raises(ConicQPError, match="read box"):
        grid.tile(0).pad_input(region)


def test_select_keeps_tiles_whose_read_box_touches_tissue_at_any_scale() -> None:
    grid = TileGrid((200, 300), 64, 16)  # cores 32 px
    tissue = np.zeros((200, 300), bool)
    tissue[150:160, 10:20] = True
    exact = grid.select(tissue)
    expected = {t.index for t in grid.tiles() if tissue[t.read.slices].any()}
    assert {t.index for t in exact.tiles()} == expected
    assert 0 < exact.n_tiles < grid.n_tiles
    # the same mask at 1/10 scale selects a superset (boxes are rounded outwards), never fewer
    coarse = tissue.reshape(20, 10, 30, 10).any(axis=(1, 3))
    assert expected <= {t.index for t in grid.select(coarse).tiles()}
    assert grid.select(np.zeros((20, 30), bool)).n_tiles == 0
    assert grid.select(np.ones((7, 11), bool)).n_tiles == grid.n_tiles
    # selection leaves geometry and ownership unchanged
    assert exact.owner_of(155, 15).index == grid.owner_of(155, 15).index


def test_reference_points_literal_and_shift_invariant() -> None:
    labels = np.array(
        [
            [0, 1, 1, 0],
            [0, 1, 1, 0],
            [2, 0, 0, 0],
            [2, 2, 0, 3],
        ]
    )
    ids, ys, xs = reference_points(labels)
    np.testing.assert_array_equal(ids, [1, 2, 3])
    # object 1: centroid (0.5, 1.5) -> (0, 1); object 2: (8/3, 1/3) -> (2, 0); object 3: (3, 3)
    np.testing.assert_array_equal(ys, [0, 2, 3])
    np.testing.assert_array_equal(xs, [1, 0, 3])
    shifted = np.zeros((11, 9), labels.dtype)
    shifted[7:, 5:] = labels
    ids2, ys2, xs2 = reference_points(shifted)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(ys2, ys + 7)
    np.testing.assert_array_equal(xs2, xs + 5)


def _disk_instances(shape: tuple[int, int], diameter: int, n: int, seed: int) -> np.ndarray:
    """Random overlapping disks of diameter <= ``diameter`` (later ones occlude earlier ones).

    Occlusion makes non-convex and even disconnected objects, the hard cases for ownership.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.indices(shape)
    for k in range(1, n + 1):
        d = int(rng.integers(3, diameter + 1))
        r = (d - 1) / 2
        cy, cx = rng.uniform(-r, shape[0] + r), rng.uniform(-r, shape[1] + r)
        cy, cx = np.floor(cy) + (d % 2 == 0) * 0.5, np.floor(cx) + (d % 2 == 0) * 0.5
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2 + 0.25] = k
    # renumber to the ids still present
    present = np.unique(labels)
    lut = np.zeros(n + 1, np.int32)
    lut[present] = np.arange(present.size)
    return lut[labels]


def _max_extent(labels: np.ndarray) -> int:
    from scipy import ndimage as ndi

    boxes = ndi.find_objects(labels)
    return max(max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in boxes if s)


def _tile_and_stitch(labels: np.ndarray, grid: TileGrid, naive: bool = False) -> tuple:
    """Cut ``labels`` into read boxes, keep owned objects, paste back; count each id's copies."""
    out = np.zeros_like(labels)
    copies = np.zeros(labels.max() + 1, np.int64)
    painted = np.zeros(labels.shape, np.int64)
    cut_owned = []
    for t in grid.tiles():
        sub = labels[t.read.slices]
        if naive:  # keep every object that has a pixel in the core
            core = sub[t.core_in_read.slices]
            keep = np.unique(core[core > 0])
            kept = np.where(np.isin(sub, keep), sub, 0)
        else:
            res = filter_owned(sub, t)
            kept, keep = res.labels, res.ids
            cut_owned.extend(res.cut_owned.tolist())
        copies[keep] += 1
        painted[t.read.slices] += kept > 0
        view = out[t.read.slices]
        view[kept > 0] = kept[kept > 0]
    return out, copies, painted, cut_owned


@pytest.mark.parametrize(
    ("shape", "tile", "diameter", "seed"),
    [
        ((150, 170), 64, 15, 0),
        ((97, 203), 96, 24, 1),
        ((200, 200), 128, 31, 2),
        ((40, 70), 32, 9, 3),
    ],
)
def test_tiled_ownership_reproduces_whole_image_instances_exactly(
    shape: tuple[int, int], tile: int, diameter: int, seed: int
) -> None:
    labels = _disk_instances(shape, diameter, n=shape[0] * shape[1] // 60, seed=seed)
    extent = _max_extent(labels)
    assert extent <= diameter
    for halo in (extent - 1, min_halo(diameter)):
        if tile <= 2 * halo:
            continue
        grid = TileGrid(shape, tile, halo)
        assert grid.n_tiles > 2
        out, copies, painted, cut_owned = _tile_and_stitch(labels, grid)
        ids = np.unique(labels)[1:]
        np.testing.assert_array_equal(copies[ids], 1)  # every instance exactly once
        assert painted.max() == 1  # no pixel written by two tiles
        np.testing.assert_array_equal(out, labels)  # same pixels, same instances
        assert cut_owned == []


def test_naive_stitching_duplicates_instances_so_the_test_is_sensitive() -> None:
    labels = _disk_instances((150, 170), 15, n=400, seed=0)
    grid = TileGrid((150, 170), 64, 15)
    _, copies, painted, _ = _tile_and_stitch(labels, grid, naive=True)
    assert copies.max() >= 2 and (copies >= 2).sum() > 10
    assert painted.max() >= 2


def test_too_small_halo_cuts_owned_instances_and_flags_them() -> None:
    labels = _disk_instances((150, 170), 25, n=300, seed=4)
    grid = TileGrid((150, 170), 64, 4)
    out, copies, _, cut_owned = _tile_and_stitch(labels, grid)
    assert not np.array_equal(out, labels)
    assert len(cut_owned) > 0
    # truncated copies disagree on their reference point: instances get lost or duplicated
    ids = np.unique(labels)[1:]
    assert (copies[ids] != 1).any()


def test_filter_owned_flags_objects_on_inner_edges_only() -> None:
    grid = TileGrid((96, 96), 64, 16)  # cores 32 px, 3x3 tiles
    t = grid.tile(0)  # top-left: top/left edges are region border, bottom/right are inner
    assert t.inner_edges == (False, True, False, True)
    labels = np.zeros(t.read.shape, np.int32)
    labels[0:3, 0:3] = 1  # on the region border: owned, not cut
    labels[t.read.height - 2 :, 10:13] = 2  # on the inner bottom edge, outside the core
    labels[20:23, 20:23] = 3  # in the core
    res = filter_owned(labels, t)
    np.testing.assert_array_equal(res.ids, [1, 3])
    np.testing.assert_array_equal(res.cut, [2])
    assert res.cut_owned.size == 0
    assert set(np.unique(res.labels)) == {0, 1, 3}
    with pytest.raises(ConicQPError, match="read box"):
        filter_owned(labels[:-1], t)


def test_owned_instances_keeps_classes_and_probs_in_step() -> None:
    grid = TileGrid((64, 128), 64, 16)
    t = grid.tile(1)  # core y 0..32, x 32..64; read x 16..80
    labels = np.zeros(t.read.shape, np.int32)
    labels[5:8, 0:3] = 1  # reference point left of the core: not owned
    labels[5:8, 20:23] = 2  # owned
    labels[20:24, 30:33] = 3  # owned
    inst = Instances(
        labels=labels,
        classes=np.array([4, 2, 6]),
        probs=np.eye(6, dtype=np.float32)[[3, 1, 5]],
    )
    owned, cut = owned_instances(inst, t)
    assert owned.n == 2 and cut.size == 0
    np.testing.assert_array_equal(owned.classes, [2, 6])
    np.testing.assert_array_equal(owned.probs.argmax(1) + 1, owned.classes)
    np.testing.assert_array_equal(owned.labels == 1, labels == 2)
    np.testing.assert_array_equal(owned.labels == 2, labels == 3)


def test_box_to_level0_maps_model_pixels_to_slide_pixels() -> None:
    box = Box(10, 20, 74, 84)
    assert box.shape == (64, 64)
    x, y, w, h = box.to_level0(origin=(1000.0, 500.0), scale=2.004)
    assert (x, y) == pytest.approx((1000 + 20 * 2.004, 500 + 10 * 2.004))
    assert (w, h) == pytest.approx((64 * 2.004, 64 * 2.004))
