"""Classified instances -> per-nucleus table in slide (level-0) coordinates.

One row per nucleus with the SPEC section 4 columns. Pixel convention (QuPath's): pixel ``(r, c)``
of a region covers ``[c, c+1) x [r, r+1)``, so its centre is ``(c + 0.5, r + 0.5)``; a region read
at ``scale`` level-0 px per region px with its top-left at ``origin_xy`` maps region point
``(x, y)`` to ``origin + scale * (x, y)``.

Outlines: all instances of a label map are traced in one pass (:func:`outline_polygons`): the
polygon through the midpoints of an instance's boundary pixel sides, which is the contour
``skimage.measure.find_contours(mask, 0.5)`` draws between inside and outside pixel centres,
then Douglas-Peucker simplified (``simplify``), mapped to level 0 and rounded to 0.01 px as the
GeoJSON writes it.

Measurements are those QuPath makes on that outline polygon (:func:`shape_measurements`), so
conic-qp's table and QuPath's measurement table agree: ``area_px`` / ``area_um2`` are the
polygon's area (level-0 px^2 / um^2; QuPath ``Nucleus: Area µm^2``), ``perimeter_um`` its
length, ``circularity`` 4 pi area / perimeter^2, ``solidity`` area / convex-hull area,
``max_caliper_um`` / ``min_caliper_um`` its Feret diameters, ``eccentricity`` that of the ellipse
with the polygon's second moments. ``mask_area_px`` is the instance's pixel count in level-0
px^2 (pixels x scale^2); the outline cuts 1/8 px^2 per convex corner, so it is ~1 % larger than
``area_px`` for typical nuclei.

Ids are uuid5 strings of the image id and the level-0 centroid of the pixels (2 decimals):
re-running the same model on the same slide gives the same ids (idempotent QuPath imports), two
slides never share one.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely
from skimage.measure import find_contours

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.postprocess import Instances

log = logging.getLogger(__name__)

#: Namespace of conic-qp nucleus ids (uuid5 of this URL); never change it, ids would change.
NUCLEUS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/conic-qp/conic-qp/nucleus")

BASE_COLUMNS: tuple[str, ...] = (
    "id",
    "centroid_x",
    "centroid_y",
    "class_id",
    "class_name",
    "class_prob",
)
SHAPE_COLUMNS: tuple[str, ...] = (
    "area_px",
    "area_um2",
    "mask_area_px",
    "perimeter_um",
    "circularity",
    "solidity",
    "max_caliper_um",
    "min_caliper_um",
    "eccentricity",
    "polygon_wkb",
)


def prob_column(class_name: str) -> str:
    """Column holding the probability of ``class_name``."""
    return f"prob_{class_name}"


def table_schema(classes: ClassScheme) -> dict[str, str]:
    """Ordered column -> pandas dtype of a nucleus table for ``classes``.

    ``"str"`` is pandas' string dtype (object on pandas 2); ``polygon_wkb`` holds WKB bytes.
    """
    schema: dict[str, str] = {
        "id": "str",
        "centroid_x": "float64",
        "centroid_y": "float64",
        "class_id": "int64",
        "class_name": "str",
        "class_prob": "float32",
    }
    for name in classes.names:
        schema[prob_column(name)] = "float32"
    schema.update(
        {
            "area_px": "float64",
            "area_um2": "float64",
            "mask_area_px": "float64",
            "perimeter_um": "float64",
            "circularity": "float32",
            "solidity": "float32",
            "max_caliper_um": "float64",
            "min_caliper_um": "float64",
            "eccentricity": "float32",
            "polygon_wkb": "object",
        }
    )
    return schema


def empty_table(classes: ClassScheme) -> pd.DataFrame:
    """A zero-row nucleus table with the right columns and dtypes."""
    return pd.DataFrame(
        {col: pd.Series([], dtype=dtype) for col, dtype in table_schema(classes).items()}
    )


def nucleus_id(image_id: str, x: float, y: float) -> str:
    """Stable id of the nucleus of ``image_id`` whose level-0 centroid is ``(x, y)``."""
    return str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{image_id}:{x:.2f}:{y:.2f}"))


def _largest_polygon(geom: shapely.Geometry) -> shapely.Geometry:
    """Largest polygon part of a (possibly multi / collection) geometry; empty polygon if none."""
    if isinstance(geom, shapely.Polygon):
        return geom
    parts = [
        g
        for g in getattr(geom, "geoms", [])
        if isinstance(g, shapely.Polygon | shapely.MultiPolygon)
    ]
    polys = [p for g in parts for p in (g.geoms if isinstance(g, shapely.MultiPolygon) else [g])]
    if not polys:
        return shapely.Polygon()
    return max(polys, key=lambda p: p.area)


# --------------------------------------------------------------------------------- outlines

#: Pixel sides a boundary crack can lie on, as (row, col) steps: 0 N, 1 E, 2 S, 3 W.
_SIDE_STEPS = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)], dtype=np.int64)


@dataclass
class _Rings:
    """Outer contour of every instance: ring ``j`` (label ``labels[j]``) is
    ``xy[starts[j]:starts[j + 1]]``, vertices (x, y) in region px, not closed."""

    labels: np.ndarray
    xy: np.ndarray
    starts: np.ndarray


@dataclass
class _Cracks:
    """Boundary cracks of a label map: pixel sides between an instance pixel and a pixel of
    another label. Crack ``i`` is side ``side[i]`` (0 N, 1 E, 2 S, 3 W) of pixel ``pixel[i]``
    (flat index in the map padded by one pixel, row width ``width``), of instance
    ``label[i]``; cracks are grouped by side and in raster order within a side (``bounds``)."""

    pixel: np.ndarray
    side: np.ndarray
    label: np.ndarray
    bounds: np.ndarray
    width: int
    padded: np.ndarray

    @property
    def row(self) -> np.ndarray:
        return self.pixel // self.width - 1

    @property
    def col(self) -> np.ndarray:
        return self.pixel % self.width - 1


def _cracks(labels: np.ndarray) -> _Cracks:
    """All boundary cracks of a label map, from two whole-map comparisons."""
    h, w = labels.shape
    w2 = w + 2
    pad = np.zeros((h + 2, w2), dtype=np.int32)
    pad[1:-1, 1:-1] = labels
    flat = pad.ravel()
    # row ends and starts are padding (0 == 0): flat neighbours differ only inside rows
    hor = np.flatnonzero(flat[1:] != flat[:-1])
    ver = np.flatnonzero(flat[w2:] != flat[:-w2])
    lower, right = ver + w2, hor + 1
    pix = [
        lower[flat[lower] != 0],
        hor[flat[hor] != 0],
        ver[flat[ver] != 0],
        right[flat[right] != 0],
    ]
    sizes = [a.size for a in pix]
    p = np.concatenate(pix)
    return _Cracks(
        pixel=p,
        side=np.repeat(np.arange(4), sizes),
        label=flat[p].astype(np.int64),
        bounds=np.r_[0, np.cumsum(sizes)],
        width=w2,
        padded=flat,
    )


def _crack_moments(cr: _Cracks, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count and sums of pixel rows and columns of every label 0..n_labels-1, exactly.

    In one column, the pixels of a label form runs [a, b) that start at a top crack and end
    at a bottom crack, and the sum of ``r + 1/2`` over a run is ``(b^2 - a^2) / 2`` (likewise
    for rows with left/right cracks). Integer arithmetic over the cracks gives the same sums
    as over the pixels, without scanning the pixels.
    """
    r, c = cr.row, cr.col
    b = cr.bounds
    top, right, bottom, left = (slice(b[i], b[i + 1]) for i in range(4))

    def total(sl: slice, v: np.ndarray) -> np.ndarray:
        return np.bincount(cr.label[sl], weights=v, minlength=n_labels)

    count = total(bottom, r[bottom] + 1.0) - total(top, r[top].astype(np.float64))
    twice_r = total(bottom, (r[bottom] + 1.0) ** 2) - total(top, r[top] ** 2.0)
    twice_c = total(right, (c[right] + 1.0) ** 2) - total(left, c[left] ** 2.0)
    return count, (twice_r - count) / 2, (twice_c - count) / 2


def _trace_contours(cr: _Cracks) -> tuple[_Rings, np.ndarray]:
    """Trace the outer contour of every instance of a label map in one pass.

    Every crack is followed by exactly one crack of the same instance, found from the 2x2
    pixels around its end (interior on the left; diagonal neighbours are not connected, as
    ``find_contours`` treats a binary mask by default), so all contours are traced at once with
    array operations. The polygon through the crack midpoints is the marching-squares contour
    at level 0.5 between inside and outside pixel centres, i.e. what
    ``skimage.measure.find_contours(mask, 0.5)`` gives for the instance's mask.

    Each instance's walk starts on the top side of its first pixel in raster order, which lies
    on the outer contour of that pixel's part. When the walk closes before it has visited all
    the instance's cracks, the instance has holes or several 4-connected parts; those labels
    are returned separately (second value) for the per-instance path, which picks the contour
    enclosing the largest area as before.
    """
    flat, w2, p, k, lab = cr.padded, cr.width, cr.pixel, cr.side, cr.label
    off = _SIDE_STEPS[:, 0] * w2 + _SIDE_STEPS[:, 1]
    ahead = (k + 3) % 4  # walking direction with the interior on the left
    a_left = p + off[ahead]
    a_right = a_left + off[k]
    left_in = flat[a_left] == lab
    right_in = flat[a_right] == lab
    next_p = np.where(left_in, np.where(right_in, a_right, a_left), p)
    next_k = np.where(left_in, np.where(right_in, (k + 1) % 4, k), ahead)
    # cracks of one side are sorted by pixel: find the successor's index by binary search
    succ = np.empty(p.size, dtype=np.int64)
    for side in range(4):
        lo, hi = cr.bounds[side], cr.bounds[side + 1]
        sel = next_k == side
        succ[sel] = lo + np.searchsorted(p[lo:hi], next_p[sel])

    n_top = int(cr.bounds[1])  # top sides come first, in raster order
    present, start = np.unique(lab[:n_top], return_index=True)
    if present.size == 0:
        return _Rings(present, np.zeros((0, 2)), np.zeros(1, dtype=np.int64)), present
    total = np.bincount(lab, minlength=int(present[-1]) + 1)[present]
    offset = np.r_[0, np.cumsum(total)[:-1]]  # each walk's slot, in label order
    # walk all contours together, longest first, so the walks still running are a prefix
    by_len = np.argsort(-total, kind="stable")
    length, slot = total[by_len], offset[by_len]
    walk = np.empty(int(total.sum()), dtype=np.int64)
    cur = start[by_len].astype(np.int64)
    running = length.size
    for step in range(int(length[0])):
        while length[running - 1] <= step:
            running -= 1
        walk[slot[:running] + step] = cur[:running]
        cur[:running] = succ[cur[:running]]
    # a walk back at its start before visiting all its label's cracks: further rings
    owner = np.repeat(np.arange(present.size), total)
    again = walk == start[owner]
    again[offset] = False
    simple = np.ones(present.size, dtype=bool)
    simple[owner[again]] = False
    cracks = walk[simple[owner]]
    ck, cp = k[cracks], p[cracks]
    xy = np.empty((cracks.size, 2), dtype=np.float64)
    xy[:, 0] = cp % w2 - 0.5 + 0.5 * _SIDE_STEPS[ck, 1]  # col - 1 + 0.5 (padding undone)
    xy[:, 1] = cp // w2 - 0.5 + 0.5 * _SIDE_STEPS[ck, 0]
    rings = _Rings(present[simple], xy, np.r_[0, np.cumsum(total[simple])])
    return rings, present[~simple]


def _drop_collinear(rings: _Rings) -> _Rings:
    """Remove vertices inside straight runs (same step in and out): the polygon is unchanged.

    Crack-midpoint contours are staircases of unit and half-diagonal steps; about half of their
    vertices lie inside straight runs, and dropping them first halves the simplifier's work.
    """
    n = rings.xy.shape[0]
    if n == 0:
        return rings
    counts = np.diff(rings.starts)
    idx = np.arange(n)
    ring = np.repeat(np.arange(counts.size), counts)
    first, last = rings.starts[:-1][ring], rings.starts[1:][ring] - 1
    prev = np.where(idx == first, last, idx - 1)
    nxt = np.where(idx == last, first, idx + 1)
    step_in = rings.xy - rings.xy[prev]
    step_out = rings.xy[nxt] - rings.xy
    keep = np.any(step_in != step_out, axis=1)
    kept = np.bincount(ring[keep], minlength=counts.size)
    return _Rings(rings.labels, rings.xy[keep], np.r_[0, np.cumsum(kept)])


def _contour(mask: np.ndarray) -> np.ndarray:
    """Outer contour (N, 2) in (row, col) index space of a binary crop padded by one pixel.

    The per-instance path for instances with holes or several parts: ``find_contours`` at level
    0.5 runs between inside and outside pixel centres; the contour enclosing the largest area
    is the instance's outline.
    """
    contours = find_contours(mask.astype(np.float32), 0.5)
    if not contours:
        return np.empty((0, 2))
    if len(contours) == 1:
        return contours[0]

    def area(c: np.ndarray) -> float:
        y, x = c[:, 0], c[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))

    return max(contours, key=area)


def _contour_of(labels: np.ndarray, label: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Outline (N, 2) in region px (x, y) of one instance, from its padded bounding-box crop.

    ``box`` is (r0, r1, c0, c1), rows r0..r1-1 and columns c0..c1-1.
    """
    h, w = labels.shape
    r0, r1, c0, c1 = box
    r0p, c0p, r1p, c1p = max(r0 - 1, 0), max(c0 - 1, 0), min(r1 + 1, h), min(c1 + 1, w)
    crop = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=bool)
    crop[r0p - r0 + 1 : r1p - r0 + 1, c0p - c0 + 1 : c1p - c0 + 1] = (
        labels[r0p:r1p, c0p:c1p] == label
    )
    contour = _contour(crop)
    # (row, col) in crop index space -> continuous (x, y) in region px (pixel centres at +0.5)
    xy = np.empty_like(contour)
    xy[:, 0] = contour[:, 1] + (c0 - 1) + 0.5
    xy[:, 1] = contour[:, 0] + (r0 - 1) + 0.5
    return xy


def outline_polygons(
    labels: np.ndarray, present: np.ndarray, simplify: float, cracks: _Cracks | None = None
) -> np.ndarray:
    """Outline polygon (region px) of every instance in ``present`` (sorted labels), in order.

    The contour of :func:`_trace_contours` without its collinear vertices, simplified with
    Douglas-Peucker (``simplify`` px) in one vectorised shapely call. The outlines are not
    checked here: :func:`instances_to_table` repairs invalid ones after the final rounding.
    """
    cr = _cracks(labels) if cracks is None else cracks
    rings, complex_labels = _trace_contours(cr)
    rings = _drop_collinear(rings)
    polys = np.empty(present.size, dtype=object)
    counts = np.diff(rings.starts)
    simple_rings = shapely.polygons(
        shapely.linearrings(rings.xy, indices=np.repeat(np.arange(counts.size), counts))
    )
    polys[np.searchsorted(present, rings.labels)] = simple_rings
    if complex_labels.size:
        sel = np.isin(cr.label, complex_labels)
        lab, r, c = cr.label[sel], cr.row[sel], cr.col[sel]
        for label in complex_labels.tolist():
            mine = lab == label
            rl, cl = r[mine], c[mine]
            box = (int(rl.min()), int(rl.max()) + 1, int(cl.min()), int(cl.max()) + 1)
            xy = _contour_of(labels, label, box)
            i = int(np.searchsorted(present, label))
            polys[i] = shapely.Polygon(xy) if len(xy) >= 4 else shapely.Polygon()
    if simplify > 0:
        # plain Douglas-Peucker costs half the topology-preserving kind; the rare outline it
        # collapses is simplified again keeping topology, a self-touching one is repaired later
        out = shapely.simplify(polys, simplify, preserve_topology=False)
        lost = shapely.is_empty(out) & ~shapely.is_empty(polys)
        if lost.any():
            out[lost] = shapely.simplify(polys[lost], simplify, preserve_topology=True)
        polys = out
    return polys


# ----------------------------------------------------------------------------- measurements


def _ring_coordinates(polys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of the exterior rings: start (E, 2), end (E, 2) and the polygon of each edge."""
    xy, idx = shapely.get_coordinates(shapely.get_exterior_ring(polys), return_index=True)
    same = idx[1:] == idx[:-1]  # rings come closed: consecutive vertices of one ring
    return xy[:-1][same], xy[1:][same], idx[:-1][same]


def _eccentricity(polys: np.ndarray) -> np.ndarray:
    """Eccentricity of the ellipse with the outline's second moments (0 disc, -> 1 line).

    Moments of the polygon region (Green's theorem over its edges), the continuous form of the
    ellipse fit QuPath's cell detection reports (ImageJ): ``sqrt(1 - l2 / l1)`` of the
    eigenvalues of the central second-moment matrix. Coordinates are taken relative to each
    ring's first vertex, so level-0 offsets of 1e5 px lose no precision.
    """
    n = polys.size
    a, b, who = _ring_coordinates(polys)
    if who.size == 0:
        return np.zeros(n)
    ref = np.zeros((n, 2))
    ref[who[::-1]] = a[::-1]  # any vertex of the ring works; this is its first
    a = a - ref[who]
    b = b - ref[who]
    x0, y0, x1, y1 = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    cross = x0 * y1 - x1 * y0

    def total(v: np.ndarray) -> np.ndarray:
        return np.bincount(who, weights=v, minlength=n)

    area = total(cross) / 2
    sx = total((x0 + x1) * cross) / 6
    sy = total((y0 + y1) * cross) / 6
    sxx = total((x0 * x0 + x0 * x1 + x1 * x1) * cross) / 12
    syy = total((y0 * y0 + y0 * y1 + y1 * y1) * cross) / 12
    sxy = total((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / 24
    ok = area != 0
    safe = np.where(ok, area, 1.0)
    cx, cy = sx / safe, sy / safe
    mu20, mu02, mu11 = sxx / safe - cx * cx, syy / safe - cy * cy, sxy / safe - cx * cy
    half = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1 = (mu20 + mu02) / 2 + half
    l2 = (mu20 + mu02) / 2 - half
    ratio = np.divide(l2, l1, out=np.ones(n), where=ok & (l1 > 0))
    return np.sqrt(np.clip(1 - ratio, 0, 1))


def _calipers(hulls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and min caliper (Feret) diameters of convex polygons (``hulls``).

    Max: the largest distance between two hull vertices. Min: the smallest width, i.e. over
    the hull's edges the least of the largest vertex distance from the edge's line (the
    rotating-calipers minimum lies on an edge). Hulls with the same number of vertices are
    measured together as (k, m, m) arrays, without padding.
    """
    n = hulls.size
    xy, idx = shapely.get_coordinates(hulls, return_index=True)
    counts = np.bincount(idx, minlength=n)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    feret_max = np.zeros(n)
    feret_min = np.zeros(n)
    for m in np.unique(counts).tolist():
        if m < 3:  # empty or degenerate
            continue
        sel = np.flatnonzero(counts == m)
        pts = xy[starts[sel, None] + np.arange(m - 1)]  # (k, m - 1, 2), closing vertex dropped
        pts = pts - pts[:, :1]  # relative to a vertex: no cancellation at level-0 offsets
        sq = (pts**2).sum(axis=-1)
        gram = pts @ pts.transpose(0, 2, 1)
        d2 = sq[:, :, None] + sq[:, None, :] - 2 * gram
        feret_max[sel] = np.sqrt(np.maximum(d2.max(axis=(1, 2)), 0))
        edge = np.roll(pts, -1, axis=1) - pts  # vertex i -> i + 1
        normal = np.stack([-edge[..., 1], edge[..., 0]], axis=-1)
        # distance of vertex j from the line of edge i: |n_i . (p_j - p_i)| / |n_i|
        proj = normal @ pts.transpose(0, 2, 1) - (normal * pts).sum(axis=-1)[:, :, None]
        length = np.hypot(edge[..., 0], edge[..., 1])
        width = np.abs(proj).max(axis=2) / np.where(length > 0, length, 1.0)
        width[length <= 0] = np.inf
        best = width.min(axis=1)
        feret_min[sel] = np.where(np.isfinite(best), best, 0.0)
    return feret_max, feret_min


def shape_measurements(polys: np.ndarray) -> dict[str, np.ndarray]:
    """QuPath's shape measurements of level-0 outline polygons, in level-0 px units.

    Returns ``area`` (px^2), ``perimeter`` (px), ``circularity`` (4 pi area / perimeter^2 of
    the exterior ring), ``solidity`` (area / convex-hull area), ``max_caliper``,
    ``min_caliper`` (px) and ``eccentricity``: what QuPath computes on the same ROI.
    """
    area = shapely.area(polys)
    perimeter = shapely.length(polys)
    hulls = shapely.convex_hull(polys)
    hull_area = shapely.area(hulls)
    ring = shapely.get_exterior_ring(polys)
    ring_area = shapely.area(shapely.polygons(ring))
    ring_length = shapely.length(ring)
    circularity = np.divide(
        4 * np.pi * ring_area, ring_length**2, out=np.zeros(polys.size), where=ring_length > 0
    )
    solidity = np.divide(area, hull_area, out=np.ones(polys.size), where=hull_area > 0)
    feret_max, feret_min = _calipers(hulls)
    return {
        "area": area,
        "perimeter": perimeter,
        "circularity": circularity,
        "solidity": solidity,
        "max_caliper": feret_max,
        "min_caliper": feret_min,
        "eccentricity": _eccentricity(polys),
    }


def nucleus_ids(image_id: str, x: np.ndarray, y: np.ndarray) -> list[str]:
    """:func:`nucleus_id` of many nuclei (the same strings, ~10x faster than ``uuid.uuid5``)."""
    ns = NUCLEUS_NAMESPACE.bytes
    out = []
    for xi, yi in zip(np.asarray(x).tolist(), np.asarray(y).tolist(), strict=True):
        d = bytearray(hashlib.sha1(ns + f"{image_id}:{xi:.2f}:{yi:.2f}".encode()).digest()[:16])
        d[6] = (d[6] & 0x0F) | 0x50  # version 5
        d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
        s = d.hex()
        out.append(f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:]}")
    return out


def instances_to_table(
    inst: Instances,
    classes: ClassScheme,
    *,
    origin_xy: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    mpp_level0: float,
    image_id: str,
    simplify: float = 0.25,
) -> pd.DataFrame:
    """Measure and outline every instance of one region, in level-0 coordinates.

    Parameters
    ----------
    inst : instances of one region, in that region's pixel grid (the model's um/px).
    classes : the model's class scheme (names, colours; ids 1..C).
    origin_xy : level-0 (x, y) of the region's top-left corner.
    scale : level-0 px per region px, e.g. 2.0 when a 0.25 um/px slide is read at 0.5 um/px.
    mpp_level0 : level-0 um/px of the slide, for the um / um^2 columns.
    image_id : identifies the slide in the nucleus ids (e.g. the QuPath entry id or file name).
    simplify : Douglas-Peucker tolerance in region px for the outlines (0 keeps every vertex);
        0.25 drops the collinear staircase vertices (about 60% of them) without moving corners,
        0.5 already cuts the corners of small nuclei (10% area loss on a 10 px square).

    Returns
    -------
    DataFrame with the columns of :func:`table_schema`, one row per present label in increasing
    label order; areas and lengths in level-0 units, shape measurements of the outline polygon
    (see the module docstring).
    """
    if not scale > 0 or not np.isfinite(scale):
        raise ConicQPError(
            f"scale must be a positive number of level-0 px per region px, got {scale}"
        )
    if not mpp_level0 > 0 or not np.isfinite(mpp_level0):
        raise ConicQPError(
            f"mpp_level0 must be a positive um/px, got {mpp_level0}; give the slide's um/px"
        )
    labels = np.asarray(inst.labels)
    if labels.ndim != 2:
        raise ConicQPError(f"instance labels must be a 2-D map, got shape {labels.shape}")
    n_classes = classes.n_classes
    probs = (
        np.asarray(inst.probs, dtype=np.float32).reshape(-1, n_classes)
        if inst.n
        else np.zeros((0, n_classes), np.float32)
    )
    if inst.n and probs.shape[0] != inst.n:
        raise ConicQPError(
            f"instances have {inst.n} classes but {probs.shape[0]} probability rows; "
            "postprocess output is inconsistent"
        )
    if inst.n == 0 or not labels.any():
        return empty_table(classes)
    if int(labels.max()) > inst.n:
        raise ConicQPError(
            f"instance map has label {int(labels.max())} but only {inst.n} classified instances"
        )
    if labels.min() < 0:
        raise ConicQPError("instance map has negative labels; use 0 for background")
    labels = labels.astype(np.int32, copy=False)

    cracks = _cracks(labels)
    count_all, sum_r, sum_c = _crack_moments(cracks, int(labels.max()) + 1)
    lab = np.flatnonzero(count_all[1:]) + 1  # present labels
    count = count_all[lab]
    mean_r, mean_c = sum_r[lab] / count, sum_c[lab] / count
    k = lab - 1
    cls = np.asarray(inst.classes, dtype=np.int64)[k]
    if cls.size and (cls.min() < 1 or cls.max() > n_classes):
        raise ConicQPError(
            f"instance classes must be 1..{n_classes} for scheme {classes.name!r}, got "
            f"{int(cls.min())}..{int(cls.max())}; is the checkpoint's class list right?"
        )
    ox, oy = float(origin_xy[0]), float(origin_xy[1])
    cx = ox + scale * (mean_c + 0.5)
    cy = oy + scale * (mean_r + 0.5)

    polys = outline_polygons(labels, lab, simplify, cracks)
    # level-0 coordinates, rounded as the GeoJSON writes them: the measurements below are
    # those of the outline QuPath reads
    shift = np.array([ox, oy])
    polys = shapely.transform(polys, lambda c: np.round(c * scale + shift, 2))
    invalid = ~shapely.is_valid(polys)
    if invalid.any():
        polys[invalid] = [_largest_polygon(g) for g in shapely.make_valid(polys[invalid])]
    m = shape_measurements(polys)

    p = probs[k]
    names = np.array(classes.names, dtype=object)
    data: dict[str, object] = {
        "id": nucleus_ids(image_id, cx, cy),
        "centroid_x": cx,
        "centroid_y": cy,
        "class_id": cls,
        "class_name": names[cls - 1],
        "class_prob": p[np.arange(len(cls)), cls - 1],
    }
    for j, name in enumerate(classes.names):
        data[prob_column(name)] = p[:, j]
    data.update(
        {
            "area_px": m["area"],
            "area_um2": m["area"] * mpp_level0**2,
            "mask_area_px": count * scale**2,
            "perimeter_um": m["perimeter"] * mpp_level0,
            "circularity": m["circularity"],
            "solidity": m["solidity"],
            "max_caliper_um": m["max_caliper"] * mpp_level0,
            "min_caliper_um": m["min_caliper"] * mpp_level0,
            "eccentricity": m["eccentricity"],
            "polygon_wkb": list(shapely.to_wkb(polys)),
        }
    )
    table = pd.DataFrame(data).astype(table_schema(classes))
    return _dedupe_ids(table)


def _dedupe_ids(table: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose id repeats (same image, same centroid to 0.01 px: the same nucleus)."""
    dup = table["id"].duplicated(keep="first")
    if dup.any():
        log.warning("dropping %d nuclei with duplicate ids (same centroid)", int(dup.sum()))
        table = table.loc[~dup].reset_index(drop=True)
    return table


def concat_tables(tables: Iterable[pd.DataFrame], classes: ClassScheme) -> pd.DataFrame:
    """Concatenate per-region tables of one slide, keeping the schema and unique ids."""
    schema = table_schema(classes)
    parts: Sequence[pd.DataFrame] = [t for t in tables if len(t)]
    if not parts:
        return empty_table(classes)
    for t in parts:
        missing = [c for c in schema if c not in t.columns]
        if missing:
            raise ConicQPError(
                f"nucleus table lacks columns {missing}; was it made with another class scheme?"
            )
    out = pd.concat([t[list(schema)] for t in parts], ignore_index=True)
    out = out.astype(schema)
    return _dedupe_ids(out)
