"""Whole-slide inference: models, inputs, one slide (:func:`predict_slide`) and batches.

One slide runs in four steps, each in its own module:

1. **plan** (:func:`conic_qp.plan.plan_slide`): tiles over the slide at the model's um/px that
   touch tissue and the ROI, post-processing blocks and panels;
2. **engine** (:class:`conic_qp.engine.SlideEngine`): network + TTA on the tiles, blending of
   overlapping tiles with a smooth window, post-processing of blocks in worker processes, each
   nucleus kept by exactly one block: an iterator of block outputs;
3. **writers** (:mod:`conic_qp.writers`): Parquet table, QuPath GeoJSON, optional zarr label map,
   built under temporary names and moved into place together;
4. **run record** (:mod:`conic_qp.run_record`): ``<slide>.run.json``, written last; its
   ``"complete": true`` marks a finished slide for ``--resume``.

Outputs per slide under ``out_dir``: ``<slide>.nuclei.parquet``, ``<slide>.geojson.gz``,
optionally ``<slide>.labels.zarr`` and, last, ``<slide>.run.json``. Memory is bounded by the
settings, never by the slide size (see :mod:`conic_qp.engine`); the defaults and their measured
agreement with whole-image inference are in ``docs/inference.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
import torch
from torch import nn

from conic_qp.classes import ClassScheme
from conic_qp.engine import SlideEngine
from conic_qp.errors import ConicQPError, option
from conic_qp.model import resolve_device
from conic_qp.outputs import slide_outputs as output_paths
from conic_qp.plan import SlidePlan, plan_slide
from conic_qp.postprocess import PostprocessParams
from conic_qp.run_record import RUN_FORMAT, RUN_VERSION, build_run_record, is_complete
from conic_qp.runtime import network_device
from conic_qp.settings import PredictSettings
from conic_qp.slides import SLIDE_SUFFIXES, SlideSource
from conic_qp.writers import GeoJSONWriter, LabelMapWriter, SlideWriter, TableWriter

log = logging.getLogger(__name__)

__all__ = [
    "RUN_FORMAT",
    "RUN_VERSION",
    "SLIDE_SUFFIXES",
    "ModelSet",
    "PredictSettings",
    "Progress",
    "SlideResult",
    "default_model_path",
    "expand_inputs",
    "is_complete",
    "load_models",
    "make_executor",
    "output_paths",
    "plan_slide",
    "predict_slide",
    "resolve_device",
    "roi_from_boxes",
    "roi_from_geojson",
    "slide_stem",
    "write_no_tissue_outputs",
]


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
    """What one slide produced (also summarised in its ``run.json``).

    ``plan`` is the plan that ran (its tissue and ROI areas; None for a skipped slide).
    """

    name: str
    outputs: dict[str, Path]
    n_nuclei: int
    class_counts: dict[str, int]
    n_tiles: int
    timings: dict[str, float]
    skipped: bool = False
    plan: SlidePlan | None = None


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
            raise ConicQPError(f"no model given; pass {option('model')} CHECKPOINT")
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
        raise ConicQPError(
            f"no model given; pass {option('model')} CHECKPOINT (a checkpoint folder)"
        )
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
        from conic_qp.inputs import read_json

        tpath = Path(thresholds)
        data = read_json(
            tpath,
            f"thresholds file ({option('thresholds')})",
            "re-run `conic-qp tune` or give the thresholds.json of a checkpoint",
        )
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
    batch can report them as failures instead of stopping. The file-only view of
    :func:`conic_qp.sources.expand_refs` (which also takes QuPath projects and OMERO
    references): references that are not files, or that cannot be opened, count as missing.
    """
    from conic_qp.sources import expand_refs

    refs, missing = expand_refs(items)
    paths: list[Path] = []
    for ref in refs:
        if ref.problem:
            missing[ref.label] = ref.problem
        elif not ref.is_file:
            missing[ref.label] = f"{ref.uri} is not a file; this command reads slide files"
        else:
            paths.append(ref.path)
    return paths, missing


def slide_stem(path: str | os.PathLike[str]) -> str:
    """Output base name of a slide: the file name without its (``.ome``) extension."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def roi_from_boxes(boxes: Sequence[Sequence[float]]) -> shapely.Geometry:
    """Union of level-0 rectangles ``(x, y, w, h)`` (``--roi``)."""
    polys = []
    for b in boxes:
        if len(b) != 4:
            raise ConicQPError(f"{option('roi')} {b} must be x,y,w,h in level-0 pixels")
        x, y, w, h = (float(v) for v in b)
        if not (w > 0 and h > 0) or not all(math.isfinite(v) for v in (x, y, w, h)):
            raise ConicQPError(
                f"{option('roi')} {x},{y},{w},{h}: width and height must be positive"
            )
        polys.append(shapely.box(x, y, x + w, y + h))
    return shapely.union_all(polys)


def roi_from_geojson(path: str | os.PathLike[str]) -> shapely.Geometry:
    """Union of the polygon annotations of a GeoJSON file (level-0 px, ``--roi-geojson``)."""
    from conic_qp.sinks.geojson import read_regions

    regions = read_regions(path)
    if not regions:
        raise ConicQPError(
            f"{option('roi_geojson')} {path} holds no polygon annotations; export annotations (not "
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
    from conic_qp.workers import watch_parent

    watch_parent()  # a killed run must not leave its workers (and the fork server) behind
    # post-processing is single-threaded per tile; parallelism comes from the processes
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


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
    plan: SlidePlan | None = None,
) -> SlideResult:
    """Run one slide and write its outputs under ``out_dir``.

    Parameters
    ----------
    source : an open slide (level-0 um/px known).
    models : networks (already on the device), classes, um/px and thresholds.
    settings : tiling, blending, TTA, device, workers...
    out_dir : output folder (created).
    on_progress : called with a :class:`Progress` after every batch and at each stage.
    roi : level-0 geometry; only nuclei whose centroid lies in it are kept (None: whole slide).
        Ignored when ``plan`` is given (the plan holds its ROI).
    executor : a post-processing pool to reuse across slides (default: one per slide from
        ``settings.workers``).
    stem : output base name (default: from the slide name).
    slide_path, image_id : recorded in run.json / used for stable nucleus ids (default: name).
    plan : a plan made beforehand with :func:`conic_qp.plan.plan_slide` (e.g. by a caller that
        also needs its tissue area); default: planned here.
    """
    t_start = time.perf_counter()
    stem = stem or slide_stem(source.name)
    image_id = image_id or source.name
    paths = output_paths(out_dir, stem)
    from conic_qp.paths import ensure_inside

    for p in paths.values():  # a stem from input data must not reach outside out_dir
        ensure_inside(out_dir, p)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    report = on_progress or (lambda p: None)
    report(Progress(source.name, "tissue"))
    t0 = time.perf_counter()
    if plan is None:
        plan = plan_slide(source, models.mpp, settings, roi)
    timings: dict[str, float] = {"tissue_s": time.perf_counter() - t0}
    n_tiles = len(plan.selected)

    metadata = _table_metadata(source, models, slide_path, image_id)
    own_executor = executor is None and settings.workers > 0
    pool = make_executor(settings.workers) if own_executor else executor
    writers: list[SlideWriter] = []
    try:
        table = TableWriter(
            paths["table"],
            models.classes,
            metadata,
            with_label=settings.save_labels,
            row_group_rows=settings.row_group_rows,
        )
        writers.append(table)
        writers.append(GeoJSONWriter(paths["geojson"], table, models.classes, settings.object_type))
        if settings.save_labels:
            writers.append(
                LabelMapWriter(
                    paths["labels"],
                    plan.shape,
                    chunk=max(256, min(settings.block_size, 1024)),
                    attrs={
                        "mpp": models.mpp,
                        "origin_level0": list(plan.origin_xy),
                        "scale_level0": plan.scale,
                        "slide": slide_path or source.name,
                        "slide_mpp": source.mpp,
                        "ids": "label k is row k-1 of the table and its 'label' column",
                    },
                )
            )
        engine = SlideEngine(
            source,
            plan,
            models,
            settings,
            executor=pool,
            image_id=image_id,
            want_labels=settings.save_labels,
            scratch_dir=out_dir,
            on_progress=lambda done, total, n: report(
                Progress(source.name, "tiles", done, total, n)
            ),
        )
        write_s = 0.0
        for block in engine:
            t0 = time.perf_counter()
            for w in writers:
                w.write(block)
            write_s += time.perf_counter() - t0
        report(Progress(source.name, "writing", n_tiles, n_tiles, engine.n_nuclei))
        t0 = time.perf_counter()
        for w in writers:
            w.close()
        # from here the slide's outputs change: its old run.json no longer vouches for them
        with contextlib.suppress(FileNotFoundError):
            paths["run"].unlink()
        committed = [w.commit() for w in writers]
        writers = []
        if not settings.save_labels and paths["labels"].exists():
            shutil.rmtree(paths["labels"], ignore_errors=True)  # a stale map would not match
        timings.update(engine.stats)
        timings["write_s"] = write_s + time.perf_counter() - t0
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if own_executor and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    timings["total_s"] = time.perf_counter() - t_start
    keys = {v: k for k, v in paths.items()}
    outputs = {keys[p]: p for p in committed}
    counts = dict(table.counts)
    run = build_run_record(
        plan=plan,
        models=models,
        settings=settings,
        slide_path=slide_path or source.name,
        image_id=image_id,
        device=str(network_device(models.networks[0])),
        timings=timings,
        nuclei=engine.n_nuclei,
        class_counts=counts,
        outputs={k: v.name for k, v in outputs.items()},
        n_cut=engine.n_cut,
    )
    from conic_qp.sinks import write_json_atomic

    write_json_atomic(paths["run"], run)
    outputs["run"] = paths["run"]
    report(Progress(source.name, "done", n_tiles, n_tiles, engine.n_nuclei))
    return SlideResult(source.name, outputs, engine.n_nuclei, counts, n_tiles, timings, plan=plan)


def _table_metadata(
    source: SlideSource, models: ModelSet, slide_path: str | None, image_id: str
) -> dict[str, Any]:
    return {
        "format": "conic-qp nucleus table",
        "version": 1,
        "classes": models.classes.to_json(),
        "mpp": float(source.mpp),
        "model": models.info[0] if len(models.info) == 1 else {"ensemble": models.info},
        "slide": slide_path or source.name,
        "image_id": image_id,
    }


def write_no_tissue_outputs(
    source: SlideSource,
    models: ModelSet,
    settings: PredictSettings,
    out_dir: str | os.PathLike[str],
    reason: str,
    *,
    stem: str | None = None,
    slide_path: str | None = None,
    image_id: str | None = None,
) -> dict[str, Path]:
    """Empty outputs for a slide without tissue: a table with no rows, a GeoJSON without
    features and a run.json with ``"status": "no_tissue"``, so a cohort's tables list the slide
    with 0 nuclei instead of leaving it out (and ``--resume`` knows it is done)."""
    from conic_qp.paths import ensure_inside
    from conic_qp.run_record import record_head, versions
    from conic_qp.sinks import write_json_atomic

    stem = stem or slide_stem(source.name)
    image_id = image_id or source.name
    paths = output_paths(out_dir, stem)
    for p in paths.values():
        ensure_inside(out_dir, p)
    table = TableWriter(
        paths["table"],
        models.classes,
        _table_metadata(source, models, slide_path, image_id),
        with_label=settings.save_labels,
    )
    writers: list[SlideWriter] = [
        table,
        GeoJSONWriter(paths["geojson"], table, models.classes, settings.object_type),
    ]
    try:
        for w in writers:
            w.close()
        with contextlib.suppress(FileNotFoundError):
            paths["run"].unlink()
        committed = [w.commit() for w in writers]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    if paths["labels"].exists():
        shutil.rmtree(paths["labels"], ignore_errors=True)  # a stale map would not match
    keys = {v: k for k, v in paths.items()}
    outputs = {keys[p]: p for p in committed}
    run = {
        **record_head(
            models,
            settings,
            slide_path=slide_path or source.name,
            name=source.name,
            image_id=image_id,
            mpp=source.mpp,
            dimensions=source.dimensions,
        ),
        "status": "no_tissue",
        "message": reason,
        "roi": None,
        "roi_area_px": None,
        "tissue_area_px": 0.0,
        "nuclei": 0,
        "class_counts": dict.fromkeys(models.classes.names, 0),
        "outputs": {k: v.name for k, v in outputs.items()},
        "versions": versions(),
    }
    write_json_atomic(paths["run"], run, root=out_dir)
    outputs["run"] = paths["run"]
    return outputs


def _compile(net: nn.Module) -> nn.Module:
    try:
        return torch.compile(net)  # type: ignore[return-value]
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        raise ConicQPError(
            f"torch.compile failed ({exc}); run without {option('compile')}"
        ) from exc
