"""QuPath GeoJSON writer/reader against the rules QuPath 0.5.1 enforces, and Parquet tables."""

from __future__ import annotations

import gzip
import json
import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from conic_qp.classes import CONIC
from conic_qp.errors import ConicQPError
from conic_qp.objects import instances_to_table
from conic_qp.postprocess import Instances
from conic_qp.sinks import atomic_open
from conic_qp.sinks import geojson as gj
from conic_qp.sinks.geojson import MARKER, read_geojson, read_regions, write_geojson
from conic_qp.sinks.tables import read_table, write_table


@pytest.fixture
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64), np.int32)
    boxes = [(2, 2, 10, 12), (20, 5, 30, 14), (40, 40, 52, 50), (5, 40, 13, 47)]
    for k, (r0, c0, r1, c1) in enumerate(boxes, start=1):
        labels[r0:r1, c0:c1] = k
    probs = rng.dirichlet(np.ones(6), size=4).astype(np.float32)
    probs[0] = np.nan  # must never reach QuPath as NaN
    classes = np.array([1, 2, 3, 6])
    return instances_to_table(
        Instances(labels, classes, probs),
        CONIC,
        origin_xy=(1000.123, 2000.456),
        scale=2.0,
        mpp_level0=0.2527,
        image_id="slide-1",
    )


def _check_ring(ring: list[list[float]]) -> None:
    assert len(ring) >= 4
    assert ring[0] == ring[-1], "ring not closed"
    for x, y in ring:
        assert isinstance(x, int | float) and isinstance(y, int | float)
        assert round(x, 2) == x and round(y, 2) == y, "more than 2 decimals"


def _check_feature(f: dict, object_type: str) -> None:
    assert f["type"] == "Feature"
    uuid.UUID(f["id"])  # QuPath silently replaces non-UUID ids
    props = f["properties"]
    assert props["objectType"] == object_type
    assert "nucleusGeometry" not in props
    cls = props["classification"]
    assert isinstance(cls["name"], str)
    assert len(cls["color"]) == 3 and all(
        isinstance(v, int) and 0 <= v <= 255 for v in cls["color"]
    )
    meas = props["measurements"]
    assert meas[MARKER] == gj.MARKER_VERSION
    for key, value in meas.items():
        assert type(value) is float, f"measurement {key} is {type(value).__name__}"
        assert np.isfinite(value)
    assert f["geometry"]["type"] == "Polygon"
    for ring in f["geometry"]["coordinates"]:
        _check_ring(ring)


@pytest.mark.parametrize("name", ["nuclei.geojson", "nuclei.geojson.gz"])
def test_detection_geojson_follows_qupath_rules(
    table: pd.DataFrame, tmp_path: Path, name: str
) -> None:
    path = write_geojson(table, tmp_path / name, CONIC)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    text = gzip.decompress(raw).decode() if name.endswith(".gz") else raw.decode()
    doc = json.loads(text)
    assert doc["type"] == "FeatureCollection"
    assert len(doc["features"]) == len(table)
    for f, (_, row) in zip(doc["features"], table.iterrows(), strict=True):
        _check_feature(f, "detection")
        assert f["id"] == row["id"]
        assert f["properties"]["classification"]["name"] == row["class_name"]
        assert f["properties"]["classification"]["color"] == list(
            CONIC.by_name(row["class_name"]).color
        )
    m = doc["features"][1]["properties"]["measurements"]
    assert m["Class probability"] == pytest.approx(table["class_prob"].iloc[1], rel=1e-6)
    assert m["Nucleus: Area µm^2"] == pytest.approx(table["area_um2"].iloc[1])
    assert set(f"Probability: {n}" for n in CONIC.names) <= set(m)
    # NaN probabilities of the first nucleus are left out, not written as NaN/"NaN"
    assert "Class probability" not in doc["features"][0]["properties"]["measurements"]
    assert "NaN" not in text and "isLocked" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "temporary file left behind"


def test_cell_geojson_puts_nucleus_geometry_beside_geometry(
    table: pd.DataFrame, tmp_path: Path
) -> None:
    doc = json.loads(
        write_geojson(table, tmp_path / "c.geojson", CONIC, object_type="cell").read_text()
    )
    for f in doc["features"]:
        _check_feature(f, "cell")
        assert f["nucleusGeometry"] == f["geometry"]
    doc = json.loads(
        write_geojson(
            table, tmp_path / "d.geojson", CONIC, object_type="cell", cell_expansion=3.0
        ).read_text()
    )
    for f in doc["features"]:
        cell = shapely.geometry.shape(f["geometry"])
        nucleus = shapely.geometry.shape(f["nucleusGeometry"])
        assert cell.area > nucleus.area and cell.buffer(0.01).contains(nucleus)
        for ring in f["nucleusGeometry"]["coordinates"]:
            _check_ring(ring)


def test_round_trip_geometry_and_ids(table: pd.DataFrame, tmp_path: Path) -> None:
    feats = read_geojson(write_geojson(table, tmp_path / "n.geojson.gz", CONIC))
    assert [f["id"] for f in feats] == table["id"].tolist()
    for f, wkb in zip(feats, table["polygon_wkb"], strict=True):
        a, b = shapely.geometry.shape(f["geometry"]), shapely.from_wkb(wkb)
        assert a.symmetric_difference(b).area < 0.01 * b.area


@pytest.mark.shared_data
def test_qupath_written_files_are_read(shared_data: Path) -> None:
    base = shared_data / "qupath" / "geojson"
    if not base.is_dir():
        pytest.skip("no shared QuPath GeoJSON examples")
    assert len(read_geojson(base / "qupath051_written_cell.geojson")) == 1
    assert len(read_geojson(base / "qupath051_written_detection_noFC.json")) == 2
    assert len(read_geojson(base / "08_cell_min_fc.geojson.gz")) == 1
    assert len(read_geojson(base / "03_class_without_color.geojson")) == 1  # single Feature


def test_failed_write_keeps_previous_file(table: pd.DataFrame, tmp_path: Path) -> None:
    path = write_geojson(table, tmp_path / "n.geojson", CONIC)
    before = path.read_bytes()
    bad = table.copy()
    bad.loc[2, "polygon_wkb"] = b"not wkb"
    with pytest.raises(Exception):  # noqa: B017 - any failure mid-write
        write_geojson(bad, path, CONIC)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["n.geojson"]
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "n.geojson") as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == before


def test_unknown_class_and_bad_object_type_rejected(table: pd.DataFrame, tmp_path: Path) -> None:
    t = table.copy()
    t.loc[0, "class_name"] = "tumour"
    with pytest.raises(ConicQPError, match="tumour"):
        write_geojson(t, tmp_path / "x.geojson", CONIC)
    with pytest.raises(ConicQPError, match="object_type"):
        write_geojson(table, tmp_path / "x.geojson", CONIC, object_type="annotation")  # type: ignore[arg-type]
    assert not (tmp_path / "x.geojson").exists()


def test_empty_table_writes_empty_collection(table: pd.DataFrame, tmp_path: Path) -> None:
    doc = json.loads(write_geojson(table.iloc[:0], tmp_path / "e.geojson", CONIC).read_text())
    assert doc == {"type": "FeatureCollection", "features": []}


def test_read_regions_variants(tmp_path: Path) -> None:
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]  # self-intersecting, hand drawn
    feats = [
        {
            "type": "Feature",
            "id": "a",
            "geometry": {"type": "Polygon", "coordinates": [square, hole]},
            "properties": {
                "objectType": "annotation",
                "name": "tumour core",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            },
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[square], [[[200, 0], [210, 0], [210, 10], [200, 0]]]],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [bowtie]},
            "properties": {},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"objectType": "detection"},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]
    fc = tmp_path / "fc.geojson"
    fc.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    regions = read_regions(fc)
    assert len(regions) == 3
    assert regions[0].name == "tumour core" and regions[0].class_name == "Tumor"
    assert regions[0].geometry.area == pytest.approx(100 * 100 - 20 * 20)
    assert not regions[0].geometry.contains(shapely.Point(50, 50))
    assert regions[1].class_name == "Tumor: Positive"
    assert isinstance(regions[1].geometry, shapely.MultiPolygon)
    assert regions[2].geometry.is_valid and regions[2].geometry.area == pytest.approx(50)
    # bare list, single Feature, gzip
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(feats[:1]))
    one = tmp_path / "one.geojson"
    one.write_text(json.dumps(feats[0]))
    gz = tmp_path / "fc.geojson.gz"
    gz.write_bytes(gzip.compress(fc.read_bytes()))
    assert len(read_regions(lst)) == len(read_regions(one)) == 1
    assert len(read_regions(gz)) == 3


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "cannot read"),
        (b'{"type": "Topology"}', "not GeoJSON"),
        (b'{"type": "FeatureCollection"}', "features"),
        (b"\x1f\x8b\x08garbage", "cannot read"),
    ],
)
def test_malformed_geojson_is_a_one_line_error(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.geojson"
    p.write_bytes(content)
    with pytest.raises(ConicQPError, match=match) as err:
        read_regions(p)
    assert "\n" not in str(err.value)
    with pytest.raises(ConicQPError, match="does not exist"):
        read_geojson(tmp_path / "missing.geojson")


def test_parquet_round_trip_with_metadata(table: pd.DataFrame, tmp_path: Path) -> None:
    path = write_table(table, tmp_path / "t.parquet", classes=CONIC, mpp=0.2527, model="conic-b5@1")
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]
    back = read_table(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["polygon_wkb"].iloc[0] == table["polygon_wkb"].iloc[0]
    assert back.attrs["conic_qp"]["mpp"] == pytest.approx(0.2527)
    assert back.attrs["conic_qp"]["model"] == "conic-b5@1"
    assert back.attrs["classes"] == CONIC
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 nope")
    with pytest.raises(ConicQPError, match="Parquet"):
        read_table(bad)


def test_geojson_coordinates_text_has_at_most_two_decimals(
    table: pd.DataFrame, tmp_path: Path
) -> None:
    text = write_geojson(table, tmp_path / "n.geojson", CONIC).read_text()
    coords = re.findall(r"\[(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)\]", text)
    assert coords
    assert all(len(v.split(".")[1]) <= 2 for pair in coords for v in pair if "." in v)


def test_atomic_writes_keep_the_replaced_files_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from conic_qp.sinks import write_json_atomic

    user_file = tmp_path / "classes.json"
    user_file.write_text("{}")
    os.chmod(user_file, 0o640)
    write_json_atomic(user_file, {"pathClasses": []})
    assert stat.S_IMODE(user_file.stat().st_mode) == 0o640
    new_file = tmp_path / "new.json"
    write_json_atomic(new_file, {})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new_file.stat().st_mode) == 0o666 & ~umask


def test_write_geojson_of_table_batches_equals_the_whole_table(tmp_path: Path) -> None:
    inst = np.zeros((40, 40), np.int32)
    for k, (r, c) in enumerate([(5, 5), (5, 25), (25, 5), (25, 25)], start=1):
        inst[r : r + 8, c : c + 8] = k
    table = instances_to_table(
        Instances(inst, np.array([1, 2, 3, 1]), np.full((4, 6), 1 / 6, np.float32)),
        CONIC,
        mpp_level0=0.5,
        image_id="s",
    )
    whole = write_geojson(table, tmp_path / "whole.geojson", CONIC)
    parts = write_geojson(
        (table.iloc[i : i + 3] for i in range(0, len(table), 3)), tmp_path / "parts.geojson", CONIC
    )
    assert json.loads(parts.read_text()) == json.loads(whole.read_text())
    assert len(json.loads(parts.read_text())["features"]) == 4


# ------------------------------------------------------------------- annotations, folders


def _read_fc(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        fc = json.load(fh)
    assert fc["type"] == "FeatureCollection"
    return fc["features"]


def test_annotations_follow_qupath_rules_and_keep_ids(tmp_path: Path) -> None:
    keep = str(uuid.uuid4())
    regions = [
        gj.Region(shapely.box(0, 0, 10.123, 10), "A", "Tumor", keep),
        gj.Region(shapely.box(20, 0, 30, 10), None, "Stroma", "not-a-uuid"),
        gj.Region(shapely.box(40, 0, 50, 10), "no class"),
        gj.Region(
            shapely.box(60, 0, 70, 10), None, "Mine", None,
            {"classification": {"name": "Mine", "color": [1, 2, 3]}},
        ),
    ]  # fmt: skip
    path = gj.write_annotations(regions, tmp_path / "r.geojson", palette={"Stroma": (9, 8, 7)})
    feats = _read_fc(path)
    assert len(feats) == 4
    for f in feats:
        uuid.UUID(f["id"])
        assert f["properties"]["objectType"] == "annotation"
        cls = f["properties"].get("classification")
        if cls is not None:  # never without a colour: QuPath would reject the whole file
            assert len(cls["color"]) == 3 and all(0 <= v <= 255 for v in cls["color"])
        for ring in f["geometry"]["coordinates"]:
            _check_ring(ring)
    assert feats[0]["id"] == keep and feats[0]["properties"]["name"] == "A"
    assert feats[1]["properties"]["classification"]["color"] == [9, 8, 7]
    assert "classification" not in feats[2]["properties"]
    assert feats[3]["properties"]["classification"]["color"] == [1, 2, 3]
    # ids made for non-UUID regions are stable, and the file reads back as the same regions
    again = gj.write_annotations(regions, tmp_path / "r.geojson", palette={"Stroma": (9, 8, 7)})
    assert [f["id"] for f in _read_fc(again)] == [f["id"] for f in feats]
    back = read_regions(path)
    assert [r.class_name for r in back] == ["Tumor", "Stroma", None, "Mine"]
    assert back[0].geometry.equals(shapely.box(0, 0, 10.12, 10))


@pytest.mark.shared_data
def test_every_object_we_write_reads_like_qupaths_own_files(
    table: pd.DataFrame, tmp_path: Path, shared_data: Path
) -> None:
    """Our annotation files have the key layout of a file QuPath 0.5.1 wrote itself."""
    written = json.loads(
        (shared_data / "qupath" / "geojson" / "qupath051_written_cell.geojson").read_text()
    )
    qupath_keys = set(written["features"][0]) - {"nucleusGeometry"}
    path = gj.write_annotations(
        [gj.Region(shapely.box(0, 0, 5, 5), "x", "Tumor")], tmp_path / "a.geojson"
    )
    (f,) = _read_fc(path)
    assert set(f) == qupath_keys
    assert set(written["features"][0]["properties"]["classification"]) == set(
        f["properties"]["classification"]
    )


def _grid_table(n_side: int, spacing: float = 10.0) -> pd.DataFrame:
    """Nuclei on a grid (small squares), as a conic-qp table."""
    labels = np.zeros((n_side * 8, n_side * 8), np.int32)
    k = 0
    for r in range(n_side):
        for c in range(n_side):
            k += 1
            labels[r * 8 + 2 : r * 8 + 6, c * 8 + 2 : c * 8 + 6] = k
    probs = np.tile(np.eye(6, dtype=np.float32)[[1]], (k, 1))
    return instances_to_table(
        Instances(labels, np.full(k, 2), probs), CONIC,
        scale=spacing / 8, mpp_level0=0.5, image_id="grid",
    )  # fmt: skip


def test_detection_folder_groups_by_parent_and_chunks(tmp_path: Path) -> None:
    from conic_qp.regions import parent_regions

    table = _grid_table(20)  # 400 nuclei over 200 x 200 px
    outer = gj.Region(shapely.box(0, 0, 120, 120), "outer", "Tumor", str(uuid.uuid4()))
    inner = gj.Region(shapely.box(30, 30, 60, 60), "inner", "Stroma", "inner-id")
    folder = tmp_path / "detections" / "7"
    res = gj.write_detection_folder(
        table, folder, CONIC, regions=[outer, inner], add_regions=True, per_file=50,
        info={"entry_id": "7", "image_name": "x.svs"},
    )  # fmt: skip
    m = json.loads((folder / gj.MANIFEST).read_text())
    assert m["format"] == gj.MANIFEST_FORMAT and m["entry_id"] == "7" and m["n_objects"] == 400
    ids = [a["id"] for a in m["annotations"]]
    assert ids[0] == outer.id and str(uuid.UUID(ids[1])) == ids[1]  # a UUID for "inner-id"
    assert m["annotations"][1]["area"] == pytest.approx(900.0)
    # every file: at most 50 QuPath-valid features, all of one parent, as the manifest says
    parent = parent_regions(table, [outer.geometry, inner.geometry])
    want = {
        None: int((parent == -1).sum()),
        ids[0]: int((parent == 0).sum()),
        ids[1]: int((parent == 1).sum()),
    }
    assert all(want.values()) and res.counts_by_parent() == want
    seen: dict[str, str | None] = {}
    for entry in m["files"]:
        feats = _read_fc(folder / entry["file"])
        assert len(feats) == entry["count"] <= 50
        for f in feats:
            _check_feature(f, "detection")
            seen[f["id"]] = entry["parent"]
    by_id = dict(zip(table["id"], parent.tolist(), strict=True))
    assert len(seen) == 400
    assert all(seen[i] == (ids[p] if p >= 0 else None) for i, p in by_id.items())
    # the regions, as QuPath annotations with the ids the manifest names
    regs = _read_fc(folder / m["regions_file"])
    assert [f["id"] for f in regs] == ids
    assert not list(tmp_path.rglob("*.tmp"))

    # re-written from row batches: same content; a failure leaves the previous folder whole
    batches = [table.iloc[i : i + 64] for i in range(0, 400, 64)]
    res2 = gj.write_detection_folder(
        lambda: iter(batches), folder, CONIC, regions=[outer, inner], per_file=50
    )
    assert res2.counts_by_parent() == want and res2.manifest["regions_file"] is None
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken() -> object:
        yield table.iloc[:10]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        gj.write_detection_folder(broken, folder, CONIC, regions=[outer])  # type: ignore[arg-type]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["7"]


def test_detection_folder_bounds_open_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many parents interleaved: files are closed early rather than hundreds kept open."""
    monkeypatch.setattr(gj, "_MAX_OPEN_FILES", 2)
    table = _grid_table(12)  # rows in raster order: 12 columns of annotations interleave
    cols = [
        gj.Region(shapely.box(c * 10, 0, c * 10 + 10, 120), f"c{c}", "Tumor") for c in range(12)
    ]
    batches = [table.iloc[i : i + 12] for i in range(0, len(table), 12)]
    res = gj.write_detection_folder(lambda: iter(batches), tmp_path / "d", CONIC, regions=cols)
    assert res.n_objects == 144
    counts = res.counts_by_parent()
    assert len(counts) == 12 and set(counts.values()) == {12}
    assert len(res.files) > 12  # parents got new files after being closed
    assert sum(len(_read_fc(p)) for p in res.files) == 144


def test_empty_detection_folder_still_has_a_manifest(table: pd.DataFrame, tmp_path: Path) -> None:
    res = gj.write_detection_folder(table.iloc[:0], tmp_path / "d", CONIC)
    assert res.n_objects == 0 and res.manifest["files"] == [] and res.manifest["annotations"] == []
    assert gj.read_detection_manifest(tmp_path / "d")["n_objects"] == 0
