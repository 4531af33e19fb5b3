"""Draw what QuPath shows after the import: regions, nuclei under them, per-annotation counts.

Used for docs/img/cmu1-qupath-view.png::

    conic-qp annotate examples/CMU-1/project.qpproj --tta 4
    python scripts/render_qupath_view.py examples/CMU-1 docs/img/cmu1-qupath-view.png \
        --box 760,1300,640,560 --width 800

Everything drawn comes from the files the Groovy import reads (``detections/<entryID>/``: the
manifest, ``regions.geojson`` and the detection files), placed as the import places them: each
file's detections below the annotation the manifest names. The table on the right is QuPath's
*Annotations* measurement table for that hierarchy (``Num Detections`` counts the detections
below an annotation, nested annotations included), next to ``conic-qp composition``'s count.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from conic_qp.composition import composition_table, regions_from
from conic_qp.qupath.project import detections_dir, read_project
from conic_qp.sinks.geojson import read_regions
from conic_qp.sinks.tables import read_table
from conic_qp.slides import open_slide


def _features(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)["features"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", help="project folder (annotated by conic-qp annotate)")
    ap.add_argument("out")
    ap.add_argument("--entry", default=None, help="entry id (default: the first image)")
    ap.add_argument("--width", type=int, default=900, help="width of the image part in px")
    ap.add_argument("--box", default=None, help="x,y,w,h in level-0 px (default: the regions)")
    args = ap.parse_args()
    qp = read_project(args.project)
    image = qp.image(args.entry) if args.entry else qp.images[0]
    folder = detections_dir(qp.dir, image.entry_id)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    regions = read_regions(folder / manifest["regions_file"])
    geoms = {r.id: r.geometry for r in regions}
    # the annotation tree QuPath builds (smallest covering annotation is the parent)
    by_area = sorted(geoms, key=lambda k: geoms[k].area)
    parent_of = {
        k: next((o for o in by_area if o != k and geoms[o].covers(geoms[k])), None) for k in geoms
    }
    classes = {}
    counts: dict[str | None, dict[str, int]] = {k: {} for k in [*geoms, None]}
    outlines = []
    for entry in manifest["files"]:
        for f in _features(folder / entry["file"]):
            cls = f["properties"]["classification"]
            classes[cls["name"]] = tuple(cls["color"])
            outlines.append((np.asarray(f["geometry"]["coordinates"][0]), tuple(cls["color"])))
            k = entry["parent"]
            while True:
                counts[k][cls["name"]] = counts[k].get(cls["name"], 0) + 1
                if k is None or parent_of[k] is None:
                    break
                k = parent_of[k]

    # composition's count for the same regions, for the table
    table = read_table(qp.dir / "conic-qp" / f"{image.entry_id}.nuclei.parquet")
    comp = composition_table(
        table, regions_from(regions), table.attrs["classes"].names, slide=image.name,
        mpp=float(table.attrs["conic_qp"]["mpp"]),
    )  # fmt: skip
    comp_total = comp.groupby("region_id")["count"].sum().to_dict()

    if args.box:
        bx, by, bw, bh = (float(v) for v in args.box.split(","))
        x0, y0, x1, y1 = bx, by, bx + bw, by + bh
    else:
        x0, y0, x1, y1 = shapely.union_all(list(geoms.values())).buffer(60).bounds
    x0, y0 = max(0, x0), max(0, y0)
    scale = args.width / (x1 - x0)
    with open_slide(image.path) as slide:
        w0, h0 = slide.dimensions
        x1, y1 = min(w0, x1), min(h0, y1)
        w, h = round((x1 - x0) * scale), round((y1 - y0) * scale)
        crop = slide.read((x0, y0, x1 - x0, y1 - y0), slide.mpp / scale, size=(w, h))
    view = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB")
    draw = ImageDraw.Draw(view)
    line = max(1, round(scale))
    for ring, colour in outlines:
        draw.line([((x - x0) * scale, (y - y0) * scale) for x, y in ring], fill=colour, width=line)
    font = ImageFont.load_default(size=15)
    box = shapely.box(x0, y0, x1, y1)
    for r in regions:
        colour = tuple(r.properties.get("classification", {}).get("color", (255, 255, 0)))
        for poly in getattr(r.geometry, "geoms", [r.geometry]):
            pts = [((x - x0) * scale, (y - y0) * scale) for x, y in poly.exterior.coords]
            draw.line(pts, fill=colour, width=4)
        visible = r.geometry.intersection(box)
        if visible.is_empty:
            continue
        cx, cy = visible.representative_point().coords[0]
        label = f"{r.name or r.class_name} ({sum(counts[r.id].values())})"
        at = ((cx - x0) * scale - 40, (cy - y0) * scale)
        draw.rectangle(draw.textbbox(at, label, font=font), fill=(255, 255, 255))
        draw.text(at, label, fill=colour, font=font)

    # QuPath's "Annotations" measurement table, next to composition
    names = sorted(classes)
    cols = ["Name", "Class", "Num Detections", *[f"Num {n}" for n in names], "composition"]
    rows = [
        [r.name or "", r.class_name or "", str(sum(counts[r.id].values())),
         *[str(counts[r.id].get(n, 0)) for n in names], str(comp_total.get(r.id, 0))]
        for r in regions
    ]  # fmt: skip
    rows.append(["(image root)", "", str(sum(counts[None].values())), *["" for _ in names], ""])
    cw = [max(len(c), *(len(r[i]) for r in rows)) * 8 + 16 for i, c in enumerate(cols)]
    panel_w = sum(cw) + 20
    out = Image.new("RGB", (w + panel_w, max(h, 60 + 22 * (len(rows) + 2 + len(names)))), "white")
    out.paste(view, (0, 0))
    d = ImageDraw.Draw(out)
    px, py = w + 10, 10
    title = f"{image.name}: annotation measurements (as QuPath lists them)"
    d.text((px, py), title, fill=(0, 0, 0), font=font)
    py += 28
    for row_i, row in enumerate([cols, *rows]):
        x = px
        for i, cell in enumerate(row):
            d.text((x, py), cell, fill=(0, 0, 0) if row_i else (60, 60, 160), font=font)
            x += cw[i]
        py += 22
    py += 10
    for n in names:
        d.rectangle((px, py + 2, px + 12, py + 14), fill=classes[n])
        d.text((px + 18, py), n, fill=(0, 0, 0), font=font)
        py += 22
    out.save(args.out, optimize=True)
    print(f"{args.out}: {len(outlines)} nuclei, {len(regions)} annotations")
    for r, row in zip(regions, rows, strict=False):
        print(f"  {r.name}: QuPath {row[2]} detections, composition {row[-1]}")


if __name__ == "__main__":
    main()
