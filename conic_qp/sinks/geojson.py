"""QuPath GeoJSON: write nucleus tables as detections/cells, read annotations back as regions.

Rules, checked against QuPath 0.5.1's own reader and writer (``shared/data/qupath/geojson``) and
valid for QuPath 0.4-0.7:

- a ``FeatureCollection``; every Feature has a UUID ``id`` (non-UUID ids are silently replaced);
- ``properties.objectType`` is ``"detection"`` or ``"cell"``; for cells ``nucleusGeometry`` sits
  beside ``geometry`` at the Feature level, never inside ``properties``;
- ``properties.classification`` is ``{"name", "color": [r, g, b]}``; a classification without a
  colour makes QuPath reject the WHOLE file;
- ``properties.measurements`` is a flat dict of finite numbers (booleans are dropped by QuPath,
  NaN is stored as the string "NaN": conic-qp simply leaves non-finite values out);
- ``isLocked`` is omitted (QuPath itself omits it when false);
- coordinates are level-0 pixels with 2 decimals; ``.geojson.gz`` is read by QuPath directly and
  by the bundled Groovy import script.

Every feature also carries the measurement :data:`MARKER` so that ``import_conic_qp.groovy`` can
remove the previous conic-qp detections before adding new ones (idempotent re-runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip as gzip_mod
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import shape

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.objects import prob_column
from conic_qp.regions import Region, parent_regions
from conic_qp.sinks import atomic_open

log = logging.getLogger(__name__)

#: Measurement present on every conic-qp object; the Groovy import script removes objects that
#: have it. Its value is the GeoJSON format version.
MARKER = "conic-qp"
MARKER_VERSION = 1.0

#: Table column -> QuPath measurement name (QuPath's own cell-detection naming). The shape
#: columns are measured on the outline polygon that is written, as QuPath measures a ROI
#: (:func:`conic_qp.objects.shape_measurements`), so both measurement tables agree.
MEASUREMENT_NAMES: dict[str, str] = {
    "area_um2": "Nucleus: Area µm^2",
    "perimeter_um": "Nucleus: Perimeter µm",
    "circularity": "Nucleus: Circularity",
    "max_caliper_um": "Nucleus: Max caliper µm",
    "min_caliper_um": "Nucleus: Min caliper µm",
    "eccentricity": "Nucleus: Eccentricity",
    "solidity": "Nucleus: Solidity",
    "class_prob": "Class probability",
}

ObjectType = Literal["detection", "cell"]
_CHUNK = 2000  # features per write call: bounded memory, few syscalls


def probability_measurement(class_name: str) -> str:
    """QuPath measurement name of the probability of ``class_name``."""
    return f"Probability: {class_name}"


def _ring_json(coords: np.ndarray) -> str:
    """``[[x,y],...]`` with 2 decimals and the ring closed."""
    c = np.round(np.asarray(coords, dtype=np.float64), 2)
    if len(c) and not np.array_equal(c[0], c[-1]):
        c = np.vstack([c, c[:1]])
    return json.dumps(c.tolist(), separators=(",", ":"))


def _polygon_json(geom: shapely.Geometry) -> str | None:
    """GeoJSON geometry string of a (Multi)Polygon, 2 decimals, closed rings; None if empty."""
    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, shapely.Polygon):
        rings = [geom.exterior, *geom.interiors]
        body = ",".join(_ring_json(np.asarray(r.coords)) for r in rings)
        return f'{{"type":"Polygon","coordinates":[{body}]}}'
    if isinstance(geom, shapely.MultiPolygon):
        polys = []
        for p in geom.geoms:
            rings = [p.exterior, *p.interiors]
            polys.append("[" + ",".join(_ring_json(np.asarray(r.coords)) for r in rings) + "]")
        return f'{{"type":"MultiPolygon","coordinates":[{",".join(polys)}]}}'
    raise ConicQPError(f"nucleus outline is a {geom.geom_type}, expected a Polygon")


def _color_of(classes: ClassScheme) -> dict[str, list[int]]:
    return {c.name: [int(v) for v in c.color] for c in classes}


def iter_features(
    table: pd.DataFrame,
    classes: ClassScheme,
    *,
    object_type: ObjectType = "detection",
    cell_expansion: float = 0.0,
) -> Iterator[str]:
    """Yield one compact JSON string per nucleus (a QuPath-readable GeoJSON Feature).

    Parameters
    ----------
    table : nucleus table (:func:`conic_qp.objects.instances_to_table`).
    object_type : ``"detection"`` (nucleus outline) or ``"cell"`` (cell outline + nucleus).
    cell_expansion : for cells, level-0 px by which the nucleus is dilated to make the cell
        outline (0: cell = nucleus). Neighbouring cells may overlap; QuPath accepts that.
    """
    if object_type not in ("detection", "cell"):
        raise ConicQPError(f"object_type must be 'detection' or 'cell', got {object_type!r}")
    missing = [c for c in ("id", "class_name", "polygon_wkb") if c not in table.columns]
    if missing:
        raise ConicQPError(f"nucleus table lacks columns {missing}; make it with conic_qp.objects")
    colors = _color_of(classes)
    unknown = sorted(set(table["class_name"].astype(str)) - set(colors))
    if unknown:
        raise ConicQPError(
            f"nucleus table has classes {unknown} that scheme {classes.name!r} does not define; "
            "use the scheme of the model that made the table"
        )
    meas_cols = [(col, name) for col, name in MEASUREMENT_NAMES.items() if col in table.columns]
    meas_cols += [
        (prob_column(n), probability_measurement(n))
        for n in classes.names
        if prob_column(n) in table.columns
    ]
    class_json = {
        name: json.dumps({"name": name, "color": rgb}, separators=(",", ":"), ensure_ascii=False)
        for name, rgb in colors.items()
    }
    meas_keys = [json.dumps(name, ensure_ascii=False) for _, name in meas_cols]
    marker = f"{json.dumps(MARKER)}:{MARKER_VERSION!r}"
    # One %-format per feature (C speed) when all its measurements are finite.
    meas_format = ",".join([marker] + [f"{k.replace('%', '%%')}:%r" for k in meas_keys])
    ids = table["id"].astype(str).tolist()
    cnames = table["class_name"].astype(str).tolist()
    wkb = table["polygon_wkb"].to_numpy()
    for lo in range(0, len(table), _CHUNK):
        hi = min(lo + _CHUNK, len(table))
        geoms = shapely.from_wkb(wkb[lo:hi])
        nuclei = _polygons_json(geoms)
        cells = nuclei
        if object_type == "cell" and cell_expansion > 0:
            cells = _polygons_json(shapely.buffer(geoms, cell_expansion))
        values = (
            np.column_stack([table[col].to_numpy(dtype=np.float64)[lo:hi] for col, _ in meas_cols])
            if meas_cols
            else np.zeros((hi - lo, 0))
        )
        values = _round_significant(values, 7)
        finite = np.all(np.isfinite(values), axis=1, keepdims=False).reshape(-1)
        rows: list[list[float]] = values.tolist()
        for j in range(hi - lo):
            i = lo + j
            nucleus = nuclei[j]
            if nucleus is None:
                log.debug("skipping nucleus %s with an empty outline", ids[i])
                continue
            if finite[j]:
                meas = meas_format % tuple(rows[j])
            else:
                meas = ",".join(
                    [marker]
                    + [
                        f"{k}:{v!r}"
                        for k, v in zip(meas_keys, rows[j], strict=True)
                        if math.isfinite(v)
                    ]
                )
            props = (
                f'{{"objectType":"{object_type}","classification":{class_json[cnames[i]]},'
                f'"measurements":{{{meas}}}}}'
            )
            if object_type == "cell":
                yield (
                    f'{{"type":"Feature","id":"{ids[i]}","geometry":{cells[j]},'
                    f'"nucleusGeometry":{nucleus},"properties":{props}}}'
                )
            else:
                yield (
                    f'{{"type":"Feature","id":"{ids[i]}","geometry":{nucleus},'
                    f'"properties":{props}}}'
                )


def _round_significant(values: np.ndarray, digits: int) -> np.ndarray:
    """Round to ``digits`` significant digits: short JSON text, and nothing is lost that QuPath
    keeps (it stores detection measurements as float32, about 7 digits)."""
    ok = np.isfinite(values) & (values != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        exponent = np.floor(np.log10(np.abs(np.where(ok, values, 1.0))))
        factor = 10.0 ** (digits - 1 - exponent)
        return np.where(ok, np.round(values * factor) / factor, values)


def _polygons_json(geoms: np.ndarray) -> list[str | None]:
    """GeoJSON strings of many polygons; simple polygons (no holes) are formatted in bulk."""
    out: list[str | None] = [None] * len(geoms)
    simple = (
        (shapely.get_type_id(geoms) == 3)
        & (shapely.get_num_interior_rings(geoms) == 0)
        & ~shapely.is_empty(geoms)
    )
    idx = np.flatnonzero(simple)
    if idx.size:
        coords, which = shapely.get_coordinates(geoms[idx], return_index=True)
        verts = ["[%r,%r]" % (x, y) for x, y in np.round(coords, 2).tolist()]  # noqa: UP031
        bounds = np.searchsorted(which, np.arange(idx.size + 1)).tolist()
        for j, gi in enumerate(idx.tolist()):
            ring = ",".join(verts[bounds[j] : bounds[j + 1]])
            out[gi] = f'{{"type":"Polygon","coordinates":[[{ring}]]}}'
    for gi in np.flatnonzero(~simple).tolist():
        out[gi] = _polygon_json(geoms[gi])
    return out


def write_geojson(
    table: pd.DataFrame | Iterable[pd.DataFrame],
    path: str | os.PathLike[str],
    classes: ClassScheme,
    object_type: ObjectType = "detection",
    gzip: bool | None = None,
    *,
    cell_expansion: float = 0.0,
    compresslevel: int = 6,
) -> Path:
    """Write a nucleus table as a QuPath FeatureCollection, streamed and atomically.

    ``gzip=None`` compresses when the name ends with ``.gz``. Features are serialised one by
    one and written in chunks, so memory stays bounded for millions of nuclei; the file appears
    under its final name only when complete. ``table`` may also be an iterable of tables (e.g.
    the row batches of a Parquet file), written one after the other. Returns the path written.
    """
    path = Path(path)
    if gzip is None:
        gzip = path.name.lower().endswith(".gz")
    tables = [table] if isinstance(table, pd.DataFrame) else table
    features = itertools.chain.from_iterable(
        iter_features(t, classes, object_type=object_type, cell_expansion=cell_expansion)
        for t in tables
    )
    n = 0
    with atomic_open(path, "wb") as raw:
        sink: IO[bytes] | gzip_mod.GzipFile = raw
        if gzip:
            sink = gzip_mod.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0)
        try:
            sink.write(b'{"type":"FeatureCollection","features":[\n')
            chunk: list[str] = []
            for feat in features:
                chunk.append(feat)
                n += 1
                if len(chunk) >= _CHUNK:
                    sink.write(((",\n" if n > len(chunk) else "") + ",\n".join(chunk)).encode())
                    chunk = []
            if chunk:
                sink.write(((",\n" if n > len(chunk) else "") + ",\n".join(chunk)).encode())
            sink.write(b"\n]}\n")
        finally:
            if sink is not raw:
                sink.close()
    log.info("wrote %d %ss to %s", n, object_type, path)
    return path


# --------------------------------------------------------------------------------------- reading


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        opener = gzip_mod.open if head == b"\x1f\x8b" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConicQPError(f"GeoJSON file {path} does not exist; check the path") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConicQPError(
            f"cannot read GeoJSON {path}: {exc}; export it again from QuPath "
            "(File > Export objects as GeoJSON) or groovy/export_annotations_geojson.groovy"
        ) from None


def read_geojson(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Features of a GeoJSON file (plain or gzip): FeatureCollection, Feature list or one Feature.

    A bare geometry is returned as a Feature without properties (QuPath makes it an annotation).
    """
    path = Path(path)
    data = _load_json(path)
    items = data if isinstance(data, list) else [data]
    features: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ConicQPError(f"{path}: expected GeoJSON objects, found {type(item).__name__}")
        kind = item.get("type")
        if kind == "FeatureCollection":
            feats = item.get("features")
            if not isinstance(feats, list):
                raise ConicQPError(f"{path}: FeatureCollection without a 'features' list")
            features.extend(dict(f) for f in feats if isinstance(f, Mapping))
        elif kind == "Feature":
            features.append(dict(item))
        elif kind in _GEOMETRY_TYPES:
            features.append({"type": "Feature", "geometry": dict(item), "properties": {}})
        else:
            raise ConicQPError(
                f"{path}: not GeoJSON (top-level type {kind!r}); expected a FeatureCollection"
            )
    return features


_GEOMETRY_TYPES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
}


def _classification_name(props: Mapping[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls
    if isinstance(cls, Mapping):
        if isinstance(cls.get("name"), str):
            return str(cls["name"])
        names = cls.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)  # QuPath's derived-class notation
    return None


def _feature_label(i: int, feat: Mapping[str, Any]) -> str:
    props = feat.get("properties")
    name = props.get("name") if isinstance(props, Mapping) else None
    fid = feat.get("id")
    extra = ", ".join(
        f"{key} {value!r}" for key, value in (("name", name), ("id", fid)) if value is not None
    )
    return f"feature {i}" + (f" ({extra})" if extra else "")


def _non_finite_position(node: Any) -> list[Any] | None:
    """The first position of a GeoJSON geometry with a NaN/infinite/non-numeric value."""
    if isinstance(node, Mapping):
        for key in ("coordinates", "geometries"):
            found = _non_finite_position(node.get(key))
            if found is not None:
                return found
        return None
    if isinstance(node, list | tuple):
        if node and all(not isinstance(v, list | tuple | Mapping) for v in node):  # a position
            ok = all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in node
            )
            return None if ok else list(node)
        for child in node:
            found = _non_finite_position(child)
            if found is not None:
                return found
    return None


def _region_geometry(
    path: Path, i: int, feat: Mapping[str, Any], gj: Mapping[str, Any]
) -> shapely.Geometry:
    """A region's shapely geometry, valid; bad coordinates name the file and the feature.

    NaN or infinite coordinates are refused before GEOS sees them (GEOS would fail later, in
    validation or a union, with an error that names neither); self-intersections are repaired.
    """
    where = f"{path}: {_feature_label(i, feat)}"
    bad = _non_finite_position(gj)
    if bad is not None:
        shown = ", ".join(str(v) for v in bad)
        raise ConicQPError(
            f"{where} has a coordinate that is not a number ({shown}); "
            "redraw or delete that annotation and export it again"
        )
    try:
        geom = shape(gj)
    except Exception as exc:  # shapely raises several types for bad coordinates
        raise ConicQPError(f"{where} has a malformed geometry ({exc}); fix or delete it") from None
    if not geom.is_valid:
        try:
            geom = shapely.make_valid(geom)
        except shapely.errors.GEOSException as exc:
            raise ConicQPError(
                f"{where} has a geometry that cannot be repaired ({exc}); redraw or delete it"
            ) from None
    return geom


def read_regions(path: str | os.PathLike[str]) -> list[Region]:
    """Polygon regions (QuPath annotations) of a GeoJSON file, as shapely geometries.

    Only area features count: Polygon/MultiPolygon (holes kept) and the polygonal parts of
    GeometryCollections. Detections and cells are skipped (they are results, not regions), as are
    points and lines. Invalid polygons (self-intersections from hand drawing) are repaired.
    """
    path = Path(path)
    regions: list[Region] = []
    skipped: dict[str, int] = {}
    for i, feat in enumerate(read_geojson(path)):
        props = feat.get("properties") or {}
        if not isinstance(props, Mapping):
            props = {}
        otype = str(props.get("objectType", props.get("object_type", "annotation"))).lower()
        if otype not in ("annotation", "tma_core", "tmacore"):
            skipped[otype] = skipped.get(otype, 0) + 1
            continue
        gj = feat.get("geometry")
        if not isinstance(gj, Mapping):
            skipped["no geometry"] = skipped.get("no geometry", 0) + 1
            continue
        geom = _region_geometry(path, i, feat, gj)
        if not isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
            polys = [
                p
                for g in getattr(geom, "geoms", [geom])
                for p in (g.geoms if isinstance(g, shapely.MultiPolygon) else [g])
                if isinstance(p, shapely.Polygon) and not p.is_empty
            ]
            if not polys:
                skipped[geom.geom_type] = skipped.get(geom.geom_type, 0) + 1
                continue
            geom = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
        if geom.is_empty:
            continue
        name = props.get("name")
        fid = feat.get("id")
        regions.append(
            Region(
                geometry=geom,
                name=str(name) if name is not None else None,
                class_name=_classification_name(props),
                id=str(fid) if fid is not None else None,
                properties=dict(props),
            )
        )
    if skipped:
        log.info("%s: skipped non-region features %s", path, skipped)
    return regions


# ------------------------------------------------------------------------------ annotations


def _is_uuid(value: object) -> bool:
    try:
        return str(uuid.UUID(str(value))) == str(value).lower()
    except ValueError:
        return False


def region_color(region: Region, palette: Mapping[str, Sequence[int]] | None = None) -> list[int]:
    """RGB of a region's classification: its own colour, else ``palette[class]``, else a colour
    derived from the class name (stable, like QuPath's for a class it has never seen)."""
    cls = region.properties.get("classification") if region.properties else None
    if isinstance(cls, Mapping):
        rgb = cls.get("color")
        if isinstance(rgb, list | tuple) and len(rgb) >= 3:
            return [int(v) & 0xFF for v in rgb[:3]]
    name = region.class_name or region.name or "region"
    if palette is not None and name in palette:
        return [int(v) & 0xFF for v in palette[name]][:3]
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return [64 + digest[0] % 160, 64 + digest[1] % 160, 64 + digest[2] % 160]


def with_uuid_ids(regions: Sequence[Region], salt: str) -> list[Region]:
    """The regions with a UUID ``id`` each (QuPath replaces any other id by a random one): kept
    when it is one, else uuid5 of ``salt`` and the outline, so re-runs give the same ids."""
    out = []
    for i, r in enumerate(regions):
        if r.id is not None and _is_uuid(r.id):
            out.append(r)
            continue
        key = f"conic-qp/{salt}/{i}/{hashlib.sha1(shapely.to_wkb(r.geometry)).hexdigest()}"
        out.append(dataclasses.replace(r, id=str(uuid.uuid5(uuid.NAMESPACE_URL, key))))
    return out


def write_annotations(
    regions: Sequence[Region],
    path: str | os.PathLike[str],
    *,
    palette: Mapping[str, Sequence[int]] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write regions as QuPath annotations (a FeatureCollection QuPath 0.4-0.7 reads whole).

    Every feature gets a UUID ``id`` (kept when the region has one), ``objectType``
    ``"annotation"``, its ``name`` and, when classified, ``classification`` WITH a colour
    (:func:`region_color`): QuPath rejects the whole file for one classification without.
    Coordinates are level-0 px with 2 decimals. Written atomically (inside ``root`` if given,
    :func:`conic_qp.sinks.atomic_path`).
    """
    features = []
    for r in with_uuid_ids(regions, str(path)):
        geom = _polygon_json(r.geometry)
        if geom is None:
            continue
        props: dict[str, Any] = {"objectType": "annotation"}
        if r.name:
            props["name"] = r.name
        if r.class_name:
            props["classification"] = {"name": r.class_name, "color": region_color(r, palette)}
        features.append(
            f'{{"type":"Feature","id":"{r.id}","geometry":{geom},'
            f'"properties":{json.dumps(props, ensure_ascii=False, separators=(",", ":"))}}}'
        )
    with atomic_open(path, "w", root=root, encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[\n')
        fh.write(",\n".join(features))
        fh.write("\n]}\n")
    return Path(path)


# ------------------------------------------------------------------------- detection folders

#: Most features per detection file: QuPath parses a GeoJSON file whole, so the heap a chunk
#: needs while it is read stays bounded (about 1 GB per 100k detections, see docs/qupath.md).
DETECTIONS_PER_FILE = 100_000
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "conic-qp detections"
MANIFEST_VERSION = 2
REGIONS_FILE = "regions.geojson"
_MAX_OPEN_FILES = 64

TableSource = pd.DataFrame | Callable[[], Iterable[pd.DataFrame]]


@dataclass(frozen=True)
class DetectionFolder:
    """What :func:`write_detection_folder` wrote."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def n_objects(self) -> int:
        return int(self.manifest["n_objects"])

    @property
    def files(self) -> list[Path]:
        return [self.folder / f["file"] for f in self.manifest["files"]]

    def counts_by_parent(self) -> dict[str | None, int]:
        """Detections written under each parent annotation id (None: the image root)."""
        out: dict[str | None, int] = {}
        for f in self.manifest["files"]:
            out[f["parent"]] = out.get(f["parent"], 0) + int(f["count"])
        return out


class _ChunkWriter:
    """The gzip GeoJSON files of one parent, a new file every ``limit`` features."""

    def __init__(self, folder: Path, parent: str | None, limit: int, files: list[dict]) -> None:
        self.folder, self.parent, self.limit, self.files = folder, parent, limit, files
        self.fh: gzip_mod.GzipFile | None = None
        self.raw: IO[bytes] | None = None
        self.entry: dict[str, Any] | None = None

    @property
    def is_open(self) -> bool:
        return self.fh is not None

    def _open(self) -> None:
        name = f"{len(self.files):04d}.geojson.gz"
        self.entry = {"file": name, "parent": self.parent, "count": 0}
        self.files.append(self.entry)
        self.raw = open(self.folder / name, "wb")
        self.fh = gzip_mod.GzipFile(fileobj=self.raw, mode="wb", compresslevel=6, mtime=0)
        self.fh.write(b'{"type":"FeatureCollection","features":[\n')

    def write(self, feats: list[str]) -> None:
        i = 0
        while i < len(feats):
            if self.fh is None or self.entry is None or self.entry["count"] >= self.limit:
                self.close()
                self._open()
            assert self.fh is not None and self.entry is not None
            take = feats[i : i + self.limit - self.entry["count"]]
            sep = b",\n" if self.entry["count"] else b""
            self.fh.write(sep + ",\n".join(take).encode())
            self.entry["count"] += len(take)
            i += len(take)

    def close(self) -> None:
        if self.fh is not None and self.raw is not None:
            self.fh.write(b"\n]}\n")
            self.fh.close()
            self.raw.flush()
            os.fsync(self.raw.fileno())
            self.raw.close()
        self.fh = self.raw = None


def write_detection_folder(
    table: TableSource,
    folder: str | os.PathLike[str],
    classes: ClassScheme,
    *,
    regions: Sequence[Region] = (),
    add_regions: bool = False,
    palette: Mapping[str, Sequence[int]] | None = None,
    object_type: ObjectType = "detection",
    cell_expansion: float = 0.0,
    per_file: int = DETECTIONS_PER_FILE,
    info: Mapping[str, Any] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> DetectionFolder:
    """Write one image's detections for ``groovy/import_conic_qp.groovy``, grouped by parent.

    Each nucleus goes to the annotation QuPath would make its parent
    (:func:`conic_qp.regions.parent_regions`: smallest annotation covering its centroid);
    the files of one parent hold at most ``per_file`` features, so QuPath never has to parse a
    huge file at once. ``manifest.json`` lists every file with its parent's UUID (``null`` =
    the image root) and count, and the ``regions`` known (UUID, name, class, area) so the script
    can check that the image's annotations are still those. ``add_regions`` also writes them as
    ``regions.geojson``, which the script adds to an image that has no annotations.

    Parameters
    ----------
    table : the nucleus table, or a callable returning a fresh iterable of its row batches
        (read twice: parents first, then features; memory stays bounded for millions of rows).
    regions : annotations in level-0 px; ids that are not UUIDs are replaced (:func:`with_uuid_ids`).

    The folder is built beside ``folder`` and swapped in whole (:func:`conic_qp.sinks.replace_dir`),
    so the script sees the old set of files or the new one, never a mix. ``root``: ``folder``
    must lie inside it (:func:`conic_qp.paths.ensure_inside`).
    """
    from conic_qp.paths import ensure_inside, temp_prefix
    from conic_qp.sinks import replace_dir

    if per_file < 1:
        raise ValueError(f"per_file must be >= 1, got {per_file}")
    folder = Path(folder) if root is None else ensure_inside(root, folder)
    salt = str((info or {}).get("entry_id", folder.name))
    known = with_uuid_ids(
        [r for r in regions if r.geometry is not None and not r.geometry.is_empty], salt
    )
    geoms = [r.geometry for r in known]

    def batches() -> Iterator[pd.DataFrame]:
        if isinstance(table, pd.DataFrame):
            for lo in range(0, max(len(table), 1), 50_000):
                yield table.iloc[lo : lo + 50_000]
        else:
            yield from table()

    parents = [parent_regions(b, geoms) for b in batches()]  # pass 1: int per row
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_prefix(folder), suffix=".tmp"))
    files: list[dict[str, Any]] = []
    writers: dict[int, _ChunkWriter] = {}
    recent: list[int] = []
    n = 0
    try:
        for batch, parent in zip(batches(), parents, strict=True):  # pass 2: features
            if len(batch) == 0:
                continue
            for p in dict.fromkeys(parent.tolist()):
                rows = batch.iloc[np.flatnonzero(parent == p)]
                feats = list(
                    iter_features(
                        rows, classes, object_type=object_type, cell_expansion=cell_expansion
                    )
                )
                if not feats:
                    continue
                w = writers.get(p)
                if w is None:
                    w = writers[p] = _ChunkWriter(
                        tmp, known[p].id if p >= 0 else None, per_file, files
                    )
                if not w.is_open and sum(x.is_open for x in writers.values()) >= _MAX_OPEN_FILES:
                    writers[next(q for q in recent if writers[q].is_open)].close()
                w.write(feats)
                n += len(feats)
                if p in recent:
                    recent.remove(p)
                recent.append(p)
        for w in writers.values():
            w.close()
        if add_regions and known:
            write_annotations(known, tmp / REGIONS_FILE, palette=palette)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            **dict(info or {}),
            "object_type": object_type,
            "n_objects": n,
            "regions_file": REGIONS_FILE if add_regions and known else None,
            "annotations": [
                {
                    "id": r.id,
                    "name": r.name,
                    "class": r.class_name,
                    "area": round(r.area, 3),
                }
                for r in known
            ],
            "files": files,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
        os.chmod(tmp, 0o777 & ~_umask())
        replace_dir(tmp, folder)
    except BaseException:
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d %ss in %d files to %s", n, object_type, len(files), folder)
    return DetectionFolder(folder, manifest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_detection_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of a detection folder (raises ConicQPError when unreadable)."""
    path = Path(folder) / MANIFEST
    data = _load_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ConicQPError(f"{path} is not a conic-qp detection manifest; run annotate again")
    return data
