"""Draw a nucleus table's outlines, in class colours, on a full-resolution crop of its slide.

Used for docs/img/cmu1-overlay.png::

    conic-qp annotate examples/CMU-1/project.qpproj --tta 4
    python scripts/render_overlay.py examples/CMU-1/CMU-1-Small-Region.svs \
        examples/CMU-1/conic-qp/1.nuclei.parquet docs/img/cmu1-overlay.png --box 1000,900,340,300 --scale 2
"""

from __future__ import annotations

import argparse

import numpy as np
import shapely
from PIL import Image, ImageDraw

from conic_qp.sinks.tables import read_table
from conic_qp.slides import open_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("table")
    ap.add_argument("out")
    ap.add_argument("--box", default="0,0,1000,700", help="x,y,w,h in level-0 px")
    ap.add_argument("--scale", type=float, default=1.0, help="output px per level-0 px")
    args = ap.parse_args()
    x, y, w, h = (int(v) for v in args.box.split(","))
    table = read_table(args.table)
    colours = {c.name: tuple(c.color) for c in table.attrs["classes"]}
    with open_slide(args.slide) as slide:
        crop = slide.read(
            (x, y, w, h),
            slide.mpp / args.scale,
            size=(round(w * args.scale), round(h * args.scale)),
        )
    img = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB")
    draw = ImageDraw.Draw(img)
    inside = table[table["centroid_x"].between(x, x + w) & table["centroid_y"].between(y, y + h)]
    for wkb, name in zip(inside["polygon_wkb"], inside["class_name"], strict=True):
        ring = np.asarray(shapely.get_exterior_ring(shapely.from_wkb(wkb)).coords)
        pts = [((px - x) * args.scale, (py - y) * args.scale) for px, py in ring]
        draw.line(pts, fill=colours.get(str(name), (0, 0, 0)), width=2)
    legend = sorted(set(inside["class_name"].astype(str)))
    for i, name in enumerate(legend):
        draw.rectangle((8, 8 + 18 * i, 22, 22 + 18 * i), fill=colours[name])
        draw.text((28, 9 + 18 * i), name, fill=(0, 0, 0))
    img.save(args.out)
    print(f"{args.out}: {len(inside)} nuclei drawn on a {img.size[0]}x{img.size[1]} crop")


if __name__ == "__main__":
    main()
