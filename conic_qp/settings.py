"""How a slide is run: :class:`PredictSettings` (the ``conic-qp predict`` options), stored in run.json.

The defaults are chosen from ``benchmarks/tiling_bench.py`` (see ``docs/inference.md``): 1024 px
tiles overlapping by 256 px (1.78 network px per slide px), blended with a Gaussian window,
squeeze-excitation over 160 px windows (:mod:`conic_qp.local_se`): >= 99.4 % of the nuclei of a
whole-image run on CMU-1 and CoNSeP; post-processing in 1024 px blocks with a 64 px margin.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from conic_qp.errors import ConicQPError, option
from conic_qp.local_se import check_se_window
from conic_qp.tiling import SIZE_MULTIPLE, Window, check_tiling
from conic_qp.tta import TTAConfig

log = logging.getLogger(__name__)

__all__ = ["PredictSettings"]


@dataclass(frozen=True)
class PredictSettings:
    """How a slide is run (the CLI options); stored in ``run.json``.

    Attributes
    ----------
    tile_size : network input edge (model px, a multiple of 32).
    overlap : px shared by neighbouring tiles (a multiple of 32); the cost is
        ``(tile_size / (tile_size - overlap))**2`` network pixels per slide pixel.
    window : how overlapping tile outputs are blended: ``gaussian`` (nnU-Net), ``constant``
        (plain mean) or ``crop`` (no blending, nearest tile centre); see :mod:`conic_qp.tiling`.
    se_window : squeeze-excitation pooling window in px (odd multiple of 32), so the output does
        not depend on the tile size (:mod:`conic_qp.local_se`); None keeps the trained global
        mean (tiled output then depends on the tile size).
    block_size : post-processing block (px): the unit sent to a worker.
    block_margin : px of context around a block; must exceed the largest nucleus extent.
    panel_width : blended probabilities are kept for a band this wide (px, rounded to whole
        tile columns, at least one tile) and two block rows high: with the batch and the pending
        blocks, it bounds the memory, whatever the slide size.
    batch_size : tiles per network step, and augmented images per forward pass.
    tta : passes, MC dropout and augmentations (paper: 16 passes with MC dropout).
    seed : seeds augmentations (per tile) and dropout masks (per batch): a run is reproducible.
    device : "auto", "cpu", "cuda", "cuda:1", "mps"; recorded only: the engine runs on the
        device the networks are on (:func:`conic_qp.predict.load_models` puts them there).
    amp : float16 autocast on CUDA (ignored elsewhere).
    compile : ``torch.compile`` the networks in :func:`conic_qp.predict.predict_paths`.
    workers : post-processing processes; 0 runs it inline in the main process.
    tissue_detection : skip tiles without tissue on the thumbnail.
    thumbnail_size : longer side of the thumbnail used for tissue detection.
    save_labels : also write the slide-wide instance label map (zarr).
    object_type : GeoJSON objects ("detection" or "cell").
    simplify : outline simplification tolerance in model px.
    row_group_rows : nuclei buffered before a Parquet row group is written.
    halo : deprecated (the overlap/2 of the former per-tile stitching); when given, ``overlap``
        becomes ``2 * halo`` rounded up to a multiple of 32.
    """

    tile_size: int = 1024
    overlap: int = 256
    window: Window = "gaussian"
    se_window: int | None = 160
    block_size: int = 1024
    block_margin: int = 64
    panel_width: int = 2048
    batch_size: int = 2
    tta: TTAConfig = field(default_factory=TTAConfig)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    workers: int = 2
    tissue_detection: bool = True
    thumbnail_size: int = 2048
    save_labels: bool = False
    object_type: Literal["detection", "cell"] = "detection"
    simplify: float = 0.25
    row_group_rows: int = 20_000
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.halo is not None:
            if self.halo < 0:
                raise ConicQPError(f"halo {self.halo} must be >= 0 px")
            overlap = -(-2 * int(self.halo) // SIZE_MULTIPLE) * SIZE_MULTIPLE
            log.debug("halo %d px is deprecated: overlap %d px", self.halo, overlap)
            object.__setattr__(self, "overlap", overlap)
        if self.batch_size < 1:
            raise ConicQPError(f"{option('batch_size')} must be at least 1 (got {self.batch_size})")
        if self.workers < 0:
            raise ConicQPError(f"{option('workers')} must be >= 0 (got {self.workers}); 0 = inline")
        if self.thumbnail_size < 16:
            raise ConicQPError(f"thumbnail size {self.thumbnail_size} is too small (>= 16 px)")
        check_tiling(self.tile_size, self.overlap, self.window)
        check_se_window(self.se_window)
        if self.block_size < SIZE_MULTIPLE:
            raise ConicQPError(f"block size {self.block_size} must be >= {SIZE_MULTIPLE} px")
        if self.block_margin < 0:
            raise ConicQPError(f"block margin {self.block_margin} must be >= 0 px")
        if self.panel_width < 1:
            raise ConicQPError(f"panel width {self.panel_width} must be >= 1 px")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tta"] = dataclasses.asdict(self.tta)
        return data
