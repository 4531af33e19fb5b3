"""Tiled vs whole-image inference with the real network: which tiling gives the whole-image result.

For each input, each squeeze-excitation window (``se``: ``global`` = as trained, else the
:mod:`conic_qp.local_se` window in px) and each tiling (tile, overlap, blending window), the
engine's instances are matched at IoU > 0.5 against the same image run as ONE tile and one block
with the same network (the reference): nuclei matched / extra / missing, agreement = matched /
reference nuclei, network pixels per slide pixel (``(tile / (tile - overlap))**2``, what a whole
slide costs) and per pixel of the crop (less: a crop's border tiles do not overlap outwards), and
seconds per mm^2 (``--threads`` torch threads, post-processing inline, TTA 1, no MC dropout).
Each tiling runs on the largest crop it covers with regular overlaps (``regular_size``), as
almost all tiles of a slide are; the reference is that crop as one tile. The last lines of
each input compare the whole-image results of two crop sizes on their common pixels: with
the trained (global) SE the "whole image" result itself depends on the crop. ``vs trained`` is the agreement with the
whole image run by the network as trained (global SE): how far a setting is from what the
network gives on one whole image. Ratios hold within one run; absolute times depend on the load.

Inputs (at 0.5 um/px): a 1536 px crop of CMU-1 (``../shared/data/slides``) and a 3 x 3 mosaic of
CoNSeP test images reassembled from their tiles (``benchmarks/consep_images.py``).

Accuracy on labelled data (CoNSeP test split, ground truth): PQ and mPQ+ of (a) the 224 test
tiles (128 px at 0.5 um/px, smaller than a network tile) scored as ``conic-qp evaluate`` does
(plain forward pass, global SE) and through the engine with the default settings, (b) the 12
reassembled test images and (c) the mosaic, each whole with global SE and through the engine.

Usage::

    python benchmarks/tiling_bench.py                 # ~30 min on one busy core
    python benchmarks/tiling_bench.py --quick         # fewer rows
    python benchmarks/tiling_bench.py --model CKPT --out tiling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from conic_qp.engine import segment_image
from conic_qp.local_se import se_windows
from conic_qp.metrics import evaluate, match_instances
from conic_qp.predict import PredictSettings, default_model_path, load_models
from conic_qp.tta import TTAConfig

CROP = 2048
CMU_XY = (80, 400)  # level-0 corner of the CMU-1 crop (tissue throughout)
SE_WINDOWS: dict[str, int | None] = {"global": None, "96": 96, "160": 160, "288": 288}
# (se, tile, overlap, window)
ROWS: list[tuple[str, int, int, str]] = [
    ("global", 512, 128, "gaussian"),
    ("global", 1024, 256, "gaussian"),
    ("96", 512, 128, "gaussian"),
    ("96", 512, 256, "gaussian"),
    ("96", 768, 256, "gaussian"),
    ("96", 1024, 256, "gaussian"),
    ("96", 1024, 384, "gaussian"),
    ("160", 512, 128, "crop"),
    ("160", 512, 128, "gaussian"),
    ("160", 512, 256, "gaussian"),
    ("160", 768, 256, "gaussian"),
    ("160", 1024, 256, "crop"),
    ("160", 1024, 256, "gaussian"),
    ("160", 1024, 384, "gaussian"),
    ("288", 512, 128, "gaussian"),
    ("288", 1024, 256, "gaussian"),
]
QUICK = [r for r in ROWS if r[1] == 512 and r[2] == 128]


def regular_size(n: int, tile: int, overlap: int) -> int:
    """Largest ``tile + k * stride <= n``: the image size on which every tile overlaps its
    neighbours by exactly ``overlap`` (no flush last tile), as almost all tiles of a slide do."""
    stride = tile - overlap
    return tile + (n - tile) // stride * stride if n >= tile else n


def settings_for(
    se: str, tile: int, overlap: int, window: str, block: int = 1024
) -> PredictSettings:
    return PredictSettings(
        tile_size=tile,
        overlap=overlap,
        window=window,  # type: ignore[arg-type]
        se_window=SE_WINDOWS[se],
        block_size=block,
        tta=TTAConfig(passes=1, mc_dropout=False),
        device="cpu",
        workers=0,
        tissue_detection=False,
    )


def whole_settings(se: str, shape: tuple[int, ...]) -> PredictSettings:
    side = -(-max(shape[:2]) // 32) * 32
    return dataclasses.replace(settings_for(se, side, 0, "crop", block=side), panel_width=side)


def cmu_crop(size: int = CROP) -> np.ndarray:
    from consep_images import SHARED

    from conic_qp.slides import open_slide

    with open_slide(SHARED / "slides" / "CMU-1-Small-Region.svs") as slide:
        side = size * 0.5 / slide.mpp
        return slide.read((*CMU_XY, side, side), 0.5, size=(size, size))


def n_instances(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


def agreement_rows(name: str, image: np.ndarray, models: Any, rows: list, report: dict) -> None:
    """Each row on the largest crop of ``image`` that its tiling covers regularly, against the
    whole crop as one tile (references cached per SE window and crop size)."""
    from conic_qp.tiling import TileLayout

    refs: dict[tuple[str, int, int], np.ndarray] = {}

    def reference(se: str, h: int, w: int) -> np.ndarray:
        if (se, h, w) not in refs:
            crop = image[:h, :w]
            t0 = time.perf_counter()
            refs[se, h, w], _ = segment_image(crop, 0.5, models, whole_settings(se, crop.shape))
            dt = time.perf_counter() - t0
            n = n_instances(refs[se, h, w])
            report[f"{name}/whole/se={se}/{h}x{w}"] = {
                "nuclei": n,
                "s_per_mm2": dt / (h * w * 0.25e-6),
            }
            print(
                f"  {name} {h}x{w} whole, se {se}: {n} nuclei, {dt / (h * w * 0.25e-6):.1f} s/mm^2",
                flush=True,
            )
        return refs[se, h, w]

    print(
        f"{'input':8} {'crop':>9} {'se':>6} {'tile':>5} {'ovl':>4} {'window':>9} | {'ref':>5} "
        f"{'match':>5} {'extra':>5} {'miss':>5} {'agree':>7} | {'vs trained':>10} | "
        f"{'px/slide px':>11} {'px/crop px':>10} {'s/mm2':>6}",
        flush=True,
    )
    for se, tile, overlap, window in rows:
        h = regular_size(image.shape[0], tile, overlap)
        w = regular_size(image.shape[1], tile, overlap)
        ref, trained_ref = reference(se, h, w), reference("global", h, w)
        crop = image[:h, :w]
        s = settings_for(se, tile, overlap, window)
        t0 = time.perf_counter()
        labels, _ = segment_image(crop, 0.5, models, s)
        dt = time.perf_counter() - t0
        st = match_instances(ref, labels)
        trained = match_instances(trained_ref, labels)
        cost = TileLayout((h, w), tile, overlap, window).pixels_per_region_pixel  # type: ignore[arg-type]
        n_ref = n_instances(ref)
        mm2 = h * w * 0.25e-6
        row = {
            "crop": [h, w], "se": se, "tile": tile, "overlap": overlap, "window": window,
            "reference": n_ref, "matched": st.tp, "extra": st.fp, "missing": st.fn,
            "agreement": st.tp / max(n_ref, 1),
            "vs_trained": trained.tp / max(n_instances(trained_ref), 1),
            "pixels_per_pixel": cost, "slide_pixels_per_pixel": (tile / (tile - overlap)) ** 2,
            "s_per_mm2": dt / mm2,
        }  # fmt: skip
        report[f"{name}/{se}/{tile}/{overlap}/{window}"] = row
        print(
            f"{name:8} {h:4d}x{w:4d} {se:>6} {tile:5d} {overlap:4d} {window:>9} | {n_ref:5d} "
            f"{st.tp:5d} {st.fp:5d} {st.fn:5d} {100 * row['agreement']:6.1f}% | "
            f"{100 * row['vs_trained']:9.1f}% | {row['slide_pixels_per_pixel']:11.2f} {cost:10.2f} "
            f"{dt / mm2:6.1f}",
            flush=True,
        )
    # Is "the whole image" itself well defined? The same pixels, whole in two crop sizes.
    for se in dict.fromkeys(k[0] for k in refs):
        sizes = sorted({(h, w) for s_, h, w in refs if s_ == se}, key=lambda hw: hw[0] * hw[1])
        if len(sizes) < 2:
            continue
        (h, w), (bh, bw) = sizes[0], sizes[-1]
        inner = (slice(0, h - 128), slice(0, w - 128))  # away from the smaller crop's border
        small, big = refs[se, h, w][inner], refs[se, bh, bw][:h, :w][inner]
        st = match_instances(big, small)
        n = n_instances(big)
        report[f"{name}/crop_size/se={se}"] = {
            "agreement": st.tp / max(n, 1),
            "crops": [[h, w], [bh, bw]],
        }
        print(
            f"  {name}: whole {h}x{w} vs whole {bh}x{bw} on their common pixels (se {se}): "
            f"{100 * st.tp / max(n, 1):.1f}% of {n} nuclei agree",
            flush=True,
        )


def pq_row(
    label: str, pred: list[np.ndarray], true: list[np.ndarray], names: list[str], report: dict
) -> None:
    h = min(p.shape[0] for p in pred)
    w = min(p.shape[1] for p in pred)
    r = evaluate(np.stack([p[:h, :w] for p in pred]), np.stack([t[:h, :w] for t in true]), names)
    report[f"accuracy/{label}"] = {"pq": r.pq, "mpq_plus": r.mpq_plus}
    print(f"  {label:58} PQ {r.pq:.4f}  mPQ+ {r.mpq_plus:.4f}", flush=True)


def _describe(s: PredictSettings) -> str:
    return f"se {s.se_window or 'global'}, {s.tile_size}/{s.overlap} {s.window}"


def with_classes(labels: np.ndarray, table: Any) -> np.ndarray:
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    if len(table):
        lut[table["label"].to_numpy()] = table["class_id"].to_numpy()
    return np.stack([labels, lut[labels]], axis=-1)


def accuracy(models: Any, model_path: Path, default: PredictSettings, report: dict) -> None:
    from consep_images import SHARED, mosaic, test_images

    from conic_qp.postprocess import postprocess
    from conic_qp.train.evaluation import iter_probabilities, labelled_truth, load_eval_data

    print("accuracy on CoNSeP test (ground truth):", flush=True)
    names = models.classes.names
    one = dataclasses.replace(default, tta=TTAConfig(passes=1, mc_dropout=False), workers=0)
    _, data = load_eval_data(model_path, [f"tiles:{SHARED / 'consep'}@test"], device="cpu")
    true = list(labelled_truth(data))
    net = models.networks[0]
    from conic_qp.local_se import set_se_window

    set_se_window(net, None)
    pred = []
    for sem, three in iter_probabilities(net, data.images, 1, 0):
        inst = postprocess(sem, three, models.params)
        lut = np.concatenate([[0], inst.classes]).astype(np.int32)
        pred.append(np.stack([inst.labels, lut[inst.labels]], axis=-1))
    pq_row(f"{len(true)} tiles of 128 px, as `evaluate` (global SE)", pred, true, names, report)
    pred = [with_classes(*segment_image(im, 0.5, models, one)) for im in data.images]
    pq_row(f"{len(true)} tiles of 128 px, engine {_describe(one)}", pred, true, names, report)

    images = test_images(0.5)
    truth = [np.stack([inst, cls], axis=-1) for _, _, inst, cls in images]
    for se in ("global", "96", "160", "288"):
        pred = [
            with_classes(*segment_image(im, 0.5, models, whole_settings(se, im.shape)))
            for _, im, _, _ in images
        ]
        pq_row(
            f"{len(images)} reassembled images (~490 px), whole, se {se}",
            pred,
            truth,
            names,
            report,
        )
    pred = [with_classes(*segment_image(im, 0.5, models, one)) for _, im, _, _ in images]
    pq_row(f"{len(images)} reassembled images, engine {_describe(one)}", pred, truth, names, report)

    # the 3 x 3 mosaic with its ground truth (ids made unique per image)
    h = min(i.shape[0] for _, i, _, _ in images[:9])
    w = min(i.shape[1] for _, i, _, _ in images[:9])
    inst_tiles, cls_tiles, offset = [], [], 0
    for _, _, inst, cls in images[:9]:
        inst = inst[:h, :w].astype(np.int64)
        inst_tiles.append(np.where(inst > 0, inst + offset, 0))
        cls_tiles.append(cls[:h, :w])
        offset += int(inst.max()) + 1
    m_inst, m_cls = mosaic(inst_tiles), mosaic(cls_tiles)
    from skimage.segmentation import relabel_sequential

    m_true = np.stack([relabel_sequential(m_inst)[0], m_cls], axis=-1).astype(np.int32)
    m_img = mosaic([i for _, i, _, _ in images[:9]])
    for label, s in (
        ("whole, se global", whole_settings("global", m_img.shape)),
        ("engine defaults", one),
    ):
        pq_row(
            f"mosaic {m_img.shape[0]}x{m_img.shape[1]}, {label}",
            [with_classes(*segment_image(m_img, 0.5, models, s))],
            [m_true],
            names,
            report,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: bundled)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="only the 512 px rows")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-agreement", action="store_true")
    p.add_argument("--crop", type=int, default=CROP, help="largest input edge (px; quick checks)")
    p.add_argument("--default", default="160,1024,256,gaussian",
                   help="se,tile,overlap,window of the accuracy runs (the candidate default)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_path = args.model or default_model_path()
    models = load_models([model_path], device="cpu")
    from consep_images import mosaic, test_images

    report: dict[str, Any] = {"model": str(model_path), "threads": args.threads}
    rows = QUICK if args.quick else ROWS
    if not se_windows(models.networks[0]):
        # No squeeze-excitation (e.g. EfficientNet-Lite): every SE window is the same network,
        # so one set of rows measures the tilings (the "global" column then equals "160").
        rows = [r for r in rows if r[0] == "160"]
        print("the model has no squeeze-excitation: SE windows do not apply", flush=True)
    print(f"model {model_path}; torch threads {args.threads}; {os.cpu_count()} cores", flush=True)
    if not args.no_agreement:
        agreement_rows("CMU-1", cmu_crop(args.crop), models, rows, report)
        images = [im for _, im, _, _ in test_images(0.5)]
        consep = mosaic(images + images[:4], n=4)  # 4 x 4: the 12 placeable images, 4 twice
        consep = consep[: args.crop, : args.crop]
        agreement_rows("CoNSeP", consep, models, rows, report)
    if not args.no_accuracy:
        se, tile, overlap, window = args.default.split(",")
        default = dataclasses.replace(
            PredictSettings(), tile_size=int(tile), overlap=int(overlap), window=window,
            se_window=SE_WINDOWS[se],
        )  # fmt: skip
        accuracy(models, model_path, default, report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
