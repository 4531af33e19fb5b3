"""Checkpoint folders: round trips (fp32 exact, fp16 close), atomic replacement, every bad input."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import conic_qp.checkpoint as ckpt_mod
from conic_qp import __version__
from conic_qp.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    THRESHOLDS_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from conic_qp.classes import CONIC, CONSEP, ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.model import ConicNet, ModelConfig

torch.set_num_threads(1)

THRESHOLDS = {"fg": [0.5, 0.4, 0.5, 0.5, 0.45, 0.5], "seed": [0.7] * 6, "min_size": [10] * 6}


def make_model(n_classes: int = 6, encoder: str = "test_efficientnet", seed: int = 0) -> ConicNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder, n_classes, decoder_channels=(32, 16, 16, 8, 8))
    model = ConicNet(cfg)
    # One training step's worth of BN statistics so buffers are not at their defaults.
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> ConicNet:
    return make_model()


@pytest.fixture
def saved(tmp_path: Path, model: ConicNet) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model, CONIC, 0.5, thresholds=THRESHOLDS)


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)  # type: ignore[no-any-return]


def test_fp32_round_trip_is_exact(tmp_path: Path, model: ConicNet) -> None:
    training = {"steps": 12, "split": "random", "val_mpq": 0.51}
    path = save_checkpoint(
        tmp_path / "m", model, CONIC, 0.5, thresholds=THRESHOLDS, training=training
    )
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, THRESHOLDS_FILE, WEIGHTS_FILE]
    ck = load_checkpoint(path)
    assert isinstance(ck, Checkpoint)
    assert ck.config == model.config
    assert ck.classes == CONIC
    assert ck.mpp == 0.5
    assert ck.thresholds == THRESHOLDS
    assert ck.training == training
    assert ck.path == path
    assert not ck.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[key], value), key
    x = torch.rand(2, 3, 64, 64)
    a, b = _outputs(model, x), _outputs(ck.model, x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_json_contents(saved: Path, model: ConicNet) -> None:
    data = json.loads((saved / CONFIG_FILE).read_text())
    assert data["format"] == FORMAT == "conic-qp-checkpoint"
    assert data["format_version"] == 1
    assert data["model"] == model.config.to_json()
    assert data["classes"] == CONIC.to_json()
    assert data["mpp"] == 0.5
    assert data["conic_qp_version"] == __version__
    created = dt.datetime.fromisoformat(data["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    assert "training" not in data
    assert read_checkpoint_config(saved) == data


def test_fp16_storage_halves_size_and_loads_as_fp32(tmp_path: Path, model: ConicNet) -> None:
    full = save_checkpoint(tmp_path / "full", model, CONIC, 0.5)
    half = save_checkpoint(tmp_path / "half", model, CONIC, 0.5, half=True)
    size_full = (full / WEIGHTS_FILE).stat().st_size
    size_half = (half / WEIGHTS_FILE).stat().st_size
    assert size_half < 0.6 * size_full
    ck = load_checkpoint(half)
    assert THRESHOLDS_FILE not in {p.name for p in half.iterdir()}
    assert ck.thresholds is None
    for key, value in model.state_dict().items():
        loaded = ck.model.state_dict()[key]
        assert loaded.dtype == value.dtype, key
        if value.is_floating_point():
            assert torch.equal(loaded, value.half().float()), key
        else:
            assert torch.equal(loaded, value), key
    x = torch.rand(1, 3, 64, 64)
    a, b = _outputs(model, x), _outputs(ck.model, x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-2, rtol=5e-2), k
        assert not torch.equal(a[k], b[k])  # really went through fp16


def test_other_class_scheme_and_mpp(tmp_path: Path) -> None:
    m = make_model(n_classes=4)
    path = save_checkpoint(tmp_path / "consep", m, CONSEP, 0.25)
    ck = load_checkpoint(path)
    assert ck.classes.names == ["other", "inflammatory", "epithelial", "spindle"]
    assert ck.mpp == 0.25
    assert ck.model.config.n_classes == 4


def test_replacing_a_checkpoint_is_clean(tmp_path: Path, model: ConicNet) -> None:
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, CONIC, 0.5, thresholds={"v": 1})
    save_checkpoint(path, model, CONIC, 0.5, thresholds={"v": 2})
    assert load_checkpoint(path).thresholds == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old folders left


def test_failed_write_keeps_old_checkpoint(
    tmp_path: Path, model: ConicNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(tmp_path / "ckpt", model, CONIC, 0.5, thresholds={"v": 1})

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, CONIC, 0.5, thresholds={"v": 2})
    assert load_checkpoint(path).thresholds == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_refuses_to_clobber_other_data(tmp_path: Path, model: ConicNet) -> None:
    user = tmp_path / "results"
    user.mkdir()
    (user / "important.csv").write_text("a,b\n")
    with pytest.raises(ConicQPError, match="not a conic-qp checkpoint; refusing"):
        save_checkpoint(user, model, CONIC, 0.5)
    assert (user / "important.csv").read_text() == "a,b\n"
    afile = tmp_path / "file.bin"
    afile.write_bytes(b"x")
    with pytest.raises(ConicQPError, match="not a folder"):
        save_checkpoint(afile, model, CONIC, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": CONSEP}, "has 4 classes but the model predicts 6"),
        ({"mpp": 0.0}, "positive"),
        ({"mpp": float("nan")}, "positive"),
        ({"mpp": "0.5"}, "micrometres per pixel"),
        ({"training": {"when": dt.date(2024, 1, 1)}}, "not JSON-serialisable"),
        ({"thresholds": {"fg": float("inf")}}, "not JSON-serialisable"),
    ],
)
def test_save_rejects_bad_arguments(
    tmp_path: Path, model: ConicNet, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"classes": CONIC, "mpp": 0.5}
    args.update(kwargs)
    with pytest.raises(ConicQPError, match=match):
        save_checkpoint(tmp_path / "c", model, **args)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def _edit_config(path: Path, **changes: object) -> None:
    data = json.loads((path / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (path / CONFIG_FILE).write_text(json.dumps(data))


def _one_line(exc: pytest.ExceptionInfo[ConicQPError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_path_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConicQPError, match="does not exist") as e:
        load_checkpoint(tmp_path / "nope")
    _one_line(e)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ConicQPError, match="is not a folder"):
        load_checkpoint(f)
    with pytest.raises(ConicQPError, match="is not a folder"):
        read_checkpoint_config(f)


def test_missing_config_or_weights(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    assert read_checkpoint_config(saved)["format"] == FORMAT  # config alone is readable
    with pytest.raises(ConicQPError, match=f"has no {WEIGHTS_FILE}"):
        load_checkpoint(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(ConicQPError, match=f"has no {CONFIG_FILE}"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "hovernet"}, "not a conic-qp checkpoint config"),
        ({"format_version": 2}, "newer than this conic-qp reads.*upgrade"),
        ({"format_version": "1"}, "integer format_version"),
        ({"mpp": -1}, "positive"),
        ({"mpp": None}, "lacks 'mpp'"),
        (
            {"classes": {"name": "x", "classes": [{"id": 1, "name": "a", "color": [0, 0, 0]}]}},
            "declares 1 classes but its model predicts 6",
        ),
        (
            {"model": {"encoder": "test_efficientnet", "n_classes": 6, "dropout": 0.1}},
            "unknown model config keys",
        ),
        ({"inference": {"mc_dropout": "no"}}, "must be true or false"),
        ({"inference": {"passes": 4}}, "only 'mc_dropout' and 'zoom'"),
        ({"inference": [False]}, "only 'mc_dropout' and 'zoom'"),
        ({"inference": {"zoom": 0.25}}, "'inference.zoom' must be a number from 0.5 to 3"),
        ({"inference": {"zoom": "1.25"}}, "'inference.zoom' must be a number"),
    ],
)
def test_bad_config(saved: Path, changes: dict[str, object], match: str) -> None:
    _edit_config(saved, **changes)
    with pytest.raises(ConicQPError, match=match) as e:
        load_checkpoint(saved)
    _one_line(e)


def test_config_not_json(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConicQPError, match="not valid JSON"):
        load_checkpoint(saved)


def test_thresholds_not_an_object(saved: Path) -> None:
    (saved / THRESHOLDS_FILE).write_text("[1, 2]")
    with pytest.raises(ConicQPError, match="JSON object of thresholds"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"encoder": "test_resnet"}, "missing.*unexpected"),
        ({"decoder_channels": (16, 16, 16, 8, 8)}, "of another shape"),
    ],
)
def test_weights_of_another_architecture(saved: Path, other: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "encoder": "test_efficientnet",
        "n_classes": 6,
        "decoder_channels": (32, 16, 16, 8, 8),
    }
    args.update(other)
    foreign = ConicNet(ModelConfig(**args))  # type: ignore[arg-type]
    state = {k: v.contiguous() for k, v in foreign.state_dict().items()}
    save_file(state, str(saved / WEIGHTS_FILE))
    _edit_config(saved, weights_sha256=None)  # as if someone swapped the file by hand
    with pytest.raises(ConicQPError, match=match) as e:
        load_checkpoint(saved)
    msg = _one_line(e)
    assert "do not match the architecture config.json declares" in msg
    assert "encoder test_efficientnet" in msg


def test_truncated_weights_detected_by_checksum(saved: Path) -> None:
    w = saved / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ConicQPError, match="checksum"):
        load_checkpoint(saved)


@pytest.mark.parametrize("cut", ["data", "header", "garbage"])
def test_corrupt_weights_without_checksum(saved: Path, cut: str) -> None:
    _edit_config(saved, weights_sha256=None)
    w = saved / WEIGHTS_FILE
    raw = w.read_bytes()
    if cut == "data":
        w.write_bytes(raw[: len(raw) // 2])
    elif cut == "header":
        w.write_bytes(raw[:20])
    else:
        w.write_bytes(b"\x00" * 64)
    with pytest.raises(ConicQPError, match="corrupt or truncated") as e:
        load_checkpoint(saved)
    _one_line(e)


def test_custom_scheme_round_trip(tmp_path: Path) -> None:
    scheme = ClassScheme.from_names("tumour", ["tumour", "immune"])
    m = make_model(n_classes=2)
    ck = load_checkpoint(save_checkpoint(tmp_path / "t", m, scheme, 0.5))
    assert ck.classes == scheme


def test_wrapped_models_are_unwrapped(tmp_path: Path, model: ConicNet) -> None:
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like
    ck = load_checkpoint(save_checkpoint(tmp_path / "w", wrapped, CONIC, 0.5))  # type: ignore[arg-type]
    assert set(ck.model.state_dict()) == set(model.state_dict())
    with pytest.raises(ConicQPError, match="needs a ConicNet"):
        save_checkpoint(tmp_path / "x", torch.nn.Linear(2, 2), CONIC, 0.5)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_unavailable_device_is_a_clear_error(saved: Path) -> None:
    with pytest.raises(ConicQPError, match="cannot put the model on device 'cuda'"):
        load_checkpoint(saved, device="cuda")


@pytest.mark.gpu
def test_load_on_gpu_matches_cpu(saved: Path) -> None:
    cpu = load_checkpoint(saved)
    gpu = load_checkpoint(saved, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = cpu.model(x)["semantic"]
        b = gpu.model(x.cuda())["semantic"].cpu()
    assert torch.allclose(a, b, atol=1e-3)


def test_inference_recommendation_round_trip(tmp_path: Path, model: ConicNet) -> None:
    # a checkpoint measured to do better without MC dropout says so; the loaded network carries it
    path = save_checkpoint(tmp_path / "c", model, CONIC, 0.5, inference={"mc_dropout": False})
    inference = json.loads((path / CONFIG_FILE).read_text())["inference"]
    assert inference == {"mc_dropout": False, "zoom": 1.0}
    assert load_checkpoint(path).model.mc_dropout_default is False
    zoomed = save_checkpoint(tmp_path / "z", model, CONIC, 0.5, inference={"zoom": 1.25})
    assert load_checkpoint(zoomed).model.inference_zoom == 1.25
    assert load_checkpoint(zoomed).model.mc_dropout_default is True
    plain = save_checkpoint(tmp_path / "d", model, CONIC, 0.5)
    assert "inference" not in json.loads((plain / CONFIG_FILE).read_text())
    assert load_checkpoint(plain).model.mc_dropout_default is True  # the paper's default
    assert load_checkpoint(plain).model.inference_zoom == 1.0
    with pytest.raises(ConicQPError, match="must be true or false"):
        save_checkpoint(tmp_path / "e", model, CONIC, 0.5, inference={"mc_dropout": 0})


def test_blend_is_the_weighted_mean_of_two_checkpoints(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path / "a", make_model(seed=0), CONIC, 0.5, inference={"zoom": 1.5})
    second = save_checkpoint(tmp_path / "b", make_model(seed=1), CONIC, 0.5)
    a, b = load_checkpoint(first), load_checkpoint(second)
    blended = ckpt_mod.blend_checkpoints(a, b, 0.25)
    sa, sb, sm = a.model.state_dict(), b.model.state_dict(), blended.state_dict()
    floats = [k for k, v in sa.items() if v.is_floating_point()]
    assert any(not torch.equal(sa[k], sb[k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(sm[k], 0.75 * sa[k] + 0.25 * sb[k])
    assert all(torch.equal(sm[k], sb[k]) for k in sa if k not in floats)  # BN counters
    assert blended.inference_zoom == 1.0  # inference settings follow the second
    # the ends are the two checkpoints themselves
    ends = ckpt_mod.blend_checkpoints(a, b, 0.0).state_dict()
    assert all(torch.equal(ends[k], sa[k]) for k in floats)
    assert not blended.training


def test_blend_refuses_different_networks_and_weights(tmp_path: Path) -> None:
    a = load_checkpoint(save_checkpoint(tmp_path / "a", make_model(), CONIC, 0.5))
    four = load_checkpoint(save_checkpoint(tmp_path / "c", make_model(n_classes=4), CONSEP, 0.5))
    coarse = load_checkpoint(save_checkpoint(tmp_path / "d", make_model(seed=2), CONIC, 1.0))
    with pytest.raises(ConicQPError, match="different networks"):
        ckpt_mod.blend_checkpoints(a, four, 0.5)
    with pytest.raises(ConicQPError, match="classes or um/px"):
        ckpt_mod.blend_checkpoints(a, coarse, 0.5)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ConicQPError, match="from 0 to 1"):
            ckpt_mod.blend_checkpoints(a, a, bad)  # type: ignore[arg-type]


def test_task2_thresholds_are_written_with_the_checkpoint(tmp_path: Path, model: ConicNet) -> None:
    task2 = {"fg": [0.4] * 6}
    folder = save_checkpoint(tmp_path / "m", model, CONIC, 0.5, thresholds_task2=task2)
    assert json.loads((folder / ckpt_mod.THRESHOLDS_TASK2_FILE).read_text()) == task2
    assert not (folder / THRESHOLDS_FILE).exists()
