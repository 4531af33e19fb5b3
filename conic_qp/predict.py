"""Whole-slide inference engine: tissue tiles -> network (+TTA) -> per-tile post-processing.

One slide is a regular :class:`~conic_qp.tiling.TileGrid` over the slide resampled to the
model's um/px. Only tiles whose read box touches tissue (thumbnail mask) and the ROI are run.
Three stages overlap:

* **reading**: a background thread reads and pads the next batch of tiles (tiffslide decodes
  outside the GIL);
* **network**: the main thread runs all TTA passes and ensemble members of a batch on the device
  (:func:`conic_qp.tta.predict_probabilities`);
* **post-processing**: each tile's softmax maps go to a worker process
  (:class:`concurrent.futures.ProcessPoolExecutor`, ``workers``) that keeps the nuclei the tile
  owns (:func:`conic_qp.stitch.process_tile`).

Results are consumed in tile order, so ids and row order do not depend on worker timing. Rows are
appended to a Parquet file row group by row group, the GeoJSON is streamed from that file, and the
optional label map is pasted tile by tile into zarr: memory is bounded by the batch size and the
number of pending tiles, never by the slide size.

Seams. A nucleus is kept by the tile whose core holds its (floored) centroid; with ``halo`` at
least the largest nucleus extent plus the network's context margin, tiled output equals the
whole-image output. Defaults: tile 512, halo 64 px at 0.5 um/px (32 um). The largest nuclei at
0.5 um/px span ~30-40 px (16-20 um elongated fibroblasts/epithelium); the remaining ~24-34 px
cover the context in which a U-Net's prediction still depends on pixels outside the read box.
A U-Net's theoretical receptive field is far larger, but its effective one decays fast: beyond
~30 px the difference is below the post-processing thresholds' sensitivity, so seams are rare
rather than impossible. The cost is (512 / 384)^2 = 1.8x the pixels of the slide; larger tiles
(e.g. 1024, halo 64: 1.3x) are cheaper where device memory allows. Models whose receptive field
fits inside the halo give exactly the whole-image result (tested).

Outputs per slide under ``out_dir`` (all written to temporary names and renamed):
``<slide>.nuclei.parquet``, ``<slide>.geojson.gz``, optionally ``<slide>.labels.zarr`` and,
last, ``<slide>.run.json``, whose presence with ``"complete": true`` marks a finished slide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import torch
from torch import nn

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.model import resolve_device
from conic_qp.objects import table_schema
from conic_qp.postprocess import PostprocessParams
from conic_qp.sinks.geojson import write_geojson
from conic_qp.slides import SlideSource, open_slide, scaled_size
from conic_qp.stitch import LabelMapWriter, TileJob, TileOutput, process_tile
from conic_qp.tiling import Tile, TileGrid
from conic_qp.tissue import mask_region, tissue_mask
from conic_qp.tta import TTAConfig, predict_probabilities

log = logging.getLogger(__name__)

__all__ = [
    "SLIDE_SUFFIXES",
    "BatchResult",
    "ModelSet",
    "PredictSettings",
    "Progress",
    "SlideResult",
    "default_model_path",
    "expand_inputs",
    "load_models",
    "make_executor",
    "output_paths",
    "predict_paths",
    "predict_slide",
    "resolve_device",
    "roi_from_boxes",
    "roi_from_geojson",
    "slide_stem",
]

RUN_FORMAT = "conic-qp predict run"
RUN_VERSION = 1
#: File suffixes taken from a folder given as input (tiffslide formats and plain images).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".scn",
    ".bif",
    ".qptiff",
    ".png",
    ".jpg",
    ".jpeg",
)


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PredictSettings:
    """How a slide is run (the CLI options); stored in ``run.json``.

    Attributes
    ----------
    tile_size, halo : network input size and overlap (model px); see the module docstring.
    batch_size : tiles per network step, and augmented images per forward pass.
    tta : passes, MC dropout and augmentations (paper: 16 passes with MC dropout).
    seed : seeds augmentations and dropout masks per batch, so a run is reproducible.
    device : "auto", "cpu", "cuda", "cuda:1", "mps"; recorded only: the engine runs on the
        device the networks are on (:func:`load_models` puts them there).
    amp : float16 autocast on CUDA (ignored elsewhere).
    compile : ``torch.compile`` the networks in :func:`predict_paths` (first batch is slow).
    workers : post-processing processes; 0 runs it inline in the main process.
    tissue_detection : skip tiles without tissue on the thumbnail.
    thumbnail_size : longer side of the thumbnail used for tissue detection.
    save_labels : also write the slide-wide instance label map (zarr).
    object_type : GeoJSON objects ("detection" or "cell").
    simplify : outline simplification tolerance in model px.
    row_group_rows : nuclei buffered before a Parquet row group is written.
    """

    tile_size: int = 512
    halo: int = 64
    batch_size: int = 4
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConicQPError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.workers < 0:
            raise ConicQPError(f"--workers must be >= 0 (got {self.workers}); 0 = inline")
        if self.thumbnail_size < 16:
            raise ConicQPError(f"thumbnail size {self.thumbnail_size} is too small (>= 16 px)")
        TileGrid((1, 1), self.tile_size, self.halo)  # validates tile size / halo

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tta"] = dataclasses.asdict(self.tta)
        return data


@dataclass
class Progress:
    """Progress of one slide, reported through ``on_progress`` (the engine never prints)."""

    slide: str
    stage: str
    tiles_done: int = 0
    tiles_total: int = 0
    nuclei: int = 0
    slide_index: int = 0
    slides_total: int = 1


ProgressCallback = Callable[[Progress], None]


@dataclass
class SlideResult:
    """What one slide produced (also summarised in its ``run.json``)."""

    name: str
    outputs: dict[str, Path]
    n_nuclei: int
    class_counts: dict[str, int]
    n_tiles: int
    timings: dict[str, float]
    skipped: bool = False


@dataclass
class BatchResult:
    """Results of :func:`predict_paths`; ``failures`` maps input path to the error message."""

    results: list[SlideResult]
    failures: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.failures


# -------------------------------------------------------------------------------------- models


@dataclass
class ModelSet:
    """One model or an ensemble sharing classes and um/px, with its post-processing thresholds.

    ``info`` describes each member for ``run.json`` (path, weights sha256, architecture).
    Any module returning ConicNet's output dict works (tests use fixed stand-ins).
    """

    networks: list[nn.Module]
    classes: ClassScheme
    mpp: float
    params: PostprocessParams
    info: list[dict[str, Any]] = field(default_factory=list)
    thresholds_source: str = "default"

    def __post_init__(self) -> None:
        if not self.networks:
            raise ConicQPError("no model given; pass --model CHECKPOINT")
        if self.params.n_classes != self.classes.n_classes:
            raise ConicQPError(
                f"thresholds are for {self.params.n_classes} classes but the model has "
                f"{self.classes.n_classes}; use the thresholds.json of the same checkpoint"
            )
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ConicQPError(f"model um/px {self.mpp} must be a positive number")

    @property
    def fingerprint(self) -> str:
        """Identity of the models and thresholds: a run with another one is not resumed."""
        ident = {
            "models": [{k: m.get(k) for k in ("weights_sha256", "path")} for m in self.info],
            "thresholds": self.params.to_json(),
            "classes": self.classes.to_json(),
            "mpp": self.mpp,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def to(self, device: torch.device) -> ModelSet:
        for net in self.networks:
            net.to(device)
        return self


#: The model shipped inside the package (see docs/models.md): used when no --model is given.
BUNDLED_MODEL = "demo-consep"


def default_model_path() -> Path | None:
    """The bundled demonstration model's folder, or None if this installation lacks it."""
    from importlib import resources

    path = Path(str(resources.files("conic_qp") / "models" / BUNDLED_MODEL))
    return path if (path / "config.json").is_file() else None


def load_models(
    paths: Sequence[str | os.PathLike[str]],
    device: str | torch.device = "cpu",
    thresholds: str | os.PathLike[str] | None = None,
) -> ModelSet:
    """Load checkpoint folders as one :class:`ModelSet` (several = an ensemble).

    Thresholds come from ``thresholds`` (a thresholds.json) if given, else from the first
    checkpoint, else untuned defaults (with a warning).
    """
    from conic_qp.checkpoint import load_checkpoint

    if not paths:
        raise ConicQPError("no model given; pass --model CHECKPOINT (a checkpoint folder)")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    ckpts = [load_checkpoint(p, device=dev) for p in paths]
    first = ckpts[0]
    for ck in ckpts[1:]:
        if ck.classes.to_json()["classes"] != first.classes.to_json()["classes"]:
            raise ConicQPError(
                f"ensemble members disagree on classes ({ck.path} vs {first.path}); ensemble "
                "only checkpoints trained for the same class list"
            )
        if abs(ck.mpp - first.mpp) > 1e-6 * first.mpp:
            raise ConicQPError(
                f"ensemble members work at different um/px ({ck.mpp} vs {first.mpp}); "
                "ensemble only checkpoints of the same resolution"
            )
    source = "default"
    if thresholds is not None:
        tpath = Path(thresholds)
        try:
            data = json.loads(tpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConicQPError(f"--thresholds {tpath} does not exist; check the path") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConicQPError(f"--thresholds {tpath} is not valid JSON ({exc})") from None
        params = PostprocessParams.from_json(data)
        source = str(tpath)
    elif first.thresholds is not None:
        params = PostprocessParams.from_json(first.thresholds)
        source = str(first.path / "thresholds.json")
    else:
        log.warning("%s has no thresholds.json; using untuned default thresholds", first.path)
        params = PostprocessParams.default(first.classes.n_classes)
    info = [
        {
            "path": str(Path(ck.path).resolve()),
            "weights_sha256": ck.meta.get("weights_sha256"),
            "config": ck.config.to_json(),
            "conic_qp_version": ck.meta.get("conic_qp_version"),
        }
        for ck in ckpts
    ]
    return ModelSet(
        networks=[ck.model for ck in ckpts],
        classes=first.classes,
        mpp=first.mpp,
        params=params,
        info=info,
        thresholds_source=source,
    )


# ---------------------------------------------------------------------------------- inputs


def expand_inputs(items: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], dict[str, str]]:
    """Slide paths from folders, globs, ``.txt`` lists (one path per line) and plain files.

    Returns the unique paths in order and the inputs that matched nothing (with a message), so a
    batch can report them as failures instead of stopping.
    """
    paths: list[Path] = []
    missing: dict[str, str] = {}

    def add(p: Path) -> None:
        if p not in paths:
            paths.append(p)

    for item in items:
        text = str(item)
        p = Path(text).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_slide_name(q))
            if not found:
                missing[text] = f"folder {p} holds no slide files ({', '.join(SLIDE_SUFFIXES)})"
            for q in found:
                add(q)
        elif p.suffix.lower() == ".txt" and p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line).expanduser()
                if not q.is_absolute():
                    q = p.parent / q
                if q.exists():
                    add(q)
                else:
                    missing[line] = f"{q} (listed in {p}) does not exist"
        elif p.exists():
            add(p)
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                missing[text] = f"no file matches {text}"
            for m in matches:
                add(m)
        else:
            missing[text] = f"slide file {p} does not exist; check the path"
    return paths, missing


def _is_slide_name(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES


def slide_stem(path: str | os.PathLike[str]) -> str:
    """Output base name of a slide: the file name without its (``.ome``) extension."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def output_paths(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """Where the outputs of slide ``stem`` go."""
    d = Path(out_dir)
    return {
        "table": d / f"{stem}.nuclei.parquet",
        "geojson": d / f"{stem}.geojson.gz",
        "labels": d / f"{stem}.labels.zarr",
        "run": d / f"{stem}.run.json",
    }


def roi_from_boxes(boxes: Sequence[Sequence[float]]) -> shapely.Geometry:
    """Union of level-0 rectangles ``(x, y, w, h)`` (``--roi``)."""
    polys = []
    for b in boxes:
        if len(b) != 4:
            raise ConicQPError(f"--roi {b} must be x,y,w,h in level-0 pixels")
        x, y, w, h = (float(v) for v in b)
        if not (w > 0 and h > 0) or not all(math.isfinite(v) for v in (x, y, w, h)):
            raise ConicQPError(f"--roi {x},{y},{w},{h}: width and height must be positive")
        polys.append(shapely.box(x, y, x + w, y + h))
    return shapely.union_all(polys)


def roi_from_geojson(path: str | os.PathLike[str]) -> shapely.Geometry:
    """Union of the polygon annotations of a GeoJSON file (level-0 px, ``--roi-geojson``)."""
    from conic_qp.sinks.geojson import read_regions

    regions = read_regions(path)
    if not regions:
        raise ConicQPError(
            f"--roi-geojson {path} holds no polygon annotations; export annotations (not "
            "detections) from QuPath"
        )
    return shapely.union_all([r.geometry for r in regions])


# ---------------------------------------------------------------------------------- engine


def make_executor(workers: int) -> Executor | None:
    """Process pool for post-processing, never forked from this process.

    Forking a process that has started CUDA or torch threads is unsafe, so workers come from a
    fork server (Linux/macOS) or are spawned (Windows).
    """
    if workers <= 0:
        return None
    ctx: multiprocessing.context.BaseContext
    if "forkserver" in multiprocessing.get_all_start_methods():
        # the server imports the main module and post-processing once; workers fork from it
        server = multiprocessing.get_context("forkserver")
        server.set_forkserver_preload(["__main__", "conic_qp.stitch"])
        ctx = server
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)


def _worker_init() -> None:
    # post-processing is single-threaded per tile; parallelism comes from the processes
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


class _Inline:
    """A finished-future stand-in used when ``workers == 0``."""

    def __init__(self, value: TileOutput) -> None:
        self._value = value

    def result(self) -> TileOutput:
        return self._value


def predict_slide(
    source: SlideSource,
    models: ModelSet,
    settings: PredictSettings,
    out_dir: str | os.PathLike[str],
    on_progress: ProgressCallback | None = None,
    roi: shapely.Geometry | None = None,
    *,
    executor: Executor | None = None,
    stem: str | None = None,
    slide_path: str | None = None,
    image_id: str | None = None,
) -> SlideResult:
    """Run one slide and write its outputs under ``out_dir``.

    Parameters
    ----------
    source : an open slide (level-0 um/px known).
    models : networks (already on the device), classes, um/px and thresholds.
    settings : tiling, TTA, device, workers...
    out_dir : output folder (created).
    on_progress : called with a :class:`Progress` after every batch and at each stage.
    roi : level-0 geometry; only nuclei whose centroid lies in it are kept (None: whole slide).
    executor : a post-processing pool to reuse across slides (default: one per slide from
        ``settings.workers``).
    stem : output base name (default: from the slide name).
    slide_path, image_id : recorded in run.json / used for stable nucleus ids (default: name).
    """
    t_start = time.perf_counter()
    stem = stem or slide_stem(source.name)
    image_id = image_id or source.name
    paths = output_paths(out_dir, stem)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    device = _model_device(models)
    timings: dict[str, float] = {}
    report = on_progress or (lambda p: None)
    report(Progress(source.name, "tissue"))

    # -- geometry: the slide at the model's um/px, tiles touching tissue and the ROI
    t0 = time.perf_counter()
    w0, h0 = source.dimensions
    scale = models.mpp / source.mpp  # level-0 px per model px
    width, height = scaled_size((w0, h0), source.mpp, models.mpp)
    grid = TileGrid((height, width), settings.tile_size, settings.halo)
    tissue_area_px = float(w0) * float(h0)  # level-0 px^2; densities per mm^2 of tissue
    if settings.tissue_detection:
        thumb, downsample = source.thumbnail(settings.thumbnail_size)
        mask = tissue_mask(thumb)
        tissue_area_px = float(mask.sum()) * downsample * downsample
        grid = grid.select(mask_region(mask, downsample, (0, 0, w0, h0)))
    tiles = list(grid.tiles())
    if roi is not None and tiles:
        if roi.is_empty:
            raise ConicQPError("the ROI is empty; give --roi x,y,w,h with positive size")
        boxes = shapely.box(
            *np.array(
                [[t.read.x0, t.read.y0, t.read.x1, t.read.y1] for t in tiles], dtype=np.float64
            ).T
            * scale
        )
        tiles = [t for t, hit in zip(tiles, shapely.intersects(roi, boxes), strict=True) if hit]
    timings["tissue_s"] = time.perf_counter() - t0
    if not tiles:
        where = "inside the ROI" if roi is not None else "on the thumbnail"
        raise ConicQPError(
            f"no tissue found in {source.name} {where}; check the slide, or pass --no-tissue "
            "to run every tile"
        )
    log.info("%s: %d of %d tiles to run", source.name, len(tiles), grid.rows * grid.cols)

    # -- outputs (temporary until complete)
    schema = _arrow_schema(models.classes, settings.save_labels)
    metadata = {
        "format": "conic-qp nucleus table",
        "version": 1,
        "classes": models.classes.to_json(),
        "mpp": float(source.mpp),
        "model": models.info[0] if len(models.info) == 1 else {"ensemble": models.info},
        "slide": slide_path or source.name,
        "image_id": image_id,
    }
    table_tmp = _tmp_name(paths["table"])
    geojson_tmp = _tmp_name(paths["geojson"])
    labels: LabelMapWriter | None = None
    own_executor = executor is None and settings.workers > 0
    pool = make_executor(settings.workers) if own_executor else executor
    writer: pq.ParquetWriter | None = None
    try:
        writer = pq.ParquetWriter(str(table_tmp), schema.with_metadata(_pq_meta(metadata)))
        if settings.save_labels:
            labels = LabelMapWriter(
                paths["labels"],
                (height, width),
                chunk=max(256, grid.core_size),
                attrs={
                    "mpp": models.mpp,
                    "origin_level0": [0.0, 0.0],
                    "scale_level0": scale,
                    "slide": slide_path or source.name,
                    "slide_mpp": source.mpp,
                    "ids": "label k is row k-1 of the table and its 'label' column",
                },
            )
        counts = _run_tiles(
            source,
            models,
            settings,
            tiles,
            scale,
            image_id,
            roi,
            pool,
            writer,
            schema,
            labels,
            timings,
            lambda done, n: report(Progress(source.name, "tiles", done, len(tiles), n)),
        )
        t0 = time.perf_counter()
        writer.close()
        writer = None
        report(Progress(source.name, "writing", len(tiles), len(tiles), counts["total"]))
        batches = pq.ParquetFile(table_tmp).iter_batches(batch_size=5000)
        write_geojson(
            (b.to_pandas() for b in batches),
            geojson_tmp,
            models.classes,
            object_type=settings.object_type,
            gzip=True,
        )
        # from here the slide's outputs change: its old run.json no longer vouches for them
        with contextlib.suppress(FileNotFoundError):
            paths["run"].unlink()
        os.replace(table_tmp, paths["table"])
        os.replace(geojson_tmp, paths["geojson"])
        if labels is not None:
            labels.commit()
            labels = None
        elif paths["labels"].exists():
            _remove_tree(paths["labels"])  # a stale map of an earlier run would not match
        timings["write_s"] = timings.get("write_s", 0.0) + time.perf_counter() - t0
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        for tmp in (table_tmp, geojson_tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()
        if labels is not None:
            labels.abort()
        raise
    finally:
        if own_executor and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    timings["total_s"] = time.perf_counter() - t_start
    n_total = counts.pop("total")
    outputs = {k: v for k, v in paths.items() if k != "labels" or settings.save_labels}
    run = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "complete": True,
        "fingerprint": models.fingerprint,
        "slide": {
            "path": slide_path or source.name,
            "name": source.name,
            "image_id": image_id,
            "mpp": float(source.mpp),
            "dimensions": [int(w0), int(h0)],
        },
        "models": models.info,
        "model_mpp": models.mpp,
        "classes": models.classes.to_json(),
        "thresholds": models.params.to_json(),
        "thresholds_source": models.thresholds_source,
        "settings": settings.to_json(),
        "device": str(device),
        "roi": shapely.to_wkt(roi, rounding_precision=2) if roi is not None else None,
        "roi_area_px": float(roi.area) if roi is not None else None,
        "tissue_area_px": tissue_area_px,
        "grid": {
            "shape_model_px": [height, width],
            "tiles_total": grid.rows * grid.cols,
            "tiles_run": len(tiles),
            "core_size": grid.core_size,
        },
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "nuclei": n_total,
        "class_counts": counts,
        "outputs": {k: v.name for k, v in outputs.items() if k != "run"},
        "versions": _versions(),
    }
    from conic_qp.sinks import write_json_atomic

    write_json_atomic(paths["run"], run)
    report(Progress(source.name, "done", len(tiles), len(tiles), n_total))
    return SlideResult(source.name, outputs, n_total, counts, len(tiles), timings)


def _run_tiles(
    source: SlideSource,
    models: ModelSet,
    settings: PredictSettings,
    tiles: list[Tile],
    scale: float,
    image_id: str,
    roi: shapely.Geometry | None,
    pool: Executor | None,
    writer: pq.ParquetWriter,
    schema: pa.Schema,
    labels: LabelMapWriter | None,
    timings: dict[str, float],
    progress: Callable[[int, int], None],
) -> dict[str, int]:
    """The read / network / post-process pipeline; returns nucleus counts per class name."""
    device = _model_device(models)
    tta = dataclasses.replace(settings.tta, max_batch=settings.batch_size)
    amp = settings.amp and device.type == "cuda"
    names = models.classes.names
    counts = dict.fromkeys(names, 0)
    stats = {"read_s": 0.0, "network_s": 0.0, "postprocess_s": 0.0, "wait_s": 0.0, "write_s": 0.0}
    pending: deque[Future[TileOutput] | _Inline] = deque()
    max_pending = max(2, 2 * settings.workers)
    buffer: list[pa.Table] = []
    buffered = 0
    next_id = 1
    done = 0
    n_cut = 0
    tile_by_index = {t.index: t for t in tiles}

    def read_batch(batch: list[Tile]) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.empty((len(batch), settings.tile_size, settings.tile_size, 3), np.uint8)
        for j, t in enumerate(batch):
            region = t.read.to_level0((0.0, 0.0), scale)
            pixels = source.read(region, models.mpp, size=(t.read.width, t.read.height))
            out[j] = t.pad_input(pixels, mode="reflect")
        stats["read_s"] += time.perf_counter() - t0
        return out

    def flush() -> None:
        nonlocal buffer, buffered
        if buffer:
            t0 = time.perf_counter()
            writer.write_table(pa.concat_tables(buffer))
            stats["write_s"] += time.perf_counter() - t0
        buffer, buffered = [], 0

    def consume(item: Future[TileOutput] | _Inline) -> None:
        nonlocal next_id, done, n_cut, buffered
        t0 = time.perf_counter()
        out = item.result()
        stats["wait_s"] += time.perf_counter() - t0
        stats["postprocess_s"] += out.seconds
        t0 = time.perf_counter()
        n = len(out.table)
        n_cut += out.n_cut
        if n:
            table = out.table
            if labels is not None:
                table = table.assign(label=np.arange(next_id, next_id + n, dtype=np.int64))
            buffer.append(pa.Table.from_pandas(table, schema=schema, preserve_index=False))
            buffered += n
            for name, c in table["class_name"].value_counts().items():
                counts[str(name)] += int(c)
        if labels is not None and out.labels is not None:
            labels.paste(tile_by_index[out.index], out.labels, next_id - 1)
        next_id += n
        done += 1
        stats["write_s"] += time.perf_counter() - t0
        if buffered >= settings.row_group_rows:
            flush()

    batches = [
        tiles[i : i + settings.batch_size] for i in range(0, len(tiles), settings.batch_size)
    ]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="conic-qp-read") as reader:
        next_images: Future[np.ndarray] | None = (
            reader.submit(read_batch, batches[0]) if batches else None
        )
        for b, batch in enumerate(batches):
            assert next_images is not None
            t0 = time.perf_counter()
            images = next_images.result()
            stats["wait_s"] += time.perf_counter() - t0
            next_images = (
                reader.submit(read_batch, batches[b + 1]) if b + 1 < len(batches) else None
            )
            t0 = time.perf_counter()
            x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            probs = predict_probabilities(
                models.networks, x, tta, seed=_batch_seed(settings.seed, batch[0].index), amp=amp
            )
            sem = probs["semantic"].cpu().numpy()
            three = probs["three_label"].cpu().numpy()
            stats["network_s"] += time.perf_counter() - t0
            for j, t in enumerate(batch):
                job = TileJob(
                    tile=t,
                    semantic=np.ascontiguousarray(t.crop_output(sem[j]), dtype=np.float32),
                    three_label=np.ascontiguousarray(t.crop_output(three[j]), dtype=np.float32),
                    params=models.params,
                    classes=models.classes,
                    origin_xy=(0.0, 0.0),
                    scale=scale,
                    mpp_level0=source.mpp,
                    image_id=image_id,
                    simplify=settings.simplify,
                    roi=roi,
                    want_labels=labels is not None,
                )
                if pool is None:
                    pending.append(_Inline(process_tile(job)))
                else:
                    pending.append(pool.submit(process_tile, job))
                while len(pending) > max_pending:
                    consume(pending.popleft())
            del probs, sem, three, x, images
            while pending and (pool is None or _is_done(pending[0])):
                consume(pending.popleft())
            progress(done, next_id - 1)
            if pool is not None:
                _trim_heap()
        while pending:
            consume(pending.popleft())
            progress(done, next_id - 1)
    flush()
    if n_cut:
        log.warning(
            "%s: %d nuclei touch a tile edge; raise --halo above %d px for seam-free results",
            source.name,
            n_cut,
            settings.halo,
        )
    timings.update(stats)
    counts_out: dict[str, int] = {"total": next_id - 1}
    counts_out.update(counts)
    return counts_out


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only).

    Tile arrays pickled to and from the workers are allocated and freed in the executor's
    threads; glibc keeps such freed memory in per-thread arenas, and without trimming the
    process grows by about one tile per tile run (dask does the same for the same reason).
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


def _is_done(item: Future[TileOutput] | _Inline) -> bool:
    return isinstance(item, _Inline) or item.done()


def _batch_seed(seed: int, first_tile: int) -> int:
    """Per-batch seed: reproducible and independent of which other slides ran before."""
    return int((int(seed) * 1_000_003 + first_tile) % (2**32))


def _model_device(models: ModelSet) -> torch.device:
    for p in models.networks[0].parameters():
        return p.device
    for b in models.networks[0].buffers():
        return b.device
    return torch.device("cpu")


def _arrow_schema(classes: ClassScheme, with_label: bool) -> pa.Schema:
    types = {
        "str": pa.string(),
        "float64": pa.float64(),
        "float32": pa.float32(),
        "int64": pa.int64(),
        "object": pa.binary(),
    }
    fields = [pa.field(col, types[dtype]) for col, dtype in table_schema(classes).items()]
    if with_label:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


def _pq_meta(metadata: dict[str, Any]) -> dict[bytes, bytes]:
    from conic_qp.sinks.tables import METADATA_KEY

    return {METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode("utf-8")}


def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _versions() -> dict[str, str]:
    from conic_qp import __version__

    out = {
        "conic_qp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }
    for mod in ("timm", "tiffslide", "skimage", "shapely"):
        m = sys.modules.get(mod)
        if m is None:
            with contextlib.suppress(Exception):
                m = __import__(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out


# ------------------------------------------------------------------------------------ batch


def is_complete(run_json: Path, fingerprint: str) -> bool:
    """True when ``run_json`` records a complete run of the same models with its outputs."""
    try:
        data = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or data.get("complete") is not True:
        return False
    if data.get("fingerprint") != fingerprint:
        return False
    outs = data.get("outputs") or {}
    return all((run_json.parent / str(name)).exists() for name in outs.values())


def _unique_stems(paths: Sequence[Path]) -> dict[Path, str]:
    stems = [slide_stem(p) for p in paths]
    dup = {s for s in stems if stems.count(s) > 1}
    return {
        p: (p.name.replace(".", "_") if s in dup else s) for p, s in zip(paths, stems, strict=True)
    }


def predict_paths(
    paths: Sequence[str | os.PathLike[str]],
    models: ModelSet,
    settings: PredictSettings,
    out_dir: str | os.PathLike[str],
    on_progress: ProgressCallback | None = None,
    roi: shapely.Geometry | None = None,
    *,
    mpp: float | None = None,
    resume: bool = False,
    compile_models: bool | None = None,
) -> BatchResult:
    """Run many slides; a failed slide is recorded and the batch goes on.

    Parameters
    ----------
    paths : slide files (see :func:`expand_inputs` for folders, globs and lists).
    mpp : level-0 um/px forced for every slide (``--mpp``).
    resume : skip slides whose run.json is complete for the same models and thresholds.
    compile_models : ``torch.compile`` the networks (default ``settings.compile``).
    """
    slides = [Path(p) for p in paths]
    stems = _unique_stems(slides)
    results: list[SlideResult] = []
    failures: dict[str, str] = {}
    if compile_models if compile_models is not None else settings.compile:
        models = dataclasses.replace(models, networks=[_compile(n) for n in models.networks])
    executor = make_executor(settings.workers)
    try:
        for i, path in enumerate(slides):
            stem = stems[path]
            out = output_paths(out_dir, stem)
            wrap = _with_index(on_progress, i, len(slides))
            if resume and is_complete(out["run"], models.fingerprint):
                log.info("%s: complete run found, skipped (--resume)", path.name)
                data = json.loads(out["run"].read_text(encoding="utf-8"))
                results.append(
                    SlideResult(
                        path.name,
                        {k: out["run"].parent / v for k, v in data.get("outputs", {}).items()},
                        int(data.get("nuclei", 0)),
                        dict(data.get("class_counts", {})),
                        int(data.get("grid", {}).get("tiles_run", 0)),
                        {},
                        skipped=True,
                    )
                )
                if wrap is not None:
                    wrap(Progress(path.name, "skipped"))
                continue
            try:
                with open_slide(path, mpp=mpp) as source:
                    results.append(
                        predict_slide(
                            source,
                            models,
                            settings,
                            out_dir,
                            wrap,
                            roi,
                            executor=executor,
                            stem=stem,
                            slide_path=str(path.resolve()),
                        )
                    )
            except ConicQPError as exc:
                log.error("%s: %s", path.name, exc)
                failures[str(path)] = str(exc)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # one broken slide must not stop a cohort
                log.exception("%s failed", path)
                failures[str(path)] = f"{type(exc).__name__}: {exc}"
            if wrap is not None:
                wrap(Progress(path.name, "failed" if str(path) in failures else "finished"))
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return BatchResult(results, failures)


def _with_index(cb: ProgressCallback | None, i: int, n: int) -> ProgressCallback | None:
    if cb is None:
        return None

    def wrapped(p: Progress) -> None:
        p.slide_index, p.slides_total = i, n
        cb(p)

    return wrapped


def _compile(net: nn.Module) -> nn.Module:
    try:
        return torch.compile(net)  # type: ignore[return-value]
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        raise ConicQPError(f"torch.compile failed ({exc}); run without --compile") from exc
