"""QuPath integration without Java: project files, the class list, and paths the Groovy scripts use.

``groovy/import_conic_qp.groovy`` reads the :func:`detections_dir` folders (a manifest and chunk
files grouped by parent annotation), adds the annotations of ``regions/`` to images without any,
and removes earlier objects carrying the :data:`conic_qp.sinks.geojson.MARKER` measurement;
``groovy/export_annotations_geojson.groovy`` writes :func:`regions_path` files.
"""

from conic_qp.qupath.classes import update_project_classes
from conic_qp.qupath.project import (
    ProjectImage,
    QuPathProject,
    UriFix,
    backup_file,
    detections_dir,
    ensure_project_writable,
    fix_image_uris,
    parse_remap,
    project_lock,
    qupath_file_uri,
    read_project,
    regions_path,
    write_project,
)

__all__ = [
    "ProjectImage",
    "QuPathProject",
    "UriFix",
    "backup_file",
    "detections_dir",
    "ensure_project_writable",
    "fix_image_uris",
    "parse_remap",
    "project_lock",
    "qupath_file_uri",
    "read_project",
    "regions_path",
    "update_project_classes",
    "write_project",
]
