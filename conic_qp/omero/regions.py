"""An image's existing OMERO ROIs as composition regions (level-0 px geometries).

Shapes with an area count: polygons (``points`` ``"x,y x,y ..."``, and the pre-5.1
``"points[x,y, x,y] points1[...]"`` form), rectangles and ellipses, each with its affine
``transform`` when set. Lines, points, labels and masks have no area and are skipped; so are
conic-qp's own nucleus ROIs (:data:`~conic_qp.omero.results.ROI_NAME`) and QuPath *detections*.

QuPath's OMERO extension writes each shape's ``text`` as
``"Annotation:Class&Sub:uuid:parent-uuid:name"`` (``NoClass`` / ``NoName`` when unset; older
versions only ``"Annotation:Class"``), and groups the shapes of one object by uuid: those become
one region named by the object's name or class. Other ROIs become one region each (all their
shapes united), named by the ROI name, else the shape text, else ``"ROI <id>"``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
import shapely.affinity

from conic_qp.composition import CompositionRegion, regions_from
from conic_qp.regions import Region

log = logging.getLogger(__name__)

__all__ = [
    "ShapeInfo",
    "parse_points",
    "parse_qupath_text",
    "read_image_regions",
    "regions_from_shapes",
    "shape_geometry",
]

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
#: Segments used to approximate an ellipse.
ELLIPSE_SEGMENTS = 64


@dataclass(frozen=True)
class ShapeInfo:
    """A shape of an ROI reduced to what composition needs (plain values, no omero-py)."""

    roi_id: int
    kind: str  # "polygon", "rectangle", "ellipse" or anything else (skipped)
    params: dict[str, Any]
    text: str | None = None
    roi_name: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None


def parse_points(text: str) -> np.ndarray:
    """OMERO polygon points -> (N, 2) float array; both ``"x,y x,y"`` and the legacy
    ``"points[x,y, x,y] points1[...] ..."`` (only ``points[...]`` is used)."""
    s = text.strip()
    legacy = re.search(r"points\[([^\]]*)\]", s)
    if legacy:
        nums = [float(v) for v in re.split(r"[,\s]+", legacy.group(1).strip()) if v]
    else:
        nums = [float(v) for pair in s.split() for v in pair.split(",") if v]
    if len(nums) % 2:
        raise ValueError(f"odd number of coordinates in {text[:60]!r}")
    return np.asarray(nums, dtype=np.float64).reshape(-1, 2)


def parse_qupath_text(text: str | None) -> dict[str, str | None] | None:
    """Fields of a QuPath-written shape text, or ``None`` when it is not one.

    ``{"type": "Annotation"|"Detection", "class": "A: B" or None, "uuid", "parent", "name"}``.
    """
    if not text:
        return None
    parts = text.split(":")
    if parts[0] not in ("Annotation", "Detection") or len(parts) < 2:
        return None
    cls = parts[1]
    out: dict[str, str | None] = {
        "type": parts[0],
        "class": None if cls in ("", "NoClass") else cls.replace("&", ": "),
        "uuid": parts[2] if len(parts) > 2 and _UUID.match(parts[2]) else None,
        "parent": parts[3] if len(parts) > 3 and _UUID.match(parts[3]) else None,
        "name": None,
    }
    if len(parts) > 4:
        name = ":".join(parts[4:])
        out["name"] = None if name in ("", "NoName") else name
    return out


def shape_geometry(shape: ShapeInfo) -> shapely.Geometry | None:
    """Level-0 geometry of a shape; ``None`` for shapes without area or broken ones."""
    p = shape.params
    try:
        if shape.kind == "polygon":
            pts = parse_points(str(p["points"]))
            geom = shapely.Polygon(pts) if len(pts) >= 3 else None
        elif shape.kind == "rectangle":
            x, y, w, h = (float(p[k]) for k in ("x", "y", "width", "height"))
            geom = shapely.box(x, y, x + w, y + h) if w > 0 and h > 0 else None
        elif shape.kind == "ellipse":
            cx, cy, rx, ry = (float(p[k]) for k in ("x", "y", "radiusX", "radiusY"))
            t = np.linspace(0, 2 * np.pi, ELLIPSE_SEGMENTS, endpoint=False)
            ring = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
            geom = shapely.Polygon(ring) if rx > 0 and ry > 0 else None
        else:
            return None
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ROI %d: unreadable %s shape skipped (%s)", shape.roi_id, shape.kind, exc)
        return None
    if geom is None:
        return None
    if shape.transform is not None:
        a00, a10, a01, a11, a02, a12 = shape.transform
        geom = shapely.affinity.affine_transform(geom, [a00, a01, a10, a11, a02, a12])
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom if geom.area > 0 else None


def regions_from_shapes(
    shapes: Iterable[ShapeInfo], skip_roi_names: Sequence[str] = ()
) -> list[Region]:
    """Group shapes into regions (see the module docstring); labels made unique."""
    groups: dict[str, dict[str, Any]] = {}
    for s in shapes:
        if s.roi_name in skip_roi_names:
            continue
        qp = parse_qupath_text(s.text)
        if qp is not None and qp["type"] == "Detection":
            continue
        geom = shape_geometry(s)
        if geom is None:
            continue
        key = f"qupath:{qp['uuid']}" if qp is not None and qp["uuid"] else f"roi:{s.roi_id}"
        g = groups.setdefault(key, {"geoms": [], "roi": s.roi_id, "qp": qp, "shape": s})
        g["geoms"].append(geom)
    items = []
    for g in groups.values():
        qp, s = g["qp"], g["shape"]
        cls = qp["class"] if qp is not None else None
        if qp is not None:
            label = qp["name"] or cls or s.roi_name or f"ROI {g['roi']}"
        else:
            label = s.roi_name or (s.text or None) or f"ROI {g['roi']}"
        geom = shapely.union_all(g["geoms"]) if len(g["geoms"]) > 1 else g["geoms"][0]
        items.append(CompositionRegion(str(label), geom, cls, str(g["roi"])))
    return regions_from(items)


def shape_info(roi: Any, shape: Any) -> ShapeInfo:
    """:class:`ShapeInfo` of an ``omero.model`` shape of ``roi``."""
    from conic_qp.omero.connection import omero_api

    api = omero_api()
    model, unwrap = api.model, api.rtypes.unwrap
    roi_id = int(unwrap(roi.getId()) or 0)
    name = unwrap(roi.getName()) if hasattr(roi, "getName") else None
    text = unwrap(shape.getTextValue()) if hasattr(shape, "getTextValue") else None
    params: dict[str, Any]
    if isinstance(shape, model.PolygonI):
        kind, params = "polygon", {"points": unwrap(shape.getPoints())}
    elif isinstance(shape, model.RectangleI):
        kind = "rectangle"
        params = {
            k: unwrap(getattr(shape, f"get{k[0].upper()}{k[1:]}")())
            for k in ("x", "y", "width", "height")
        }
    elif isinstance(shape, model.EllipseI):
        kind = "ellipse"
        params = {
            k: unwrap(getattr(shape, f"get{k[0].upper()}{k[1:]}")())
            for k in ("x", "y", "radiusX", "radiusY")
        }
    else:
        kind, params = type(shape).__name__.removesuffix("I").lower(), {}
    transform: tuple[float, float, float, float, float, float] | None = None
    tr = shape.getTransform() if hasattr(shape, "getTransform") else None
    if tr is not None:
        vals = [unwrap(getattr(tr, f"getA{k}")()) for k in ("00", "10", "01", "11", "02", "12")]
        if all(v is not None for v in vals):
            a00, a10, a01, a11, a02, a12 = (float(v) for v in vals)
            transform = (a00, a10, a01, a11, a02, a12)
    return ShapeInfo(roi_id, kind, params, text, name, transform)


def read_image_regions(conn: Any, image_id: int, server: str = "the server") -> list[Region]:
    """The composition regions of an OMERO image's ROIs (not conic-qp's own nucleus ROIs)."""
    from conic_qp.omero.connection import omero_errors
    from conic_qp.omero.results import ROI_NAME

    with omero_errors(f"reading the ROIs of image {image_id}", server):
        result = conn.getRoiService().findByImage(int(image_id), None, conn.SERVICE_OPTS)
        shapes = [shape_info(roi, sh) for roi in result.rois for sh in roi.copyShapes()]
    regions = regions_from_shapes(shapes, skip_roi_names=(ROI_NAME,))
    log.info("image %d: %d region(s) from %d ROI shape(s)", image_id, len(regions), len(shapes))
    return regions
