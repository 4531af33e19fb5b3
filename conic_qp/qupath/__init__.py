"""QuPath integration without Java: project files, the class list, and paths the Groovy scripts use.

``groovy/import_conic_qp.groovy`` reads :func:`detections_path` files and removes earlier objects
carrying the :data:`conic_qp.sinks.geojson.MARKER` measurement;
``groovy/export_annotations_geojson.groovy`` writes :func:`regions_path` files.
"""

from conic_qp.qupath.classes import update_project_classes
from conic_qp.qupath.project import (
    ProjectImage,
    QuPathProject,
    backup_file,
    detections_path,
    ensure_project_writable,
    parse_remap,
    project_lock,
    read_project,
    regions_path,
    write_project,
)

__all__ = [
    "ProjectImage",
    "QuPathProject",
    "backup_file",
    "detections_path",
    "ensure_project_writable",
    "parse_remap",
    "project_lock",
    "read_project",
    "regions_path",
    "update_project_classes",
    "write_project",
]
