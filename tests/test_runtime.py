"""conic_qp.runtime: exported graphs run by ONNX Runtime / OpenVINO equal the PyTorch network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conic_qp import runtime
from conic_qp.errors import ConicQPError
from conic_qp.model import ConicNet, ModelConfig, set_mc_dropout
from conic_qp.runtime import (
    ExportedNetwork,
    _MaskedNet,
    apply_runtime,
    available_runtimes,
    cpu_network,
    resolve_runtime,
    runtime_used,
)
from conic_qp.tta import TTAConfig, predict_probabilities

EXPORTED = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name not in available_runtimes(), reason=f"needs the {name} runtime installed"
        ),
    )
    for name in ("onnx", "openvino")
]
H, W = 64, 96


@pytest.fixture(scope="module")
def net() -> ConicNet:
    torch.manual_seed(0)
    config = ModelConfig(
        "test_efficientnet",
        3,
        decoder_channels=(32, 16, 16, 8, 8),
        decoder_dropout=0.3,
        encoder_drop_path=0.3,
    )
    return ConicNet(config).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One graph cache for the module: each graph is exported once, then loaded."""
    path = tmp_path_factory.mktemp("graphs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONIC_QP_CACHE", str(path))
        yield path


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", EXPORTED)
def test_outputs_equal_torch_for_any_batch(name: str, net: ConicNet, cache: Path) -> None:
    wrapped = cpu_network(net, name)
    for n in (1, 3):
        x = _images(n)
        with torch.no_grad():
            want = net(x)
        got = wrapped(x)
        assert set(got) == {"semantic", "three_label", "vectors"}
        for key, value in want.items():
            assert got[key].shape == value.shape and got[key].dtype == torch.float32
            assert float((got[key] - value).abs().max()) < 1e-4
    assert (cache / "graphs").is_dir() or any(cache.rglob("*.onnx"))


@pytest.mark.parametrize("name", EXPORTED)
def test_mc_dropout_uses_the_masks_torch_would(name: str, net: ConicNet, cache: Path) -> None:
    wrapped = cpu_network(net, name)
    assert isinstance(wrapped, ExportedNetwork) and not wrapped.mc_active()
    x = _images(2)
    plain = wrapped(x)
    set_mc_dropout(wrapped, True)  # what predict_probabilities does for MC dropout
    try:
        assert wrapped.mc_active()
        torch.manual_seed(7)
        first = wrapped(x)
        torch.manual_seed(7)
        again = wrapped(x)
        torch.manual_seed(8)
        other = wrapped(x)
        # the same masks drawn again feed the PyTorch copy of the network
        torch.manual_seed(7)
        masks = wrapped._draw_masks(2)
        layers = wrapped._mask_inputs()
        reference = _MaskedNet(net, [n for n, _, _ in layers])
        with torch.no_grad():
            want = reference(x, *(torch.from_numpy(m) for m in masks))
    finally:
        set_mc_dropout(wrapped, False)
    assert all(torch.equal(first[k], again[k]) for k in first)  # reproducible with a seed
    assert not torch.equal(first["semantic"], other["semantic"])
    assert not torch.equal(first["semantic"], plain["semantic"])
    for got, ref in zip((first[k] for k in runtime.OUTPUTS), want, strict=True):
        assert float((got - ref).abs().max()) < 1e-4
    # decoder channel dropout (and the encoder's drop path where it runs), scaled by 1 / keep
    assert sum(type(m).__name__ == "Dropout2d" for _, m, _ in layers) == 10
    for (_, m, shape), mask in zip(layers, masks, strict=True):
        keep = 1 - runtime._drop_rate(m)
        assert mask.shape == (2, *shape[1:])
        assert set(np.unique(mask)) <= {0.0, np.float32(1 / keep)}
        if type(m).__name__ == "DropPath":
            assert shape[1:] == (1, 1, 1)
    assert not any(m.training for m in net.modules())  # switched off again


@pytest.mark.parametrize("name", EXPORTED)
def test_tta_passes_reach_the_runtime_as_one_batch(
    name: str, net: ConicNet, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapped = cpu_network(net, name)
    assert isinstance(wrapped, ExportedNetwork)
    batches: list[int] = []
    load = wrapped._load

    def counting(path: Path):  # type: ignore[no-untyped-def]
        run = load(path)

        def counted(inputs: list[np.ndarray]) -> list[np.ndarray]:
            batches.append(inputs[0].shape[0])
            return run(inputs)

        return counted

    monkeypatch.setattr(wrapped, "_load", counting)
    cfg = TTAConfig(passes=4, mc_dropout=False)
    got = predict_probabilities([wrapped], _images(2), cfg, seed=3)
    want = predict_probabilities([net], _images(2), cfg, seed=3)
    assert batches == [8]  # 4 passes x 2 images in one call
    for key in want:
        assert float((got[key] - want[key]).abs().max()) < 1e-4


def test_graphs_are_cached_per_weights_and_size(
    net: ConicNet, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [n for n in ("onnx", "openvino") if n in available_runtimes()]
    if not names:
        pytest.skip("needs onnxruntime or openvino")
    first = cpu_network(net, names[0])
    assert isinstance(first, ExportedNetwork)
    first(_images(1))  # exported (or already there)
    path = first.graph_path(H, W, False)
    assert path.is_file() and path.parent != Path(runtime.__file__).parent
    stamp = path.stat().st_mtime_ns

    def no_export(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(runtime, "export_graph", no_export)
    again = cpu_network(net, names[-1])
    assert isinstance(again, ExportedNetwork)
    again(_images(1))
    assert path.stat().st_mtime_ns == stamp
    other = ConicNet(net.config).eval()  # other weights: another graph
    assert ExportedNetwork(other, names[0]).graph_path(H, W, False) != path
    assert first.graph_path(H, W + 32, False) != path
    assert first.graph_path(H, W, True) != path


def test_a_graph_that_disagrees_with_torch_is_refused(
    net: ConicNet, cache: Path, tmp_path: Path
) -> None:
    names = [n for n in ("onnx", "openvino") if n in available_runtimes()]
    if not names:
        pytest.skip("needs onnxruntime or openvino")
    wrapped = cpu_network(net, names[0])
    assert isinstance(wrapped, ExportedNetwork)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"graph")

    def wrong(inputs: list[np.ndarray]) -> list[np.ndarray]:
        b = inputs[0].shape[0]
        return [np.zeros((b, c, H, W), np.float32) for c in (4, 3, 2)]

    with pytest.raises(ConicQPError, match="differs from PyTorch"):
        wrapped._verify(wrong, H, W, False, bad)
    assert not bad.exists()


def test_run_json_names_the_runtime_that_ran(net: ConicNet, cache: Path) -> None:
    assert runtime_used(net) == "torch"
    names = [n for n in ("onnx", "openvino") if n in available_runtimes()]
    if not names:
        pytest.skip("needs onnxruntime or openvino")
    wrapped = cpu_network(net, names[0], fallback=True)
    assert runtime_used(wrapped) == names[0]
    assert isinstance(wrapped, ExportedNetwork)
    wrapped._torch_shapes.add((H, W, False))  # what a failed export at this size leaves
    assert runtime_used(wrapped) == f"{names[0]} (torch for {H}x{W} inputs)"


def test_runtime_choice_and_errors(net: ConicNet) -> None:
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"
    auto = resolve_runtime("auto", "cpu")
    avail = available_runtimes()
    assert auto == ("openvino" if "openvino" in avail else "onnx" if "onnx" in avail else "torch")
    with pytest.raises(ConicQPError, match="unknown runtime"):
        resolve_runtime("tensorrt", "cpu")
    with pytest.raises(ConicQPError, match="runs on the CPU"):
        resolve_runtime("onnx", "cuda")
    assert apply_runtime([net], "torch") == [net]
    assert cpu_network(net, "torch") is net
    if "onnx" in avail:
        with pytest.raises(ConicQPError, match="runs on the CPU"):
            ExportedNetwork(net, "onnx")(_images(1).to("meta"))
    with pytest.raises(ValueError, match="onnx or openvino"):
        ExportedNetwork(net, "torch")  # type: ignore[arg-type]


def test_mask_layers_of_the_bundled_architecture() -> None:
    """EfficientNet-B0 with drop path: per-sample masks for the blocks that run it."""
    config = ModelConfig("efficientnet_b0", 4, decoder_dropout=0.2, encoder_drop_path=0.2)
    layers = runtime._mask_layers(ConicNet(config, load_pretrained=False).eval())
    kinds = [type(m).__name__ for _, m, _ in layers]
    assert kinds.count("Dropout2d") == 10 and kinds.count("DropPath") >= 5
    for _, m, shape in layers:
        if type(m).__name__ == "DropPath":
            assert shape == (1, 1, 1, 1)
        else:
            assert shape[0] == 1 and shape[1] > 1 and shape[2:] == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTED[-1:])
def test_predict_cli_with_an_exported_runtime(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from conic_qp.cli import main
    from conic_qp.sinks.tables import read_table
    from conic_qp.synthetic import synthetic_slide_image
    from tests.helpers_models import make_tiny_checkpoint
    from tests.helpers_slides import write_pyramidal_tiff

    monkeypatch.setenv("CONIC_QP_CACHE", str(tmp_path / "cache"))
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    img = synthetic_slide_image(224, 256, seed=0, tissue_fraction=0.7).image
    write_pyramidal_tiff(tmp_path / "a.tif", img, mpp=0.5, levels=2)
    common = ["--model", str(ckpt), "--tta", "2", "--device", "cpu", "--workers", "0"]
    common += ["--tile-size", "128", "--halo", "32", "--batch-size", "2"]

    def predict(out: str, *extra: str) -> tuple[int, str]:
        args = ["predict", str(tmp_path / "a.tif"), "-o", str(tmp_path / out), *common, *extra]
        result = CliRunner().invoke(main, args)
        return result.exit_code, result.output

    assert predict("torch", "--runtime", "torch", "--no-mc-dropout")[0] == 0
    assert predict(name, "--runtime", name, "--no-mc-dropout")[0] == 0
    assert any((tmp_path / "cache").rglob("*-plain.onnx"))
    a = read_table(tmp_path / "torch" / "a.nuclei.parquet")
    b = read_table(tmp_path / name / "a.nuclei.parquet")
    assert len(a) > 5
    # outputs agree to ~1e-5: the same nuclei (same pixels, hence the same ids) come out
    assert len(set(a["id"]) & set(b["id"])) >= 0.95 * max(len(a), len(b))
    code, text = predict("x", "--runtime", name, "--compile")
    assert code == 2 and "--runtime torch" in text


def test_agreement_check_compares_what_post_processing_sees() -> None:
    """Saturated logits may move by 1e-3 (float32 reassociation) without moving a probability."""
    rng = np.random.default_rng(0)
    want = {k: torch.from_numpy(rng.normal(0, 1, (1, c, 8, 8)).astype(np.float32))
            for k, c in (("semantic", 4), ("three_label", 3), ("vectors", 2))}  # fmt: skip
    want["three_label"][:, 0] += 150.0  # MC dropout masks scale activations this far
    got = {k: v.numpy().copy() for k, v in want.items()}
    got["three_label"][:, 0] += 3e-3
    assert runtime._disagreement(got, want) < 1e-6
    got["semantic"][:, 1] += 0.1  # a real disagreement of the probabilities
    assert runtime._disagreement(got, want) > runtime.EXPORT_TOLERANCE


@pytest.mark.parametrize("name", EXPORTED)
def test_auto_falls_back_to_pytorch_when_a_graph_is_unusable(
    name: str, net: ConicNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` keeps a run going on PyTorch; a runtime asked for by name fails clearly."""

    calls: list[object] = []

    def broken(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise ConicQPError("could not export the network to ONNX (test); use runtime torch")

    monkeypatch.setattr(runtime, "export_graph", broken)
    x = _images(2)
    with torch.no_grad():
        expected = net(x)
        fallback = cpu_network(net, name, cache=tmp_path, fallback=True)
        out = fallback(x)
        out_again = fallback(x)  # remembered: no second export attempt
    for key in ("semantic", "three_label", "vectors"):
        assert torch.equal(out[key], expected[key]) and torch.equal(out_again[key], out[key])
    assert len(calls) == 1
    strict = cpu_network(net, name, cache=tmp_path)
    with pytest.raises(ConicQPError, match="could not export"), torch.no_grad():
        strict(x)
