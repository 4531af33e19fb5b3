"""Whole-slide inference throughput, time split and peak memory (``conic_qp.predict``).

Measures, in one run (so ratios hold on a busy machine), with the default tiling
(``PredictSettings``: tile, overlap, window, SE window, blocks):

* **network only** (baseline): forward + TTA of random tiles, tiles/s, for TTA 1 and ``--tta``;
* **post-processing only**: :func:`conic_qp.stitch.process_block` on blocks of real density:
  the bundled model's blended probabilities of CMU-1 tissue (``../shared/data``) when present,
  else the stain stand-in of the tests on synthetic tissue; nuclei/s and blocks/s per CPU core,
  and the cores needed to keep up with the network-only rate of ``--tta`` passes (or
  ``--gpu-tiles-per-s``);
* **end to end** on synthetic pyramidal TIFF slides written to /tmp tile by tile (and on the
  slides given with ``--slide``, CMU-1 by default when present): s/mm^2, tiles/s, nuclei/s, the
  split read / network / blend / post-processing (worker seconds) / wait / write, and the peak RSS
  of the main process; each run is a subprocess so its peak RSS is its own. Two synthetic slide
  sizes with the same settings show that memory does not grow with the slide
  (``--large 20000`` for the 20k x 20k run). With ``--gpu-util`` (CUDA), the mean GPU
  utilisation of each run is sampled with NVML.

Usage::

    python benchmarks/predict_bench.py                      # ~5-10 min on 2 cores
    python benchmarks/predict_bench.py --large 20000        # the 20k x 20k bounded-memory run
    python benchmarks/predict_bench.py --device cuda --encoder efficientnet_b5 --tta 16 --gpu-util
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

SHARED = Path(
    os.environ.get("CONIC_QP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
CMU1 = SHARED / "slides" / "CMU-1-Small-Region.svs"
GPU_TILES_PER_S = 8.0


def defaults() -> Any:
    from conic_qp.predict import PredictSettings

    return PredictSettings()


def write_slide(path: Path, size: int, mpp: float = 0.5, seed: int = 0) -> Path:
    """A size x size pyramidal SVS-like TIFF, generated tile by tile (never whole in memory).

    Level 0 repeats a 1024 px synthetic tissue patch (mirrored so seams are continuous);
    level 1 is 4x smaller. JPEG tiles of 256 px, as scanners write them.
    """
    import tifffile
    from PIL import Image

    from conic_qp.synthetic import synthetic_slide_image

    patch = synthetic_slide_image(1024, 1024, seed=seed, tissue_fraction=0.75).image
    big = np.concatenate([patch, patch[:, ::-1]], axis=1)
    big = np.concatenate([big, big[::-1]], axis=0)  # 2048 px, periodic with mirrored seams
    t = 256

    def tiles(src: np.ndarray, h: int, w: int):  # type: ignore[no-untyped-def]
        n = src.shape[0]
        for y in range(0, h, t):
            for x in range(0, w, t):
                yield src[y % n : y % n + t, x % n : x % n + t]

    small = np.asarray(Image.fromarray(big).reduce(4))  # 512 px
    small = np.concatenate([small, small], axis=1)
    small = np.concatenate([small, small], axis=0)  # 1024 px, still periodic
    h1 = w1 = size // 4
    desc = f"Aperio Image Library v12.0.15 \r\n{size}x{size} ({t}x{t}) JPEG/RGB|AppMag = 20|MPP = {mpp}"
    common = dict(tile=(t, t), compression="jpeg", photometric="rgb", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            tiles(big, size, size), shape=(size, size, 3), description=desc, metadata=None, **common
        )  # type: ignore[arg-type]
        thumb = np.asarray(Image.fromarray(small[:256, :256]))
        tw.write(thumb, photometric="rgb", description="Aperio thumbnail", metadata=None)
        tw.write(tiles(small, h1, w1), shape=(h1, w1, 3), metadata=None, **common)  # type: ignore[arg-type]
    return path


def make_models(kind: str, encoder: str, device: str):  # type: ignore[no-untyped-def]
    """``stain``: the exact stand-in of the tests; ``conicnet``: a random-init ConicNet with
    ``encoder`` (compute cost of that encoder); ``bundled``: the shipped model."""
    from conic_qp.classes import ClassScheme
    from conic_qp.model import ConicNet, ModelConfig
    from conic_qp.postprocess import PostprocessParams
    from conic_qp.predict import ModelSet, default_model_path, load_models

    if kind == "bundled":
        return load_models([default_model_path()], device=device)
    scheme = ClassScheme.from_names("dark-pale", ["dark", "pale"])
    if kind == "stain":
        from tests.helpers_models import SYNTH_H, HematoxylinNet

        net: torch.nn.Module = HematoxylinNet(*SYNTH_H)
        params = PostprocessParams.uniform(2, fg=0.5, seed=0.6, min_size=8, max_size=3000)
    else:
        torch.manual_seed(0)
        dec = (32, 16, 16, 8, 8) if encoder.startswith("test_") else (256, 128, 64, 32, 16)
        net = ConicNet(ModelConfig(encoder, 2, decoder_channels=dec))
        with torch.no_grad():  # random features -> image-dependent blobs (see tests)
            for head in (net.head_three_label, net.head_semantic):
                head.weight.mul_(300.0)
        params = PostprocessParams.uniform(2, min_size=4, min_solidity=0.0)
    net.to(device).eval()
    return ModelSet([net], scheme, 0.5, params, info=[{"path": f"random {kind} {encoder}"}])


def network_only(encoder: str, device: str, tta: int, batch: int, n_tiles: int) -> dict:
    """Baseline: TTA forward passes of random tiles, no reading and no post-processing."""
    from conic_qp.engine import apply_se_window
    from conic_qp.tta import TTAConfig, predict_probabilities

    s = defaults()
    models = make_models("conicnet", encoder, device)
    apply_se_window(models, s.se_window)
    cfg = TTAConfig(passes=tta, mc_dropout=tta > 1, max_batch=batch)
    x = torch.rand(batch, 3, s.tile_size, s.tile_size, device=device)
    amp = device.startswith("cuda")
    predict_probabilities(models.networks, x, cfg, seed=0, amp=amp)
    if amp:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    done = 0
    while done < n_tiles:
        out = predict_probabilities(models.networks, x, cfg, seed=done, amp=amp)
        out["semantic"].cpu()
        done += batch
    dt = time.perf_counter() - t0
    res = {"tiles_per_s": done / dt}
    if amp:
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def postprocess_only(n_blocks: int) -> dict:
    """Per-core post-processing of whole blocks at real density (one process, one thread)."""
    import dataclasses

    from conic_qp.engine import SlideEngine
    from conic_qp.plan import plan_slide
    from conic_qp.slides import ImageSource, open_slide
    from conic_qp.stitch import BlockJob, process_block
    from conic_qp.synthetic import synthetic_slide_image
    from conic_qp.tta import TTAConfig

    s = dataclasses.replace(
        defaults(), tta=TTAConfig(passes=1, mc_dropout=False), workers=0, tissue_detection=False
    )
    side = s.block_size + 2 * s.block_margin
    if CMU1.exists():
        models, source = make_models("bundled", "", "cpu"), "CMU-1 tissue, bundled model"
        with open_slide(CMU1) as slide:
            scale = 0.5 / slide.mpp
            image = slide.read(
                (100, 300, 2 * side * scale, side * scale), 0.5, size=(2 * side, side)
            )
    else:
        models, source = make_models("stain", "", "cpu"), "synthetic tissue, stain stand-in"
        image = synthetic_slide_image(side, 2 * side, seed=100, tissue_fraction=0.9).image
    src = ImageSource(image, 0.5, "bench")
    plan = plan_slide(src, models.mpp, s)
    blended = list(SlideEngine(src, plan, models, s).blended())
    jobs = [
        BlockJob(
            b.block,
            b.semantic,
            b.three_label,
            models.params,
            models.classes,
            (0.0, 0.0),
            1.0,
            0.5,
            "bench",
        )
        for b in blended
    ]
    process_block(jobs[0])  # warm-up
    t0 = time.perf_counter()
    reps, nuclei, area = 0, 0, 0
    while reps < n_blocks:
        for job in jobs:
            out = process_block(job)
            nuclei += out.n
            area += job.block.core.height * job.block.core.width
            reps += 1
    dt = time.perf_counter() - t0
    return {
        "source": source,
        "blocks_per_s_core": reps / dt,
        "nuclei_per_s_core": nuclei / dt,
        "nuclei_per_mpx": nuclei / area * 1e6,
        "s_per_core_mpx": dt / area * 1e6,
    }


def child(args: argparse.Namespace) -> None:
    """One end-to-end slide run (in its own process, so its peak RSS is its own)."""
    import dataclasses

    torch.set_num_threads(args.threads)
    from conic_qp.predict import make_executor, predict_slide
    from conic_qp.slides import open_slide
    from conic_qp.tta import TTAConfig

    models = make_models(args.kind, args.encoder, args.device)
    settings = dataclasses.replace(
        defaults(),
        batch_size=args.batch,
        tta=TTAConfig(passes=args.tta, mc_dropout=args.tta > 1),
        device=args.device,
        workers=args.workers,
    )
    pool = make_executor(args.workers)
    if pool is not None:
        pool.submit(int).result()  # start the workers: steady state, as in a cohort run
    with tempfile.TemporaryDirectory() as out, open_slide(args.slide[0]) as src:
        t0 = time.perf_counter()
        res = predict_slide(src, models, settings, out, executor=pool)
        wall = time.perf_counter() - t0
        assert res.plan is not None
        plan = res.plan
        th, tw = plan.tiles.tile_shape
        run = json.loads(Path(res.outputs["run"]).read_text())
    if pool is not None:
        pool.shutdown()
    core_px = len(plan.selected) * (th - plan.tiles.overlap) * (tw - plan.tiles.overlap)
    print(
        json.dumps(
            {
                "tiles": res.n_tiles,
                "nuclei": res.n_nuclei,
                "wall_s": wall,
                "timings": res.timings,
                "peak_rss_mib": peak_rss_mib(),
                "slide_px": list(src.dimensions),
                "mm2": min(core_px, plan.shape[0] * plan.shape[1]) * (0.5e-3) ** 2,
                "panels": run["grid"]["panels"],
                "cut": run["blending"]["nuclei_touching_block_edges"],
            }
        )
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss survives exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GpuSampler:
    """Mean GPU utilisation (%) while a run lasts, sampled with NVML every 0.2 s."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return self

        def loop() -> None:
            while not self._stop.wait(0.2):
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def run_child(slide: Path, kind: str, encoder: str, tta: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--_child", "--slide", str(slide), "--kind", kind,
        "--encoder", encoder, "--tta", str(tta), "--device", args.device,
        "--workers", str(args.workers), "--batch", str(args.batch), "--threads", str(args.threads),
    ]  # fmt: skip
    with GpuSampler() if args.gpu_util else _Null() as gpu:
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"run on {slide.name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if args.gpu_util and isinstance(gpu, GpuSampler):
        res["gpu_util_mean"] = gpu.mean
    return res


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="conicnet", help=argparse.SUPPRESS)
    p.add_argument("--slide", type=Path, action="append", default=None,
                   help="real slide(s) to run end to end (default: CMU-1 when present)")  # fmt: skip
    p.add_argument("--encoder", default="test_efficientnet", help="timm encoder (random init)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", type=int, default=4, help="TTA passes of the TTA run (and 1)")
    p.add_argument("--workers", type=int, default=1, help="post-processing processes")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--small", type=int, default=2048, help="edge of the small slide (px)")
    p.add_argument("--large", type=int, default=6144, help="edge of the large slide (px)")
    p.add_argument("--gpu-tiles-per-s", type=float, default=None,
                   help="network rate to size the workers for (default: measured, TTA --tta)")  # fmt: skip
    p.add_argument("--net-tiles", type=int, default=8, help="tiles of the network-only baseline")
    p.add_argument("--post-blocks", type=int, default=4, help="blocks of the post-only measure")
    p.add_argument("--skip-tta-e2e", action="store_true", help="no end-to-end run with --tta")
    p.add_argument("--gpu-util", action="store_true", help="sample GPU utilisation (NVML)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    if args._child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    s = defaults()
    report: dict = {
        "cpu_cores": os.cpu_count(), "device": args.device, "encoder": args.encoder,
        "settings": {"tile": s.tile_size, "overlap": s.overlap, "window": s.window,
                     "se_window": s.se_window, "block": s.block_size, "margin": s.block_margin},
    }  # fmt: skip
    print(f"machine: {os.cpu_count()} cores, device {args.device}, torch threads {args.threads}; "
          f"settings {report['settings']}", flush=True)  # fmt: skip
    for tta in dict.fromkeys((1, args.tta)):
        r = network_only(args.encoder, args.device, tta, args.batch, args.net_tiles)
        report[f"network_only_tta{tta}"] = r
        print(f"network only, {args.encoder}, TTA {tta}: {r['tiles_per_s']:.2f} tiles/s" + (f", peak GPU {r['peak_gpu_mem_gib']:.2f} GiB" if "peak_gpu_mem_gib" in r else ""), flush=True)  # fmt: skip
    post = postprocess_only(args.post_blocks)
    report["postprocess_only"] = post
    net_rate = args.gpu_tiles_per_s or report[f"network_only_tta{args.tta}"]["tiles_per_s"]
    new_mpx_per_tile = (s.tile_size - s.overlap) ** 2 / 1e6
    need = net_rate * new_mpx_per_tile * post["s_per_core_mpx"]
    report["cores_for_network"] = {"tiles_per_s": net_rate, "cores": need}
    print(
        f"post-processing ({post['source']}): {post['nuclei_per_s_core']:.0f} nuclei/s per core, "
        f"{post['s_per_core_mpx']:.2f} core-s per Mpx of slide ({post['nuclei_per_mpx']:.0f} nuclei "
        f"per Mpx); keeping up with {net_rate:.2f} network tiles/s needs {need:.2f} cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        small = write_slide(Path(tmp) / "small.svs", args.small)
        runs: list[tuple[str, str, int, Path]] = [("conicnet", args.encoder, 1, small)]
        if not args.skip_tta_e2e and args.tta != 1:
            runs.append(("conicnet", args.encoder, args.tta, small))
        real = args.slide if args.slide is not None else ([CMU1] if CMU1.exists() else [])
        for slide in real:
            runs.append(("conicnet", args.encoder, args.tta, slide))
            if args.encoder != "efficientnet_b0" or args.device != "cpu":
                runs.append(("bundled", "", args.tta, slide))
        runs.append(("stain", "", 1, small))
        t0 = time.perf_counter()
        large = write_slide(Path(tmp) / "large.svs", args.large)
        print(f"wrote the {args.large} px slide in {time.perf_counter() - t0:.0f} s", flush=True)
        runs.append(("stain", "", 1, large))
        for kind, enc, tta, slide in runs:
            r = run_child(slide, kind, enc, tta, args)
            t = r["timings"]
            name = slide.stem if slide.parent == Path(tmp) else slide.name
            key = f"e2e_{kind}{'_' + enc if enc else ''}_tta{tta}_{name}_{r['slide_px'][0]}px"
            report[key] = r
            tps = r["tiles"] / r["wall_s"]
            print(
                f"{key}: {r['tiles']} tiles, {r['nuclei']} nuclei in {r['wall_s']:.1f} s = "
                f"{r['wall_s'] / r['mm2']:.1f} s/mm^2, {tps:.2f} tiles/s, "
                f"{r['nuclei'] / r['wall_s']:.0f} nuclei/s; split: read {t['read_s']:.1f} s, "
                f"network {t['network_s']:.1f} s, blend {t['blend_s']:.1f} s, post-processing "
                f"{t['postprocess_s']:.1f} worker-s (main waited {t['wait_s']:.1f} s), write "
                f"{t['write_s']:.1f} s, tissue {t['tissue_s']:.1f} s; {r['panels']} panels; "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB"
                + (
                    f"; GPU util {r['gpu_util_mean']:.0f} %"
                    if r.get("gpu_util_mean") is not None
                    else ""
                ),
                flush=True,
            )
    a = report[
        next(k for k in report if k.startswith("e2e_stain") and k.endswith(f"_{args.small}px"))
    ]
    b = report[
        next(k for k in report if k.startswith("e2e_stain") and k.endswith(f"_{args.large}px"))
    ]
    print(
        f"bounded memory: {args.large}^2 px slide ({b['tiles']} tiles, {b['panels']} panels) peak "
        f"RSS {b['peak_rss_mib']:.0f} MiB vs {args.small}^2 px ({a['tiles']} tiles) "
        f"{a['peak_rss_mib']:.0f} MiB: x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} for "
        f"x{b['tiles'] / max(a['tiles'], 1):.1f} tiles",
        flush=True,
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
