"""What to run on a slide: tiles, blocks and panels over its tissue and ROI (a :class:`SlidePlan`).

:func:`plan_slide` is the only step that looks at the slide (its size, um/px and a thumbnail for
the tissue mask); :func:`plan_region` is the pure geometry of a region of a given shape. The
plan is immutable and serialisable in summary form (:meth:`SlidePlan.summary`, in run.json), and
:mod:`conic_qp.engine` executes it.

Panels bound the memory for any slide width. The region is cut into vertical panels of whole
tile columns (``panel_width``); a panel's tiles run row by row, and the blended probabilities are
kept for one block row of that panel only. Where two panels meet, the left panel hands over, per
block row, (a) the final blended values of the ``2 * margin`` columns that the blocks of both
panels read (so both see identical numbers and ownership stays exact) and (b) its tiles' partial
sums over the columns the right panel's first tiles also cover (so no tile runs twice). Block
cores are aligned to these boundaries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import shapely

from conic_qp.errors import ConicQPError, NoTissueError, option
from conic_qp.settings import PredictSettings
from conic_qp.slides import SlideSource, scaled_size
from conic_qp.tiling import BlockGrid, Tile, TileLayout

log = logging.getLogger(__name__)

__all__ = ["Panel", "SlidePlan", "plan_region", "plan_slide"]

Span = tuple[int, int]


@dataclass(frozen=True)
class Panel:
    """A vertical strip of tile columns, run top to bottom (region px, half-open spans)."""

    index: int
    tile_cols: Span
    """Tile columns run in this panel."""
    block_cols: Span
    """Block columns owned by this panel."""
    columns: Span
    """Columns of the panel's blended-probability band."""
    zone_in: Span | None
    """Final values taken over from the previous panel (read by blocks of both)."""
    carry_in: Span | None
    """Partial sums of the previous panel's tiles, completed by this panel's tiles."""
    zone_out: Span | None
    carry_out: Span | None


@dataclass(frozen=True)
class SlidePlan:
    """Tiles to run, blocks to post-process and panels to run them in, for one region.

    Coordinates are region px at the model's um/px; the region's pixel (0, 0) is level-0
    ``origin_xy`` and one region px is ``scale`` level-0 px.
    """

    name: str
    level0_size: tuple[int, int]
    slide_mpp: float
    model_mpp: float
    scale: float
    origin_xy: tuple[float, float]
    tiles: TileLayout
    selected: tuple[int, ...]
    blocks: BlockGrid
    panels: tuple[Panel, ...]
    roi: Any = None
    roi_area_px: float | None = None
    tissue_area_px: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.tiles.shape

    def panel_tiles(self, panel: Panel) -> list[Tile]:
        """The selected tiles of ``panel``, in raster order."""
        c0, c1 = panel.tile_cols
        out = []
        for index in self.selected:
            col = index % self.tiles.cols
            if c0 <= col < c1:
                out.append(self.tiles.tile(index))
        return sorted(out, key=lambda t: (t.row, t.col))

    def summary(self) -> dict[str, Any]:
        """The plan in run.json (``grid``)."""
        t = self.tiles
        return {
            "shape_model_px": list(self.shape),
            "tile_shape": list(t.tile_shape),
            "overlap": t.overlap,
            "window": t.window,
            "tiles_total": len(t),
            "tiles_run": len(self.selected),
            "blocks_total": len(self.blocks),
            "block_margin": self.blocks.margin,
            "panels": len(self.panels),
            "pixels_per_region_pixel": round(t.pixels_per_region_pixel, 4),
        }


def plan_region(
    shape: tuple[int, int],
    settings: PredictSettings,
    *,
    selected: tuple[int, ...] | None = None,
    name: str = "region",
    slide_mpp: float = 0.5,
    model_mpp: float = 0.5,
    origin_xy: tuple[float, float] = (0.0, 0.0),
) -> SlidePlan:
    """The plan of an (H, W) region: every tile (or ``selected``), blocks and panels."""
    layout = TileLayout(shape, settings.tile_size, settings.overlap, settings.window)
    panels, x_edges = _panels(layout, settings)
    h = layout.shape[0]
    y_edges = [*range(0, h, settings.block_size), h]
    blocks = BlockGrid(layout.shape, y_edges, x_edges, settings.block_margin)
    chosen = tuple(range(len(layout))) if selected is None else tuple(sorted(set(selected)))
    if any(not 0 <= i < len(layout) for i in chosen):
        raise ValueError("tile selection refers to tiles outside the layout")
    return SlidePlan(
        name=name,
        level0_size=(
            round(layout.shape[1] * model_mpp / slide_mpp),
            round(layout.shape[0] * model_mpp / slide_mpp),
        ),
        slide_mpp=slide_mpp,
        model_mpp=model_mpp,
        scale=model_mpp / slide_mpp,
        origin_xy=origin_xy,
        tiles=layout,
        selected=chosen,
        blocks=blocks,
        panels=panels,
        tissue_area_px=float(layout.shape[0] * layout.shape[1]) * (model_mpp / slide_mpp) ** 2,
    )


def _panels(layout: TileLayout, settings: PredictSettings) -> tuple[tuple[Panel, ...], list[int]]:
    """Panels of whole tile columns and the block column edges aligned with them."""
    w = layout.shape[1]
    m = settings.block_margin
    first, last = [], []
    for j, x in enumerate(layout.xs):
        nz = np.flatnonzero(layout.axis_window(1, j))
        first.append(min(x + int(nz[0]), w))
        last.append(min(x + int(nz[-1]) + 1, w))
    k = max(1, settings.panel_width // layout.stride, math.ceil(layout.tile_size / layout.stride))
    while True:
        starts = list(range(0, layout.cols, k))
        bounds = [first[j] for j in starts[1:]]  # F: first column a panel's tiles reach
        cores = [0] + [b - m for b in bounds] + [w]
        if all(b > a for a, b in pairwise(cores)):
            break
        k += 1  # a panel narrower than its margins: take more tile columns
    # block column edges: each panel's core span split into near-equal blocks <= block_size
    x_edges = [0]
    spans = list(pairwise(cores))
    first_block = []
    for a, b in spans:
        first_block.append(len(x_edges) - 1)
        n = max(1, math.ceil((b - a) / settings.block_size))
        x_edges.extend(a + round((b - a) * (i + 1) / n) for i in range(n))
    first_block.append(len(x_edges) - 1)
    panels = []
    n_panels = len(starts)
    for p in range(n_panels):
        j0 = starts[p]
        j1 = starts[p + 1] if p + 1 < n_panels else layout.cols
        zone_in = carry_in = zone_out = carry_out = None
        if p > 0:
            f = bounds[p - 1]
            zone_in = (max(0, f - 2 * m), f)
            reach = max(last[:j0])
            carry_in = (f, reach) if reach > f else None
        if p + 1 < n_panels:
            f = bounds[p]
            zone_out = (max(0, f - 2 * m), f)
            reach = max(last[:j1])
            carry_out = (f, reach) if reach > f else None
        x0 = zone_in[0] if zone_in else 0
        x1 = max(last[j0:j1]) if p + 1 < n_panels else w
        blocks = (first_block[p], first_block[p + 1])
        panels.append(Panel(p, (j0, j1), blocks, (x0, x1), zone_in, carry_in, zone_out, carry_out))
    return tuple(panels), x_edges


def plan_slide(
    source: SlideSource,
    model_mpp: float,
    settings: PredictSettings,
    roi: shapely.Geometry | None = None,
) -> SlidePlan:
    """Plan a whole slide at ``model_mpp``: tiles touching tissue (thumbnail mask) and the ROI.

    Raises
    ------
    ConicQPError
        Empty ROI, or no tissue in the slide (or in the ROI).
    """
    from conic_qp.tissue import box_in_mask, mask_region, tissue_mask

    w0, h0 = source.dimensions
    width, height = scaled_size((w0, h0), source.mpp, model_mpp)
    plan = plan_region(
        (height, width),
        settings,
        name=source.name,
        slide_mpp=float(source.mpp),
        model_mpp=float(model_mpp),
    )
    layout = plan.tiles
    selected = list(range(len(layout)))
    tissue_area_px = float(w0) * float(h0)  # level-0 px^2; densities per mm^2 of tissue
    if settings.tissue_detection:
        thumb, downsample = source.thumbnail(settings.thumbnail_size)
        mask = tissue_mask(thumb)
        tissue_area_px = float(mask.sum()) * downsample * downsample
        region = mask_region(mask, downsample, (0, 0, w0, h0))
        selected = [i for i in selected if box_in_mask(region, _yxyx(layout.tile(i)), layout.shape)]
    roi_area = None
    if roi is not None:
        if roi.is_empty:
            raise ConicQPError(f"the ROI is empty; give {option('roi')} x,y,w,h with positive size")
        roi_area = float(roi.area)
        if selected:
            boxes = np.array([_xyxy(layout.tile(i)) for i in selected], np.float64) * plan.scale
            hits = shapely.intersects(roi, shapely.box(*boxes.T))
            selected = [i for i, hit in zip(selected, hits, strict=True) if hit]
    if not selected:
        where = "inside the ROI" if roi is not None else "on the thumbnail"
        raise NoTissueError(
            f"no tissue found in {source.name} {where}; check the slide, or run every tile "
            f"({option('tissue_detection=False', '--no-tissue')})"
        )
    log.info("%s: %d of %d tiles to run", source.name, len(selected), len(layout))
    return SlidePlan(
        name=plan.name,
        level0_size=(int(w0), int(h0)),
        slide_mpp=plan.slide_mpp,
        model_mpp=plan.model_mpp,
        scale=plan.scale,
        origin_xy=plan.origin_xy,
        tiles=layout,
        selected=tuple(selected),
        blocks=plan.blocks,
        panels=plan.panels,
        roi=roi,
        roi_area_px=roi_area,
        tissue_area_px=tissue_area_px,
    )


def _yxyx(t: Tile) -> tuple[int, int, int, int]:
    r = t.read
    return (r.y0, r.x0, r.y1, r.x1)


def _xyxy(t: Tile) -> tuple[int, int, int, int]:
    r = t.read
    return (r.x0, r.y0, r.x1, r.y1)
