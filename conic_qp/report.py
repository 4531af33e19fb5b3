"""Composition report: stacked bars per slide/region (matplotlib, Agg) and overlay thumbnails.

:func:`write_report` writes ``report.html`` and a ``report_files/`` folder beside it with
``composition.png`` (counts), ``proportions.png`` and one ``overlay_<n>.png`` per slide: the
slide thumbnail with every nucleus outline drawn in its class colour and the regions in black.
The HTML references the PNGs by relative path, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from PIL import Image, ImageDraw

from conic_qp.classes import RGB, ClassScheme
from conic_qp.composition import SlideInput
from conic_qp.regions import Region
from conic_qp.sinks import atomic_path
from conic_qp.slides import SlideSource

log = logging.getLogger(__name__)

#: Above this many nuclei an overlay draws centroid dots instead of outlines (speed, legibility).
MAX_OUTLINES = 200_000
BAR_DPI = 100


def _rgb01(c: Sequence[int]) -> tuple[float, float, float]:
    return (c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def stacked_bars(
    tidy: pd.DataFrame,
    colors: Mapping[str, RGB],
    path: str | os.PathLike[str],
    *,
    value: str = "count",
    title: str | None = None,
) -> Path:
    """One stacked bar per slide x region, one segment per class (``value``: a tidy column,
    ``count``, ``proportion`` or ``density_per_mm2``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(colors) if colors else list(dict.fromkeys(tidy["class"]))
    wide = tidy.pivot_table(
        index=["slide", "region"], columns="class", values=value, aggfunc="sum", sort=False
    ).reindex(columns=names)
    wide = wide.fillna(0.0)
    labels = [f"{s} | {r}" for s, r in wide.index]
    n = max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.45 * n), 4.5), dpi=BAR_DPI)
    try:
        bottom = np.zeros(len(labels))
        x = np.arange(len(labels))
        for name in names:
            vals = wide[name].to_numpy(np.float64) if len(labels) else np.zeros(0)
            ax.bar(x, vals, bottom=bottom, color=_rgb01(colors.get(name, (128, 128, 128))),
                   label=name, edgecolor="white", linewidth=0.3)  # fmt: skip
            bottom += vals
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(value.replace("_", " "))
        if title:
            ax.set_title(title)
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=BAR_DPI)
    finally:
        plt.close(fig)
    return Path(path)


def overlay_image(
    source: SlideSource,
    table: pd.DataFrame,
    colors: Mapping[str, RGB],
    *,
    regions: Sequence[Region] = (),
    max_size: int = 1024,
) -> Image.Image:
    """The slide thumbnail (longer side ``max_size``) with nucleus outlines in class colours.

    Polygons are scaled from level-0 px by the thumbnail's downsample; above
    :data:`MAX_OUTLINES` nuclei, centroids are drawn as dots.
    """
    thumb, down = source.thumbnail(max_size)
    img = Image.fromarray(np.ascontiguousarray(thumb)).convert("RGB")
    draw = ImageDraw.Draw(img)
    fallback: RGB = (128, 128, 128)
    cnames = table["class_name"].astype(str).to_numpy() if len(table) else np.array([])
    if len(table) and "polygon_wkb" in table.columns and len(table) <= MAX_OUTLINES:
        geoms = shapely.from_wkb(table["polygon_wkb"].to_numpy())
        coords, which = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
        coords = coords / down
        bounds = np.searchsorted(which, np.arange(len(geoms) + 1))
        for j in range(len(geoms)):
            pts = coords[bounds[j] : bounds[j + 1]]
            if len(pts) < 3:
                continue
            c = tuple(colors.get(cnames[j], fallback))
            draw.polygon([tuple(p) for p in pts.tolist()], outline=c)
    elif len(table):
        xs = table["centroid_x"].to_numpy(np.float64) / down
        ys = table["centroid_y"].to_numpy(np.float64) / down
        for x, y, cn in zip(xs.tolist(), ys.tolist(), cnames.tolist(), strict=True):
            draw.point((x, y), fill=tuple(colors.get(cn, fallback)))
    for r in regions:
        if r.geometry is None:
            continue
        for ring in _rings(r.geometry):
            pts = (np.asarray(ring.coords) / down).tolist()
            draw.line([tuple(p) for p in pts], fill=(0, 0, 0), width=2)
    return img


def _rings(geom: shapely.Geometry) -> list[shapely.LinearRing]:
    polys = geom.geoms if isinstance(geom, shapely.MultiPolygon) else [geom]
    out: list[shapely.LinearRing] = []
    for p in polys:
        if isinstance(p, shapely.Polygon):
            out.append(p.exterior)
            out.extend(p.interiors)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "slide"


def write_report(
    tidy: pd.DataFrame,
    summary: pd.DataFrame,
    html_path: str | os.PathLike[str],
    *,
    classes: ClassScheme | None,
    slides: Sequence[SlideInput] = (),
    max_size: int = 1024,
    title: str = "conic-qp composition",
    failures: Mapping[str, str] | None = None,
) -> Path:
    """Write the HTML report, its bar charts and one overlay per slide whose file is readable.

    A slide whose image or table cannot be read gets a note instead of an overlay.
    """
    from conic_qp.sinks.tables import read_table
    from conic_qp.slides import open_slide

    out = Path(html_path)
    files = out.with_name(out.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    colors: dict[str, RGB] = {c.name: c.color for c in classes} if classes is not None else {}
    bars = [
        stacked_bars(tidy, colors, files / "composition.png", value="count",
                     title="Nuclei per class"),
        stacked_bars(tidy, colors, files / "proportions.png", value="proportion",
                     title="Proportion per class"),
    ]  # fmt: skip
    overlays: list[tuple[str, Path | None, str | None]] = []
    for i, s in enumerate(slides):
        png = files / f"overlay_{i + 1}_{_safe(s.slide)}.png"
        if s.slide_path is None or not Path(s.slide_path).is_file():
            overlays.append((s.slide, None, "slide file not available on this machine"))
            continue
        try:
            df = read_table(s.table_path)
            mpp = df.attrs.get("conic_qp", {}).get("mpp")
            with open_slide(s.slide_path, mpp=mpp) as src:
                img = overlay_image(src, df, colors, regions=s.regions, max_size=max_size)
            with atomic_path(png) as tmp:
                img.save(tmp, format="PNG")
            overlays.append((s.slide, png, None))
        except Exception as exc:  # a report never fails on one slide
            log.warning("%s: no overlay (%s)", s.slide, exc)
            overlays.append((s.slide, None, str(exc)))

    def rel(p: Path) -> str:
        return html.escape(p.relative_to(out.parent).as_posix(), quote=True)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if colors:
        legend = " ".join(
            f'<span style="color:rgb{tuple(c)}">&#9632;</span> {html.escape(n)}'
            for n, c in colors.items()
        )
        parts.append(f"<p>Classes: {legend}</p>")
    parts.append("<h2>Composition</h2>")
    for bar in bars:
        parts.append(f'<p><img src="{rel(bar)}" alt="{html.escape(bar.stem)}"></p>')
    parts.append("<h2>Summary</h2>")
    parts.append(summary.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    if failures:
        parts.append("<h2>Failed slides</h2><ul>")
        parts += [f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in failures.items()]
        parts.append("</ul>")
    if overlays:
        parts.append("<h2>Detections</h2>")
    for name, overlay, note in overlays:
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if overlay is not None:
            parts.append(f'<p><img src="{rel(overlay)}" alt="overlay {html.escape(name)}"></p>')
        else:
            parts.append(f"<p><em>no overlay: {html.escape(note or '')}</em></p>")
    parts.append("</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out
