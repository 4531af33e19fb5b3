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

import contextlib
import dataclasses
import importlib.resources
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import shapely

from conic_qp.errors import ConicQPError
from conic_qp.outputs import (
    ANNOTATE_DIR,
    ANNOTATE_RUN_FILE,
    GROOVY_DIR,
    IMPORT_SCRIPT,
    detections_dir,
    legacy_detections_file,
    region_file,
    regions_path,
    used_regions_path,
)
from conic_qp.predict import ModelSet, PredictSettings, Progress, make_executor, predict_slide
from conic_qp.qupath.classes import classes_path as qupath_classes_path
from conic_qp.qupath.classes import read_path_classes, update_project_classes
from conic_qp.qupath.project import (
    ProjectImage,
    QuPathProject,
    UriFix,
    backup_file,
    find_project_file,
    fix_image_uris,
    project_lock,
    read_project,
)
from conic_qp.sinks import atomic_path, remove_inside, write_json_atomic
from conic_qp.sinks.geojson import (
    DETECTIONS_PER_FILE,
    Region,
    read_regions,
    with_uuid_ids,
    write_annotations,
    write_detection_folder,
)
from conic_qp.slides import MPP_RANGE, PyramidSource, open_slide

if TYPE_CHECKING:
    from concurrent.futures import Executor

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
    status: Literal["done", "failed"] = "failed"
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

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
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
            if im.status != "done"
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


def import_command(project_file: str | os.PathLike[str], script: str | os.PathLike[str]) -> str:
    """The QuPath command that imports all detections (QuPath 0.4-0.7 ``script`` subcommand).

    No ``--save``: the script saves each image it changed itself, so QuPath does not rewrite
    the data of images it skipped (``--save`` would save every image of the project). On Windows
    use ``"QuPath (console).exe"``, on macOS ``QuPath.app/Contents/MacOS/QuPath``.
    """
    return f"QuPath script -p {shlex.quote(str(project_file))} {shlex.quote(str(script))}"


def install_import_script(project_dir: str | os.PathLike[str]) -> Path:
    """Copy the package's ``import_conic_qp.groovy`` to ``<project>/groovy/`` (atomically; a
    different existing copy, e.g. edited by the user, is backed up first)."""
    data = importlib.resources.files("conic_qp").joinpath("groovy", IMPORT_SCRIPT).read_bytes()
    dst = Path(project_dir) / GROOVY_DIR / IMPORT_SCRIPT
    if dst.is_file():
        if dst.read_bytes() == data:
            return dst
        backup_file(dst)
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    return dst


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


def _open(image: ProjectImage, mpp: float | None) -> PyramidSource:
    """Open the image; when the file lacks a plausible um/px, use the project's calibration."""
    assert image.path is not None
    try:
        return open_slide(image.path, mpp=mpp)
    except ConicQPError as exc:
        lo, hi = MPP_RANGE
        if mpp is None and image.mpp is not None and lo <= image.mpp <= hi and "mpp" in str(exc):
            log.warning(
                "%s: no usable um/px in the file; using the project's pixel size %.4g um/px",
                image.name,
                image.mpp,
            )
            return open_slide(image.path, mpp=image.mpp)
        raise


def _tissue_area(source: PyramidSource, settings: PredictSettings) -> float:
    """Level-0 area (px^2) of the tissue the engine runs on (whole image without detection)."""
    w0, h0 = source.dimensions
    if not settings.tissue_detection:
        return float(w0) * float(h0)
    from conic_qp.tissue import tissue_mask

    thumb, downsample = source.thumbnail(settings.thumbnail_size)
    return float(tissue_mask(thumb).sum()) * downsample * downsample


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
    fix_uris: bool = True,
    detections_per_file: int = DETECTIONS_PER_FILE,
    on_progress: ProgressCallback | None = None,
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
    mpp : level-0 um/px forced for every image.
    fix_uris : rewrite the URIs of images found elsewhere than their URI in ``project.qpproj``
        (backup first) so that QuPath opens them; ``False`` leaves the project file as it is.
    detections_per_file : most detections per GeoJSON file of the geojson backend.
    on_progress : receives :class:`conic_qp.predict.Progress` events (``slide_index`` set).

    Raises
    ------
    ConicQPError
        Malformed, locked or read-only project, unknown ``images``, malformed ``classes.json``,
        paquo requested but unavailable. Nothing is written in these cases.
    """
    if regions not in ("annotations", "tissue"):
        raise ConicQPError(f"--regions must be 'annotations' or 'tissue', not {regions!r}")
    if regions_geojson is not None and not Path(regions_geojson).is_dir():
        raise ConicQPError(
            f"--regions-geojson {regions_geojson} is not a folder; pass the folder holding "
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
    chosen = choose_backend(backend)
    # validate classes.json before anything is written (it raises on a malformed file)
    read_path_classes(qupath_classes_path(qp.dir))
    opts = _Options(chosen, regions, regions_geojson, mpp, detections_per_file, _palette(qp.dir))

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
        result = _annotate_locked(qp, selected, models, settings, opts, on_progress)
    result.uri_fixes, result.project_backup = fixes, backup
    result.unresolved = [
        f"{im.entry_id} ({im.name})" for im in qp.images if not im.ok or (im.moved and not fix_uris)
    ]
    return result


def _annotate_locked(
    qp: QuPathProject,
    selected: list[ProjectImage],
    models: ModelSet,
    settings: PredictSettings,
    opts: _Options,
    on_progress: ProgressCallback | None,
) -> AnnotateResult:
    backend = opts.backend
    out_dir = qp.dir / OUTPUT_DIR
    run_json = out_dir / RUN_FILE
    previous = _load_previous_run(run_json)
    outcomes: list[ImageOutcome] = []
    script: Path | None = None
    command: str | None = None
    added: list[str] = []
    t_start = time.perf_counter()
    report = on_progress or (lambda p: None)
    writer: Any = None  # paquo project, opened once for all images

    def record(complete: bool) -> None:
        images_json = dict(previous.get("images") or {}) if isinstance(previous, dict) else {}
        for o in outcomes:
            images_json[o.entry_id] = o.to_json()
        write_json_atomic(
            run_json,
            {
                "format": RUN_FORMAT,
                "version": 1,
                "complete": complete,
                "project": str(qp.path),
                "backend": backend,
                "models": models.info,
                "classes": models.classes.to_json(),
                "model_mpp": models.mpp,
                "thresholds_source": models.thresholds_source,
                "settings": settings.to_json(),
                "regions": opts.regions,
                "import_command": command,
                "seconds": round(time.perf_counter() - t_start, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "images": images_json,
            },
        )

    executor: Executor | None = None
    complete = False
    try:
        if backend == "geojson":
            added = update_project_classes(qp.dir, models.classes)
            script = install_import_script(qp.dir)
            command = import_command(qp.path, script)
        else:
            from conic_qp.qupath import paquo_io

            writer = paquo_io.PaquoWriter(qp.path)
            added = writer.set_classes(models.classes)
        executor = make_executor(settings.workers)
        for i, image in enumerate(selected):
            outcome = ImageOutcome(image.entry_id, image.name)
            outcomes.append(outcome)
            t0 = time.perf_counter()

            def progress(p: Progress, i: int = i) -> None:
                p.slide_index, p.slides_total = i, len(selected)
                report(p)

            try:
                _annotate_image(
                    image, outcome, qp, models, settings, opts, executor, writer, progress
                )
                outcome.status = "done"
            except ConicQPError as exc:
                outcome.error = str(exc)
                log.error("%s (%s): %s", image.name, image.entry_id, exc)
            except (KeyboardInterrupt, SystemExit):
                outcome.error = "interrupted"
                raise
            except Exception as exc:  # one broken image must not stop the project
                outcome.error = f"{type(exc).__name__}: {exc}"
                log.exception("%s (%s) failed", image.name, image.entry_id)
            outcome.seconds = round(time.perf_counter() - t0, 3)
            progress(Progress(image.name, "finished" if outcome.status == "done" else "failed"))
        if writer is not None:
            writer.save_project()
        complete = True
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.close()
        with contextlib.suppress(OSError):  # the record must not hide the original error
            record(complete)
    return AnnotateResult(qp.path, backend, outcomes, added, script, command, run_json)


def _image_regions(
    image: ProjectImage, qp: QuPathProject, opts: _Options, writer: Any
) -> tuple[list[Region], str, bool]:
    """(regions, where from, from a file): the image's annotations as conic-qp knows them.

    An explicit ``--regions-geojson`` folder wins; with paquo the project's own annotations
    come next (no export needed), then the project's ``regions/<entryID>.geojson``. Regions
    from files get UUID ids (the same on every run) so that detections can name them as parents.
    """
    hit = find_regions(image, qp.dir, opts.regions_geojson, project_file=writer is None)
    if hit is None and writer is not None:
        found = writer.read_regions(image.entry_id)
        if found:
            return found, "paquo annotations", False
        hit = find_regions(image, qp.dir)
    if hit is None:
        return [], "tissue", False
    regions, source = hit
    return with_uuid_ids(regions, f"{image.entry_id}:{source}"), source, True


def _annotate_image(
    image: ProjectImage,
    outcome: ImageOutcome,
    qp: QuPathProject,
    models: ModelSet,
    settings: PredictSettings,
    opts: _Options,
    executor: Executor | None,
    writer: Any,
    progress: ProgressCallback,
) -> None:
    if not image.ok:
        raise ConicQPError(image.problem or f"image file of {image.name} not found")
    if image.series not in (None, 0):
        log.warning(
            "%s: Bio-Formats series %s; conic-qp reads the file's first image", image.name,
            image.series,
        )  # fmt: skip
    out_dir = qp.dir / OUTPUT_DIR
    progress(Progress(image.name, "regions"))
    known, source, from_file = _image_regions(image, qp, opts, writer)
    found: list[Region] = []
    if opts.regions == "annotations" and known:
        found, outcome.region_source = known, source
    elif opts.regions == "annotations":
        log.info("%s: no annotations found; running on the whole tissue", image.name)
    outcome.n_regions = len(found)
    roi = shapely.union_all([r.geometry for r in found]) if found else None
    regions_file = used_regions_path(out_dir, image.entry_id)
    with _open(image, opts.mpp) as source_slide:
        outcome.area_px = (
            float(roi.area) if roi is not None else _tissue_area(source_slide, settings)
        )
        result = predict_slide(
            source_slide,
            models,
            settings,
            out_dir,
            progress,
            roi,
            executor=executor,
            stem=image.entry_id,
            slide_path=str(image.path),
            image_id=f"qupath:{image.entry_id}:{image.name}",
        )
    outcome.n_nuclei = result.n_nuclei
    outcome.class_counts = dict(result.class_counts)
    outcome.outputs = dict(result.outputs)
    if found:
        outcome.outputs["regions"] = write_annotations(found, regions_file, palette=opts.palette)
    elif regions_file.exists():
        regions_file.unlink()  # regions of an earlier run no longer apply
    progress(Progress(image.name, "writing", nuclei=result.n_nuclei))
    table_path = Path(result.outputs["table"])
    labels = {r.id: r.label for r in known}
    if opts.backend == "geojson":
        import pyarrow.parquet as pq

        def batches() -> Iterator[Any]:
            for b in pq.ParquetFile(table_path).iter_batches(batch_size=20_000):
                yield b.to_pandas()

        folder = write_detection_folder(
            batches,
            detections_dir(qp.dir, image.entry_id),
            models.classes,
            regions=known,
            add_regions=from_file,
            palette=opts.palette,
            object_type=settings.object_type,
            per_file=opts.per_file,
            info={"entry_id": image.entry_id, "image_name": image.name},
            root=qp.dir,
        )
        # the single-file layout of earlier versions: the import script ignores it
        remove_inside(qp.dir, legacy_detections_file(qp.dir, image.entry_id))
        outcome.outputs["detections"] = folder.folder
        counts = folder.counts_by_parent()
    else:
        from conic_qp.sinks.tables import read_table

        table = read_table(table_path)
        removed, counts = writer.write_detections(
            image.entry_id, table, models.classes, known, add_regions=from_file
        )
        log.info(
            "%s: replaced %d conic-qp detections by %d", image.name, removed, sum(counts.values())
        )
    outcome.parent_counts = {
        (labels.get(k) or str(k)) if k is not None else "root": v for k, v in counts.items()
    }


def format_failures(failures: Mapping[str, str]) -> str:
    """One line per failed image, for the end-of-run summary."""
    return "\n".join(f"{k}: {v}" for k, v in failures.items())
