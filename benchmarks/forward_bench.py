"""CPU forward time of ConicNet per 256x256 tile, for encoders of different size.

Answers "how much slower is the paper's B5 than B0 on a CPU-only machine?" with the baseline (the
first encoder given) measured in the same run, so ratios hold even on a busy machine.

Usage::

    python benchmarks/forward_bench.py
    python benchmarks/forward_bench.py --encoders efficientnet_b0,efficientnet_b5 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from conic_qp.model import ConicNet, ModelConfig, count_parameters


def time_forwards(
    models: dict[str, ConicNet], batch: int, size: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """(median, min) milliseconds per tile for each model.

    Passes of the different models are interleaved, so load from other processes on a shared
    machine hits every model alike and the ratios stay meaningful.
    """
    x = torch.rand(batch, 3, size, size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {
        name: (1000.0 * statistics.median(t) / batch, 1000.0 * min(t) / batch)
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoders",
        default="efficientnet_b0,efficientnet_b5",
        help="comma-separated timm encoders; the first is the ratio baseline",
    )
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting")
    parser.add_argument(
        "--threads",
        default=f"{os.cpu_count()},1",
        help="comma-separated torch thread counts (default: all cores, then 1)",
    )
    parser.add_argument("--n-classes", type=int, default=6)
    args = parser.parse_args()

    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; tile {args.size}x{args.size}, eval, no_grad, "
        f"median of {args.repeats}"
    )

    models = {}
    for name in encoders:
        torch.manual_seed(0)
        model = ConicNet(ModelConfig(name, args.n_classes)).eval()
        models[name] = model
        total, enc = count_parameters(model), count_parameters(model.encoder)
        print(
            f"{name}: {total / 1e6:.2f} M parameters (encoder {enc / 1e6:.2f} M, "
            f"decoders + heads {(total - enc) / 1e6:.2f} M)"
        )

    base = encoders[0]
    print("\nms per tile, median (min) over the timed passes")
    header = f"{'threads':>7} {'batch':>5} " + " ".join(f"{n:>22}" for n in encoders)
    if len(encoders) > 1:
        header += "   ratio vs " + base + " (median, min)"
    print(header)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for batch in batches:
            res = time_forwards(models, batch, args.size, args.repeats)
            cells = " ".join(f"{f'{res[n][0]:.1f} ({res[n][1]:.1f})':>22}" for n in encoders)
            ratios = "  ".join(
                f"{n}: {res[n][0] / res[base][0]:.2f}, {res[n][1] / res[base][1]:.2f}"
                for n in encoders[1:]
            )
            print(f"{n_threads:>7} {batch:>5} {cells}   {ratios}")


if __name__ == "__main__":
    main()
