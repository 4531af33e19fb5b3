"""Write detections into a QuPath project and read its annotations through paquo (needs Java).

paquo (``pip install paquo``, plus a QuPath installation it can find) drives QuPath's own Java
classes, so objects land in the project's ``data/<id>/data.qpdata`` without a Groovy step. Used
by ``conic-qp annotate --backend paquo`` (and ``auto`` when paquo finds QuPath).

What is written, per image, following paquo's documented API:

- classes are created with their colour (``QuPathPathClass(name, color=(r, g, b))``) and merged
  into the project's class list exactly as the GeoJSON backend merges ``classes.json``
  (:func:`conic_qp.qupath.classes.merge_classes`: the user's classes kept, QuPath's defaults
  seeded when the project has no class list yet);
- regions come straight from the image's annotations (with their QuPath UUIDs); an image
  without annotations gets the regions of a file (e.g. ``regions/<entryID>.geojson``) added as
  annotations, so the regions and the nuclei under them show in QuPath;
- detections are built with ``QuPathPathDetectionObject.from_shapely`` (ROI from the nucleus
  polygon, the class, the class probability, float measurements in QuPath's naming plus the
  :data:`MARKER` measurement) and added in bulk inside ``hierarchy.no_autoflush()`` below the
  annotation QuPath would make their parent (``addObjectBelowParent``), or at the root;
- detections of an earlier conic-qp run (those carrying the marker) are removed first; every
  other object (annotations, other detections) is left untouched;
- one save per image; ``data.qpdata``, ``project.qpproj`` and ``classes.json`` are backed up first.

``paquo`` is imported lazily: this module imports without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError, option
from conic_qp.objects import prob_column
from conic_qp.qupath.classes import (
    QUPATH_DEFAULT_CLASSES,
    argb_to_rgb,
    classes_path,
    merge_classes,
    read_path_classes,
)
from conic_qp.qupath.project import backup_file
from conic_qp.regions import Region, parent_regions
from conic_qp.sinks.geojson import (
    MARKER,
    MARKER_VERSION,
    MEASUREMENT_NAMES,
    probability_measurement,
    region_color,
)

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install paquo (`pip install conic-qp[qupath]`) and QuPath (paquo finds it through "
    f"PAQUO_QUPATH_DIR or its default locations), or use {option('backend')} geojson"
)


def paquo_available() -> bool:
    """True when paquo imports AND finds a QuPath installation (no JVM is started)."""
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath

        find_qupath(**to_kwargs(settings))
    except Exception as exc:  # ImportError, ValueError (QuPath not found), config errors
        log.debug("paquo backend unavailable: %s", exc)
        return False
    return True


def require_paquo() -> None:
    """Raise a one-line error when the paquo backend cannot run."""
    try:
        import paquo  # noqa: F401
    except ImportError:
        raise ConicQPError(
            f"{option('backend')} paquo: paquo is not installed; {_INSTALL_HINT}"
        ) from None
    if not paquo_available():
        raise ConicQPError(f"{option('backend')} paquo: paquo cannot find QuPath; {_INSTALL_HINT}")


def measurements_of(table: pd.DataFrame, classes: ClassScheme) -> tuple[list[str], np.ndarray]:
    """QuPath measurement names and a (n, k) float64 matrix of their values (NaN = absent)."""
    cols = [(c, name) for c, name in MEASUREMENT_NAMES.items() if c in table.columns]
    cols += [
        (prob_column(n), probability_measurement(n))
        for n in classes.names
        if prob_column(n) in table.columns
    ]
    values = (
        np.column_stack([table[c].to_numpy(np.float64) for c, _ in cols])
        if cols
        else np.zeros((len(table), 0))
    )
    return [name for _, name in cols], values


def add_image_main_series(
    project: Any, path: str | os.PathLike[str], image_type: Any = None
) -> Any:
    """Add an image file to a paquo project and return its main entry.

    Under Bio-Formats a multi-series file (an Aperio SVS has its label, macro and thumbnail as
    extra series) becomes several entries and paquo returns a list; conic-qp keeps the largest
    series (the slide itself) and removes the others, so one file is one image, as conic-qp's
    own project writer makes it.
    """
    entries = project.add_image(path, image_type=image_type, return_list=True)
    main = max(entries, key=lambda e: int(e.width) * int(e.height))
    for e in entries:
        if e is not main:
            project.remove_image(e)
    return main


class PaquoWriter:
    """A QuPath project opened through paquo for writing detections (one per annotate run)."""

    def __init__(self, project_file: str | os.PathLike[str]) -> None:
        require_paquo()
        from paquo.projects import QuPathProject

        self.path = Path(project_file)
        for f in (self.path, classes_path(self.path.parent)):
            backup_file(f)
        try:
            self.project: Any = QuPathProject(self.path, mode="r+")
        except Exception as exc:  # Java exceptions surface as various types
            raise ConicQPError(f"paquo cannot open {self.path}: {exc}") from None
        self._classes: dict[str, Any] = {}

    # -- classes -----------------------------------------------------------------------------
    def set_classes(self, scheme: ClassScheme) -> list[str]:
        """Merge the scheme's classes into the project's list like the GeoJSON backend does.

        The existing list is read from ``classes.json`` (QuPath's defaults when the project has
        none yet) and merged with :func:`conic_qp.qupath.classes.merge_classes`, so both
        backends give the same class list; the user's classes keep their Java objects.
        """
        from paquo.classes import QuPathPathClass

        path = classes_path(self.path.parent)
        existing = (
            read_path_classes(path) if path.exists() else [dict(c) for c in QUPATH_DEFAULT_CLASSES]
        )
        merged, added = merge_classes(existing, scheme)
        current = {pc.id: pc for pc in self.project.path_classes}
        out = []
        for entry in merged:
            name = str(entry["name"])
            if name in current:
                out.append(current[name])
                continue
            color = (
                argb_to_rgb(int(entry["color"])) if isinstance(entry.get("color"), int) else None
            )
            parent = None
            if ": " in name:  # a derived class of the user's list ("Tumor: Positive")
                base, _, name = name.rpartition(": ")
                parent = QuPathPathClass(base)
            out.append(QuPathPathClass(name, color=color, parent=parent))
        for c in scheme:
            r, g, b = (int(v) for v in c.color)
            self._classes[c.name] = QuPathPathClass(c.name, color=(r, g, b))
        if added or len(out) != len(current):
            self.project.path_classes = out
        return added

    # -- images ------------------------------------------------------------------------------
    def image(self, entry_id: str) -> Any:
        for im in self.project.images:
            if str(im.entry_id) == str(entry_id):
                return im
        raise ConicQPError(f"paquo: project {self.path} has no image with entry id {entry_id}")

    def read_regions(self, entry_id: str) -> list[Region]:
        """The image's polygon annotations (points and lines skipped) with their QuPath UUIDs."""
        out: list[Region] = []
        for ann in self.image(entry_id).hierarchy.annotations:
            geom = ann.roi
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
            if not isinstance(geom, shapely.Polygon | shapely.MultiPolygon) or geom.is_empty:
                continue
            pc = ann.path_class
            out.append(Region(geom, ann.name, pc.name if pc is not None else None, _uuid_of(ann)))
        return out

    def _add_regions(self, image: Any, regions: list[Region]) -> None:
        """Add file regions as annotations (with their UUIDs) to an image that has none."""
        from paquo.classes import QuPathPathClass
        from paquo.pathobjects import QuPathPathAnnotationObject

        hierarchy = image.hierarchy
        for r in regions:
            rgb = region_color(r)
            pc = (
                QuPathPathClass(r.class_name, color=(rgb[0], rgb[1], rgb[2]))
                if r.class_name
                else None
            )
            ann = QuPathPathAnnotationObject.from_shapely(r.geometry, pc)
            if r.name:
                ann.name = r.name
            if r.id:
                _set_uuid(ann, r.id)
            _insert(hierarchy.java_object, ann.java_object)
        hierarchy.flush(invalidate_proxy_cache=True)

    def write_detections(
        self,
        entry_id: str,
        table: pd.DataFrame,
        classes: ClassScheme,
        regions: list[Region] | None = None,
        *,
        add_regions: bool = False,
    ) -> tuple[int, dict[str | None, int]]:
        """Replace the image's conic-qp detections by ``table``'s, each below the annotation
        QuPath would make its parent (:func:`conic_qp.regions.parent_regions` over
        ``regions``; the root when none holds it or the annotation is not in the image).

        ``add_regions``: when the image has no annotations, ``regions`` are added as annotations
        first. Returns (removed, detections added per parent annotation UUID, None = root).
        """
        from paquo.classes import QuPathPathClass
        from paquo.pathobjects import QuPathPathDetectionObject

        image = self.image(entry_id)
        if not image.is_readable():
            raise ConicQPError(
                f"paquo cannot save image {image.image_name}: its URI {image.uri} is not "
                "reachable from this machine; let annotate fix the project's URIs, fix them in "
                "QuPath (File > Project > Check project URIs), or use the geojson backend"
            )
        regions = list(regions or [])
        hierarchy = image.hierarchy
        if add_regions and regions and len(hierarchy.annotations) == 0:
            self._add_regions(image, regions)
        by_id = {
            _uuid_of(a): a.java_object for a in hierarchy.annotations if _uuid_of(a) is not None
        }
        parent_idx = parent_regions(table, [r.geometry for r in regions])
        parent_ids = [regions[k].id if k >= 0 else None for k in parent_idx.tolist()]
        names, values = measurements_of(table, classes)
        geoms = shapely.from_wkb(table["polygon_wkb"].to_numpy())
        cnames = table["class_name"].astype(str).tolist()
        probs = table["class_prob"].to_numpy(np.float64) if "class_prob" in table else None
        ids = table["id"].astype(str).tolist()
        for n in set(cnames) - set(self._classes):
            self._classes[n] = QuPathPathClass(n, color=classes.by_name(n).color)
        java_h = hierarchy.java_object
        root = java_h.getRootObject()
        counts: dict[str | None, int] = {}
        with hierarchy.no_autoflush():
            detections = hierarchy.detections
            previous = [d for d in detections if MARKER in d.measurements]
            if previous:
                detections -= previous  # PathObjectProxy in-place removal (removeObjects)
            for j, geom in enumerate(geoms):
                if geom is None or geom.is_empty:
                    continue
                meas = {MARKER: float(MARKER_VERSION)}
                for k, name in enumerate(names):
                    v = float(values[j, k])
                    if math.isfinite(v):
                        meas[name] = v
                det = QuPathPathDetectionObject.from_shapely(
                    geom,
                    self._classes[cnames[j]],
                    meas,
                    path_class_probability=float(probs[j]) if probs is not None else math.nan,
                )
                _set_uuid(det, ids[j])
                pid = parent_ids[j] if parent_ids[j] in by_id else None
                _add_below(java_h, by_id[pid] if pid is not None else root, det.java_object)
                counts[pid] = counts.get(pid, 0) + 1
        data_file = Path(str(image.entry_path)) / "data.qpdata"
        backup_file(data_file)
        _set_brightfield_if_unset(image)
        image.save()  # one save per image
        return len(previous), counts

    def save_project(self) -> None:
        """Write the project file and class list (images were saved one by one)."""
        self.project.save()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self.project


def _set_uuid(obj: Any, uid: str) -> None:
    """Give an object conic-qp's stable id (QuPath >= 0.4 ``PathObject.setID``)."""
    with contextlib.suppress(Exception):
        from jpype import JClass

        obj.java_object.setID(JClass("java.util.UUID").fromString(uid))


def _uuid_of(obj: Any) -> str | None:
    """An object's QuPath UUID (QuPath >= 0.4), None before."""
    try:
        return str(obj.java_object.getID().toString())
    except Exception:
        return None


def _add_below(java_hierarchy: Any, parent: Any, obj: Any) -> None:
    """``addObjectBelowParent`` (QuPath >= 0.4) or its older name, without an event."""
    try:
        java_hierarchy.addObjectBelowParent(parent, obj, False)
    except AttributeError:
        java_hierarchy.addPathObjectBelowParent(parent, obj, False)


def _insert(java_hierarchy: Any, obj: Any) -> None:
    """Insert an annotation where QuPath's hierarchy rules put it (nested annotations nest)."""
    java_hierarchy.insertPathObject(obj, False)


def _set_brightfield_if_unset(image: Any) -> None:
    """Brightfield H&E when QuPath says "Not set" (conic-qp models are H&E models)."""
    with contextlib.suppress(Exception):
        from paquo.images import QuPathImageType

        if image.image_type == QuPathImageType.UNSET:
            image.image_type = QuPathImageType.BRIGHTFIELD_H_E
