from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed
from torch import nn

from conic_qp.errors import ConicQPError, cli_flag
from conic_qp.targets import center_vectors
from conic_qp.tta import (
    TTAConfig,
    dihedral,
    dihedral_inverse,
    hed_augment,
    mc_dropout_for,
    plan_passes,
    predict_probabilities,
    zoom_for,
)


class PointwiseNet(nn.Module):
    """Equivariant to every dihedral transform (1x1 convolutions only); optional dropout."""

    def __init__(self, n_classes: int = 3, p: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sem = nn.Conv2d(3, n_classes + 1, 1)
        self.three = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout2d(p)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.drop(x)
        return {
            "semantic": self.sem(x),
            "three_label": self.three(x),
            "vectors": torch.zeros_like(x[:, :2]),
        }


def _vec_tensor(inst: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(center_vectors(inst))


@pytest.mark.parametrize("k", range(8))
def test_dihedral_inverse_roundtrip(k: int) -> None:
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(dihedral_inverse(dihedral(x, k, vectors=True), k, vectors=True), x)
    assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)


@pytest.mark.parametrize("k", range(8))
def test_vectors_follow_the_image(k: int) -> None:
    # Centre vectors of the transformed instance map must equal the transformed centre vectors.
    inst = np.zeros((12, 12), np.int32)
    inst[1:5, 2:9] = 1
    inst[6:11, 7:10] = 2
    inst[8, 1:4] = 3
    inst_t = dihedral(torch.from_numpy(inst)[None], k)[0].numpy()
    expected = _vec_tensor(np.ascontiguousarray(inst_t))
    got = dihedral(_vec_tensor(inst), k, vectors=True)
    assert torch.allclose(got, expected, atol=1e-5)


def test_hed_augment_identity_and_change() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.2, 0.95, (2, 3, 8, 8)).astype(np.float32)
    x = torch.from_numpy(rgb)
    ident = hed_augment(x, torch.ones(2, 3), torch.zeros(2, 3))
    # Matches scikit-image's own round trip through HED space.
    ref = np.stack([hed2rgb(rgb2hed(im.transpose(1, 2, 0))).transpose(2, 0, 1) for im in rgb])
    assert np.allclose(ident.numpy(), ref, atol=1e-4)
    darker = hed_augment(x, torch.full((2, 3), 1.3), torch.zeros(2, 3))
    assert float(darker.mean()) < float(ident.mean())


def test_first_pass_is_identity_and_seed_reproducible() -> None:
    cfg = TTAConfig(passes=5)
    a = plan_passes(cfg, 3, np.random.default_rng(7))
    b = plan_passes(cfg, 3, np.random.default_rng(7))
    assert a == b and len(a) == 5
    assert all(p.is_identity for p in a[0])
    assert not all(p.is_identity for row in a[1:] for p in row)
    # Non-square inputs keep their shape: no quarter turns.
    ns = plan_passes(TTAConfig(passes=40), 2, np.random.default_rng(1), square=False)
    assert {p.k % 2 for row in ns for p in row} == {0}


def test_dihedral_tta_of_equivariant_model_equals_single_pass() -> None:
    model = PointwiseNet()
    x = torch.rand(2, 3, 16, 16)
    plain = predict_probabilities([model], x, TTAConfig(passes=1, mc_dropout=False))
    tta = predict_probabilities(
        [model],
        x,
        TTAConfig(passes=8, mc_dropout=False, hed_sigma=0, hed_bias=0, intensity=0),
        seed=3,
    )
    for key in ("semantic", "three_label"):
        assert torch.allclose(plain[key], tta[key], atol=1e-5)
        assert torch.allclose(plain[key].sum(1), torch.ones(2, 16, 16), atol=1e-5)


def test_mc_dropout_changes_passes_and_seed_reproduces() -> None:
    model = PointwiseNet(p=0.5).eval()
    x = torch.rand(1, 3, 8, 8)
    cfg = TTAConfig(passes=4, dihedral=False, hed_sigma=0, hed_bias=0, intensity=0)
    off = predict_probabilities([model], x, TTAConfig(passes=1, mc_dropout=False))
    on1 = predict_probabilities([model], x, cfg, seed=11)
    on2 = predict_probabilities([model], x, cfg, seed=11)
    assert torch.equal(on1["semantic"], on2["semantic"])
    assert not torch.allclose(on1["semantic"], off["semantic"])
    assert not model.training and not model.drop.training  # restored
    model.train()
    predict_probabilities([model], x, cfg, seed=1)
    assert model.training  # a model in training mode is handed back as it was


def test_mc_dropout_left_to_the_network_follows_its_default() -> None:
    x = torch.rand(1, 3, 8, 8)
    cfg = TTAConfig(passes=4, dihedral=False, hed_sigma=0, hed_bias=0, intensity=0)
    assert cfg.mc_dropout is None  # by default TTA asks each network
    on, off = PointwiseNet(p=0.5).eval(), PointwiseNet(p=0.5).eval()
    off.mc_dropout_default = False  # what a checkpoint's inference.mc_dropout = false sets
    assert mc_dropout_for(on, cfg) and not mc_dropout_for(off, cfg)
    assert mc_dropout_for(off, TTAConfig(mc_dropout=True))  # an explicit setting wins
    plain = predict_probabilities([off], x, TTAConfig(passes=1, mc_dropout=False))
    got_off = predict_probabilities([off], x, cfg, seed=3)
    got_on = predict_probabilities([on], x, cfg, seed=3)
    assert torch.allclose(got_off["semantic"], plain["semantic"], atol=1e-6)  # 4 equal passes
    assert not torch.allclose(got_on["semantic"], plain["semantic"], atol=1e-3)


def test_ensemble_counts_as_more_passes() -> None:
    m1, m2 = PointwiseNet(), PointwiseNet()
    with torch.no_grad():
        m2.sem.bias.add_(1.0)
    x = torch.rand(1, 3, 8, 8)
    cfg = TTAConfig(passes=1, mc_dropout=False)
    p1 = predict_probabilities([m1], x, cfg)["semantic"]
    p2 = predict_probabilities([m2], x, cfg)["semantic"]
    both = predict_probabilities([m1, m2], x, cfg)["semantic"]
    assert torch.allclose(both, (p1 + p2) / 2, atol=1e-5)  # two members batched vs alone


def test_chunking_does_not_change_the_result() -> None:
    model = PointwiseNet()
    x = torch.rand(3, 3, 8, 8)
    a = predict_probabilities(
        [model], x, TTAConfig(passes=6, mc_dropout=False, max_batch=2), seed=5
    )
    b = predict_probabilities(
        [model], x, TTAConfig(passes=6, mc_dropout=False, max_batch=64), seed=5
    )
    # other chunk sizes run other batch shapes: float32 kernels may round differently (~1e-7)
    assert torch.allclose(a["three_label"], b["three_label"], atol=1e-5)


def test_bad_config_and_input() -> None:
    with pytest.raises(ConicQPError, match="passes must be at least 1") as info:
        TTAConfig(passes=0)
    assert info.value.render(cli_flag).startswith("--tta must")  # the CLI's flag
    with pytest.raises(ConicQPError, match="shape"):
        predict_probabilities([PointwiseNet()], torch.rand(3, 8, 8))


class SizeRecordingNet(PointwiseNet):
    """Pointwise net that records the input sizes it sees and returns unit centre vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append((int(x.shape[-2]), int(x.shape[-1])))
        out = super().forward(x)
        out["vectors"] = torch.ones_like(out["vectors"])
        return out


def test_zoom_enlarges_the_input_and_scales_the_outputs_back() -> None:
    net = SizeRecordingNet().eval()
    x = torch.rand(2, 3, 128, 96)
    plain = predict_probabilities([net], x, TTAConfig(passes=1, mc_dropout=False))
    assert net.seen == [(128, 96)]
    zoomed = predict_probabilities([net], x, TTAConfig(passes=1, mc_dropout=False, zoom=1.25))
    assert net.seen[-1] == (160, 128)  # multiples of 32 nearest 1.25x: 160 x 120 -> 128
    for key in ("semantic", "three_label", "vectors"):
        assert zoomed[key].shape == plain[key].shape
    # a pixel-wise network on a flat image gives the same probabilities at any zoom
    flat = torch.full((1, 3, 128, 128), 0.4)
    a = predict_probabilities([net], flat, TTAConfig(passes=1, mc_dropout=False))
    b = predict_probabilities([net], flat, TTAConfig(passes=1, mc_dropout=False, zoom=1.5))
    assert torch.allclose(a["semantic"], b["semantic"], atol=1e-5)
    # centre vectors are lengths in pixels: 1 px of the enlarged image is 0.8 px of the input
    assert torch.allclose(zoomed["vectors"][:, 0], torch.full((2, 128, 96), 128 / 160))
    assert torch.allclose(zoomed["vectors"][:, 1], torch.full((2, 128, 96), 96 / 128))
    # on noise, resampling there and back smooths: the zoom changes what comes out
    assert not torch.allclose(plain["semantic"], zoomed["semantic"], atol=1e-3)


def test_zoom_left_to_the_network_follows_its_checkpoint() -> None:
    net = SizeRecordingNet().eval()
    assert zoom_for(net, TTAConfig()) == 1.0
    net.inference_zoom = 1.5  # what a checkpoint's inference.zoom sets
    assert zoom_for(net, TTAConfig()) == 1.5
    assert zoom_for(net, TTAConfig(zoom=1.0)) == 1.0  # an explicit setting wins
    predict_probabilities([net], torch.rand(1, 3, 64, 64), TTAConfig(passes=1, mc_dropout=False))
    assert net.seen == [(96, 96)]
    with pytest.raises(ConicQPError, match="zoom must be between") as info:
        TTAConfig(zoom=0.25)  # an um/px typed as a zoom
    assert info.value.render(cli_flag).startswith("--zoom must")
