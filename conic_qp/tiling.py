"""Tiling of a region for whole-slide inference, as a geometric object.

A region (the slide, an annotation's bounding box...) resampled to the model's um/px is an
(H, W) pixel grid. :class:`TileGrid` cuts it into tiles of ``tile_size`` x ``tile_size`` pixels
(the network input). Each :class:`Tile` has

* a **core**: the pixels it owns. Cores are a regular grid of ``tile_size - 2 * halo`` pixels
  that partitions the region exactly (no gaps, no overlaps);
* a **read box**: the core grown by ``halo`` on every side (and up to ``tile_size``), clipped to
  the region. What is clipped is recorded as :class:`Padding`, so the network always sees a full
  ``tile_size`` input (fixed shape for batching) with the core at offset ``(halo, halo)``.

Ownership rule (no blending): a nucleus found in a tile is kept iff its reference point lies in
the tile's core. The reference point is the floor of the centroid computed in integer arithmetic
(``sum // count``). It is deterministic (no float rounding, so two tiles seeing the same pixels
agree exactly on who owns an object lying on a core boundary) and stable (one pixel more or less
at an edge moves it by ~1/area, whereas the first pixel in raster order jumps with any change of
the top row). It lies within the object's bounding box, so along each axis every pixel of the
object is at most ``extent - 1`` pixels from it.

Hence, if ``halo >= extent - 1`` for every nucleus, an owned nucleus lies entirely inside the
read box, and if the network output inside the read box is what it would be on the whole image
(``halo >=`` nucleus size ``+`` the network's context margin, see :func:`min_halo`), the tiled
result equals the whole-image result: every nucleus exactly once, with the same pixels.
Objects that touch an inner edge of a read box are flagged by :func:`filter_owned`; an owned one
means the halo is too small.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from conic_qp.errors import ConicQPError
from conic_qp.postprocess import Instances

log = logging.getLogger(__name__)

__all__ = [
    "Box",
    "OwnedObjects",
    "Padding",
    "Tile",
    "TileGrid",
    "filter_owned",
    "min_halo",
    "owned_instances",
    "reference_points",
]

#: Network inputs must be a multiple of this (five stride-2 stages of the encoder).
SIZE_MULTIPLE = 32


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

    def contains(self, y: int, x: int) -> bool:
        return self.y0 <= y < self.y1 and self.x0 <= x < self.x1

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


class Padding(NamedTuple):
    """Pixels added around a clipped read box to make the ``tile_size`` network input."""

    top: int
    bottom: int
    left: int
    right: int


@dataclass(frozen=True)
class Tile:
    """One tile: its place in the grid, what it reads and what it owns (region pixels)."""

    index: int
    row: int
    col: int
    read: Box
    core: Box
    pad: Padding
    size: int
    halo: int
    region_shape: tuple[int, int] = field(repr=False)

    @property
    def core_in_read(self) -> Box:
        """The core in read-box coordinates."""
        return self.core.relative_to(self.read)

    @property
    def inner_edges(self) -> tuple[bool, bool, bool, bool]:
        """(top, bottom, left, right): True where the read box edge is inside the region.

        Objects touching such an edge may continue outside the read box (truncated); at the
        region border they are truncated in a whole-region run too.
        """
        h, w = self.region_shape
        r = self.read
        return r.y0 > 0, r.y1 < h, r.x0 > 0, r.x1 < w

    def pad_input(self, image: np.ndarray, mode: str = "reflect", value: int = 255) -> np.ndarray:
        """Pad the read-box pixels (H, W[, C]) to the ``size x size`` network input.

        ``mode`` is a :func:`numpy.pad` mode; "reflect" (repeated when the padding exceeds the
        image) gives the network plausible context at the region border, "constant" pads with
        ``value`` (255 = glass).
        """
        if image.shape[:2] != self.read.shape:
            raise ConicQPError(
                f"tile {self.index}: image is {image.shape[:2]}, expected the read box "
                f"{self.read.shape}"
            )
        p = self.pad
        widths = [(p.top, p.bottom), (p.left, p.right)] + [(0, 0)] * (image.ndim - 2)
        if mode == "constant":
            return np.pad(image, widths, mode="constant", constant_values=value)
        return np.pad(image, widths, mode=mode)  # type: ignore[call-overload]

    def crop_output(self, array: np.ndarray) -> np.ndarray:
        """Drop the padding from a network output: the last two axes go from size to read box."""
        if array.shape[-2:] != (self.size, self.size):
            raise ConicQPError(
                f"tile {self.index}: output is {array.shape[-2:]}, expected ({self.size}, "
                f"{self.size})"
            )
        p = self.pad
        return array[..., p.top : self.size - p.bottom, p.left : self.size - p.right]


def min_halo(max_nucleus_diameter_px: float, context_px: int = 0) -> int:
    """Smallest halo (px at the model's um/px) that makes tiled output seam-free.

    An owned nucleus must lie entirely in the read box: ``diameter - 1`` pixels suffice for the
    ownership rule; the network's prediction near a read-box edge also differs from the
    whole-image one within its effective context, so that margin is added. Conservative by one
    pixel: ``ceil(diameter) + context``.

    Parameters
    ----------
    max_nucleus_diameter_px : largest nucleus extent along y or x, in model pixels (e.g. the
        largest-instance size threshold of post-processing, ~40 px at 0.5 um/px).
    context_px : pixels near a tile edge whose prediction is affected by the missing context.
    """
    if max_nucleus_diameter_px < 0 or context_px < 0:
        raise ConicQPError("nucleus diameter and context margin must be >= 0 px")
    return math.ceil(max_nucleus_diameter_px) + int(context_px)


class TileGrid:
    """Overlapping tiles whose cores partition an (H, W) region.

    Parameters
    ----------
    shape : (H, W) of the region at the model's um/px.
    tile_size : network input size (a multiple of 32).
    halo : overlap on each side of the core, px; must satisfy ``tile_size > 2 * halo`` and,
        for seam-free output, ``halo >= min_halo(...)``.
    min_halo : if given, ``halo`` below it is refused (see :func:`min_halo`).

    Notes
    -----
    Tiles are numbered in raster order (row-major). :meth:`select` restricts the tiles that are
    iterated (e.g. to tissue) without changing the geometry or the ownership.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        tile_size: int,
        halo: int,
        *,
        min_halo: int | None = None,
        _selection: tuple[int, ...] | None = None,
    ) -> None:
        h, w = (int(v) for v in shape)
        if h < 1 or w < 1:
            raise ConicQPError(f"cannot tile an empty region of shape {tuple(shape)}")
        if tile_size < SIZE_MULTIPLE or tile_size % SIZE_MULTIPLE:
            raise ConicQPError(
                f"tile size {tile_size} must be a positive multiple of {SIZE_MULTIPLE} "
                "(the network downsamples 5 times); e.g. 256, 512 or 1024"
            )
        if halo < 0:
            raise ConicQPError(f"halo {halo} must be >= 0 px")
        if tile_size <= 2 * halo:
            raise ConicQPError(
                f"tile size {tile_size} must exceed twice the halo ({halo} px) so each tile owns "
                f"a core; use a larger tile (>= {2 * halo + SIZE_MULTIPLE}) or a smaller halo"
            )
        if min_halo is not None and halo < min_halo:
            raise ConicQPError(
                f"halo {halo} px is below the {min_halo} px needed for seam-free tiling (largest "
                "nucleus + network context); use a larger halo"
            )
        self.shape: tuple[int, int] = (h, w)
        self.tile_size = int(tile_size)
        self.halo = int(halo)
        self.core_size = self.tile_size - 2 * self.halo
        self.rows = -(-h // self.core_size)
        self.cols = -(-w // self.core_size)
        total = self.rows * self.cols
        if _selection is not None and any(not 0 <= i < total for i in _selection):
            raise ConicQPError("tile selection refers to tiles outside the grid")
        self._selection = tuple(sorted(set(_selection))) if _selection is not None else None

    def __repr__(self) -> str:
        return (
            f"TileGrid(shape={self.shape}, tile_size={self.tile_size}, halo={self.halo}, "
            f"grid={self.rows}x{self.cols}, selected={self.n_tiles})"
        )

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid."""
        return self.rows, self.cols

    @property
    def n_tiles(self) -> int:
        """Number of tiles iterated by :meth:`tiles` (all, or the selected ones)."""
        return len(self._selection) if self._selection is not None else self.rows * self.cols

    def __len__(self) -> int:
        return self.n_tiles

    def tile(self, index: int) -> Tile:
        """Tile ``index`` (raster order) of the full grid."""
        if not 0 <= index < self.rows * self.cols:
            raise ConicQPError(f"tile index {index} outside the {self.rows}x{self.cols} grid")
        row, col = divmod(index, self.cols)
        h, w = self.shape
        c, halo, size = self.core_size, self.halo, self.tile_size
        cy0, cx0 = row * c, col * c
        core = Box(cy0, cx0, min(cy0 + c, h), min(cx0 + c, w))
        wy0, wx0 = cy0 - halo, cx0 - halo  # the full network window, may leave the region
        read = Box(max(wy0, 0), max(wx0, 0), min(wy0 + size, h), min(wx0 + size, w))
        pad = Padding(read.y0 - wy0, wy0 + size - read.y1, read.x0 - wx0, wx0 + size - read.x1)
        return Tile(index, row, col, read, core, pad, size, halo, self.shape)

    def tiles(self) -> Iterator[Tile]:
        """Tiles in raster order (only the selected ones after :meth:`select`)."""
        indices = self._selection if self._selection is not None else range(self.rows * self.cols)
        for index in indices:
            yield self.tile(index)

    def __iter__(self) -> Iterator[Tile]:
        return self.tiles()

    def owner_of(self, y: int, x: int) -> Tile:
        """The tile whose core contains region pixel (y, x)."""
        h, w = self.shape
        if not (0 <= y < h and 0 <= x < w):
            raise ConicQPError(f"pixel ({y}, {x}) is outside the region {self.shape}")
        return self.tile((int(y) // self.core_size) * self.cols + int(x) // self.core_size)

    def select(self, mask: np.ndarray) -> TileGrid:
        """Keep the tiles whose read box touches ``mask`` (e.g. tissue).

        ``mask`` is a boolean image covering the same area as the region at any scale (a
        thumbnail crop from :func:`conic_qp.tissue.mask_region`); boxes are rounded outwards.
        Selection by read box (not core) is conservative; tiles left out own no tissue.
        """
        from conic_qp.tissue import box_in_mask

        m = np.asarray(mask, dtype=bool)
        if m.ndim != 2 or m.size == 0:
            raise ConicQPError(f"tissue mask must be a non-empty 2-D array, got shape {m.shape}")
        keep = [
            t.index
            for t in self.tiles()
            if box_in_mask(m, (t.read.y0, t.read.x0, t.read.y1, t.read.x1), self.shape)
        ]
        log.debug("tissue selection keeps %d of %d tiles", len(keep), self.n_tiles)
        return TileGrid(self.shape, self.tile_size, self.halo, _selection=tuple(keep))


class OwnedObjects(NamedTuple):
    """Result of :func:`filter_owned` (read-box coordinates, original label values)."""

    labels: np.ndarray
    """(h, w) labels of the read box with non-owned objects set to 0."""
    ids: np.ndarray
    """Sorted ids of the owned objects."""
    cut: np.ndarray
    """Ids (owned or not) touching an inner edge of the read box: possibly truncated."""
    cut_owned: np.ndarray
    """Owned ids among ``cut``: non-empty means the halo is too small for these objects."""


def reference_points(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ownership reference point of every object: ``(ids, y, x)``, floor of the centroid.

    Integer arithmetic only (``sum // count``), so the point is identical whether it is computed
    in a tile or in the whole region (shifting coordinates by an integer shifts it exactly).
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
    # float64 sums of integer coordinates are exact below 2**53: fine for any tile.
    sum_y = np.rint(np.bincount(flat, weights=ys.ravel(), minlength=n)).astype(np.int64)
    sum_x = np.rint(np.bincount(flat, weights=xs.ravel(), minlength=n)).astype(np.int64)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    return ids, sum_y[ids] // counts[ids], sum_x[ids] // counts[ids]


def filter_owned(labels: np.ndarray, tile: Tile) -> OwnedObjects:
    """Keep the objects of a tile's read box whose reference point lies in the tile's core.

    Parameters
    ----------
    labels : (h, w) instance map of the tile's read box (padding already cropped, see
        :meth:`Tile.crop_output`), 0 = background.
    tile : the tile it was computed for.
    """
    lab = np.asarray(labels)
    if lab.shape != tile.read.shape:
        raise ConicQPError(
            f"tile {tile.index}: labels are {lab.shape}, expected the read box {tile.read.shape}"
        )
    ids, ry, rx = reference_points(lab)
    core = tile.core_in_read
    owned_mask = (ry >= core.y0) & (ry < core.y1) & (rx >= core.x0) & (rx < core.x1)
    owned = ids[owned_mask]
    lut = np.zeros(int(lab.max(initial=0)) + 1, dtype=bool)
    lut[owned] = True
    kept = np.where(lut[lab], lab, 0).astype(lab.dtype, copy=False)
    top, bottom, left, right = tile.inner_edges
    edges = [lab[0, :] if top else None, lab[-1, :] if bottom else None]
    edges += [lab[:, 0] if left else None, lab[:, -1] if right else None]
    touching = [e for e in edges if e is not None]
    cut = np.unique(np.concatenate(touching)) if touching else np.zeros(0, lab.dtype)
    cut = cut[cut > 0]
    cut_owned = cut[lut[cut]]
    if cut_owned.size:
        log.warning(
            "tile %d: %d owned objects touch the tile edge; the halo (%d px) is too small",
            tile.index,
            cut_owned.size,
            tile.halo,
        )
    return OwnedObjects(kept, owned, cut, cut_owned)


def owned_instances(instances: Instances, tile: Tile) -> tuple[Instances, np.ndarray]:
    """Restrict post-processed :class:`Instances` of a read box to the tile's owned nuclei.

    Returns the owned instances renumbered 1..K' (classes and probabilities kept in step, in
    the order of their original ids) and the original ids of owned nuclei that touch an inner
    edge of the read box (empty when the halo is large enough).
    """
    result = filter_owned(instances.labels, tile)
    lut = np.zeros(int(np.asarray(instances.labels).max(initial=0)) + 1, dtype=np.int32)
    lut[result.ids] = np.arange(1, result.ids.size + 1, dtype=np.int32)
    labels = lut[result.labels]
    classes = np.asarray(instances.classes)[result.ids - 1]
    probs = np.asarray(instances.probs)[result.ids - 1]
    return Instances(labels=labels, classes=classes, probs=probs), result.cut_owned
