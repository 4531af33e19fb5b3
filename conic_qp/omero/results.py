"""Write one image's results to OMERO: an OMERO.table, the GeoJSON, key-value pairs, capped ROIs.

Everything lands on the image, under conic-qp namespaces, in an order that leaves no half
result behind: ROIs (if asked) -> table -> GeoJSON file -> map annotations are created first,
then the annotations are linked to the image in one transaction (``saveArray`` of the links),
and only then are the earlier conic-qp results of the image deleted (unless ``replace=False``).
ROIs point at their image themselves, so they show while the upload runs. A failure before the
links are saved deletes what this call created, ROIs included (best effort: a dropped connection
can leave unlinked files, which OMERO shows nowhere and a re-run does not see, and ROIs, which
the next run replaces).

Facts (omero-py 5.23.0):

* OMERO.tables: ``conn.getSharedResources().newTable(repo_id, name)``, ``initialize(columns)``,
  ``addData`` in batches; a FileAnnotation with namespace
  ``openmicroscopy.org/omero/bulk_annotations`` links it (the namespace OMERO.web and
  OMERO.parade look for). ``StringColumn`` size is the maximum UTF-8 byte length of its values
  (longer strings raise ``ValidationException`` in ``omero.columns.StringColumnI.arrays``);
  more than ~512 columns fail; each call is one Ice message (``Ice.MessageSizeMax``), so rows go
  in batches of a few MB.
* ROIs have no namespace: conic-qp ROIs are named :data:`ROI_NAME` and their ids are kept in
  the table's ``Roi`` column. ``PolygonI(points="x,y x,y ...")`` with theZ/theT,
  ``RoiI.setImage(ImageI(id, False))``, saved in batches with ``saveAndReturnArray``. Viewers
  slow down badly with hundreds of thousands of ROIs, so they are off unless ``max_rois > 0``.
* Earlier results: ``obj.listAnnotations(ns)`` and ``conn.deleteObjects(kind, ids, wait=True)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError, option
from conic_qp.objects import prob_column

log = logging.getLogger(__name__)

__all__ = [
    "MAX_COLUMNS",
    "NS_COMPOSITION",
    "NS_GEOJSON",
    "NS_REGION",
    "NS_TABLE",
    "ROI_BATCH",
    "ROI_NAME",
    "ColumnSpec",
    "WriteOptions",
    "WrittenResults",
    "batch_rows",
    "composition_pairs",
    "omero_rgba",
    "polygon_points",
    "remove_objects",
    "roi_batches",
    "select_roi_rows",
    "table_spec",
    "utf8_size",
    "write_image_results",
]

#: OMERO.web / OMERO.parade show tables attached under this namespace.
NS_TABLE = "openmicroscopy.org/omero/bulk_annotations"
NS_GEOJSON = "conic-qp/nuclei/geojson"
NS_COMPOSITION = "conic-qp/composition"
NS_REGION = "conic-qp/composition/region"
#: All namespaces whose annotations a re-run replaces (tables are recognised by file name).
OWN_NAMESPACES: tuple[str, ...] = (NS_GEOJSON, NS_COMPOSITION, NS_REGION)
TABLE_PREFIX = "conic-qp_nuclei"
ROI_NAME = "conic-qp nucleus"
#: Table metadata key holding classes, um/px and provenance as JSON.
TABLE_META_KEY = "conic_qp"
MAX_COLUMNS = 511
#: ROIs per ``saveAndReturnArray`` (500-1000 keeps each transaction and message small).
ROI_BATCH = 500
#: Hard limit of ``max_rois``: beyond it OMERO.web / iviewer become unusable.
MAX_ROIS_LIMIT = 100_000
#: Bytes of column data per ``addData`` call (far below Ice.MessageSizeMax, 250 000 KB).
TABLE_BATCH_BYTES = 4 * 1024 * 1024

WriteKind = Literal["table", "attachment", "map", "rois"]
WRITE_KINDS: tuple[str, ...] = ("table", "attachment", "map", "rois")


# ----------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class ColumnSpec:
    """One OMERO.table column: its type, its name and the nucleus-table column it holds."""

    kind: Literal["image", "roi", "string", "double", "long"]
    name: str
    source: str | None = None
    size: int = 0
    description: str = ""

    @property
    def row_bytes(self) -> int:
        return self.size if self.kind == "string" else 8


def utf8_size(values: Sequence[Any] | pd.Series) -> int:
    """Width of an OMERO ``StringColumn``: the longest value in UTF-8 bytes (at least 1)."""
    return max([1, *(len(str(v).encode("utf-8")) for v in values)])


def table_spec(table: pd.DataFrame, classes: ClassScheme, *, with_roi: bool) -> list[ColumnSpec]:
    """Columns of the OMERO.table of ``table`` (one row per nucleus).

    ``Image`` and ``Roi`` are OMERO's typed id columns (OMERO.web links rows to them); the rest
    are the nucleus table's columns in level-0 pixels / micrometres.
    """
    specs = [ColumnSpec("image", "Image", None, description="OMERO image id")]
    if with_roi:
        specs.append(ColumnSpec("roi", "Roi", None, description="OMERO ROI id, -1 if none"))
    specs.append(ColumnSpec("string", "nucleus_id", "id", utf8_size(table["id"]), "conic-qp id"))
    for col, unit in (("centroid_x", "level-0 px"), ("centroid_y", "level-0 px")):
        specs.append(ColumnSpec("double", col, col, description=unit))
    specs.append(ColumnSpec("long", "class_id", "class_id", description="class id 1..C"))
    specs.append(
        ColumnSpec("string", "class_name", "class_name", utf8_size(classes.names), "class")
    )
    specs.append(ColumnSpec("double", "class_prob", "class_prob", description="0-1"))
    for c in classes:
        col = prob_column(c.name)
        # descriptions must be ASCII: hdfstorageV2 stores them as a PyTables array of str,
        # which cannot hold unicode (names can: they become HDF5 column names)
        specs.append(ColumnSpec("double", col, col, description=f"probability of class {c.id}"))
    for col, unit in (
        ("area_px", "level-0 px^2"),
        ("area_um2", "um^2"),
        ("perimeter_um", "um"),
        ("solidity", "0-1"),
        ("eccentricity", "0-1"),
    ):
        specs.append(ColumnSpec("double", col, col, description=unit))
    if len(specs) > MAX_COLUMNS:
        raise ConicQPError(
            f"the OMERO.table would have {len(specs)} columns (OMERO.tables fails above "
            f"~{MAX_COLUMNS + 1}); the model has too many classes to write as a table"
        )
    missing = [s.source for s in specs if s.source is not None and s.source not in table.columns]
    if missing:
        raise ConicQPError(f"nucleus table lacks columns {missing}; write it with conic-qp")
    return specs


def batch_rows(specs: Sequence[ColumnSpec], budget: int = TABLE_BATCH_BYTES) -> int:
    """Rows per ``addData`` call so one call carries at most ``budget`` bytes of values."""
    per_row = sum(s.row_bytes for s in specs) or 1
    return max(1, budget // per_row)


def polygon_points(geom: shapely.Geometry, decimals: int = 2) -> str:
    """OMERO polygon points ``"x,y x,y ..."`` of a polygon's exterior (level-0 px), without the
    closing repeat of the first point; the largest part of a multipolygon."""
    if isinstance(geom, shapely.MultiPolygon):
        geom = max(geom.geoms, key=lambda g: g.area)
    if not isinstance(geom, shapely.Polygon) or geom.is_empty:
        raise ValueError(f"not a polygon: {geom.geom_type}")
    coords = np.asarray(geom.exterior.coords)[:-1]
    return " ".join(f"{x:.{decimals}f},{y:.{decimals}f}" for x, y in coords)


def select_roi_rows(table: pd.DataFrame, max_rois: int) -> np.ndarray:
    """Row indices of the nuclei that get an ROI: all when they fit, else ``max_rois`` of them
    in the order of their ids (uuid5 strings, so a stable pseudo-random sample spread over the
    whole slide rather than its top rows). Returned in table order."""
    n = len(table)
    if max_rois <= 0 or n == 0:
        return np.empty(0, np.int64)
    if n <= max_rois:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(table["id"].astype(str).to_numpy(), kind="stable")[:max_rois]
    return np.sort(order).astype(np.int64)


def roi_batches(n: int, size: int = ROI_BATCH) -> list[slice]:
    """Slices of ``range(n)`` in batches of ``size``."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def omero_rgba(rgb: Sequence[int], alpha: int = 255) -> int:
    """OMERO colour: RGBA packed into a signed 32-bit integer (``(r << 24) | ... | a``)."""
    r, g, b = (int(v) & 0xFF for v in rgb)
    value = (r << 24) | (g << 16) | (b << 8) | (int(alpha) & 0xFF)
    return value - (1 << 32) if value >= 1 << 31 else value


def _fmt(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        return "NA" if math.isnan(v) else f"{v:.6g}"
    return "" if value is None else str(value)


def composition_pairs(
    row: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> list[list[str]]:
    """Key-value pairs of one composition summary row (``conic_qp.composition.summary_table``):
    region, area, total, density, counts, proportions and ratios, then ``extra`` (model, run)."""
    skip = {"slide"}
    pairs = [[str(k), _fmt(v)] for k, v in row.items() if k not in skip and _fmt(v) != ""]
    pairs.extend([str(k), _fmt(v)] for k, v in (extra or {}).items())
    return pairs


@dataclass(frozen=True)
class WriteOptions:
    """What to write (``--write``), how many ROIs (``--max-rois``), and whether earlier conic-qp
    results of the image are replaced (``--replace``, default) or kept (``--keep``)."""

    table: bool = True
    attachment: bool = True
    map: bool = True
    max_rois: int = 0
    replace: bool = True
    roi_batch: int = ROI_BATCH
    table_batch_bytes: int = TABLE_BATCH_BYTES

    def __post_init__(self) -> None:
        if self.max_rois < 0:
            raise ConicQPError(f"{option('max_rois')} must be >= 0 (got {self.max_rois})")
        if self.max_rois > MAX_ROIS_LIMIT:
            raise ConicQPError(
                f"{option('max_rois')} {self.max_rois} is above {MAX_ROIS_LIMIT}; OMERO viewers "
                "become "
                "unusable with that many ROIs; use the table or the GeoJSON for all nuclei"
            )
        if not 1 <= self.roi_batch <= 1000:
            raise ConicQPError("ROI batches must be 1-1000 ROIs")

    @classmethod
    def parse(
        cls, write: str | Sequence[str], max_rois: int = 0, replace: bool = True
    ) -> WriteOptions:
        """From ``--write table,attachment,map,rois`` and ``--max-rois``."""
        kinds = [k.strip().lower() for k in (write.split(",") if isinstance(write, str) else write)]
        kinds = [k for k in kinds if k]
        unknown = sorted(set(kinds) - set(WRITE_KINDS))
        if unknown:
            raise ConicQPError(
                f"{option('write')} {','.join(unknown)}: unknown; choose from "
                f"{','.join(WRITE_KINDS)}"
            )
        if not kinds:
            raise ConicQPError(f"{option('write')} needs at least one of {','.join(WRITE_KINDS)}")
        if "rois" in kinds and max_rois <= 0:
            raise ConicQPError(
                f"{option('write')} rois needs {option('max_rois')} N (e.g. 5000): OMERO viewers "
                "slow down badly "
                "with many ROIs, so their number is always capped"
            )
        if max_rois > 0 and "rois" not in kinds:
            kinds.append("rois")
        return cls(
            table="table" in kinds,
            attachment="attachment" in kinds,
            map="map" in kinds,
            max_rois=max_rois if "rois" in kinds else 0,
            replace=replace,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "attachment": self.attachment,
            "map": self.map,
            "max_rois": self.max_rois,
            "replace": self.replace,
        }


@dataclass
class WrittenResults:
    """Ids of what one :func:`write_image_results` call created and deleted."""

    image_id: int
    table_file_id: int | None = None
    annotation_ids: dict[str, list[int]] = field(default_factory=dict)
    roi_ids: list[int] = field(default_factory=list)
    n_nuclei: int = 0
    replaced: dict[str, int] = field(default_factory=dict)
    stale: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "table_file_id": self.table_file_id,
            "annotation_ids": self.annotation_ids,
            "n_rois": len(self.roi_ids),
            "n_nuclei": self.n_nuclei,
            "replaced": self.replaced,
            "stale": self.stale,
        }


# ------------------------------------------------------------------------- omero objects


def _api() -> Any:
    from conic_qp.omero.connection import omero_api

    return omero_api()


def build_columns(
    specs: Sequence[ColumnSpec],
    rows: pd.DataFrame | None,
    image_id: int,
    roi_ids: np.ndarray | None = None,
) -> list[Any]:
    """``omero.grid`` columns of ``specs`` holding ``rows`` (empty columns when ``None``)."""
    grid = _api().grid
    n = 0 if rows is None else len(rows)
    out = []
    for s in specs:
        if s.kind == "image":
            out.append(grid.ImageColumn(s.name, s.description, [int(image_id)] * n))
        elif s.kind == "roi":
            ids = [] if rows is None or roi_ids is None else [int(v) for v in roi_ids]
            out.append(grid.RoiColumn(s.name, s.description, ids))
        elif s.kind == "string":
            strs = [] if rows is None else [str(v) for v in rows[s.source]]
            out.append(grid.StringColumn(s.name, s.description, s.size, strs))
        elif s.kind == "long":
            ints = [] if rows is None else [int(v) for v in rows[s.source]]
            out.append(grid.LongColumn(s.name, s.description, ints))
        else:
            floats = [] if rows is None else [float(v) for v in rows[s.source]]
            out.append(grid.DoubleColumn(s.name, s.description, floats))
    return out


def make_roi(
    geom: shapely.Geometry,
    image_id: int,
    class_name: str,
    colour: Sequence[int],
    description: str,
) -> Any:
    """A conic-qp ROI: one polygon on Z=0, T=0, stroked in the class colour."""
    api = _api()
    model, rstring, rint = api.model, api.rtypes.rstring, api.rtypes.rint
    poly = model.PolygonI()
    poly.setPoints(rstring(polygon_points(geom)))
    poly.setTheZ(rint(0))
    poly.setTheT(rint(0))
    poly.setStrokeColor(rint(omero_rgba(colour, 255)))
    poly.setFillColor(rint(omero_rgba(colour, 48)))
    poly.setTextValue(rstring(class_name))
    roi = model.RoiI()
    roi.setName(rstring(ROI_NAME))
    roi.setDescription(rstring(description))
    roi.setImage(model.ImageI(int(image_id), False))
    roi.addShape(poly)
    return roi


def make_map_annotation(pairs: Sequence[Sequence[str]], ns: str, description: str) -> Any:
    api = _api()
    ann = api.model.MapAnnotationI()
    ann.setNs(api.rtypes.rstring(ns))
    ann.setDescription(api.rtypes.rstring(description))
    ann.setMapValue([api.model.NamedValue(str(k), str(v)) for k, v in pairs])
    return ann


# -------------------------------------------------------------------------------- writing


#: What a journal receives: OMERO class ("Roi", "OriginalFile", "Annotation") -> object ids.
Journal = Callable[[Mapping[str, list[int]]], None]


@dataclass
class _Created:
    """What this call created, for rollback; ``journal`` hears every addition (and the end)."""

    rois: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    annotations: list[int] = field(default_factory=list)
    journal: Journal | None = None

    def as_ids(self) -> dict[str, list[int]]:
        return {"Annotation": self.annotations, "Roi": self.rois, "OriginalFile": self.files}

    def add(self, kind: str, ids: Sequence[int]) -> None:
        self.as_ids()[kind].extend(int(i) for i in ids)
        if self.journal is not None:
            self.journal({k: list(v) for k, v in self.as_ids().items() if v})


@contextlib.contextmanager
def image_group(conn: Any, image: Any) -> Iterator[None]:
    """Run the block in the image's group (writes must be in the group of what they annotate)."""
    opts = conn.SERVICE_OPTS
    before = opts.getOmeroGroup()
    try:
        gid = image.getDetails().getGroup().getId()
    except AttributeError:
        gid = None
    if gid is not None:
        opts.setOmeroGroup(int(gid))
    try:
        yield
    finally:
        if before is None:
            opts.pop("omero.group", None)
        else:
            opts.setOmeroGroup(before)


def check_writable(image: Any, server: str = "the server") -> None:
    """Refuse an image the user may not annotate (before hours of prediction, not after)."""
    if image.canAnnotate() is False:
        raise ConicQPError(
            f"no permission to annotate OMERO image {image.getId()} on {server}; ask its owner "
            "or a group administrator, or run in a group where you can write"
        )


def write_image_results(
    conn: Any,
    image_id: int,
    table: pd.DataFrame,
    geojson_path: str | os.PathLike[str] | None,
    composition: pd.DataFrame | None,
    options: WriteOptions,
    *,
    metadata: Mapping[str, Any] | None = None,
    server: str = "the server",
    journal: Journal | None = None,
) -> WrittenResults:
    """Write one image's results to OMERO (see the module docstring for order and replacing).

    Parameters
    ----------
    conn : a connected BlitzGateway.
    image_id : the OMERO image the nuclei belong to.
    table : the nucleus table (:func:`conic_qp.sinks.tables.read_table`: its ``attrs`` hold the
        classes and um/px).
    geojson_path : the gzipped QuPath GeoJSON to attach (``None`` skips the attachment).
    composition : composition summary (one row per region, ``summary_table``) for the map
        annotations; ``None`` skips them.
    options : what to write; see :class:`WriteOptions`.
    metadata : provenance stored with the table and in the key-value pairs (model, run time...).
    server : ``host:port`` for messages.
    journal : called with the ids of everything created so far, after each creation, and with
        what a failed call could not remove (``{}`` once nothing is left over): the caller keeps
        it on disk so that the next attempt removes what a dead connection left behind
        (:func:`remove_objects`).

    Raises
    ------
    ConicQPError
        The image is not there / not writable, or the server failed (nothing of this call
        stays linked to the image).
    """
    from conic_qp.omero.connection import omero_errors

    classes = table.attrs.get("classes")
    if not isinstance(classes, ClassScheme):
        raise ConicQPError("the nucleus table carries no class list; read it with read_table")
    meta = {**(table.attrs.get("conic_qp") or {}), **(metadata or {})}
    meta.pop("classes", None)
    done = WrittenResults(int(image_id), n_nuclei=len(table))
    created = _Created(journal=journal)
    with omero_errors(f"writing results to image {image_id}", server):
        image = conn.getObject("Image", int(image_id))
        if image is None:
            raise ConicQPError(
                f"OMERO image {image_id} was not found on {server} (or you cannot see it)"
            )
        with image_group(conn, image):
            check_writable(image, server)
            try:
                _create_all(
                    conn,
                    image_id,
                    table,
                    classes,
                    geojson_path,
                    composition,
                    options,
                    meta,
                    created,
                    done,
                )
            except BaseException:
                left = remove_objects(conn, created.as_ids())
                if journal is not None:
                    journal(left)
                raise
            if options.replace:
                _delete_previous(conn, image, created, done)
    log.info(
        "image %d: wrote %d nuclei (table %s, %d ROIs, %d annotations); replaced %s",
        image_id,
        len(table),
        done.table_file_id,
        len(done.roi_ids),
        sum(len(v) for v in done.annotation_ids.values()),
        done.replaced or "nothing",
    )
    return done


def _create_all(
    conn: Any,
    image_id: int,
    table: pd.DataFrame,
    classes: ClassScheme,
    geojson_path: str | os.PathLike[str] | None,
    composition: pd.DataFrame | None,
    options: WriteOptions,
    meta: Mapping[str, Any],
    created: _Created,
    done: WrittenResults,
) -> None:
    api = _api()
    model, rstring = api.model, api.rtypes.rstring
    update = conn.getUpdateService()
    ctx = conn.SERVICE_OPTS
    stamp = str(meta.get("created") or "")
    # 1. ROIs (the table records their ids)
    roi_ids: np.ndarray | None = None
    if options.max_rois > 0 and len(table):
        rows = select_roi_rows(table, options.max_rois)
        roi_ids = np.full(len(table), -1, np.int64)
        geoms = shapely.from_wkb(table["polygon_wkb"].to_numpy()[rows])
        names = table["class_name"].astype(str).to_numpy()[rows]
        colours = {c.name: c.color for c in classes}
        if len(rows) < len(table):
            log.warning(
                "image %d: %d nuclei, ROIs capped at %d (the table and GeoJSON hold all)",
                image_id,
                len(table),
                len(rows),
            )
        for sl in roi_batches(len(rows), options.roi_batch):
            batch = [
                make_roi(g, image_id, n, colours.get(n, (255, 255, 0)), f"{n} ({stamp})")
                for g, n in zip(geoms[sl], names[sl], strict=True)
            ]
            saved = update.saveAndReturnArray(batch, ctx)
            ids = [int(r.getId().getValue()) for r in saved]
            created.add("Roi", ids)
            roi_ids[rows[sl]] = ids
        done.roi_ids = list(created.rois)
    annotations: list[tuple[str, Any]] = []
    # 2. the table
    if options.table:
        fid = _write_table(conn, image_id, table, classes, roi_ids, meta, options, created)
        done.table_file_id = fid
        ann = model.FileAnnotationI()
        ann.setFile(model.OriginalFileI(fid, False))
        ann.setNs(rstring(NS_TABLE))
        ann.setDescription(rstring(f"conic-qp nuclei of image {image_id} ({stamp})"))
        annotations.append(("table", ann))
    # 3. the GeoJSON (uploaded now, linked with the rest below)
    if options.attachment and geojson_path is not None:
        fa = conn.createFileAnnfromLocalFile(
            str(geojson_path),
            origFilePathAndName=f"conic-qp_image-{image_id}.geojson.gz",
            mimetype="application/gzip",
            ns=NS_GEOJSON,
            desc=f"conic-qp nuclei as QuPath GeoJSON ({stamp})",
        )
        fa_id = int(fa.getId())
        created.add("Annotation", [fa_id])
        done.annotation_ids.setdefault("geojson", []).append(fa_id)
    # 4. key-value pairs: the whole image, then each region
    if options.map and composition is not None and len(composition):
        extra = {k: meta[k] for k in ("model", "created", "conic_qp_version") if k in meta}
        for _, row in composition.iterrows():
            whole = row.get("region_id") == "all"
            ns = NS_COMPOSITION if whole else NS_REGION
            kind = "composition" if whole else "region"
            desc = f"conic-qp composition of {'the image' if whole else row.get('region')}"
            annotations.append(
                (
                    kind,
                    make_map_annotation(
                        composition_pairs({str(k): v for k, v in row.items()}, extra), ns, desc
                    ),
                )
            )
    if annotations:
        saved = update.saveAndReturnArray([a for _, a in annotations], ctx)
        for (kind, _), ann in zip(annotations, saved, strict=True):
            aid = int(ann.getId().getValue())
            created.add("Annotation", [aid])
            done.annotation_ids.setdefault(kind, []).append(aid)
    # 5. one transaction makes everything visible at once
    links = []
    for aid, kind in _annotation_kinds(done):
        link = model.ImageAnnotationLinkI()
        link.setParent(model.ImageI(int(image_id), False))
        cls = model.MapAnnotationI if kind in ("composition", "region") else model.FileAnnotationI
        link.setChild(cls(aid, False))
        links.append(link)
    if links:
        update.saveArray(links, ctx)


def _annotation_kinds(done: WrittenResults) -> list[tuple[int, str]]:
    return [(aid, kind) for kind, ids in done.annotation_ids.items() for aid in ids]


def _write_table(
    conn: Any,
    image_id: int,
    table: pd.DataFrame,
    classes: ClassScheme,
    roi_ids: np.ndarray | None,
    meta: Mapping[str, Any],
    options: WriteOptions,
    created: _Created,
) -> int:
    api = _api()
    specs = table_spec(table, classes, with_roi=roi_ids is not None)
    ctx = conn.SERVICE_OPTS
    resources = conn.getSharedResources()
    repos = resources.repositories(ctx)
    if not repos.descriptions:
        raise ConicQPError("the OMERO server has no OMERO.tables repository; ask its admin")
    repo_id = int(repos.descriptions[0].getId().getValue())
    handle = resources.newTable(repo_id, f"{TABLE_PREFIX}_image-{image_id}.h5", ctx)
    if handle is None:
        raise ConicQPError("OMERO.tables is not running on the server; ask its administrator")
    try:
        fid = int(handle.getOriginalFile(ctx).getId().getValue())
        created.add("OriginalFile", [fid])
        handle.initialize(build_columns(specs, None, image_id), ctx)
        info = {"classes": classes.to_json(), **meta}
        handle.setAllMetadata(
            {TABLE_META_KEY: api.rtypes.rstring(json.dumps(info, ensure_ascii=False, default=str))},
            ctx,
        )
        step = batch_rows(specs, options.table_batch_bytes)
        for start in range(0, len(table), step):
            rows = table.iloc[start : start + step]
            ids = None if roi_ids is None else roi_ids[start : start + step]
            handle.addData(build_columns(specs, rows, image_id, ids), ctx)
    finally:
        with contextlib.suppress(Exception):
            handle.close(ctx)
    return fid


def remove_objects(conn: Any, objects: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Delete the objects of a failed upload (a rollback, or a journal of an interrupted one);
    returns those left because the connection is gone (to delete on the next attempt). Never
    raises: the first error is the one to report. A delete the server refuses (e.g. objects
    already gone) is logged and not retried: it would block the image's next upload forever."""
    left: dict[str, list[int]] = {}
    for kind in ("Annotation", "Roi", "OriginalFile"):
        ids = [int(i) for i in objects.get(kind) or ()]
        if not ids:
            continue
        try:
            conn.deleteObjects(kind, ids, wait=True)
            log.info("removed %d partial %s object(s)", len(ids), kind)
        except Exception as exc:  # the connection may be gone: report, keep the first error
            lost = _connection_lost(exc)
            log.warning(
                "could not remove %d partial %s object(s) (%s)%s",
                len(ids),
                kind,
                type(exc).__name__,
                "; they are not linked to the image and the next attempt removes them"
                if lost
                else "",
            )
            if lost:
                left[kind] = ids
    return left


def _connection_lost(exc: BaseException) -> bool:
    from conic_qp.omero.connection import (
        OmeroConnectionLost,
        is_omero_exception,
        translate_error,
    )

    if isinstance(exc, OmeroConnectionLost):
        return True
    try:
        return is_omero_exception(exc) and isinstance(
            translate_error(exc, "removing objects"), OmeroConnectionLost
        )
    except TypeError:
        return False


def previous_results(conn: Any, image: Any) -> dict[str, list[int]]:
    """Ids of the conic-qp results already on ``image``: annotations and ROIs."""
    api = _api()
    anns: list[int] = []
    for ns in OWN_NAMESPACES:
        anns.extend(int(a.getId()) for a in image.listAnnotations(ns=ns))
    for a in image.listAnnotations(ns=NS_TABLE):
        name = a.getFileName() if hasattr(a, "getFileName") else ""
        if str(name or "").startswith(TABLE_PREFIX):
            anns.append(int(a.getId()))
    params = api.sys.ParametersI()
    params.addLong("iid", int(image.getId()))
    params.addString("name", ROI_NAME)
    rows = conn.getQueryService().projection(
        "select r.id from Roi r where r.image.id = :iid and r.name = :name",
        params,
        conn.SERVICE_OPTS,
    )
    rois = [int(api.rtypes.unwrap(r[0])) for r in rows or []]
    return {"Annotation": anns, "Roi": rois}


def _delete_previous(conn: Any, image: Any, created: _Created, done: WrittenResults) -> None:
    keep = {"Annotation": set(created.annotations), "Roi": set(created.rois)}
    old = previous_results(conn, image)
    for kind, ids in old.items():
        stale = sorted(set(ids) - keep[kind])
        if not stale:
            continue
        try:
            conn.deleteObjects(kind, stale, wait=True)
            done.replaced[kind] = len(stale)
        except Exception as exc:  # the new results are complete; the old ones are extra
            log.warning(
                "image %d: new results written, but %d earlier %s object(s) could not be "
                "removed (%s); a re-run removes them",
                done.image_id,
                len(stale),
                kind,
                type(exc).__name__,
            )
            done.stale[kind] = stale


def read_image_table(conn: Any, image_id: int, server: str = "the server") -> pd.DataFrame:
    """The newest conic-qp OMERO.table of an image as a nucleus table.

    ``attrs["classes"]`` and ``attrs["conic_qp"]`` (um/px, provenance) come from the table's
    metadata, so :mod:`conic_qp.composition` can count it like a local table.
    """
    from conic_qp.omero.connection import omero_errors

    api = _api()
    with omero_errors(f"reading the conic-qp table of image {image_id}", server):
        image = conn.getObject("Image", int(image_id))
        if image is None:
            raise ConicQPError(f"OMERO image {image_id} was not found on {server}")
        candidates = [
            a
            for a in image.listAnnotations(ns=NS_TABLE)
            if str(a.getFileName() or "").startswith(TABLE_PREFIX)
        ]
        if not candidates:
            raise ConicQPError(
                f"OMERO image {image_id} has no conic-qp table; run `conic-qp omero predict` "
                f"with {option('write')} table first"
            )
        ann = max(candidates, key=lambda a: int(a.getId()))
        with image_group(conn, image):
            resources = conn.getSharedResources()
            handle = resources.openTable(
                api.model.OriginalFileI(ann.getFile().getId(), False), conn.SERVICE_OPTS
            )
            if handle is None:
                raise ConicQPError(f"cannot open the conic-qp table of image {image_id}")
            try:
                df = read_table_handle(handle, conn.SERVICE_OPTS)
            finally:
                with contextlib.suppress(Exception):
                    handle.close(conn.SERVICE_OPTS)
    return df


def read_table_handle(handle: Any, ctx: Any = None, chunk: int = 50_000) -> pd.DataFrame:
    """All rows of an open OMERO.table as a nucleus table (columns renamed back)."""
    api = _api()
    headers = handle.getHeaders(ctx)
    n = int(handle.getNumberOfRows(ctx))
    cols: dict[str, list[Any]] = {h.name: [] for h in headers}
    for start in range(0, n, chunk):
        data = handle.read(list(range(len(headers))), start, min(n, start + chunk), ctx)
        for h, c in zip(headers, data.columns, strict=True):
            cols[h.name].extend(c.values)
    df = pd.DataFrame(cols).rename(columns={"nucleus_id": "id"})
    raw = handle.getAllMetadata(ctx).get(TABLE_META_KEY)
    info = json.loads(api.rtypes.unwrap(raw)) if raw is not None else {}
    if "classes" in info:
        df.attrs["classes"] = ClassScheme.from_json(info["classes"])
    df.attrs["conic_qp"] = {k: v for k, v in info.items() if k != "classes"}
    return df


def nucleus_table_for_upload(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a predict Parquet table for :func:`write_image_results`."""
    from conic_qp.sinks.tables import read_table

    return read_table(Path(path))
