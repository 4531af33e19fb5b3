"""`conic-qp omero predict --cluster`: predictions on Dask worker processes, uploads here.

A LocalCluster worker (another process) opens `omero://127.0.0.1:PORT/image/ID` references
through the `omero` scheme and logs in from ITS OWN environment (the session key this process
hands to the local workers); its login is swapped for a LoopbackConn to the FAKE servants of
this process (tests/helpers_omero.py), so pixels cross real Ice calls between processes. The
client writes the results back through the OmeroSink, one image at a time. Fakes: wire format
and job logic, not a server.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = [
    pytest.mark.omero,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("tables") is None,
        reason="needs PyTables: the fake table servant is omero-py's server-side TableI",
    ),
]
pytest.importorskip("distributed")
pytest.importorskip("omero")

torch.set_num_threads(1)
PASSWORD = "planted-Pa55word-c1u5"
KEY = "5e1f-planted-cluster-session-key-77aa"
IMAGES = {11: "synth-a.svs", 12: "synth-b.svs"}


@pytest.fixture(scope="module")
def srv() -> Iterator[Any]:
    from tests.helpers_omero import LoopbackServer

    with LoopbackServer() as server:
        yield server


@pytest.fixture(scope="module")
def setup(srv: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from conic_qp.predict import load_models
    from conic_qp.synthetic import synthetic_slide_image
    from tests.helpers_models import make_tiny_checkpoint
    from tests.helpers_omero import FakeRawPixelsStore, add_pixels, make_image
    from tests.helpers_slides import pyramid

    root = tmp_path_factory.mktemp("omero-cluster")
    images = {}
    for seed, (iid, name) in enumerate(IMAGES.items()):
        levels = pyramid(synthetic_slide_image(256, 288, seed=30 + seed).image, 2)
        img = make_image(iid, (levels[0].shape[1], levels[0].shape[0]), name=name)
        add_pixels(srv, img, FakeRawPixelsStore(srv.db, levels, (128, 128)))
        images[iid] = img
    ckpt = make_tiny_checkpoint(root / "tiny")
    return {"root": root, "images": images, "models": load_models([ckpt], device="cpu")}


def _connection(srv: Any, images: dict[int, Any]) -> Any:
    from conic_qp.omero.connection import OmeroConnection, OmeroCredentials
    from tests.helpers_omero import LoopbackConn

    class Client(OmeroConnection):
        def connect(self) -> Any:
            self._gateway = LoopbackConn(srv, images)
            self._owned = True
            return self._gateway

    return Client(OmeroCredentials("127.0.0.1", srv.port, "ana", PASSWORD, KEY, None, "test"))


def _run(conn: Any, setup: dict[str, Any], out: Path, **kw: Any) -> Any:
    from conic_qp.omero.jobs import run_omero_images
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import WriteOptions
    from tests.helpers_models import settings

    s = settings(save_labels=False, tile_size=128, halo=32, workers=1)
    refs = [OmeroRef("image", i) for i in IMAGES]
    return run_omero_images(conn, refs, setup["models"], s, out,
                            write=WriteOptions(max_rois=20), **kw)  # fmt: skip


def test_omero_predict_on_a_local_cluster_keeps_credentials_out_of_every_job(
    srv: Any, setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cloudpickle

    from conic_qp.cluster import ClusterSpec, DaskRunner, open_cluster
    from conic_qp.cohort import ModelSpec
    from conic_qp.omero.jobs import image_stem, local_worker_env, run_omero_job_task
    from conic_qp.omero.results import NS_TABLE
    from conic_qp.sinks.tables import read_table
    from tests.helpers_omero import install_fake_login, worker_logins

    for var in ("OMERO_USER", "OMERO_PASSWORD", "OMERO_SESSION_KEY", "OMERO_HOST", "OMERO_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMERO_SESSIONDIR", str(setup["root"] / "no-sessions"))
    root = setup["root"]
    conn = _connection(srv, setup["images"])
    # the in-process run: the reference outputs
    local = _run(conn, setup, root / "inprocess")
    assert local.ok, local.failures
    env = local_worker_env(conn)
    assert env["OMERO_SESSION_KEY"] == KEY and PASSWORD not in env.values()
    spec = ClusterSpec("local", n_workers=1, torch_threads=1, dashboard=False)
    with open_cluster(spec, device="cpu", worker_env=env) as client:
        sizes = {i: ((int(im.getPrimaryPixels().getSizeX().val),
                      int(im.getPrimaryPixels().getSizeY().val)), IMAGES[i])
                 for i, im in setup["images"].items()}  # fmt: skip
        pids = client.run(install_fake_login, srv.port, sizes)
        payloads: list[bytes] = []
        submit = client.submit

        def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
            payloads.append(cloudpickle.dumps((fn, args, kwargs)))
            return submit(fn, *args, **kwargs)

        monkeypatch.setattr(client, "submit", spy)
        runner = DaskRunner(client, task=functools.partial(run_omero_job_task, retries=1))
        out = root / "cluster"
        batch = _run(conn, setup, out, runner=runner,
                     model_spec=ModelSpec.from_models(setup["models"], "cpu"))  # fmt: skip
        assert batch.ok, batch.failures
        assert [r.status for r in batch.images] == ["done", "done"]
        # the workers logged in themselves, from their environment (the session key)
        logins = {w: v for w, v in client.run(worker_logins).items()}
        assert [src for v in logins.values() for src, _, _ in v] == ["session key"]
        workers = set(client.scheduler_info()["workers"])
        assert set(pids) == workers
        first = pd.read_parquet(out / "manifest.parquet")  # predicted there, uploaded here
        assert list(first["status"]) == ["done", "done"] and set(first["worker"]) == workers
        logs = repr([client.get_worker_logs(), client.scheduler_info()])
        # resume: every image is uploaded already; nothing goes to the cluster
        n_jobs = len(payloads)
        again = _run(conn, setup, out, runner=runner, resume=True)
        assert [r.status for r in again.images] == ["skipped", "skipped"]
        assert len(payloads) == n_jobs == 2
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest["status"]) == ["skipped", "skipped"]  # the resumed run's record
    # the same nuclei as in process, each image's results on its image once
    for iid in IMAGES:
        stem = image_stem("127.0.0.1", iid)
        a = read_table(root / "inprocess" / f"{stem}.nuclei.parquet")
        b = read_table(out / f"{stem}.nuclei.parquet")
        assert len(a) > 5 and list(a["id"]) == list(b["id"])
        np.testing.assert_array_equal(a["class_id"], b["class_id"])
        run = json.loads((out / f"{stem}.run.json").read_text())
        assert run["slide"]["path"] == f"omero://127.0.0.1:{srv.port}/image/{iid}"
        record = json.loads((out / f"{stem}.omero.json").read_text())
        assert record["n_nuclei"] == len(b)
        linked = [srv.db.annotations[x] for x in srv.db.links.get(iid, set())]
        assert sum(x.getNs().val == NS_TABLE for x in linked) == 1
    # no credential in a job payload, a worker log, or any local output
    texts = [*payloads, logs.encode()]
    texts += [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    texts += [pd.read_parquet(out / "manifest.parquet").to_csv().encode()]
    assert len(texts) > 10
    for blob in texts:
        assert PASSWORD.encode() not in blob and KEY.encode() not in blob
