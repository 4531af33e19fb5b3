"""CoNSeP source images reassembled from their overlapping 256 px tiles (for the benchmarks).

``../shared/data/consep`` holds each 1000 px source image as 16 overlapping tiles whose
positions are not recorded; ``orig_instance_ids.json`` names every tile nucleus by its source
image id. Tiles sharing nuclei are placed by the median offset of those nuclei's centroids (a
spanning tree from the first tile, strongest links first), pasted in order (later tiles win),
and their instance and class maps follow the same placement. Images whose tiles share no nuclei
(2 of the 14 test images) cannot be placed and are skipped. The placement is good to ~1 px, which
is enough to reuse the images as realistic inputs; seams may show where the tiles' JPEG
compressions differ.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

SHARED = Path(
    os.environ.get("CONIC_QP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
TILE = 256


def source_images(root: Path, split: str = "test") -> dict[str, list[str]]:
    """Source image name -> its tiles (``split/name_NNN``), from ``patch_info.csv``."""
    by_src: dict[str, list[str]] = defaultdict(list)
    with open(root / "patch_info.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == split:
                by_src[row["source_image"]].append(row["tile"])
    return {k: sorted(v) for k, v in sorted(by_src.items())}


def reassemble(root: Path, tiles: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB uint8, instance map with source ids, class map) of one source image at 0.25 um/px.

    Raises ValueError when the tiles do not connect through shared nuclei.
    """
    from PIL import Image
    from scipy.io import loadmat

    ids = json.loads((root / "orig_instance_ids.json").read_text())
    mats = {t: loadmat(root / "type_mat" / f"{t}.mat") for t in tiles}
    cents = {t: dict(zip(ids[t], mats[t]["inst_centroid"], strict=True)) for t in tiles}
    links: dict[str, list[tuple[str, np.ndarray, int]]] = defaultdict(list)
    for i, a in enumerate(tiles):
        for b in tiles[i + 1 :]:
            common = set(cents[a]) & set(cents[b])
            if common:
                d = np.median([cents[a][k] - cents[b][k] for k in common], axis=0)
                links[a].append((b, d, len(common)))
                links[b].append((a, -d, len(common)))
    pos = {tiles[0]: np.zeros(2)}
    todo = deque([tiles[0]])
    while todo:
        a = todo.popleft()
        for b, d, _ in sorted(links[a], key=lambda e: -e[2]):
            if b not in pos:
                pos[b] = pos[a] + d
                todo.append(b)
    if len(pos) != len(tiles):
        raise ValueError("the tiles share no nuclei: cannot place them")
    low = np.min(list(pos.values()), axis=0)
    off = {t: np.rint(p - low).astype(int) for t, p in pos.items()}
    w = max(int(o[0]) for o in off.values()) + TILE
    h = max(int(o[1]) for o in off.values()) + TILE
    img = np.zeros((h, w, 3), np.uint8)
    inst = np.zeros((h, w), np.int64)
    cls_of: dict[int, int] = {}
    for t in tiles:
        x, y = (int(v) for v in off[t])
        img[y : y + TILE, x : x + TILE] = np.asarray(
            Image.open(root / "images" / f"{t}.jpg").convert("RGB")
        )
        lab = np.asarray(Image.open(root / "inst_png" / f"{t}.png")).astype(np.int64)
        lut = np.concatenate([[0], np.asarray(ids[t], np.int64)])
        for k, c in zip(ids[t], mats[t]["inst_type"].ravel(), strict=True):
            cls_of[int(k)] = int(c)
        inst[y : y + TILE, x : x + TILE] = lut[lab]
    lut_c = np.zeros(int(inst.max()) + 1, np.int64)
    for k, c in cls_of.items():
        lut_c[k] = c
    return img, inst.astype(np.int32), lut_c[inst].astype(np.int32)


def test_images(
    mpp: float = 0.5, root: Path | None = None
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Every placeable CoNSeP test image at ``mpp``: (name, image, instances, classes)."""
    from conic_qp.train.data import resample_labelled

    root = root or SHARED / "consep"
    native = json.loads((root / "classes.json").read_text()).get("mpp", 0.25)
    out = []
    for name, tiles in source_images(root).items():
        try:
            img, inst, cls = reassemble(root, tiles)
        except ValueError:
            continue
        img, inst, cls2 = resample_labelled(img, inst, cls, native / mpp)
        assert cls2 is not None
        out.append((name, img, inst, cls2))
    return out


def mosaic(images: list[np.ndarray], n: int = 3) -> np.ndarray:
    """The first n x n images side by side, each cropped to the smallest one."""
    h = min(i.shape[0] for i in images[: n * n])
    w = min(i.shape[1] for i in images[: n * n])
    rows = [
        np.concatenate([im[:h, :w] for im in images[r * n : (r + 1) * n]], axis=1) for r in range(n)
    ]
    return np.concatenate(rows, axis=0)
