"""Milliseconds per 256x256 training sample of :class:`conic_qp.train.augment.Augmenter`, one core.

Run: ``python benchmarks/augment_bench.py [--n 300] [--size 256]``. Prints the mean time of
colour only, geometric only and both (default probabilities, so an average over the random draws)
and of every step forced on (worst case), each as a ratio to a baseline measured in the same run
(``np.rot90`` + copy of image and label maps, the cheapest augmentation there is). Budget: < 15 ms
per sample for the default pipeline. CPU time (``time.process_time``) is the headline figure: on a
shared machine wall time also counts waiting for a core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, as in a DataLoader worker; must precede numpy/torch

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conic_qp.train.augment import AugmentConfig, Augmenter  # noqa: E402

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


def synthetic_sample(size: int, n_nuclei: int = 60, seed: int = 0) -> Sample:
    """Pinkish tile with dark purple disks; inst ids 1..n, classes 1..6."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = (235, 200, 220)
    inst = np.zeros((size, size), dtype=np.int32)
    rows, cols = np.mgrid[:size, :size]
    for i in range(1, n_nuclei + 1):
        r, c, rad = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)
        disk = (rows - r) ** 2 + (cols - c) ** 2 <= rad**2
        inst[disk] = i
    image[inst > 0] = (90, 50, 140)
    noise = rng.normal(0, 8, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    lut = np.r_[0, rng.integers(1, 7, n_nuclei)]
    return image, inst, lut[inst].astype(np.int32)


def time_ms(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call; CPU time is the figure that survives a shared, loaded machine."""
    for _ in range(5):
        fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - cpu) / n * 1e3, (time.perf_counter() - wall) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="samples per measurement")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    image, inst, cls = synthetic_sample(args.size)

    def baseline() -> Sample:
        return (
            np.ascontiguousarray(np.rot90(image)),
            np.ascontiguousarray(np.rot90(inst)),
            np.ascontiguousarray(np.rot90(cls)),
        )

    always: dict[str, Any] = {
        f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")
    }
    every_step = dataclasses.replace(AugmentConfig(), **always)
    cases = {
        "colour only": Augmenter(seed=1, geometric=False),
        "geometric only": Augmenter(seed=1, colour=False),
        "both (default)": Augmenter(seed=1),
        "both, every step on": Augmenter(every_step, seed=1),
    }
    base, base_wall = time_ms(baseline, args.n)
    load = os.getloadavg()[0]
    print(f"{args.size}x{args.size} sample, 1 thread, n={args.n}, load average {load:.1f}")
    print(f"{'':<24}{'CPU ms':>8}{'ratio':>7}{'wall ms':>9}")
    print(f"{'baseline rot90+copy':<24}{base:8.2f}{1.0:6.1f}x{base_wall:9.2f}")
    for name, aug in cases.items():

        def run(aug: Augmenter = aug) -> object:
            return aug(image, inst, cls)

        ms, wall = time_ms(run, args.n)
        print(f"{name:<24}{ms:8.2f}{ms / base:6.1f}x{wall:9.2f}")


if __name__ == "__main__":
    main()
