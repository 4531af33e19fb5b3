"""OMERO batch jobs: images by id / dataset / project / plate -> model -> results back on OMERO.

:func:`run_omero_images` runs a batch as a cohort (:func:`conic_qp.cohort.run_cohort`): the
client looks every image up, refuses what it cannot write and reads its ROIs; one
:class:`~conic_qp.cohort.SlideJob` per image, naming it by ``omero://host:port/image/ID`` only
(no credentials), is predicted by :func:`run_omero_job` in this process or on Dask workers,
which open the image through the ``omero`` scheme with a login of their own; the client then
uploads each finished image through :class:`~conic_qp.omero.sinks.OmeroSink`, one at a time.

Local outputs go to an output folder exactly as ``conic-qp predict`` writes them
(``<stem>.nuclei.parquet``, ``.geojson.gz``, ``.run.json``), plus ``<stem>.omero.json``,
written last, recording what went to the server: with ``resume`` an image whose record matches
the model and write options is skipped, and an image whose prediction finished but whose upload
failed is only uploaded again.

A dropped connection (:class:`~conic_qp.omero.connection.OmeroConnectionLost`) is retried
``retries`` times after logging in again, in the prediction and in the upload; a prediction
that finished is not run twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import shapely

from conic_qp.errors import ConicQPError, option, render
from conic_qp.omero.connection import OmeroConnection
from conic_qp.omero.refs import OmeroRef
from conic_qp.omero.results import WriteOptions, check_writable, image_group
from conic_qp.outputs import MANIFEST_FILE
from conic_qp.predict import ModelSet, PredictSettings, Progress, is_complete, output_paths
from conic_qp.run_record import read_record

if TYPE_CHECKING:
    from conic_qp.cohort import ModelSpec, Runner, SlideJob, SlideResult

log = logging.getLogger(__name__)

__all__ = [
    "OmeroBatchResult",
    "OmeroImageResult",
    "expand_ref",
    "expand_refs",
    "image_stem",
    "load_omero_cohort",
    "local_worker_env",
    "run_omero_images",
    "run_omero_job",
    "run_omero_job_task",
]

RECORD_FORMAT = "conic-qp omero upload"
BATCH_FILE = "omero-run.json"
Regions = Literal["rois", "none"]
ProgressCallback = Callable[[Progress], None]


@dataclass
class OmeroImageResult:
    """What happened to one image."""

    image_id: int
    name: str
    status: Literal["done", "skipped", "failed"]
    n_nuclei: int = 0
    n_regions: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    written: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    #: the error with its settings marked (:func:`conic_qp.errors.option`), for the CLI
    error_template: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("error_template")
        out["outputs"] = {k: v.name for k, v in self.outputs.items()}
        return out


@dataclass
class OmeroBatchResult:
    images: list[OmeroImageResult]

    @property
    def failures(self) -> dict[str, str]:
        return {f"image {r.image_id}": str(r.error) for r in self.images if r.status == "failed"}

    def failure_messages(
        self, flag: Callable[[str, str | None], str] | None = None
    ) -> dict[str, str]:
        """:attr:`failures` with the settings in each message spelled by ``flag``."""
        return {
            f"image {r.image_id}": render(r.error_template or str(r.error), flag)
            for r in self.images
            if r.status == "failed"
        }

    @property
    def ok(self) -> bool:
        return not self.failures


def image_stem(host: str, image_id: int) -> str:
    """Local output base name of an OMERO image: server and id, file-system safe."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", host.split("://")[-1]).strip("-.") or "omero"
    return f"{slug}_image-{int(image_id)}"


def record_path(out_dir: str | os.PathLike[str], stem: str) -> Path:
    return Path(out_dir) / f"{stem}.omero.json"


def uploaded(
    out_dir: str | os.PathLike[str], stem: str, fingerprint: str, write: WriteOptions
) -> bool:
    """True when the record of ``stem`` vouches for an upload of the same model and options."""
    rec = read_record(record_path(out_dir, stem))
    return (
        rec.get("format") == RECORD_FORMAT
        and rec.get("complete") is True
        and rec.get("fingerprint") == fingerprint
        and rec.get("write") == write.to_json()
        and is_complete(output_paths(out_dir, stem)["run"], fingerprint)
    )


# --------------------------------------------------------------------------------- expansion


def expand_refs(connection: OmeroConnection, refs: Sequence[OmeroRef]) -> list[int]:
    """Image ids of ``refs`` (images, datasets, projects, plates), in order, each once.

    Raises
    ------
    ConicQPError
        A container that does not exist (or is not visible), a reference to another server, or
        no image at all.
    """
    gw = connection.gateway
    host = connection.credentials.host
    ids: list[int] = []
    for ref in refs:
        if ref.host and ref.host.lower() != host.lower():
            raise ConicQPError(
                f"{ref.uri} is on {ref.host} but the connection is to {host}; run each server "
                "separately"
            )
        with connection.call(f"listing the images of {ref.kind} {ref.id}"):
            found = _images_of(gw, ref)
        if not found and ref.kind != "image":
            log.warning("%s %d holds no images", ref.kind, ref.id)
        ids.extend(found)
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise ConicQPError("no OMERO image to run: the given containers hold no images")
    return unique


def expand_ref(ref: Any) -> list[Any]:
    """The image references of an OMERO dataset/project/plate reference (images: itself)."""
    from conic_qp.omero.refs import parse_ref
    from conic_qp.omero.source import _connection_for
    from conic_qp.sources import SlideRef

    parsed = parse_ref(ref.location)
    if parsed.kind == "image":
        return [ref]
    conn = _connection_for(parsed.host, parsed.port)
    host, port = conn.credentials.host, conn.credentials.port
    return [
        SlideRef("omero", OmeroRef("image", iid, host, port).uri, name=f"image {iid}")
        for iid in expand_refs(conn, [parsed])
    ]


def _images_of(gw: Any, ref: OmeroRef) -> list[int]:
    if ref.kind == "image":
        return [ref.id]
    obj = gw.getObject(ref.kind.capitalize(), ref.id)
    if obj is None:
        raise ConicQPError(
            f"OMERO {ref.kind} {ref.id} was not found (or you cannot see it); check the id and "
            f"the group ({option('group')})"
        )
    if ref.kind == "dataset":
        return sorted(int(im.getId()) for im in gw.getObjects("Image", opts={"dataset": ref.id}))
    if ref.kind == "project":
        out: list[int] = []
        datasets = sorted(
            gw.getObjects("Dataset", opts={"project": ref.id}), key=lambda d: d.getId()
        )
        for ds in datasets:
            out.extend(
                sorted(
                    int(im.getId()) for im in gw.getObjects("Image", opts={"dataset": ds.getId()})
                )
            )
        return out
    out = []
    for well in sorted(obj.listChildren(), key=lambda w: (w.getRow() or 0, w.getColumn() or 0)):
        for ws in well.listChildren():
            image = ws.getImage()
            if image is not None:
                out.append(int(image.getId()))
    return out


# ------------------------------------------------------------------------------- the batch


def run_omero_job(
    job: SlideJob,
    models: ModelSet | None = None,
    *,
    retries: int = 1,
    executor: Executor | None = None,
    on_progress: ProgressCallback | None = None,
    worker: str | None = None,
) -> SlideResult:
    """Predict one OMERO image (:func:`conic_qp.cohort.run_slide_job`), logging in again and
    rerunning it up to ``retries`` times when the connection drops. Runs wherever the job
    runs: the connection is this process's (:func:`conic_qp.omero.source.open_ref`: the one
    the client registered, or on a worker a login from the worker's own environment)."""
    from conic_qp.cohort import run_slide_job
    from conic_qp.omero.refs import parse_ref
    from conic_qp.omero.source import _connection_for

    attempt = 0
    while True:
        attempt += 1
        res = run_slide_job(job, models, executor=executor, on_progress=on_progress, worker=worker)
        res.attempts = attempt
        if res.status != "failed" or not res.extra.get("retryable") or attempt > retries:
            return res
        log.warning("%s: %s; logging in again (attempt %d)", job.ref.name, res.message(),
                    attempt + 1)  # fmt: skip
        parsed = parse_ref(job.ref.location)
        try:
            _connection_for(parsed.host, parsed.port).reconnect()
        except ConicQPError as exc:
            log.error("%s: %s", job.ref.name, exc)
            return res


def run_omero_job_task(job: SlideJob, retries: int = 1) -> SlideResult:
    """A Dask task: :func:`run_omero_job` on this worker (models from the worker's cache)."""
    from conic_qp.cluster import worker_name

    return run_omero_job(job, retries=retries, worker=worker_name())


def local_worker_env(connection: OmeroConnection) -> dict[str, str]:
    """Environment that lets the processes of a **local** Dask cluster log in as this process
    did: its session key (``--session-key``, ``OMERO_SESSION_KEY`` or the ``omero login``
    session: workers join the same session). Empty for a password login: the workers inherit
    ``OMERO_USER``/``OMERO_PASSWORD`` from this process's environment. Only ever handed to
    processes this one starts (never to jobs, job scripts or files)."""
    c = connection.credentials
    if not c.session_key:
        return {}
    from conic_qp.omero.connection import ENV_HOST, ENV_PORT, ENV_SESSION_KEY

    return {ENV_SESSION_KEY: c.session_key, ENV_HOST: c.host, ENV_PORT: str(c.port)}


@dataclass
class _Planned:
    image_id: int
    name: str
    regions: list[Any]
    job: SlideJob


def _plan_image(
    connection: OmeroConnection,
    image_id: int,
    job: SlideJob,
    *,
    regions: Regions,
    inside_rois: bool,
) -> _Planned:
    """Look the image up, refuse what cannot be written, read its ROIs: in the client, before
    any prediction (hours of it must not end in "no permission to annotate")."""
    from conic_qp.omero.regions import read_image_regions

    gw = connection.gateway
    server = connection.server
    if connection.group_id is None:
        gw.SERVICE_OPTS.setOmeroGroup(-1)  # find the image in any of the user's groups
    with connection.call(f"looking up image {image_id}"):
        image = gw.getObject("Image", image_id)
    if image is None:
        where = "" if connection.group_id is None else f" in group {connection.credentials.group!r}"
        raise ConicQPError(
            f"OMERO image {image_id} was not found on {server}{where}, or you have no "
            "permission to see it; check the id" + (f" and {option('group')}" if where else "")
        )
    name = f"{image.getName()} [image {image_id}]"
    check_writable(image, server)
    with image_group(gw, image):
        region_list = read_image_regions(gw, image_id, server) if regions == "rois" else []
    run_roi = job.roi
    if inside_rois and region_list:
        union = shapely.union_all([r.geometry for r in region_list])
        run_roi = union if run_roi is None else shapely.intersection(run_roi, union)
    ref = dataclasses.replace(job.ref, name=name)
    return _Planned(image_id, name, region_list, dataclasses.replace(job, ref=ref, roi=run_roi))


def run_omero_images(
    connection: OmeroConnection,
    refs: Sequence[OmeroRef],
    models: ModelSet,
    settings: PredictSettings,
    out_dir: str | os.PathLike[str],
    *,
    write: WriteOptions,
    mpp: float | None = None,
    force_mpp: bool = False,
    roi: shapely.Geometry | None = None,
    regions: Regions = "rois",
    inside_rois: bool = False,
    resume: bool = False,
    retries: int = 1,
    on_progress: ProgressCallback | None = None,
    runner: Runner | None = None,
    model_spec: ModelSpec | None = None,
) -> OmeroBatchResult:
    """Run every image of ``refs``; a failed image is recorded and the batch goes on.

    Each image is a :class:`~conic_qp.cohort.SlideJob` of an ``omero://host:port/image/ID``
    reference (no credentials) run through :func:`conic_qp.cohort.run_cohort` (manifest
    ``<out_dir>/manifest.parquet``). This process looks each image up, refuses what it cannot
    write and reads its ROIs; the prediction runs on ``runner`` (default: here, on this
    connection; a :class:`conic_qp.cluster.DaskRunner`: on the workers, which log in
    themselves); the results go to OMERO from this process, one image at a time, through
    :class:`~conic_qp.omero.sinks.OmeroSink`, once an image's prediction is complete.

    Parameters
    ----------
    connection : an open :class:`OmeroConnection` (reconnected on a dropped connection).
    refs : images, datasets, projects, plates.
    models, settings : as for :func:`conic_qp.predict.predict_slide`.
    out_dir : local output folder (kept for ``resume`` and as a local copy of the results).
    write : what goes to OMERO.
    mpp : level-0 um/px when OMERO has no pixel size.
    force_mpp : accept an ``mpp`` outside 0.1-2 um/px.
    roi : level-0 geometry to run inside.
    regions : ``"rois"``: the image's OMERO ROIs are composition regions; ``"none"``: the whole
        tissue only.
    inside_rois : run only inside the image's ROIs (when it has any).
    resume : skip an image whose upload record matches; reuse a finished local prediction.
    retries : new logins and attempts after a dropped connection (prediction and upload).
    runner : where predictions run (default: this process).
    model_spec : what a cluster's workers load (default: the checkpoints of ``models``).

    Writes ``omero-run.json`` (server, references, per-image status; no credentials) into
    ``out_dir`` at the end.
    """
    from conic_qp.cohort import (
        InProcessRunner,
        Manifest,
        ModelSpec,
        SlideJob,
        SlideResult,
        run_cohort,
    )
    from conic_qp.omero.sinks import OmeroSink
    from conic_qp.omero.source import register_connection, unregister_connection
    from conic_qp.sinks import write_json_atomic
    from conic_qp.sources import SlideRef

    if retries < 0:
        raise ValueError("retries must be >= 0")
    ids = expand_refs(connection, refs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host, port = connection.credentials.host, connection.credentials.port
    remote = runner is not None and not isinstance(runner, InProcessRunner)
    spec = (model_spec or ModelSpec.from_models(models, settings.device)) if remote else None
    if runner is None:
        runner = InProcessRunner(models, task=functools.partial(run_omero_job, retries=retries))
    sink = OmeroSink(connection, write, retries=retries)
    book = Manifest.load(out / MANIFEST_FILE, models.fingerprint)
    results: dict[str, OmeroImageResult] = {}
    planned: dict[str, _Planned] = {}
    keys: list[str] = []

    def settle(res: SlideResult, image: OmeroImageResult) -> None:
        results[res.key] = image
        with contextlib.suppress(OSError):  # the record must not stop the batch
            book.record(res)

    for iid in ids:
        ref = OmeroRef("image", iid, host, port).uri
        stem = image_stem(host, iid)
        keys.append(stem)
        job = SlideJob(SlideRef("omero", ref, name=f"image {iid}"), os.fspath(out), stem,
                       settings, spec, roi, mpp, image_id=ref, resume=resume,
                       force_mpp=force_mpp)  # fmt: skip
        now = time.time()
        if resume and uploaded(out, stem, models.fingerprint, write):
            rec = read_record(record_path(out, stem))
            log.info("image %d: already uploaded (resume), skipped", iid)
            name = str(rec.get("name") or f"image {iid}")
            image = OmeroImageResult(iid, name, "skipped", int(rec.get("n_nuclei") or 0),
                                     int(rec.get("n_regions") or 0), output_paths(out, stem))  # fmt: skip
            settle(SlideResult(stem, job.ref, "skipped", n_nuclei=image.n_nuclei, started=now,
                               finished=now), image)  # fmt: skip
            continue
        try:
            planned[stem] = _plan_image(connection, iid, job, regions=regions,
                                        inside_rois=inside_rois)  # fmt: skip
        except ConicQPError as exc:
            log.error("image %d: %s", iid, exc)
            settle(
                SlideResult(stem, job.ref, "failed", error=exc.template, started=now,
                            finished=time.time()),
                OmeroImageResult(iid, f"image {iid}", "failed", error=str(exc),
                                 error_template=exc.template),
            )  # fmt: skip

    def deliver(res: SlideResult) -> SlideResult:
        plan = planned[res.key]
        res = dataclasses.replace(res, ref=plan.job.ref)
        image = _deliver(plan, res, sink, models, out)
        results[res.key] = image
        if res.status not in ("done", "skipped"):
            return res  # failed or without tissue, as the prediction said: nothing uploaded
        if image.status == "failed":
            error = image.error_template or image.error
            return dataclasses.replace(res, status="failed", error=error)
        extra = {"written": image.written, "n_regions": image.n_regions}
        return dataclasses.replace(res, status="done", n_nuclei=image.n_nuclei, extra=extra)

    register_connection(connection)
    try:
        run_cohort(
            [p.job for p in planned.values()],
            runner=runner,
            models=models,
            manifest=book,
            on_result=deliver,
            on_progress=on_progress,
        )
    finally:
        unregister_connection(connection)
        sink.close(True)
    batch = OmeroBatchResult([results[k] for k in keys if k in results])
    write_json_atomic(
        out / BATCH_FILE,
        {
            "format": "conic-qp omero batch",
            "server": connection.server,
            "references": [r.uri for r in refs],
            "write": write.to_json(),
            "fingerprint": models.fingerprint,
            "images": [r.to_json() for r in batch.images],
        },
    )
    return batch


def _deliver(
    plan: _Planned, res: SlideResult, sink: Any, models: ModelSet, out: Path
) -> OmeroImageResult:
    """Upload one predicted image through the sink and record it; failures become results."""
    from conic_qp.sinks import write_json_atomic
    from conic_qp.sinks.detections import Detections

    iid, name = plan.image_id, plan.name
    if res.status not in ("done", "skipped"):  # failed, or no tissue: nothing to upload
        return OmeroImageResult(iid, name, "failed", error=res.message(),
                                attempts=res.attempts, error_template=res.error)  # fmt: skip
    if res.status == "skipped":
        log.info("image %d: prediction already complete, uploading it", iid)
    paths = output_paths(out, plan.job.stem)
    try:
        delivery = sink.write(
            Detections(str(iid), name, paths["table"], models.classes, tuple(plan.regions),
                       object_type=plan.job.settings.object_type, outputs=paths)
        )  # fmt: skip
    except ConicQPError as exc:
        log.error("image %d: %s", iid, exc)
        return OmeroImageResult(iid, name, "failed", error=str(exc), attempts=res.attempts,
                                error_template=exc.template)  # fmt: skip
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one broken image must not stop the batch
        log.exception("image %d: writing the results failed", iid)
        error = f"{type(exc).__name__}: {exc}"
        return OmeroImageResult(iid, name, "failed", error=error, attempts=res.attempts)
    n_nuclei = int(delivery.counts_by_parent.get(None, res.n_nuclei))
    record = {
        "format": RECORD_FORMAT,
        "complete": True,
        "image": plan.job.ref.uri,
        "name": name,
        "fingerprint": models.fingerprint,
        "write": sink.options.to_json(),
        "n_nuclei": n_nuclei,
        "n_regions": len(plan.regions),
        "written": delivery.record,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(record_path(out, plan.job.stem), record)
    return OmeroImageResult(iid, name, "done", n_nuclei, len(plan.regions), dict(paths),
                            dict(delivery.record), attempts=res.attempts)  # fmt: skip


def load_omero_cohort(
    connection: OmeroConnection,
    refs: Sequence[OmeroRef],
    workdir: str | os.PathLike[str] | None = None,
    *,
    regions: Regions = "rois",
) -> tuple[list[Any], dict[str, str], tempfile.TemporaryDirectory[str] | None]:
    """:class:`conic_qp.composition.SlideInput` s of OMERO images, read back from their
    conic-qp tables, with their ROIs as regions (else the area the run covered).

    The tables are written as local Parquet files under ``workdir`` (a temporary folder when
    ``None``; it is returned so the caller keeps it alive while composing).
    """
    from conic_qp.composition import SlideInput, whole_region
    from conic_qp.omero.regions import read_image_regions
    from conic_qp.omero.results import read_image_table
    from conic_qp.sinks.tables import write_table

    tmp = tempfile.TemporaryDirectory(prefix="conic-qp-omero-") if workdir is None else None
    where = Path(tmp.name if tmp is not None else workdir)  # type: ignore[arg-type]
    where.mkdir(parents=True, exist_ok=True)
    gw = connection.gateway
    if connection.group_id is None:
        gw.SERVICE_OPTS.setOmeroGroup(-1)
    slides: list[Any] = []
    failures: dict[str, str] = {}
    for iid in expand_refs(connection, refs):
        label = f"image {iid}"
        try:
            df = read_image_table(gw, iid, connection.server)
            info = df.attrs.get("conic_qp") or {}
            classes = df.attrs.get("classes")
            if classes is None or info.get("mpp") is None:
                raise ConicQPError(f"the conic-qp table of image {iid} lacks classes or um/px")
            df.attrs = {}  # provenance goes into the Parquet metadata below, not pandas attrs
            path = write_table(
                df,
                where / f"{image_stem(connection.credentials.host, iid)}.nuclei.parquet",
                classes=classes,
                mpp=float(info["mpp"]),
                metadata=info,
            )
            regs = read_image_regions(gw, iid, connection.server) if regions == "rois" else []
            if regs:
                slides.append(SlideInput(label, path, regs, "omero rois"))
            else:
                area = info.get("roi_area_px") or info.get("tissue_area_px")
                slides.append(
                    SlideInput(label, path, [whole_region(float(area) if area else None)], "whole")
                )
        except ConicQPError as exc:
            failures[label] = str(exc)
            log.error("%s: %s", label, exc)
    return slides, failures, tmp
