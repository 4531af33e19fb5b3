"""Execute a :class:`~conic_qp.plan.SlidePlan`: tiles -> network (+TTA) -> blending -> blocks.

:class:`SlideEngine` is an iterator of :class:`~conic_qp.stitch.BlockOutput` (the nuclei each
post-processing block owns, with slide-wide label offsets), in plan order; it writes nothing, so
tests consume it in memory and :mod:`conic_qp.writers` turn it into files.
:meth:`SlideEngine.blended` gives the blended probabilities of each block instead.

Three stages overlap:

* **reading**: a background thread reads and pads the next batch of tiles (tiffslide decodes
  outside the GIL);
* **network**: the main thread runs all TTA passes and ensemble members of a batch on the device
  (:func:`conic_qp.tta.predict_probabilities`); the softmax maps, weighted by the tiles'
  blending windows, are summed into the panel's band of block rows;
* **post-processing**: each finished block goes to a worker process (``executor``) that keeps
  the nuclei it owns (:func:`conic_qp.stitch.process_block`).

Memory is bounded by the settings (batch, tile, block and panel sizes, pending blocks), never by
the slide: at most two block rows of one panel are held, and panels hand over through small
files in a scratch folder (see :mod:`conic_qp.plan`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from conic_qp.local_se import se_windows, set_se_window
from conic_qp.plan import Panel, SlidePlan
from conic_qp.runtime import network_device
from conic_qp.settings import PredictSettings
from conic_qp.slides import SlideSource
from conic_qp.stitch import BlockJob, BlockOutput, process_block
from conic_qp.tiling import Block, Box, Tile
from conic_qp.tta import predict_probabilities

if TYPE_CHECKING:
    from conic_qp.predict import ModelSet

log = logging.getLogger(__name__)

__all__ = ["BlendedBlock", "SlideEngine", "apply_se_window", "segment_image", "tile_seed"]

#: (tiles done, tiles total, nuclei so far)
TileProgress = Callable[[int, int, int], None]


@dataclass
class BlendedBlock:
    """Blended probabilities of one block's context (what a post-processing worker gets)."""

    block: Block
    semantic: np.ndarray
    three_label: np.ndarray


def tile_seed(seed: int, tile_index: int) -> int:
    """Augmentation seed of one tile: reproducible, independent of batches and other slides."""
    return int((int(seed) * 1_000_003 + int(tile_index)) % (2**32))


def apply_se_window(models: ModelSet, window: int | None) -> int:
    """Set the squeeze-excitation window of every network (see :mod:`conic_qp.local_se`).

    A network run from an exported graph (:class:`conic_qp.runtime.ExportedNetwork`) has the
    window set on the PyTorch network it exports, and drops graphs made with another window.
    """
    n = 0
    for net in models.networks:
        exported = hasattr(net, "network_changed") and isinstance(
            getattr(net, "net", None), nn.Module
        )
        target: nn.Module = net.net if exported else net  # type: ignore[assignment]
        before = se_windows(target)
        n += set_se_window(target, window)
        if exported and se_windows(target) != before:
            net.network_changed()  # type: ignore[operator]
    return n


def _band_device(device: torch.device) -> torch.device:
    """Where blending runs: beside the network (no transfer of every tile), except on MPS,
    which has no float64."""
    return torch.device("cpu") if device.type == "mps" else device


class _Band:
    """Window-weighted sums of tile outputs over one block row of a panel (region px).

    Sums are float64 torch tensors on the network's device, so tile outputs never leave it:
    only a finished block row is copied to the host. float64 because the product of a float32
    window and a float32 probability is exact in float64: where all tiles agree on a probability
    the blended value is exactly that probability (ties in the watershed stay ties, and a local
    network gives exactly its whole-image result).
    """

    def __init__(
        self, rows: tuple[int, int], cols: tuple[int, int], channels: int, device: torch.device
    ) -> None:
        self.box = Box(rows[0], cols[0], rows[1], cols[1])
        self.num = torch.zeros((channels, *self.box.shape), dtype=torch.float64, device=device)
        self.den = torch.zeros(self.box.shape, dtype=torch.float64, device=device)

    def add(self, tile: Tile, probs: torch.Tensor, weights: torch.Tensor) -> None:
        """Add a tile's (C, th, tw) float32 probabilities with its (th, tw) float32 window."""
        part = tile.box.intersect(self.box)
        if part.is_empty:
            return
        src = part.relative_to(tile.box).slices
        dst = part.relative_to(self.box).slices
        w = weights[src].double()
        self.num[(slice(None), *dst)].add_(probs[(slice(None), *src)].double().mul_(w))
        self.den[dst].add_(w)

    def columns(self, span: tuple[int, int]) -> slice:
        """Band columns of region columns ``span`` (index arrays with ``[..., slice]``)."""
        return slice(span[0] - self.box.x0, span[1] - self.box.x0)


class _Inline:
    """A finished-future stand-in used when post-processing runs inline."""

    def __init__(self, value: BlockOutput) -> None:
        self._value = value

    def result(self) -> BlockOutput:
        return self._value

    def done(self) -> bool:
        return True


class SlideEngine:
    """Run a plan and yield the nuclei each block owns, in plan order.

    Parameters
    ----------
    source : the open slide the plan was made for.
    plan : tiles, blocks and panels (:func:`conic_qp.plan.plan_slide`).
    models : networks (on their device), classes, um/px and thresholds.
    settings : batch, TTA, AMP, SE window, simplification...
    executor : post-processing pool (None: inline).
    image_id : slide identity for the stable nucleus ids (default: the plan's name).
    want_labels : also return each block's owned label map.
    scratch_dir : where panels hand over their edge columns (default: the system temp folder);
        only used when the plan has several panels.
    on_progress : called with (tiles done, tiles total, nuclei) after every batch and block.

    After iteration, :attr:`stats` holds the time split (read, network, blend, post-processing,
    wait) and :attr:`n_nuclei`, :attr:`n_cut` the counts.
    """

    def __init__(
        self,
        source: SlideSource,
        plan: SlidePlan,
        models: ModelSet,
        settings: PredictSettings,
        *,
        executor: Executor | None = None,
        image_id: str | None = None,
        want_labels: bool = False,
        scratch_dir: str | os.PathLike[str] | None = None,
        on_progress: TileProgress | None = None,
    ) -> None:
        self.source = source
        self.plan = plan
        self.models = models
        self.settings = settings
        self.executor = executor
        self.image_id = image_id or plan.name
        self.want_labels = want_labels
        self.scratch_dir = scratch_dir
        self.on_progress = on_progress
        self.stats: dict[str, float] = dict.fromkeys(
            ("read_s", "network_s", "blend_s", "postprocess_s", "wait_s"), 0.0
        )
        self.n_nuclei = 0
        self.n_cut = 0
        self.tiles_done = 0
        self.n_blocks = 0
        self._band_device = _band_device(network_device(models.networks[0]))

    # ------------------------------------------------------------------ post-processed blocks

    def __iter__(self) -> Iterator[BlockOutput]:
        pool = self.executor
        max_pending = max(2, 2 * self.settings.workers) if pool is not None else 0
        pending: deque[Future[BlockOutput] | _Inline] = deque()
        for blended in self.blended():
            job = BlockJob(
                block=blended.block,
                semantic=blended.semantic,
                three_label=blended.three_label,
                params=self.models.params,
                classes=self.models.classes,
                origin_xy=self.plan.origin_xy,
                scale=self.plan.scale,
                mpp_level0=self.plan.slide_mpp,
                image_id=self.image_id,
                simplify=self.settings.simplify,
                roi=self.plan.roi,
                want_labels=self.want_labels,
            )
            del blended
            if pool is None:
                pending.append(_Inline(process_block(job)))
            else:
                pending.append(pool.submit(process_block, job))
            del job
            while pending and (len(pending) > max_pending or pending[0].done()):
                yield self._finish(pending.popleft())
        while pending:
            yield self._finish(pending.popleft())
        if self.n_cut:
            log.warning(
                "%s: %d nuclei touch a block edge; raise the block margin above %d px",
                self.plan.name,
                self.n_cut,
                self.settings.block_margin,
            )

    def _finish(self, item: Future[BlockOutput] | _Inline) -> BlockOutput:
        t0 = time.perf_counter()
        out = item.result()
        self.stats["wait_s"] += time.perf_counter() - t0
        self.stats["postprocess_s"] += out.seconds
        out.label_offset = self.n_nuclei
        self.n_nuclei += out.n
        self.n_cut += out.n_cut
        self.n_blocks += 1
        self._report()
        return out

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.tiles_done, len(self.plan.selected), self.n_nuclei)

    # --------------------------------------------------------------- blended probabilities

    def blended(self) -> Iterator[BlendedBlock]:
        """Blended probabilities of every block that any tile reaches, in plan order."""
        apply_se_window(self.models, self.settings.se_window)
        scratch: Path | None = None
        if len(self.plan.panels) > 1:
            if self.scratch_dir is not None:  # a name clean_stale_temps knows (pid, host)
                from conic_qp.paths import temp_path

                scratch = temp_path(Path(self.scratch_dir) / "panels")
                scratch.mkdir(parents=True)
            else:
                scratch = Path(tempfile.mkdtemp(prefix="conic-qp-panels-"))
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="conic-qp-read") as reader:
                for panel in self.plan.panels:
                    yield from self._run_panel(panel, reader, scratch)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _run_panel(
        self, panel: Panel, reader: ThreadPoolExecutor, scratch: Path | None
    ) -> Iterator[BlendedBlock]:
        plan, layout, grid = self.plan, self.plan.tiles, self.plan.blocks
        h = plan.shape[0]
        m = grid.margin
        n_rows = grid.rows
        row_spans = [
            (max(0, grid.y_edges[r] - m), min(h, grid.y_edges[r + 1] + m)) for r in range(n_rows)
        ]
        tiles = plan.panel_tiles(panel)
        touches: list[list[int]] = []
        remaining = [0] * n_rows
        for t in tiles:
            w = layout.axis_window(0, t.row)
            nz = np.flatnonzero(w)
            y0, y1 = t.box.y0 + int(nz[0]), t.box.y0 + int(nz[-1]) + 1
            rows = [r for r, (a, b) in enumerate(row_spans) if a < y1 and y0 < b]
            touches.append(rows)
            for r in rows:
                remaining[r] += 1
        bands: dict[int, _Band] = {}
        next_row = 0
        batch_size = self.settings.batch_size
        batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]
        order = {t.index: i for i, t in enumerate(tiles)}

        def band(r: int) -> _Band:
            if r not in bands:
                bands[r] = self._new_band(panel, r, row_spans[r], scratch)
            return bands[r]

        future = reader.submit(self._read_batch, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            assert future is not None
            t0 = time.perf_counter()
            images = future.result()
            self.stats["wait_s"] += time.perf_counter() - t0
            future = (
                reader.submit(self._read_batch, batches[b + 1]) if b + 1 < len(batches) else None
            )
            probs = self._network(batch, images)
            t0 = time.perf_counter()
            for j, t in enumerate(batch):
                weights = torch.from_numpy(layout.weights(t)).to(probs.device)
                for r in touches[order[t.index]]:
                    band(r).add(t, probs[j], weights)
                    remaining[r] -= 1
            del probs, images
            if self._band_device.type == "cuda":
                torch.cuda.synchronize(self._band_device)  # time the blending, not the queue
            self.stats["blend_s"] += time.perf_counter() - t0
            self.tiles_done += len(batch)
            self._report()
            while next_row < n_rows and remaining[next_row] == 0:
                yield from self._finish_row(
                    panel, next_row, bands.pop(next_row, None), row_spans, scratch
                )
                next_row += 1
            _trim_heap()
        while next_row < n_rows:
            yield from self._finish_row(
                panel, next_row, bands.pop(next_row, None), row_spans, scratch
            )
            next_row += 1

    def _new_band(self, panel: Panel, r: int, rows: tuple[int, int], scratch: Path | None) -> _Band:
        channels = self.models.classes.n_classes + 1 + 3
        band = _Band(rows, panel.columns, channels, self._band_device)
        handover = scratch / f"{panel.index - 1}-{r}.npz" if scratch is not None else None
        if handover is not None and handover.exists():
            with np.load(handover) as data:
                for span, key in ((panel.zone_in, "zone"), (panel.carry_in, "carry")):
                    if span is not None:
                        cols = band.columns(span)
                        values = torch.from_numpy(data[key]).to(band.num.device, torch.float64)
                        band.num[..., cols] = values[:-1]
                        band.den[..., cols] = values[-1]
            handover.unlink()
        return band

    def _finish_row(
        self,
        panel: Panel,
        r: int,
        band: _Band | None,
        row_spans: list[tuple[int, int]],
        scratch: Path | None,
    ) -> Iterator[BlendedBlock]:
        if band is None:
            handover = scratch / f"{panel.index - 1}-{r}.npz" if scratch is not None else None
            if handover is None or not handover.exists():
                return  # nothing reaches this block row in this panel
            band = self._new_band(panel, r, row_spans[r], scratch)
        t0 = time.perf_counter()
        n_sem = self.models.classes.n_classes + 1
        covered_t = band.den > 0
        values_t = (band.num / band.den.clamp_min(1e-300)).float()
        values_t[:, ~covered_t] = 0.0
        values_t[0][~covered_t] = 1.0  # uncovered pixels are background in both heads
        values_t[n_sem][~covered_t] = 1.0
        values = values_t.cpu().numpy()
        covered = covered_t.cpu().numpy()
        if scratch is not None and panel.zone_out is not None:
            zc = band.columns(panel.zone_out)
            zone = np.concatenate([values[..., zc], covered[None, :, zc]], axis=0, dtype=np.float32)
            arrays: dict[str, Any] = {"zone": zone}
            if panel.carry_out is not None:
                cc = band.columns(panel.carry_out)
                carry = torch.cat([band.num[..., cc], band.den[None, :, cc]], dim=0)
                arrays["carry"] = carry.cpu().numpy()
            try:
                np.savez(scratch / f"{panel.index}-{r}.npz", **arrays)
            except OSError as exc:  # the scratch folder lives in the output folder
                from conic_qp.errors import OutputError

                raise OutputError.from_os_error(
                    exc, scratch.parent, what="scratch files in"
                ) from exc
        del band, values_t, covered_t
        self.stats["blend_s"] += time.perf_counter() - t0
        grid = self.plan.blocks
        y0 = row_spans[r][0]
        x0 = panel.columns[0]
        for c in range(*panel.block_cols):
            block = grid.block_at(r, c)
            ctx = block.context
            sl = (slice(ctx.y0 - y0, ctx.y1 - y0), slice(ctx.x0 - x0, ctx.x1 - x0))
            if not covered[sl].any():
                continue
            yield BlendedBlock(
                block,
                np.ascontiguousarray(values[(slice(0, n_sem), *sl)]),
                np.ascontiguousarray(values[(slice(n_sem, None), *sl)]),
            )

    # --------------------------------------------------------------------- reading, network

    def _read_batch(self, batch: list[Tile]) -> np.ndarray:
        t0 = time.perf_counter()
        th, tw = self.plan.tiles.tile_shape
        out = np.empty((len(batch), th, tw, 3), np.uint8)
        for j, t in enumerate(batch):
            region = t.read.to_level0(self.plan.origin_xy, self.plan.scale)
            pixels = self.source.read(
                region, self.plan.model_mpp, size=(t.read.width, t.read.height)
            )
            out[j] = t.pad_input(pixels)
        self.stats["read_s"] += time.perf_counter() - t0
        return out

    def _network(self, batch: list[Tile], images: np.ndarray) -> torch.Tensor:
        """Softmax maps (B, C+1+3, th, tw) float32 on the blending device."""
        t0 = time.perf_counter()
        models, settings = self.models, self.settings
        device = network_device(models.networks[0])
        tta = dataclasses.replace(settings.tta, max_batch=settings.batch_size)
        amp = settings.amp and device.type == "cuda"
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        probs = predict_probabilities(
            models.networks,
            x,
            tta,
            seed=tile_seed(settings.seed, batch[0].index),
            amp=amp,
            seeds=[tile_seed(settings.seed, t.index) for t in batch],
        )
        out = torch.cat([probs["semantic"], probs["three_label"]], dim=1).to(self._band_device)
        del probs, x
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the network, not the launch queue
        self.stats["network_s"] += time.perf_counter() - t0
        return out


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only).

    Arrays pickled to and from the workers are allocated and freed in the executor's threads;
    glibc keeps such freed memory in per-thread arenas, and without trimming the process grows
    by about one block per block run (dask does the same for the same reason).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def segment_image(
    image: np.ndarray,
    mpp: float,
    models: ModelSet,
    settings: PredictSettings,
    *,
    executor: Executor | None = None,
) -> tuple[np.ndarray, Any]:
    """Run the whole engine on an in-memory RGB image (every tile, no tissue detection).

    Returns the instance label map at the model's um/px (label ``k`` is row ``k - 1`` of the
    table, see the ``label`` column) and the nucleus table (level-0 = ``image`` px). Used to
    score the engine on labelled tiles and by tests; images smaller than a tile are one tile.
    """
    import pandas as pd

    from conic_qp.plan import plan_slide
    from conic_qp.slides import ImageSource

    settings = dataclasses.replace(settings, tissue_detection=False)
    source = ImageSource(np.ascontiguousarray(image), mpp, name="image")
    plan = plan_slide(source, models.mpp, settings)
    engine = SlideEngine(source, plan, models, settings, executor=executor, want_labels=True)
    labels = np.zeros(plan.shape, np.int32)
    tables = []
    for out in engine:
        assert out.labels is not None
        view = labels[out.block.context.slices]
        mask = out.labels > 0
        view[mask] = out.labels[mask] + out.label_offset
        first = out.label_offset + 1
        tables.append(out.table.assign(label=np.arange(first, first + out.n, dtype=np.int64)))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return labels, table
