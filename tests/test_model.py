"""ConicNet: shapes, U-Net wiring, dropout / MC dropout, normalisation, config, encoder weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from conic_qp.errors import ConicQPError
from conic_qp.model import (
    ConicNet,
    DecoderBlock,
    ModelConfig,
    count_parameters,
    set_mc_dropout,
)

torch.set_num_threads(1)

TINY = "test_efficientnet"
SMALL_DECODER = (32, 16, 16, 8, 8)


def tiny_config(**kw: object) -> ModelConfig:
    args: dict[str, object] = {"encoder": TINY, "n_classes": 4, "decoder_channels": SMALL_DECODER}
    args.update(kw)
    return ModelConfig(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_model() -> ConicNet:
    torch.manual_seed(0)
    return ConicNet(tiny_config()).eval()


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (64, 128)])
def test_forward_shapes_at_input_resolution(tiny_model: ConicNet, hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        out = tiny_model(x)
    assert set(out) == {"semantic", "three_label", "vectors"}
    assert out["semantic"].shape == (2, 5, *hw)  # C + 1
    assert out["three_label"].shape == (2, 3, *hw)
    assert out["vectors"].shape == (2, 2, *hw)
    for v in out.values():
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()


@pytest.mark.parametrize(
    ("encoder", "strides"),
    [
        ("test_resnet", (2, 4, 8, 16, 32)),
        ("mobilenetv3_small_050", (2, 4, 8, 16, 32)),
        ("test_convnext", (4, 8, 16, 32)),  # no stride-2 level: that decoder level has no skip
    ],
)
def test_other_timm_encoders(encoder: str, strides: tuple[int, ...]) -> None:
    model = ConicNet(tiny_config(encoder=encoder, n_classes=2)).eval()
    assert model.encoder_strides == strides
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out["semantic"].shape == (1, 3, 64, 64)
    assert out["vectors"].shape == (1, 2, 64, 64)


def test_non_cnn_encoder_is_refused() -> None:
    with pytest.raises(ConicQPError, match="strides"):
        ConicNet(tiny_config(encoder="test_vit", encoder_drop_path=0.0))


def test_skips_are_concatenated(tiny_model: ConicNet) -> None:
    enc_ch = dict(
        zip(tiny_model.encoder_strides, tiny_model.encoder.feature_info.channels(), strict=True)
    )
    seen: list[tuple[int, int, int]] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append((int(args[0].shape[1]), int(args[0].shape[2]), int(args[0].shape[3])))

    handles = [
        b.conv1.register_forward_pre_hook(hook)
        for dec in (tiny_model.decoder_semantic, tiny_model.decoder_instance)
        for b in dec.blocks
    ]
    try:
        with torch.no_grad():
            tiny_model(torch.rand(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    prev = [enc_ch[32], *SMALL_DECODER[:-1]]
    skip = [enc_ch[16], enc_ch[8], enc_ch[4], enc_ch[2], 0]
    expected_sizes = [4, 8, 16, 32, 64]  # 64 px input: stride 16 .. 1
    expected = [(p + s, n, n) for p, s, n in zip(prev, skip, expected_sizes, strict=True)]
    assert seen == expected * 2
    for dec in (tiny_model.decoder_semantic, tiny_model.decoder_instance):
        for block, p, s in zip(dec.blocks, prev, skip, strict=True):
            assert block.conv1[0].in_channels == p + s


def test_dropout_in_every_decoder_level() -> None:
    model = ConicNet(tiny_config(decoder_dropout=0.3, encoder_drop_path=0.0))
    for dec in (model.decoder_semantic, model.decoder_instance):
        assert len(dec.blocks) == 5
        for block in dec.blocks:
            assert isinstance(block, DecoderBlock)
            assert isinstance(block.dropout, nn.Dropout2d)
            assert block.dropout.p == pytest.approx(0.3)
    default = ModelConfig(TINY, 2)
    assert default.decoder_dropout == pytest.approx(0.2)
    assert default.decoder_channels == (256, 128, 64, 32, 16)


def test_encoder_drop_path_follows_config() -> None:
    with_dp = ConicNet(tiny_config(encoder_drop_path=0.2))
    without = ConicNet(tiny_config(encoder_drop_path=0.0))
    drop_paths = [m for m in with_dp.encoder.modules() if isinstance(m, timm.layers.DropPath)]
    assert drop_paths
    assert max(m.drop_prob for m in drop_paths) == pytest.approx(0.2, abs=0.05)
    assert not any(isinstance(m, timm.layers.DropPath) for m in without.encoder.modules())


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k
    }


def test_mc_dropout_changes_passes_only_when_enabled() -> None:
    torch.manual_seed(1)
    model = ConicNet(tiny_config())
    x = torch.rand(1, 3, 64, 64)
    bn_before = _bn_state(model)

    n = set_mc_dropout(model, True)
    assert n >= 10  # 10 decoder Dropout2d + encoder DropPath
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not m.training
        if isinstance(m, (nn.Dropout2d, timm.layers.DropPath)):
            assert m.training
    with torch.no_grad():
        a = model(x)["semantic"]
        b = model(x)["semantic"]
    assert not torch.equal(a, b)

    model.set_mc_dropout(False)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        c = model(x)["semantic"]
        d = model(x)["semantic"]
    assert torch.equal(c, d)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["semantic"], c)

    after = _bn_state(model)
    assert bn_before.keys() == after.keys()
    assert all(torch.equal(bn_before[k], after[k]) for k in bn_before)


def test_mc_dropout_covers_encoder_drop_path() -> None:
    torch.manual_seed(2)
    # test_efficientnet has no residual blocks (drop path unused) and timm zero-inits the last
    # BN of ResNet blocks (drop path has no effect at init); MobileNetV3 has live residuals.
    model = ConicNet(
        tiny_config(encoder="mobilenetv3_small_050", decoder_dropout=0.0, encoder_drop_path=0.5)
    )
    set_mc_dropout(model, True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        outs = [model(x)["three_label"] for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("encoder", [TINY, "test_resnet"])
def test_normalisation_uses_encoder_data_config(encoder: str) -> None:
    model = ConicNet(tiny_config(encoder=encoder)).eval()
    cfg = timm.data.resolve_data_config({}, model=model.encoder)
    assert torch.allclose(model.input_mean.flatten(), torch.tensor(cfg["mean"]))
    assert torch.allclose(model.input_std.flatten(), torch.tensor(cfg["std"]))
    seen: list[torch.Tensor] = []
    handle = model.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    handle.remove()
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], (x - mean) / std, atol=1e-6)
    assert "input_mean" in model.state_dict()


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(1, 3, 65, 64), "multiple of 32.*pad or crop"),
        (torch.rand(1, 3, 64, 48), "multiple of 32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float"),
        (torch.rand(1, 4, 64, 64), r"\(B, 3, H, W\)"),
        (torch.rand(3, 64, 64), r"\(B, 3, H, W\)"),
    ],
)
def test_bad_input_raises_one_line_error(tiny_model: ConicNet, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ConicQPError, match=match) as info:
        tiny_model(x)
    assert "\n" not in str(info.value)


def test_config_json_round_trip() -> None:
    cfg = ModelConfig(
        "test_efficientnet",
        7,
        decoder_channels=(64, 32, 16, 16, 8),
        decoder_dropout=0.1,
        encoder_drop_path=0.0,
        pretrained=True,
        pretrained_file="/weights/b5.safetensors",
        in_chans=3,
    )
    data = json.loads(json.dumps(cfg.to_json()))
    assert data["decoder_channels"] == [64, 32, 16, 16, 8]
    back = ModelConfig.from_json(data)
    assert back == cfg
    assert isinstance(back.decoder_channels, tuple)
    assert back.out_channels == {"semantic": 8, "three_label": 3, "vectors": 2}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"encoder": TINY, "n_classes": 6, "decoder_chanels": [1, 2, 3, 4, 5]}, "unknown"),
        ({"encoder": TINY}, "n_classes"),
        ({"encoder": TINY, "n_classes": 0}, "n_classes"),
        ({"encoder": TINY, "n_classes": True}, "n_classes"),
        ({"encoder": TINY, "n_classes": "6"}, "n_classes"),
        ({"encoder": TINY, "n_classes": 6, "decoder_channels": [64, 32, 16, 8]}, "exactly 5"),
        ({"encoder": TINY, "n_classes": 6, "decoder_channels": [64, 32, 16, 8, 0]}, ">= 1"),
        ({"encoder": TINY, "n_classes": 6, "decoder_dropout": 1.0}, r"\[0, 1\)"),
        ({"encoder": TINY, "n_classes": 6, "pretrained": "yes"}, "true or false"),
        ({"encoder": TINY, "n_classes": 6, "pretrained_file": "w.pth"}, "pretrained=True"),
        ({"encoder": "efficientnet_b55", "n_classes": 6}, "did you mean efficientnet_b5"),
        ([1, 2], "JSON object"),
    ],
)
def test_config_validation(data: object, match: str) -> None:
    with pytest.raises(ConicQPError, match=match):
        ModelConfig.from_json(data)  # type: ignore[arg-type]


@pytest.mark.timeout(60)  # offline, the hub must fail at once instead of retrying for minutes
def test_pretrained_download_failure_is_fast_and_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConicQPError, match="could not fetch pretrained weights") as info:
        ConicNet(tiny_config(pretrained=True))
    msg = str(info.value)
    assert "pretrained_file" in msg and "pretrained=False" in msg and "\n" not in msg
    # Building for a checkpoint load never touches the hub.
    ConicNet(tiny_config(pretrained=True), load_pretrained=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_loads_encoder(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    full = timm.create_model(TINY)  # a timm classifier checkpoint, head included
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = ConicNet(tiny_config(pretrained=True, pretrained_file=str(path)))
    enc = model.encoder.state_dict()
    assert enc
    for key, value in enc.items():
        assert torch.equal(value, state[key]), key
    random_init = ConicNet(tiny_config())
    first = "conv_stem.weight"
    assert not torch.equal(random_init.encoder.state_dict()[first], state[first])


def test_pretrained_file_adapts_input_channels(tmp_path: Path) -> None:
    full = timm.create_model(TINY)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    model = ConicNet(tiny_config(in_chans=1, pretrained=True, pretrained_file=str(path)))
    stem = model.encoder.state_dict()["conv_stem.weight"]
    assert stem.shape[1] == 1
    assert torch.allclose(stem, full.state_dict()["conv_stem.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 32, 32))["semantic"].shape == (1, 5, 32, 32)


def test_pretrained_file_errors(tmp_path: Path) -> None:
    other = timm.create_model("test_resnet")
    wrong = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    with pytest.raises(ConicQPError, match="does not hold weights for encoder 'test_efficientnet'"):
        ConicNet(tiny_config(pretrained=True, pretrained_file=str(wrong)))
    with pytest.raises(ConicQPError, match="does not exist"):
        ConicNet(tiny_config(pretrained=True, pretrained_file=str(tmp_path / "nope.pth")))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a weights file at all")
    with pytest.raises(ConicQPError, match="cannot read encoder weights"):
        ConicNet(tiny_config(pretrained=True, pretrained_file=str(junk)))


def test_efficientnet_b0_forward_256() -> None:
    model = ConicNet(ModelConfig("efficientnet_b0", 6)).eval()
    assert 5e6 < count_parameters(model) < 2e7
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256))
    assert out["semantic"].shape == (1, 7, 256, 256)
    assert out["three_label"].shape == (1, 3, 256, 256)


@pytest.mark.slow
def test_efficientnet_b5_forward_256() -> None:
    model = ConicNet(ModelConfig("efficientnet_b5", 6)).eval()
    assert model.encoder_strides == (2, 4, 8, 16, 32)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256))
    assert out["semantic"].shape == (1, 7, 256, 256)
    assert out["vectors"].shape == (1, 2, 256, 256)
    assert all(torch.isfinite(v).all() for v in out.values())
