"""Write detections into a QuPath project and read its annotations through paquo (needs Java).

paquo (``pip install paquo``, plus a QuPath installation it can find) drives QuPath's own Java
classes, so objects land in the project's ``data/<id>/data.qpdata`` without a Groovy step. Used
by ``conic-qp annotate --backend paquo`` (and ``auto`` when paquo finds QuPath).

What is written, per image, following paquo's documented API:

- classes are created with their colour (``QuPathPathClass(name, color=(r, g, b))``) and added to
  the project's class list, keeping the user's classes;
- detections are added in bulk inside ``hierarchy.no_autoflush()`` with ``add_detection`` (ROI
  from the nucleus polygon, the class, the class probability) and float measurements in QuPath's
  naming (:data:`conic_qp.sinks.geojson.MEASUREMENT_NAMES`), plus the :data:`MARKER` measurement;
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
from conic_qp.errors import ConicQPError
from conic_qp.objects import prob_column
from conic_qp.qupath.classes import classes_path
from conic_qp.qupath.project import backup_file
from conic_qp.sinks.geojson import (
    MARKER,
    MARKER_VERSION,
    MEASUREMENT_NAMES,
    Region,
    probability_measurement,
)

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install paquo (`pip install conic-qp[qupath]`) and QuPath (paquo finds it through "
    "PAQUO_QUPATH_DIR or its default locations), or use --backend geojson"
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
        raise ConicQPError(f"--backend paquo: paquo is not installed; {_INSTALL_HINT}") from None
    if not paquo_available():
        raise ConicQPError(f"--backend paquo: paquo cannot find QuPath; {_INSTALL_HINT}")


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
        """Add the scheme's classes (with colours) to the project's list; keep the user's."""
        from paquo.classes import QuPathPathClass

        existing = list(self.project.path_classes)
        have = {pc.name for pc in existing}
        added: list[str] = []
        for c in scheme:
            self._classes[c.name] = QuPathPathClass(c.name, color=tuple(int(v) for v in c.color))
            if c.name not in have:
                existing.append(self._classes[c.name])
                added.append(c.name)
        if added:
            self.project.path_classes = existing
        return added

    # -- images ------------------------------------------------------------------------------
    def image(self, entry_id: str) -> Any:
        for im in self.project.images:
            if str(im.entry_id) == str(entry_id):
                return im
        raise ConicQPError(f"paquo: project {self.path} has no image with entry id {entry_id}")

    def read_regions(self, entry_id: str) -> list[Region]:
        """The image's annotations as polygon regions (points and lines skipped)."""
        out: list[Region] = []
        for ann in self.image(entry_id).hierarchy.annotations:
            geom = ann.roi
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
            if not isinstance(geom, shapely.Polygon | shapely.MultiPolygon) or geom.is_empty:
                continue
            pc = ann.path_class
            out.append(Region(geom, ann.name, pc.name if pc is not None else None))
        return out

    def write_detections(
        self, entry_id: str, table: pd.DataFrame, classes: ClassScheme
    ) -> tuple[int, int]:
        """Replace the image's conic-qp detections by ``table``'s; returns (removed, added)."""
        from paquo.classes import QuPathPathClass

        image = self.image(entry_id)
        if not image.is_readable():
            raise ConicQPError(
                f"paquo cannot save image {image.image_name}: its URI {image.uri} is not "
                "reachable from this machine; fix the project's URIs in QuPath or use "
                "--backend geojson"
            )
        names, values = measurements_of(table, classes)
        geoms = shapely.from_wkb(table["polygon_wkb"].to_numpy())
        cnames = table["class_name"].astype(str).tolist()
        probs = table["class_prob"].to_numpy(np.float64) if "class_prob" in table else None
        ids = table["id"].astype(str).tolist()
        for n in set(cnames) - set(self._classes):
            self._classes[n] = QuPathPathClass(n, color=classes.by_name(n).color)
        hierarchy = image.hierarchy
        with hierarchy.no_autoflush():
            detections = hierarchy.detections
            previous = [d for d in detections if MARKER in d.measurements]
            if previous:
                detections -= previous  # PathObjectProxy in-place removal (removeObjects)
            added = 0
            for j, geom in enumerate(geoms):
                if geom is None or geom.is_empty:
                    continue
                meas = {MARKER: float(MARKER_VERSION)}
                for k, name in enumerate(names):
                    v = float(values[j, k])
                    if math.isfinite(v):
                        meas[name] = v
                det = hierarchy.add_detection(
                    roi=geom,
                    path_class=self._classes[cnames[j]],
                    measurements=meas,
                    path_class_probability=float(probs[j]) if probs is not None else math.nan,
                )
                _set_uuid(det, ids[j])
                added += 1
        data_file = Path(str(image.entry_path)) / "data.qpdata"
        backup_file(data_file)
        image.save()  # one save per image
        return len(previous), added

    def save_project(self) -> None:
        """Write the project file and class list (images were saved one by one)."""
        self.project.save()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self.project


def _set_uuid(obj: Any, uid: str) -> None:
    """Give a detection conic-qp's stable id (QuPath >= 0.4 ``PathObject.setID``)."""
    with contextlib.suppress(Exception):
        from jpype import JClass

        obj.java_object.setID(JClass("java.util.UUID").fromString(uid))
