"""Per-region composition: membership rules against an independent shapely count, tables, ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Point, Polygon, box

from conic_qp.classes import CONIC, CONSEP
from conic_qp.composition import (
    DEFAULT_RATIOS,
    TIDY_COLUMNS,
    CompositionRegion,
    applicable_ratios,
    assign_nuclei,
    compose_cohort,
    composition_table,
    load_cohort,
    ratio,
    regions_from,
    summary_table,
    whole_region,
    write_composition,
)
from conic_qp.errors import ConicQPError
from conic_qp.sinks.geojson import Region
from conic_qp.sinks.tables import write_table

NAMES = CONIC.names


def nuclei(xy: np.ndarray, classes: list[str], r: float = 3.0) -> pd.DataFrame:
    """A nucleus table: square outlines of half-size ``r`` around the centroids."""
    polys = [box(x - r, y - r, x + r, y + r) for x, y in xy]
    return pd.DataFrame(
        {
            "id": [f"n{i}" for i in range(len(xy))],
            "centroid_x": xy[:, 0].astype(np.float64),
            "centroid_y": xy[:, 1].astype(np.float64),
            "class_name": classes,
            "polygon_wkb": [shapely.to_wkb(p) for p in polys],
        }
    )


@pytest.fixture(scope="module")
def scene() -> tuple[pd.DataFrame, list[CompositionRegion]]:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, size=(600, 2)).round(1)
    # on borders: square edge, corner, hole edge, hole corner, triangle edge; then inside the hole
    border = np.array(
        [[100.0, 150.0], [200.0, 100.0], [150.0, 160.0], [140.0, 140.0], [300, 300], [150, 150]]
    )
    xy = np.vstack([xy, border])
    classes = [NAMES[i] for i in rng.integers(0, len(NAMES), len(xy))]
    with_hole = Polygon(
        [(100, 100), (200, 100), (200, 200), (100, 200)],
        holes=[[(140, 140), (160, 140), (160, 160), (140, 160)]],
    )
    triangle = Polygon([(250, 250), (350, 250), (250, 350)])  # (300, 300) is on its hypotenuse
    multi = shapely.MultiPolygon([box(0, 300, 50, 400), box(350, 0, 400, 60)])
    regions = regions_from(
        [
            Region(with_hole, "Tumor", "Tumor", "a"),
            Region(triangle, None, "Stroma", "b"),
            Region(multi, None, "Stroma", "c"),
        ]
    )
    return nuclei(xy, classes), regions


def independent_members(table: pd.DataFrame, geom: shapely.Geometry) -> set[int]:
    """Plain per-point loop: QuPath's rule (the region covers the centroid)."""
    return {
        i
        for i, (x, y) in enumerate(zip(table["centroid_x"], table["centroid_y"], strict=True))
        if geom.covers(Point(x, y))
    }


def test_centroid_rule_equals_an_independent_count_with_borders_and_holes(scene) -> None:
    table, regions = scene
    members = assign_nuclei(table, [r.geometry for r in regions], "centroid")
    for r, idx in zip(regions, members, strict=True):
        assert set(idx.tolist()) == independent_members(table, r.geometry)
    hole_region = regions[0].geometry
    on_outer = 600  # (100, 150) on the outer edge: counted
    on_hole_edge = (
        602  # (150, 160) on the hole's edge: covered (the hole's boundary is the region's)
    )
    in_hole = [
        i
        for i, (x, y) in enumerate(zip(table["centroid_x"], table["centroid_y"], strict=True))
        if 140 < x < 160 and 140 < y < 160
    ]
    assert on_outer in members[0] and on_hole_edge in members[0]
    assert in_hole and not set(in_hole) & set(members[0].tolist())
    assert 604 in members[1]  # on the triangle's hypotenuse
    assert hole_region.covers(Point(150, 160))

    tidy = composition_table(table, regions, NAMES, slide="s1", mpp=0.5)
    assert list(tidy.columns) == list(TIDY_COLUMNS)
    for r in regions:
        idx = independent_members(table, r.geometry)
        expect = table.loc[sorted(idx), "class_name"].value_counts()
        got = tidy[tidy["region"] == r.label].set_index("class")["count"]
        for name in NAMES:
            assert got[name] == expect.get(name, 0)
        sub = tidy[tidy["region"] == r.label]
        assert sub["proportion"].sum() == pytest.approx(1.0)
        area_mm2 = r.geometry.area * 0.25 / 1e6
        assert sub["area_mm2"].iloc[0] == pytest.approx(area_mm2)
        np.testing.assert_allclose(sub["density_per_mm2"], sub["count"] / area_mm2)
    # unnamed regions are labelled by class and made unique
    assert [r.label for r in regions] == ["Tumor", "Stroma", "Stroma #2"]


def test_any_pixel_rule_counts_a_nucleus_straddling_the_border() -> None:
    region = box(0, 0, 100, 100)
    # centroid 2 px outside the right edge, outline (half-size 3) reaching 1 px inside
    table = nuclei(np.array([[102.0, 50.0], [50.0, 50.0], [110.0, 50.0]]), ["lymphocyte"] * 3)
    centroid = assign_nuclei(table, [region], "centroid")[0]
    anypix = assign_nuclei(table, [region], "any-pixel")[0]
    assert centroid.tolist() == [1]
    assert anypix.tolist() == [0, 1]
    tidy = composition_table(
        table, [CompositionRegion("r", region)], NAMES, slide="s", mpp=1.0, rule="any-pixel"
    )
    assert tidy.loc[tidy["class"] == "lymphocyte", "count"].item() == 2


def test_whole_region_counts_everything_and_ratios_follow_the_scheme() -> None:
    xy = np.array([[1.0, 1.0], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]])
    classes = ["lymphocyte", "lymphocyte", "plasma", "epithelial", "epithelial", "connective"]
    table = nuclei(xy, classes)
    tidy = composition_table(table, [whole_region(4e6)], NAMES, slide="s", mpp=0.5)
    assert tidy["count"].sum() == 6 and set(tidy["region"]) == {"all"}
    assert tidy["area_mm2"].iloc[0] == pytest.approx(1.0)  # 4e6 px * 0.25 um^2 = 1 mm^2
    summary = summary_table(tidy, NAMES)
    row = summary.iloc[0]
    assert row["total"] == 6 and row["density_per_mm2"] == pytest.approx(6.0)
    assert row["lymphocyte/epithelial"] == pytest.approx(2 / 2)
    assert row["(lymphocyte+plasma)/all"] == pytest.approx(3 / 6)
    assert "inflammatory/epithelial" not in summary.columns
    assert row["count_plasma"] == 1 and row["proportion_epithelial"] == pytest.approx(2 / 6)

    consep = [r.name for r in applicable_ratios(CONSEP.names)]
    assert consep == ["inflammatory/epithelial", "inflammatory/all"]
    assert "lymphocyte/epithelial" in [r.name for r in applicable_ratios(NAMES, DEFAULT_RATIOS)]
    assert math.isnan(ratio("x", ["a"], ["b"]).value({"a": 3, "b": 0}))
    # an empty region: proportions and ratios are NaN, counts 0
    empty = composition_table(
        table, [CompositionRegion("far", box(500, 500, 600, 600))], NAMES, slide="s", mpp=0.5
    )
    assert empty["count"].sum() == 0 and empty["proportion"].isna().all()
    assert math.isnan(summary_table(empty, NAMES).iloc[0]["lymphocyte/epithelial"])


def test_bad_inputs_are_one_line_errors() -> None:
    table = nuclei(np.array([[1.0, 1.0]]), ["martian"])
    with pytest.raises(ConicQPError, match="not in the model's classes"):
        composition_table(table, [whole_region(1.0)], NAMES, slide="s", mpp=0.5)
    with pytest.raises(ConicQPError, match="unknown membership rule"):
        assign_nuclei(table, [box(0, 0, 1, 1)], "majority")  # type: ignore[arg-type]
    with pytest.raises(ConicQPError, match="positive"):
        composition_table(table, [], NAMES, slide="s", mpp=0.0)


def test_cohort_from_a_folder_of_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pred = tmp_path / "pred"
    pred.mkdir()
    regions_dir = tmp_path / "regions"
    regions_dir.mkdir()
    for k, name in enumerate(["slideA", "slideB"]):
        xy = rng.uniform(0, 200, size=(50 + 10 * k, 2))
        table = nuclei(xy, [NAMES[i] for i in rng.integers(0, 6, len(xy))])
        write_table(table, pred / f"{name}.nuclei.parquet", classes=CONIC, mpp=0.5)
        (pred / f"{name}.run.json").write_text(
            json.dumps({"slide": {"dimensions": [200, 100]}, "roi": None})
        )
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": shapely.geometry.mapping(box(0, 0, 100, 100)),
                "properties": {"objectType": "annotation", "name": "left"},
            }
        ],
    }
    (regions_dir / "slideA.geojson").write_text(json.dumps(fc))
    slides, missing = load_cohort(pred, regions_geojson=regions_dir)
    assert not missing and [s.slide for s in slides] == ["slideA", "slideB"]
    assert [r.label for r in slides[0].regions] == ["left"]
    assert [r.label for r in slides[1].regions] == ["all"]
    assert slides[1].regions[0].area == 200 * 100  # no ROI, no tissue record: the image
    tidy, summary, scheme, failures = compose_cohort(slides)
    assert not failures and scheme is not None and scheme.names == NAMES
    assert len(tidy) == 2 * len(NAMES) and len(summary) == 2
    assert summary.loc[summary["slide"] == "slideB", "total"].item() == 60
    paths = write_composition(tidy, summary, tmp_path / "out" / "table.csv")
    back = pd.read_csv(paths["tidy_csv"])
    assert list(back.columns) == list(TIDY_COLUMNS) and back["count"].sum() == tidy["count"].sum()
    pd.testing.assert_frame_equal(pd.read_parquet(paths["tidy_parquet"]), tidy)
    assert len(pd.read_csv(paths["summary_csv"])) == 2
    with pytest.raises(ConicQPError, match=r"\.csv"):
        write_composition(tidy, summary, tmp_path / "table.xlsx")
    with pytest.raises(ConicQPError, match=r"no .*nuclei\.parquet"):
        load_cohort(regions_dir)


def test_centroid_rule_uses_the_outline_centroid_qupath_computes() -> None:
    # an L-shaped nucleus: its mask centroid (table columns) and its outline's centroid differ
    ell = Polygon([(0, 0), (12, 0), (12, 3), (3, 3), (3, 12), (0, 12)])
    offset = np.array([[100.0, 100.0], [200.0, 100.0]])
    polys = [shapely.affinity.translate(ell, x, y) for x, y in offset]
    table = pd.DataFrame(
        {
            "id": ["a", "b"],
            "centroid_x": offset[:, 0] + 6.0,  # deliberately not the outline's centroid
            "centroid_y": offset[:, 1] + 6.0,
            "class_name": [NAMES[0], NAMES[1]],
            "polygon_wkb": [shapely.to_wkb(p) for p in polys],
        }
    )
    from conic_qp.regions import qupath_centroids

    cx, cy = qupath_centroids(table)
    want = np.array([[p.centroid.x, p.centroid.y] for p in polys])
    np.testing.assert_allclose(np.column_stack([cx, cy]), want, atol=1e-4)
    # a region holding (x+6, y+6) but not the outline's centroid (about x+3.7, y+3.7)
    region = box(104.5, 104.5, 120, 120)
    assert region.covers(Point(106, 106)) and not region.covers(polys[0].centroid)
    (members,) = assign_nuclei(table, [region])
    assert members.tolist() == []
    (members,) = assign_nuclei(table, [box(100, 100, 104.5, 104.5)])
    assert members.tolist() == [0]
    # without outlines the table's centroids are used
    (members,) = assign_nuclei(table.drop(columns="polygon_wkb"), [region])
    assert members.tolist() == [0]


def test_parent_regions_follow_qupaths_smallest_containing_annotation() -> None:
    from conic_qp.regions import parent_regions

    outer = box(0, 0, 100, 100)
    inner = box(20, 20, 40, 40)
    a = box(200, 0, 260, 60)  # a and b overlap without nesting
    b = box(240, 0, 280, 40)
    holed = Polygon(
        [(400, 0), (500, 0), (500, 100), (400, 100)], holes=[box(440, 40, 460, 60).exterior.coords]
    )
    xy = np.array(
        [[30, 30], [70, 70], [250, 20], [210, 50], [270, 30], [450, 50], [420, 20], [150, 150],
         [100, 50]]  # last: on outer's border (covers)
    )  # fmt: skip
    table = nuclei(xy.astype(float), [NAMES[0]] * len(xy))
    regions = [outer, inner, a, b, holed]
    parent = parent_regions(table, regions)
    assert parent.tolist() == [1, 0, 3, 2, 3, -1, 4, -1, 0]
    assert (parent_regions(table, []) == -1).all()
    assert parent_regions(table, [None, inner]).tolist() == [1] + [-1] * 8
    # QuPath counts a detection under every ancestor annotation: with nesting, those counts equal
    # the centroid rule's; only the partial overlap of a and b differs (QuPath: one parent)
    members = assign_nuclei(table, regions)
    descendants = {0: {0, 1}, 1: {1}, 2: {2}, 3: {3}, 4: {4}}  # annotation tree: inner in outer
    for k, idx in enumerate(members):
        qupath = int(np.isin(parent, list(descendants[k])).sum())
        if k == 2:
            assert qupath == len(idx) - 1  # (250, 20) lies in a and b: QuPath gives it to b
        else:
            assert qupath == len(idx)
