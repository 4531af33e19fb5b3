"""Importance sampling of training tiles (paper II.A, eq. 1-2).

Tiles that contain rare classes are drawn more often: each class (background included) gets the
same total sampling mass, shared among the tiles in proportion to how much of that class they
hold. Each epoch draws a fresh subset with replacement.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from conic_qp.errors import ConicQPError

logger = logging.getLogger(__name__)


def class_pixel_fractions(class_maps: np.ndarray, n_classes: int, chunk: int = 64) -> np.ndarray:
    """Eq. 1: fraction of each tile's pixels in each class, background (0) included.

    Parameters
    ----------
    class_maps : (N, H, W) integer class ids 0..C; -1 (ignore) pixels are left out of both the
        numerator and the denominator, so a tile whose nuclei are unlabelled still reports its
        true background/nucleus proportions among labelled pixels.
    n_classes : C, the number of nucleus classes.

    Returns
    -------
    (N, C + 1) float64; rows sum to 1, or to 0 for a tile with no labelled pixel.
    """
    maps = np.asarray(class_maps)  # a view for memmaps: blocks are read chunk by chunk
    if maps.ndim != 3:
        raise ConicQPError(f"class maps must be (N, H, W), got shape {maps.shape}")
    k = n_classes + 1
    n = maps.shape[0]
    counts = np.zeros((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        block = np.asarray(maps[s : s + chunk]).reshape(min(chunk, n - s), -1).astype(np.int64)
        lo, hi = int(block.min(initial=0)), int(block.max(initial=0))
        if lo < -1 or hi > n_classes:
            raise ConicQPError(
                f"class map value {lo if lo < -1 else hi} outside -1..{n_classes}; "
                "check n_classes against the labels"
            )
        valid = block >= 0
        rows = np.broadcast_to(np.arange(block.shape[0])[:, None], block.shape)
        flat = rows[valid] * k + block[valid]
        counts[s : s + block.shape[0]] = np.bincount(flat, minlength=block.shape[0] * k).reshape(
            -1, k
        )
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros((n, k)), where=total > 0)


def importance_weights(fractions: np.ndarray) -> np.ndarray:
    """Eq. 2: p[n] = mean over classes c of X[c, n] / sum_n' X[c, n'].

    Parameters
    ----------
    fractions : (N, K) per-tile class fractions X (K = C + 1 with background, as the paper).

    Returns
    -------
    (N,) sampling probabilities summing to 1. A class absent from the whole set (column sum 0)
    contributes 0 to every tile instead of dividing by zero; the mean is then renormalised, which
    equals averaging over the classes present. Tiles without any labelled pixel get p = 0.
    """
    x = np.asarray(fractions, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConicQPError(f"fractions must be (N, K) with N > 0, got shape {x.shape}")
    if (x < 0).any() or not np.isfinite(x).all():
        raise ConicQPError("class fractions must be finite and non-negative")
    col = x.sum(axis=0)
    share = np.divide(x, col, out=np.zeros_like(x), where=col > 0)
    p = share.mean(axis=1)
    total = p.sum()
    if total <= 0:
        raise ConicQPError(
            "no tile has any labelled pixel, so importance sampling is undefined; "
            "disable it or supply class labels"
        )
    return p / total


class EpochSampler:
    """Indices of the tiles to train on in each epoch: ``size`` draws with replacement.

    Each epoch's draw depends only on ``(seed, epoch)``, so runs are reproducible and a resumed
    run sees the same epochs. ``enabled=False`` draws uniformly (the ablation of paper table III).
    ``uniform_mix`` blends in uniform probability so tiles with p = 0 under eq. 2 (e.g. tiles
    with no class labels in a mixed set) are still seen.

    Works as a ``torch.utils.data.DataLoader`` sampler: call :meth:`set_epoch` before iterating.
    """

    def __init__(
        self,
        weights: np.ndarray,
        size: int | None = None,
        seed: int = 0,
        enabled: bool = True,
        uniform_mix: float = 0.0,
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ConicQPError(f"sampling weights must be a non-empty 1-D array, got {w.shape}")
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ConicQPError("sampling weights must be finite, non-negative, not all zero")
        if not 0.0 <= uniform_mix <= 1.0:
            raise ConicQPError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
        self.n = w.size
        self.size = self.n if size is None else int(size)
        if self.size < 1:
            raise ConicQPError(f"epoch size must be positive, got {size}")
        self.seed = seed
        self.enabled = enabled
        uniform = np.full(self.n, 1.0 / self.n)
        p = w / w.sum()
        self.p = (1 - uniform_mix) * p + uniform_mix * uniform if enabled else uniform
        self.epoch = 0

    @classmethod
    def from_class_maps(
        cls, class_maps: np.ndarray, n_classes: int, **kwargs: object
    ) -> EpochSampler:
        """Sampler with eq. 2 weights computed from (N, H, W) class maps."""
        p = importance_weights(class_pixel_fractions(class_maps, n_classes))
        return cls(p, **kwargs)  # type: ignore[arg-type]

    def indices(self, epoch: int) -> np.ndarray:
        """Tile indices (with repeats) for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.choice(self.n, size=self.size, replace=True, p=self.p)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch).tolist())

    def __len__(self) -> int:
        return self.size
