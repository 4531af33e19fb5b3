"""Single-core speed of post-processing (paper II.G) on realistic 256x256 tiles at 0.5 um/px.

Tiles: real CoNSeP instance maps (0.25 um/px; four tiles are put 2x2 and halved, giving a
256x256 tile at 0.5 um/px with CoNIC-like nucleus counts and sizes) when ../shared/data exists,
else random touching ellipses. Probabilities: the perfect targets made soft and noisy (blurred
one-hot logits plus smooth noise, softmax), so thresholds, seeds and class regions behave as on
network output rather than on clean one-hot maps.

Baselines measured in the same run, interleaved tile by tile so machine load hits all alike:
``label``: skimage.measure.label of the thresholded foreground (the cheapest possible instance
step) and ``watershed``: one class-agnostic seeded skimage watershed over the whole tile.

Usage: python benchmarks/postprocess_bench.py [--tiles 40] [--repeats 5] [--classes 4]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.draw import ellipse  # noqa: E402
from skimage.measure import label  # noqa: E402
from skimage.segmentation import watershed  # noqa: E402

from conic_qp.postprocess import (  # noqa: E402
    PostprocessParams,
    postprocess,
    refine_instances,
    watershed_instances,
)
from conic_qp.targets import make_targets  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def consep_tiles(n: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(instance map, per-id class lookup) at 0.5 um/px from 2x2 mosaics of CoNSeP tiles."""
    from PIL import Image
    from scipy.io import loadmat

    pngs = sorted((SHARED / "consep/inst_png").glob("*/*.png"))
    for _ in range(n):
        quad = rng.choice(len(pngs), 4, replace=False)
        mosaic = np.zeros((512, 512), dtype=np.int64)
        lut = [0]
        for q, (y, x) in zip(quad, [(0, 0), (0, 256), (256, 0), (256, 256)], strict=True):
            png = pngs[q]
            inst = np.array(Image.open(png)).astype(np.int64)
            mat = SHARED / "consep/type_mat" / png.parent.name / (png.stem + ".mat")
            types = loadmat(mat)["inst_type"].ravel()
            mosaic[y : y + 256, x : x + 256] = np.where(inst > 0, inst + len(lut) - 1, 0)
            lut.extend(types.tolist())
        yield mosaic[::2, ::2], np.asarray(lut)


def synthetic_tiles(
    n: int, rng: np.random.Generator, n_classes: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Random, partly touching ellipses (~100 per tile, 30-300 px each)."""
    for _ in range(n):
        inst = np.zeros((256, 256), dtype=np.int64)
        k = 0
        for _ in range(110):
            r, c = rng.uniform(0, 256, 2)
            a, b = rng.uniform(3, 9, 2)
            rr, cc = ellipse(r, c, a, b, rotation=rng.uniform(0, np.pi), shape=inst.shape)
            k += 1
            inst[rr, cc] = k
        yield inst, np.r_[0, rng.integers(1, n_classes + 1, k)]


def soft_probs(
    onehot_idx: np.ndarray, n: int, rng: np.random.Generator, sigma: float
) -> np.ndarray:
    """Softmax of blurred one-hot logits plus smooth noise: network-like probabilities."""
    logits = 6.0 * (np.arange(n)[:, None, None] == onehot_idx[None]).astype(np.float32)
    logits = ndi.gaussian_filter(logits, (0, sigma, sigma))
    noise = ndi.gaussian_filter(rng.normal(0, 3.0, logits.shape).astype(np.float32), (0, 2, 2))
    logits += noise
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def best_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--classes", type=int, default=4, help="classes of synthetic tiles")
    ap.add_argument("--synthetic", action="store_true", help="ignore ../shared/data")
    ap.add_argument(
        "--wall",
        action="store_true",
        help="time wall clock instead of this process's CPU time (CPU time is the default "
        "because a shared machine's load inflates wall time unevenly)",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    real = SHARED.is_dir() and not args.synthetic
    n_classes = 4 if real else args.classes
    tiles = consep_tiles(args.tiles, rng) if real else synthetic_tiles(args.tiles, rng, n_classes)
    params = PostprocessParams.default(n_classes)
    clock = time.perf_counter if args.wall else time.process_time

    rows: dict[str, list[float]] = {
        "label": [],
        "watershed": [],
        "postprocess": [],
        "ws_step": [],
        "refine_step": [],
    }
    n_true = n_pred = 0
    for inst, lut in tiles:
        t = make_targets(inst, lut)
        assert t.semantic is not None
        sem = soft_probs(t.semantic, n_classes + 1, rng, 1.0)
        tl = soft_probs(t.three_label.astype(np.int64), 3, rng, 0.7)
        fg = (tl[1] + tl[2]) > 0.5
        seeds = label(tl[1] > 0.7)

        labels, label_class = watershed_instances(sem, tl, params)
        calls: dict[str, Callable[[], object]] = {
            "label": partial(label, fg),
            "watershed": partial(watershed, -tl[1], seeds, mask=fg),
            "postprocess": partial(postprocess, sem, tl, params),
            "ws_step": partial(watershed_instances, sem, tl, params),
            "refine_step": partial(refine_instances, labels, label_class, sem, params),
        }
        for name, call in calls.items():  # interleaved per tile: load hits all alike
            rows[name].append(best_ms(call, args.repeats, clock))
        n_true += len(np.unique(inst)) - 1
        n_pred += postprocess(sem, tl, params).n

    n = len(rows["label"])
    mean = {k: float(np.mean(v)) for k, v in rows.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 used")
    print(
        f"tiles: {n} x 256x256 {'CoNSeP mosaics at 0.5 um/px' if real else 'synthetic'}, "
        f"{n_classes} classes, {n_true / n:.0f} true / {n_pred / n:.0f} predicted nuclei per tile"
    )
    what = "wall" if args.wall else "CPU"
    print(f"{what} time, best of {args.repeats} per tile, mean over tiles (ms per 256x256 tile):")
    names = {
        "label": "baseline: label(fg > 0.5)",
        "watershed": "baseline: one class-agnostic watershed",
        "ws_step": "watershed_instances (validation + per-class watershed)",
        "refine_step": "refine_instances (public: validation, remap, CC split, filters)",
        "postprocess": "postprocess (all of II.G)",
    }
    for k, name in names.items():
        print(f"  {mean[k]:7.2f} ms  {name}")
    pp = mean["postprocess"]
    print(f"postprocess: {pp:.2f} ms/tile, {n_pred / n / pp * 1e3:,.0f} nuclei/s on one core")
    print(f"ratio postprocess / label baseline:     {pp / mean['label']:.1f}x")
    print(f"ratio postprocess / plain watershed:    {pp / mean['watershed']:.1f}x")


if __name__ == "__main__":
    main()
