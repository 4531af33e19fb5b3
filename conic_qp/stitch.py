"""Post-processing of one block of blended probabilities into the nuclei it owns.

The network and the blending run in the main process (:mod:`conic_qp.engine`); everything here
runs per block in worker processes (or inline), so it imports no torch and holds no slide-wide
arrays. A :class:`BlockJob` carries the blended softmax maps of one block's context;
:func:`process_block` turns them into the nuclei the block owns (reference point in the core, see
:mod:`conic_qp.tiling`), measured and outlined in level-0 coordinates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.objects import instances_to_table, nucleus_id
from conic_qp.postprocess import Instances, PostprocessParams, postprocess
from conic_qp.tiling import Block, owned_instances

log = logging.getLogger(__name__)

__all__ = ["BlockJob", "BlockOutput", "process_block"]


@dataclass
class BlockJob:
    """Everything a worker needs to post-process one block (picklable, no torch).

    Attributes
    ----------
    block : the block (core, context) in the model-resolution grid of the region.
    semantic, three_label : (C+1, h, w) and (3, h, w) float32 blended probabilities of the
        block's context.
    params : post-processing thresholds.
    classes : the model's class scheme.
    origin_xy : level-0 (x, y) of the region's pixel (0, 0).
    scale : level-0 px per model px.
    mpp_level0 : slide um/px at level 0.
    image_id : slide identity for the stable nucleus ids.
    simplify : outline simplification in model px (see ``instances_to_table``).
    roi : keep only nuclei whose level-0 centroid lies in this geometry (None: all).
    want_labels : also return the owned label map (for ``--save-labels``).
    """

    block: Block
    semantic: np.ndarray
    three_label: np.ndarray
    params: PostprocessParams
    classes: ClassScheme
    origin_xy: tuple[float, float]
    scale: float
    mpp_level0: float
    image_id: str
    simplify: float = 0.25
    roi: Any = None
    want_labels: bool = False


@dataclass
class BlockOutput:
    """Owned nuclei of one block.

    ``labels`` (context shape, or None) numbers the owned nuclei so that label ``k`` is row
    ``k - 1`` of ``table``; the engine sets ``label_offset`` so that ``label_offset + k`` is the
    nucleus' slide-wide label. ``n_cut`` counts owned nuclei touching an inner context edge
    (margin too small for them); ``seconds`` is the worker's compute time.
    """

    block: Block
    table: pd.DataFrame
    labels: np.ndarray | None
    n_cut: int
    seconds: float
    label_offset: int = 0

    @property
    def n(self) -> int:
        return len(self.table)


def process_block(job: BlockJob) -> BlockOutput:
    """Post-process one block and keep the nuclei it owns (runs in a worker process)."""
    t0 = time.perf_counter()
    inst = postprocess(job.semantic, job.three_label, job.params)
    owned, cut = owned_instances(inst, job.block)
    ctx = job.block.context
    ox, oy = job.origin_xy
    origin = (ox + ctx.x0 * job.scale, oy + ctx.y0 * job.scale)
    table = instances_to_table(
        owned,
        job.classes,
        origin_xy=origin,
        scale=job.scale,
        mpp_level0=job.mpp_level0,
        image_id=job.image_id,
        simplify=job.simplify,
    )
    row_label = _row_labels(owned, table, origin, job)
    if job.roi is not None and len(table):
        inside = shapely.contains_xy(
            job.roi, table["centroid_x"].to_numpy(), table["centroid_y"].to_numpy()
        )
        table = table.loc[inside].reset_index(drop=True)
        row_label = row_label[inside]
    labels = None
    if job.want_labels:
        lut = np.zeros(owned.n + 1, dtype=np.int32)
        lut[row_label] = np.arange(1, row_label.size + 1, dtype=np.int32)
        lut[0] = 0
        labels = lut[owned.labels]
    return BlockOutput(job.block, table, labels, int(cut.size), time.perf_counter() - t0)


def _row_labels(
    owned: Instances, table: pd.DataFrame, origin: tuple[float, float], job: BlockJob
) -> np.ndarray:
    """Label (1..K) of every table row.

    ``instances_to_table`` emits one row per present label in increasing order and
    ``owned_instances`` numbers labels 1..K, all present, so row i is label i + 1. The table may
    only drop rows whose centroid repeats (same id); then rows are matched through their ids.
    """
    if len(table) == owned.n:
        return np.arange(1, owned.n + 1, dtype=np.int64)
    rr, cc = np.nonzero(owned.labels)
    lab = owned.labels[rr, cc].astype(np.int64)
    counts = np.maximum(np.bincount(lab, minlength=owned.n + 1), 1)
    cx = origin[0] + job.scale * (np.bincount(lab, cc, minlength=owned.n + 1) / counts + 0.5)
    cy = origin[1] + job.scale * (np.bincount(lab, rr, minlength=owned.n + 1) / counts + 0.5)
    by_id = {nucleus_id(job.image_id, float(cx[k]), float(cy[k])): k for k in range(owned.n, 0, -1)}
    return np.array([by_id.get(i, 0) for i in table["id"]], dtype=np.int64)
