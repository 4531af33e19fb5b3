"""Test-time augmentation and MC dropout (paper II.F).

Each pass applies a random dihedral transform (flips / 90 degree rotations), a random HED colour
augmentation and a staining-intensity change of up to +-10 %, runs the network with dropout
active, undoes the spatial transform on every output channel (centre vectors included) and
accumulates softmax probabilities. Passes of a batch are stacked and run on the device together.
Several checkpoints (an ensemble) are treated as extra passes.

Pass 0 of every model is the identity without colour change, so ``passes=1`` without MC dropout is
plain deterministic inference.

A zoom factor (the checkpoint's ``inference.zoom`` or the ``zoom`` setting) enlarges every input
before the network and scales the outputs back to the input's size, so the rest of the pipeline
(stitching, post-processing, coordinates) still works at the checkpoint's um/px. A small network
trained at 0.5 um/px can delineate small and touching nuclei better when they are drawn a little
larger than it was trained on; the cost is zoom squared in network time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import nn

from conic_qp.errors import ConicQPError, option
from conic_qp.model import set_mc_dropout

_LOG_EPS = math.log(1e-6)

#: Zoom factors outside this range are a typo (an um/px given as a zoom), not a setting.
MIN_ZOOM, MAX_ZOOM = 0.5, 3.0


@dataclass(frozen=True)
class TTAConfig:
    """How many passes and which augmentations (defaults: the paper's 16 passes).

    Attributes
    ----------
    passes : forward passes per model; ensembles multiply them.
    mc_dropout : keep dropout active at inference (MC dropout); None leaves it to each network
        (:func:`mc_dropout_for`: its checkpoint's ``inference.mc_dropout``, else on as in the
        paper).
    dihedral : random flips and 90 degree rotations.
    hed_sigma : std of the per-channel HED contrast factor (1 + N(0, sigma)).
    hed_bias : std of the per-channel HED additive bias (optical-density units).
    intensity : maximal relative change of staining intensity (paper: 10 %).
    max_batch : largest number of augmented images sent to the device at once.
    zoom : enlarge the input by this factor for the network and scale its outputs back; None
        leaves it to each network (:func:`zoom_for`: its checkpoint's ``inference.zoom``, else 1).
    """

    passes: int = 16
    mc_dropout: bool | None = None
    dihedral: bool = True
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    intensity: float = 0.10
    max_batch: int = 32
    zoom: float | None = None

    def __post_init__(self) -> None:
        if self.zoom is not None and not MIN_ZOOM <= self.zoom <= MAX_ZOOM:
            raise ConicQPError(
                f"{option('zoom')} must be between {MIN_ZOOM} and {MAX_ZOOM} (got {self.zoom})"
            )
        if self.passes < 1:
            raise ConicQPError(
                f"{option('passes', '--tta')} must be at least 1 (got {self.passes})"
            )
        if self.max_batch < 1:
            raise ConicQPError(f"batch size must be at least 1 (got {self.max_batch})")


def dihedral(x: torch.Tensor, k: int, vectors: bool = False) -> torch.Tensor:
    """Apply dihedral transform ``k`` (0-7: ``k % 4`` quarter turns, then a left-right flip if ``k >= 4``).

    ``x`` is (..., H, W). With ``vectors=True`` the first two channels of dimension -3 are centre
    vectors (dy, dx) and are rotated / mirrored along with the pixels.
    """
    turns, flip = k % 4, k >= 4
    y = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    if vectors and turns:
        dy, dx = y[..., 0:1, :, :], y[..., 1:2, :, :]
        for _ in range(turns):  # one counter-clockwise quarter turn maps (dy, dx) to (-dx, dy)
            dy, dx = -dx, dy
        y = torch.cat([dy, dx, y[..., 2:, :, :]], dim=-3)
    if flip:
        y = torch.flip(y, dims=(-1,))
        if vectors:
            y = torch.cat([y[..., 0:1, :, :], -y[..., 1:2, :, :], y[..., 2:, :, :]], dim=-3)
    return y


def dihedral_inverse(x: torch.Tensor, k: int, vectors: bool = False) -> torch.Tensor:
    """Undo :func:`dihedral` ``k``."""
    turns, flip = k % 4, k >= 4
    if flip:
        x = dihedral(x, 4, vectors)
    return dihedral(x, (4 - turns) % 4, vectors) if turns else x


def hed_augment(rgb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Colour-augment RGB images in HED space (the same colour deconvolution as scikit-image).

    ``rgb`` is (B, 3, H, W) in [0, 1]; ``scale`` and ``bias`` are (B, 3): each stain channel's
    optical density becomes ``od * scale + bias``.
    """
    to_hed = torch.as_tensor(hed_from_rgb, dtype=rgb.dtype, device=rgb.device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=rgb.dtype, device=rgb.device)
    od = torch.log(rgb.clamp_min(1e-6)) / _LOG_EPS  # (B, 3, H, W), 0 = white
    hed = torch.einsum("bchw,cd->bdhw", od, to_hed).clamp_min(0)
    hed = hed * scale[:, :, None, None] + bias[:, :, None, None]
    log_rgb = torch.einsum("bdhw,dc->bchw", hed * _LOG_EPS, to_rgb)
    return torch.exp(log_rgb).clamp(0, 1)


@dataclass(frozen=True)
class PassPlan:
    """The random choices of one pass for one image."""

    k: int
    scale: tuple[float, float, float]
    bias: tuple[float, float, float]

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and self.scale == (1.0, 1.0, 1.0) and self.bias == (0.0, 0.0, 0.0)


def plan_passes(
    config: TTAConfig, n_images: int, rng: np.random.Generator, square: bool = True
) -> list[list[PassPlan]]:
    """Draw the augmentation of every (pass, image) from one generator; pass 0 is the identity.

    Non-square inputs only get the transforms that keep their shape (flips and half turns).
    """
    plans: list[list[PassPlan]] = [[_IDENTITY] * n_images]
    for _ in range(1, config.passes):
        plans.append([_draw_pass(config, rng, square) for _ in range(n_images)])
    return plans


def plan_image_passes(
    config: TTAConfig, seeds: Sequence[int], square: bool = True
) -> list[list[PassPlan]]:
    """Like :func:`plan_passes`, with image ``i``'s passes drawn from its own seed ``seeds[i]``.

    An image then gets the same augmentations whatever batch it is run in (the engine seeds by
    tile), so results do not depend on the batch size or on which tiles ran before.
    """
    columns = []
    for seed in seeds:
        rng = np.random.default_rng(int(seed))
        columns.append(
            [_IDENTITY] + [_draw_pass(config, rng, square) for _ in range(1, config.passes)]
        )
    return [[col[p] for col in columns] for p in range(config.passes)]


_IDENTITY = PassPlan(0, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def _draw_pass(config: TTAConfig, rng: np.random.Generator, square: bool) -> PassPlan:
    k = int(rng.integers(8)) if config.dihedral else 0
    if not square:
        k -= k % 2
    contrast = 1.0 + rng.normal(0.0, config.hed_sigma, 3)
    intensity = 1.0 + rng.uniform(-config.intensity, config.intensity)
    scale = np.clip(contrast * intensity, 0.5, 1.5)
    scale[2] = 1.0  # the DAB channel of H&E is noise; leave it
    bias = rng.normal(0.0, config.hed_bias, 3)
    bias[2] = 0.0
    return PassPlan(k, tuple(float(v) for v in scale), tuple(float(v) for v in bias))  # type: ignore[arg-type]


def mc_dropout_for(model: nn.Module, config: TTAConfig) -> bool:
    """Whether ``model`` runs with MC dropout under ``config``: the setting when it says, else
    the network's own default (``ConicNet.mc_dropout_default``; exported networks: the network
    they wrap; other modules: on)."""
    if config.mc_dropout is not None:
        return config.mc_dropout
    inner = getattr(model, "net", model)
    return bool(getattr(inner, "mc_dropout_default", True))


def zoom_for(model: nn.Module, config: TTAConfig) -> float:
    """The input zoom ``model`` runs with under ``config``: the setting when it says, else the
    network's own (``ConicNet.inference_zoom``; exported networks: the network they wrap)."""
    if config.zoom is not None:
        return float(config.zoom)
    inner = getattr(model, "net", model)
    return float(getattr(inner, "inference_zoom", 1.0))


def _zoomed_size(size: int, zoom: float) -> int:
    """``size * zoom`` rounded to the network's size multiple (at least one multiple)."""
    from conic_qp.model import SIZE_MULTIPLE

    return max(SIZE_MULTIPLE, round(size * zoom / SIZE_MULTIPLE) * SIZE_MULTIPLE)


@torch.no_grad()
def predict_probabilities(
    models: Sequence[nn.Module],
    images: torch.Tensor,
    config: TTAConfig = TTAConfig(),
    seed: int | None = None,
    amp: bool = False,
    *,
    seeds: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Average softmax outputs over TTA passes and ensemble members.

    Parameters
    ----------
    models : networks returning ``{"semantic", "three_label", "vectors"}`` (see ConicNet).
    images : (B, 3, H, W) float RGB in [0, 1], on the models' device.
    config : passes and augmentations.
    seed : makes the augmentations and the dropout masks reproducible.
    amp : run the network under CUDA autocast (float16).
    seeds : one seed per image for its augmentations (see :func:`plan_image_passes`); the
        dropout masks still come from ``seed``.

    Returns
    -------
    ``semantic`` (B, C+1, H, W) and ``three_label`` (B, 3, H, W) mean probabilities and
    ``vectors`` (B, 2, H, W) mean centre vectors, float32, in the input's orientation.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConicQPError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not models:
        raise ConicQPError("no model given for inference")
    rng = np.random.default_rng(seed)
    if seed is not None:
        torch.manual_seed(seed)
    b = images.shape[0]
    sums: dict[str, torch.Tensor] = {}
    n_total = 0
    for m, model in enumerate(models):
        was_training = model.training
        model.eval()
        set_mc_dropout(model, mc_dropout_for(model, config))
        try:
            square = images.shape[-1] == images.shape[-2]
            if seeds is not None:
                if len(seeds) != b:
                    raise ValueError(f"{len(seeds)} seeds for {b} images")
                # ensemble members get different augmentations: offset the seeds per member
                plans = plan_image_passes(config, [int(s) + 7919 * m for s in seeds], square)
            else:
                plans = plan_passes(config, b, rng, square=square)
            jobs = [(p, i) for p in range(len(plans)) for i in range(b)]
            for start in range(0, len(jobs), config.max_batch):
                chunk = jobs[start : start + config.max_batch]
                out = _run_chunk(
                    model,
                    images,
                    [plans[p][i] for p, i in chunk],
                    [i for _, i in chunk],
                    amp,
                    zoom_for(model, config),
                )
                for key, value in out.items():
                    acc = sums.setdefault(
                        key, torch.zeros((b, *value.shape[1:]), device=value.device)
                    )
                    acc.index_add_(
                        0, torch.as_tensor([i for _, i in chunk], device=value.device), value
                    )
            n_total += len(plans)
        finally:
            set_mc_dropout(model, False)
            model.train(was_training)
    return {key: value / n_total for key, value in sums.items()}


def _run_chunk(
    model: nn.Module,
    images: torch.Tensor,
    plans: list[PassPlan],
    index: list[int],
    amp: bool,
    zoom: float = 1.0,
) -> dict[str, torch.Tensor]:
    x = images[index]
    h, w = x.shape[-2:]
    colour = [
        j for j, p in enumerate(plans) if p.scale != (1.0, 1.0, 1.0) or p.bias != (0.0, 0.0, 0.0)
    ]
    if colour:
        scale = torch.tensor([plans[j].scale for j in colour], dtype=x.dtype, device=x.device)
        bias = torch.tensor([plans[j].bias for j in colour], dtype=x.dtype, device=x.device)
        x = x.clone()
        x[colour] = hed_augment(x[colour], scale, bias)
    ks = [p.k for p in plans]
    if any(ks):
        x = torch.stack([dihedral(x[j], k) for j, k in enumerate(ks)])
    with torch.autocast(
        device_type=x.device.type, dtype=torch.float16, enabled=amp and x.device.type == "cuda"
    ):
        raw = model(_resize(x, (_zoomed_size(h, zoom), _zoomed_size(w, zoom))))
    out = {
        "semantic": torch.softmax(raw["semantic"].float(), dim=1),
        "three_label": torch.softmax(raw["three_label"].float(), dim=1),
        "vectors": raw["vectors"].float(),
    }
    if out["semantic"].shape[-2:] != (h, w):
        # centre vectors are lengths in pixels: they shrink with the image
        factor = torch.tensor(
            [h / out["vectors"].shape[-2], w / out["vectors"].shape[-1]], device=x.device
        ).view(1, 2, 1, 1)
        out = {key: _resize(v, (h, w)) for key, v in out.items()}
        out["vectors"] = out["vectors"] * factor
    if any(ks):
        out = {
            key: torch.stack(
                [dihedral_inverse(v[j], k, vectors=key == "vectors") for j, k in enumerate(ks)]
            )
            for key, v in out.items()
        }
    return out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) to ``size`` (antialiased when shrinking); the tensor itself
    when it has that size."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return torch.nn.functional.interpolate(
        x, size=size, mode="bilinear", align_corners=False, antialias=shrink
    )
