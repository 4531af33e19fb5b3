"""Whole-slide inference throughput, time split and peak memory (``conic_qp.predict``).

Measures, in one run (so ratios hold on a busy machine):

* **network only** (baseline): forward + TTA of random 512 px tiles, tiles/s;
* **post-processing only**: :func:`conic_qp.stitch.process_tile` on realistic probability maps
  (the fixed stain stand-in of the tests on synthetic tissue: real nucleus density), nuclei/s and
  tiles/s per CPU core, and the cores needed to keep up with a GPU running ``--gpu-tiles-per-s``;
* **end to end** on synthetic pyramidal TIFF slides written to /tmp with lazily generated tiles:
  tiles/s, nuclei/s, the split read (I/O) / network / post-processing / writing, and the peak RSS
  of the main process; each run is a subprocess so peak RSS is per run. Two slide sizes with the
  same settings show that memory does not grow with the slide.

The default GPU figure, 8 tiles/s, is an estimate for EfficientNet-B5 with 16 TTA passes on 512 px
tiles in fp16 on an A100/H100-class card (~130 forward images/s); measure it with
``benchmarks/gpu_check.sh`` and pass the real number.

Usage::

    python benchmarks/predict_bench.py                      # ~3-5 min on 2 cores
    python benchmarks/predict_bench.py --large 20000        # the 20k x 20k bounded-memory run
    python benchmarks/predict_bench.py --device cuda --encoder efficientnet_b5 --tta 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

GPU_TILES_PER_S = 8.0
TILE = 512
HALO = 64


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
    from conic_qp.classes import ClassScheme
    from conic_qp.model import ConicNet, ModelConfig
    from conic_qp.postprocess import PostprocessParams
    from conic_qp.predict import ModelSet

    scheme = ClassScheme.from_names("dark-pale", ["dark", "pale"])
    if kind == "stain":
        from tests.helpers_models import SYNTH_H, HematoxylinNet

        net: torch.nn.Module = HematoxylinNet(*SYNTH_H)
        params = PostprocessParams.uniform(2, fg=0.5, seed=0.6, min_size=8, max_size=3000)
    else:
        torch.manual_seed(0)
        net = ConicNet(
            ModelConfig(
                encoder,
                2,
                decoder_channels=(32, 16, 16, 8, 8)
                if encoder.startswith("test_")
                else (256, 128, 64, 32, 16),
            )
        )
        with torch.no_grad():  # random features -> image-dependent blobs (see tests)
            for head in (net.head_three_label, net.head_semantic):
                head.weight.mul_(300.0)
        params = PostprocessParams.uniform(2, min_size=4, min_solidity=0.0)
    net.to(device).eval()
    return ModelSet([net], scheme, 0.5, params, info=[{"path": f"random {kind} {encoder}"}])


def network_only(kind: str, encoder: str, device: str, tta: int, batch: int, n_tiles: int) -> dict:
    """Baseline: TTA forward passes of random tiles, no reading and no post-processing."""
    from conic_qp.tta import TTAConfig, predict_probabilities

    models = make_models(kind, encoder, device)
    cfg = TTAConfig(passes=tta, mc_dropout=tta > 1, max_batch=batch)
    x = torch.rand(batch, 3, TILE, TILE, device=device)
    predict_probabilities(models.networks, x, cfg, seed=0, amp=device == "cuda")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    done = 0
    while done < n_tiles:
        out = predict_probabilities(models.networks, x, cfg, seed=done, amp=device == "cuda")
        out["semantic"].cpu()
        done += batch
    dt = time.perf_counter() - t0
    res = {"tiles_per_s": done / dt}
    if device == "cuda":
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def postprocess_only(n_tiles: int) -> dict:
    """Per-core post-processing rate on realistic probability maps (one process, one thread)."""
    from conic_qp.stitch import TileJob, process_tile
    from conic_qp.synthetic import synthetic_slide_image
    from conic_qp.tiling import TileGrid

    models = make_models("stain", "", "cpu")
    grid = TileGrid((2048, 2048), TILE, HALO)
    tile = grid.tile(grid.cols + 1)  # an interior tile: full read box, no padding
    jobs = []
    for i in range(n_tiles):
        img = synthetic_slide_image(TILE, TILE, seed=100 + i, tissue_fraction=0.9).image
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            out = models.networks[0](x)
        sem = torch.softmax(out["semantic"], 1)[0].numpy()
        three = torch.softmax(out["three_label"], 1)[0].numpy()
        jobs.append(
            TileJob(tile, sem, three, models.params, models.classes, (0.0, 0.0), 1.0, 0.5, "bench")
        )
    process_tile(jobs[0])  # warm-up
    t0 = time.perf_counter()
    nuclei = sum(len(process_tile(j).table) for j in jobs)
    dt = time.perf_counter() - t0
    return {
        "tiles_per_s_core": n_tiles / dt,
        "nuclei_per_s_core": nuclei / dt,
        "nuclei_per_tile": nuclei / n_tiles,
    }


def child(args: argparse.Namespace) -> None:
    """One end-to-end slide run (in its own process, so its peak RSS is its own)."""
    torch.set_num_threads(args.threads)
    from conic_qp.predict import PredictSettings, make_executor, predict_slide
    from conic_qp.slides import open_slide
    from conic_qp.tta import TTAConfig

    models = make_models(args.kind, args.encoder, args.device)
    settings = PredictSettings(
        tile_size=TILE,
        halo=HALO,
        batch_size=args.batch,
        tta=TTAConfig(passes=args.tta, mc_dropout=args.tta > 1),
        device=args.device,
        workers=args.workers,
    )
    pool = make_executor(args.workers)
    if pool is not None:
        pool.submit(int).result()  # start the workers: steady state, as in a cohort run
    with tempfile.TemporaryDirectory() as out, open_slide(args.slide) as src:
        t0 = time.perf_counter()
        res = predict_slide(src, models, settings, out, executor=pool)
        wall = time.perf_counter() - t0
    if pool is not None:
        pool.shutdown()
    peak_mib = peak_rss_mib()
    print(
        json.dumps(
            {
                "tiles": res.n_tiles,
                "nuclei": res.n_nuclei,
                "wall_s": wall,
                "timings": res.timings,
                "peak_rss_mib": peak_mib,
                "slide_px": src.dimensions[0],
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


def run_child(slide: Path, kind: str, encoder: str, tta: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--_child", "--slide", str(slide), "--kind", kind,
        "--encoder", encoder, "--tta", str(tta), "--device", args.device,
        "--workers", str(args.workers), "--batch", str(args.batch), "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="conicnet", help=argparse.SUPPRESS)
    p.add_argument("--encoder", default="test_efficientnet", help="timm encoder (random init)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", type=int, default=4, help="TTA passes of the TTA run (and 1)")
    p.add_argument("--workers", type=int, default=1, help="post-processing processes")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--small", type=int, default=2048, help="edge of the small slide (px)")
    p.add_argument("--large", type=int, default=6144, help="edge of the large slide (px)")
    p.add_argument("--gpu-tiles-per-s", type=float, default=GPU_TILES_PER_S)
    p.add_argument("--net-tiles", type=int, default=8, help="tiles of the network-only baseline")
    p.add_argument("--post-tiles", type=int, default=6, help="tiles of the post-only measure")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    if args._child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    report: dict = {"cpu_cores": os.cpu_count(), "device": args.device, "encoder": args.encoder}
    print(f"machine: {os.cpu_count()} cores, device {args.device}, torch threads {args.threads}")

    for tta in (1, args.tta):
        r = network_only("conicnet", args.encoder, args.device, tta, args.batch, args.net_tiles)
        report[f"network_only_tta{tta}"] = r
        print(f"network only, {args.encoder}, TTA {tta}: {r['tiles_per_s']:.2f} tiles/s" + (f", peak GPU {r['peak_gpu_mem_gib']:.2f} GiB" if "peak_gpu_mem_gib" in r else ""))  # fmt: skip
    post = postprocess_only(args.post_tiles)
    report["postprocess_only"] = post
    need = args.gpu_tiles_per_s / post["tiles_per_s_core"]
    report["cores_for_gpu"] = need
    print(
        f"post-processing: {post['nuclei_per_s_core']:.0f} nuclei/s per core, "
        f"{post['tiles_per_s_core']:.2f} tiles/s per core ({post['nuclei_per_tile']:.0f} nuclei "
        f"per {TILE} px tile); keeping up with {args.gpu_tiles_per_s:g} GPU tiles/s needs "
        f"{need:.1f} cores"
    )
    um2_per_tile = ((TILE - 2 * HALO) * 0.5) ** 2  # core area at 0.5 um/px
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        small = write_slide(Path(tmp) / "small.svs", args.small)
        large = write_slide(Path(tmp) / "large.svs", args.large)
        runs = [
            ("conicnet", args.encoder, 1, small),
            ("conicnet", args.encoder, args.tta, small),
            ("stain", "", 1, small),
            ("stain", "", 1, large),
        ]
        for kind, enc, tta, slide in runs:
            r = run_child(slide, kind, enc, tta, args)
            t = r["timings"]
            key = f"e2e_{kind}_tta{tta}_{r['slide_px']}px"
            report[key] = r
            base = report.get(f"network_only_tta{tta}", {}).get("tiles_per_s")
            tps = r["tiles"] / r["wall_s"]
            print(
                f"{key}: {r['tiles']} tiles, {r['nuclei']} nuclei in {r['wall_s']:.1f} s = "
                f"{tps:.2f} tiles/s, {r['nuclei'] / r['wall_s']:.0f} nuclei/s, "
                f"{r['wall_s'] / (r['tiles'] * um2_per_tile * 1e-6):.1f} s/mm^2; split: read "
                f"{t['read_s']:.1f} s, network {t['network_s']:.1f} s, post-processing "
                f"{t['postprocess_s']:.1f} s (waited {t['wait_s']:.1f} s), write {t['write_s']:.1f} s, "
                f"tissue {t['tissue_s']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB"
                + (f"; vs network-only {tps / base:.2f}x" if base and kind == "conicnet" else "")
            )
    a, b = (report[k] for k in report if k.startswith("e2e_stain"))
    print(
        f"bounded memory: {b['slide_px']}^2 px slide ({b['tiles']} tiles) peak RSS "
        f"{b['peak_rss_mib']:.0f} MiB vs {a['slide_px']}^2 px ({a['tiles']} tiles) "
        f"{a['peak_rss_mib']:.0f} MiB: x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} for "
        f"x{b['tiles'] / max(a['tiles'], 1):.1f} tiles"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
