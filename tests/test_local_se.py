"""Windowed squeeze-excitation: the output stops depending on far-away content and on tile size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conic_qp.errors import ConicQPError
from conic_qp.local_se import check_se_window, set_se_window
from conic_qp.model import ConicNet, ModelConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net() -> ConicNet:
    """A tiny ConicNet whose SE gates matter (random init leaves them nearly constant)."""
    torch.manual_seed(0)
    model = ConicNet(ModelConfig("test_efficientnet", 2, decoder_channels=(16, 16, 8, 8, 8)))
    from timm.models._efficientnet_blocks import SqueezeExcite

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqueezeExcite):
                m.conv_reduce.weight.mul_(20.0)
                m.conv_expand.weight.mul_(20.0)
    return model.eval()


def _out(net: ConicNet, x: torch.Tensor) -> torch.Tensor:
    """The deepest encoder features (stride 32), where the SE gates act most directly."""
    with torch.no_grad():
        return net.encoder(x)[-1]


def test_window_none_restores_the_trained_network_exactly(net: ConicNet) -> None:
    x = torch.rand(2, 3, 128, 160)
    before, full = _out(net, x), net(x)["three_label"].detach()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert set_se_window(net, 96) == 2
    assert not torch.allclose(_out(net, x), before, atol=1e-3)  # the window changes the gates
    assert set_se_window(net, None) == 2
    assert torch.equal(_out(net, x), before)
    assert torch.equal(net(x)["three_label"].detach(), full)
    after = net.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_a_window_as_large_as_the_input_is_the_global_mean(net: ConicNet) -> None:
    """On training-size tiles the windowed network is the trained one (up to float rounding)."""
    x = torch.rand(2, 3, 96, 64)  # 3 x 2 cells: a 5-cell window centred anywhere covers all
    set_se_window(net, None)
    trained = _out(net, x)
    set_se_window(net, 160)
    try:
        torch.testing.assert_close(_out(net, x), trained, atol=1e-5, rtol=0)
    finally:
        set_se_window(net, None)


def test_far_away_content_no_longer_changes_the_output(net: ConicNet) -> None:
    """Global SE: a change in one corner moves the output everywhere; windowed SE: not far away."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 512, 512)
    y = x.clone()
    y[..., :, :192] = 1.0 - y[..., :, :192]  # change the left columns only
    far = (..., slice(None), slice(14, None))  # stride-32 cells >= 256 px from the change
    diffs = {}
    for window in (None, 96):
        set_se_window(net, window)
        diffs[window] = float((_out(net, x) - _out(net, y))[far].abs().max())
    set_se_window(net, None)
    assert diffs[None] > 1e-3
    assert diffs[96] < 1e-3 * diffs[None]


def test_bad_windows_are_one_line_errors() -> None:
    for bad in (0, 64, 100, 256, True):
        with pytest.raises(ConicQPError, match="odd multiple of 32"):
            check_se_window(bad)  # type: ignore[arg-type]
    check_se_window(None)
    check_se_window(288)


class _GatedNet(torch.nn.Module):
    """Convolution + one strong SE layer, with ConicNet's output dict: the gate shows."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models._efficientnet_blocks import SqueezeExcite

        torch.manual_seed(2)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.se = SqueezeExcite(8, rd_ratio=0.5)
        with torch.no_grad():
            self.se.conv_reduce.weight.mul_(30.0)
            self.se.conv_expand.weight.mul_(30.0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.se(self.conv(x))
        return {"semantic": f[:, :3], "three_label": f[:, 3:6], "vectors": f[:, 6:8]}


@pytest.mark.skipif(
    "onnx" not in __import__("conic_qp.runtime").runtime.available_runtimes(),
    reason="needs ONNX Runtime",
)
def test_exported_graphs_follow_the_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU runtimes export the network as patched, and re-export when the window changes."""
    from types import SimpleNamespace

    from conic_qp.engine import apply_se_window
    from conic_qp.runtime import ExportedNetwork

    monkeypatch.setenv("CONIC_QP_CACHE", str(tmp_path))
    net = _GatedNet().eval()
    wrapped = ExportedNetwork(net, "onnx")
    models = SimpleNamespace(networks=[wrapped])
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    x[..., :64] *= 0.1  # dark left, bright right: local means differ from the global one
    got = {}
    for window in (96, None):
        assert apply_se_window(models, window) == 1  # type: ignore[arg-type]
        with torch.no_grad():
            want = net(x)["three_label"]  # the PyTorch network, patched alike
        got[window] = wrapped(x)["three_label"]
        assert float((got[window] - want).abs().max()) < 1e-4
    assert float((got[96] - got[None]).abs().max()) > 1e-2  # the window changes the output
    assert len(list(tmp_path.rglob("*.onnx"))) == 2  # one graph per window, not a stale one
