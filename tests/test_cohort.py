"""The cohort module in process: serialisable jobs, captured failures, the manifest, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import shapely
import torch

from conic_qp.cohort import (
    InProcessRunner,
    Manifest,
    ModelSpec,
    SlideJob,
    SlideResult,
    cached_models,
    clear_model_cache,
    jobs_for,
    run_cohort,
    run_slide_job,
)
from conic_qp.predict import load_models
from conic_qp.sources import SlideRef, expand_refs
from conic_qp.synthetic import synthetic_slide_image
from conic_qp.tta import TTAConfig
from tests.helpers_models import make_tiny_checkpoint, settings, stand_in_models
from tests.helpers_slides import write_pyramidal_tiff

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for i in range(2):
        img = synthetic_slide_image(224, 256, seed=i, tissue_fraction=0.7).image
        write_pyramidal_tiff(folder / f"s{i}.tif", img, mpp=0.5, levels=2)
    data = (folder / "s0.tif").read_bytes()
    (folder / "broken.tif").write_bytes(data[: len(data) // 2])
    return folder


def test_slide_job_round_trips_through_json(ckpt: Path) -> None:
    roi = shapely.Polygon([(0, 0), (10.125, 0), (10, 7.3), (0, 5)])
    job = SlideJob(
        SlideRef.file("/data/a.svs", mpp=0.25, project="/p/project.qpproj", entry_id="7"),
        "/out",
        "a",
        settings(tta=TTAConfig(passes=3, mc_dropout=True, hed_sigma=0.02), seed=5, workers=2),
        ModelSpec((str(ckpt),), thresholds="/t.json", device="cpu"),
        roi=roi,
        mpp=0.5,
        image_id="qupath:7:a",
        resume=True,
        key="entry-7",
    )
    back = SlideJob.from_json(json.loads(json.dumps(job.to_json())))
    assert back == job and back.roi is not None and shapely.equals_exact(back.roi, roi, 0)
    assert back.settings.tta.hed_sigma == 0.02 and back.model == job.model
    assert back.outputs["run"] == Path("/out/a.run.json")
    with pytest.raises(ValueError, match="newer"):
        SlideJob.from_json({**job.to_json(), "version": 99})
    plain = SlideJob(SlideRef.file("b.tif"), "o", "b", settings())
    assert SlideJob.from_json(plain.to_json()) == plain and plain.key == "b"


def test_model_spec_round_trip_and_cache(ckpt: Path, tmp_path: Path) -> None:
    models = load_models([ckpt], device="cpu")
    spec = ModelSpec.from_models(models, "cpu")
    assert spec.paths == (str(ckpt.resolve()),) and spec.thresholds is None
    thr = tmp_path / "thr.json"
    thr.write_text((ckpt / "thresholds.json").read_text())
    assert ModelSpec.from_models(load_models([ckpt], thresholds=thr), "cpu").thresholds == str(thr)
    with pytest.raises(ValueError, match="not loaded from checkpoint folders"):
        ModelSpec.from_models(stand_in_models())
    clear_model_cache()
    first = cached_models(spec)
    assert cached_models(ModelSpec.from_json(spec.to_json())) is first  # loaded once
    assert first.fingerprint == models.fingerprint
    # a worker told to run the networks with another CPU runtime gets them so
    pytest.importorskip("onnxruntime")
    onnx = ModelSpec.from_json({**spec.to_json(), "runtime": "onnx"})
    assert onnx.runtime == "onnx" and cached_models(onnx) is not first
    assert type(cached_models(onnx).networks[0]) is not type(first.networks[0])
    assert cached_models(onnx).fingerprint == first.fingerprint


def test_failures_are_results_and_the_manifest_follows_the_cohort(
    ckpt: Path, slides: Path, tmp_path: Path
) -> None:
    models = load_models([ckpt], device="cpu")
    refs, missing = expand_refs([slides])
    assert [r.name for r in refs] == ["broken.tif", "s0.tif", "s1.tif"] and not missing
    out = tmp_path / "out"
    jobs = jobs_for(refs, out, settings(save_labels=False))
    seen: list[str] = []
    manifest = out / "manifest.parquet"

    def on_result(res: SlideResult) -> None:
        seen.append(res.key)
        if manifest.exists():  # rows written before: every earlier result is already there
            assert set(pd.read_parquet(manifest)["key"]) == set(seen[:-1])

    res = run_cohort(jobs, models=models, manifest=manifest, on_result=on_result)
    assert [r.status for r in res.results] == ["failed", "done", "done"]
    assert list(res.failures) == [str(slides / "broken.tif")]
    assert (
        "incomplete" in res.failures[str(slides / "broken.tif")]
        or "truncated" in res.failures[str(slides / "broken.tif")]
    )
    table = pd.read_parquet(manifest)
    assert list(table["key"]) == ["broken", "s0", "s1"]
    assert list(table["status"]) == ["failed", "done", "done"]
    done = res.by_status("done")
    assert list(table["n_nuclei"][1:]) == [r.n_nuclei for r in done] and all(
        r.n_nuclei > 0 and r.outputs["table"].is_file() for r in done
    )
    assert table["error"][0] and pd.isna(table["error"][1])
    assert (table["seconds"][1:] > 0).all() and set(json.loads(table["timings"][1])) >= {
        "network_s",
        "total_s",
    }
    assert all(r.fingerprint == models.fingerprint for r in table.itertuples())

    # resume: complete slides are skipped before anything runs, the broken one is retried
    again = run_cohort(jobs, models=models, manifest=manifest, resume=True)
    assert [r.status for r in again.results] == ["failed", "skipped", "skipped"]
    assert [r.n_nuclei for r in again.results[1:]] == [r.n_nuclei for r in done]
    assert list(Manifest.load(manifest).statuses().values()) == ["failed", "skipped", "skipped"]
    # a slide whose outputs vanished runs again
    (out / "s1.run.json").unlink()
    third = run_cohort(jobs, models=models, manifest=manifest, resume=True)
    assert [r.status for r in third.results] == ["failed", "skipped", "done"]


def test_interrupt_propagates_and_invariants_are_not_user_errors(
    slides: Path, tmp_path: Path
) -> None:
    models = stand_in_models()

    class Boom(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            raise KeyboardInterrupt

    refs, _ = expand_refs([slides / "s0.tif", slides / "s1.tif"])
    jobs = jobs_for(refs, tmp_path, settings())
    interrupted = type(models)([Boom()], models.classes, models.mpp, models.params, models.info)
    started: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_cohort(
            jobs, runner=InProcessRunner(interrupted), on_start=lambda j: started.append(j.key)
        )
    assert started == ["s0"]
    with pytest.raises(ValueError, match="unique"):
        run_cohort([jobs[0], jobs[0]], models=models)
    # a job without a model and no model set: a bug of the caller, recorded as a failure
    lone = run_slide_job(jobs[0])
    assert lone.status == "failed" and "ValueError" in (lone.error or "")
