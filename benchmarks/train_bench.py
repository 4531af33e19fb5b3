"""Training steps per second of the real training loop, baseline settings vs the speed knobs.

Every variant runs :func:`conic_qp.train.loop.train` itself (augmentation, targets, forward,
the paper's loss, backward, AdamW) on the same synthetic tiles, so the figures are what a
training run gets. The first variant is the baseline (the loop as it was before the speed knobs:
fp32, contiguous NCHW tensors, augmentation in the main process); the others are reported as
ratios against it. Variants are run in turn, ``--rounds`` times, and the median step time of all
rounds is reported, so a machine whose load changes during the run affects every variant alike.

Usage::

    python benchmarks/train_bench.py                       # the demo recipe's shape: lite0, 8 x 128 px
    python benchmarks/train_bench.py --threads 2 --steps 20 --rounds 3
    python benchmarks/train_bench.py --encoder efficientnet_b5 --batch 4 --size 256 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from conic_qp.classes import CONSEP
from conic_qp.synthetic import synthetic_dataset
from conic_qp.train.config import load_config
from conic_qp.train.data import LabelledSet
from conic_qp.train.loop import PreparedData, train

#: name -> config overrides; the first is the baseline.
VARIANTS: dict[str, list[str]] = {
    "baseline (fp32, NCHW, 0 workers)": ["channels_last=false", "workers=0"],
    "channels_last": ["channels_last=true", "workers=0"],
    "channels_last + bf16 autocast": ["channels_last=true", "workers=0", "optim.bf16_cpu=true"],
    "channels_last + 1 worker": ["channels_last=true", "workers=1"],
    "channels_last + 1 worker + bf16": ["channels_last=true", "workers=1", "optim.bf16_cpu=true"],
}


def _data(n: int, size: int) -> PreparedData:
    images, labels = synthetic_dataset(n, size=size, seed=0, n_classes=CONSEP.n_classes)
    meta = pd.DataFrame(
        {"name": [f"t{i}" for i in range(n)], "source": "s", "split": "", "centre": ""}
    )
    tiles = LabelledSet(images, labels[..., 0], labels[..., 1], meta, CONSEP, 0.5)
    return PreparedData(train=tiles, val=tiles.subset([0, 1]), scheme=CONSEP)


def _run(args: argparse.Namespace, sets: list[str], data: PreparedData, out: Path) -> list[float]:
    config = load_config(
        None,
        [
            f"out={out}",
            "data.train=[{format: tiles, path: .}]",
            f"device={args.device}",
            f"threads={args.threads}",
            f"model.encoder={args.encoder}",
            "model.pretrained=false",
            "model.decoder_channels=[128, 64, 32, 16, 16]",
            f"optim.steps={args.warmup + args.steps}",
            f"optim.batch_size={args.batch}",
            "optim.warmup_steps=0",
            "log_every=1",
            "checkpoint_every=100000",
            "validation.every=100000",
            *sets,
        ],
    )
    stamps: list[float] = []

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "step":
            stamps.append(time.perf_counter())

    train(config, on_event=on_event, data=data)
    deltas = [b - a for a, b in itertools.pairwise(stamps)]
    return deltas[args.warmup - 1 :] if args.warmup else deltas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="tf_efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
    args = ap.parse_args()
    names = [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    data = _data(max(4 * args.batch, 16), args.size)
    times: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, name in enumerate(names):
                times[name] += _run(args, VARIANTS[name], data, Path(tmp) / f"r{r}v{i}")

    print(
        f"# training loop, {args.encoder}, batch {args.batch} x {args.size}x{args.size} px, "
        f"{args.device}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}"
    )
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        print(
            f"{name:36s} {med * 1000:7.0f} ms/step  {1 / med:5.2f} steps/s  "
            f"speed-up {base / med:4.2f}x  ({len(times[name])} steps)"
        )


if __name__ == "__main__":
    main()
