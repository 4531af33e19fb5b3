"""OMERO batch jobs: images by id / dataset / project / plate -> model -> results back on OMERO.

:func:`run_omero_image` is the whole work of one image (open, predict, compose, write back,
record), callable from any job runner; :func:`run_omero_images` is the simple in-process loop
over a batch that records failures per image. Local outputs go to an output folder exactly as
``conic-qp predict`` writes them (``<stem>.nuclei.parquet``, ``.geojson.gz``, ``.run.json``),
plus ``<stem>.omero.json``, written last, recording what went to the server: with ``resume``
an image whose record matches the model and write options is skipped, and an image whose
prediction finished but whose upload failed is only uploaded again.

A dropped connection (:class:`~conic_qp.omero.connection.OmeroConnectionLost`) is retried
``retries`` times after logging in again; a prediction that finished is not run twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import shapely

from conic_qp.errors import ConicQPError, option, render
from conic_qp.omero.connection import OmeroConnection, OmeroConnectionLost
from conic_qp.omero.refs import OmeroRef
from conic_qp.omero.results import (
    WriteOptions,
    check_writable,
    image_group,
    write_image_results,
)
from conic_qp.outputs import MANIFEST_FILE
from conic_qp.predict import (
    ModelSet,
    PredictSettings,
    Progress,
    is_complete,
    output_paths,
    predict_slide,
)

log = logging.getLogger(__name__)

__all__ = [
    "OmeroBatchResult",
    "OmeroImageResult",
    "expand_ref",
    "expand_refs",
    "image_stem",
    "load_omero_cohort",
    "run_omero_image",
    "run_omero_images",
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def uploaded(
    out_dir: str | os.PathLike[str], stem: str, fingerprint: str, write: WriteOptions
) -> bool:
    """True when the record of ``stem`` vouches for an upload of the same model and options."""
    rec = _read_json(record_path(out_dir, stem))
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


# ------------------------------------------------------------------------------- one image


def run_omero_image(
    connection: OmeroConnection,
    image_id: int,
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
    executor: Executor | None = None,
    on_progress: ProgressCallback | None = None,
) -> OmeroImageResult:
    """Run one OMERO image end to end and write its results back.

    Parameters
    ----------
    connection : an open :class:`OmeroConnection` (reconnected on a dropped connection).
    image_id : the OMERO image.
    models, settings : as for :func:`conic_qp.predict.predict_slide`.
    out_dir : local output folder (kept for ``resume`` and as a local copy of the results).
    write : what goes to OMERO.
    mpp : level-0 um/px when OMERO has no pixel size (``--mpp``).
    force_mpp : accept an ``mpp`` outside 0.1-2 um/px (``--force-mpp``).
    roi : level-0 geometry to run inside (``--roi``).
    regions : ``"rois"``: the image's OMERO ROIs are composition regions; ``"none"``: the whole
        tissue only.
    inside_rois : run only inside the image's ROIs (when it has any).
    resume : skip an image whose upload record matches; reuse a finished local prediction.
    retries : new logins and attempts after a dropped connection.

    Raises
    ------
    ConicQPError
        Bad input or a server failure after the retries; nothing half-written stays linked to
        the image.
    """
    host, port = connection.credentials.host, connection.credentials.port
    stem = image_stem(host, image_id)
    paths = output_paths(out_dir, stem)
    ref = OmeroRef("image", int(image_id), host, port).uri
    name = f"image {image_id}"
    if resume and uploaded(out_dir, stem, models.fingerprint, write):
        rec = _read_json(record_path(out_dir, stem))
        log.info("image %d: already uploaded (resume), skipped", image_id)
        return OmeroImageResult(
            int(image_id),
            str(rec.get("name") or name),
            "skipped",
            int(rec.get("n_nuclei") or 0),
            outputs=paths,
        )
    attempt = 0
    while True:
        attempt += 1
        try:
            result = _run_once(
                connection,
                int(image_id),
                models,
                settings,
                Path(out_dir),
                stem,
                ref,
                write=write,
                mpp=mpp,
                force_mpp=force_mpp,
                roi=roi,
                regions=regions,
                inside_rois=inside_rois,
                reuse=resume or attempt > 1,
                executor=executor,
                on_progress=on_progress,
            )
            result.attempts = attempt
            return result
        except OmeroConnectionLost as exc:
            if attempt > retries:
                raise
            log.warning("image %d: %s; logging in again (attempt %d)", image_id, exc, attempt + 1)
            connection.reconnect()


def _run_once(
    connection: OmeroConnection,
    image_id: int,
    models: ModelSet,
    settings: PredictSettings,
    out_dir: Path,
    stem: str,
    ref: str,
    *,
    write: WriteOptions,
    mpp: float | None,
    force_mpp: bool,
    roi: shapely.Geometry | None,
    regions: Regions,
    inside_rois: bool,
    reuse: bool,
    executor: Executor | None,
    on_progress: ProgressCallback | None,
) -> OmeroImageResult:
    from conic_qp.omero.regions import read_image_regions
    from conic_qp.omero.source import OmeroSource
    from conic_qp.sinks import write_json_atomic
    from conic_qp.sinks.tables import read_table

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
    paths = output_paths(out_dir, stem)
    check_writable(image, server)
    with image_group(gw, image):
        region_list = read_image_regions(gw, image_id, server) if regions == "rois" else []
        run_roi = roi
        if inside_rois and region_list:
            union = shapely.union_all([r.geometry for r in region_list])
            run_roi = union if run_roi is None else shapely.intersection(run_roi, union)
        if not (reuse and is_complete(paths["run"], models.fingerprint)):
            with OmeroSource(
                gw, image, mpp=mpp, force_mpp=force_mpp, server=server, name=name
            ) as source:
                predict_slide(
                    source,
                    models,
                    settings,
                    out_dir,
                    on_progress,
                    run_roi,
                    executor=executor,
                    stem=stem,
                    slide_path=ref,
                    image_id=ref,
                )
        else:
            log.info("image %d: prediction already complete, uploading it", image_id)
        run = _read_json(paths["run"])
        table = read_table(paths["table"])
        summary = composition_summary(table, region_list, run, name)
        meta = _provenance(run, ref)
        written = write_image_results(
            gw,
            image_id,
            table,
            paths["geojson"] if write.attachment else None,
            summary if write.map else None,
            write,
            metadata=meta,
            server=server,
        )
    record = {
        "format": RECORD_FORMAT,
        "complete": True,
        "image": ref,
        "name": name,
        "fingerprint": models.fingerprint,
        "write": write.to_json(),
        "n_nuclei": len(table),
        "n_regions": len(region_list),
        "written": written.to_json(),
        "created": meta["created"],
    }
    write_json_atomic(record_path(out_dir, stem), record)
    return OmeroImageResult(
        image_id,
        name,
        "done",
        len(table),
        len(region_list),
        dict(paths),
        written.to_json(),
    )


def _provenance(run: dict[str, Any], ref: str) -> dict[str, Any]:
    from conic_qp import __version__

    slide = run.get("slide") or {}
    models = run.get("models") or []
    model = models[0].get("path") if len(models) == 1 and isinstance(models[0], dict) else None
    return {
        "format": "conic-qp nucleus table",
        "version": 1,
        "image": ref,
        "mpp": slide.get("mpp"),
        "dimensions": slide.get("dimensions"),
        "tissue_area_px": run.get("tissue_area_px"),
        "roi_area_px": run.get("roi_area_px"),
        "model": str(model) if model else f"{len(models)}-model ensemble",
        "fingerprint": run.get("fingerprint"),
        "conic_qp_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def composition_summary(
    table: pd.DataFrame, regions: Sequence[Any], run: dict[str, Any], name: str
) -> pd.DataFrame:
    """Summary rows (``conic_qp.composition.summary_table``): the whole run area, then each
    region (centroid rule)."""
    from conic_qp.composition import composition_table, summary_table, whole_region

    classes = table.attrs["classes"]
    mpp = float((table.attrs.get("conic_qp") or {}).get("mpp") or run["slide"]["mpp"])
    area = run.get("roi_area_px") or run.get("tissue_area_px")
    regs = [whole_region(float(area) if area else None), *regions]
    tidy = composition_table(table, regs, classes.names, slide=name, mpp=mpp)
    return summary_table(tidy, classes.names)


# --------------------------------------------------------------------------------- the batch


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
) -> OmeroBatchResult:
    """Run every image of ``refs``; a failed image is recorded and the batch goes on.

    The images are one cohort (:func:`conic_qp.cohort.run_cohort`: the loop every command
    uses, with its manifest ``<out_dir>/manifest.parquet``): each is a
    :class:`~conic_qp.cohort.SlideJob` whose task is :func:`run_omero_image` on this process's
    connection (read, predict, upload, with its reconnecting retries). Writes
    ``omero-run.json`` (server, references, per-image status; no credentials) into ``out_dir``
    at the end.
    """
    from conic_qp.cohort import InProcessRunner, SlideJob, SlideResult, run_cohort
    from conic_qp.sinks import write_json_atomic
    from conic_qp.sources import SlideRef

    ids = expand_refs(connection, refs)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    host, port = connection.credentials.host, connection.credentials.port
    jobs = [
        SlideJob(
            SlideRef("omero", OmeroRef("image", iid, host, port).uri, name=f"image {iid}"),
            os.fspath(out_dir),
            image_stem(host, iid),
            settings,
            roi=roi,
            mpp=mpp,
        )
        for iid in ids
    ]
    by_key = {job.key: iid for job, iid in zip(jobs, ids, strict=True)}
    results: dict[str, OmeroImageResult] = {}

    def task(
        job: SlideJob,
        models: ModelSet | None,
        *,
        executor: Executor | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> SlideResult:
        assert models is not None
        iid = by_key[job.key]
        started = time.time()
        try:
            res = run_omero_image(
                connection, iid, models, settings, out_dir, write=write, mpp=mpp,
                force_mpp=force_mpp, roi=roi, regions=regions, inside_rois=inside_rois,
                resume=resume, retries=retries, executor=executor, on_progress=on_progress,
            )  # fmt: skip
            error = None
        except ConicQPError as exc:
            log.error("image %d: %s", iid, exc)
            res, error = (
                OmeroImageResult(iid, f"image {iid}", "failed", error=str(exc)),
                exc.template,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one broken image must not stop the batch
            log.exception("image %d failed", iid)
            res = OmeroImageResult(
                iid, f"image {iid}", "failed", error=f"{type(exc).__name__}: {exc}"
            )
            error = res.error
        results[job.key] = res
        return SlideResult(
            job.key,
            dataclasses.replace(job.ref, name=res.name),
            res.status,
            outputs=dict(res.outputs) if res.status != "failed" else {},
            n_nuclei=res.n_nuclei,
            error=error,
            started=started,
            finished=time.time(),
            attempts=res.attempts,
            extra={"written": res.written, "n_regions": res.n_regions},
        )

    run_cohort(
        jobs,
        runner=InProcessRunner(models, task=task),
        models=models,
        manifest=Path(out_dir) / MANIFEST_FILE,
        on_progress=on_progress,
    )
    batch = OmeroBatchResult([results[job.key] for job in jobs if job.key in results])
    write_json_atomic(
        Path(out_dir) / BATCH_FILE,
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
