"""``conic-qp annotate``: run a model over the images of a QuPath project and write detections back.

For every selected image of the project (:func:`conic_qp.qupath.project.read_project` resolves
the files, with ``remap`` and relative search when the project moved):

0. image URIs: an image found elsewhere than its URI gets its URI rewritten in
   ``project.qpproj`` (:func:`conic_qp.qupath.project.fix_image_uris`, backup first), because
   headless QuPath opens images only at their stored URIs (``fix_uris=False`` leaves them);
1. regions: the image's annotations (``--regions-geojson DIR``; with paquo the project's own
   annotations; else the project's ``regions/<entryID>.geojson`` written by
   ``groovy/export_annotations_geojson.groovy``), or the whole tissue;
2. inference inside those regions (:func:`conic_qp.predict.predict_slide`), whose outputs go to
   ``<project>/conic-qp/<entryID>.nuclei.parquet`` (+ ``.geojson.gz``, ``.run.json``);
3. detections back to QuPath, each under the annotation QuPath would make its parent
   (:func:`conic_qp.composition.parent_regions`), so QuPath's per-annotation counts equal
   ``conic-qp composition``'s without resolving the hierarchy:

   - ``geojson`` backend (no Java needed): ``<project>/detections/<entryID>/`` (chunk files
     grouped by parent annotation + ``manifest.json``,
     :func:`conic_qp.sinks.geojson.write_detection_folder`), the model's classes merged into
     ``classifiers/classes.json`` and ``<project>/groovy/import_conic_qp.groovy``; one QuPath
     command imports everything (:func:`import_command`), replacing earlier conic-qp
     detections and adding the regions as annotations to images that have none;
   - ``paquo`` backend: straight into the project's data files
     (:mod:`conic_qp.qupath.paquo_io`), one save per image.

Safety: the project is parsed (and refused when malformed, locked by a QuPath save, or read-only)
before anything is written; every QuPath file is backed up before it changes; every file is
written to a temporary name and renamed. An image that fails is recorded and the others go on;
``<project>/conic-qp/run.json`` lists what was done, even when the run is interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import shapely

from conic_qp.cohort import InProcessRunner, ModelSpec, Runner, SlideJob, SlideResult, run_cohort
from conic_qp.errors import ConicQPError, OutputError, option, render
from conic_qp.outputs import (
    ANNOTATE_DIR,
    ANNOTATE_RUN_FILE,
    MANIFEST_FILE,
    entry_stem,
    region_file,
    regions_path,
    used_regions_path,
)
from conic_qp.predict import ModelSet, PredictSettings, Progress
from conic_qp.qupath.classes import classes_path as qupath_classes_path
from conic_qp.qupath.classes import read_path_classes
from conic_qp.qupath.project import (
    ProjectImage,
    QuPathProject,
    UriFix,
    find_project_file,
    fix_image_uris,
    project_lock,
    read_project,
)
from conic_qp.qupath.sinks import (
    GeoJSONProjectSink,
    PaquoSink,
    import_command,
    install_import_script,
)
from conic_qp.regions import Region
from conic_qp.run_record import read_record
from conic_qp.sinks import remove_inside, write_json_atomic
from conic_qp.sinks.detections import Detections, DetectionSink
from conic_qp.sinks.geojson import (
    DETECTIONS_PER_FILE,
    read_regions,
    with_uuid_ids,
    write_annotations,
)
from conic_qp.sources import image_ref

log = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_DIR",
    "RUN_FILE",
    "AnnotateResult",
    "ImageOutcome",
    "annotate_project",
    "choose_backend",
    "find_regions",
    "import_command",
    "install_import_script",
]

#: conic-qp's own outputs inside the project folder (tables, per-image run records, run.json).
OUTPUT_DIR = ANNOTATE_DIR
RUN_FILE = ANNOTATE_RUN_FILE
RUN_FORMAT = "conic-qp annotate run"

Backend = Literal["auto", "paquo", "geojson"]
RegionMode = Literal["annotations", "tissue"]
ProgressCallback = Callable[[Progress], None]


@dataclass
class ImageOutcome:
    """What happened to one project image."""

    entry_id: str
    name: str
    status: Literal["done", "failed", "no_tissue"] = "failed"
    n_nuclei: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    region_source: str = "tissue"
    n_regions: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    area_px: float | None = None
    #: detections written under each parent annotation (its label; "root": outside them all)
    parent_counts: dict[str, int] = field(default_factory=dict)
    #: the error with its settings marked (:func:`conic_qp.errors.option`), for the CLI
    error_template: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("error_template")
        data["outputs"] = {k: str(v) for k, v in self.outputs.items()}
        data["roi_area_px" if self.n_regions else "tissue_area_px"] = data.pop("area_px")
        return data


@dataclass
class AnnotateResult:
    """Result of :func:`annotate_project`."""

    project: Path
    backend: Literal["paquo", "geojson"]
    images: list[ImageOutcome]
    classes_added: list[str]
    script: Path | None
    command: str | None
    run_json: Path
    #: image URIs rewritten in project.qpproj (moved project) and the backup made first
    uri_fixes: list[UriFix] = field(default_factory=list)
    project_backup: Path | None = None
    #: images QuPath will not find at their URI (the headless import stops at the first one)
    unresolved: list[str] = field(default_factory=list)

    @property
    def failures(self) -> dict[str, str]:
        """``"<entryID> (<name>)"`` -> error, for every image that failed."""
        return {
            f"{im.entry_id} ({im.name})": im.error or "failed"
            for im in self.images
            if im.status == "failed"
        }

    def failure_messages(
        self, flag: Callable[[str, str | None], str] | None = None
    ) -> dict[str, str]:
        """:attr:`failures` with the settings in each message spelled by ``flag``."""
        return {
            f"{im.entry_id} ({im.name})": render(im.error_template or im.error or "failed", flag)
            for im in self.images
            if im.status == "failed"
        }

    @property
    def ok(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------------------- helpers


def choose_backend(backend: Backend = "auto") -> Literal["paquo", "geojson"]:
    """``auto``: paquo when it is importable AND finds a QuPath installation, else geojson."""
    if backend == "geojson":
        return "geojson"
    from conic_qp.qupath import paquo_io

    if backend == "paquo":
        paquo_io.require_paquo()
        return "paquo"
    if backend != "auto":
        raise ConicQPError(f"unknown backend {backend!r}; use auto, paquo or geojson")
    return "paquo" if paquo_io.paquo_available() else "geojson"


def find_regions(
    image: ProjectImage,
    project_dir: Path,
    regions_geojson: str | os.PathLike[str] | None = None,
    *,
    project_file: bool = True,
) -> tuple[list[Region], str] | None:
    """Annotations of ``image`` from GeoJSON files: ``regions_geojson/<entry id | image name>``
    (``.geojson``, ``.geojson.gz``, ``.json``), else (``project_file``)
    ``<project>/regions/<entryID>.geojson``.

    Returns (regions, file) or None when no file exists. A file with no polygon annotation gives
    an empty list (the caller then falls back to the tissue).
    """
    path: Path | None = None
    if regions_geojson is not None:
        path = region_file(Path(regions_geojson), [image.entry_id, image.name])
    if path is None and project_file and regions_path(project_dir, image.entry_id).is_file():
        path = regions_path(project_dir, image.entry_id)
    if path is None:
        return None
    return read_regions(path), str(path)


def _palette(project_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Class name -> RGB of the project's class list (colours for unclassified-colour regions)."""
    from conic_qp.qupath.classes import QUPATH_DEFAULT_CLASSES, argb_to_rgb

    entries = read_path_classes(qupath_classes_path(project_dir)) or list(QUPATH_DEFAULT_CLASSES)
    return {
        str(e["name"]): argb_to_rgb(int(e["color"]))
        for e in entries
        if isinstance(e.get("color"), int)
    }


def _load_previous_run(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == RUN_FORMAT else {}


@dataclass(frozen=True)
class _Options:
    """Per-run choices shared by every image."""

    backend: Literal["paquo", "geojson"]
    regions: RegionMode
    regions_geojson: str | os.PathLike[str] | None
    mpp: float | None
    force_mpp: bool
    per_file: int
    palette: Mapping[str, tuple[int, int, int]]


# ---------------------------------------------------------------------------------- engine


def annotate_project(
    project: str | os.PathLike[str],
    models: ModelSet,
    settings: PredictSettings,
    *,
    images: Iterable[str] | None = None,
    regions: RegionMode = "annotations",
    regions_geojson: str | os.PathLike[str] | None = None,
    remap: Mapping[str, str] | Iterable[str] | None = None,
    backend: Backend = "auto",
    mpp: float | None = None,
    force_mpp: bool = False,
    fix_uris: bool = True,
    detections_per_file: int = DETECTIONS_PER_FILE,
    on_progress: ProgressCallback | None = None,
    runner: Runner | None = None,
    model_spec: ModelSpec | None = None,
) -> AnnotateResult:
    """Annotate the images of a QuPath project with nucleus detections.

    Parameters
    ----------
    project : ``project.qpproj`` or its folder.
    models : loaded model(s) (:func:`conic_qp.predict.load_models`), already on their device.
    settings : tiling, TTA, workers... (:class:`conic_qp.predict.PredictSettings`).
    images : entry ids or image names (default: all images).
    regions : ``"annotations"`` runs inside each image's annotations when any are found (else
        the tissue); ``"tissue"`` ignores them for inference (detections are still placed under
        the annotations that are known).
    regions_geojson : folder of GeoJSON annotation files named by entry id or image name.
    remap : ``OLD_PREFIX=NEW_PREFIX`` image path remapping for moved projects.
    backend : ``"auto"``, ``"paquo"`` or ``"geojson"`` (see :func:`choose_backend`).
    mpp : level-0 um/px forced for every image (refused outside 0.1-2 um/px unless
        ``force_mpp``).
    fix_uris : rewrite the URIs of images found elsewhere than their URI in ``project.qpproj``
        (backup first) so that QuPath opens them; ``False`` leaves the project file as it is.
    detections_per_file : most detections per GeoJSON file of the geojson backend.
    on_progress : receives :class:`conic_qp.predict.Progress` events (``slide_index`` set).
    runner : where inference runs (default: this process; a :class:`conic_qp.cluster.DaskRunner`
        runs the images on a cluster). Detections are written here, one image at a time.
    model_spec : what a cluster's workers load (default: the checkpoints of ``models``).

    Raises
    ------
    ConicQPError
        Bad options (``mpp``...), malformed, locked or read-only project, unknown ``images``,
        none of the selected images found, malformed ``classes.json``, paquo requested but
        unavailable. Nothing is written in these cases; the project's own files (classes,
        import script) change only once an image's detections are ready to be written.
    """
    from conic_qp.slides import check_mpp

    if mpp is not None:
        check_mpp(mpp, force=force_mpp)
    if regions not in ("annotations", "tissue"):
        raise ConicQPError(
            f"{option('regions')} must be 'annotations' or 'tissue', not {regions!r}"
        )
    if regions_geojson is not None and not Path(regions_geojson).is_dir():
        raise ConicQPError(
            f"{option('regions_geojson')} {regions_geojson} is not a folder; pass the folder holding "
            "<entryID>.geojson or <image name>.geojson files"
        )
    if detections_per_file < 1:
        raise ConicQPError(f"detections per file must be at least 1, not {detections_per_file}")
    file = find_project_file(project)
    qp = read_project(file, remap=remap)  # malformed projects fail here, before any write
    wanted = list(images) if images is not None else None
    selected = qp.select(wanted)
    if not selected:
        raise ConicQPError(f"project {qp.path} has no images; add images in QuPath first")
    if not any(im.ok for im in selected):
        first = selected[0]
        raise ConicQPError(
            f"none of the {len(selected)} selected image(s) of {qp.path} was found (first: "
            f"{first.entry_id} ({first.name}): {first.problem_template or first.problem}); "
            f"nothing was written: fix the image paths ({option('remap')}) or relink the images "
            "in QuPath"
        )
    chosen = choose_backend(backend)
    # validate classes.json before anything is written (it raises on a malformed file)
    read_path_classes(qupath_classes_path(qp.dir))
    opts = _Options(
        chosen, regions, regions_geojson, mpp, force_mpp, detections_per_file, _palette(qp.dir)
    )

    with project_lock(qp.path):
        fixes: list[UriFix] = []
        backup: Path | None = None
        if fix_uris:
            fixes, backup = fix_image_uris(qp)
            if fixes:
                qp = read_project(file, remap=remap)
                selected = qp.select(wanted)
        elif any(im.moved for im in qp.images):
            log.warning(
                "images found elsewhere than their URI were left as they are: QuPath's "
                "headless import cannot open them; fix the URIs in QuPath or let annotate do it"
            )
        result = _annotate_locked(
            qp, selected, models, settings, opts, on_progress, runner, model_spec
        )
    result.uri_fixes, result.project_backup = fixes, backup
    result.unresolved = [
        f"{im.entry_id} ({im.name})" for im in qp.images if not im.ok or (im.moved and not fix_uris)
    ]
    return result


def _make_sink(qp: QuPathProject, opts: _Options) -> DetectionSink:
    if opts.backend == "geojson":
        return GeoJSONProjectSink(qp.path, palette=opts.palette, per_file=opts.per_file)
    return PaquoSink(qp.path)


@dataclass
class _Planned:
    """An image ready to run: its outcome record, regions, and job."""

    image: ProjectImage
    outcome: ImageOutcome
    known: list[Region]
    found: list[Region]
    from_file: bool
    job: SlideJob


def _annotate_locked(
    qp: QuPathProject,
    selected: list[ProjectImage],
    models: ModelSet,
    settings: PredictSettings,
    opts: _Options,
    on_progress: ProgressCallback | None,
    runner: Runner | None,
    model_spec: ModelSpec | None = None,
) -> AnnotateResult:
    """Regions and jobs here, inference through the cohort runner (in process or on a cluster),
    detections into the project one image at a time, in this process, as results arrive."""
    out_dir = qp.dir / OUTPUT_DIR
    run_json = out_dir / RUN_FILE
    previous = _load_previous_run(run_json)
    outcomes: dict[str, ImageOutcome] = {}
    touched: list[str] = []  # images started or finished, in that order (what run.json lists)
    running: list[str] = []
    t_start = time.perf_counter()
    sink: DetectionSink | None = None
    added: list[str] = []

    def record(complete: bool) -> None:
        images_json = dict(previous.get("images") or {}) if isinstance(previous, dict) else {}
        for key in touched:
            images_json[key] = outcomes[key].to_json()
        write_json_atomic(
            run_json,
            {
                "format": RUN_FORMAT,
                "version": 1,
                "complete": complete,
                "project": str(qp.path),
                "backend": opts.backend,
                "models": models.info,
                "classes": models.classes.to_json(),
                "model_mpp": models.mpp,
                "thresholds_source": models.thresholds_source,
                "settings": settings.to_json(),
                "regions": opts.regions,
                "import_command": sink.command if sink is not None else None,
                "seconds": round(time.perf_counter() - t_start, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "images": images_json,
            },
        )

    def touch(key: str) -> None:
        if key not in touched:
            touched.append(key)

    complete = False
    opened = False

    def open_sink() -> None:  # the project's classes and script change with the first image
        nonlocal added, opened
        if not opened and sink is not None:
            added = sink.open(models.classes)
            opened = True

    try:
        sink = _make_sink(qp, opts)
        spec = None
        if runner is not None and not isinstance(runner, InProcessRunner):
            spec = model_spec or ModelSpec.from_models(models, settings.device)
        planned: dict[str, _Planned] = {}
        for image in selected:
            outcome = ImageOutcome(image.entry_id, image.name)
            outcomes[image.entry_id] = outcome
            try:
                planned[image.entry_id] = _plan_image(
                    image, outcome, qp, settings, opts, sink, spec
                )
            except ConicQPError as exc:  # e.g. a malformed regions file: this image only
                outcome.error, outcome.error_template = str(exc), exc.template
                log.error("%s (%s): %s", image.name, image.entry_id, exc)
                touch(image.entry_id)

        def start(job: SlideJob) -> None:
            touch(job.key)
            running.append(job.key)

        def deliver(res: SlideResult) -> SlideResult | None:
            plan = planned[res.key]
            if res.key in running:
                running.remove(res.key)
            touch(res.key)
            if res.status == "done":
                open_sink()
            replaced = _deliver(plan, res, sink, models, settings)
            plan.outcome.seconds = round(res.seconds, 3)
            return replaced

        run_cohort(
            [p.job for p in planned.values()],
            runner=runner or InProcessRunner(models),
            models=models,
            manifest=out_dir / MANIFEST_FILE,
            on_start=start,
            on_result=deliver,
            on_progress=on_progress,
        )
        complete = True
    except (KeyboardInterrupt, SystemExit):
        for key in running:
            outcomes[key].error = "interrupted"
        raise
    finally:
        if sink is not None:
            sink.close(complete and opened)  # a sink never opened has nothing to save
        try:
            record(complete)
        except (OSError, OutputError) as exc:  # the record must not hide the original error
            log.error("%s was not updated: %s", run_json, exc)
    script = getattr(sink, "script", None)
    command = sink.command if sink is not None else None
    images = [outcomes[im.entry_id] for im in selected]
    return AnnotateResult(qp.path, opts.backend, images, added, script, command, run_json)


def _image_regions(
    image: ProjectImage, qp: QuPathProject, opts: _Options, sink: DetectionSink
) -> tuple[list[Region], str, bool]:
    """(regions, where from, from a file): the image's annotations as conic-qp knows them.

    An explicit ``--regions-geojson`` folder wins; then the annotations the destination holds
    (paquo: the project's own, no export needed), then the project's
    ``regions/<entryID>.geojson``. Regions from files get UUID ids (the same on every run) so
    that detections can name them as parents.
    """
    held = sink.existing_regions(image.entry_id) if image.ok else None
    hit = find_regions(image, qp.dir, opts.regions_geojson, project_file=held is None)
    if hit is None and held is not None:
        if held:
            return held, f"{sink.name} annotations", False
        hit = find_regions(image, qp.dir)
    if hit is None:
        return [], "tissue", False
    regions, source = hit
    return with_uuid_ids(regions, f"{image.entry_id}:{source}"), source, True


def _plan_image(
    image: ProjectImage,
    outcome: ImageOutcome,
    qp: QuPathProject,
    settings: PredictSettings,
    opts: _Options,
    sink: DetectionSink,
    spec: ModelSpec | None,
) -> _Planned:
    """The image's regions (read here, in this process) and its slide job."""
    if image.series not in (None, 0):
        log.warning(
            "%s: Bio-Formats series %s; conic-qp reads the file's first image", image.name,
            image.series,
        )  # fmt: skip
    known, source, from_file = _image_regions(image, qp, opts, sink)
    found: list[Region] = []
    if opts.regions == "annotations" and known:
        found, outcome.region_source = known, source
    elif opts.regions == "annotations" and image.ok:
        log.info("%s: no annotations found; running on the whole tissue", image.name)
    outcome.n_regions = len(found)
    roi = shapely.union_all([r.geometry for r in found]) if found else None
    job = SlideJob(
        image_ref(qp, image),
        str(qp.dir / OUTPUT_DIR),
        entry_stem(image.entry_id),  # an id like '../x' never leaves conic-qp/
        settings,
        spec,
        roi,
        opts.mpp,
        image_id=f"qupath:{image.entry_id}:{image.name}",
        key=image.entry_id,
        force_mpp=opts.force_mpp,
    )
    return _Planned(image, outcome, known, found, from_file, job)


def _deliver(
    plan: _Planned,
    res: SlideResult,
    sink: DetectionSink | None,
    models: ModelSet,
    settings: PredictSettings,
) -> SlideResult | None:
    """Write one image's detections into the project; a failure here fails that image only."""
    outcome, image = plan.outcome, plan.image
    if res.status != "done":
        outcome.error, outcome.error_template = res.message(), res.error
        if res.status == "no_tissue":  # empty table in conic-qp/: composition counts 0 nuclei
            outcome.status = "no_tissue"
            outcome.outputs = dict(res.outputs)
        return None
    outcome.n_nuclei = res.n_nuclei
    outcome.class_counts = dict(res.class_counts)
    outcome.outputs = dict(res.outputs)
    run = read_record(Path(res.outputs["run"])) if "run" in res.outputs else {}
    outcome.area_px = (
        float(run["roi_area_px"]) if plan.found and run.get("roi_area_px") is not None
        else run.get("tissue_area_px")
    )  # fmt: skip
    regions_file = used_regions_path(plan.job.out_dir, image.entry_id)
    try:
        if plan.found:
            outcome.outputs["regions"] = write_annotations(
                plan.found,
                regions_file,
                palette=getattr(sink, "palette", None),
                root=plan.job.out_dir,
            )
        else:  # regions of an earlier run no longer apply
            remove_inside(plan.job.out_dir, regions_file)
        assert sink is not None
        delivery = sink.write(
            Detections(
                image.entry_id,
                image.name,
                Path(res.outputs["table"]),
                models.classes,
                tuple(plan.known),
                plan.from_file,
                settings.object_type,
            )
        )
    except ConicQPError as exc:
        log.error("%s (%s): %s", image.name, image.entry_id, exc)
        outcome.error, outcome.error_template = str(exc), exc.template
        return dataclasses.replace(res, status="failed", error=exc.template)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one broken image must not stop the project
        log.exception("%s (%s): writing the detections failed", image.name, image.entry_id)
        outcome.error = outcome.error_template = f"{type(exc).__name__}: {exc}"
        return dataclasses.replace(res, status="failed", error=outcome.error)
    outcome.outputs.update(delivery.outputs)
    labels = {r.id: r.label for r in plan.known}
    outcome.parent_counts = {
        (labels.get(k) or str(k)) if k is not None else "root": v
        for k, v in delivery.counts_by_parent.items()
    }
    outcome.status = "done"
    return None


def format_failures(failures: Mapping[str, str]) -> str:
    """One line per failed image, for the end-of-run summary."""
    return "\n".join(f"{k}: {v}" for k, v in failures.items())
