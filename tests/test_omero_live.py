"""Against a REAL OMERO server. Skipped (with the reason printed by ``-ra``) unless configured:

    OMERO_TEST_HOST=omero.example.org OMERO_TEST_USER=me OMERO_TEST_PASSWORD=... \
        python -m pytest -ra -m omero_live tests/test_omero_live.py

Optional: ``OMERO_TEST_PORT`` (default 4064); ``OMERO_TEST_IMAGE``, the id of a pyramidal 8-bit
RGB H&E image with a pixel size (for the two-level read); ``OMERO_TEST_GROUP2``, a second group
you belong to (for the cross-group write). The tests create a dataset named
``conic-qp-live-test-<random>`` with small synthetic images and delete it at the end; they
write conic-qp results only to those images (and read ``OMERO_TEST_IMAGE`` without writing).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conic_qp.errors import ConicQPError

pytestmark = pytest.mark.omero_live


def _creds(**over: Any) -> Any:
    from conic_qp.omero.connection import OmeroCredentials

    kw = dict(
        host=os.environ["OMERO_TEST_HOST"],
        port=int(os.environ.get("OMERO_TEST_PORT") or 4064),
        user=os.environ["OMERO_TEST_USER"],
        password=os.environ["OMERO_TEST_PASSWORD"],
        source="test environment",
    )
    kw.update(over)
    return OmeroCredentials(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def connection() -> Iterator[Any]:
    from conic_qp.omero.connection import OmeroConnection

    with OmeroConnection(_creds()) as conn:
        yield conn


@pytest.fixture(scope="module")
def dataset(connection: Any) -> Iterator[Any]:
    """A scratch dataset, deleted with its images at the end."""
    import omero
    from omero.rtypes import rstring

    gw = connection.gateway
    ds = omero.model.DatasetI()
    ds.setName(rstring(f"conic-qp-live-test-{uuid.uuid4().hex[:8]}"))
    ds = gw.getUpdateService().saveAndReturnObject(ds, gw.SERVICE_OPTS)
    wrapped = gw.getObject("Dataset", ds.getId().getValue())
    try:
        yield wrapped
    finally:
        gw.deleteObjects("Dataset", [wrapped.getId()], deleteChildren=True, wait=True)


def _synthetic_image(gw: Any, dataset: Any, name: str, mpp: float | None = 0.5) -> int:
    """Upload a small synthetic H&E image (3 uint8 channels) with a pixel size."""
    import omero
    from omero.model.enums import UnitsLength

    from conic_qp.synthetic import synthetic_slide_image

    rgb = synthetic_slide_image(320, 384, seed=3, tissue_fraction=0.6).image
    planes = (np.ascontiguousarray(rgb[..., c]) for c in range(3))
    image = gw.createImageFromNumpySeq(planes, name, sizeZ=1, sizeC=3, sizeT=1, dataset=dataset)
    if mpp is not None:
        px = gw.getQueryService().get("Pixels", image.getPixelsId(), gw.SERVICE_OPTS)
        px.setPhysicalSizeX(omero.model.LengthI(mpp, UnitsLength.MICROMETER))
        px.setPhysicalSizeY(omero.model.LengthI(mpp, UnitsLength.MICROMETER))
        gw.getUpdateService().saveObject(px, gw.SERVICE_OPTS)
    return int(image.getId())


def _run(connection: Any, ids: list[int], out: Path, **kw: Any) -> Any:
    from conic_qp.omero.jobs import run_omero_images
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import WriteOptions
    from tests.helpers_models import settings, stand_in_models

    write = kw.pop("write", WriteOptions(max_rois=30))
    return run_omero_images(connection, [OmeroRef("image", i) for i in ids], stand_in_models(),
                            settings(save_labels=False), out, write=write, **kw)  # fmt: skip


def test_live_wrong_password_is_one_line() -> None:
    from conic_qp.omero.connection import OmeroConnection

    with pytest.raises(ConicQPError) as info:
        OmeroConnection(_creds(password="certainly-not-the-password")).connect()
    assert "refused the login" in str(info.value) and "certainly" not in str(info.value)


def test_live_pyramid_read_at_two_levels(connection: Any) -> None:
    from PIL import Image

    from conic_qp.omero.source import OmeroSource

    iid = os.environ.get("OMERO_TEST_IMAGE")
    if not iid:
        pytest.skip("set OMERO_TEST_IMAGE to a pyramidal 8-bit RGB image id with a pixel size")
    gw = connection.gateway
    gw.SERVICE_OPTS.setOmeroGroup(-1)
    image = gw.getObject("Image", int(iid))
    assert image is not None, f"image {iid} not visible"
    with OmeroSource(gw, image, server=connection.server) as src:
        assert len(src.level_mpps) > 1, "OMERO_TEST_IMAGE has no pyramid"
        w, h = src.dimensions
        box = (w / 2 - 1024, h / 2 - 1024, 2048, 2048)
        fine = src.read(box, src.mpp)  # level 0
        coarse = src.read(box, src.level_mpps[1])  # the next level
        assert fine.shape == (2048, 2048, 3) and coarse.shape[0] < 2048
        small = np.asarray(Image.fromarray(fine).resize(coarse.shape[1::-1]), float)
        assert np.abs(small - coarse).mean() < 12  # the same tissue at both levels
        thumb, ds = src.thumbnail(1024)
        assert max(thumb.shape[:2]) <= 1024 and ds >= 1


def test_live_write_read_back_cap_and_replace(
    connection: Any, dataset: Any, tmp_path: Path
) -> None:
    from conic_qp.omero.jobs import image_stem, load_omero_cohort
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import (
        NS_COMPOSITION,
        NS_GEOJSON,
        NS_TABLE,
        ROI_NAME,
        WriteOptions,
        read_image_table,
    )
    from conic_qp.sinks.tables import read_table

    gw = connection.gateway
    iid = _synthetic_image(gw, dataset, "conic-qp live synthetic")
    out = tmp_path / "out"
    batch = _run(connection, [iid], out)
    assert batch.ok, batch.failures
    local = read_table(out / f"{image_stem(connection.credentials.host, iid)}.nuclei.parquet")
    back = read_image_table(gw, iid, connection.server)
    assert list(back["id"]) == list(local["id"]) and len(back) > 20
    np.testing.assert_allclose(back["centroid_x"], local["centroid_x"])
    assert back.attrs["classes"].names == ["dark", "pale"]
    image = gw.getObject("Image", iid)
    assert len(list(image.listAnnotations(ns=NS_GEOJSON))) == 1
    assert len(list(image.listAnnotations(ns=NS_COMPOSITION))) == 1
    tables = [a for a in image.listAnnotations(ns=NS_TABLE)]
    assert len(tables) == 1
    rois = gw.getRoiService().findByImage(iid, None, gw.SERVICE_OPTS).rois
    assert len([r for r in rois if r.getName().getValue() == ROI_NAME]) == min(30, len(local))
    # a re-run replaces; --keep keeps
    assert _run(connection, [iid], tmp_path / "again").ok
    image = gw.getObject("Image", iid)
    assert len(list(image.listAnnotations(ns=NS_TABLE))) == 1
    assert _run(connection, [iid], tmp_path / "keep", write=WriteOptions(replace=False)).ok
    image = gw.getObject("Image", iid)
    assert len(list(image.listAnnotations(ns=NS_TABLE))) == 2
    slides, failures, tmp = load_omero_cohort(connection, [OmeroRef("image", iid)])
    assert not failures and len(slides) == 1
    if tmp is not None:
        tmp.cleanup()


def test_live_bad_images_are_listed(connection: Any, dataset: Any, tmp_path: Path) -> None:
    gw = connection.gateway
    no_size = _synthetic_image(gw, dataset, "conic-qp live no pixel size", mpp=None)
    batch = _run(connection, [no_size, 2**62], tmp_path / "out")
    errors = {r.image_id: r.error or "" for r in batch.images}
    assert "--mpp" in errors[no_size] and "not found" in errors[2**62]
    assert _run(connection, [no_size], tmp_path / "out2", mpp=0.5).ok


def test_live_second_group(tmp_path: Path) -> None:
    import omero
    from omero.rtypes import rstring

    from conic_qp.omero.connection import OmeroConnection
    from conic_qp.omero.results import NS_TABLE

    group = os.environ.get("OMERO_TEST_GROUP2")
    if not group:
        pytest.skip("set OMERO_TEST_GROUP2 to a second group you are a member of")
    with OmeroConnection(_creds(group=group)) as conn:
        gw = conn.gateway
        gid = conn.group_id
        ds = omero.model.DatasetI()
        ds.setName(rstring(f"conic-qp-live-test-{uuid.uuid4().hex[:8]}"))
        saved = gw.getUpdateService().saveAndReturnObject(ds, gw.SERVICE_OPTS)
        ds_id = int(saved.getId().getValue())
        iid = _synthetic_image(gw, gw.getObject("Dataset", ds_id), "conic-qp live group 2")
    try:
        # a default connection (no --group) finds the image and writes into its group
        with OmeroConnection(_creds()) as conn:
            assert _run(conn, [iid], tmp_path / "out").ok
            gw = conn.gateway
            gw.SERVICE_OPTS.setOmeroGroup(-1)
            (ann,) = list(gw.getObject("Image", iid).listAnnotations(ns=NS_TABLE))
            assert ann.getDetails().getGroup().getId() == gid
        with pytest.raises(ConicQPError, match="not a member"):
            OmeroConnection(_creds(group="no-such-group-conic-qp")).connect()
    finally:
        with OmeroConnection(_creds(group=group)) as conn:
            conn.gateway.deleteObjects("Dataset", [ds_id], deleteChildren=True, wait=True)


def test_live_dead_connection_mid_upload_leaves_earlier_results_only(
    connection: Any, dataset: Any, tmp_path: Path
) -> None:
    """The linking transaction and every delete fail as on a dead connection: the image keeps
    its earlier results, the new objects stay unlinked and journaled, and the next upload
    deletes them on the server before writing."""
    import Ice

    from conic_qp.omero.connection import OmeroConnection, OmeroConnectionLost
    from conic_qp.omero.jobs import image_stem
    from conic_qp.omero.results import NS_TABLE, WriteOptions
    from conic_qp.omero.sinks import OmeroSink, pending_path
    from conic_qp.predict import output_paths
    from conic_qp.sinks.detections import Detections
    from conic_qp.sinks.tables import read_table

    gw = connection.gateway
    iid = _synthetic_image(gw, dataset, "conic-qp live journal")
    out = tmp_path / "out"
    assert _run(connection, [iid], out).ok  # complete earlier results
    linked = {int(a.getId()) for a in gw.getObject("Image", iid).listAnnotations()}

    class Update:  # the real IUpdate, but the transaction that links the results drops
        def __init__(self, real: Any) -> None:
            self.real = real

        def saveArray(self, *args: Any, **kw: Any) -> None:
            raise Ice.ConnectionLostException()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    class Gateway:
        def __init__(self, real: Any) -> None:
            self.real = real

        def getUpdateService(self) -> Any:
            return Update(self.real.getUpdateService())

        def deleteObjects(self, *args: Any, **kw: Any) -> None:
            raise Ice.ConnectionLostException()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    class Dying(OmeroConnection):
        def connect(self) -> Any:
            self._gateway = Gateway(connection.gateway)
            self._owned = False
            return self._gateway

    paths = output_paths(out, image_stem(connection.credentials.host, iid))
    det = Detections(str(iid), "live", paths["table"], read_table(paths["table"]).attrs["classes"],
                     outputs=paths)  # fmt: skip
    with pytest.raises(OmeroConnectionLost):
        OmeroSink(Dying(_creds()), WriteOptions(max_rois=10), retries=0).write(det)
    now = {int(a.getId()) for a in gw.getObject("Image", iid).listAnnotations()}
    assert now == linked
    journal = json.loads(pending_path(det.table).read_text())["objects"]
    assert journal["Annotation"] and len(journal["Roi"]) == 10
    assert all(gw.getObject("Annotation", a) is not None for a in journal["Annotation"])
    OmeroSink(connection, WriteOptions(max_rois=10)).write(det)
    assert not pending_path(det.table).exists()
    assert all(gw.getObject("Annotation", a) is None for a in journal["Annotation"])
    assert all(gw.getObject("Roi", r) is None for r in journal["Roi"])
    assert len(list(gw.getObject("Image", iid).listAnnotations(ns=NS_TABLE))) == 1


@pytest.mark.slow
def test_live_cluster_workers_log_in_themselves(
    connection: Any, dataset: Any, tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    import functools

    import pandas as pd

    from conic_qp.cluster import ClusterSpec, DaskRunner, open_cluster
    from conic_qp.cohort import ModelSpec
    from conic_qp.omero.jobs import run_omero_images, run_omero_job_task
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import NS_TABLE, WriteOptions
    from conic_qp.predict import load_models
    from tests.helpers_models import make_tiny_checkpoint, settings

    gw = connection.gateway
    iid = _synthetic_image(gw, dataset, "conic-qp live cluster")
    models = load_models([make_tiny_checkpoint(tmp_path / "tiny")], device="cpu")
    c = connection.credentials
    env = {"OMERO_HOST": c.host, "OMERO_PORT": str(c.port), "OMERO_USER": str(c.user),
           "OMERO_PASSWORD": str(c.password)}  # fmt: skip
    spec = ClusterSpec("local", n_workers=1, torch_threads=1, dashboard=False)
    with open_cluster(spec, device="cpu", worker_env=env) as client:
        runner = DaskRunner(client, task=functools.partial(run_omero_job_task, retries=1))
        batch = run_omero_images(
            connection, [OmeroRef("image", iid)], models,
            settings(save_labels=False, tile_size=128, halo=32, workers=1), tmp_path / "out",
            write=WriteOptions(), runner=runner, model_spec=ModelSpec.from_models(models, "cpu"),
        )  # fmt: skip
        workers = set(client.scheduler_info()["workers"])
    assert batch.ok, batch.failures
    assert set(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["worker"]) <= workers
    assert len(list(gw.getObject("Image", iid).listAnnotations(ns=NS_TABLE))) == 1
