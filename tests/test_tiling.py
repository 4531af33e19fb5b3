"""Tile layout, blending windows, block ownership and panels: the geometry of seam-free inference.

No network here: block ownership is checked on label maps of random overlapping disks (the hard
cases: non-convex and disconnected objects), and blending on per-tile copies of a known field.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from conic_qp.errors import ConicQPError
from conic_qp.plan import plan_region
from conic_qp.postprocess import Instances
from conic_qp.settings import PredictSettings
from conic_qp.tiling import (
    BlockGrid,
    Box,
    TileLayout,
    axis_origins,
    axis_weights,
    filter_owned,
    min_margin,
    owned_instances,
    reference_points,
)


def _random_layouts(n: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tile = 32 * int(rng.integers(1, 9))
        overlap = 32 * int(rng.integers(0, tile // 32))
        out.append((int(rng.integers(1, 700)), int(rng.integers(1, 700)), tile, overlap))
    return out


LAYOUTS = [
    (1, 1, 32, 0),
    (5, 300, 64, 32),
    (512, 512, 512, 128),
    (1536, 1536, 512, 128),
    (700, 1000, 256, 64),
    (97, 2000, 128, 96),
    *_random_layouts(30),
]


def test_axis_origins_literal() -> None:
    assert axis_origins(1536, 512, 384) == (0, 384, 768, 1024)
    assert axis_origins(1000, 512, 384) == (0, 384, 512)  # last flush with 1024 = ceil32(1000)
    assert axis_origins(300, 512, 384) == (0,)  # one tile of ceil32(300) = 320 px
    assert axis_origins(512, 512, 384) == (0,)


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), LAYOUTS)
def test_tiles_stay_on_the_32_px_grid_cover_the_region_and_pad_like_a_whole_image(
    h: int, w: int, tile: int, overlap: int
) -> None:
    layout = TileLayout((h, w), tile, overlap)
    th, tw = layout.tile_shape
    assert th == min(tile, -(-h // 32) * 32) and tw == min(tile, -(-w // 32) * 32)
    cover = np.zeros((h, w), np.int32)
    for t in layout.tiles():
        b, r = t.box, t.read
        assert b.y0 % 32 == 0 and b.x0 % 32 == 0 and b.shape == (th, tw)
        # a tile leaves the region only where a whole-image run is padded too (< 32 px)
        assert b.y1 <= -(-h // 32) * 32 and b.x1 <= -(-w // 32) * 32
        assert r == Box(b.y0, b.x0, min(b.y1, h), min(b.x1, w))
        cover[r.slices] += 1
    assert cover.min() >= 1
    # neighbouring tiles overlap by at least `overlap` (more for the last, flush one)
    for origins in (layout.ys, layout.xs):
        steps = np.diff(origins)
        assert (steps <= tile - overlap).all() and (steps > 0).all()


@pytest.mark.parametrize("window", ["gaussian", "constant", "crop"])
@pytest.mark.parametrize(("h", "w", "tile", "overlap"), LAYOUTS[:8])
def test_every_pixel_gets_positive_total_weight(
    h: int, w: int, tile: int, overlap: int, window: str
) -> None:
    layout = TileLayout((h, w), tile, overlap, window)  # type: ignore[arg-type]
    total = np.zeros((h, w))
    for t in layout.tiles():
        wt = layout.weights(t)
        assert wt.dtype == np.float32 and wt.shape == layout.tile_shape and wt.min() >= 0
        total[t.read.slices] += wt[: t.read.height, : t.read.width]
    assert total.min() > 0
    if window == "crop":  # a partition: every pixel from exactly one tile
        np.testing.assert_array_equal(total, 1.0)


def test_gaussian_window_is_zero_only_near_inner_edges() -> None:
    origins = axis_origins(1536, 512, 384)
    ws = axis_weights(origins, 512, "gaussian", 128)
    trim = 128 // 4
    first, middle, last = ws[0], ws[1], ws[-1]
    assert first[0] > 0 and (first[-trim:] == 0).all() and first[-trim - 1] > 0  # region border
    assert (middle[:trim] == 0).all() and (middle[-trim:] == 0).all() and middle[trim] > 0
    assert (last[:trim] == 0).all() and last[-1] > 0
    np.testing.assert_allclose(middle[trim:-trim], middle[trim:-trim][::-1])  # symmetric
    assert middle.max() == pytest.approx(1.0, abs=1e-4)
    # a single tile keeps its whole window
    assert (axis_weights((0,), 512, "gaussian", 128)[0] > 0).all()


def test_blending_copies_of_one_field_returns_it() -> None:
    """Window-weighted mean of tiles that agree is the field itself (float64 sums, as the engine)."""
    h, w = 301, 455
    rng = np.random.default_rng(0)
    field = rng.random((h, w)).astype(np.float32)
    for window in ("gaussian", "constant", "crop"):
        layout = TileLayout((h, w), 128, 64, window)  # type: ignore[arg-type]
        num, den = np.zeros((h, w)), np.zeros((h, w))
        for t in layout.tiles():
            wt = layout.weights(t)[: t.read.height, : t.read.width].astype(np.float64)
            num[t.read.slices] += wt * field[t.read.slices]
            den[t.read.slices] += wt
        np.testing.assert_array_equal((num / den).astype(np.float32), field)


def test_invalid_tiling_is_refused() -> None:
    for tile, overlap, match in [
        (100, 0, "multiple of 32"),
        (512, 100, "multiple of 32"),
        (512, 512, "smaller than the tile"),
        (512, -32, "multiple of 32"),
    ]:
        with pytest.raises(ConicQPError, match=match):
            TileLayout((100, 100), tile, overlap)
    with pytest.raises(ConicQPError, match="window"):
        TileLayout((100, 100), 128, 32, "hann")  # type: ignore[arg-type]
    with pytest.raises(ConicQPError, match="empty region"):
        TileLayout((0, 100), 128, 32)


# ----------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(("h", "w", "size", "margin"), [(1, 1, 32, 0), (100, 257, 64, 10),
                         (300, 200, 96, 40), (64, 64, 64, 100)])  # fmt: skip
def test_block_cores_partition_the_region_and_contexts_grow_by_the_margin(
    h: int, w: int, size: int, margin: int
) -> None:
    grid = BlockGrid.uniform((h, w), size, margin)
    cover = np.zeros((h, w), np.int32)
    for b in grid.blocks():
        cover[b.core.slices] += 1
        c, x = b.core, b.context
        assert x == Box(max(c.y0 - margin, 0), max(c.x0 - margin, 0),
                        min(c.y1 + margin, h), min(c.x1 + margin, w))  # fmt: skip
        assert grid.owner_of(c.y0, c.x0) == b and grid.owner_of(c.y1 - 1, c.x1 - 1) == b
    np.testing.assert_array_equal(cover, 1)
    with pytest.raises(ConicQPError):
        grid.owner_of(h, 0)
    with pytest.raises(ValueError, match="increase"):
        BlockGrid((h, w), [0, h], [0, w // 2, w // 2, w] if w > 1 else [0, 0, w], margin)


def test_reference_points_literal_and_shift_invariant() -> None:
    labels = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [2, 0, 0, 0], [2, 2, 0, 3]])
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
    present = np.unique(labels)
    lut = np.zeros(n + 1, np.int32)
    lut[present] = np.arange(present.size)
    return lut[labels]


def _max_extent(labels: np.ndarray) -> int:
    from scipy import ndimage as ndi

    boxes = ndi.find_objects(labels)
    return max(max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in boxes if s)


def _stitch(labels: np.ndarray, grid: BlockGrid, naive: bool = False) -> tuple:
    """Cut ``labels`` into block contexts, keep owned objects, paste back; count each id's copies."""
    out = np.zeros_like(labels)
    copies = np.zeros(labels.max() + 1, np.int64)
    painted = np.zeros(labels.shape, np.int64)
    cut_owned: list[int] = []
    for b in grid.blocks():
        sub = labels[b.context.slices]
        if naive:  # keep every object that has a pixel in the core
            core = sub[b.core_in_context.slices]
            keep = np.unique(core[core > 0])
            kept = np.where(np.isin(sub, keep), sub, 0)
        else:
            res = filter_owned(sub, b)
            kept, keep = res.labels, res.ids
            cut_owned.extend(res.cut_owned.tolist())
        copies[keep] += 1
        painted[b.context.slices] += kept > 0
        view = out[b.context.slices]
        view[kept > 0] = kept[kept > 0]
    return out, copies, painted, cut_owned


def check_stitched(
    labels: np.ndarray, out: np.ndarray, copies: np.ndarray, painted: np.ndarray
) -> None:
    """The seam-free contract: every instance exactly once, whole, no pixel written twice."""
    ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(copies[ids], 1)
    assert painted.max() <= 1
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(
    ("shape", "size", "diameter", "seed"),
    [
        ((150, 170), 40, 15, 0),
        ((97, 203), 64, 24, 1),
        ((200, 200), 70, 31, 2),
        ((40, 70), 16, 9, 3),
    ],
)
def test_block_ownership_reproduces_whole_image_instances_exactly(
    shape: tuple[int, int], size: int, diameter: int, seed: int
) -> None:
    labels = _disk_instances(shape, diameter, n=shape[0] * shape[1] // 60, seed=seed)
    extent = _max_extent(labels)
    assert extent <= diameter
    for margin in (extent - 1, min_margin(diameter)):
        grid = BlockGrid.uniform(shape, size, margin)
        assert len(grid) > 2
        out, copies, painted, cut_owned = _stitch(labels, grid)
        check_stitched(labels, out, copies, painted)
        assert cut_owned == []


def test_ownership_on_irregular_block_edges_as_panels_make_them() -> None:
    labels = _disk_instances((180, 260), 21, n=700, seed=5)
    grid = BlockGrid((180, 260), [0, 50, 51, 130, 180], [0, 37, 100, 101, 190, 260], 21)
    check_stitched(labels, *_stitch(labels, grid)[:3])


def test_the_check_fails_on_a_duplicated_or_a_cut_nucleus() -> None:
    """The contract check above is sensitive: it catches a duplicate and a truncated nucleus."""
    labels = _disk_instances((150, 170), 15, n=400, seed=0)
    grid = BlockGrid.uniform((150, 170), 40, 15)
    out, copies, painted, _ = _stitch(labels, grid)
    check_stitched(labels, out, copies, painted)
    dup = copies.copy()
    dup[int(np.unique(labels)[5])] += 1  # one nucleus written by two blocks
    with pytest.raises(AssertionError):
        check_stitched(labels, out, dup, painted)
    # naive stitching (keep what touches the core) duplicates nuclei on core boundaries
    with pytest.raises(AssertionError):
        check_stitched(labels, *_stitch(labels, grid, naive=True)[:3])
    # a margin below the nucleus size cuts nuclei: flagged, and the check fails
    big = _disk_instances((150, 170), 25, n=300, seed=4)
    out, copies, painted, cut_owned = _stitch(big, BlockGrid.uniform((150, 170), 40, 4))
    assert len(cut_owned) > 0
    with pytest.raises(AssertionError):
        check_stitched(big, out, copies, painted)


def test_filter_owned_flags_objects_on_inner_edges_only() -> None:
    grid = BlockGrid.uniform((96, 96), 32, 16)  # 3 x 3 blocks
    b = grid.block(0)  # top-left: top/left context edges are region border
    assert b.inner_edges == (False, True, False, True)
    labels = np.zeros(b.context.shape, np.int32)
    labels[0:3, 0:3] = 1  # on the region border: owned, not cut
    labels[b.context.height - 2 :, 10:13] = 2  # on the inner bottom edge, outside the core
    labels[20:23, 20:23] = 3  # in the core
    res = filter_owned(labels, b)
    np.testing.assert_array_equal(res.ids, [1, 3])
    np.testing.assert_array_equal(res.cut, [2])
    assert res.cut_owned.size == 0
    with pytest.raises(ConicQPError, match="context"):
        filter_owned(labels[:-1], b)


def test_owned_instances_keeps_classes_and_probs_in_step() -> None:
    grid = BlockGrid.uniform((64, 128), 32, 16)
    b = grid.block(1)  # core y 0..32, x 32..64; context x 16..80
    labels = np.zeros(b.context.shape, np.int32)
    labels[5:8, 0:3] = 1  # reference point left of the core: not owned
    labels[5:8, 20:23] = 2  # owned
    labels[20:24, 30:33] = 3  # owned
    inst = Instances(labels=labels, classes=np.array([4, 2, 6]),
                     probs=np.eye(6, dtype=np.float32)[[3, 1, 5]])  # fmt: skip
    owned, cut = owned_instances(inst, b)
    assert owned.n == 2 and cut.size == 0
    np.testing.assert_array_equal(owned.classes, [2, 6])
    np.testing.assert_array_equal(owned.labels == 1, labels == 2)
    np.testing.assert_array_equal(owned.labels == 2, labels == 3)


# ----------------------------------------------------------------------------------- panels


@pytest.mark.parametrize(("w", "tile", "overlap", "panel", "window"), [
    (1000, 128, 64, 128, "gaussian"), (1000, 128, 32, 256, "crop"), (2500, 512, 128, 1024, "gaussian"),
    (700, 256, 192, 256, "constant"), (300, 128, 64, 4096, "gaussian")])  # fmt: skip
def test_panels_hand_over_exactly_the_columns_both_sides_need(
    w: int, tile: int, overlap: int, panel: int, window: str
) -> None:
    s = PredictSettings(tile_size=tile, overlap=overlap, window=window, panel_width=panel,  # type: ignore[arg-type]
                        block_size=100, block_margin=24)  # fmt: skip
    plan = plan_region((150, w), s)
    layout, grid, m = plan.tiles, plan.blocks, s.block_margin
    # tile columns and block columns are partitioned by the panels, in order
    starts = [p.tile_cols[0] for p in plan.panels]
    assert [p.tile_cols for p in plan.panels] == list(
        zip(starts, [*starts[1:], layout.cols], strict=True)
    )
    assert plan.panels[0].tile_cols[0] == 0 and plan.panels[-1].block_cols[1] == grid.cols
    assert all(b.block_cols[0] == a.block_cols[1] for a, b in pairwise(plan.panels))
    assert all(0 < b - a <= s.block_size for a, b in pairwise(grid.x_edges))
    if w > 2 * panel:
        assert len(plan.panels) > 1
    reach = np.zeros((len(plan.panels), w), bool)  # columns a panel's tiles weigh in
    for p in plan.panels:
        for j in range(*p.tile_cols):
            nz = np.flatnonzero(layout.axis_window(1, j))
            x0 = layout.xs[j]
            reach[p.index, x0 + nz[0] : min(x0 + nz[-1] + 1, w)] = True
    for p in plan.panels:
        x0, x1 = p.columns
        ctx0 = grid.block_at(0, p.block_cols[0]).context.x0
        ctx1 = grid.block_at(0, p.block_cols[1] - 1).context.x1
        assert x0 <= ctx0 and ctx1 <= x1  # the band holds every context of the panel's blocks
        later = reach[p.index + 1 :].any(axis=0)
        # what the blocks read is final: no later panel's tile weighs in there
        assert not later[ctx0:ctx1].any()
        if p.index + 1 < len(plan.panels):
            nxt = plan.panels[p.index + 1]
            assert nxt.zone_in == p.zone_out and nxt.carry_in == p.carry_out
            # the zone covers the next panel's block contexts left of its own tiles ...
            zx0, zx1 = p.zone_out
            nctx0 = grid.block_at(0, nxt.block_cols[0]).context.x0
            first_own = int(np.flatnonzero(reach[nxt.index])[0])
            assert zx0 <= nctx0 and zx1 == first_own
            # ... and the carried partial sums are exactly where both panels' tiles weigh in
            both = np.flatnonzero(reach[p.index] & reach[nxt.index])
            if p.carry_out is None:
                assert both.size == 0
            else:
                assert (both.min(), both.max() + 1) == p.carry_out
        assert p.zone_out is None or p.zone_out[1] - p.zone_out[0] == min(2 * m, p.zone_out[1])
