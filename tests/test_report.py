"""Composition report: bar charts and overlay thumbnails written, decodable, referenced by the HTML."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from PIL import Image

from conic_qp.classes import CONSEP
from conic_qp.composition import (
    CompositionRegion,
    SlideInput,
    compose_cohort,
    whole_region,
)
from conic_qp.report import overlay_image, stacked_bars, write_report
from conic_qp.sinks.tables import write_table
from conic_qp.slides import ImageSource
from tests.helpers_slides import write_pyramidal_tiff


def table_of(xy: np.ndarray, classes: list[str]) -> pd.DataFrame:
    polys = [shapely.box(x - 4, y - 4, x + 4, y + 4) for x, y in xy]
    return pd.DataFrame(
        {
            "id": [str(i) for i in range(len(xy))],
            "centroid_x": xy[:, 0],
            "centroid_y": xy[:, 1],
            "class_name": classes,
            "polygon_wkb": [shapely.to_wkb(p) for p in polys],
        }
    )


def test_overlay_draws_class_colours_at_the_nuclei() -> None:
    white = np.full((200, 300, 3), 255, np.uint8)
    table = table_of(np.array([[50.0, 50.0], [200.0, 150.0]]), ["inflammatory", "epithelial"])
    colors = {c.name: c.color for c in CONSEP}
    region = CompositionRegion("r", shapely.box(100, 20, 290, 190))
    img = overlay_image(ImageSource(white, 0.5, "w"), table, colors, regions=[region], max_size=150)
    assert img.size == (150, 100)  # thumbnail: longer side 150, downsample 2
    px = np.asarray(img)
    # outline of nucleus 0 (box 46..54 at downsample 2 -> 23..27) in the inflammatory colour
    assert tuple(px[23, 25]) == CONSEP.by_name("inflammatory").color
    assert tuple(px[73, 98]) == CONSEP.by_name("epithelial").color
    assert tuple(px[10, 75]) == (0, 0, 0)  # the region's top edge
    assert tuple(px[60, 10]) == (255, 255, 255)  # glass elsewhere


def test_report_files_exist_decode_and_are_referenced(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    slides = []
    for k in range(2):
        img = rng.integers(150, 255, size=(240, 320, 3), dtype=np.uint8)
        path = write_pyramidal_tiff(tmp_path / f"s{k}.tif", img, mpp=0.5, levels=2)
        xy = rng.uniform(10, 230, size=(40, 2))
        table = table_of(xy, [CONSEP.names[i] for i in rng.integers(0, 4, len(xy))])
        tpath = write_table(table, tmp_path / f"s{k}.nuclei.parquet", classes=CONSEP, mpp=0.5)
        regions = (
            [CompositionRegion("left", shapely.box(0, 0, 160, 240))]
            if k == 0
            else [whole_region(320 * 240)]
        )
        slides.append(SlideInput(f"slide {k}", tpath, regions, "test", path))
    slides.append(SlideInput("gone", slides[0].table_path, [whole_region(1.0)], "test", None))
    tidy, summary, scheme, failures = compose_cohort(slides)
    assert not failures and scheme is not None
    html_path = write_report(
        tidy, summary, tmp_path / "rep" / "report.html", classes=scheme, slides=slides,
        max_size=200,
    )  # fmt: skip
    html = html_path.read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 4  # two bar charts, two overlays (the third slide has no file)
    for src in srcs:
        png = html_path.parent / src
        assert png.is_file() and png.parent.name == "report_files"
        with Image.open(png) as im:
            im.load()
            assert im.format == "PNG" and im.width > 50 and im.height > 50
            if "overlay" in src:
                assert im.size == (200, 150)
    assert "no overlay: slide file not available" in html
    assert "slide 0" in html and "inflammatory/epithelial" in html  # summary with CoNSeP ratio


def test_stacked_bars_size_follows_the_number_of_bars(tmp_path: Path) -> None:
    tidy = pd.DataFrame(
        {
            "slide": ["a"] * 2 + ["b"] * 2,
            "region": ["all"] * 4,
            "class": ["x", "y"] * 2,
            "count": [1, 2, 3, 4],
        }
    )
    p = stacked_bars(tidy, {"x": (255, 0, 0), "y": (0, 0, 255)}, tmp_path / "b.png")
    with Image.open(p) as im:
        assert im.size == (400, 450)  # figsize (max(4, 1 + 0.45 n), 4.5) at 100 dpi
