"""OMERO pure logic (no omero-py needed): references, level mapping, tiles, table schema, ROIs,
key-value pairs, regions from shape values, credential resolution from the environment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.objects import prob_column
from conic_qp.omero.connection import OmeroCredentials, resolve_credentials, scrub
from conic_qp.omero.jobs import image_stem
from conic_qp.omero.refs import OmeroRef, parse_ref, refs_in_qupath_project
from conic_qp.omero.regions import (
    ShapeInfo,
    parse_points,
    parse_qupath_text,
    regions_from_shapes,
    shape_geometry,
)
from conic_qp.omero.results import (
    MAX_COLUMNS,
    WriteOptions,
    batch_rows,
    composition_pairs,
    omero_rgba,
    polygon_points,
    roi_batches,
    select_roi_rows,
    table_spec,
    utf8_size,
)
from conic_qp.omero.source import decode_tile, level_order, server_level, tile_grid

# ------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "kind", "oid", "host", "port"),
    [
        ("omero://omero.example.org:4064/image/12", "image", 12, "omero.example.org", 4064),
        ("omero://omero.example.org/dataset/7", "dataset", 7, "omero.example.org", None),
        ("omero-ice://h/project/3/", "project", 3, "h", None),
        ("omero://h/plate/99", "plate", 99, "h", None),
        ("https://web.example.org/webclient/?show=image-462", "image", 462, "web.example.org", None),
        # QuPath projects store the query URL-encoded
        ("https://web.example.org/webclient/?show%3Dimage-462", "image", 462, "web.example.org", None),
        ("https://h/webclient/img_detail/51/", "image", 51, "h", None),
        ("https://h/webgateway/img_detail/52", "image", 52, "h", None),
        ("https://h/iviewer/?images=53&dataset=2", "image", 53, "h", None),
        ("https://h/webgateway/render_image_region/54/0/0/?tile=3,0,0,512,512", "image", 54, "h", None),
        ("http://h:8080/webclient/render_image/55/0/0/", "image", 55, "h", None),
        ("https://h/webclient/?show=dataset-8", "dataset", 8, "h", None),
        ("https://h/webclient/?show=project-9", "project", 9, "h", None),
    ],
)  # fmt: skip
def test_parse_ref_forms(text: str, kind: str, oid: int, host: str, port: int | None) -> None:
    ref = parse_ref(text)
    assert (ref.kind, ref.id, ref.host, ref.port) == (kind, oid, host, port)
    assert parse_ref(ref.uri) == ref  # the canonical form round-trips


def test_parse_ref_bare_ids_and_errors() -> None:
    assert parse_ref("17", default_kind="dataset") == OmeroRef("dataset", 17)
    for bad in (
        "17",
        "omero://h/well/3",
        "https://h/webclient/",
        "slide.svs",
        "omero://h:x/image/1",
    ):
        with pytest.raises(ConicQPError):
            parse_ref(bad)
    assert OmeroRef("image", 5, "h", 4064).uri == "omero://h:4064/image/5"
    assert OmeroRef("image", 5).on("h", 14064) == OmeroRef("image", 5, "h", 14064)
    assert OmeroRef("image", 5, "::1", 4064).uri == "omero://[::1]:4064/image/5"
    assert parse_ref("omero://[::1]:4064/image/5").host == "::1"
    with pytest.raises(ValueError):
        OmeroRef("image", 0)


def test_refs_in_qupath_project(tmp_path: Path) -> None:
    web = "https://omero.example.org/webclient/?show%3Dimage-21"
    project = {
        "version": "0.5.1",
        "images": [
            {"imageName": "a.svs", "serverBuilder": {"builderType": "uri", "uri": "file:/x/a.svs"}},
            {"imageName": "b", "serverBuilder": {"builderType": "uri", "uri": web, "args": []}},
            {"imageName": "c", "serverBuilder": {"builderType": "rotated", "rotation": "ROTATE_90",
                                                 "builder": {"builderType": "uri",
                                                             "uri": "omero://h/image/22"}}},
        ],
    }  # fmt: skip
    (tmp_path / "project.qpproj").write_text(json.dumps(project), encoding="utf-8")
    got = refs_in_qupath_project(tmp_path)
    assert [(n, r.id, r.host) for n, r in got] == [("b", 21, "omero.example.org"), ("c", 22, "h")]
    with pytest.raises(ConicQPError):
        refs_in_qupath_project(tmp_path / "missing")


def test_image_stem_is_file_safe() -> None:
    assert image_stem("omero.example.org", 12) == "omero.example.org_image-12"
    assert image_stem("wss://omero.example.org/omero-ws", 3) == "omero.example.org-omero-ws_image-3"


# ------------------------------------------------------------------------- levels and tiles


def test_level_order_and_inverted_server_levels() -> None:
    # OMERO: descriptions[0] is the full size, selected with setResolutionLevel(n - 1)
    descs = [(4000, 3000), (2000, 1500), (1000, 750)]
    assert level_order(descs) == [0, 1, 2]
    assert [server_level(i, 3) for i in level_order(descs)] == [2, 1, 0]
    # a server listing smallest first still gives level 0 = full size
    shuffled = [(1000, 750), (4000, 3000), (2000, 1500)]
    order = level_order(shuffled)
    assert [shuffled[i] for i in order] == descs
    assert [server_level(i, 3) for i in order] == [1, 0, 2]  # by description index
    with pytest.raises(ValueError):
        server_level(3, 3)


def test_tile_grid_aligned_and_clipped() -> None:
    tiles = tile_grid(300, 10, 700, 20, (256, 256), (600, 400))
    assert tiles == [(256, 0, 256, 256), (512, 0, 88, 256)]
    # every requested pixel is covered exactly once
    cover = np.zeros((400, 600), int)
    for x, y, w, h in tile_grid(0, 0, 600, 400, (256, 128), (600, 400)):
        cover[y : y + h, x : x + w] += 1
    assert (cover == 1).all()


def test_decode_tile_is_big_endian() -> None:
    values = np.array([[1, 258], [65535, 0]], dtype=">u2")
    raw = values.tobytes()
    assert raw[:4] == b"\x00\x01\x01\x02"  # big-endian on the wire
    out = decode_tile(raw, "uint16", 2, 2)
    np.testing.assert_array_equal(out, [[1, 258], [65535, 0]])
    assert out.dtype.byteorder in ("=", "|") or out.dtype.isnative
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(decode_tile(rgb.tobytes(), "uint8", 3, 2, 3), rgb)
    with pytest.raises(ValueError):
        decode_tile(raw, "uint8", 2, 2)


# ----------------------------------------------------------------------------- table schema


def _nuclei(classes: ClassScheme, n: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    names = classes.names
    df = pd.DataFrame(
        {
            "id": [f"{i:08d}-0000-0000-0000-000000000000" for i in range(n)],
            "centroid_x": rng.uniform(0, 1000, n),
            "centroid_y": rng.uniform(0, 1000, n),
            "class_id": [1 + i % len(names) for i in range(n)],
            "class_name": [names[i % len(names)] for i in range(n)],
            "class_prob": rng.uniform(0.5, 1, n).astype(np.float32),
            "area_px": rng.uniform(50, 100, n),
            "area_um2": rng.uniform(10, 30, n),
            "perimeter_um": rng.uniform(10, 20, n),
            "solidity": rng.uniform(0.8, 1, n).astype(np.float32),
            "eccentricity": rng.uniform(0, 1, n).astype(np.float32),
            "polygon_wkb": [shapely.to_wkb(shapely.Point(i, i).buffer(3)) for i in range(n)],
        }
    )
    probs = pd.DataFrame({prob_column(c): np.full(n, 1 / len(names), np.float32) for c in names})
    return pd.concat([df, probs], axis=1)


def test_table_spec_string_sizes_are_utf8_bytes() -> None:
    classes = ClassScheme.from_names("s", ["épithélium", "lymphocyte", "ß"])
    df = _nuclei(classes)
    spec = {s.name: s for s in table_spec(df, classes, with_roi=True)}
    assert spec["Image"].kind == "image" and spec["Roi"].kind == "roi"
    assert spec["class_name"].size == len("épithélium".encode()) == 12  # not 10 characters
    assert spec["nucleus_id"].size == 36
    assert utf8_size(["a", "µµ", ""]) == 4 and utf8_size([]) == 1
    for c in classes.names:
        assert spec[prob_column(c)].kind == "double"
    # OMERO.tables stores descriptions in a PyTables str array, which refuses non-ASCII
    assert all(s.description.isascii() for s in spec.values())
    assert "Roi" not in {s.name for s in table_spec(df, classes, with_roi=False)}
    with pytest.raises(ConicQPError):
        table_spec(df.drop(columns=["area_um2"]), classes, with_roi=False)


def test_table_spec_refuses_too_many_columns() -> None:
    classes = ClassScheme.from_names("many", [f"c{i}" for i in range(MAX_COLUMNS)])
    with pytest.raises(ConicQPError, match="columns"):
        table_spec(_nuclei(classes, 2), classes, with_roi=False)


def test_batch_rows_fit_the_budget() -> None:
    classes = ClassScheme.from_names("s", ["a", "b"])
    spec = table_spec(_nuclei(classes), classes, with_roi=True)
    per_row = sum(s.row_bytes for s in spec)
    rows = batch_rows(spec, budget=1_000_000)
    assert rows * per_row <= 1_000_000 < (rows + 1) * per_row
    assert batch_rows(spec, budget=1) == 1


# ------------------------------------------------------------------------------------- ROIs


def test_polygon_points_string() -> None:
    square = shapely.Polygon([(0, 0), (10.5, 0), (10.5, 4), (0, 4)])
    assert polygon_points(square) == "0.00,0.00 10.50,0.00 10.50,4.00 0.00,4.00"
    multi = shapely.MultiPolygon([square, shapely.box(20, 20, 21, 21)])
    assert polygon_points(multi).count(" ") == 3  # the larger part
    np.testing.assert_allclose(
        parse_points(polygon_points(square)), np.asarray(square.exterior.coords)[:-1]
    )
    with pytest.raises(ValueError):
        polygon_points(shapely.Point(0, 0))


def test_roi_cap_is_a_stable_spread_sample() -> None:
    classes = ClassScheme.from_names("s", ["a", "b"])
    df = _nuclei(classes, 50)
    df["id"] = [f"{(i * 37) % 50:02d}" for i in range(50)]  # ids not in table order
    assert select_roi_rows(df, 0).size == 0
    np.testing.assert_array_equal(select_roi_rows(df, 100), np.arange(50))
    rows = select_roi_rows(df, 10)
    assert len(rows) == 10 and (np.diff(rows) > 0).all()
    assert sorted(df["id"].iloc[rows]) == [f"{i:02d}" for i in range(10)]  # the 10 smallest ids
    np.testing.assert_array_equal(rows, select_roi_rows(df.copy(), 10))  # stable


def test_roi_batches() -> None:
    sl = roi_batches(1234, 500)
    assert [(s.start, s.stop) for s in sl] == [(0, 500), (500, 1000), (1000, 1234)]
    assert roi_batches(0) == []
    with pytest.raises(ValueError):
        roi_batches(3, 0)


def test_omero_rgba_is_signed_int32() -> None:
    assert omero_rgba((255, 0, 0), 255) == -16776961  # 0xFF0000FF as a Java int
    assert omero_rgba((0, 255, 0), 128) == 0x00FF0080
    assert omero_rgba((1, 2, 3), 4) == 0x01020304
    v = omero_rgba((200, 100, 50), 255)
    assert -(2**31) <= v < 2**31 and (v & 0xFFFFFFFF) >> 24 == 200


def test_write_options_parse() -> None:
    o = WriteOptions.parse("table,attachment,map")
    assert (o.table, o.attachment, o.map, o.max_rois, o.replace) == (True, True, True, 0, True)
    o = WriteOptions.parse("table,rois", max_rois=2000, replace=False)
    assert (o.table, o.attachment, o.map, o.max_rois, o.replace) == (
        True,
        False,
        False,
        2000,
        False,
    )
    assert WriteOptions.parse("map", max_rois=10).max_rois == 10  # --max-rois implies rois
    for bad in ("table,cells", "", "rois"):
        with pytest.raises(ConicQPError):
            WriteOptions.parse(bad)
    with pytest.raises(ConicQPError):
        WriteOptions(max_rois=10**6)


def test_composition_pairs() -> None:
    row = {"slide": "s", "region": "all", "region_id": "all", "area_mm2": 1.23456789,
           "total": 12, "count_a": 7, "proportion_a": 7 / 12, "lymphocyte/epithelial": math.nan}  # fmt: skip
    pairs = dict(composition_pairs(row, {"model": "demo"}))
    assert "slide" not in pairs
    assert pairs["area_mm2"] == "1.23457" and pairs["total"] == "12" and pairs["count_a"] == "7"
    assert pairs["lymphocyte/epithelial"] == "NA" and pairs["model"] == "demo"


# ---------------------------------------------------------------------------------- regions


def test_parse_points_modern_and_legacy() -> None:
    np.testing.assert_array_equal(parse_points("1,2 3,4 5,6"), [[1, 2], [3, 4], [5, 6]])
    legacy = "points[1,2, 3,4, 5,6] points1[1,2, 3,4, 5,6] points2[1,2, 3,4, 5,6] mask[0,0,0]"
    np.testing.assert_array_equal(parse_points(legacy), [[1, 2], [3, 4], [5, 6]])
    with pytest.raises(ValueError):
        parse_points("1,2 3")


def test_parse_qupath_text() -> None:
    uuid = "0f3c5b2a-1d2e-4f6a-8b9c-0123456789ab"
    t = parse_qupath_text(f"Annotation:Tumor&Invasive:{uuid}:NoParent:front line")
    assert t == {"type": "Annotation", "class": "Tumor: Invasive", "uuid": uuid, "parent": None,
                 "name": "front line"}  # fmt: skip
    assert parse_qupath_text("Annotation:NoClass")["class"] is None  # type: ignore[index]
    assert parse_qupath_text("Detection:Tumor")["type"] == "Detection"  # type: ignore[index]
    assert parse_qupath_text("my region") is None and parse_qupath_text(None) is None


def test_shape_geometries() -> None:
    rect = shape_geometry(ShapeInfo(1, "rectangle", {"x": 10, "y": 20, "width": 30, "height": 40}))
    assert rect is not None and rect.bounds == (10, 20, 40, 60)
    ell = shape_geometry(ShapeInfo(2, "ellipse", {"x": 0, "y": 0, "radiusX": 10, "radiusY": 5}))
    assert ell is not None and abs(ell.area - math.pi * 50) / (math.pi * 50) < 0.01
    # OMERO transform (a00, a10, a01, a11, a02, a12): x' = a00 x + a01 y + a02
    moved = shape_geometry(ShapeInfo(3, "rectangle", {"x": 0, "y": 0, "width": 2, "height": 1},
                                     transform=(1, 0, 0, 1, 100, 50)))  # fmt: skip
    assert moved is not None and moved.bounds == (100, 50, 102, 51)
    scaled = shape_geometry(ShapeInfo(3, "rectangle", {"x": 0, "y": 0, "width": 2, "height": 1},
                                      transform=(2, 0, 0, 3, 0, 0)))  # fmt: skip
    assert scaled is not None and scaled.bounds == (0, 0, 4, 3)
    assert shape_geometry(ShapeInfo(4, "line", {})) is None
    assert shape_geometry(ShapeInfo(5, "polygon", {"points": "0,0 1,1"})) is None
    bow = shape_geometry(ShapeInfo(6, "polygon", {"points": "0,0 10,10 10,0 0,10"}))
    assert bow is not None and bow.is_valid and bow.area == pytest.approx(50)


def test_regions_from_shapes_group_and_skip() -> None:
    u1 = "0f3c5b2a-1d2e-4f6a-8b9c-0123456789ab"
    shapes = [
        ShapeInfo(1, "rectangle", {"x": 0, "y": 0, "width": 10, "height": 10}, f"Annotation:Tumor:{u1}:NoParent:NoName"),
        ShapeInfo(2, "rectangle", {"x": 10, "y": 0, "width": 10, "height": 10}, f"Annotation:Tumor:{u1}:NoParent:NoName"),
        ShapeInfo(3, "polygon", {"points": "0,20 10,20 10,30"}, None, "stroma A"),
        ShapeInfo(4, "rectangle", {"x": 0, "y": 0, "width": 5, "height": 5}, "Detection:Tumor"),
        ShapeInfo(5, "polygon", {"points": "0,0 1,0 1,1"}, "dark", "conic-qp nucleus"),
        ShapeInfo(6, "point", {}, None, "a point"),
        ShapeInfo(7, "ellipse", {"x": 50, "y": 50, "radiusX": 3, "radiusY": 3}, None, None),
        ShapeInfo(8, "rectangle", {"x": 0, "y": 0, "width": 1, "height": 1}, None, "stroma A"),
    ]  # fmt: skip
    regions = regions_from_shapes(shapes, skip_roi_names=("conic-qp nucleus",))
    by_label = {r.label: r for r in regions}
    assert set(by_label) == {"Tumor", "stroma A", "ROI 7", "stroma A #2"}
    assert by_label["Tumor"].geometry.area == pytest.approx(200)  # two shapes of one object
    assert by_label["Tumor"].class_name == "Tumor" and by_label["Tumor"].id == "1"
    assert by_label["stroma A"].id == "3" and by_label["stroma A"].class_name is None


# ------------------------------------------------------------------------------ credentials


def test_credentials_from_environment(tmp_path: Path) -> None:
    nodir = tmp_path / "no-sessions"
    env = {"OMERO_HOST": "omero.example.org", "OMERO_USER": "ana", "OMERO_PASSWORD": "s3cr3t-pw"}
    c = resolve_credentials(environ=env, session_dir=nodir)
    assert (c.host, c.port, c.user, c.password, c.source) == (
        "omero.example.org", 4064, "ana", "s3cr3t-pw", "environment",
    )  # fmt: skip
    assert "s3cr3t-pw" not in repr(c) and "s3cr3t-pw" not in str(c)
    assert c.secrets == ("s3cr3t-pw",)
    c = resolve_credentials(
        host="other", port=14064, environ={**env, "OMERO_PORT": "1"}, session_dir=nodir
    )
    assert (c.host, c.port) == ("other", 14064)  # options win over the environment
    assert (
        resolve_credentials(environ={**env, "OMERO_PORT": "4444"}, session_dir=nodir).port == 4444
    )
    k = resolve_credentials(session_key="key-123", environ=env, session_dir=nodir)
    assert (k.session_key, k.password, k.source) == ("key-123", None, "session key")
    assert "key-123" not in repr(k)
    k = resolve_credentials(environ={"OMERO_SESSION_KEY": "key-9"}, ref_host="h", session_dir=nodir)
    assert (k.host, k.session_key) == ("h", "key-9")
    assert not nodir.exists()  # resolving never creates the session folder


@pytest.mark.parametrize(
    ("env", "kw"),
    [
        ({"OMERO_USER": "ana"}, {}),  # no password
        ({"OMERO_PASSWORD": "x", "OMERO_HOST": "h"}, {}),  # no user
        ({"OMERO_USER": "ana", "OMERO_PASSWORD": "x"}, {}),  # no host
        ({}, {}),  # nothing at all
        ({"OMERO_HOST": "h", "OMERO_PORT": "http"}, {"session_key": "k"}),
        ({"OMERO_HOST": "h"}, {"session_key": "k", "port": 70000}),
        ({"OMERO_SESSION_KEY": "k"}, {}),  # a key but no server
    ],
)
def test_credentials_errors_are_one_line(
    tmp_path: Path, env: dict[str, str], kw: dict[str, object]
) -> None:
    with pytest.raises(ConicQPError) as info:
        resolve_credentials(environ=env, session_dir=tmp_path / "none", **kw)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and len(msg) > 20


def test_scrub() -> None:
    assert scrub("key abc and abc", ["abc"]) == "key *** and ***"
    assert scrub("nothing", ["", "zz"]) == "nothing"
    assert str(OmeroCredentials("h", 4064, "u", "pw", None)) == "u@h:4064 ()"


# ------------------------------------------------------------------------------- expansion


class _Obj:
    def __init__(self, oid: int, children: list[_Obj] | None = None, **kw: object) -> None:
        self.oid, self.children, self.kw = oid, children or [], kw

    def getId(self) -> int:
        return self.oid

    def listChildren(self) -> list[_Obj]:
        return self.children

    def getRow(self) -> object:
        return self.kw.get("row")

    def getColumn(self) -> object:
        return self.kw.get("col")

    def getImage(self) -> object:
        return self.kw.get("image")


class _Gateway:
    """Containers: dataset 1 = images 3, 2; project 7 = datasets 1 and 5 (image 4); plate 9."""

    def __init__(self) -> None:
        wells = [_Obj(20, [_Obj(30, image=_Obj(12)), _Obj(31, image=_Obj(13))], row=1, col=0),
                 _Obj(21, [_Obj(32, image=_Obj(11))], row=0, col=0)]  # fmt: skip
        self.objects = {("Dataset", 1): _Obj(1), ("Dataset", 5): _Obj(5), ("Project", 7): _Obj(7),
                        ("Plate", 9): _Obj(9, wells)}  # fmt: skip
        self.images = {1: [_Obj(3), _Obj(2)], 5: [_Obj(4)]}

    def getObject(self, kind: str, oid: int) -> object:
        return self.objects.get((kind, oid))

    def getObjects(self, kind: str, opts: dict[str, int]) -> list[_Obj]:
        if kind == "Image":
            return self.images.get(opts["dataset"], [])
        assert kind == "Dataset" and opts == {"project": 7}
        return [_Obj(5), _Obj(1)]


class _Conn:
    def __init__(self) -> None:
        self.gateway = _Gateway()
        self.credentials = OmeroCredentials("omero.example.org")

    def call(self, what: str) -> object:
        import contextlib

        return contextlib.nullcontext()


def test_expand_refs_containers_in_order_each_once() -> None:
    from conic_qp.omero.jobs import expand_refs

    conn = _Conn()
    refs = [OmeroRef("image", 4), OmeroRef("dataset", 1), OmeroRef("project", 7),
            OmeroRef("plate", 9, "OMERO.example.org")]  # fmt: skip
    assert expand_refs(conn, refs) == [4, 2, 3, 11, 12, 13]  # type: ignore[arg-type]
    with pytest.raises(ConicQPError, match="dataset 8 was not found"):
        expand_refs(conn, [OmeroRef("dataset", 8)])  # type: ignore[arg-type]
    with pytest.raises(ConicQPError, match=r"is on other\.org"):
        expand_refs(conn, [OmeroRef("image", 1, "other.org")])  # type: ignore[arg-type]
    conn.gateway.images[5] = []
    conn.gateway.images[1] = []
    with pytest.raises(ConicQPError, match="no OMERO image"):
        expand_refs(conn, [OmeroRef("dataset", 1)])  # type: ignore[arg-type]
