from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conic_qp.checkpoint import load_checkpoint
from conic_qp.cli import main
from conic_qp.errors import ConicQPError, OutputError
from conic_qp.paths import host_tag
from conic_qp.predict import default_model_path
from conic_qp.synthetic import synthetic_dataset
from conic_qp.train.config import TrainConfig, load_config
from conic_qp.train.data import save_conic_patches
from conic_qp.train.loop import initial_weights, prepare_data, train

TINY = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def conic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = synthetic_dataset(10, size=64, seed=1, n_classes=6)
    folder = tmp_path_factory.mktemp("conic")
    save_conic_patches(folder, images, labels)
    return folder


def _config(folder: Path, out: Path, **over: str) -> TrainConfig:
    sets = [
        f"out={out}",
        f"data.train=[{{format: conic, path: '{folder}'}}]",
        "data.tile_size=64",
        "data.n_val=3",
        "model.encoder=" + TINY,
        "model.pretrained=false",
        "model.decoder_channels=[32, 16, 16, 8, 8]",
        "model.encoder_drop_path=0.0",
        "optim.steps=4",
        "optim.batch_size=2",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "validation.every=2",
        "log_every=1",
        "workers=0",
        "device=cpu",
    ]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets)


def test_defaults_are_the_papers() -> None:
    cfg = TrainConfig()
    assert cfg.optim.batch_size == 4 and cfg.optim.steps == 600_000
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.balance.rho == 3 and cfg.balance.label_smoothing == 0.05
    assert cfg.balance.importance_sampling and cfg.balance.loss_weighting
    assert cfg.model.decoder_dropout == 0.2 and cfg.data.n_val == 500 and cfg.data.mpp == 0.5


def test_yaml_round_trip_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(TrainConfig().to_yaml())
    cfg = load_config(
        path, ["optim.lr=3e-4", "balance.importance_sampling=false", "augment.hed_p=0.1"]
    )
    assert cfg.optim.lr == 3e-4 and not cfg.balance.importance_sampling
    assert cfg.augment.hed_p == 0.1 and isinstance(cfg.augment.zoom, tuple)
    with pytest.raises(ConicQPError, match="unknown key"):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ConicQPError, match=r"section\.key=value"):
        load_config(path, ["optim.lr"])


def test_short_run_trains_validates_and_resumes(conic_folder: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = _config(conic_folder, out)
    cfg.inference.mc_dropout = False  # the recipe's measured inference setting reaches checkpoints
    events: list[str] = []
    result = train(cfg, on_event=lambda kind, info: events.append(kind))
    assert result.steps == 4
    assert events[0] == "start" and events[-1] == "end" and events.count("validation") == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    vals = [float(r["val_mpq_plus"]) for r in rows if r["val_mpq_plus"]]
    assert len(vals) == 2 and all(0.0 <= v <= 1.0 for v in vals)
    best = load_checkpoint(out / "best")
    assert best.classes.n_classes == 6 and best.mpp == 0.5
    assert best.thresholds is not None and best.training is not None
    assert best.model.mc_dropout_default is False
    # A second run into the same folder is refused unless resumed.
    with pytest.raises(ConicQPError, match="--resume"):
        train(cfg)
    # a killed run's temporary state file is removed when the run is resumed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".train_state.pt.cqp-{dead.pid}-{host_tag()}-0000abcd.tmp"
    stale.write_bytes(b"half a state")
    resumed = train(_config(conic_folder, out, **{"optim.steps": "6"}), resume=True)
    assert resumed.steps == 6 and not stale.exists()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["loss"]][-2:] == [5, 6]
    # a state file that would run code when unpickled is refused, and the code never runs
    marker = tmp_path / "pwned"
    state = out / "train_state.pt"
    torch.save({"x": _RunsCode(str(marker))}, state)
    with pytest.raises(ConicQPError, match="not a training state conic-qp wrote"):
        train(_config(conic_folder, out, **{"optim.steps": "7"}), resume=True)
    assert not marker.exists()
    # a read-only run folder is refused before anything is read or written, root included
    os.chmod(out, 0o555)
    try:
        with pytest.raises(OutputError, match="read-only"):
            train(_config(conic_folder, out, **{"optim.steps": "7"}), resume=True)
    finally:
        os.chmod(out, 0o755)


class _RunsCode:
    """Pickles to a call of ``open(path, 'w')``: what a crafted state file would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_loss_falls_on_a_fixed_batch(conic_folder: Path, tmp_path: Path) -> None:
    # No augmentation, one tile repeated: a working loop must overfit it.
    torch.set_num_threads(1)
    cfg = _config(
        conic_folder,
        tmp_path / "fit",
        **{
            "optim.steps": "30",
            "validation.every": "1000",
            "data.split": "random",
            "data.n_val": "9",
            "augment.hed_p": "0",
            "augment.jitter_p": "0",
            "augment.blur_p": "0",
            "augment.noise_p": "0",
            "augment.flip_p": "0",
            "augment.rot90": "false",
            "augment.rotate_p": "0",
            "augment.zoom_p": "0",
            "augment.scale_p": "0",
            "augment.shear_p": "0",
            "augment.translate_p": "0",
            "augment.elastic_p": "0",
            "model.decoder_dropout": "0.0",
        },
    )
    train(cfg)
    rows = [r for r in csv.DictReader((tmp_path / "fit" / "metrics.csv").open()) if r["loss"]]
    first = np.mean([float(r["loss"]) for r in rows[:5]])
    last = np.mean([float(r["loss"]) for r in rows[-5:]])
    assert last < 0.7 * first


def test_bad_data_fails_before_training(tmp_path: Path, conic_folder: Path) -> None:
    with pytest.raises(ConicQPError, match="does not exist"):
        prepare_data(_config(tmp_path / "missing", tmp_path / "o"))
    with pytest.raises(ConicQPError, match="no training data"):
        prepare_data(load_config(None, ["data.train=[]"]))
    # Labels outside the class list.
    images, labels = synthetic_dataset(4, size=64, seed=2, n_classes=6)
    labels[0, labels[0, ..., 0] > 0, 1] = 9
    bad = tmp_path / "bad"
    save_conic_patches(bad, images, labels)
    with pytest.raises(ConicQPError, match="class"):
        prepare_data(_config(bad, tmp_path / "o2"))
    # Mismatched images / labels.
    mism = tmp_path / "mism"
    save_conic_patches(mism, images, labels)
    np.save(mism / "labels.npy", np.zeros((3, 64, 64, 2), np.int32))
    with pytest.raises(ConicQPError):
        prepare_data(_config(mism, tmp_path / "o3"))
    # An empty split.
    with pytest.raises(ConicQPError, match=r"split|centre"):
        prepare_data(_config(conic_folder, tmp_path / "o4", **{"data.split": "centre:nowhere"}))


def test_speed_knobs_train_the_same_network(conic_folder: Path, tmp_path: Path) -> None:
    # channels_last, bf16 autocast on CPU, a worker process and an explicit thread count change
    # how a step runs, not what is trained: the run completes with finite losses and its
    # checkpoint loads as an ordinary (contiguous, float) model.
    torch.set_num_threads(1)
    out = tmp_path / "knobs"
    cfg = _config(
        conic_folder,
        out,
        **{
            "channels_last": "true",
            "optim.bf16_cpu": "true",
            "threads": "1",
            "workers": "1",
            "optim.steps": "3",
            "validation.every": "3",
        },
    )
    sigchld = signal.getsignal(signal.SIGCHLD)
    result = train(cfg)
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["loss"]]
    assert result.steps == 3 and all(np.isfinite(float(r["loss"])) for r in rows)
    # the run leaves the process as it found it: no data worker left, SIGCHLD handled as before
    # (PyTorch's handler, left installed, crashed the test session at a later child's exit)
    assert not multiprocessing.active_children()
    assert signal.getsignal(signal.SIGCHLD) is sigchld
    best = load_checkpoint(out / "best")
    weights = [p for p in best.model.parameters() if p.ndim == 4]
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in weights)


def test_encoder_learning_rate_scale(conic_folder: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "lr"
    train(_config(conic_folder, out, **{"optim.encoder_lr_scale": "0.25", "optim.steps": "2"}))
    state = torch.load(out / "train_state.pt", weights_only=False)
    decoder, encoder = state["optimizer"]["param_groups"]
    assert encoder["lr"] == pytest.approx(0.25 * decoder["lr"])
    n_encoder = sum(1 for _ in load_checkpoint(out / "last").model.encoder.parameters())
    assert len(encoder["params"]) == n_encoder
    with pytest.raises(ConicQPError, match="encoder_lr_scale"):
        train(_config(conic_folder, tmp_path / "bad", **{"optim.encoder_lr_scale": "0"}))


def test_init_from_starts_at_a_checkpoints_weights(conic_folder: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    first = tmp_path / "first"
    train(_config(conic_folder, first, **{"optim.steps": "2"}))
    start = load_checkpoint(first / "last").model.state_dict()
    # a rate so small that the weights cannot move: what the second run holds is what it loaded
    tiny_lr = {"optim.steps": "1", "optim.lr": "1e-12", "optim.min_lr": "1e-13"}
    tuned = tmp_path / "tuned"
    train(_config(conic_folder, tuned, **{"model.init_from": str(first / "last"), **tiny_lr}))
    loaded = load_checkpoint(tuned / "last")
    assert loaded.training is not None and loaded.training["init_from"] == str(first / "last")
    convs = [k for k, v in start.items() if v.ndim == 4]
    assert len(convs) > 10
    moved = loaded.model.state_dict()
    assert all(torch.allclose(moved[k], start[k], atol=1e-6) for k in convs)
    fresh = tmp_path / "fresh"
    train(_config(conic_folder, fresh, **{"seed": "1", **tiny_lr}))
    other = load_checkpoint(fresh / "last").model.state_dict()
    assert not all(torch.allclose(other[k], start[k], atol=1e-6) for k in convs)


def test_init_from_must_match_the_network_and_classes(conic_folder: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    first = tmp_path / "first"
    train(_config(conic_folder, first, **{"optim.steps": "1"}))
    wider = {"model.init_from": str(first / "last"), "model.decoder_channels": "[64, 16, 16, 8, 8]"}
    with pytest.raises(ConicQPError, match="decoder channels"):
        train(_config(conic_folder, tmp_path / "wider", **wider))
    # the bundled model predicts the 4 CoNSeP classes, these tiles carry 6 CoNIC classes
    bundled = {
        "model.init_from": "bundled",
        "model.encoder": "tf_efficientnet_lite0",
        "model.decoder_channels": "[160, 96, 64, 32, 16]",
    }
    with pytest.raises(ConicQPError, match=r"data\.classes"):
        train(_config(conic_folder, tmp_path / "classes", **bundled))
    gone = {"model.init_from": str(tmp_path / "x")}
    with pytest.raises(ConicQPError, match="not a checkpoint folder"):
        train(_config(conic_folder, tmp_path / "gone", **gone))
    assert not (tmp_path / "gone").exists()  # refused before anything was written


def test_init_from_bundled_gives_every_weight_of_its_network() -> None:
    bundled = load_checkpoint(default_model_path() or "missing")
    state = initial_weights("bundled", bundled.config, bundled.classes)
    expected = bundled.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(v.dtype != torch.float16 for v in state.values())  # shipped fp16, trained fp32


def test_train_cli_passes_init_from_and_out_as_strings() -> None:
    res = CliRunner().invoke(
        main,
        ["train", "--init-from", "runs: 1/best", "--out", "7", "--steps", "12", "--print-config"],
    )
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["model"]["init_from"] == "runs: 1/best" and cfg["out"] == "7"
    assert cfg["optim"]["steps"] == 12
