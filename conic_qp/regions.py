"""One region type for every module, and which region holds each nucleus (QuPath's rule).

A :class:`Region` is an area in level-0 pixels that nuclei are counted in or placed under: a
QuPath annotation (from GeoJSON or paquo), an OMERO ROI, a polygon given by the user, or the
whole slide/tissue (``geometry=None``, with its area in ``area_px``). GeoJSON readers, the QuPath
and OMERO writers and the composition tables all use this one type.

:func:`parent_regions` reproduces where QuPath's hierarchy puts a detection (the smallest
annotation covering its centroid, the centroid as QuPath computes it from the outline), so the
detections conic-qp writes under their parents and the composition tables agree with QuPath's
own counts. Pure: data frames and geometries in, arrays out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import shapely

from conic_qp.errors import ConicQPError

__all__ = ["Region", "parent_regions", "qupath_centroids"]


@dataclass(frozen=True)
class Region:
    """An area in level-0 pixel coordinates (``geometry=None``: the whole slide or tissue).

    Attributes
    ----------
    geometry : Polygon / MultiPolygon (holes honoured), or None for the whole slide.
    name, class_name, id : the annotation's name, classification and id (a UUID for QuPath).
    properties : the source's other properties (GeoJSON ``properties``), not compared.
    area_px : the area in level-0 px^2 when it is not the geometry's (the whole tissue).
    """

    geometry: shapely.Geometry | None
    name: str | None = None
    class_name: str | None = None
    id: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    area_px: float | None = None

    @property
    def label(self) -> str:
        """Human-readable label for tables: name, else class, else id."""
        return self.name or self.class_name or self.id or "region"

    @property
    def area(self) -> float:
        """Area in level-0 px^2 (NaN when unknown)."""
        if self.area_px is not None:
            return float(self.area_px)
        return float(self.geometry.area) if self.geometry is not None else math.nan

    def named(self, name: str) -> Region:
        return replace(self, name=name)


def qupath_centroids(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of the nuclei as QuPath computes them for the objects conic-qp gives it.

    QuPath places a detection by the centroid of its ROI: the area centroid of the polygon with
    the coordinates as written (2 decimals) and stored (float32). The table's ``centroid_x/y``
    (mean of the mask pixels) differ from it by a fraction of a pixel, enough to flip a nucleus
    lying on an annotation border. Rows without an outline keep ``centroid_x/y``.
    """
    for col in ("centroid_x", "centroid_y"):
        if col not in table.columns:
            raise ConicQPError(f"nucleus table lacks column {col!r}; make it with conic-qp")
    cx = table["centroid_x"].to_numpy(np.float64).copy()
    cy = table["centroid_y"].to_numpy(np.float64).copy()
    if "polygon_wkb" not in table.columns or len(table) == 0:
        return cx, cy
    geoms = shapely.from_wkb(table["polygon_wkb"].to_numpy())
    geoms = shapely.transform(geoms, lambda c: np.round(c, 2).astype(np.float32).astype(np.float64))
    ok = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    if ok.any():
        xy = shapely.get_coordinates(shapely.centroid(geoms[ok]))
        cx[ok], cy[ok] = xy[:, 0], xy[:, 1]
    return cx, cy


def parent_regions(
    table: pd.DataFrame, geometries: Sequence[shapely.Geometry | None]
) -> np.ndarray:
    """Index of the region QuPath makes each nucleus a child of (-1: none, the image root).

    QuPath's rule (``PathObjectHierarchy.HIERARCHY_COMPARATOR``): the smallest-area annotation
    whose ROI contains the detection's centroid (:func:`qupath_centroids`); ties go to the first
    region. Nested regions therefore keep each nucleus in the innermost one, and a QuPath count of
    all detections below an annotation equals the centroid-rule count of :func:`assign_nuclei`
    unless annotations overlap without one containing the other (QuPath can give a nucleus only
    one parent; the centroid rule counts it in both).
    """
    n = len(table)
    parent = np.full(n, -1, dtype=np.int64)
    real = [(i, g) for i, g in enumerate(geometries) if g is not None and not g.is_empty]
    if not real or n == 0:
        return parent
    cx, cy = qupath_centroids(table)
    tree = shapely.STRtree(shapely.points(cx, cy))
    regions = np.array([g for _, g in real], dtype=object)
    shapely.prepare(regions)
    src, hit = tree.query(regions, predicate="covers")
    if src.size == 0:
        return parent
    area = shapely.area(regions)[src]
    order = np.lexsort((src, area, hit))  # per nucleus: smallest area, then first region
    hit_sorted = hit[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = hit_sorted[1:] != hit_sorted[:-1]
    index = np.array([i for i, _ in real], dtype=np.int64)
    parent[hit_sorted[first]] = index[src[order][first]]
    return parent
