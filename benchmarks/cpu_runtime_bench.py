"""CPU inference runtimes for the bundled model, in one run on the same real tiles.

Runs ``conic_qp/models/demo-consep`` on tissue tiles of CMU-1-Small-Region.svs at 0.5 um/px, each
a network input of the engine (``--size``, default the 512 px tile), as one batch (the engine
sends all TTA passes of a batch together), through :func:`conic_qp.tta.predict_probabilities`:

* torch eager, NCHW float32 (``--runtime torch``, the engine's plain network: the baseline);
* torch eager, channels-last float32;
* torch eager, channels-last bfloat16 autocast (when the CPU has bf16 instructions);
* ONNX Runtime, float32 (``--runtime onnx``);
* OpenVINO, float32 (``--runtime openvino``) and bfloat16 (for comparison; not offered).

For each: seconds per tile (best of ``--repeats``, timed round robin over the runtimes so load
changes hit all alike) at 1 thread and at all cores, the largest
probability difference from the baseline, and the instances matched at IoU > 0.5 after
post-processing (the adoption criterion: >= 99 %). An MC-dropout round (``--mc-passes`` passes
of one tile) checks that the exported graph's MC dropout agrees with PyTorch's as closely as two
PyTorch MC runs with different seeds agree with each other.

Exported graphs are cached (see :mod:`conic_qp.runtime`); the first run also exports them.

Usage: python benchmarks/cpu_runtime_bench.py [--tiles 4] [--repeats 2] [--threads 1,2]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conic_qp.metrics import match_instances  # noqa: E402
from conic_qp.postprocess import postprocess  # noqa: E402
from conic_qp.predict import default_model_path, load_models  # noqa: E402
from conic_qp.runtime import available_runtimes, cpu_network  # noqa: E402
from conic_qp.tta import TTAConfig, predict_probabilities  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def cmu1_tiles(n: int, size: int) -> np.ndarray:
    """The ``n`` CMU-1 tiles with most tissue, (n, 3, size, size) float RGB in [0, 1]."""
    from conic_qp.slides import open_slide

    with open_slide(SHARED / "slides" / "CMU-1-Small-Region.svs") as slide:
        f = 0.5 / slide.mpp
        w0, h0 = slide.dimensions
        crops = []
        for y in range(0, int(h0 / f) - size + 1, size // 2):
            for x in range(0, int(w0 / f) - size + 1, size // 2):
                rgb = slide.read((x * f, y * f, size * f, size * f), 0.5, size=(size, size))
                crops.append((float((rgb.mean(axis=2) < 200).mean()), rgb))
    crops.sort(key=lambda c: -c[0])
    rgb = np.stack([np.array(c[1]) for c in crops[:n]])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(255).numpy()


class ChannelsLast(nn.Module):
    """PyTorch eager with channels-last tensors (oneDNN's preferred layout on CPU)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x.contiguous(memory_format=torch.channels_last))
        return {k: v.contiguous() for k, v in out.items()}


class Bf16(nn.Module):
    """Channels-last torch under CPU bfloat16 autocast."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.net(x.contiguous(memory_format=torch.channels_last))
        return {k: v.float().contiguous() for k, v in out.items()}


class OpenVinoBf16(nn.Module):
    """The exported graph under OpenVINO with bf16 inference precision (comparison only)."""

    def __init__(self, exported: nn.Module) -> None:
        super().__init__()
        self.exported = exported

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import openvino as ov

        h, w = int(x.shape[2]), int(x.shape[3])
        path = self.exported.graph_path(h, w, False)  # type: ignore[operator]
        if getattr(self, "_threads", None) != torch.get_num_threads():
            self._threads = torch.get_num_threads()
            self.exported(x[:1])  # exports the graph if needed
            core = ov.Core()
            model = core.read_model(str(path))
            model.reshape({model.inputs[0]: list(x.shape)})
            config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
            config["INFERENCE_NUM_THREADS"] = torch.get_num_threads()
            self._cm = core.compile_model(model, "CPU", config)
            self._req = self._cm.create_infer_request()
        res = self._req.infer({0: x.numpy()})
        return {
            k: torch.from_numpy(np.array(res[self._cm.output(k)]))
            for k in ("semantic", "three_label", "vectors")
        }


def variants(net: nn.Module) -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    import copy

    yield "torch NCHW fp32 (baseline)", lambda: net
    yield "torch channels-last fp32", lambda: ChannelsLast(copy.deepcopy(net))
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        yield "torch channels-last bf16", lambda: Bf16(ChannelsLast(copy.deepcopy(net)))
    avail = available_runtimes()
    if "onnx" in avail:
        yield "onnxruntime fp32", lambda: cpu_network(net, "onnx")
    if "openvino" in avail:
        yield "openvino fp32", lambda: cpu_network(net, "openvino")
        yield "openvino bf16", lambda: OpenVinoBf16(cpu_network(net, "openvino"))


def run(model: nn.Module, x: torch.Tensor, passes: int = 1, seed: int | None = None) -> dict:
    cfg = TTAConfig(passes=passes, mc_dropout=passes > 1, max_batch=32)
    return predict_probabilities([model], x, cfg, seed=seed)


def agreement(params: object, ref: dict, out: dict) -> tuple[float, float]:
    """Smallest share of instances matched at IoU > 0.5 (of either side) over the tiles, and
    the largest probability difference."""
    worst, diff = 1.0, 0.0
    for i in range(ref["semantic"].shape[0]):
        a = postprocess(ref["semantic"][i].numpy(), ref["three_label"][i].numpy(), params)
        b = postprocess(out["semantic"][i].numpy(), out["three_label"][i].numpy(), params)
        st = match_instances(a.labels, b.labels)
        worst = min(worst, st.tp / max(a.n, b.n, 1))
        for k in ("semantic", "three_label"):
            diff = max(diff, float((ref[k][i] - out[k][i]).abs().max()))
    return worst, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--size", type=int, default=512, help="network input edge (px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts to time")
    ap.add_argument("--mc-passes", type=int, default=8, help="0 skips the MC-dropout round")
    args = ap.parse_args()
    if not (SHARED / "slides" / "CMU-1-Small-Region.svs").is_file():
        raise SystemExit(f"needs CMU-1-Small-Region.svs under {SHARED / 'slides'}")
    warnings.filterwarnings("ignore")
    path = default_model_path()
    assert path is not None, "the bundled model is missing"
    models = load_models([path])
    net = models.networks[0].eval()
    x = torch.from_numpy(cmu1_tiles(args.tiles, args.size))
    threads = [int(t) for t in args.threads.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"tiles: {args.tiles} CMU-1 tiles of {args.size}x{args.size} at 0.5 um/px, one batch")

    torch.set_num_threads(threads[-1])
    ref = run(net, x)
    made = []
    for name, make in variants(net):
        t0 = time.perf_counter()
        model = make()
        out = run(model, x)  # exports (first run) and warms up
        setup = time.perf_counter() - t0
        made.append((name, model, *agreement(models.params, ref, out), setup))
    best: dict[tuple[str, int], float] = {}
    for nt in threads:
        torch.set_num_threads(nt)
        for _, model, *_rest in made:
            for m in model.modules():  # the exported runtimes read threads when created
                if hasattr(m, "threads") and hasattr(m, "_graphs"):
                    m.threads, m._graphs = nt, {}
            run(model, x)  # warm-up at this thread count
        # round robin, so that the machine's load changes hit every runtime alike
        for _ in range(args.repeats):
            for name, model, *_rest in made:
                t = _timed(partial(run, model, x)) / args.tiles
                best[(name, nt)] = min(best.get((name, nt), np.inf), t)
    rows = [
        (name, [best[(name, nt)] for nt in threads], matched, diff, setup)
        for name, _, matched, diff, setup in made
    ]
    base = rows[0][1]
    head = "  ".join(f"{f'{t} thr s/tile':>13s} {'x':>5s}" for t in threads)
    print(f"{'runtime':28s} {head}  {'matched':>8s} {'max |dp|':>9s} {'setup s':>8s}")
    for name, timing, matched, diff, setup in rows:
        cells = "  ".join(f"{t:13.2f} {b / t:5.2f}" for t, b in zip(timing, base, strict=True))
        print(f"{name:28s} {cells}  {matched:8.2%} {diff:9.1e} {setup:8.1f}")

    if args.mc_passes > 0 and "openvino" in available_runtimes():
        torch.set_num_threads(threads[-1])
        one = x[:1]
        a = run(net, one, args.mc_passes, seed=1)
        b = run(net, one, args.mc_passes, seed=2)
        ov_net = cpu_network(net, "openvino")
        c = run(ov_net, one, args.mc_passes, seed=1)
        c2 = run(ov_net, one, args.mc_passes, seed=1)
        same = all(torch.equal(c[k], c2[k]) for k in c)
        floor = agreement(models.params, a, b)
        got = agreement(models.params, a, c)
        print(
            f"MC dropout, {args.mc_passes} passes of one tile: torch seed 1 vs torch seed 2 "
            f"{floor[0]:.1%} matched (max |dp| {floor[1]:.2f}); torch vs openvino (seed 1) "
            f"{got[0]:.1%} (max |dp| {got[1]:.2f}); openvino re-run identical: {same}"
        )


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
