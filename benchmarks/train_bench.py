"""Training steps per second of the real training loop, baseline settings vs the speed knobs.

Every variant runs :func:`conic_qp.train.loop.train` itself (augmentation, targets, forward,
the paper's loss, backward, AdamW) on the same synthetic tiles, so the figures are what a
training run gets, in a fresh process (the OpenMP wait policy is fixed when torch loads). The
first variant is the baseline: the loop as it was before the speed knobs (fp32, contiguous NCHW
tensors, augmentation in the main process, torch's default threads with spinning OpenMP waits);
the others are reported as ratios against it. Variants run in turn, ``--rounds`` times, and the
median step time over all rounds is reported, so a machine whose load changes during the run
affects every variant alike. On a shared machine the load matters more than anything: the
printed load average says what the figures were measured under.

Usage::

    python benchmarks/train_bench.py                       # the demo recipe's shape: lite0, 8 x 128 px
    python benchmarks/train_bench.py --steps 20 --rounds 3
    python benchmarks/train_bench.py --encoder efficientnet_b5 --batch 4 --size 256 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
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

#: name -> (config overrides, environment); the first is the baseline.
DEFAULT: dict[str, str | None] = {"OMP_WAIT_POLICY": None}  # None: unset (OpenMP's default)
PASSIVE: dict[str, str | None] = {"OMP_WAIT_POLICY": "PASSIVE"}
VARIANTS: dict[str, tuple[list[str], dict[str, str | None]]] = {
    "baseline (NCHW, 0 workers, 2 threads)": (
        ["channels_last=false", "workers=0", "threads=2"],
        DEFAULT,
    ),
    "passive OpenMP waits": (["channels_last=false", "workers=0", "threads=2"], PASSIVE),
    "+ channels_last": (["channels_last=true", "workers=0", "threads=2"], PASSIVE),
    "+ 1 data worker (the recipe)": (["channels_last=true", "workers=1", "threads=2"], PASSIVE),
    "+ bf16 autocast": (
        ["channels_last=true", "workers=1", "threads=2", "optim.bf16_cpu=true"],
        PASSIVE,
    ),
    "recipe with 1 thread": (["channels_last=true", "workers=1", "threads=1"], PASSIVE),
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


def _child(args: argparse.Namespace) -> None:
    """One variant in this process: print its step times as JSON."""
    sets, _ = VARIANTS[args.child]
    data = _data(max(4 * args.batch, 16), args.size)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(_run(args, sets, data, Path(tmp) / "run")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="tf_efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args)
        return
    names = [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name in names:
            env = dict(os.environ)
            for key, value in VARIANTS[name][1].items():
                env.pop(key, None)
                if value is not None:
                    env[key] = value
            argv = [sys.executable, __file__, "--child", name]
            for key in ("encoder", "batch", "size", "steps", "warmup", "device"):
                argv += [f"--{key}", str(getattr(args, key))]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
            times[name] += json.loads(out.stdout.strip().splitlines()[-1])
            loads.append(os.getloadavg()[0])

    print(
        f"# training loop, {args.encoder}, batch {args.batch} x {args.size}x{args.size} px, "
        f"{args.device}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {min(loads):.1f}-{max(loads):.1f}, torch {torch.__version__}"
    )
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        print(
            f"{name:40s} {med * 1000:7.0f} ms/step  {1 / med:5.2f} steps/s  "
            f"speed-up {base / med:5.2f}x  ({len(times[name])} steps)"
        )


if __name__ == "__main__":
    main()
