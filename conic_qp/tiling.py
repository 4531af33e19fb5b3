"""Geometry of whole-slide inference: network tiles, their blending windows, post-processing blocks.

A region (the slide, an annotation's bounding box...) resampled to the model's um/px is an
(H, W) pixel grid. Two independent grids cover it:

* **Network tiles** (:class:`TileLayout`): windows of ``tile_size`` px placed every
  ``tile_size - overlap`` px from the region's top-left corner, the last one flush with the
  region rounded up to a multiple of 32. Every origin is a multiple of 32, so a tile sees the
  same encoder stride alignment as a whole-image run, and a tile that leaves the region is padded
  exactly as the whole image is (reflect, to a multiple of 32). A region smaller than a tile is
  one tile of its own (rounded-up) size. Overlapping tile outputs are blended with a smooth
  window (:func:`axis_weights`, as nnU-Net and MONAI's sliding-window inference do): each pixel's
  probability is the window-weighted mean over the tiles covering it.
* **Post-processing blocks** (:class:`BlockGrid`): cores that partition the region exactly, each
  post-processed on its core grown by ``margin`` px (its *context*). Ownership rule: an object
  found in a block is kept iff its reference point lies in the block's core. The reference point
  is the floor of the centroid computed in integer arithmetic (``sum // count``): deterministic
  (two blocks seeing the same pixels agree exactly on who owns an object lying on a core boundary)
  and stable (one pixel more or less at an edge moves it by ~1/area). It lies within the object's
  bounding box, so along each axis every pixel of the object is at most ``extent - 1`` pixels
  from it. Hence, if ``margin >= extent - 1`` for every nucleus and both blocks see the same
  blended probabilities, an owned nucleus lies entirely inside its block's context and every
  nucleus is reported exactly once, with the pixels it has in a whole-region post-processing.
  Objects touching an inner edge of a context are flagged by :func:`filter_owned`; an owned one
  means the margin is too small.

Blocks are independent of tiles: block outputs equal whole-image post-processing of the blended
map, and the blended map equals the whole-image network output up to the network's edge effects,
which the window suppresses (see ``docs/inference.md`` for the measurements).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal, NamedTuple

import numpy as np

from conic_qp.errors import ConicQPError
from conic_qp.postprocess import Instances

log = logging.getLogger(__name__)

__all__ = [
    "SIZE_MULTIPLE",
    "WINDOWS",
    "Block",
    "BlockGrid",
    "Box",
    "OwnedObjects",
    "Tile",
    "TileLayout",
    "Window",
    "axis_origins",
    "axis_weights",
    "filter_owned",
    "min_margin",
    "owned_instances",
    "reference_points",
]

#: Network inputs (and tile origins) are multiples of this (five stride-2 encoder stages).
SIZE_MULTIPLE = 32

Window = Literal["gaussian", "constant", "crop"]
#: Blending windows: ``gaussian`` (nnU-Net: sigma = tile / 8), ``constant`` (plain mean of the
#: overlapping tiles) and ``crop`` (no blending: each pixel from the tile whose centre is nearest).
WINDOWS: tuple[str, ...] = ("gaussian", "constant", "crop")


def _ceil_to(n: int, m: int) -> int:
    return -(-int(n) // m) * m


@dataclass(frozen=True)
class Box:
    """Half-open pixel box ``[y0, y1) x [x0, x1)`` (rows, columns)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """Index an (H, W, ...) array of the region with this box."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def is_empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0

    def contains(self, y: int, x: int) -> bool:
        return self.y0 <= y < self.y1 and self.x0 <= x < self.x1

    def intersect(self, other: Box) -> Box:
        """The overlap of two boxes (may be empty: check :attr:`is_empty`)."""
        return Box(
            max(self.y0, other.y0),
            max(self.x0, other.x0),
            min(self.y1, other.y1),
            min(self.x1, other.x1),
        )

    def relative_to(self, other: Box) -> Box:
        """This box in the coordinates of ``other``'s top-left corner."""
        return Box(self.y0 - other.y0, self.x0 - other.x0, self.y1 - other.y0, self.x1 - other.x0)

    def to_level0(
        self, origin: tuple[float, float], scale: float
    ) -> tuple[float, float, float, float]:
        """Level-0 ``(x, y, w, h)`` of this box, for :meth:`conic_qp.slides.SlideSource.read`.

        ``origin`` is the region's level-0 ``(x, y)``; ``scale`` is level-0 pixels per region
        pixel (model um/px divided by the slide's level-0 um/px). Read with
        ``size=(box.width, box.height)`` to get exactly this box's shape.
        """
        ox, oy = origin
        return (ox + self.x0 * scale, oy + self.y0 * scale, self.width * scale, self.height * scale)


# ------------------------------------------------------------------------------ network tiles


def axis_origins(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Tile starts along one axis: every ``stride`` px, the last flush with ``length`` rounded up
    to a multiple of 32 (so every start is a multiple of 32 when ``tile`` and ``stride`` are)."""
    end = _ceil_to(length, SIZE_MULTIPLE)
    size = min(tile, end)
    if end <= size:
        return (0,)
    starts = list(range(0, end - size + 1, stride))
    if starts[-1] != end - size:
        starts.append(end - size)
    return tuple(starts)


def axis_weights(
    origins: Sequence[int], tile: int, window: Window, overlap: int
) -> list[np.ndarray]:
    """1-D blending weights (float64, ``tile`` long) of the tiles at ``origins`` along one axis.

    A tile's 2-D window is the outer product of its row and column weights. ``gaussian`` and
    ``constant`` weights are zero within ``overlap // 4`` px of an *inner* tile edge (one inside
    the region): the network's output is least like the whole-image one there, and a
    neighbouring tile always covers those pixels well inside itself. At the region border the
    weights stay positive, since a whole-image run has the same border. ``crop`` keeps each pixel
    from the single tile whose centre is nearest (ties to the later tile).
    """
    if window not in WINDOWS:
        raise ConicQPError(f"window {window!r} must be one of {', '.join(WINDOWS)}")
    n = len(origins)
    end = origins[-1] + tile
    u = np.arange(tile, dtype=np.float64)
    out: list[np.ndarray] = []
    if window == "crop":
        centres = [o + tile / 2 for o in origins]
        for i, o in enumerate(origins):
            lo = -math.inf if i == 0 else (centres[i - 1] + centres[i]) / 2
            hi = math.inf if i == n - 1 else (centres[i] + centres[i + 1]) / 2
            pos = o + u + 0.5
            out.append(((pos >= lo) & (pos < hi)).astype(np.float64))
        return out
    if window == "gaussian":
        sigma = tile / 8.0
        base = np.exp(-((u - (tile - 1) / 2) ** 2) / (2 * sigma**2))
        base /= base.max()
    else:
        base = np.ones(tile, dtype=np.float64)
    trim = overlap // 4
    for o in origins:
        w = base.copy()
        if trim and n > 1:
            if o > 0:
                w[:trim] = 0.0
            if o + tile < end:
                w[tile - trim :] = 0.0
        out.append(w)
    return out


@dataclass(frozen=True)
class Tile:
    """One network tile: its window in the region (may leave it) and the part inside it."""

    index: int
    row: int
    col: int
    box: Box
    """The network input window in region px (leaves the region by less than 32 px)."""
    read: Box
    """``box`` clipped to the region: the pixels read from the slide."""

    @property
    def pad(self) -> tuple[int, int]:
        """(bottom, right) px added by reflection to make the network input."""
        return self.box.y1 - self.read.y1, self.box.x1 - self.read.x1

    def pad_input(self, image: np.ndarray) -> np.ndarray:
        """Reflect-pad the read pixels (h, w[, C]) to the network input, as a whole image is."""
        if image.shape[:2] != self.read.shape:
            raise ConicQPError(
                f"tile {self.index}: image is {image.shape[:2]}, expected the read box "
                f"{self.read.shape}"
            )
        bottom, right = self.pad
        if not (bottom or right):
            return image
        widths = [(0, bottom), (0, right)] + [(0, 0)] * (image.ndim - 2)
        return np.pad(image, widths, mode="reflect")


class TileLayout:
    """Overlapping network tiles over an (H, W) region, with their blending windows.

    Parameters
    ----------
    shape : (H, W) of the region at the model's um/px.
    tile_size : network input edge (a multiple of 32); a smaller region gets one tile of its own
        size rounded up to 32 (rectangular then).
    overlap : px shared by neighbouring tiles (a multiple of 32, below ``tile_size``).
    window : blending window, see :func:`axis_weights`.
    """

    def __init__(
        self, shape: tuple[int, int], tile_size: int, overlap: int, window: Window = "gaussian"
    ) -> None:
        h, w = (int(v) for v in shape)
        if h < 1 or w < 1:
            raise ConicQPError(f"cannot tile an empty region of shape {tuple(shape)}")
        check_tiling(tile_size, overlap, window)
        self.shape: tuple[int, int] = (h, w)
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.stride = self.tile_size - self.overlap
        self.window: Window = window
        self.tile_shape: tuple[int, int] = (
            min(self.tile_size, _ceil_to(h, SIZE_MULTIPLE)),
            min(self.tile_size, _ceil_to(w, SIZE_MULTIPLE)),
        )
        self.ys = axis_origins(h, self.tile_size, self.stride)
        self.xs = axis_origins(w, self.tile_size, self.stride)
        self.rows, self.cols = len(self.ys), len(self.xs)
        self._wy = [
            v.astype(np.float32)
            for v in axis_weights(self.ys, self.tile_shape[0], window, self.overlap)
        ]
        self._wx = [
            v.astype(np.float32)
            for v in axis_weights(self.xs, self.tile_shape[1], window, self.overlap)
        ]

    def __repr__(self) -> str:
        return (
            f"TileLayout(shape={self.shape}, tile={self.tile_shape}, overlap={self.overlap}, "
            f"window={self.window!r}, grid={self.rows}x{self.cols})"
        )

    def __len__(self) -> int:
        return self.rows * self.cols

    def tile(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise ConicQPError(f"tile index {index} outside the {self.rows}x{self.cols} grid")
        row, col = divmod(index, self.cols)
        y0, x0 = self.ys[row], self.xs[col]
        th, tw = self.tile_shape
        box = Box(y0, x0, y0 + th, x0 + tw)
        h, w = self.shape
        return Tile(index, row, col, box, Box(y0, x0, min(y0 + th, h), min(x0 + tw, w)))

    def tiles(self) -> Iterator[Tile]:
        for index in range(len(self)):
            yield self.tile(index)

    def weights(self, tile: Tile) -> np.ndarray:
        """(th, tw) float32 blending window of ``tile``."""
        return np.outer(self._wy[tile.row], self._wx[tile.col])

    def axis_window(self, axis: int, i: int) -> np.ndarray:
        """1-D window of row ``i`` (axis 0) or column ``i`` (axis 1)."""
        return (self._wy if axis == 0 else self._wx)[i]

    def cols_touching(self, x0: int, x1: int) -> list[int]:
        """Tile columns whose window overlaps columns ``[x0, x1)`` with a nonzero weight."""
        return _touching(self.xs, self._wx, x0, x1)

    def rows_touching(self, y0: int, y1: int) -> list[int]:
        return _touching(self.ys, self._wy, y0, y1)

    @property
    def pixels_per_region_pixel(self) -> float:
        """Network input pixels per region pixel when every tile runs (the tiling's cost)."""
        th, tw = self.tile_shape
        return len(self) * th * tw / (self.shape[0] * self.shape[1])


def _touching(origins: Sequence[int], weights: Sequence[np.ndarray], a: int, b: int) -> list[int]:
    out = []
    for i, (o, w) in enumerate(zip(origins, weights, strict=True)):
        lo, hi = max(a - o, 0), min(b - o, w.size)
        if lo < hi and w[lo:hi].any():
            out.append(i)
    return out


def check_tiling(tile_size: int, overlap: int, window: str) -> None:
    """Raise a one-line ConicQPError for an unusable tile size / overlap / window."""
    if tile_size < SIZE_MULTIPLE or tile_size % SIZE_MULTIPLE:
        raise ConicQPError(
            f"tile size {tile_size} must be a positive multiple of {SIZE_MULTIPLE} "
            "(the network downsamples 5 times); e.g. 256, 512 or 1024"
        )
    if overlap < 0 or overlap % SIZE_MULTIPLE:
        raise ConicQPError(
            f"tile overlap {overlap} must be a multiple of {SIZE_MULTIPLE} px >= 0 (tiles stay "
            "on the encoder's 32 px grid); e.g. 128"
        )
    if overlap >= tile_size:
        raise ConicQPError(
            f"tile overlap {overlap} must be smaller than the tile size {tile_size}; e.g. a "
            "quarter of it"
        )
    if window not in WINDOWS:
        raise ConicQPError(f"blending window {window!r} must be one of {', '.join(WINDOWS)}")


# ------------------------------------------------------------------------- post-processing blocks


def min_margin(max_nucleus_extent_px: float) -> int:
    """Smallest block margin (px) for which every nucleus is reported once and whole.

    The ownership rule needs ``extent - 1`` px; this rounds up: ``ceil(extent)``.
    """
    if max_nucleus_extent_px < 0:
        raise ConicQPError("nucleus extent must be >= 0 px")
    return math.ceil(max_nucleus_extent_px)


@dataclass(frozen=True)
class Block:
    """One post-processing block: the core it owns and the context it is processed on."""

    index: int
    row: int
    col: int
    core: Box
    context: Box
    region_shape: tuple[int, int] = field(repr=False)

    @property
    def core_in_context(self) -> Box:
        return self.core.relative_to(self.context)

    @property
    def inner_edges(self) -> tuple[bool, bool, bool, bool]:
        """(top, bottom, left, right): True where the context edge is inside the region.

        Objects touching such an edge may continue outside the context (truncated); at the
        region border they are truncated in a whole-region run too.
        """
        h, w = self.region_shape
        c = self.context
        return c.y0 > 0, c.y1 < h, c.x0 > 0, c.x1 < w


class BlockGrid:
    """Block cores partitioning an (H, W) region between given edges, with a context margin.

    Parameters
    ----------
    shape : (H, W) of the region.
    y_edges, x_edges : increasing core boundaries along each axis, from 0 to H (resp. W).
    margin : px by which every core grows (clipped to the region) to make its context.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        y_edges: Sequence[int],
        x_edges: Sequence[int],
        margin: int,
    ) -> None:
        h, w = (int(v) for v in shape)
        if h < 1 or w < 1:
            raise ConicQPError(f"cannot split an empty region of shape {tuple(shape)}")
        if margin < 0:
            raise ConicQPError(f"block margin {margin} must be >= 0 px")
        for edges, n, what in ((y_edges, h, "y"), (x_edges, w, "x")):
            e = list(edges)
            if len(e) < 2 or e[0] != 0 or e[-1] != n or any(b <= a for a, b in pairwise(e)):
                raise ValueError(f"{what} block edges {e} must increase from 0 to {n}")
        self.shape: tuple[int, int] = (h, w)
        self.y_edges = tuple(int(v) for v in y_edges)
        self.x_edges = tuple(int(v) for v in x_edges)
        self.margin = int(margin)
        self.rows, self.cols = len(self.y_edges) - 1, len(self.x_edges) - 1

    @classmethod
    def uniform(cls, shape: tuple[int, int], block_size: int, margin: int) -> BlockGrid:
        """Cores of ``block_size`` px (the last ones smaller)."""
        if block_size < 1:
            raise ConicQPError(f"block size {block_size} must be >= 1 px")
        h, w = (int(v) for v in shape)
        ys = [*range(0, h, block_size), h]
        xs = [*range(0, w, block_size), w]
        return cls((h, w), ys, xs, margin)

    def __repr__(self) -> str:
        return f"BlockGrid(shape={self.shape}, grid={self.rows}x{self.cols}, margin={self.margin})"

    def __len__(self) -> int:
        return self.rows * self.cols

    def block(self, index: int) -> Block:
        if not 0 <= index < len(self):
            raise ConicQPError(f"block index {index} outside the {self.rows}x{self.cols} grid")
        row, col = divmod(index, self.cols)
        return self.block_at(row, col)

    def block_at(self, row: int, col: int) -> Block:
        h, w = self.shape
        m = self.margin
        core = Box(
            self.y_edges[row], self.x_edges[col], self.y_edges[row + 1], self.x_edges[col + 1]
        )
        context = Box(
            max(core.y0 - m, 0), max(core.x0 - m, 0), min(core.y1 + m, h), min(core.x1 + m, w)
        )
        return Block(row * self.cols + col, row, col, core, context, self.shape)

    def blocks(self) -> Iterator[Block]:
        for index in range(len(self)):
            yield self.block(index)

    def __iter__(self) -> Iterator[Block]:
        return self.blocks()

    def owner_of(self, y: int, x: int) -> Block:
        """The block whose core contains region pixel (y, x)."""
        h, w = self.shape
        if not (0 <= y < h and 0 <= x < w):
            raise ConicQPError(f"pixel ({y}, {x}) is outside the region {self.shape}")
        row = int(np.searchsorted(self.y_edges, y, side="right")) - 1
        col = int(np.searchsorted(self.x_edges, x, side="right")) - 1
        return self.block_at(row, col)


class OwnedObjects(NamedTuple):
    """Result of :func:`filter_owned` (context coordinates, original label values)."""

    labels: np.ndarray
    """(h, w) labels of the context with non-owned objects set to 0."""
    ids: np.ndarray
    """Sorted ids of the owned objects."""
    cut: np.ndarray
    """Ids (owned or not) touching an inner edge of the context: possibly truncated."""
    cut_owned: np.ndarray
    """Owned ids among ``cut``: non-empty means the margin is too small for these objects."""


def reference_points(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ownership reference point of every object: ``(ids, y, x)``, floor of the centroid.

    Integer arithmetic only (``sum // count``), so the point is identical whether it is computed
    in a block or in the whole region (shifting coordinates by an integer shifts it exactly).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ConicQPError(f"labels must be a 2-D instance map, got shape {lab.shape}")
    if lab.size and lab.min() < 0:
        raise ConicQPError("labels must be non-negative instance ids")
    flat = lab.ravel().astype(np.int64)
    n = int(flat.max(initial=0)) + 1
    counts = np.bincount(flat, minlength=n)
    ys, xs = np.indices(lab.shape, dtype=np.int64)
    # float64 sums of integer coordinates are exact below 2**53: fine for any block.
    sum_y = np.rint(np.bincount(flat, weights=ys.ravel(), minlength=n)).astype(np.int64)
    sum_x = np.rint(np.bincount(flat, weights=xs.ravel(), minlength=n)).astype(np.int64)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    return ids, sum_y[ids] // counts[ids], sum_x[ids] // counts[ids]


def filter_owned(labels: np.ndarray, block: Block) -> OwnedObjects:
    """Keep the objects of a block's context whose reference point lies in the block's core.

    Parameters
    ----------
    labels : (h, w) instance map of the block's context, 0 = background.
    block : the block it was computed for.
    """
    lab = np.asarray(labels)
    if lab.shape != block.context.shape:
        raise ConicQPError(
            f"block {block.index}: labels are {lab.shape}, expected the context "
            f"{block.context.shape}"
        )
    ids, ry, rx = reference_points(lab)
    core = block.core_in_context
    owned_mask = (ry >= core.y0) & (ry < core.y1) & (rx >= core.x0) & (rx < core.x1)
    owned = ids[owned_mask]
    lut = np.zeros(int(lab.max(initial=0)) + 1, dtype=bool)
    lut[owned] = True
    kept = np.where(lut[lab], lab, 0).astype(lab.dtype, copy=False)
    top, bottom, left, right = block.inner_edges
    edges = [lab[0, :] if top else None, lab[-1, :] if bottom else None]
    edges += [lab[:, 0] if left else None, lab[:, -1] if right else None]
    touching = [e for e in edges if e is not None]
    cut = np.unique(np.concatenate(touching)) if touching else np.zeros(0, lab.dtype)
    cut = cut[cut > 0]
    cut_owned = cut[lut[cut]]
    return OwnedObjects(kept, owned, cut, cut_owned)


def owned_instances(instances: Instances, block: Block) -> tuple[Instances, np.ndarray]:
    """Restrict post-processed :class:`Instances` of a block's context to its owned nuclei.

    Returns the owned instances renumbered 1..K' (classes and probabilities kept in step, in
    the order of their original ids) and the original ids of owned nuclei that touch an inner
    edge of the context (empty when the margin is large enough).
    """
    result = filter_owned(instances.labels, block)
    lut = np.zeros(int(np.asarray(instances.labels).max(initial=0)) + 1, dtype=np.int32)
    lut[result.ids] = np.arange(1, result.ids.size + 1, dtype=np.int32)
    labels = lut[result.labels]
    classes = np.asarray(instances.classes)[result.ids - 1]
    probs = np.asarray(instances.probs)[result.ids - 1]
    return Instances(labels=labels, classes=classes, probs=probs), result.cut_owned
