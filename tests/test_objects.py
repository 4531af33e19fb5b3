"""Nucleus tables from literal instance maps: geometry, coordinates, ids, schema."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
import shapely
from skimage.draw import ellipse
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours, regionprops

from conic_qp.classes import CONIC, CONSEP
from conic_qp.errors import ConicQPError
from conic_qp.objects import (
    NUCLEUS_NAMESPACE,
    concat_tables,
    instances_to_table,
    nucleus_id,
    nucleus_ids,
    outline_polygons,
    table_schema,
)
from conic_qp.postprocess import Instances


def _dtypes_match(t: pd.DataFrame, schema: dict[str, str]) -> bool:
    return all(t[c].dtype == pd.Series([], dtype=d).dtype for c, d in schema.items())


def _instances() -> Instances:
    labels = np.zeros((40, 48), np.int32)
    labels[2:12, 3:13] = 1  # 10 x 10 square, centroid (r, c) = (6.5, 7.5)
    labels[20:26, 30:42] = 2  # 6 x 12 rectangle
    probs = np.array(
        [[0.1, 0.6, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.7, 0.1, 0.05, 0.05]], np.float32
    )
    return Instances(labels, np.array([2, 3]), probs)


def test_table_columns_values_and_dtypes() -> None:
    t = instances_to_table(
        _instances(), CONIC, origin_xy=(0, 0), scale=1, mpp_level0=0.5, image_id="s"
    )
    assert list(t.columns) == list(table_schema(CONIC))
    assert _dtypes_match(t, table_schema(CONIC))
    assert t["class_name"].tolist() == ["epithelial", "lymphocyte"]
    assert t["class_id"].tolist() == [2, 3]
    np.testing.assert_allclose(t["class_prob"], [0.6, 0.7], rtol=1e-6)
    np.testing.assert_allclose(t["prob_lymphocyte"], [0.1, 0.7], rtol=1e-6)
    np.testing.assert_allclose(t["mask_area_px"], [100, 72])
    # the outline runs through the pixel-edge midpoints: each corner cuts 1/8 px^2
    np.testing.assert_allclose(t["area_px"], [99.5, 71.5])
    np.testing.assert_allclose(t["area_um2"], [99.5 / 4, 71.5 / 4])
    # pixel (r, c) covers [c, c+1) x [r, r+1): centroid of the square at (8.0, 7.0)
    np.testing.assert_allclose(t[["centroid_x", "centroid_y"]].iloc[0], [8.0, 7.0])
    np.testing.assert_allclose(t["solidity"], [1, 1], atol=1e-6)
    assert t["eccentricity"].iloc[0] == pytest.approx(0, abs=1e-6)
    assert 0.8 < t["eccentricity"].iloc[1] < 1
    # 10 px square: four 9 px sides and four cut corners of sqrt(2)/2 px, at 0.5 um/px
    perimeter_px = 36 + 2 * np.sqrt(2)
    assert t["perimeter_um"].iloc[0] == pytest.approx(perimeter_px / 2)
    assert t["circularity"].iloc[0] == pytest.approx(4 * np.pi * 99.5 / perimeter_px**2, rel=1e-6)
    # calipers of the square: 10 px wide; longest between opposite cut corners, 9.5 and 10 apart
    assert t["min_caliper_um"].iloc[0] == pytest.approx(5.0)
    assert t["max_caliper_um"].iloc[0] == pytest.approx(np.hypot(9, 10) / 2)
    assert t["min_caliper_um"].iloc[1] == pytest.approx(3.0)


def test_polygon_area_matches_pixels_and_is_valid() -> None:
    t = instances_to_table(_instances(), CONIC, mpp_level0=0.5, image_id="s")
    polys = shapely.from_wkb(t["polygon_wkb"].to_numpy())
    assert all(p.is_valid and isinstance(p, shapely.Polygon) for p in polys)
    areas = shapely.area(polys)
    np.testing.assert_allclose(areas, t["area_px"], rtol=1e-12)
    np.testing.assert_allclose(areas, t["mask_area_px"], rtol=0.02)
    # the square's outline lies on its pixel edges
    assert polys[0].bounds == pytest.approx((3, 2, 13, 12))
    assert all(
        p.contains(shapely.Point(x, y))
        for p, x, y in zip(polys, t.centroid_x, t.centroid_y, strict=True)
    )


def test_scale_and_origin_map_to_level0() -> None:
    base = instances_to_table(_instances(), CONIC, mpp_level0=0.25, image_id="s")
    t = instances_to_table(
        _instances(), CONIC, origin_xy=(1000, 500), scale=2.0, mpp_level0=0.25, image_id="s"
    )
    np.testing.assert_allclose(t["centroid_x"], 1000 + 2 * base["centroid_x"])
    np.testing.assert_allclose(t["centroid_y"], 500 + 2 * base["centroid_y"])
    np.testing.assert_allclose(t["area_px"], 4 * base["area_px"])
    np.testing.assert_allclose(t["mask_area_px"], 4 * base["mask_area_px"])
    # um^2 at level 0: 100 region px = 400 level-0 px = 25 um^2 at 0.25 um/px (mask); the
    # outline is 99.5 region px
    assert t["mask_area_px"].iloc[0] * 0.25**2 == pytest.approx(25)
    assert t["area_um2"].iloc[0] == pytest.approx(99.5 * 4 * 0.25**2)
    np.testing.assert_allclose(t["perimeter_um"], 2 * base["perimeter_um"])
    np.testing.assert_allclose(t["max_caliper_um"], 2 * base["max_caliper_um"])
    np.testing.assert_allclose(t["circularity"], base["circularity"], rtol=1e-6)
    p = shapely.from_wkb(t["polygon_wkb"].iloc[0])
    assert p.bounds == pytest.approx((1006, 504, 1026, 524))
    assert t["solidity"].tolist() == base["solidity"].tolist()


def test_ids_are_stable_uuids_and_differ_between_images() -> None:
    a1 = instances_to_table(_instances(), CONIC, mpp_level0=0.5, image_id="slide-a")
    a2 = instances_to_table(_instances(), CONIC, mpp_level0=0.5, image_id="slide-a")
    b = instances_to_table(_instances(), CONIC, mpp_level0=0.5, image_id="slide-b")
    assert a1["id"].tolist() == a2["id"].tolist()
    assert set(a1["id"]).isdisjoint(b["id"])
    assert a1["id"].is_unique
    for i in a1["id"]:
        assert uuid.UUID(i).version == 5


def test_empty_instances_give_typed_empty_table() -> None:
    empty = Instances(
        np.zeros((16, 16), np.int32), np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    )
    t = instances_to_table(empty, CONSEP, mpp_level0=0.5, image_id="x")
    assert len(t) == 0
    assert _dtypes_match(t, table_schema(CONSEP))
    assert "prob_spindle" in t.columns


def test_concat_keeps_schema_and_drops_duplicate_ids() -> None:
    a = instances_to_table(_instances(), CONIC, mpp_level0=0.5, image_id="s")
    b = instances_to_table(_instances(), CONIC, origin_xy=(100, 0), mpp_level0=0.5, image_id="s")
    out = concat_tables([a, b, a.iloc[:0], a.iloc[:1]], CONIC)
    assert len(out) == 4
    assert out["id"].is_unique
    assert list(out.columns) == list(table_schema(CONIC))
    assert _dtypes_match(out, table_schema(CONIC))
    assert len(concat_tables([], CONIC)) == 0


def test_bad_inputs_raise_one_line_errors() -> None:
    inst = _instances()
    with pytest.raises(ConicQPError, match="mpp"):
        instances_to_table(inst, CONIC, mpp_level0=0.0, image_id="s")
    with pytest.raises(ConicQPError, match="scale"):
        instances_to_table(inst, CONIC, scale=-1, mpp_level0=0.5, image_id="s")
    bad = Instances(inst.labels, np.array([2, 9]), inst.probs)
    with pytest.raises(ConicQPError, match="classes must be"):
        instances_to_table(bad, CONIC, mpp_level0=0.5, image_id="s")
    with pytest.raises(ConicQPError):
        concat_tables([pd.DataFrame({"id": ["x"]})], CONIC)


def test_instance_touching_the_region_border_is_closed() -> None:
    labels = np.zeros((8, 8), np.int32)
    labels[0:4, 0:8] = 1
    inst = Instances(labels, np.array([1]), np.full((1, 6), 1 / 6, np.float32))
    t = instances_to_table(inst, CONIC, mpp_level0=0.5, image_id="s")
    p = shapely.from_wkb(t["polygon_wkb"].iloc[0])
    assert p.is_valid and p.area == pytest.approx(32, rel=0.02)
    assert p.bounds == pytest.approx((0, 0, 8, 4))


# ------------------------------------------------------------- outlines and measurements


def _ragged_labels(seed: int, holes: float) -> np.ndarray:
    """Touching, ragged ellipses: instances with holes, diagonal-only parts, border contact."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((70, 80), np.int32)
    for k in range(1, 36):
        r, c = rng.integers(-4, 74, 2)
        rr, cc = ellipse(
            r,
            c,
            rng.uniform(0.5, 9),
            rng.uniform(0.5, 9),
            rotation=rng.uniform(0, 3),
            shape=lab.shape,
        )
        lab[rr, cc] = k
    lab[rng.random(lab.shape) < holes] = 0
    return lab


def _reference_outline(labels: np.ndarray, label: int) -> shapely.Polygon:
    """find_contours at 0.5 on the instance's padded mask, the contour enclosing most area."""
    mask = np.pad(labels == label, 1)
    contours = find_contours(mask.astype(np.float32), 0.5)
    ring = max(contours, key=lambda c: shapely.Polygon(c).area)
    return shapely.Polygon(ring[:, ::-1] - 0.5)  # (row, col) of the padded mask -> (x, y)


@pytest.mark.parametrize("seed,holes", [(0, 0.0), (1, 0.05), (2, 0.12)])
def test_outlines_are_the_marching_squares_contours(seed: int, holes: float) -> None:
    lab = _ragged_labels(seed, holes)
    present = np.unique(lab)[1:]
    raw = outline_polygons(lab, present, simplify=0.0)
    simplified = outline_polygons(lab, present, simplify=0.25)
    assert raw.size == simplified.size == present.size
    for label, poly, simple in zip(present.tolist(), raw, simplified, strict=True):
        ref = _reference_outline(lab, label)
        # the traced outline is find_contours' contour (collinear vertices dropped)
        assert poly.equals(ref), label
        # simplification moves the outline by less than the tolerance
        assert shapely.hausdorff_distance(simple, ref) <= 0.25 + 1e-9
        assert simple.is_valid and not simple.is_empty


def test_pixel_counts_and_centroids_are_exact() -> None:
    lab = _ragged_labels(4, 0.08)
    t = instances_to_table(
        Instances(lab, np.ones(lab.max(), np.int64), np.full((lab.max(), 6), 1 / 6, np.float32)),
        CONIC,
        mpp_level0=0.5,
        image_id="s",
    )
    present = np.unique(lab)[1:]
    rr, cc = np.nonzero(lab)
    count = np.bincount(lab[rr, cc])[present]
    np.testing.assert_array_equal(t["mask_area_px"], count)
    # bit-identical to the pixel means: ids (from the centroid) stay stable across versions
    cx = np.bincount(lab[rr, cc], cc.astype(np.float64))[present] / count + 0.5
    cy = np.bincount(lab[rr, cc], rr.astype(np.float64))[present] / count + 0.5
    np.testing.assert_array_equal(t["centroid_x"], cx)
    np.testing.assert_array_equal(t["centroid_y"], cy)
    assert t["id"].tolist() == [
        str(uuid.uuid5(NUCLEUS_NAMESPACE, f"s:{x:.2f}:{y:.2f}"))
        for x, y in zip(cx, cy, strict=True)
    ]


def test_measurements_are_those_of_the_written_polygon() -> None:
    """QuPath-style measurements computed one polygon at a time, independently."""
    lab = _ragged_labels(5, 0.03)
    inst = Instances(lab, np.ones(lab.max(), np.int64), np.full((lab.max(), 6), 1 / 6, np.float32))
    mpp = 0.2462
    t = instances_to_table(
        inst, CONIC, origin_xy=(12345.678, 54321.5), scale=2.03, mpp_level0=mpp, image_id="s"
    )
    polys = shapely.from_wkb(t["polygon_wkb"].to_numpy())
    for row, poly in zip(t.itertuples(), polys, strict=True):
        xy = np.asarray(poly.exterior.coords)
        # coordinates are rounded as the GeoJSON writes them
        np.testing.assert_array_equal(xy, np.round(xy, 2))
        area, length = poly.area, poly.length
        assert row.area_um2 == pytest.approx(area * mpp**2, rel=1e-12)
        assert row.perimeter_um == pytest.approx(length * mpp, rel=1e-12)
        assert row.solidity == pytest.approx(area / poly.convex_hull.area, rel=1e-6)
        assert row.circularity == pytest.approx(4 * np.pi * area / length**2, rel=1e-6)
        pairwise = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
        assert row.max_caliper_um == pytest.approx(pairwise.max() * mpp, rel=1e-9)
        angles = np.deg2rad(np.arange(0.0, 180.0, 0.01))
        proj = xy @ np.stack([np.cos(angles), np.sin(angles)])
        width = (proj.max(axis=0) - proj.min(axis=0)).min()
        assert row.min_caliper_um <= width * mpp + 1e-9
        assert row.min_caliper_um == pytest.approx(width * mpp, rel=1e-3)


def test_eccentricity_is_that_of_the_outline_region() -> None:
    """Polygon moments against regionprops of the outline rasterised 16x finer."""
    lab = _ragged_labels(6, 0.0)
    inst = Instances(lab, np.ones(lab.max(), np.int64), np.full((lab.max(), 6), 1 / 6, np.float32))
    t = instances_to_table(inst, CONIC, mpp_level0=0.5, image_id="s")
    polys = shapely.from_wkb(t["polygon_wkb"].to_numpy())
    checked = 0
    for ecc, poly in zip(t["eccentricity"], polys, strict=True):
        if poly.area < 20:
            continue
        xy = np.asarray(poly.exterior.coords) * 16
        rr, cc = draw_polygon(xy[:, 1], xy[:, 0])
        fine = np.zeros((rr.max() + 1, cc.max() + 1), np.uint8)
        fine[rr, cc] = 1
        assert ecc == pytest.approx(regionprops(fine)[0].eccentricity, abs=0.01)
        checked += 1
    assert checked > 10


def test_nucleus_ids_match_uuid5() -> None:
    x = np.array([0.0, 1.005, 12345.675, 99999.999])
    y = np.array([3.0, 2.5, 0.125, 7.0])
    expected = [nucleus_id("slide:a", float(a), float(b)) for a, b in zip(x, y, strict=True)]
    assert nucleus_ids("slide:a", x, y) == expected
    assert all(uuid.UUID(i).version == 5 for i in expected)
