"""Tile probabilities and label maps of a labelled set: what validation, tuning and evaluation
score.

One generator of probabilities (:func:`iter_probabilities`) and one post-processing of them
(:func:`predicted_labels`) serve the training loop's validation, ``conic-qp tune`` and
``conic-qp evaluate``, so the three always score the same thing. This module imports nothing of
the training loop, tuning or evaluation: they all import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from conic_qp.errors import ConicQPError

__all__ = ["iter_probabilities", "labelled_truth", "predicted_labels"]


def iter_probabilities(
    model: Any,
    images: Any,
    tta: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    zoom: float | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(semantic, three_label) probabilities of each (N, H, W, 3) uint8 tile, one at a time.

    ``tta`` = 1 is a plain eval-mode forward pass; more passes add TTA, and MC dropout as the
    checkpoint says (:func:`conic_qp.tta.mc_dropout_for`); ``zoom`` None: the checkpoint's
    input zoom (:func:`conic_qp.tta.zoom_for`). Tiles are
    yielded as they are computed, so scoring many tiles never holds all their probabilities.
    """
    import torch

    from conic_qp.tta import TTAConfig, predict_probabilities

    device = next(model.parameters()).device
    cfg = TTAConfig(passes=tta, mc_dropout=None if tta > 1 else False, zoom=zoom)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images[i : i + batch_size])))
        x = x.permute(0, 3, 1, 2).float().div(255).to(device)
        out = predict_probabilities([model], x, cfg, seed=seed + i)
        sem, tl = out["semantic"].cpu().numpy(), out["three_label"].cpu().numpy()
        yield from ((sem[j], tl[j]) for j in range(sem.shape[0]))


def labelled_truth(data: Any) -> np.ndarray:
    """(N, H, W, 2) truth; nuclei of unknown class (-1) become class 0 (instance-only)."""
    class_maps = data.class_maps
    if class_maps is None:
        raise ConicQPError("the data has no class labels")
    cls = np.where(class_maps < 0, 0, class_maps)
    return np.stack([data.inst_maps, cls], axis=-1).astype(np.int32)


def predicted_labels(probs: Iterable[tuple[np.ndarray, np.ndarray]], params: Any) -> np.ndarray:
    """(N, H, W, 2) predicted label maps after post-processing with ``params``."""
    from conic_qp.postprocess import postprocess

    out = []
    for sem, tl in probs:
        inst = postprocess(sem, tl, params)
        lut = np.concatenate([[0], inst.classes]).astype(np.int32)
        out.append(np.stack([inst.labels, lut[inst.labels]], axis=-1))
    return np.stack(out)
