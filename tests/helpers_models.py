"""Stand-in and tiny models shared by the inference, annotate and QuPath tests (and benchmarks).

:class:`HematoxylinNet` is a fixed "network" whose outputs are a local function of the
hematoxylin stain (receptive field 5 px): nuclei are where hematoxylin is high, their interior
where the smoothed nucleus probability is high, and the class is dark vs pale. Its instances are
real nuclei of synthetic slides and real tissue, so tests of tiling, stitching and sinks exercise
real objects without a trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb
from torch import nn

from conic_qp.checkpoint import save_checkpoint
from conic_qp.classes import ClassScheme
from conic_qp.model import ConicNet, ModelConfig
from conic_qp.postprocess import PostprocessParams
from conic_qp.predict import ModelSet, PredictSettings
from conic_qp.tta import TTAConfig

DARK_PALE = ClassScheme.from_names("dark-pale", ["dark", "pale"])
#: hematoxylin concentration thresholds for the synthetic slides (nuclei 0.05-0.14, stroma ~0.006)
SYNTH_H = (0.035, 0.08)


class HematoxylinNet(nn.Module):
    """A fixed, local stand-in network producing ConicNet's three outputs from the H stain.

    ``h_nucleus``: hematoxylin level above which a pixel is nucleus; ``h_dark``: level separating
    the "dark" from the "pale" class. Reflect padding and symmetric kernels keep it consistent
    with the engine's reflect padding at the slide border.

    Exact by construction, so tests comparing runs at different batch sizes, thread counts or
    processors compare geometry, not arithmetic: it computes in float64 (CPU kernels give
    results that differ by ~1e-16 between batch sizes, instead of ~1e-3 after float32
    amplification) and rounds its probabilities to odd multiples of 1/64 (``_quantize``). The
    post-processing thresholds then see values at least 1/64 (fg 0.5) and 1e-4 (seed 0.6,
    a product of two such values) away from every threshold, far above float32 softmax noise.
    """

    def __init__(self, h_nucleus: float, h_dark: float) -> None:
        super().__init__()
        self.h_nucleus, self.h_dark = h_nucleus, h_dark
        self.register_buffer("to_hed", torch.tensor(hed_from_rgb, dtype=torch.float64))
        g = torch.exp(-(torch.arange(-2, 3, dtype=torch.float64) ** 2) / 2)
        self.register_buffer("gauss", (g[:, None] * g[None, :] / g.sum() ** 2)[None, None])
        self.dropout = nn.Dropout2d(0.2)  # exercised (and harmless) with MC dropout off

    @staticmethod
    def _quantize(p: torch.Tensor) -> torch.Tensor:
        """Round to the odd multiples of 1/64 in (0, 1): never on 0.5, never 0 or 1."""
        return (torch.floor(p * 32).clamp(0, 31) + 0.5) / 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        od = -torch.log(x.double().clamp_min(1e-6))
        h = torch.einsum("bchw,cd->bdhw", od, self.to_hed)[:, :1]
        h = F.conv2d(F.pad(h, (2, 2, 2, 2), mode="reflect"), self.gauss)
        p = self._quantize(torch.sigmoid((h - self.h_nucleus) * (8.0 / self.h_nucleus)))
        q = F.avg_pool2d(F.pad(p, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
        core = self._quantize(torch.sigmoid((q - 0.9) * 40.0))
        dark = self._quantize(torch.sigmoid((h - self.h_dark) * (8.0 / self.h_dark)))
        three = torch.cat([1 - p, p * core, p * (1 - core)], 1).log()
        sem = torch.cat([1 - p, p * dark, p * (1 - dark)], 1).log()
        return {"semantic": sem, "three_label": three, "vectors": torch.zeros_like(three[:, :2])}


def stand_in_models(h: tuple[float, float] = SYNTH_H, mpp: float = 0.5) -> ModelSet:
    params = PostprocessParams.uniform(2, fg=0.5, seed=0.6, min_size=8, max_size=3000)
    return ModelSet([HematoxylinNet(*h)], DARK_PALE, mpp, params, info=[{"path": "stand-in"}])


def settings(**kw: object) -> PredictSettings:
    """Small-slide settings: 128 px tiles, 96 px blocks and 2-tile panels, so a few hundred px
    exercise tile blending, block ownership and the hand-over between panels."""
    base: dict[str, object] = dict(
        tile_size=128,
        overlap=64,
        block_size=96,
        block_margin=40,
        panel_width=128,
        batch_size=3,
        tta=TTAConfig(passes=1, mc_dropout=False),
        device="cpu",
        workers=0,
        save_labels=True,
    )
    base.update(kw)
    return PredictSettings(**base)  # type: ignore[arg-type]


def make_tiny_checkpoint(path: Path) -> Path:
    """A random-init tiny ConicNet whose heads are scaled x300.

    Random decoder features vary little across an image; scaling the 1x1 heads turns them into
    image-dependent blobs, so post-processing finds "nuclei" and every stage carries data.
    """
    torch.manual_seed(0)
    net = ConicNet(ModelConfig("test_efficientnet", 2, decoder_channels=(32, 16, 16, 8, 8)))
    with torch.no_grad():
        for head in (net.head_three_label, net.head_semantic):
            head.weight.mul_(300.0)
    params = PostprocessParams.uniform(2, min_size=4, min_solidity=0.0)
    return save_checkpoint(path, net, DARK_PALE, 0.5, thresholds=params.to_json())
