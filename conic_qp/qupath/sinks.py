"""QuPath projects as :class:`~conic_qp.sinks.detections.DetectionSink` s: GeoJSON files + the
Groovy import (no Java needed), or paquo (straight into the project through QuPath's Java).

:class:`GeoJSONProjectSink` merges the model's classes into ``classifiers/classes.json``,
installs ``groovy/import_conic_qp.groovy`` and writes each image's detections to
``detections/<entryID>/`` in chunks grouped by parent annotation
(:func:`conic_qp.sinks.geojson.write_detection_folder`); one QuPath command
(:func:`import_command`) then imports every image. :class:`PaquoSink` writes through
:class:`conic_qp.qupath.paquo_io.PaquoWriter`, one save per image and the project at the end.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from conic_qp.classes import ClassScheme
from conic_qp.outputs import (
    GROOVY_DIR,
    IMPORT_SCRIPT,
    detections_dir,
    legacy_detections_file,
)
from conic_qp.qupath.project import backup_file
from conic_qp.regions import Region
from conic_qp.sinks import atomic_path, remove_inside
from conic_qp.sinks.detections import Delivery, Detections

log = logging.getLogger(__name__)

__all__ = ["GeoJSONProjectSink", "PaquoSink", "import_command", "install_import_script"]


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


class GeoJSONProjectSink:
    """Detections as GeoJSON files inside the project, imported by one QuPath command.

    Parameters
    ----------
    project_file : the project's ``project.qpproj``.
    palette : class name -> RGB of the project's classes (colours of added regions).
    per_file : most detections per GeoJSON file (QuPath reads a file whole).
    """

    name = "geojson"

    def __init__(
        self,
        project_file: str | os.PathLike[str],
        *,
        palette: Mapping[str, tuple[int, int, int]] | None = None,
        per_file: int,
    ) -> None:
        self.project_file = Path(project_file)
        self.project_dir = self.project_file.parent
        self.palette = dict(palette or {})
        self.per_file = per_file
        self.script: Path | None = None

    @property
    def command(self) -> str | None:
        return import_command(self.project_file, self.script) if self.script else None

    def open(self, classes: ClassScheme) -> list[str]:
        from conic_qp.qupath.classes import update_project_classes

        added = update_project_classes(self.project_dir, classes)
        self.script = install_import_script(self.project_dir)
        return added

    def existing_regions(self, key: str) -> list[Region] | None:
        return None  # the project's annotations reach conic-qp as exported GeoJSON files

    def write(self, detections: Detections) -> Delivery:
        import pyarrow.parquet as pq

        from conic_qp.sinks.geojson import write_detection_folder

        def batches() -> Iterator[Any]:
            for b in pq.ParquetFile(detections.table).iter_batches(batch_size=20_000):
                yield b.to_pandas()

        folder = write_detection_folder(
            batches,
            detections_dir(self.project_dir, detections.key),
            detections.classes,
            regions=list(detections.regions),
            add_regions=detections.add_regions,
            palette=self.palette,
            object_type=detections.object_type,  # type: ignore[arg-type]
            per_file=self.per_file,
            info={"entry_id": detections.key, "image_name": detections.name},
            root=self.project_dir,
        )
        # the single-file layout of earlier versions: the import script ignores it
        remove_inside(self.project_dir, legacy_detections_file(self.project_dir, detections.key))
        return Delivery({"detections": folder.folder}, dict(folder.counts_by_parent()))

    def close(self, complete: bool) -> None:
        return None


class PaquoSink:
    """Detections written straight into the project through paquo (needs QuPath)."""

    name = "paquo"
    command = None

    def __init__(self, project_file: str | os.PathLike[str]) -> None:
        from conic_qp.qupath import paquo_io

        self.writer: Any = paquo_io.PaquoWriter(project_file)

    def open(self, classes: ClassScheme) -> list[str]:
        return list(self.writer.set_classes(classes))

    def existing_regions(self, key: str) -> list[Region] | None:
        return list(self.writer.read_regions(key))

    def write(self, detections: Detections) -> Delivery:
        from conic_qp.sinks.tables import read_table

        table = read_table(detections.table)
        removed, counts = self.writer.write_detections(
            detections.key,
            table,
            detections.classes,
            list(detections.regions),
            add_regions=detections.add_regions,
        )
        log.info(
            "%s: replaced %d conic-qp detections by %d",
            detections.name,
            removed,
            sum(counts.values()),
        )
        return Delivery({}, dict(counts), removed)

    def close(self, complete: bool) -> None:
        try:
            if complete:
                self.writer.save_project()
        finally:
            self.writer.close()
