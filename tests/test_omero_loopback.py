"""OMERO over real Ice calls on 127.0.0.1 against FAKE servants (tests/helpers_omero.py).

These test the wire format and object construction of conic-qp's OMERO code - RawPixelsStore
reads with inverted levels and big-endian bytes, ROI batches arriving at IUpdate, columns stored
by omero-py's own server-side OMERO.tables code (PyTables), file uploads through omero-py's
upload code - and the job logic around them (order, replacing, rollback, retries, resume). They
do not show that a real OMERO server behaves like the fakes: that is tests/test_omero_live.py.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError

pytestmark = [
    pytest.mark.omero,
    pytest.mark.skipif(
        importlib.util.find_spec("tables") is None,
        reason="needs PyTables: the fake table servant is omero-py's server-side TableI",
    ),
]

PASSWORD = "planted-Pa55word-7c1e"
KEY = "0c7d6a5e-planted-session-key-91b2"


@pytest.fixture()
def srv() -> Any:
    from tests.helpers_omero import LoopbackServer

    with LoopbackServer() as server:
        yield server


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _image_with_pixels(srv: Any, image_id: int, levels: list[np.ndarray], **kw: Any) -> Any:
    from tests.helpers_omero import FakeRawPixelsStore, add_pixels, make_image

    tile = kw.pop("tile", (128, 96))
    interleaved = kw.pop("interleaved", False)
    img = make_image(image_id, (levels[0].shape[1], levels[0].shape[0]), **kw)
    store = FakeRawPixelsStore(srv.db, levels, tile, interleaved=interleaved)
    add_pixels(srv, img, store)
    return img, store


# ---------------------------------------------------------------------------- pixels


def test_source_reads_every_level_exactly(srv: Any) -> None:
    from conic_qp.omero.source import OmeroSource
    from tests.helpers_omero import LoopbackConn
    from tests.helpers_slides import pyramid

    levels = pyramid(_rgb(300, 400), 3)
    img, store = _image_with_pixels(srv, 5, levels)
    conn = LoopbackConn(srv, {5: img})
    with OmeroSource(conn, conn.getObject("Image", 5)) as src:
        assert src.dimensions == (400, 300) and src.mpp == 0.5
        assert src.level_mpps == pytest.approx((0.5, 1.0, 2.0), rel=0.01)
        for mpp, level in ((0.5, 0), (1.0, 1), (2.0, 2)):
            h, w = levels[level].shape[:2]
            src._cache.clear()
            store.tiles_read.clear()
            got = src.read((0, 0, 400, 300), mpp, size=(w, h))
            np.testing.assert_array_equal(got, levels[level])
            # OMERO numbers levels from the smallest: our level 0 is its level 2
            assert {t[0] for t in store.tiles_read} == {2 - level}
        # a window across tile borders, and a region leaving the image (glass is white)
        np.testing.assert_array_equal(src.read((100, 90, 60, 20), 0.5), levels[0][90:110, 100:160])
        edge = src.read((380, 280, 40, 40), 0.5)
        np.testing.assert_array_equal(edge[:20, :20], levels[0][280:, 380:])
        assert (edge[20:, :] == 255).all() and (edge[:, 20:] == 255).all()
        n = len(store.tiles_read)
        src.read((100, 90, 60, 20), 0.5)  # cached server tiles are not fetched again
        assert len(store.tiles_read) == n
        # tissue detection reads the thumbnail from the coarsest level only
        src._cache.clear()
        store.tiles_read.clear()
        thumb, ds = src.thumbnail(100)
        assert thumb.shape == (75, 100, 3) and ds == 4
        assert {t[0] for t in store.tiles_read} == {0}
    assert "rps.close" in srv.db.calls


def test_source_interleaved_plane_and_single_level(srv: Any) -> None:
    from conic_qp.omero.source import OmeroSource
    from tests.helpers_omero import LoopbackConn

    full = _rgb(150, 200, 1)
    img, store = _image_with_pixels(srv, 6, [full], size_c=1, interleaved=True, tile=(64, 64))
    conn = LoopbackConn(srv, {6: img})
    with OmeroSource(conn, conn.getObject("Image", 6)) as src:
        np.testing.assert_array_equal(src.read((0, 0, 200, 150), 0.5), full)
        assert {t[1] for t in store.tiles_read} == {0}  # one plane, three bytes per pixel
    # one level: setResolutionLevel (which raises for non-pyramids) was never needed
    assert store.level == 0


def test_grey_image_is_refused_at_open(srv: Any) -> None:
    from conic_qp.omero.source import OmeroSource
    from tests.helpers_omero import LoopbackConn

    grey = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    img, _ = _image_with_pixels(srv, 7, [grey], size_c=1, tile=(64, 64))
    conn = LoopbackConn(srv, {7: img})
    with pytest.raises(ConicQPError, match="grey"):
        OmeroSource(conn, conn.getObject("Image", 7))


def test_missing_pixel_size_rescued_by_mpp(srv: Any) -> None:
    from conic_qp.omero.source import OmeroSource
    from tests.helpers_omero import LoopbackConn

    img, _ = _image_with_pixels(srv, 8, [_rgb(64, 64)], mpp=None)
    conn = LoopbackConn(srv, {8: img})
    with pytest.raises(ConicQPError, match="pass mpp"):
        OmeroSource(conn, conn.getObject("Image", 8))
    with OmeroSource(conn, conn.getObject("Image", 8), mpp=0.25) as src:
        assert src.mpp == 0.25


# ---------------------------------------------------------------------------- writing


def _table(classes: ClassScheme, n: int, seed: int = 0) -> pd.DataFrame:
    from tests.test_omero import _nuclei

    df = _nuclei(classes, n)
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(10, 3000, n), rng.uniform(10, 3000, n)
    df["centroid_x"], df["centroid_y"] = xs, ys
    df["id"] = [f"{seed:02d}{i:06d}-aaaa-bbbb-cccc-dddddddddddd" for i in range(n)]
    df["polygon_wkb"] = [
        shapely.to_wkb(shapely.Point(x, y).buffer(4, 3)) for x, y in zip(xs, ys, strict=True)
    ]
    df.attrs["classes"] = classes
    df.attrs["conic_qp"] = {"mpp": 0.5}
    return df


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    from conic_qp.composition import (
        CompositionRegion,
        composition_table,
        summary_table,
        whole_region,
    )

    classes = df.attrs["classes"]
    regs = [
        whole_region(9e6),
        CompositionRegion("left", shapely.box(0, 0, 1500, 3000), "Tumor", "31"),
    ]
    return summary_table(
        composition_table(df, regs, classes.names, slide="s", mpp=0.5), classes.names
    )


def _geojson(tmp_path: Path) -> Path:
    path = tmp_path / "n.geojson.gz"
    path.write_bytes(gzip.compress(b'{"type": "FeatureCollection", "features": []}'))
    return path


def _linked(srv: Any, image_id: int) -> dict[str, list[Any]]:
    from omero.rtypes import unwrap

    out: dict[str, list[Any]] = {}
    for aid in srv.db.links.get(image_id, set()):
        ann = srv.db.annotations[aid]
        out.setdefault(unwrap(ann.getNs()), []).append(ann)
    return out


def test_write_results_table_rois_attachment_and_pairs(srv: Any, tmp_path: Path) -> None:
    from omero.rtypes import unwrap

    from conic_qp.omero.results import (
        NS_COMPOSITION,
        NS_GEOJSON,
        NS_REGION,
        NS_TABLE,
        WriteOptions,
        write_image_results,
    )
    from tests.helpers_omero import LoopbackConn, make_image

    classes = ClassScheme.from_names("s", ["épithélium", "lymphocyte"])
    df = _table(classes, 600)
    conn = LoopbackConn(srv, {9: make_image(9, (3000, 3000))})
    opts = WriteOptions(max_rois=450, roi_batch=200, table_batch_bytes=16 * 1024)
    gj = _geojson(tmp_path)
    done = write_image_results(conn, 9, df, gj, _summary(df), opts, metadata={"model": "m"})
    # ROIs: capped, in batches, one polygon each, marked as conic-qp's
    assert srv.db.roi_batches == [200, 200, 50] and len(done.roi_ids) == 450
    roi = srv.db.rois[done.roi_ids[0]]
    assert unwrap(roi.getName()) == "conic-qp nucleus" and unwrap(roi.getImage().getId()) == 9
    # the table: stored by omero-py's TableI; every row, typed columns, UTF-8 string widths
    cols = srv.read_table(done.table_file_id)
    assert len(cols["Image"]) == 600 and set(cols["Image"]) == {9}
    assert list(cols["nucleus_id"]) == list(df["id"])
    np.testing.assert_allclose(cols["centroid_x"], df["centroid_x"])
    assert list(cols["class_name"]) == list(df["class_name"])  # "épithélium" survived
    roi_col = np.asarray(cols["Roi"])
    assert (roi_col > 0).sum() == 450 and (roi_col == -1).sum() == 150
    assert set(roi_col[roi_col > 0]) == set(done.roi_ids)
    # rows of an ROI carry its polygon (ROI ids in the table point at the right nucleus)
    i = int(np.flatnonzero(roi_col > 0)[0])
    pts = unwrap(srv.db.rois[int(roi_col[i])].copyShapes()[0].getPoints())
    first = [float(v) for v in pts.split()[0].split(",")]
    assert (
        shapely.from_wkb(df["polygon_wkb"].iloc[i]).exterior.distance(shapely.Point(first)) < 0.01
    )
    # everything linked to the image at once, under conic-qp namespaces
    linked = _linked(srv, 9)
    assert len(linked[NS_TABLE]) == 1 and len(linked[NS_GEOJSON]) == 1
    assert len(linked[NS_COMPOSITION]) == 1 and len(linked[NS_REGION]) == 1
    region = dict((nv.name, nv.value) for nv in linked[NS_REGION][0].getMapValue())
    assert region["region"] == "left" and region["region_id"] == "31" and region["model"] == "m"
    whole = dict((nv.name, nv.value) for nv in linked[NS_COMPOSITION][0].getMapValue())
    assert whole["total"] == "600"
    # the GeoJSON went through omero-py's upload code, byte for byte
    fa = linked[NS_GEOJSON][0]
    fid = unwrap(fa.getFile().getId())
    assert srv.db.file_bytes[fid] == gj.read_bytes()
    assert unwrap(srv.db.files[fid].getName()) == "conic-qp_image-9.geojson.gz"


def test_string_column_width_is_enforced_by_the_table_code(srv: Any) -> None:
    """Why sizes are UTF-8 bytes: omero.columns refuses longer values (ValidationException)."""
    import omero

    from conic_qp.omero.results import ColumnSpec, build_columns

    ic = srv.client()
    shared = srv.proxy(ic, "shared", omero.grid.SharedResourcesPrx)
    t = shared.newTable(1, "x.h5")
    spec = [ColumnSpec("string", "name", "name", size=len("µm"))]  # 2 characters, 3 bytes
    t.initialize(build_columns(spec, None, 1))
    with pytest.raises(omero.ValidationException):
        t.addData(build_columns(spec, pd.DataFrame({"name": ["µm"]}), 1))
    t.close()


def test_rerun_replaces_keep_keeps_and_others_are_untouched(srv: Any, tmp_path: Path) -> None:
    import omero
    from omero.rtypes import rstring

    from conic_qp.omero.results import NS_TABLE, WriteOptions, write_image_results
    from tests.helpers_omero import LoopbackConn, make_image

    classes = ClassScheme.from_names("s", ["a", "b"])
    conn = LoopbackConn(srv, {9: make_image(9, (3000, 3000))})
    # someone else's annotation and ROI on the image
    other = omero.model.MapAnnotationI()
    other.setNs(rstring("lab/notes"))
    other_id = srv.update._save(other).getId().getValue()
    srv.db.links.setdefault(9, set()).add(other_id)
    user_roi = omero.model.RoiI()
    user_roi.setName(rstring("tumour"))
    user_roi.setImage(omero.model.ImageI(9, False))
    user_roi_id = srv.update._save(user_roi).getId().getValue()
    opts = WriteOptions(max_rois=10)
    first = write_image_results(
        conn, 9, _table(classes, 20, 1), _geojson(tmp_path), _summary(_table(classes, 20, 1)), opts
    )
    second = write_image_results(
        conn, 9, _table(classes, 30, 2), _geojson(tmp_path), _summary(_table(classes, 30, 2)), opts
    )
    assert second.replaced == {"Annotation": 4, "Roi": 10}  # table, GeoJSON, 2 pairs
    linked = _linked(srv, 9)
    assert len(linked[NS_TABLE]) == 1 and other_id in srv.db.links[9]
    assert user_roi_id in srv.db.rois and not set(first.roi_ids) & set(srv.db.rois)
    assert len(srv.read_table(second.table_file_id)["Image"]) == 30
    assert first.table_file_id not in srv.db.files  # the old table's file went with it
    keep = write_image_results(
        conn, 9, _table(classes, 5, 3), None, None, WriteOptions(replace=False)
    )
    assert keep.replaced == {} and len(_linked(srv, 9)[NS_TABLE]) == 2


def test_dropped_connection_during_upload_leaves_nothing_half_written(
    srv: Any, tmp_path: Path
) -> None:
    from conic_qp.omero.connection import OmeroConnectionLost
    from conic_qp.omero.results import NS_TABLE, WriteOptions, write_image_results
    from tests.helpers_omero import LoopbackConn, make_image

    classes = ClassScheme.from_names("s", ["a", "b"])
    conn = LoopbackConn(srv, {9: make_image(9, (3000, 3000))})
    df = _table(classes, 40)
    good = write_image_results(
        conn, 9, df, _geojson(tmp_path), _summary(df), WriteOptions(max_rois=40)
    )
    before = (set(srv.db.rois), set(srv.db.annotations), set(srv.db.links[9]))
    for op in ("saveArray", "newTable", "saveAndReturnArray"):
        srv.db.drop[op] = 0 if op != "saveAndReturnArray" else 1  # ROIs: second batch drops
        conn = LoopbackConn(srv, {9: make_image(9, (3000, 3000))})
        with pytest.raises(OmeroConnectionLost):
            write_image_results(conn, 9, _table(classes, 40, 5), _geojson(tmp_path), _summary(df),
                                WriteOptions(max_rois=40, roi_batch=20))  # fmt: skip
        # the earlier complete result is untouched, and nothing of the failed call remains
        assert (set(srv.db.rois), set(srv.db.annotations), set(srv.db.links[9])) == before, op
    assert len(_linked(srv, 9)[NS_TABLE]) == 1 and good.table_file_id in srv.db.files


# ---------------------------------------------------------------------------- jobs


class _Connection:
    """An OmeroConnection whose logins give LoopbackConns (the real login is tested elsewhere);
    ``gateways``: the gateway class of each login in turn (then LoopbackConn)."""

    def __new__(cls, srv: Any, images: dict[int, Any], gateways: tuple[type, ...] = ()) -> Any:
        from conic_qp.omero.connection import OmeroConnection, OmeroCredentials
        from tests.helpers_omero import LoopbackConn

        kinds = list(gateways)

        class Fake(OmeroConnection):
            logins = 0

            def connect(self) -> Any:
                Fake.logins += 1
                gateway = kinds.pop(0) if kinds else LoopbackConn
                self._gateway = gateway(srv, images)
                self._owned = True
                return self._gateway

        creds = OmeroCredentials("127.0.0.1", srv.port, "ana", PASSWORD, KEY, None, "test")
        return Fake(creds)


def _dead_conn() -> type:
    """A LoopbackConn whose connection is gone for good once a call dropped: deletes (the
    rollback) fail like every call on a dead connection."""
    import Ice

    from tests.helpers_omero import LoopbackConn

    class Dead(LoopbackConn):
        def deleteObjects(self, kind: str, ids: list[int], wait: bool = False) -> None:
            raise Ice.ConnectionLostException()

    return Dead


def _predicted(tmp_path: Path, df: pd.DataFrame, stem: str = "img") -> Any:
    """A finished local prediction of ``df`` as the sink receives it."""
    from conic_qp.predict import output_paths
    from conic_qp.sinks.detections import Detections
    from conic_qp.sinks.tables import read_table, write_table

    paths = output_paths(tmp_path, stem)
    plain = df.copy()
    plain.attrs = {}  # the classes go into the Parquet metadata
    write_table(plain, paths["table"], classes=df.attrs["classes"], mpp=0.5)
    paths["geojson"].write_bytes(_geojson(tmp_path).read_bytes())
    run = {"complete": True, "slide": {"mpp": 0.5}, "tissue_area_px": 9e6, "models": []}
    paths["run"].write_text(json.dumps(run))
    classes = read_table(paths["table"]).attrs["classes"]
    return Detections("9", "slide [image 9]", paths["table"], classes, outputs=paths)


def _file_ids(srv: Any, image_id: int) -> set[int]:
    from omero.rtypes import unwrap

    anns = [srv.db.annotations[a] for a in srv.db.links.get(image_id, set())]
    return {unwrap(a.getFile().getId()) for a in anns if hasattr(a, "getFile") and a.getFile()}


def test_omero_sink_replaces_only_complete_results_and_keep_keeps_them(
    srv: Any, tmp_path: Path
) -> None:
    from conic_qp.omero.results import NS_COMPOSITION, NS_GEOJSON, NS_TABLE, WriteOptions
    from conic_qp.omero.sinks import OmeroSink
    from conic_qp.sinks.detections import DetectionSink
    from tests.helpers_omero import make_image

    classes = ClassScheme.from_names("s", ["a", "b"])
    conn = _Connection(srv, {9: make_image(9, (3000, 3000))})
    sink = OmeroSink(conn, WriteOptions(max_rois=10))
    assert isinstance(sink, DetectionSink) and sink.open(classes) == []
    first = sink.write(_predicted(tmp_path / "1", _table(classes, 30)))
    linked = _linked(srv, 9)
    assert {len(linked[ns]) for ns in (NS_TABLE, NS_GEOJSON, NS_COMPOSITION)} == {1}
    assert first.counts_by_parent == {None: 30} and first.removed == 0
    assert len(srv.db.rois) == 10 == first.record["n_rois"]
    second = sink.write(_predicted(tmp_path / "2", _table(classes, 20, 1)))
    assert second.removed > 0 and len(srv.db.rois) == 10
    (table,) = _linked(srv, 9)[NS_TABLE]
    assert len(srv.read_table(table.getFile().getId().getValue())["Image"]) == 20
    keep = OmeroSink(conn, WriteOptions(replace=False))  # --keep: history stays
    assert keep.write(_predicted(tmp_path / "3", _table(classes, 5, 2))).removed == 0
    assert len(_linked(srv, 9)[NS_TABLE]) == 2
    assert not list(tmp_path.rglob("*.omero-pending.json"))
    with pytest.raises(ValueError):  # an unfinished prediction is never uploaded
        det = _predicted(tmp_path / "4", _table(classes, 5))
        det.outputs["run"].write_text(json.dumps({"complete": False}))
        sink.write(det)


def test_connection_dying_mid_upload_leaves_earlier_results_and_no_partial_ones(
    srv: Any, tmp_path: Path
) -> None:
    """The link transaction drops and the rollback cannot reach the server: the new objects
    stay unlinked, journaled, and the next attempt (after a new login) removes them first."""
    from conic_qp.omero.connection import OmeroConnectionLost
    from conic_qp.omero.results import WriteOptions
    from conic_qp.omero.sinks import OmeroSink, pending_path
    from tests.helpers_omero import make_image

    classes = ClassScheme.from_names("s", ["a", "b"])
    images = {9: make_image(9, (3000, 3000))}
    good = OmeroSink(_Connection(srv, images), WriteOptions(max_rois=40)).write(
        _predicted(tmp_path / "old", _table(classes, 40))
    )
    before = {"links": set(srv.db.links[9]), "rois": set(srv.db.rois),
              "annotations": set(srv.db.annotations), "files": set(srv.db.files)}  # fmt: skip
    dead = _Connection(srv, images, gateways=(_dead_conn(),))
    srv.db.drop["saveArray"] = 0  # the transaction that links the new results drops
    det = _predicted(tmp_path / "new", _table(classes, 40, 5))
    with pytest.raises(OmeroConnectionLost):
        OmeroSink(dead, WriteOptions(max_rois=40), retries=0).write(det)
    assert set(srv.db.links[9]) == before["links"]  # the earlier results, complete, still there
    journal = json.loads(pending_path(det.table).read_text())["objects"]
    new_rois = set(srv.db.rois) - before["rois"]
    assert set(journal["Roi"]) == new_rois and len(new_rois) == 40  # ROIs point at the image
    assert set(journal["Annotation"]) == set(srv.db.annotations) - before["annotations"]
    assert set(journal["OriginalFile"]) <= set(srv.db.files) - before["files"]
    assert not set(journal["Annotation"]) & set(srv.db.links[9])  # none of them linked
    # the next run removes the leftovers first, then writes the whole result, replacing the old
    done = OmeroSink(_Connection(srv, images), WriteOptions(max_rois=40)).write(det)
    assert not pending_path(det.table).exists()
    linked_now = set(srv.db.links[9])
    assert not linked_now & before["links"] and done.record["table_file_id"] in srv.db.files
    assert set(srv.db.annotations) == linked_now  # no orphan annotation from any attempt
    assert len(srv.db.rois) == 40 and not set(srv.db.rois) & (before["rois"] | new_rois)
    # within one upload: the retry after a new login cleans up after the dead connection
    dead = _Connection(srv, images, gateways=(_dead_conn(),))
    srv.db.drop["saveArray"] = 0
    det2 = _predicted(tmp_path / "newer", _table(classes, 40, 6))
    again = OmeroSink(dead, WriteOptions(max_rois=40), retries=1).write(det2)
    assert type(dead).logins == 2 and not pending_path(det2.table).exists()
    assert set(srv.db.annotations) == set(srv.db.links[9]) and len(srv.db.rois) == 40
    assert set(srv.db.files) <= {again.record["table_file_id"], *_file_ids(srv, 9)}
    assert good.record["table_file_id"] not in srv.db.files


@pytest.fixture(scope="module")
def slide() -> list[np.ndarray]:
    from conic_qp.synthetic import synthetic_slide_image
    from tests.helpers_slides import pyramid

    return pyramid(synthetic_slide_image(320, 384, seed=3, tissue_fraction=0.6).image, 2)


def _job_setup(srv: Any, slide: list[np.ndarray], image_id: int = 11) -> tuple[Any, Any]:
    img, store = _image_with_pixels(srv, image_id, slide, tile=(128, 128), name="synth.svs")
    # an existing user ROI (a QuPath-exported annotation) becomes a composition region
    import omero
    from omero.rtypes import rdouble, rstring

    roi = omero.model.RoiI(900 + image_id, True)
    roi.setImage(omero.model.ImageI(image_id, False))
    rect = omero.model.RectangleI(901, True)
    for k, v in (("X", 0), ("Y", 0), ("Width", 192), ("Height", 320)):
        getattr(rect, f"set{k}")(rdouble(v))
    rect.setTextValue(
        rstring("Annotation:Tumor:0f3c5b2a-1d2e-4f6a-8b9c-0123456789ab:NoParent:left half")
    )
    roi.addShape(rect)
    srv.roi_service.extra.setdefault(image_id, []).append(roi)
    return img, store


def _run(conn: Any, ids: list[int], out: Path, **kw: Any) -> Any:
    from conic_qp.omero.jobs import run_omero_images
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import WriteOptions
    from tests.helpers_models import settings, stand_in_models

    write = kw.pop("write", WriteOptions(max_rois=50))
    return run_omero_images(conn, [OmeroRef("image", i) for i in ids], stand_in_models(),
                            settings(save_labels=False), out, write=write, **kw)  # fmt: skip


def test_job_end_to_end_resume_and_no_secrets(
    srv: Any, slide: list[np.ndarray], tmp_path: Path
) -> None:
    from omero.rtypes import unwrap

    from conic_qp.omero.jobs import image_stem
    from conic_qp.omero.results import NS_REGION, NS_TABLE
    from conic_qp.sinks.tables import read_table

    log_file = tmp_path / "run.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        img, store = _job_setup(srv, slide)
        conn = _Connection(srv, {11: img})
        out = tmp_path / "out"
        batch = _run(conn, [11], out)
        assert batch.ok, batch.failures
        (res,) = batch.images
        assert res.status == "done" and res.n_nuclei > 20 and res.n_regions == 1
        stem = image_stem("127.0.0.1", 11)
        local = read_table(out / f"{stem}.nuclei.parquet")
        run = json.loads((out / f"{stem}.run.json").read_text())
        assert run["slide"]["path"] == f"omero://127.0.0.1:{srv.port}/image/11"
        cols = srv.read_table(res.written["table_file_id"])
        assert list(cols["nucleus_id"]) == list(local["id"])
        region = dict((nv.name, nv.value) for nv in _linked(srv, 11)[NS_REGION][0].getMapValue())
        inside = int((local["centroid_x"] < 192).sum())
        assert region["region"] == "left half" and region["region_class"] == "Tumor"
        assert int(region["total"]) == inside
        # resume: nothing read, nothing written again
        n_tiles, n_files = len(store.tiles_read), len(srv.db.files)
        again = _run(conn, [11], out, resume=True)
        assert again.images[0].status == "skipped"
        assert len(store.tiles_read) == n_tiles and len(srv.db.files) == n_files
        assert len(_linked(srv, 11)[NS_TABLE]) == 1
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()
    # credentials appear in no output: local files, log, server-side table, pairs, uploads
    texts = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + [log_file.read_bytes()]
    texts += [gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b for b in srv.db.file_bytes.values()]
    texts += [json.dumps(srv.read_table(res.written["table_file_id"]), default=str).encode()]
    texts += [str([(nv.name, nv.value) for nv in a.getMapValue()]).encode()
              for a in srv.db.annotations.values() if hasattr(a, "getMapValue")]  # fmt: skip
    texts += [str(unwrap(a.getDescription())).encode() for a in srv.db.annotations.values()]
    for blob in texts:
        assert PASSWORD.encode() not in blob and KEY.encode() not in blob
    assert len(texts) > 8


def test_dropped_connection_is_retried_once(
    srv: Any, slide: list[np.ndarray], tmp_path: Path
) -> None:
    from conic_qp.omero.results import NS_TABLE

    img, _ = _job_setup(srv, slide)
    conn = _Connection(srv, {11: img})
    srv.db.drop["getTile"] = 3  # three tiles, then the connection drops mid-prediction
    batch = _run(conn, [11], tmp_path / "out")
    assert batch.ok, batch.failures
    assert batch.images[0].attempts == 2 and type(conn).logins == 2
    assert len(_linked(srv, 11)[NS_TABLE]) == 1


def test_persistent_drop_fails_cleanly_then_resume_uploads(
    srv: Any, slide: list[np.ndarray], tmp_path: Path
) -> None:
    img, store = _job_setup(srv, slide)
    conn = _Connection(srv, {11: img})
    srv.db.drop_always.add("saveArray")  # linking the results never works
    out = tmp_path / "out"
    batch = _run(conn, [11], out, retries=2)
    (res,) = batch.images
    assert res.status == "failed" and "lost" in str(res.error) and res.attempts == 1
    assert list(batch.failures) == ["image 11"]
    assert not srv.db.links.get(11) and not srv.db.rois and not srv.db.annotations
    assert not srv.db.files  # the table file was deleted too
    summary = json.loads((out / "omero-run.json").read_text())
    assert summary["images"][0]["status"] == "failed"
    # the prediction finished locally: a resumed run only uploads
    srv.db.drop_always.clear()
    n_tiles = len(store.tiles_read)
    again = _run(conn, [11], out, resume=True)
    assert again.ok and again.images[0].status == "done"
    assert len(store.tiles_read) == n_tiles and srv.db.links.get(11)


def test_bad_images_are_listed_and_the_batch_goes_on(
    srv: Any, slide: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers_omero import FakeImageWrapper, make_image

    img, _ = _job_setup(srv, slide)
    grey16, _ = _image_with_pixels(
        srv, 12, [np.zeros((64, 64), np.uint8)], pixel_type="uint16", size_c=1
    )
    locked, _ = _image_with_pixels(srv, 13, slide, tile=(128, 128))
    images = {11: img, 12: grey16, 13: locked, 14: make_image(14, (10, 10), mpp=None)}
    conn = _Connection(srv, images)
    # image 13 is someone else's, read-only for this user
    monkeypatch.setattr(FakeImageWrapper, "canAnnotate", lambda self: self.getId() != 13)
    batch = _run(conn, [99, 12, 13, 14, 11], tmp_path / "out")
    status = {r.image_id: (r.status, r.error or "") for r in batch.images}
    assert status[11][0] == "done"
    assert "not found" in status[99][1] and "permission" in status[99][1]
    assert "RGB" in status[12][1] and "uint16" in status[12][1]
    assert "no permission to annotate" in status[13][1]
    assert "pass mpp" in status[14][1]  # the CLI spells it --mpp
    assert not srv.db.links.get(13)  # refused before anything was written
    for _, msg in status.values():
        assert "\n" not in msg


def test_composition_reads_results_back_from_omero(
    srv: Any, slide: list[np.ndarray], tmp_path: Path
) -> None:
    from conic_qp.composition import compose_cohort
    from conic_qp.omero.jobs import image_stem, load_omero_cohort
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.sinks.tables import read_table

    img, _ = _job_setup(srv, slide)
    conn = _Connection(srv, {11: img})
    out = tmp_path / "out"
    assert _run(conn, [11], out).ok
    slides, failures, tmp = load_omero_cohort(conn, [OmeroRef("image", 11), OmeroRef("image", 77)])
    assert list(failures) == ["image 77"]
    (s,) = slides
    assert [r.label for r in s.regions] == ["left half"]
    _tidy, summary, scheme, failed = compose_cohort(slides)
    assert not failed and scheme is not None and scheme.names == ["dark", "pale"]
    local = read_table(out / f"{image_stem('127.0.0.1', 11)}.nuclei.parquet")
    inside = local[local["centroid_x"] < 192]
    assert int(summary["total"].iloc[0]) == len(inside)
    for name in scheme.names:
        assert int(summary[f"count_{name}"].iloc[0]) == int((inside["class_name"] == name).sum())
    if tmp is not None:
        tmp.cleanup()


def test_omero_script_runs_on_its_session(
    srv: Any, slide: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/omero/Run_conic_qp.py: inputs -> job on the script's own connection."""
    import importlib.util as iu

    import omero.scripts

    from conic_qp.omero.results import NS_TABLE
    from tests.helpers_models import stand_in_models
    from tests.helpers_omero import LoopbackConn

    spec = iu.spec_from_file_location(
        "run_conic_qp", Path(__file__).parents[1] / "scripts/omero/Run_conic_qp.py"
    )
    assert spec is not None and spec.loader is not None
    script = iu.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = {p._name: p for p in script.params()}
    assert {"Data_Type", "IDs", "Model", "Write", "Max_ROIs", "Replace", "Message"} <= set(names)
    assert isinstance(names["IDs"], omero.scripts.List) and names["Message"]._out

    img, _ = _job_setup(srv, slide)

    class Client:
        def getInputs(self, unwrap: bool = True) -> dict[str, Any]:
            return {"Data_Type": "Image", "IDs": [11], "TTA_passes": 1, "MC_dropout": False,
                    "Write": "table,map", "Max_ROIs": 5, "Device": "cpu",
                    "Output_folder": str(tmp_path / "out")}  # fmt: skip

        def getProperty(self, key: str) -> str:
            return {"omero.host": "127.0.0.1", "omero.port": str(srv.port)}[key]

    monkeypatch.setattr(script, "BlitzGateway", lambda client_obj: LoopbackConn(srv, {11: img}))
    monkeypatch.setattr("conic_qp.predict.load_models", lambda paths, device: stand_in_models())
    message = script.run(Client())
    assert message.startswith("1 image(s) done")
    assert len(_linked(srv, 11)[NS_TABLE]) == 1 and len(srv.db.rois) == 5


def test_omero_images_are_slide_references_of_a_cohort(
    srv: Any, slide: list[np.ndarray], tmp_path: Path
) -> None:
    """`omero://` references run through the same cohort loop as files (predict, no upload)."""
    from conic_qp.cohort import predict_paths
    from conic_qp.omero.source import register_connection, unregister_connection
    from conic_qp.sources import expand_refs
    from conic_qp.synthetic import synthetic_slide_image
    from tests.helpers_models import settings, stand_in_models
    from tests.helpers_slides import write_pyramidal_tiff

    img, store = _job_setup(srv, slide)
    conn = _Connection(srv, {11: img})
    conn.connect()
    register_connection(conn)
    try:
        file_slide = write_pyramidal_tiff(
            tmp_path / "f.tif", synthetic_slide_image(256, 256, seed=5).image, mpp=0.5
        )
        uri = f"omero://127.0.0.1:{srv.port}/image/11"
        refs, missing = expand_refs([uri, file_slide])
        assert [r.scheme for r in refs] == ["omero", "file"] and not missing
        out = tmp_path / "out"
        batch = predict_paths(refs, stand_in_models(), settings(save_labels=False), out)
        assert batch.ok, batch.failures
        omero_result, file_result = batch.results
        assert file_result.n_nuclei > 0 and file_result.ref.is_file
        assert omero_result.n_nuclei > 20 and store.tiles_read
        run = json.loads((out / f"{omero_result.key}.run.json").read_text())
        assert run["slide"]["path"] == uri and run["slide"]["name"] == "synth.svs [image 11]"
        manifest = pd.read_parquet(out / "manifest.parquet")
        assert list(manifest["ref"]) == [uri, str(file_slide)]
        assert list(manifest["status"]) == ["done", "done"]
        text = manifest.astype(str).to_csv()
        assert PASSWORD not in text and KEY not in text
    finally:
        unregister_connection(conn)
        conn.close()
