"""Cohort throughput: the in-process runner against ``--cluster local:N`` (Dask), same slides.

N synthetic pyramidal TIFF slides (tissue with known nuclei density) and a tiny random-init
checkpoint (``tests/helpers_models.make_tiny_checkpoint``, so the network is cheap and the
figures show the orchestration, not the model) run twice in one process:

* **in process** (baseline): :func:`conic_qp.cohort.predict_paths`, slide after slide, torch
  using all cores (and once more with one network thread, to show thread contention);
* **Dask**: a :class:`distributed.LocalCluster` of ``--workers`` processes (one slide each at a
  time, torch threads = cores / workers), through :class:`conic_qp.cluster.DaskRunner`.

Printed: cluster start-up (separately: it is paid once per cohort), wall time, slides/s, the
ratio to the baseline, and the overhead per slide: worker time not spent inside a slide's own
run (scheduling, shipping the job and the result, loading the model once per worker, idle tail),
``(workers * wall - sum of slide run times) / slides``. The per-slide nucleus counts of both
runs are compared (identical bytes need equal thread counts: tests/test_cluster.py checks that). On a machine with few cores the Dask run cannot be faster than the in-process one
(it splits the same cores); with GPUs or more cores per worker it is the way to use them all.

Usage::

    python benchmarks/cohort_bench.py                 # 6 slides of 512 px, 2 workers
    python benchmarks/cohort_bench.py --slides 32 --size 1024 --workers 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_slides(folder: Path, n: int, size: int) -> list[Path]:
    from conic_qp.synthetic import synthetic_slide_image
    from tests.helpers_slides import write_pyramidal_tiff

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = synthetic_slide_image(size, size, seed=100 + i, tissue_fraction=0.7).image
        out.append(write_pyramidal_tiff(folder / f"slide{i:03d}.tif", img, mpp=0.5, levels=3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--size", type=int, default=512, help="slide edge in px (0.5 um/px)")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--tile-size", type=int, default=256)
    args = parser.parse_args()

    import logging

    import torch

    from conic_qp.cluster import ClusterSpec, DaskRunner, open_cluster
    from conic_qp.cohort import predict_paths
    from conic_qp.predict import PredictSettings, load_models
    from conic_qp.tta import TTAConfig
    from tests.helpers_models import make_tiny_checkpoint

    logging.basicConfig(level=logging.ERROR)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        slides = make_slides(root / "slides", args.slides, args.size)
        ckpt = make_tiny_checkpoint(root / "tiny")
        print(
            f"{args.slides} slides of {args.size}x{args.size} px, tiles {args.tile_size}, "
            f"{cores} CPU cores (written in {time.perf_counter() - t0:.1f} s)"
        )
        settings = PredictSettings(
            tile_size=args.tile_size,
            halo=64,
            batch_size=4,
            tta=TTAConfig(passes=1, mc_dropout=False),
            device="cpu",
            workers=1,
        )
        models = load_models([ckpt], device="cpu")

        torch.set_num_threads(cores)
        t0 = time.perf_counter()
        base = predict_paths(slides, models, settings, root / "inprocess")
        wall_in = time.perf_counter() - t0
        assert base.ok and base.cohort is not None, base.failures
        run_in = sum(r.timings.get("total_s", 0.0) for r in base.cohort.results)
        counts_in = [r.n_nuclei for r in base.cohort.results]
        # the same with one network thread: shows how much of a difference is thread contention
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        one = predict_paths(slides, models, settings, root / "inprocess1")
        wall_one = time.perf_counter() - t0
        assert one.ok and one.cohort is not None, one.failures
        run_one = sum(r.timings.get("total_s", 0.0) for r in one.cohort.results)
        torch.set_num_threads(cores)

        threads = max(1, cores // args.workers)
        t0 = time.perf_counter()
        spec = ClusterSpec("local", n_workers=args.workers, torch_threads=threads, dashboard=False)
        with open_cluster(spec, device="cpu") as client:
            client.wait_for_workers(args.workers)
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            dask = predict_paths(slides, models, settings, root / "dask", runner=DaskRunner(client))
            wall_dask = time.perf_counter() - t0
        assert dask.ok and dask.cohort is not None, dask.failures
        run_dask = sum(r.timings.get("total_s", 0.0) for r in dask.cohort.results)
        counts_dask = [r.n_nuclei for r in dask.cohort.results]
        nuclei = sum(counts_in)

    n = args.slides
    worst = max(abs(a - b) / max(a, 1) for a, b in zip(counts_in, counts_dask, strict=True))
    print(
        f"nuclei per cohort: {nuclei}; per-slide counts of the two runs differ by at most "
        f"{100 * worst:.2f} % (float noise of other thread counts; equal threads give equal bytes)"
    )
    print(f"{'runner':<24}{'wall s':>9}{'slides/s':>10}{'x base':>8}{'overhead/slide s':>18}")
    print(
        f"{'in process':<24}{wall_in:>9.2f}{n / wall_in:>10.3f}{1.0:>8.2f}"
        f"{(wall_in - run_in) / n:>18.3f}"
    )
    print(
        f"{'in process (1 thr)':<24}{wall_one:>9.2f}{n / wall_one:>10.3f}"
        f"{wall_in / wall_one:>8.2f}{(wall_one - run_one) / n:>18.3f}"
    )
    label = f"local:{args.workers} ({threads} thr)"
    print(
        f"{label:<24}{wall_dask:>9.2f}{n / wall_dask:>10.3f}{wall_in / wall_dask:>8.2f}"
        f"{(args.workers * wall_dask - run_dask) / n:>18.3f}"
    )
    print(f"Dask cluster start-up (once per cohort): {startup:.1f} s")
    print(
        f"mean slide run: in process {run_in / n:.2f} s, on a worker {run_dask / n:.2f} s "
        f"(fewer threads per worker)"
    )


if __name__ == "__main__":
    main()
