"""Every file name conic-qp writes, or looks for by convention, built in one place.

Commands and modules that produce a file and those that read it back (``composition`` reads what
``predict`` and ``annotate`` wrote; the Groovy import script reads what annotate wrote) take the
names from here, so they cannot drift apart, and no module has to import another one only for a
file name. Names of data from users (entry ids, slide names) become path components only through
:func:`conic_qp.paths.safe_name` or as stems chosen by :func:`conic_qp.paths.unique_stems`.

::

    OUT/                          conic-qp predict -o OUT
      <stem>.nuclei.parquet       per-nucleus table
      <stem>.geojson.gz           QuPath detections
      <stem>.labels.zarr          instance label map (optional)
      <stem>.run.json             the slide's run record, written last
      manifest.parquet            the cohort: one row per slide

    <QuPath project>/             conic-qp annotate project.qpproj
      conic-qp/                   predict's files per image (<entryID>.*), run.json, manifest
        <entryID>.regions.geojson the regions the run used (QuPath annotations)
      detections/<entryID>/       detections for the import script (chunks + manifest.json)
      regions/<entryID>.geojson   annotations exported by export_annotations_geojson.groovy
      groovy/import_conic_qp.groovy
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from conic_qp.paths import safe_name

__all__ = [
    "ANNOTATE_DIR",
    "ANNOTATE_RUN_FILE",
    "DETECTIONS_DIR",
    "GEOJSON_SUFFIX",
    "GROOVY_DIR",
    "IMPORT_SCRIPT",
    "LABELS_SUFFIX",
    "MANIFEST_FILE",
    "REGIONS_DIR",
    "REGION_SUFFIXES",
    "RUN_SUFFIX",
    "TABLE_SUFFIX",
    "annotate_dir",
    "detections_dir",
    "entry_stem",
    "legacy_detections_file",
    "region_file",
    "regions_path",
    "slide_outputs",
    "used_regions_path",
]

TABLE_SUFFIX = ".nuclei.parquet"
GEOJSON_SUFFIX = ".geojson.gz"
LABELS_SUFFIX = ".labels.zarr"
RUN_SUFFIX = ".run.json"
#: The cohort manifest beside a batch's outputs (one row per slide).
MANIFEST_FILE = "manifest.parquet"

#: conic-qp's own outputs inside a QuPath project (tables, per-image run records, run.json).
ANNOTATE_DIR = "conic-qp"
ANNOTATE_RUN_FILE = "run.json"
DETECTIONS_DIR = "detections"
REGIONS_DIR = "regions"
GROOVY_DIR = "groovy"
IMPORT_SCRIPT = "import_conic_qp.groovy"
#: Extensions of region (annotation) GeoJSON files, in the order they are looked for.
REGION_SUFFIXES: tuple[str, ...] = (".geojson", ".geojson.gz", ".json")


def slide_outputs(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """Where the outputs of the slide ``stem`` go: table, geojson, labels, run."""
    d = Path(out_dir)
    return {
        "table": d / f"{stem}{TABLE_SUFFIX}",
        "geojson": d / f"{stem}{GEOJSON_SUFFIX}",
        "labels": d / f"{stem}{LABELS_SUFFIX}",
        "run": d / f"{stem}{RUN_SUFFIX}",
    }


def entry_stem(entry_id: str | int) -> str:
    """The file stem of a QuPath entry id: the id itself when it is a plain name (QuPath's own
    ids are numbers), else :func:`conic_qp.paths.safe_name`'s mapping, so an id such as
    ``../../x`` or ``/etc/x`` never leaves its folder. ``import_conic_qp.groovy`` refuses ids
    that are not plain names."""
    return safe_name(str(entry_id))


def annotate_dir(project_dir: str | os.PathLike[str]) -> Path:
    """conic-qp's folder inside a QuPath project."""
    return Path(project_dir) / ANNOTATE_DIR


def used_regions_path(out_dir: str | os.PathLike[str], entry_id: str | int) -> Path:
    """The regions an annotate run used for an image (beside its table)."""
    return Path(out_dir) / f"{entry_stem(entry_id)}.regions.geojson"


def detections_dir(project_dir: str | os.PathLike[str], entry_id: str | int) -> Path:
    """Folder of an image's detections for ``groovy/import_conic_qp.groovy``: ``manifest.json``
    and chunk files (:func:`conic_qp.sinks.geojson.write_detection_folder`)."""
    return Path(project_dir) / DETECTIONS_DIR / entry_stem(entry_id)


def legacy_detections_file(project_dir: str | os.PathLike[str], entry_id: str | int) -> Path:
    """The single ``detections/<entryID>.geojson.gz`` of conic-qp before chunked detections."""
    return Path(project_dir) / DETECTIONS_DIR / f"{entry_stem(entry_id)}.geojson.gz"


def regions_path(project_dir: str | os.PathLike[str], entry_id: str | int) -> Path:
    """Where ``groovy/export_annotations_geojson.groovy`` puts an image's annotations."""
    return Path(project_dir) / REGIONS_DIR / f"{entry_stem(entry_id)}.geojson"


def _lookup_name(name: str) -> str:
    """``name`` when it is one plain path component (e.g. a stem read from disk), else its
    :func:`conic_qp.paths.safe_name`: a lookup never leaves its folder."""
    plain = name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")
    return name if plain else safe_name(name)


def region_file(directory: str | os.PathLike[str], keys: Sequence[str]) -> Path | None:
    """The region GeoJSON of ``directory`` named by one of ``keys`` (entry id, image name,
    stem; a key's own extension is also tried without it), or None. Keys are names from the
    project or a slide, so each is looked up under its :func:`conic_qp.paths.safe_name`."""
    folder = Path(directory)
    for key in keys:
        if not key:
            continue
        stems = [key]
        stem = Path(key).stem
        if stem and stem != key:
            stems.append(stem)
        for s in dict.fromkeys(_lookup_name(s) for s in stems):
            for ext in REGION_SUFFIXES:
                p = folder / f"{s}{ext}"
                if p.is_file():
                    return p
    return None
