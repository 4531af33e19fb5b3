"""Training steps per second on CPU (or a GPU with --device cuda): b0 vs b5, batch 4, 256x256.

A step is what the training loop does: augmentation + targets for the batch (data time), forward,
the paper's loss, backward and an AdamW update (model time). The first encoder is the baseline;
the others are reported as ratios against it, measured interleaved in the same run.

Usage::

    python benchmarks/train_bench.py
    python benchmarks/train_bench.py --encoders efficientnet_b0,efficientnet_b5 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from conic_qp.classes import CONIC
from conic_qp.model import ConicNet, ModelConfig
from conic_qp.synthetic import synthetic_dataset
from conic_qp.train.augment import Augmenter
from conic_qp.train.data import LabelledSet
from conic_qp.train.loop import TileDataset
from conic_qp.train.losses import ConicLoss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="efficientnet_b0,efficientnet_b5")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import pandas as pd

    images, labels = synthetic_dataset(args.batch * 2, size=args.size, seed=0)
    n = len(images)
    meta = pd.DataFrame(
        {"name": [f"t{i}" for i in range(n)], "source": "s", "split": "", "centre": ""}
    )
    data = LabelledSet(images, labels[..., 0], labels[..., 1], meta, CONIC, 0.5)
    dataset = TileDataset(data, Augmenter(seed=0))

    def batch() -> tuple[dict[str, torch.Tensor], float]:
        t = time.perf_counter()
        items = [dataset[i % n] for i in range(args.batch)]
        out = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        return out, time.perf_counter() - t

    models = {}
    for name in args.encoders.split(","):
        model = ConicNet(ModelConfig(name, CONIC.n_classes)).to(device).train()
        models[name] = (
            model,
            torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=1e-4),
            ConicLoss(7).to(device),
        )
    times: dict[str, list[float]] = {k: [] for k in models}
    data_times: list[float] = []
    use_amp = device.type == "cuda"
    for step in range(args.steps + 1):  # step 0 warms up
        for name, (model, opt, loss_fn) in models.items():
            b, dt = batch()
            t = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                out = model(b["image"])
            loss = loss_fn({k: v.float() for k, v in out.items()}, b)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times[name].append(time.perf_counter() - t)
                data_times.append(dt)

    print(
        f"# training step, batch {args.batch}, {args.size}x{args.size}, {device}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    base = None
    for name, ts in times.items():
        med = statistics.median(ts)
        base = base or med
        print(
            f"{name:24s} model {med * 1000:8.0f} ms/step  {1 / med:6.2f} steps/s  "
            f"ratio vs {args.encoders.split(',')[0]}: {med / base:4.2f}"
        )
    print(f"data (augment + targets, 1 process): {np.median(data_times) * 1000:.0f} ms per batch")


if __name__ == "__main__":
    main()
