"""``conic-qp annotate``: run a model over the images of a QuPath project and write detections back.

For every selected image of the project (:func:`conic_qp.qupath.project.read_project` resolves
the files, with ``remap`` and relative search when the project moved):

1. regions: the image's annotations (``--regions-geojson DIR``, else the project's
   ``regions/<entryID>.geojson`` written by ``groovy/export_annotations_geojson.groovy``, else
   through paquo), or the whole tissue;
2. inference inside those regions (:func:`conic_qp.predict.predict_slide`), whose outputs go to
   ``<project>/conic-qp/<entryID>.nuclei.parquet`` (+ ``.geojson.gz``, ``.run.json``);
3. detections back to QuPath:

   - ``geojson`` backend (no Java needed): ``<project>/detections/<entryID>.geojson.gz``, the
     model's classes merged into ``classifiers/classes.json`` and
     ``<project>/groovy/import_conic_qp.groovy``; one QuPath command imports everything
     (:func:`import_command`), replacing earlier conic-qp detections;
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
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import shapely

from conic_qp.errors import ConicQPError
from conic_qp.predict import ModelSet, PredictSettings, Progress, make_executor, predict_slide
from conic_qp.qupath.classes import classes_path as qupath_classes_path
from conic_qp.qupath.classes import read_path_classes, update_project_classes
from conic_qp.qupath.project import (
    ProjectImage,
    QuPathProject,
    backup_file,
    detections_path,
    find_project_file,
    project_lock,
    read_project,
    regions_path,
)
from conic_qp.sinks import atomic_path, write_json_atomic
from conic_qp.sinks.geojson import Region, read_regions
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
OUTPUT_DIR = "conic-qp"
RUN_FILE = "run.json"
RUN_FORMAT = "conic-qp annotate run"
GROOVY_DIR = "groovy"
IMPORT_SCRIPT = "import_conic_qp.groovy"

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

    ``--save`` is required, without it QuPath discards the changes. On Windows use
    ``"QuPath (console).exe"``, on macOS ``QuPath.app/Contents/MacOS/QuPath``.
    """
    return f"QuPath script -p {shlex.quote(str(project_file))} --save {shlex.quote(str(script))}"


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
) -> tuple[list[Region], str] | None:
    """Annotations of ``image`` from GeoJSON files: ``regions_geojson/<entry id | image name>``
    (``.geojson``, ``.geojson.gz``, ``.json``), else ``<project>/regions/<entryID>.geojson``.

    Returns (regions, file) or None when no file exists. A file with no polygon annotation gives
    an empty list (the caller then falls back to the tissue).
    """
    from conic_qp.composition import region_file

    path: Path | None = None
    if regions_geojson is not None:
        path = region_file(Path(regions_geojson), [image.entry_id, image.name])
    if path is None and regions_path(project_dir, image.entry_id).is_file():
        path = regions_path(project_dir, image.entry_id)
    if path is None:
        return None
    return read_regions(path), str(path)


def write_regions_geojson(regions: Sequence[Region], path: Path) -> Path:
    """Record the regions a run used (QuPath-style annotations), so composition finds them."""
    features = []
    for r in regions:
        props: dict[str, Any] = {"objectType": "annotation"}
        if r.name:
            props["name"] = r.name
        if r.class_name:
            props["classification"] = {"name": r.class_name}
        feat: dict[str, Any] = {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(r.geometry),
            "properties": props,
        }
        if r.id:
            feat["id"] = r.id
        features.append(feat)
    write_json_atomic(path, {"type": "FeatureCollection", "features": features}, indent=None)
    return path


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


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` atomically (hard link when possible: no extra disk)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _load_previous_run(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == RUN_FORMAT else {}


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
        the tissue); ``"tissue"`` ignores annotations.
    regions_geojson : folder of GeoJSON annotation files named by entry id or image name.
    remap : ``OLD_PREFIX=NEW_PREFIX`` image path remapping for moved projects.
    backend : ``"auto"``, ``"paquo"`` or ``"geojson"`` (see :func:`choose_backend`).
    mpp : level-0 um/px forced for every image.
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
    file = find_project_file(project)
    qp = read_project(file, remap=remap)  # malformed projects fail here, before any write
    selected = qp.select(list(images) if images is not None else None)
    if not selected:
        raise ConicQPError(f"project {qp.path} has no images; add images in QuPath first")
    chosen = choose_backend(backend)
    # validate classes.json before anything is written (it raises on a malformed file)
    read_path_classes(qupath_classes_path(qp.dir))

    with project_lock(qp.path):
        return _annotate_locked(
            qp, selected, models, settings, chosen, regions, regions_geojson, mpp, on_progress
        )


def _annotate_locked(
    qp: QuPathProject,
    selected: list[ProjectImage],
    models: ModelSet,
    settings: PredictSettings,
    backend: Literal["paquo", "geojson"],
    regions: RegionMode,
    regions_geojson: str | os.PathLike[str] | None,
    mpp: float | None,
    on_progress: ProgressCallback | None,
) -> AnnotateResult:
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
                "regions": regions,
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
                    image, outcome, qp, models, settings, backend, regions, regions_geojson,
                    mpp, executor, writer, progress,
                )  # fmt: skip
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


def _annotate_image(
    image: ProjectImage,
    outcome: ImageOutcome,
    qp: QuPathProject,
    models: ModelSet,
    settings: PredictSettings,
    backend: Literal["paquo", "geojson"],
    regions: RegionMode,
    regions_geojson: str | os.PathLike[str] | None,
    mpp: float | None,
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
    found: list[Region] = []
    if regions == "annotations":
        hit = find_regions(image, qp.dir, regions_geojson)
        if hit is not None:
            found, outcome.region_source = hit
        elif writer is not None:
            found = writer.read_regions(image.entry_id)
            outcome.region_source = "paquo annotations"
        if not found:
            log.info("%s: no annotations found; running on the whole tissue", image.name)
            outcome.region_source = "tissue"
    outcome.n_regions = len(found)
    roi = shapely.union_all([r.geometry for r in found]) if found else None
    regions_file = out_dir / f"{image.entry_id}.regions.geojson"
    with _open(image, mpp) as source:
        outcome.area_px = float(roi.area) if roi is not None else _tissue_area(source, settings)
        result = predict_slide(
            source,
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
        outcome.outputs["regions"] = write_regions_geojson(found, regions_file)
    elif regions_file.exists():
        regions_file.unlink()  # regions of an earlier run no longer apply
    progress(Progress(image.name, "writing", nuclei=result.n_nuclei))
    if backend == "geojson":
        dst = detections_path(qp.dir, image.entry_id)
        _link_or_copy(result.outputs["geojson"], dst)
        outcome.outputs["detections"] = dst
    else:
        from conic_qp.sinks.tables import read_table

        table = read_table(result.outputs["table"])
        removed, n_added = writer.write_detections(image.entry_id, table, models.classes)
        log.info("%s: replaced %d conic-qp detections by %d", image.name, removed, n_added)


def format_failures(failures: Mapping[str, str]) -> str:
    """One line per failed image, for the end-of-run summary."""
    return "\n".join(f"{k}: {v}" for k, v in failures.items())
