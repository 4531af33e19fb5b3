"""Single-core speed of post-processing (paper II.G) and the nucleus table, on real tissue density.

Tiles (512 x 512 at 0.5 um/px, the engine's tile size):

* real, when ``../shared/data`` exists: crops of CMU-1-Small-Region.svs (tissue tiles only) and
  CoNSeP test images (4 x 4 mosaics of their 256 px tiles at 0.25 um/px, halved), run through the
  bundled model (``conic_qp/models/demo-consep``, one pass) so the probability maps are real
  network output;
* otherwise synthetic: touching ellipses with nucleus counts and sizes calibrated to real tissue
  (about 450 nuclei per tile, 15-120 px each; real CoNSeP mosaics give 500-620, CMU-1 150-300),
  turned into network-like probabilities (blurred one-hot logits plus smooth noise).

Two stages are timed, interleaved tile by tile (machine load hits both alike), CPU time of this
process, best of ``--repeats``: :func:`conic_qp.postprocess.postprocess` (probabilities ->
instances) and :func:`conic_qp.objects.instances_to_table` (outlines, measurements, ids). The
baseline is the implementation of git revision ``--baseline`` (loaded from git, run in the same
process on the same tiles); the run also checks that the instances are identical, measures how
far the outlines moved (Hausdorff distance) and compares the table's shape measurements with a
QuPath-style computation done one polygon at a time.

By default both run the paper's post-processing (per-class watershed, the paper's seeds), which
the baseline implements too, so the instances can be checked identical. ``--shipped`` runs the
current implementation with the bundled model's thresholds as shipped (h-maxima seeds,
``seed_dynamic`` 0.2; one watershed across classes) and the baseline with the paper's: the ratio is
then what the shipped settings cost, and the instances differ by design.

Usage: python benchmarks/postprocess_bench.py [--tiles 12] [--repeats 3] [--synthetic] [--shipped]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import shapely  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.draw import ellipse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conic_qp.classes import CONSEP  # noqa: E402
from conic_qp.postprocess import PostprocessParams, postprocess  # noqa: E402
from conic_qp.predict import default_model_path  # noqa: E402
from conic_qp.targets import make_targets  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TILE = 512
Tile = tuple[str, np.ndarray, np.ndarray]  # (name, semantic, three_label)


# ------------------------------------------------------------------------------------ tiles


def _network() -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], PostprocessParams]:
    import torch

    from conic_qp.predict import load_models
    from conic_qp.tta import TTAConfig, predict_probabilities

    torch.set_num_threads(1)
    path = default_model_path()
    if path is None:
        raise SystemExit("the bundled model is missing; run with --synthetic")
    models = load_models([path])

    def run(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255
        out = predict_probabilities(models.networks, x, TTAConfig(passes=1, mc_dropout=False))
        return out["semantic"][0].numpy(), out["three_label"][0].numpy()

    return run, models.params


def real_tiles(n: int) -> tuple[list[Tile], PostprocessParams]:
    """Half CMU-1 crops (densest tissue first), half CoNSeP mosaics, through the model."""
    from PIL import Image

    from conic_qp.slides import open_slide

    run, params = _network()
    tiles: list[Tile] = []
    with open_slide(SHARED / "slides" / "CMU-1-Small-Region.svs") as slide:
        f = 0.5 / slide.mpp
        w0, h0 = slide.dimensions
        crops = []
        for y in range(0, int(h0 / f) - TILE + 1, TILE):
            for x in range(0, int(w0 / f) - TILE + 1, TILE):
                rgb = slide.read((x * f, y * f, TILE * f, TILE * f), 0.5, size=(TILE, TILE))
                tissue = float((rgb.mean(axis=2) < 200).mean())
                crops.append((tissue, f"CMU-1 x{x} y{y}", rgb))
    crops.sort(key=lambda c: -c[0])
    for _, name, rgb in crops[: (n + 1) // 2]:
        tiles.append((name, *run(rgb)))
    images = sorted(
        {p.name.rsplit("_", 1)[0] for p in (SHARED / "consep/images/test").glob("*.jpg")}
    )
    for image in images[: n - len(tiles)]:
        files = sorted((SHARED / "consep/images/test").glob(f"{image}_*.jpg"))[:16]
        mosaic = np.zeros((1024, 1024, 3), np.uint8)
        for i, file in enumerate(files):
            r, c = divmod(i, 4)
            mosaic[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = np.asarray(
                Image.open(file).convert("RGB")
            )
        rgb = np.asarray(Image.fromarray(mosaic).resize((TILE, TILE), Image.BILINEAR))
        tiles.append((f"CoNSeP {image}", *run(rgb)))
    return tiles, params


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


def synthetic_tiles(n: int, rng: np.random.Generator) -> Iterator[Tile]:
    """Touching ellipses at real density (about 450 per 512 px tile), 4 classes."""
    for i in range(n):
        inst = np.zeros((TILE, TILE), dtype=np.int64)
        k = 0
        for _ in range(520):
            r, c = rng.uniform(0, TILE, 2)
            a, b = rng.uniform(2.5, 6.5, 2)
            rr, cc = ellipse(r, c, a, b, rotation=rng.uniform(0, np.pi), shape=inst.shape)
            k += 1
            inst[rr, cc] = k
        t = make_targets(inst, np.r_[0, rng.integers(1, 5, k)])
        assert t.semantic is not None
        sem = soft_probs(t.semantic, 5, rng, 1.0)
        tl = soft_probs(t.three_label.astype(np.int64), 3, rng, 0.7)
        yield f"synthetic {i}", sem, tl


# --------------------------------------------------------------------------------- baseline


def baseline_modules(rev: str) -> tuple[ModuleType, ModuleType] | None:
    """``postprocess`` and ``objects`` of git revision ``rev``, imported under other names."""
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="conicqp-baseline-"))
    for name in ("postprocess", "objects"):
        try:
            src = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{rev}:conic_qp/{name}.py"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"no baseline: cannot read conic_qp/{name}.py at {rev} from git ({exc})")
            return None
        path = tmp / f"baseline_{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        out.append(module)
    return out[0], out[1]


# ----------------------------------------------------------------------------------- checks


def qupath_style(poly: shapely.Polygon, mpp: float) -> dict[str, float]:
    """The measurements QuPath makes on one ROI, computed plainly for one polygon."""
    xy = np.asarray(poly.exterior.coords)
    area, length = poly.area, poly.length
    angles = np.deg2rad(np.arange(0.0, 180.0, 0.01))
    proj = xy @ np.stack([np.cos(angles), np.sin(angles)])
    return {
        "area_um2": area * mpp**2,
        "perimeter_um": length * mpp,
        "solidity": area / poly.convex_hull.area,
        "circularity": 4 * np.pi * area / length**2,
        "max_caliper_um": float(np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)).max()) * mpp,
        "min_caliper_um": float((proj.max(axis=0) - proj.min(axis=0)).min()) * mpp,
    }


def best_s(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="ignore ../shared/data")
    ap.add_argument("--baseline", default="1cb9648", help="git revision of the baseline")
    ap.add_argument("--wall", action="store_true", help="wall clock instead of CPU time")
    ap.add_argument(
        "--shipped",
        action="store_true",
        help="current run with the bundled thresholds as shipped, not the paper's settings",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    real = SHARED.is_dir() and not args.synthetic
    clock = time.perf_counter if args.wall else time.process_time
    t0 = time.perf_counter()
    if real:
        tiles, params = real_tiles(args.tiles)
    else:
        tiles, params = list(synthetic_tiles(args.tiles, rng)), PostprocessParams.default(4)
    t_tiles = time.perf_counter() - t0
    paper = dataclasses.replace(params, seed_dynamic=0.0, per_class_watershed=True)
    # the baseline predates both settings: it reads only the keys it knows and runs the paper's
    old_json = {
        k: v for k, v in paper.to_json().items() if k not in ("seed_dynamic", "per_class_watershed")
    }
    if not args.shipped:
        params = paper
    elif not real:  # synthetic tiles, thresholds as the bundled model ships them
        folder = default_model_path()
        if folder is None:
            raise SystemExit("the bundled model is missing; --shipped needs its thresholds")
        params = PostprocessParams.from_json(json.loads((folder / "thresholds.json").read_text()))
    base = baseline_modules(args.baseline)
    mpp, scale, origin = 0.499, 0.5 / 0.499, (20000.0, 30000.0)  # a 0.499 um/px slide, as CMU-1

    def table(module: ModuleType, inst: object) -> object:
        return module.instances_to_table(
            inst, CONSEP, origin_xy=origin, scale=scale, mpp_level0=mpp, image_id="bench"
        )

    import conic_qp.objects as new_objects

    times: dict[str, float] = {"pp_new": 0.0, "tab_new": 0.0, "pp_old": 0.0, "tab_old": 0.0}
    n_nuclei = 0
    same = True
    hausdorff: list[np.ndarray] = []
    mask_vs_poly: list[np.ndarray] = []
    agree: dict[str, list[float]] = {}
    per_tile = []
    for name, sem, tl in tiles:
        inst = postprocess(sem, tl, params)
        n_nuclei += inst.n
        times["pp_new"] += (
            pp := best_s(partial(postprocess, sem, tl, params), args.repeats, clock)
        )
        tab = table(new_objects, inst)
        times["tab_new"] += (tb := best_s(partial(table, new_objects, inst), args.repeats, clock))
        per_tile.append((name, inst.n, pp, tb))
        if base is not None:
            old_pp, old_obj = base
            old_params = old_pp.PostprocessParams.from_json(old_json)
            old_inst = old_pp.postprocess(sem, tl, old_params)
            times["pp_old"] += best_s(
                partial(old_pp.postprocess, sem, tl, old_params), args.repeats, clock
            )
            old_tab = table(old_obj, inst)
            times["tab_old"] += best_s(partial(table, old_obj, inst), args.repeats, clock)
            same &= bool(
                np.array_equal(old_inst.labels, inst.labels)
                and np.array_equal(old_inst.classes, inst.classes)
                and np.array_equal(old_inst.probs, inst.probs)
                and old_tab["id"].tolist() == tab["id"].tolist()
            )
            p_old = shapely.from_wkb(old_tab["polygon_wkb"].to_numpy())
            p_new = shapely.from_wkb(tab["polygon_wkb"].to_numpy())
            hausdorff.append(shapely.hausdorff_distance(p_old, p_new) / scale)
            mask_vs_poly.append(np.abs(old_tab["area_um2"].to_numpy() / tab["area_um2"] - 1))
        polys = shapely.from_wkb(tab["polygon_wkb"].to_numpy())
        for i in rng.choice(len(tab), min(40, len(tab)), replace=False):
            ref = qupath_style(polys[i], mpp)
            for key, value in ref.items():
                agree.setdefault(key, []).append(abs(float(tab[key].iloc[i]) / value - 1))

    n = len(tiles)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 used")
    kind = "real tissue through the bundled model" if real else "synthetic at real density"
    print(
        f"tiles: {n} x {TILE}x{TILE} at 0.5 um/px, {kind} ({t_tiles:.0f} s to make); "
        f"{n_nuclei / n:.0f} nuclei per tile (min {min(t[1] for t in per_tile)}, "
        f"max {max(t[1] for t in per_tile)})"
    )
    what = "wall" if args.wall else "CPU"
    print(f"{what} time, best of {args.repeats} per tile, summed over tiles:")
    rows = [("postprocess", "pp"), ("instances_to_table", "tab")]
    print(f"  {'stage':22s} {'baseline':>16s} {'now':>16s} {'speed-up':>9s}")
    for label, key in [*rows, ("both", "")]:
        new = times["pp_new"] + times["tab_new"] if not key else times[f"{key}_new"]
        old = times["pp_old"] + times["tab_old"] if not key else times[f"{key}_old"]
        old_txt = f"{n_nuclei / old:9,.0f} nuc/s" if old else f"{'-':>15s}"
        ratio = f"{old / new:8.1f}x" if old else ""
        print(f"  {label:22s} {old_txt:>16s} {n_nuclei / new:9,.0f} nuc/s {ratio:>9s}")
    print(
        "per tile (now): "
        + ", ".join(f"{nm}: {k} nuclei {k / (a + b):,.0f}/s" for nm, k, a, b in per_tile)
    )
    print(
        f"now: seed_dynamic {params.seed_dynamic}, per-class watershed "
        f"{params.per_class_watershed}; baseline: the paper's (0, True)"
    )
    if base is not None and args.shipped:
        print("instances differ from the baseline by design (--shipped); not compared")
    elif base is not None:
        hd = np.concatenate(hausdorff)
        print(f"same instances, classes, probabilities and ids as {args.baseline}: {same}")
        print(
            f"outline moved vs {args.baseline} (Hausdorff, model px): median {np.median(hd):.3f}, "
            f"p99 {np.percentile(hd, 99):.3f}, max {hd.max():.3f} (limit 0.5)"
        )
        mv = np.concatenate(mask_vs_poly)
        print(
            f"old 'Nucleus: Area' (mask pixels) vs the outline's area: median {np.median(mv):.2%}, "
            f"p99 {np.percentile(mv, 99):.2%}, max {mv.max():.2%}"
        )
    print("table vs QuPath-style per-polygon measurement (relative difference, median / max):")
    for key, values in agree.items():
        v = np.asarray(values)
        print(f"  {key:16s} {np.median(v):.1e} / {v.max():.1e}")


if __name__ == "__main__":
    main()
