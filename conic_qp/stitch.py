"""Per-tile post-processing and stitching of owned nuclei into slide-wide outputs.

The network runs in the main process; everything here runs per tile in worker processes (or
inline), so it imports no torch and holds no slide-wide arrays. A :class:`TileJob` carries the
softmax maps of one tile's read box; :func:`process_tile` turns them into the nuclei the tile
owns (see :mod:`conic_qp.tiling`: reference point in the core), measured and outlined in level-0
coordinates. The main process only appends the resulting rows to the Parquet file and, when a
label map is wanted, pastes the owned labels into it with slide-wide ids
(:class:`LabelMapWriter`).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.objects import instances_to_table, nucleus_id
from conic_qp.postprocess import Instances, PostprocessParams, postprocess
from conic_qp.sinks import replace_dir
from conic_qp.tiling import Tile, owned_instances

log = logging.getLogger(__name__)

__all__ = ["LabelMapWriter", "TileJob", "TileOutput", "process_tile"]


@dataclass
class TileJob:
    """Everything a worker needs to post-process one tile (picklable, no torch).

    Attributes
    ----------
    tile : the tile (read box, core, padding) in the model-resolution grid of the slide.
    semantic, three_label : (C+1, h, w) and (3, h, w) float32 probabilities of the read box.
    params : post-processing thresholds.
    classes : the model's class scheme.
    origin_xy : level-0 (x, y) of the region the grid covers (its pixel (0, 0)).
    scale : level-0 px per model px.
    mpp_level0 : slide um/px at level 0.
    image_id : slide identity for the stable nucleus ids.
    simplify : outline simplification in model px (see ``instances_to_table``).
    roi : keep only nuclei whose level-0 centroid lies in this geometry (None: all).
    want_labels : also return the owned label map (for ``--save-labels``).
    """

    tile: Tile
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
class TileOutput:
    """Owned nuclei of one tile.

    ``labels`` (read-box shape, or None) numbers the owned nuclei so that label ``k`` is row
    ``k - 1`` of ``table``; ``n_cut`` counts owned nuclei touching an inner read-box edge (halo
    too small for them); ``seconds`` is the worker's compute time.
    """

    index: int
    table: pd.DataFrame
    labels: np.ndarray | None
    n_cut: int
    seconds: float


def process_tile(job: TileJob) -> TileOutput:
    """Post-process one tile and keep the nuclei it owns (runs in a worker process)."""
    t0 = time.perf_counter()
    inst = postprocess(job.semantic, job.three_label, job.params)
    owned, cut = owned_instances(inst, job.tile)
    read = job.tile.read
    ox, oy = job.origin_xy
    origin = (ox + read.x0 * job.scale, oy + read.y0 * job.scale)
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
    return TileOutput(job.tile.index, table, labels, int(cut.size), time.perf_counter() - t0)


def _row_labels(
    owned: Instances, table: pd.DataFrame, origin: tuple[float, float], job: TileJob
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


class LabelMapWriter:
    """Slide-wide instance label map at the model's um/px, written to a zarr folder.

    Labels are pasted tile by tile (read-modify-write of the read box, only where the tile owns
    a nucleus), so nothing slide-sized is ever in memory. The zarr is built under a temporary
    name and moved into place by :meth:`commit`. Attributes record the resolution: ``mpp`` (um/px
    of the map), ``origin_level0`` and ``scale_level0`` (level-0 px per map px), so map pixel
    ``(r, c)`` covers level-0 ``origin + scale * (c, r)``.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int],
        chunk: int,
        attrs: dict[str, Any],
    ) -> None:
        import zarr

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self._array = zarr.open_array(
                str(self._tmp),
                mode="w",
                shape=shape,
                chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
                dtype="int32",
                fill_value=0,
            )
            self._array.attrs.update(attrs)
        except Exception as exc:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise ConicQPError(f"cannot create the label map {self.path} ({exc})") from exc

    def paste(self, tile: Tile, labels: np.ndarray, offset: int) -> None:
        """Write a tile's owned labels (1..k) as slide-wide ids ``offset + 1 .. offset + k``."""
        if not labels.any():
            return
        sl = tile.read.slices
        current = np.asarray(self._array[sl])
        mask = labels > 0
        current[mask] = labels[mask] + offset
        self._array[sl] = current

    def commit(self) -> Path:
        replace_dir(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
