"""OMERO with real omero-py objects and no server: table columns, ROIs, map annotations, the
session store, hand-built image wrappers, shapes, error translation, refused connections.

Marked ``omero``: needs omero-py + zeroc-ice (the ``omero`` extra); CI installs it.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError, cli_flag

pytestmark = pytest.mark.omero

PASSWORD = "planted-Pa55word-7c1e"
KEY = "0c7d6a5e-planted-session-key-91b2"


@pytest.fixture(scope="module")
def om() -> Any:
    from conic_qp.omero.connection import omero_api

    return omero_api()


def _wrapper(img: Any) -> Any:
    import omero.gateway

    return omero.gateway.ImageWrapper(None, img)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_columns_are_omero_grid_columns(om: Any) -> None:
    from conic_qp.omero.results import build_columns, table_spec
    from tests.test_omero import _nuclei

    classes = ClassScheme.from_names("s", ["épithélium", "b"])
    df = _nuclei(classes, 4)
    spec = table_spec(df, classes, with_roi=True)
    cols = build_columns(spec, df, 77, np.array([5, -1, 6, -1]))
    by = {c.name: c for c in cols}
    assert isinstance(by["Image"], om.grid.ImageColumn) and by["Image"].values == [77] * 4
    assert isinstance(by["Roi"], om.grid.RoiColumn) and by["Roi"].values == [5, -1, 6, -1]
    assert isinstance(by["class_name"], om.grid.StringColumn) and by["class_name"].size == 12
    assert isinstance(by["class_id"], om.grid.LongColumn)
    assert isinstance(by["centroid_x"], om.grid.DoubleColumn)
    np.testing.assert_allclose(by["centroid_x"].values, df["centroid_x"])
    assert by["class_name"].values == list(df["class_name"])
    empty = build_columns(spec, None, 77)
    assert [c.name for c in empty] == [c.name for c in cols] and all(not c.values for c in empty)


def test_roi_and_map_annotation_objects(om: Any) -> None:
    from conic_qp.omero.results import (
        ROI_NAME,
        make_map_annotation,
        make_roi,
        omero_rgba,
        polygon_points,
    )

    geom = shapely.Polygon([(1, 1), (9, 1), (9, 5)])
    roi = make_roi(geom, 42, "dark", (200, 10, 20), "dark (run)")
    unwrap = om.rtypes.unwrap
    assert isinstance(roi, om.model.RoiI) and unwrap(roi.getName()) == ROI_NAME
    img = roi.getImage()
    assert unwrap(img.getId()) == 42 and not img.isLoaded()
    (shape,) = roi.copyShapes()
    assert isinstance(shape, om.model.PolygonI)
    assert unwrap(shape.getPoints()) == polygon_points(geom) == "1.00,1.00 9.00,1.00 9.00,5.00"
    assert (unwrap(shape.getTheZ()), unwrap(shape.getTheT())) == (0, 0)
    assert unwrap(shape.getStrokeColor()) == omero_rgba((200, 10, 20), 255)
    assert unwrap(shape.getTextValue()) == "dark"
    ann = make_map_annotation([["total", "12"], ["count_dark", "5"]], "conic-qp/composition", "d")
    assert (
        isinstance(ann, om.model.MapAnnotationI) and unwrap(ann.getNs()) == "conic-qp/composition"
    )
    assert [(nv.name, nv.value) for nv in ann.getMapValue()] == [
        ("total", "12"),
        ("count_dark", "5"),
    ]


def test_credentials_from_an_omero_login_session_store(om: Any, tmp_path: Path) -> None:
    from conic_qp.omero.connection import resolve_credentials

    store = om.SessionsStore(str(tmp_path))
    props = {"omero.port": "14064"}
    store.add("omero.example.org", "ana", KEY, props)
    store.set_current("omero.example.org", "ana", KEY, props)
    c = resolve_credentials(environ={}, session_dir=tmp_path)
    assert (c.host, c.port, c.user, c.session_key, c.source) == (
        "omero.example.org", 14064, "ana", KEY, "omero login session",
    )  # fmt: skip
    assert KEY not in repr(c) and KEY not in str(c)
    # the same host (case, trailing slash) reuses it; another host is an error, not a surprise
    assert (
        resolve_credentials("OMERO.example.org", environ={}, session_dir=tmp_path).session_key
        == KEY
    )
    with pytest.raises(ConicQPError, match="omero login other"):
        resolve_credentials("other", environ={}, session_dir=tmp_path)
    # a key with no host takes the login's host; the environment's password wins over the store
    k = resolve_credentials(session_key="k2", environ={}, session_dir=tmp_path)
    assert (k.host, k.port, k.session_key) == ("omero.example.org", 14064, "k2")
    env = {"OMERO_USER": "bo", "OMERO_PASSWORD": PASSWORD, "OMERO_HOST": "h2"}
    assert resolve_credentials(environ=env, session_dir=tmp_path).source == "environment"


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [(0.25, "MICROMETER", 0.25), (500.0, "NANOMETER", 0.5), (0.00025, "MILLIMETER", 0.25),
     (2500.0, "ANGSTROM", 0.25)],
)  # fmt: skip
def test_pixel_size_is_converted_to_micrometres(
    om: Any, value: float, unit: str, expected: float
) -> None:
    from conic_qp.omero.source import image_mpp
    from tests.helpers_omero import make_image

    assert image_mpp(_wrapper(make_image(1, (64, 64), mpp=value, unit=unit))) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"pixel_type": "uint16"}, "uint16"),
        ({"size_c": 4}, "4-channel"),
        ({"size_c": 2}, "2-channel"),
        ({"mpp": None}, "pass mpp"),
        ({"mpp": 1.0, "unit": "PIXEL"}, "pass mpp"),
        ({"mpp": 25.0}, "implausible"),
    ],
)
def test_source_refuses_before_reading(om: Any, kw: dict[str, Any], match: str) -> None:
    from conic_qp.omero.source import OmeroSource
    from tests.helpers_omero import make_image

    class NoPixels:
        def __init__(self) -> None:
            self.SERVICE_OPTS: dict[str, str] = {}

        def createRawPixelsStore(self) -> Any:
            raise AssertionError("refused images must not be read")

    image = _wrapper(make_image(3, (64, 64), **kw))
    with pytest.raises(ConicQPError, match=match) as info:
        OmeroSource(NoPixels(), image)
    assert "\n" not in str(info.value) and "image 3" in str(info.value)


def test_shapes_from_model_objects(om: Any) -> None:
    from conic_qp.omero.regions import regions_from_shapes, shape_info

    model, rstring, rdouble = om.model, om.rtypes.rstring, om.rtypes.rdouble
    roi = model.RoiI(7, True)
    roi.setName(rstring("tumour core"))
    rect = model.RectangleI(1, True)
    for k, v in (("X", 10), ("Y", 20), ("Width", 30), ("Height", 40)):
        getattr(rect, f"set{k}")(rdouble(v))
    tr = model.AffineTransformI()
    for k, v in (("00", 1), ("10", 0), ("01", 0), ("11", 1), ("02", 5), ("12", 6)):
        getattr(tr, f"setA{k}")(rdouble(v))
    rect.setTransform(tr)
    ell = model.EllipseI(2, True)
    for k, v in (("X", 100), ("Y", 100), ("RadiusX", 10), ("RadiusY", 20)):
        getattr(ell, f"set{k}")(rdouble(v))
    poly = model.PolygonI(3, True)
    poly.setPoints(rstring("0,0 50,0 50,50"))
    poly.setTextValue(rstring("Annotation:Stroma"))
    line = model.LineI(4, True)
    infos = [shape_info(roi, s) for s in (rect, ell, poly, line)]
    assert [i.kind for i in infos] == ["rectangle", "ellipse", "polygon", "line"]
    assert infos[0].params == {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0}
    assert infos[0].transform == (1.0, 0.0, 0.0, 1.0, 5.0, 6.0)
    (region,) = regions_from_shapes(infos[:2])  # one OMERO ROI -> one region
    assert region.label == "tumour core" and region.id == "7"
    assert region.geometry.area == pytest.approx(1200 + np.pi * 200, rel=0.01)
    assert region.geometry.bounds[:2] == (15.0, 26.0)  # the transform moved the rectangle
    (qp,) = regions_from_shapes(infos[2:])
    assert (qp.label, qp.class_name) == ("Stroma", "Stroma")


def test_translate_error_gives_one_clean_line(om: Any) -> None:
    from conic_qp.omero.connection import OmeroConnectionLost, translate_error

    Ice, Glacier2, omero = om.Ice, om.Glacier2, om.omero
    cases = [
        (Ice.ConnectionRefusedException(), ConicQPError, "connection refused"),
        (Ice.DNSException(), ConicQPError, "unknown host"),
        (Ice.ConnectionLostException(), OmeroConnectionLost, "lost"),
        (Ice.TimeoutException(), OmeroConnectionLost, "lost"),
        (Glacier2.PermissionDeniedException(f"bad password {PASSWORD}"), ConicQPError, "refused the login"),
        (omero.SecurityViolation(None, None, "not yours"), ConicQPError, "no permission"),
        (omero.ValidationException(None, None, "Maximum string (byte) length"), ConicQPError, "rejected"),
        (omero.MissingPyramidException(None, None, "pyramid"), ConicQPError, "pyramid"),
        (omero.ApiUsageException(None, None, "bad\nmulti line"), ConicQPError, "rejected"),
    ]  # fmt: skip
    for exc, cls, words in cases:
        err = translate_error(exc, "reading image 3", "h:4064", secrets=[PASSWORD, KEY])
        assert isinstance(err, cls), (exc, err)
        assert words in str(err) and "h:4064" in str(err)
        assert "\n" not in str(err) and PASSWORD not in str(err)
    lost = translate_error(Ice.ConnectionLostException(), "x", "h")
    assert isinstance(lost, ConicQPError)  # the CLI prints it like every other error


def test_refused_connection_is_one_line_and_keeps_secrets(om: Any, tmp_path: Path) -> None:
    from conic_qp.omero.connection import OmeroConnection, resolve_credentials

    port = _free_port()  # nothing listens there
    log_file = tmp_path / "debug.log"
    handler = logging.FileHandler(log_file)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        env = {"OMERO_HOST": "127.0.0.1", "OMERO_PORT": str(port), "OMERO_USER": "ana",
               "OMERO_PASSWORD": PASSWORD}  # fmt: skip
        for creds in (
            resolve_credentials(environ=env, session_dir=tmp_path / "none"),
            resolve_credentials(session_key=KEY, environ=env, session_dir=tmp_path / "none"),
        ):
            conn = OmeroConnection(creds)
            with pytest.raises(ConicQPError) as info:
                conn.connect()
            msg = str(info.value)
            assert "connection refused" in msg and f"127.0.0.1:{port}" in msg and "\n" not in msg
            assert PASSWORD not in msg and KEY not in msg and PASSWORD not in repr(conn)
            # omero-py logs session uuids at INFO/DEBUG ("created connection (uuid=...)")
            logging.getLogger("omero.gateway").info("created connection (uuid=%s)", KEY)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()
    text = log_file.read_text()
    assert PASSWORD not in text and KEY not in text


def test_redaction_while_connected(om: Any, tmp_path: Path) -> None:
    from conic_qp.omero.connection import redact_secrets

    log_file = tmp_path / "x.log"
    handler = logging.FileHandler(log_file)
    lg = logging.getLogger("conic_qp.test_redaction")
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        with redact_secrets([PASSWORD, KEY]):
            lg.warning("joined %s with %s", KEY, PASSWORD)
            logging.getLogger("omero.gateway").warning("session %s", KEY)
        lg.warning("after: %s", "visible")
    finally:
        lg.removeHandler(handler)
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = log_file.read_text()
    assert KEY not in text and PASSWORD not in text and "joined *** with ***" in text
    assert "visible" in text


def test_composition_summary_feeds_map_annotations(om: Any) -> None:
    from conic_qp.composition import CompositionRegion
    from conic_qp.omero.results import composition_pairs
    from conic_qp.omero.sinks import composition_summary
    from tests.test_omero import _nuclei

    classes = ClassScheme.from_names("s", ["a", "b"])
    df = _nuclei(classes, 6)
    df["centroid_x"] = [10.0, 20.0, 30.0, 510.0, 520.0, 530.0]
    df["centroid_y"] = 10.0
    df["polygon_wkb"] = [shapely.to_wkb(shapely.Point(x, 10.0).buffer(3)) for x in df["centroid_x"]]
    df.attrs["classes"] = classes
    df.attrs["conic_qp"] = {"mpp": 0.5}
    region = CompositionRegion("left", shapely.box(0, 0, 100, 100), None, "77")
    run = {"tissue_area_px": 4e6, "slide": {"mpp": 0.5}}
    summary = composition_summary(df, [region], run, "image 1")
    assert list(summary["region"]) == ["all", "left"] and list(summary["total"]) == [6, 3]
    assert summary["area_mm2"].iloc[0] == pytest.approx(4e6 * 0.25 / 1e6)
    pairs = dict(composition_pairs({str(k): v for k, v in summary.iloc[1].items()}))
    assert pairs["region_id"] == "77" and pairs["count_a"] == "2" and pairs["count_b"] == "1"
    assert isinstance(summary, pd.DataFrame)


def test_group_selection_by_name_or_id(om: Any) -> None:
    import omero.gateway

    from conic_qp.omero.connection import OmeroConnection, OmeroCredentials

    class Group:
        def __init__(self, gid: int, name: str) -> None:
            self.gid, self.name = gid, name

        def getId(self) -> int:
            return self.gid

        def getName(self) -> str:
            return self.name

    class Gateway:
        def __init__(self) -> None:
            self.SERVICE_OPTS = omero.gateway.ServiceOptsDict()
            self.switched: list[int] = []

        def getGroupsMemberOf(self) -> list[Group]:
            return [Group(3, "pathology"), Group(5, "imaging core")]

        def setGroupForSession(self, gid: int) -> bool:
            self.switched.append(gid)
            return True

    conn = OmeroConnection(OmeroCredentials("h", 4064, "ana", PASSWORD))
    conn._gateway = gw = Gateway()
    assert conn._select_group("imaging core") == 5 and gw.SERVICE_OPTS.getOmeroGroup() == "5"
    assert conn._select_group("3") == 3 and gw.switched == [5, 3]
    with pytest.raises(ConicQPError) as info:
        conn._select_group("radiology")
    msg = info.value.render(cli_flag)  # as the CLI prints it
    assert "not a member" in msg and "imaging core, pathology" in msg and "--group" in msg


def test_removing_partial_objects_keeps_only_what_a_dead_connection_left(om: Any) -> None:
    """What a journal must keep: objects a lost connection could not delete; a delete the
    server refuses (objects already gone) is not retried forever."""
    from conic_qp.omero.results import remove_objects

    class Conn:
        def __init__(self, errors: dict[str, BaseException]) -> None:
            self.errors = errors
            self.deleted: list[tuple[str, list[int]]] = []

        def deleteObjects(self, kind: str, ids: list[int], wait: bool = False) -> None:
            if kind in self.errors:
                raise self.errors[kind]
            self.deleted.append((kind, ids))

    objects = {"Roi": [1, 2], "Annotation": [3], "OriginalFile": [4]}
    conn = Conn({"Roi": om.Ice.ConnectionLostException(),
                 "Annotation": om.omero.ApiUsageException(None, None, "no such object")})  # fmt: skip
    assert remove_objects(conn, objects) == {"Roi": [1, 2]}
    assert conn.deleted == [("OriginalFile", [4])]
    assert remove_objects(Conn({}), objects) == {}
