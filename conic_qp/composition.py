"""Per-region cell composition: nucleus tables + regions -> counts, proportions, densities, ratios.

Membership rules:

- ``"centroid"`` (QuPath's): a nucleus belongs to a region when the region *covers* its centroid,
  so centroids exactly on the border count and centroids inside holes do not. This is what
  QuPath's hierarchy does when it places detections under annotations, and the centroid is the
  one QuPath computes (:func:`qupath_centroids`: the outline's, as QuPath reads it), so the
  counts equal QuPath's per-annotation detection counts.
- ``"any-pixel"`` (CoNIC Task 2): a nucleus belongs to a region when its outline intersects the
  region; a nucleus straddling the border of two regions counts in both.

Both use a :class:`shapely.STRtree` and vectorised predicates, so a slide with a million nuclei
and a few hundred annotations takes seconds.

The core (:func:`assign_nuclei`, :func:`composition_table`, :func:`summary_table`) is pure: data
frames and geometries in, data frames out. :func:`load_cohort` and :func:`write_composition` at the
end do the file work for ``conic-qp composition``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError, option
from conic_qp.outputs import (
    ANNOTATE_DIR,
    ANNOTATE_RUN_FILE,
    TABLE_SUFFIX,
    entry_stem,
    region_file,
    regions_path,
    used_regions_path,
)
from conic_qp.regions import Region, qupath_centroids
from conic_qp.run_record import read_record

log = logging.getLogger(__name__)

Rule = Literal["centroid", "any-pixel"]
RULES: tuple[str, ...] = ("centroid", "any-pixel")
WHOLE = "all"

TIDY_COLUMNS: tuple[str, ...] = (
    "slide",
    "region",
    "region_class",
    "region_id",
    "area_mm2",
    "class",
    "count",
    "proportion",
    "density_per_mm2",
)


@dataclass(frozen=True)
class Ratio:
    """A named ratio of nucleus counts; ``denominator=None`` means all nuclei of the region.

    A ratio is reported only when every class it names exists in the model's scheme, so the same
    table of ratios serves CoNIC, CoNSeP and custom schemes.
    """

    name: str
    numerator: frozenset[str]
    denominator: frozenset[str] | None = None

    def applies_to(self, class_names: Iterable[str]) -> bool:
        have = set(class_names)
        return self.numerator <= have and (self.denominator is None or self.denominator <= have)

    def value(self, counts: Mapping[str, int | float]) -> float:
        num = float(sum(counts.get(c, 0) for c in self.numerator))
        names = self.denominator if self.denominator is not None else counts.keys()
        den = float(sum(counts.get(c, 0) for c in names))
        return num / den if den > 0 else math.nan


def ratio(name: str, numerator: Iterable[str], denominator: Iterable[str] | None = None) -> Ratio:
    return Ratio(
        name, frozenset(numerator), None if denominator is None else frozenset(denominator)
    )


#: Common immune / epithelial ratios; each applies only to schemes that have all its classes.
DEFAULT_RATIOS: tuple[Ratio, ...] = (
    ratio("lymphocyte/epithelial", ["lymphocyte"], ["epithelial"]),
    ratio("(lymphocyte+plasma)/all", ["lymphocyte", "plasma"]),
    ratio("inflammatory/epithelial", ["inflammatory"], ["epithelial"]),  # CoNSeP
    ratio("inflammatory/all", ["inflammatory"]),  # CoNSeP
)


def applicable_ratios(
    class_names: Iterable[str], ratios: Sequence[Ratio] = DEFAULT_RATIOS
) -> list[Ratio]:
    """The ratios whose classes all exist in ``class_names``."""
    names = list(class_names)
    return [r for r in ratios if r.applies_to(names)]


def CompositionRegion(
    label: str,
    geometry: shapely.Geometry | None = None,
    class_name: str | None = None,
    id: str | None = None,
    area_px: float | None = None,
    properties: Mapping[str, Any] | None = None,
) -> Region:
    """A :class:`~conic_qp.regions.Region` to count in, labelled ``label``.

    ``geometry=None`` is the whole slide/tissue: every nucleus of the table belongs to it and
    ``area_px`` (level-0 px^2) gives its area (NaN when unknown).
    """
    return Region(geometry, label, class_name, id, dict(properties or {}), area_px)


def regions_from(items: Iterable[Any]) -> list[Region]:
    """Regions labelled for composition tables, from GeoJSON/paquo/OMERO regions (anything with
    ``geometry`` and optionally ``name``, ``class_name``, ``id``, ``area_px``); unnamed regions
    are labelled by class, and repeated labels get `` #2``, `` #3`` so every (slide, region) row
    is unique."""
    out: list[Region] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(items):
        base = getattr(r, "name", None) or getattr(r, "class_name", None) or f"region {i + 1}"
        seen[base] = seen.get(base, 0) + 1
        label = base if seen[base] == 1 else f"{base} #{seen[base]}"
        area_px = getattr(r, "area_px", None)
        if area_px is not None:
            out.append(CompositionRegion(label, r.geometry, r.class_name, r.id, area_px))
            continue
        rid = getattr(r, "id", None)
        out.append(
            CompositionRegion(
                label,
                getattr(r, "geometry"),  # noqa: B009 - duck-typed regions
                getattr(r, "class_name", None),
                str(rid) if rid is not None else str(i + 1),
            )
        )
    # labels made unique above may collide with a later literal "X #2"; rare, but keep rows unique
    labels = [r.label for r in out]
    if len(set(labels)) != len(labels):
        out = [
            CompositionRegion(f"{r.label} [{i + 1}]", r.geometry, r.class_name, r.id, r.area_px)
            for i, r in enumerate(out)
        ]
    return out


# ------------------------------------------------------------------------------- membership


def assign_nuclei(
    table: pd.DataFrame, geometries: Sequence[shapely.Geometry | None], rule: Rule = "centroid"
) -> list[np.ndarray]:
    """Row indices of the nuclei that belong to each geometry (``None``: all rows).

    Parameters
    ----------
    table : nucleus table with ``centroid_x``, ``centroid_y`` (centroid rule: the outline's
        centroid as QuPath computes it when ``polygon_wkb`` is there) or ``polygon_wkb``
        (any-pixel rule), level-0 px.
    geometries : regions in level-0 px (Polygon / MultiPolygon, holes honoured).
    rule : ``"centroid"`` (region covers the centroid) or ``"any-pixel"`` (outline intersects).
    """
    if rule not in RULES:
        raise ConicQPError(f"unknown membership rule {rule!r}; use 'centroid' or 'any-pixel'")
    n = len(table)
    everything = np.arange(n, dtype=np.int64)
    real = [(i, g) for i, g in enumerate(geometries) if g is not None]
    out: list[np.ndarray] = [everything if g is None else np.empty(0, np.int64) for g in geometries]
    if not real or n == 0:
        return out
    if rule == "centroid":
        items = shapely.points(*qupath_centroids(table))
        predicate = "covers"
    else:
        if "polygon_wkb" not in table.columns:
            raise ConicQPError(
                "nucleus table lacks 'polygon_wkb'; the any-pixel rule needs nucleus outlines"
            )
        items = shapely.from_wkb(table["polygon_wkb"].to_numpy())
        predicate = "intersects"
    tree = shapely.STRtree(items)
    regions = np.array([g for _, g in real], dtype=object)
    shapely.prepare(regions)
    # query(regions, predicate) evaluates predicate(region, tree item): region covers / intersects
    pairs = tree.query(regions, predicate=predicate)
    order = np.argsort(pairs[0], kind="stable")
    src, hit = pairs[0][order], pairs[1][order]
    bounds = np.searchsorted(src, np.arange(len(real) + 1))
    for j, (i, _) in enumerate(real):
        out[i] = np.sort(hit[bounds[j] : bounds[j + 1]]).astype(np.int64)
    return out


# ------------------------------------------------------------------------------- tables


def composition_table(
    table: pd.DataFrame,
    regions: Sequence[Region],
    class_names: Sequence[str],
    *,
    slide: str,
    mpp: float,
    rule: Rule = "centroid",
) -> pd.DataFrame:
    """Tidy composition of one slide: one row per region and class.

    Columns :data:`TIDY_COLUMNS`: ``count`` of nuclei of ``class`` in ``region``; ``proportion``
    of the region's nuclei (NaN for an empty region); ``area_mm2`` of the region and
    ``density_per_mm2`` = count / area (NaN when the area is unknown or zero).
    """
    if not (math.isfinite(mpp) and mpp > 0):
        raise ConicQPError(f"slide {slide}: um/px {mpp} must be positive to compute areas")
    names = list(class_names)
    if "class_name" not in table.columns:
        raise ConicQPError("nucleus table lacks column 'class_name'; make it with conic-qp")
    cls = table["class_name"].astype(str)
    unknown = sorted(set(cls) - set(names))
    if unknown:
        raise ConicQPError(
            f"slide {slide}: nucleus classes {unknown} are not in the model's classes {names}"
        )
    codes = pd.Categorical(cls, categories=names).codes
    members = assign_nuclei(table, [r.geometry for r in regions], rule)
    rows: list[dict[str, Any]] = []
    for region, idx in zip(regions, members, strict=True):
        counts = np.bincount(codes[idx], minlength=len(names))
        total = int(counts.sum())
        area_mm2 = region.area * mpp * mpp / 1e6
        for name, c in zip(names, counts.tolist(), strict=True):
            rows.append(
                {
                    "slide": slide,
                    "region": region.label,
                    "region_class": region.class_name,
                    "region_id": region.id,
                    "area_mm2": area_mm2,
                    "class": name,
                    "count": int(c),
                    "proportion": c / total if total else math.nan,
                    "density_per_mm2": c / area_mm2 if area_mm2 > 0 else math.nan,
                }
            )
    out = pd.DataFrame(rows, columns=list(TIDY_COLUMNS))
    return out.astype({"count": "int64", "area_mm2": "float64"})


def summary_table(
    tidy: pd.DataFrame,
    class_names: Sequence[str] | None = None,
    ratios: Sequence[Ratio] = DEFAULT_RATIOS,
) -> pd.DataFrame:
    """Wide table, one row per slide x region: area, total, density, per-class counts,
    proportions and the applicable ratios."""
    names = list(class_names) if class_names is not None else list(dict.fromkeys(tidy["class"]))
    use = applicable_ratios(names, ratios)
    keys = ["slide", "region", "region_class", "region_id", "area_mm2"]
    rows: list[dict[str, Any]] = []
    for key, grp in tidy.groupby(["slide", "region"], sort=False, dropna=False):
        first = grp.iloc[0]
        counts = {str(k): int(v) for k, v in zip(grp["class"], grp["count"], strict=True)}
        total = sum(counts.values())
        area = float(first["area_mm2"])
        row: dict[str, Any] = {k: first[k] for k in keys}
        row["total"] = total
        row["density_per_mm2"] = total / area if area > 0 else math.nan
        for n in names:
            row[f"count_{n}"] = counts.get(n, 0)
        for n in names:
            row[f"proportion_{n}"] = counts.get(n, 0) / total if total else math.nan
        for r in use:
            row[r.name] = r.value(counts)
        rows.append(row)
        del key
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- cohort files


@dataclass
class SlideInput:
    """One slide of a cohort: its nucleus table, regions and where things come from."""

    slide: str
    table_path: Path
    regions: list[Region]
    region_source: str
    slide_path: Path | None = None


@dataclass
class CompositionResult:
    tidy: pd.DataFrame
    summary: pd.DataFrame
    classes: ClassScheme | None
    failures: dict[str, str]
    outputs: dict[str, Path]


def whole_region(area_px: float | None) -> Region:
    return CompositionRegion(WHOLE, None, None, WHOLE, area_px if area_px is not None else math.nan)


def _whole_area_from_run(run: Mapping[str, Any]) -> float | None:
    """Level-0 area of what a predict/annotate run covered: its ROI, tissue, or the image."""
    for key in ("roi_area_px", "tissue_area_px"):
        v = run.get(key)
        if isinstance(v, int | float) and v > 0:
            return float(v)
    roi = run.get("roi")
    if isinstance(roi, str) and roi:
        try:
            return float(shapely.from_wkt(roi).area)
        except Exception:  # malformed WKT: fall back to the image
            pass
    dims = (run.get("slide") or {}).get("dimensions")
    if isinstance(dims, list) and len(dims) == 2:
        return float(dims[0]) * float(dims[1])
    return None


def load_cohort(
    source: str | os.PathLike[str],
    *,
    regions_geojson: str | os.PathLike[str] | None = None,
    remap: Mapping[str, str] | Iterable[str] | None = None,
) -> tuple[list[SlideInput], dict[str, str]]:
    """Slides of a QuPath project annotated by conic-qp, or of a folder of predict outputs.

    Regions per slide: ``regions_geojson/<entry id | image name | stem>.geojson``, else the
    project's ``regions/<entryID>.geojson`` (QuPath export script), else the regions annotate
    ran inside (``conic-qp/<entryID>.regions.geojson``), else the whole area the run covered
    (region ``"all"``: its ROI, tissue, or the whole image). Returns the slides and per-slide problems (missing tables).
    """
    from conic_qp.sinks.geojson import read_regions

    src = Path(source)
    rdir = Path(regions_geojson) if regions_geojson is not None else None
    if rdir is not None and not rdir.is_dir():
        raise ConicQPError(
            f"{option('regions_geojson')} {rdir} is not a folder; pass the folder of GeoJSONs"
        )
    slides: list[SlideInput] = []
    failures: dict[str, str] = {}
    if src.suffix == ".qpproj" or (src.is_dir() and any(src.glob("*.qpproj"))):
        from conic_qp.qupath.project import read_project

        project = read_project(src, remap=remap)
        out_dir = project.dir / ANNOTATE_DIR
        run = read_record(out_dir / ANNOTATE_RUN_FILE)
        run_images = run.get("images") if isinstance(run.get("images"), dict) else {}
        for im in project.images:
            table = out_dir / f"{entry_stem(im.entry_id)}{TABLE_SUFFIX}"
            if not table.is_file():
                failures[im.name] = f"no conic-qp table {table}; run `conic-qp annotate` first"
                continue
            keys = [im.entry_id, im.name]
            rfile = region_file(rdir, keys) if rdir is not None else None
            if rfile is None and regions_path(project.dir, im.entry_id).is_file():
                rfile = regions_path(project.dir, im.entry_id)
            used = used_regions_path(out_dir, im.entry_id)  # what annotate ran inside
            if rfile is None and used.is_file():
                rfile = used
            info = run_images.get(im.entry_id, {}) if isinstance(run_images, dict) else {}
            slides.append(_slide_input(im.name, table, rfile, info, read_regions, im.path))
        return slides, failures
    if not src.is_dir():
        raise ConicQPError(
            f"{src} is neither a QuPath project nor a folder of predictions (*{TABLE_SUFFIX})"
        )
    tables = sorted(src.glob(f"*{TABLE_SUFFIX}"))
    if not tables:
        raise ConicQPError(f"{src} holds no *{TABLE_SUFFIX} files; run `conic-qp predict` first")
    for table in tables:
        stem = table.name[: -len(TABLE_SUFFIX)]
        rfile = region_file(rdir, [stem]) if rdir is not None else None
        run = read_record(table.with_name(f"{stem}.run.json"))
        spath = (run.get("slide") or {}).get("path")
        slides.append(
            _slide_input(stem, table, rfile, run, read_regions, Path(spath) if spath else None)
        )
    return slides, failures


def _slide_input(
    name: str,
    table: Path,
    rfile: Path | None,
    run: Mapping[str, Any],
    read_regions: Callable[[Path], Sequence[Any]],
    slide_path: Path | None,
) -> SlideInput:
    if rfile is not None:
        regs = read_regions(rfile)
        if regs:
            return SlideInput(name, table, regions_from(regs), str(rfile), slide_path)
        log.warning("%s: %s holds no polygon annotations; counting the whole slide", name, rfile)
    return SlideInput(name, table, [whole_region(_whole_area_from_run(run))], "whole", slide_path)


def compose_cohort(
    slides: Sequence[SlideInput],
    *,
    rule: Rule = "centroid",
    ratios: Sequence[Ratio] = DEFAULT_RATIOS,
) -> tuple[pd.DataFrame, pd.DataFrame, ClassScheme | None, dict[str, str]]:
    """Tidy and summary tables of many slides; a slide that fails is reported, others go on.

    All slides must share the class list (one model); its um/px comes from each table.
    """
    from conic_qp.sinks.tables import read_table

    parts: list[pd.DataFrame] = []
    failures: dict[str, str] = {}
    scheme: ClassScheme | None = None
    for s in slides:
        try:
            df = read_table(s.table_path)
            classes = df.attrs.get("classes")
            mpp = df.attrs.get("conic_qp", {}).get("mpp")
            if classes is None or mpp is None:
                raise ConicQPError(
                    f"{s.table_path} has no conic-qp metadata (classes, um/px); write it with "
                    "conic-qp"
                )
            if scheme is None:
                scheme = classes
            elif classes.names != scheme.names:
                raise ConicQPError(
                    f"{s.table_path} has classes {classes.names}, other slides {scheme.names}; "
                    "compose slides of one model at a time"
                )
            parts.append(
                composition_table(
                    df, s.regions, classes.names, slide=s.slide, mpp=float(mpp), rule=rule
                )
            )
        except ConicQPError as exc:
            failures[s.slide] = str(exc)
            log.error("%s: %s", s.slide, exc)
    tidy = (
        pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(TIDY_COLUMNS))
    )
    names = scheme.names if scheme is not None else None
    return tidy, summary_table(tidy, names, ratios), scheme, failures


def write_composition(
    tidy: pd.DataFrame, summary: pd.DataFrame, out_csv: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write ``table.csv`` (tidy), ``table.parquet`` beside it and ``table.summary.csv`` (wide),
    each atomically. Returns the paths by kind."""
    from conic_qp.sinks import atomic_path

    out = Path(out_csv)
    if out.suffix.lower() != ".csv":
        raise ConicQPError(f"-o {out}: give a .csv path (Parquet and summary go beside it)")
    paths = {
        "tidy_csv": out,
        "tidy_parquet": out.with_suffix(".parquet"),
        "summary_csv": out.with_name(out.stem + ".summary.csv"),
    }
    from conic_qp.locks import clean_stale_temps
    from conic_qp.paths import check_output_dir, check_writable

    check_output_dir(out.parent, what="composition folder")  # created when missing
    for path in paths.values():  # all three or none (read-only: root is refused too)
        if path.exists():
            check_writable(path, what="composition table")
    clean_stale_temps(out.parent)  # what a killed run left beside the tables
    with atomic_path(paths["tidy_csv"]) as tmp:
        tidy.to_csv(tmp, index=False)
    with atomic_path(paths["tidy_parquet"]) as tmp:
        tidy.to_parquet(tmp, index=False)
    with atomic_path(paths["summary_csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    return paths
