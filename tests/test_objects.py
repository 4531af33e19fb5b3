"""Nucleus tables from literal instance maps: geometry, coordinates, ids, schema."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
import shapely

from conic_qp.classes import CONIC, CONSEP
from conic_qp.errors import ConicQPError
from conic_qp.objects import concat_tables, instances_to_table, table_schema
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
    np.testing.assert_allclose(t["area_px"], [100, 72])
    np.testing.assert_allclose(t["area_um2"], [25, 18])
    # pixel (r, c) covers [c, c+1) x [r, r+1): centroid of the square at (8.0, 7.0)
    np.testing.assert_allclose(t[["centroid_x", "centroid_y"]].iloc[0], [8.0, 7.0])
    np.testing.assert_allclose(t["solidity"], [1, 1], atol=1e-6)
    assert t["eccentricity"].iloc[0] == pytest.approx(0, abs=1e-6)
    assert 0.8 < t["eccentricity"].iloc[1] < 1
    # perimeter of a 10 px square at 0.5 um/px: 20 um minus the cut corners
    assert 18.5 < t["perimeter_um"].iloc[0] <= 20


def test_polygon_area_matches_pixels_and_is_valid() -> None:
    t = instances_to_table(_instances(), CONIC, mpp_level0=0.5, image_id="s")
    polys = shapely.from_wkb(t["polygon_wkb"].to_numpy())
    assert all(p.is_valid and isinstance(p, shapely.Polygon) for p in polys)
    areas = shapely.area(polys)
    np.testing.assert_allclose(areas, t["area_px"], rtol=0.02)
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
    # um^2 at level 0: 100 region px = 400 level-0 px = 25 um^2 at 0.25 um/px
    assert t["area_um2"].iloc[0] == pytest.approx(25)
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
