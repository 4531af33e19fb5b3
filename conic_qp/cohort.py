"""Cohorts: one serialisable job per slide, one failure-capturing loop, runners, a manifest.

A cohort is many independent slides. Each is described by a :class:`SlideJob` (what to open,
where its outputs go, which checkpoints and settings, the ROI): plain data that round-trips
through JSON, so it can run in this process, in a Dask worker on another machine, or again after
a crash. :func:`run_slide_job` runs one job and returns a :class:`SlideResult` whatever happens:
a slide that fails is a result with ``status="failed"`` and its message, never an exception
(only Ctrl-C and ``SystemExit`` propagate), so one broken slide never stops a cohort.

:func:`run_cohort` is the one loop every command uses (``predict``, ``annotate``, OMERO jobs):
it skips slides already complete (``resume``), hands the rest to a runner, records every
result in the manifest as it arrives and calls back, e.g. to write detections into a QuPath
project, sequentially, in the calling process. Runners:

* :class:`InProcessRunner` (default): slide after slide in this process, sharing one model set
  and one post-processing pool, with tile-level progress;
* :class:`conic_qp.cluster.DaskRunner`: one Dask task per slide on a ``distributed`` cluster
  (local, an existing scheduler, or SLURM/PBS/LSF through dask-jobqueue).

Models are loaded once per process and cached (:func:`cached_models`, keyed by checkpoint
paths, thresholds and device), so a worker that runs a hundred slides loads them once.

The manifest (:class:`Manifest`, Parquet) has one row per slide: status, error, nuclei, tiles,
timings, worker, attempts. It is rewritten atomically after every result, so it is current after
a crash of the client, the scheduler or a worker; resuming trusts each slide's own ``run.json``
(written last, atomically, by the slide's run) rather than the manifest, so nothing a crash
interrupted is ever taken for done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from conic_qp.errors import ConicQPError, NoTissueError, OutputError, render
from conic_qp.run_record import read_record
from conic_qp.sources import SlideRef, open_ref

if TYPE_CHECKING:
    import shapely

    from conic_qp.predict import ModelSet, PredictSettings, Progress

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FILE",
    "STATUSES",
    "BatchResult",
    "CohortResult",
    "InProcessRunner",
    "Manifest",
    "ModelSpec",
    "Runner",
    "SlideJob",
    "SlideResult",
    "SlideTask",
    "cached_models",
    "clear_model_cache",
    "is_done",
    "jobs_for",
    "predict_paths",
    "recorded_stems",
    "run_cohort",
    "run_slide_job",
    "settings_from_json",
    "skipped_result",
]

Status = Literal["done", "failed", "skipped", "no_tissue"]
STATUSES: tuple[str, ...] = ("done", "failed", "skipped", "no_tissue")
JOB_VERSION = 1
MANIFEST_FORMAT = "conic-qp cohort manifest"


# -------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoints to load, with which thresholds, on which device: a model set by name.

    ``paths`` are checkpoint folders (several = an ensemble); ``thresholds`` a thresholds.json
    overriding the first checkpoint's; ``device`` as for :func:`conic_qp.model.resolve_device`
    (each process resolves ``"auto"`` for itself: a GPU worker gets its GPU); ``compile``:
    ``torch.compile`` the networks; ``runtime``: who runs them on a CPU (``torch``, ``auto``,
    ``onnx``, ``openvino``: :func:`conic_qp.runtime.apply_runtime`).
    """

    paths: tuple[str, ...]
    thresholds: str | None = None
    device: str = "auto"
    compile: bool = False
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("a ModelSpec needs at least one checkpoint path")
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))

    @classmethod
    def from_models(
        cls,
        models: ModelSet,
        device: str = "auto",
        *,
        compile: bool = False,
        runtime: str = "torch",
    ) -> ModelSpec:
        """The spec that loads ``models`` again (in another process).

        Raises ValueError for a model set that was not loaded from checkpoint folders (test
        stand-ins): only checkpoints can be loaded elsewhere.
        """
        paths = [str(m.get("path", "")) for m in models.info]
        if not paths or not all(paths) or not all(Path(p, "config.json").is_file() for p in paths):
            raise ValueError(
                "this model set was not loaded from checkpoint folders; load it with "
                "conic_qp.predict.load_models to run it on other processes"
            )
        source = models.thresholds_source
        own = Path(paths[0], "thresholds.json").resolve()
        thresholds: str | None = None
        if source not in ("default", "") and Path(source).resolve() != own:
            thresholds = str(Path(source).resolve())
        return cls(tuple(paths), thresholds, device, compile, runtime)

    def to_json(self) -> dict[str, Any]:
        return {
            "paths": list(self.paths),
            "thresholds": self.thresholds,
            "device": self.device,
            "compile": self.compile,
            "runtime": self.runtime,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(
            tuple(data["paths"]),
            data.get("thresholds"),
            str(data.get("device", "auto")),
            bool(data.get("compile", False)),
            str(data.get("runtime", "torch")),
        )


_MODEL_CACHE: dict[tuple[Any, ...], ModelSet] = {}
_MODEL_LOCK = threading.Lock()


def cached_models(spec: ModelSpec) -> ModelSet:
    """The model set of ``spec``, loaded once per process (per checkpoints, thresholds, device)."""
    from conic_qp.model import resolve_device
    from conic_qp.predict import _compile, load_models

    device = resolve_device(spec.device)
    key = (spec.paths, spec.thresholds, str(device), spec.compile, spec.runtime)
    with _MODEL_LOCK:
        models = _MODEL_CACHE.get(key)
        if models is None:
            models = load_models(list(spec.paths), device=device, thresholds=spec.thresholds)
            if spec.compile:
                models = dataclasses.replace(
                    models, networks=[_compile(n) for n in models.networks]
                )
            elif spec.runtime != "torch":
                from conic_qp.runtime import apply_runtime

                networks = apply_runtime(models.networks, spec.runtime)
                models = dataclasses.replace(models, networks=networks)
            _MODEL_CACHE[key] = models
            log.info("loaded %d model(s) on %s", len(models.networks), device)
        return models


def clear_model_cache() -> None:
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


# ---------------------------------------------------------------------------------- jobs


def settings_from_json(data: Mapping[str, Any]) -> PredictSettings:
    """:class:`~conic_qp.predict.PredictSettings` from its ``to_json`` form."""
    from conic_qp.predict import PredictSettings
    from conic_qp.tta import TTAConfig

    kw = dict(data)
    tta = kw.pop("tta", None)
    names = {f.name for f in dataclasses.fields(PredictSettings)}
    unknown = set(kw) - names
    if unknown:
        raise ValueError(f"unknown PredictSettings fields {sorted(unknown)}")
    if tta is not None:
        kw["tta"] = TTAConfig(**tta)
    return PredictSettings(**kw)


def _geometry_to_hex(geom: shapely.Geometry | None) -> str | None:
    if geom is None:
        return None
    import shapely

    return str(shapely.to_wkb(geom, hex=True))


def _geometry_from_hex(text: str | None) -> shapely.Geometry | None:
    if text is None:
        return None
    import shapely

    return shapely.from_wkb(bytes.fromhex(text))


@dataclass(frozen=True)
class SlideJob:
    """Everything needed to run one slide, anywhere; JSON-serialisable.

    Attributes
    ----------
    ref : the slide.
    out_dir, stem : outputs go to ``out_dir/<stem>.*`` (:func:`conic_qp.predict.output_paths`).
    settings : tiling, TTA, workers... (:class:`~conic_qp.predict.PredictSettings`).
    model : checkpoints to load (None: the runner's own model set; in-process only).
    roi : level-0 geometry the nuclei must lie in (None: the whole tissue).
    mpp : level-0 um/px overriding the slide's metadata.
    force_mpp : accept an ``mpp`` outside the plausible range (:func:`conic_qp.slides.check_mpp`).
    image_id : seeds the stable nucleus ids (default: the slide's name).
    resume : skip the slide when its run.json is complete for the same models.
    key : the slide's row in the manifest (default: ``stem``), unique in a cohort.
    """

    ref: SlideRef
    out_dir: str
    stem: str
    settings: PredictSettings
    model: ModelSpec | None = None
    roi: shapely.Geometry | None = field(default=None, compare=False)
    mpp: float | None = None
    image_id: str | None = None
    resume: bool = False
    key: str = ""
    force_mpp: bool = False

    def __post_init__(self) -> None:
        if not self.stem:
            raise ValueError("a SlideJob needs an output stem")
        object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        if not self.key:
            object.__setattr__(self, "key", self.stem)

    @property
    def outputs(self) -> dict[str, Path]:
        from conic_qp.predict import output_paths

        return output_paths(self.out_dir, self.stem)

    @property
    def slide_path(self) -> str:
        """What run.json records as the slide: the absolute file, or the reference's URI."""
        return str(self.ref.path.resolve()) if self.ref.is_file else self.ref.uri

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JOB_VERSION,
            "ref": self.ref.to_json(),
            "out_dir": self.out_dir,
            "stem": self.stem,
            "settings": self.settings.to_json(),
            "model": self.model.to_json() if self.model is not None else None,
            "roi": _geometry_to_hex(self.roi),
            "mpp": self.mpp,
            "image_id": self.image_id,
            "resume": self.resume,
            "key": self.key,
            "force_mpp": self.force_mpp,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlideJob:
        if int(data.get("version", JOB_VERSION)) > JOB_VERSION:
            raise ValueError(f"SlideJob version {data['version']} is newer than this conic-qp")
        return cls(
            ref=SlideRef.from_json(data["ref"]),
            out_dir=str(data["out_dir"]),
            stem=str(data["stem"]),
            settings=settings_from_json(data["settings"]),
            model=ModelSpec.from_json(data["model"]) if data.get("model") else None,
            roi=_geometry_from_hex(data.get("roi")),
            mpp=float(data["mpp"]) if data.get("mpp") is not None else None,
            image_id=data.get("image_id"),
            resume=bool(data.get("resume", False)),
            key=str(data.get("key") or data["stem"]),
            force_mpp=bool(data.get("force_mpp", False)),
        )


# ------------------------------------------------------------------------------- results


@dataclass
class SlideResult:
    """What became of one slide (``status``: done, failed, skipped, no_tissue).

    ``error`` is the failure's message with its settings marked (render it with
    :meth:`message`); ``outputs`` the files it wrote (or that a skipped run had written).
    """

    key: str
    ref: SlideRef
    status: Status
    outputs: dict[str, Path] = field(default_factory=dict)
    n_nuclei: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    n_tiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: str | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def seconds(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return max(0.0, self.finished - self.started)

    def message(self, flag: Callable[[str, str | None], str] | None = None) -> str:
        """The error with its settings spelled by ``flag`` (the CLI passes its flag names)."""
        return render(self.error or "", flag)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ref"] = self.ref.to_json()
        data["outputs"] = {k: str(v) for k, v in self.outputs.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlideResult:
        kw = dict(data)
        kw["ref"] = SlideRef.from_json(kw["ref"])
        kw["outputs"] = {k: Path(v) for k, v in (kw.get("outputs") or {}).items()}
        return cls(**kw)


def skipped_result(job: SlideJob) -> SlideResult:
    """The result of a slide whose complete run.json is found (``resume``)."""
    run_json = job.outputs["run"]
    data = read_record(run_json)
    now = time.time()
    blank = data.get("status") == "no_tissue"  # still a blank slide (--strict counts it)
    return SlideResult(
        job.key,
        job.ref,
        "no_tissue" if blank else "skipped",
        error=str(data.get("message") or "no tissue") if blank else None,
        outputs={k: run_json.parent / str(v) for k, v in (data.get("outputs") or {}).items()},
        n_nuclei=int(data.get("nuclei", 0)),
        class_counts={str(k): int(v) for k, v in (data.get("class_counts") or {}).items()},
        n_tiles=int((data.get("grid") or {}).get("tiles_run", 0)),
        started=now,
        finished=now,
    )


def is_done(job: SlideJob, fingerprint: str) -> bool:
    """True when the slide's run.json vouches for complete outputs of the same models."""
    from conic_qp.predict import is_complete

    return is_complete(job.outputs["run"], fingerprint)


def _post_executor(workers: int) -> Executor | None:
    """The post-processing pool of this process: processes, or threads inside a daemonic
    process (a Dask worker may not start child processes)."""
    from conic_qp.predict import make_executor

    if workers <= 0:
        return None
    if multiprocessing.current_process().daemon:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conic-qp-post")
    return make_executor(workers)


def run_slide_job(
    job: SlideJob,
    models: ModelSet | None = None,
    *,
    executor: Executor | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    worker: str | None = None,
) -> SlideResult:
    """Run one slide; every failure becomes a ``failed`` result (Ctrl-C propagates).

    Parameters
    ----------
    job : the slide and how to run it.
    models : the model set to use (default: ``job.model``, loaded once per process).
    executor : a post-processing pool to reuse (default: one for this slide, threads in a
        daemonic process).
    on_progress : tile-level progress of this slide.
    worker : recorded in the result (the Dask worker's address).
    """
    from conic_qp.predict import predict_slide, write_no_tissue_outputs

    started = time.time()
    host = worker or socket.gethostname()

    def result(status: Status, **kw: Any) -> SlideResult:
        return SlideResult(job.key, job.ref, status, worker=host, started=started,
                           finished=time.time(), **kw)  # fmt: skip

    own_pool: Executor | None = None
    try:
        if models is None:
            if job.model is None:
                raise ValueError(f"job {job.key} names no model and none was given")
            models = cached_models(job.model)
        if job.resume and is_done(job, models.fingerprint):
            log.info("%s: complete run found, skipped", job.ref.name)
            res = skipped_result(job)
            res.worker = host
            return res
        pool = executor
        if pool is None and job.settings.workers > 0:
            pool = own_pool = _post_executor(job.settings.workers)
        forced = {"force_mpp": True} if job.force_mpp else {}
        with open_ref(job.ref, mpp=job.mpp, **forced) as source:
            try:
                out = predict_slide(
                    source,
                    models,
                    job.settings,
                    job.out_dir,
                    on_progress,
                    job.roi,
                    executor=pool,
                    stem=job.stem,
                    slide_path=job.slide_path,
                    image_id=job.image_id,
                )
            except NoTissueError as exc:  # a blank slide: empty outputs, its own status
                log.warning("%s: %s", job.ref.name, exc)
                outputs = write_no_tissue_outputs(
                    source, models, job.settings, job.out_dir, render(exc.template),
                    stem=job.stem, slide_path=job.slide_path, image_id=job.image_id,
                )  # fmt: skip
                return result("no_tissue", error=exc.template, outputs=dict(outputs))
        return result(
            "done",
            outputs=dict(out.outputs),
            n_nuclei=out.n_nuclei,
            class_counts=dict(out.class_counts),
            n_tiles=out.n_tiles,
            timings={k: round(float(v), 4) for k, v in out.timings.items()},
        )
    except NoTissueError as exc:
        log.warning("%s: %s", job.ref.name, exc)
        return result("no_tissue", error=exc.template)
    except ConicQPError as exc:
        log.error("%s: %s", job.ref.name, exc)
        # e.g. a dropped server connection: the caller may log in again and rerun the slide
        retry = {"retryable": True} if getattr(exc, "retryable", False) else {}
        return result("failed", error=exc.template, extra=retry)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one broken slide must not stop a cohort
        log.exception("%s failed", job.ref.label)
        return result("failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        if own_pool is not None:
            own_pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------ manifest


_MANIFEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "string"),
    ("name", "string"),
    ("ref", "string"),
    ("status", "string"),
    ("error", "string"),
    ("n_nuclei", "int64"),
    ("n_tiles", "int64"),
    ("seconds", "float64"),
    ("started", "timestamp"),
    ("finished", "timestamp"),
    ("worker", "string"),
    ("attempts", "int64"),
    ("fingerprint", "string"),
    ("timings", "string"),
    ("outputs", "string"),
    ("ref_json", "string"),
)


class Manifest:
    """The cohort's table of slides (Parquet), rewritten atomically after every result.

    Rows are keyed by :attr:`SlideJob.key`; a later result of the same key replaces the row
    (a re-run, a resumed cohort). ``load`` keeps the rows of earlier runs that this run does
    not touch.
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: str = "") -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.rows: dict[str, dict[str, Any]] = {}
        #: key -> position: rows are written in this order (a cohort's job order), others after
        self.order: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike[str], fingerprint: str = "") -> Manifest:
        """The manifest at ``path`` (empty if missing or unreadable: it is a record, not state)."""
        manifest = cls(path, fingerprint)
        if manifest.path.is_file():
            try:
                import pyarrow.parquet as pq

                table = pq.read_table(manifest.path)
                for row in table.to_pylist():
                    manifest.rows[str(row["key"])] = row
            except Exception as exc:  # a damaged record must not stop a run
                log.warning("cannot read the manifest %s (%s); starting a new one", path, exc)
        return manifest

    def record(self, result: SlideResult) -> None:
        import datetime as dt

        def stamp(t: float | None) -> dt.datetime | None:
            return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc) if t is not None else None

        row = {
            "key": result.key,
            "name": result.name,
            "ref": result.ref.uri if not result.ref.is_file else result.ref.label,
            "status": result.status,
            "error": result.message() if result.error else None,
            "n_nuclei": int(result.n_nuclei),
            "n_tiles": int(result.n_tiles),
            "seconds": round(result.seconds, 4),
            "started": stamp(result.started),
            "finished": stamp(result.finished),
            "worker": result.worker,
            "attempts": int(result.attempts),
            "fingerprint": self.fingerprint,
            "timings": json.dumps(result.timings, sort_keys=True),
            "outputs": json.dumps({k: str(v) for k, v in result.outputs.items()}, sort_keys=True),
            "ref_json": json.dumps(result.ref.to_json(), sort_keys=True),
        }
        with self._lock:
            self.rows[result.key] = row
            self.write()

    def write(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from conic_qp.sinks import atomic_path

        types = {
            "string": pa.string(),
            "int64": pa.int64(),
            "float64": pa.float64(),
            "timestamp": pa.timestamp("us", tz="UTC"),
        }
        schema = pa.schema([pa.field(name, types[kind]) for name, kind in _MANIFEST_COLUMNS])
        meta = {b"conic_qp": json.dumps({"format": MANIFEST_FORMAT, "version": 1}).encode()}
        columns = {
            name: [row.get(name) for row in self.rows.values()] for name, _ in _MANIFEST_COLUMNS
        }
        table = pa.table(columns, schema=schema.with_metadata(meta))
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        return self.path

    def statuses(self) -> dict[str, str]:
        return {k: str(r.get("status")) for k, r in self.rows.items()}


# -------------------------------------------------------------------------------- runners


class Runner(Protocol):
    """Runs jobs and reports each result as it is known (in any order)."""

    def run(
        self,
        jobs: Sequence[SlideJob],
        on_result: Callable[[SlideResult], None],
        on_start: Callable[[SlideJob], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None: ...


#: What a runner calls per slide: ``task(job, models, executor=..., on_progress=...)``.
SlideTask = Callable[..., SlideResult]


class InProcessRunner:
    """Slide after slide in this process, with one model set and one post-processing pool.

    ``models``: the model set for jobs without a ``model`` (and instead of loading theirs).
    ``task``: the work per slide (default :func:`run_slide_job`); a source whose results go
    elsewhere in the same step (OMERO: predict, then upload) passes its own, which must return a
    :class:`SlideResult` and capture its failures like :func:`run_slide_job`.
    """

    def __init__(self, models: ModelSet | None = None, task: SlideTask | None = None) -> None:
        self.models = models
        self.task = task

    def run(
        self,
        jobs: Sequence[SlideJob],
        on_result: Callable[[SlideResult], None],
        on_start: Callable[[SlideJob], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        if not jobs:
            return
        workers = max(job.settings.workers for job in jobs)
        executor = _post_executor(workers)
        try:
            for i, job in enumerate(jobs):
                if on_start is not None:
                    on_start(job)
                task = self.task or run_slide_job
                on_result(
                    task(
                        job,
                        self.models,
                        executor=executor if job.settings.workers > 0 else None,
                        on_progress=_indexed(on_progress, i, len(jobs)),
                    )
                )
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)


def _indexed(
    cb: Callable[[Progress], None] | None, i: int, n: int
) -> Callable[[Progress], None] | None:
    if cb is None:
        return None

    def wrapped(p: Progress) -> None:
        p.slide_index, p.slides_total = i, n
        cb(p)

    return wrapped


# ------------------------------------------------------------------------------ the loop


@dataclass
class CohortResult:
    """Every slide's result, in job order, and the manifest they were recorded in."""

    results: list[SlideResult]
    manifest: Path | None = None

    def by_status(self, *statuses: str) -> list[SlideResult]:
        return [r for r in self.results if r.status in statuses]

    @property
    def failures(self) -> dict[str, str]:
        """Input label -> message of every failed slide."""
        return {r.ref.label: r.message() for r in self.results if r.status == "failed"}

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def n_nuclei(self) -> int:
        return sum(r.n_nuclei for r in self.results if r.status == "done")


def run_cohort(
    jobs: Sequence[SlideJob],
    *,
    runner: Runner | None = None,
    models: ModelSet | None = None,
    manifest: str | os.PathLike[str] | Manifest | None = None,
    resume: bool = False,
    on_result: Callable[[SlideResult], SlideResult | None] | None = None,
    on_start: Callable[[SlideJob], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> CohortResult:
    """Run ``jobs``; record each result in the manifest as it arrives; go on past failures.

    Parameters
    ----------
    jobs : one per slide; keys must be unique.
    runner : where slides run (default: :class:`InProcessRunner` with ``models``).
    models : the client's model set: its fingerprint decides what ``resume`` skips, and the
        in-process runner runs it.
    manifest : a Parquet path (or a loaded :class:`Manifest`) updated after every result.
    resume : skip slides whose run.json is complete for the same models and thresholds, before
        any is sent to the runner.
    on_result : called in this process, one result at a time, before it is recorded (write-back
        into a project happens here); it may return a replacement result (e.g. ``failed`` when
        the write-back failed).
    on_start : called before a job starts (in-process runner) or is submitted (Dask).
    on_progress : tile-level progress (in-process) and one event per finished slide.
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"SlideJob keys must be unique in a cohort, repeated: {dup[:5]}")
    if runner is None:
        runner = InProcessRunner(models)
    fingerprint = models.fingerprint if models is not None else ""
    book: Manifest | None
    if isinstance(manifest, Manifest):
        book = manifest
    elif manifest is not None:
        book = Manifest.load(manifest, fingerprint)
    else:
        book = None
    if book is not None:
        book.order = {k: i for i, k in enumerate(keys)}
    results: dict[str, SlideResult] = {}
    order = {k: i for i, k in enumerate(keys)}

    def accept(res: SlideResult) -> None:
        if on_result is not None:
            replaced = on_result(res)
            if replaced is not None:
                res = replaced
        results[res.key] = res
        if book is not None:
            try:
                book.record(res)
            except (OSError, OutputError) as exc:  # the record must not stop the cohort
                log.warning("the manifest was not updated: %s", exc)
        if on_progress is not None:
            from conic_qp.predict import Progress

            stage = {"done": "finished", "no_tissue": "finished"}.get(res.status, res.status)
            on_progress(
                Progress(
                    res.name,
                    stage,
                    nuclei=res.n_nuclei,
                    slide_index=order[res.key],
                    slides_total=len(keys),
                )
            )

    from conic_qp.locks import clean_stale_temps

    for folder in sorted({j.out_dir for j in jobs}):
        with contextlib.suppress(OSError):  # leftovers of dead runs on this host
            clean_stale_temps(folder)
    pending: list[SlideJob] = []
    for job in jobs:
        if resume and models is not None and is_done(job, models.fingerprint):
            log.info("%s: complete run found, skipped (resume)", job.ref.name)
            accept(skipped_result(job))
        else:
            pending.append(job)
    if pending:
        runner.run(pending, accept, on_start, on_progress)
    missing = [k for k in keys if k not in results]
    for key in missing:  # a runner that lost a job: never report it as done
        job = jobs[order[key]]
        accept(SlideResult(key, job.ref, "failed", error="the runner returned no result"))
    ordered = sorted(results.values(), key=lambda r: order[r.key])
    return CohortResult(ordered, book.path if book is not None else None)


def jobs_for(
    refs: Iterable[SlideRef],
    out_dir: str | os.PathLike[str],
    settings: PredictSettings,
    *,
    stems: Mapping[SlideRef, str] | None = None,
    model: ModelSpec | None = None,
    roi: shapely.Geometry | None = None,
    mpp: float | None = None,
    resume: bool = False,
) -> list[SlideJob]:
    """One job per reference with the same settings (stems: default from each name)."""
    from conic_qp.predict import slide_stem

    out: list[SlideJob] = []
    for ref in refs:
        stem = stems[ref] if stems is not None else slide_stem(ref.name)
        out.append(
            SlideJob(ref, os.fspath(out_dir), stem, settings, model, roi, mpp, resume=resume)
        )
    return out


# ------------------------------------------------------------------------------ predict


def _distinct_refs(refs: Sequence[SlideRef]) -> list[SlideRef]:
    """``refs`` without repeats of the same slide (the same file by another spelling or link):
    it would run twice into the same outputs."""
    from conic_qp.paths import file_identity

    seen: set[str] = set()
    out: list[SlideRef] = []
    for ref in refs:
        ident = file_identity(ref.location) if ref.is_file else ref.uri
        if ident in seen:
            log.warning("%s is given more than once; it runs once", ref.label)
            continue
        seen.add(ident)
        out.append(ref)
    return out


def recorded_stems(out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Stem -> slide of the run records already in ``out_dir`` (``<stem>.run.json``), so a new
    batch never gives another slide's stem to an input (:func:`conic_qp.paths.unique_stems`)."""
    from conic_qp.outputs import RUN_SUFFIX

    taken: dict[str, str] = {}
    folder = Path(out_dir)
    if not folder.is_dir():
        return taken
    for rec in folder.glob(f"*{RUN_SUFFIX}"):
        try:
            data = json.loads(rec.read_text(encoding="utf-8"))
            slide = data["slide"]["path"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run record conic-qp can read: it names no input
        if isinstance(slide, str) and slide:
            taken[rec.name[: -len(RUN_SUFFIX)]] = slide
    return taken


#: The cohort manifest written beside a batch's outputs (one row per slide).
MANIFEST_FILE = "manifest.parquet"


@dataclass
class BatchResult:
    """Results of :func:`predict_paths`: the slides done, skipped or without tissue
    (``results``), ``failures`` (input -> message) and the whole cohort's record (``cohort``:
    every slide in input order, the manifest)."""

    results: list[SlideResult]
    failures: dict[str, str]
    cohort: CohortResult | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


def predict_paths(
    paths: Sequence[str | os.PathLike[str] | SlideRef],
    models: ModelSet,
    settings: PredictSettings,
    out_dir: str | os.PathLike[str],
    on_progress: Callable[[Progress], None] | None = None,
    roi: shapely.Geometry | None = None,
    *,
    mpp: float | None = None,
    force_mpp: bool = False,
    resume: bool = False,
    compile_models: bool | None = None,
    runner: Runner | None = None,
    manifest: str | os.PathLike[str] | None = None,
    model_spec: ModelSpec | None = None,
) -> BatchResult:
    """Run many slides; a failed slide is recorded and the batch goes on.

    One :class:`~conic_qp.cohort.SlideJob` per slide through :func:`conic_qp.cohort.run_cohort`.

    Parameters
    ----------
    paths : slide files or references (:func:`conic_qp.sources.expand_refs` makes them from
        folders, globs, lists, QuPath projects and OMERO links).
    mpp : level-0 um/px forced for every slide (refused outside 0.1-2 um/px unless
        ``force_mpp``, before anything is written).
    resume : skip slides whose run.json is complete for the same models and thresholds.
    compile_models : ``torch.compile`` the networks (default ``settings.compile``).
    runner : where slides run (default: in this process; a :class:`conic_qp.cluster.DaskRunner`
        runs them on a cluster whose workers load the checkpoints of ``models`` themselves).
    manifest : the cohort's Parquet manifest (default ``<out_dir>/manifest.parquet``).
    model_spec : what a cluster's workers load (default: the checkpoints of ``models`` on
        ``settings.device``; give one to choose compilation or a CPU runtime there).
    """
    from conic_qp.paths import check_output_dir, unique_stems
    from conic_qp.predict import _compile, slide_stem
    from conic_qp.slides import check_mpp

    if mpp is not None:
        check_mpp(mpp, force=force_mpp)
    check_output_dir(out_dir)  # read-only (also for root): refused before the first write
    refs = _distinct_refs([p if isinstance(p, SlideRef) else SlideRef.file(p) for p in paths])
    keys = [r.location if r.is_file else r.uri for r in refs]
    names = {Path(k): r.name for k, r in zip(keys, refs, strict=True)}
    stems = unique_stems(
        keys, stem=lambda p: slide_stem(names.get(p, p.name)), taken=recorded_stems(out_dir)
    )
    compile_nets = compile_models if compile_models is not None else settings.compile
    spec: ModelSpec | None = None
    if runner is None or isinstance(runner, InProcessRunner):
        if compile_nets:
            models = dataclasses.replace(models, networks=[_compile(n) for n in models.networks])
        runner = InProcessRunner(models) if runner is None else runner
    else:
        spec = model_spec or ModelSpec.from_models(models, settings.device, compile=compile_nets)
    jobs = [
        SlideJob(
            ref,
            os.fspath(out_dir),
            stem,
            settings,
            spec,
            roi,
            mpp,
            resume=resume,
            force_mpp=force_mpp,
        )
        for ref, stem in zip(refs, stems, strict=True)
    ]
    cohort = run_cohort(
        jobs,
        runner=runner,
        models=models,
        manifest=manifest if manifest is not None else Path(out_dir) / MANIFEST_FILE,
        resume=resume,
        on_progress=on_progress,
    )
    done = [r for r in cohort.results if r.status != "failed"]
    return BatchResult(done, cohort.failures, cohort)
