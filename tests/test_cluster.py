"""Cohorts on Dask: a LocalCluster of 2 worker processes gives the in-process results, survives a
killed worker, lists a failing slide and resumes; dask-jobqueue scripts from a YAML config.

One cluster serves the module (starting workers imports torch in each, the slow part).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from conic_qp.cohort import ModelSpec, SlideResult, jobs_for, run_cohort
from conic_qp.errors import ConicQPError
from conic_qp.paths import parse_temp_name
from conic_qp.predict import load_models
from conic_qp.sources import expand_refs
from conic_qp.synthetic import synthetic_slide_image
from tests.helpers_models import make_tiny_checkpoint, settings
from tests.helpers_slides import write_pyramidal_tiff

pytest.importorskip("distributed")
from conic_qp.cluster import (
    ClusterSpec,
    DaskRunner,
    jobqueue_job_script,
    jobqueue_kwargs,
    load_cluster_config,
    open_cluster,
)

torch.set_num_threads(1)
N_SLIDES = 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cohort")
    ckpt = make_tiny_checkpoint(root / "tiny")
    slides = root / "slides"
    slides.mkdir()
    for i in range(N_SLIDES):
        img = synthetic_slide_image(256, 288, seed=20 + i, tissue_fraction=0.7).image
        write_pyramidal_tiff(slides / f"s{i}.tif", img, mpp=0.5, levels=2)
    (slides / "broken.tif").write_bytes(b"II*\x00 not a slide")
    models = load_models([ckpt], device="cpu")
    refs, _ = expand_refs([slides])
    s = settings(save_labels=False, tile_size=128, halo=32, workers=1)
    spec = ModelSpec.from_models(models, "cpu")
    reference = run_cohort(jobs_for(refs, root / "inprocess", s, model=spec), models=models)
    return {"root": root, "models": models, "refs": refs, "settings": s, "spec": spec,
            "reference": reference}  # fmt: skip


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with open_cluster(
        ClusterSpec("local", n_workers=2, torch_threads=1, dashboard=False), device="cpu"
    ) as c:
        yield c


def _tables(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nuclei.parquet"))}


@pytest.mark.slow
def test_local_cluster_gives_the_in_process_results_and_resumes(
    cohort: dict[str, Any], client: Any
) -> None:
    out = cohort["root"] / "dask"
    jobs = jobs_for(cohort["refs"], out, cohort["settings"], model=cohort["spec"])
    manifest = out / "manifest.parquet"
    res = run_cohort(jobs, runner=DaskRunner(client), models=cohort["models"], manifest=manifest)
    statuses = {r.key: r.status for r in res.results}
    assert statuses == {"broken": "failed", **{f"s{i}": "done" for i in range(N_SLIDES)}}
    assert "broken.tif" in next(iter(res.failures))
    assert {r.worker for r in res.results} <= set(client.scheduler_info()["workers"])
    # byte-identical tables: same tiles, seeds, thread count and kernels in both runners
    assert _tables(out) == _tables(cohort["root"] / "inprocess") and len(_tables(out)) == N_SLIDES
    ref = {r.key: r.n_nuclei for r in cohort["reference"].results}
    assert {r.key: r.n_nuclei for r in res.results} == ref
    table = pd.read_parquet(manifest)
    assert dict(zip(table["key"], table["status"], strict=True)) == statuses
    # resume: finished slides are not sent to the cluster again
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.nuclei.parquet")}
    submitted: list[str] = []
    again = run_cohort(jobs, runner=DaskRunner(client), models=cohort["models"],
                       manifest=manifest, resume=True, on_start=lambda j: submitted.append(j.key))  # fmt: skip
    assert submitted == ["broken"] and again.results[0].status == "failed"
    assert all(r.status == "skipped" for r in again.results[1:])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.nuclei.parquet")} == before


@pytest.mark.slow
def test_a_killed_worker_loses_no_slide(cohort: dict[str, Any], client: Any) -> None:
    out = cohort["root"] / "killed"
    jobs = jobs_for(cohort["refs"][1:], out, cohort["settings"], model=cohort["spec"])
    pids: dict[str, int] = client.run(os.getpid)
    killed: list[int] = []
    lock = threading.Lock()

    def kill_other(res: SlideResult) -> None:
        with lock:
            if killed or res.worker not in pids:
                return
            # the other worker is busy with its own slide: kill it mid-run
            victim = next(pid for addr, pid in pids.items() if addr != res.worker)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    res = run_cohort(jobs, runner=DaskRunner(client), models=cohort["models"],
                     manifest=out / "manifest.parquet", on_result=kill_other)  # fmt: skip
    assert killed, "no worker was killed"
    assert [r.status for r in res.results] == ["done"] * N_SLIDES, res.failures
    assert _tables(out) == _tables(cohort["root"] / "inprocess")
    # the killed run may have left temporary files, never a result under a final name; they
    # carry the dead worker's pid and the next run on this host removes them
    leftovers = [parse_temp_name(p.name) for p in out.glob(".*.tmp")]
    assert all(t is not None and t.pid == killed[0] for t in leftovers), leftovers
    again = run_cohort(jobs, runner=DaskRunner(client), models=cohort["models"], resume=True)
    assert [r.status for r in again.results] == ["skipped"] * N_SLIDES
    assert not list(out.glob(".*.tmp"))
    assert len(set(pd.read_parquet(out / "manifest.parquet")["status"])) == 1


def test_cluster_specs_parse_and_refuse() -> None:
    assert ClusterSpec.parse("local") == ClusterSpec("local")
    assert ClusterSpec.parse("local:3").n_workers == 3
    assert ClusterSpec.parse("tcp://10.1.2.3:8786").address == "tcp://10.1.2.3:8786"
    assert ClusterSpec.parse("head-node:8786").address == "tcp://head-node:8786"
    for bad, message in (("local:0", "positive"), ("nowhere", "not local"), ("slurm", "FILE.yaml")):
        with pytest.raises(ConicQPError, match=message):
            ClusterSpec.parse(bad)
    with pytest.raises(ConicQPError) as info:
        ClusterSpec.parse("slurm")
    assert "--cluster-config" in info.value.render(lambda n, f: f or "--" + n.replace("_", "-"))
    assert "cluster_config" in str(info.value)


YAML = """\
cores: 8
memory: 32GB
gpus: 1
walltime: "04:00:00"
queue: gpu
account: pathology
jobs: 4
job_extra_directives: ["--constraint=a100"]
job_script_prologue: ["module load cuda/12.1", "source ~/venvs/conic/bin/activate"]
local_directory: /scratch/conic-qp
retries: 3
"""


def test_jobqueue_scripts_for_slurm_and_pbs(tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(YAML)
    spec = ClusterSpec.parse("slurm", config_file)
    assert spec.kind == "slurm" and spec.retries == 3 and spec.config["jobs"] == 4
    slurm = jobqueue_job_script("slurm", spec.config, "tcp://10.0.0.5:8786")
    lines = slurm.splitlines()
    for directive in ("-J conic-qp", "-p gpu", "-A pathology", "--cpus-per-task=8", "-t 04:00:00",
                      "--gres=gpu:1", "--constraint=a100"):  # fmt: skip
        assert f"#SBATCH {directive}" in lines, (directive, slurm)
    assert "module load cuda/12.1" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert "tcp://10.0.0.5:8786" in worker and "--resources slides=1" in worker
    assert "--nthreads 8" in worker and "--local-directory /scratch/conic-qp" in worker

    pbs = jobqueue_job_script("pbs", load_cluster_config(config_file), "tcp://10.0.0.5:8786")
    assert "#PBS -q gpu" in pbs and "#PBS -A pathology" in pbs
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=32GB" in pbs
    assert "#PBS -l walltime=04:00:00" in pbs and "--resources slides=1" in pbs
    # own keys never reach dask-jobqueue
    assert not {"gpus", "jobs", "retries"} & set(jobqueue_kwargs("pbs", spec.config))

    config_file.write_text("cores: 8\nmemory: 8GB\nnot_a_setting: 1\n")
    with pytest.raises(ConicQPError, match="rejects"):
        jobqueue_job_script("slurm", load_cluster_config(config_file))
    config_file.write_text("cores: 8\n")
    with pytest.raises(ConicQPError, match="cores and memory"):
        jobqueue_job_script("slurm", load_cluster_config(config_file))
    config_file.write_text("- just\n- a list\n")
    with pytest.raises(ConicQPError, match="mapping"):
        load_cluster_config(config_file)


@pytest.mark.slow
def test_annotate_on_the_cluster_writes_what_the_in_process_run_writes(
    cohort: dict[str, Any], client: Any, tmp_path: Path
) -> None:
    """Inference on the workers, detections written by this process under the project lock."""
    import json

    import shapely

    from conic_qp.annotate import annotate_project
    from conic_qp.qupath.project import write_project

    slides = [r.path for r in cohort["refs"] if r.name in ("s0.tif", "s1.tif")]
    project = write_project(tmp_path / "a" / "proj", slides)
    region = {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(20, 20, 200, 180)),
              "properties": {"objectType": "annotation", "name": "ROI",
                             "classification": {"name": "Tumor", "color": [200, 0, 0]}}}  # fmt: skip
    (project.parent / "regions").mkdir()
    (project.parent / "regions" / "1.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [region]})
    )
    s = cohort["settings"]
    local = annotate_project(project, cohort["models"], s, backend="geojson")
    pdir = project.parent
    written = sorted(pdir.glob("detections/**/*.geojson*")) + sorted(
        pdir.glob("conic-qp/*.parquet")
    )
    before = {p: p.read_bytes() for p in written if p.name != "manifest.parquet"}
    assert len(before) >= 4
    # the same project again, inference on the workers: the same files, byte for byte
    dask = annotate_project(project, cohort["models"], s, backend="geojson",
                            runner=DaskRunner(client))  # fmt: skip
    assert [o.status for o in dask.images] == [o.status for o in local.images] == ["done"] * 2
    assert Path(dask.images[0].region_source).name == "1.geojson"  # ran inside the region
    assert dask.images[1].region_source == local.images[1].region_source == "tissue"
    assert [o.parent_counts for o in dask.images] == [o.parent_counts for o in local.images]
    assert {p: p.read_bytes() for p in before} == before
    manifest = pd.read_parquet(pdir / "conic-qp" / "manifest.parquet")
    assert list(manifest["status"]) == ["done", "done"]
    assert set(manifest["worker"]) <= set(client.scheduler_info()["workers"])
    assert not (pdir / ".conic-qp.lock").exists()
