from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conic_qp.checkpoint import save_checkpoint
from conic_qp.classes import CONIC
from conic_qp.cli import main
from conic_qp.errors import ConicQPError
from conic_qp.model import ConicNet, ModelConfig
from conic_qp.postprocess import PostprocessParams
from conic_qp.synthetic import synthetic_dataset
from conic_qp.targets import three_label_map
from conic_qp.train.data import save_conic_patches
from conic_qp.train.tune import TuneGrid, tune_thresholds, write_thresholds

GRID = TuneGrid(
    fg=(0.3, 0.5),
    seed=(0.4, 0.7),
    min_size=(0, 10),
    max_size=(None,),
    min_solidity=(0.0, 0.7),
    seed_dynamic=(),  # searched on its own in test_tuning_finds_the_seed_dynamic
    rounds=1,
)


def _weak_probabilities(
    labels: np.ndarray, n_classes: int, strength: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Probabilities that are right but unsure: interior probability only ``strength``."""
    out = []
    for lab in labels:
        tl = three_label_map(lab[..., 0])
        three = np.zeros((3, *tl.shape), np.float32)
        three[0] = np.where(tl == 0, 1.0, 1 - strength)
        three[1] = np.where(tl == 1, strength, 0.0)
        three[2] = np.where(tl == 2, strength, 0.0)
        three /= three.sum(0, keepdims=True)
        sem = np.zeros((n_classes + 1, *tl.shape), np.float32)
        for c in range(n_classes + 1):
            sem[c] = lab[..., 1] == c
        out.append((sem, three))
    return out


def test_tuning_finds_thresholds_that_detect_unsure_nuclei() -> None:
    _, labels = synthetic_dataset(3, size=64, seed=4, n_classes=3)
    probs = _weak_probabilities(labels, 3, strength=0.55)
    start = PostprocessParams.uniform(3, fg=0.5, seed=0.7, min_size=0, min_solidity=0.0)
    result = tune_thresholds(probs, labels, ["a", "b", "c"], task=1, grid=GRID, start=start)
    assert result.start_score < 0.2  # the default seed threshold finds nothing
    assert result.score > 0.8
    assert all(c.seed <= 0.55 for c in result.params.classes)
    r2 = tune_thresholds(probs, labels, ["a", "b", "c"], task=2, grid=GRID, start=start)
    assert r2.score >= r2.start_score


def test_tune_rejects_bad_input() -> None:
    _, labels = synthetic_dataset(2, size=64, seed=4, n_classes=3)
    probs = _weak_probabilities(labels, 3, 0.9)
    with pytest.raises(ConicQPError, match="task"):
        tune_thresholds(probs, labels, ["a", "b", "c"], task=3)
    with pytest.raises(ConicQPError, match="predictions"):
        tune_thresholds(probs[:1], labels, ["a", "b", "c"])


def test_tune_cli_writes_thresholds_into_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConicNet(ModelConfig("test_efficientnet", 6, decoder_channels=(32, 16, 16, 8, 8)))
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model, CONIC, 0.5, PostprocessParams.default(6).to_json()
    )
    images, labels = synthetic_dataset(2, size=64, seed=5, n_classes=6)
    data = tmp_path / "val"
    save_conic_patches(data, images, labels)
    res = CliRunner().invoke(
        main,
        [
            "tune",
            "--model",
            str(ckpt),
            "--data",
            f"conic:{data}",
            "--device",
            "cpu",
            "--task",
            "both",
        ],
    )
    assert res.exit_code == 0, res.output
    t1 = PostprocessParams.from_json(json.loads((ckpt / "thresholds.json").read_text()))
    t2 = PostprocessParams.from_json(json.loads((ckpt / "thresholds_task2.json").read_text()))
    assert t1.n_classes == 6 and t2.n_classes == 6
    assert (ckpt / "thresholds.json.bak").exists()
    bad = CliRunner().invoke(main, ["tune", "--model", str(ckpt), "--data", "nope"])
    assert bad.exit_code == 2 and "FORMAT:PATH" in bad.output
    # the paper's delineation, fixed: the search does not switch it
    for choice, per_class in (("per-class", True), ("across-classes", False)):
        out = tmp_path / f"{choice}.json"
        fixed = CliRunner().invoke(
            main,
            ["tune", "--model", str(ckpt), "--data", f"conic:{data}", "--device", "cpu",
             "--task", "1", "--watershed", choice, "--output", str(out)],
        )  # fmt: skip
        assert fixed.exit_code == 0, fixed.output
        assert PostprocessParams.from_json(json.loads(out.read_text())).per_class_watershed is (
            per_class
        )
    # the paper's seeds, fixed; and the Task 1 objective
    out = tmp_path / "paper.json"
    paper = CliRunner().invoke(
        main,
        ["tune", "--model", str(ckpt), "--data", f"conic:{data}", "--device", "cpu", "--task", "1",
         "--disable", "seed_dynamic", "--objective", "pq", "--output", str(out)],
    )  # fmt: skip
    assert paper.exit_code == 0, paper.output
    assert "1 (PQ)" in paper.output
    assert PostprocessParams.from_json(json.loads(out.read_text())).seed_dynamic == 0.0


def test_write_thresholds_refuses_non_checkpoint(tmp_path: Path) -> None:
    _, labels = synthetic_dataset(1, size=64, seed=4, n_classes=3)
    result = tune_thresholds(
        _weak_probabilities(labels, 3, 0.9), labels, ["a", "b", "c"], grid=GRID
    )
    with pytest.raises(ConicQPError, match="checkpoint"):
        write_thresholds(tmp_path, result)


def test_agnostic_ablation_tunes_the_shared_threshold() -> None:
    import dataclasses

    _, labels = synthetic_dataset(2, size=64, seed=4, n_classes=3)
    probs = _weak_probabilities(labels, 3, strength=0.55)
    start = dataclasses.replace(
        PostprocessParams.uniform(3, fg=0.5, seed=0.7, min_size=0, min_solidity=0.0),
        class_specific_seed=False,
        class_specific_fg=False,
    )
    result = tune_thresholds(probs, labels, ["a", "b", "c"], grid=GRID, start=start)
    assert result.params.agnostic_seed <= 0.55 and result.score > 0.8
    assert not result.params.class_specific_seed


def test_evaluate_cli_scores_a_checkpoint_on_labelled_tiles(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConicNet(ModelConfig("test_efficientnet", 6, decoder_channels=(32, 16, 16, 8, 8)))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, CONIC, 0.5)
    images, labels = synthetic_dataset(2, size=64, seed=6, n_classes=6)
    save_conic_patches(tmp_path / "d", images, labels)
    pred = tmp_path / "pred.npy"
    res = CliRunner().invoke(
        main,
        ["evaluate", "--model", str(ckpt), "--data", f"conic:{tmp_path / 'd'}", "--device", "cpu",
         "--json", "--save-pred", str(pred)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    scores = json.loads(res.stdout)
    assert set(scores) == {"pq", "mpq_plus", "pq_per_class", "r2", "r2_per_class"}
    saved, truth = np.load(pred), np.load(tmp_path / "pred.true.npy")
    assert saved.shape == truth.shape == (2, 64, 64, 2)
    assert np.array_equal(truth, labels)
    # The saved arrays give the same scores through the array path.
    again = CliRunner().invoke(
        main, ["evaluate", "--pred", str(pred), "--true", str(tmp_path / "pred.true.npy"), "--json"]
    )
    assert again.exit_code == 0 and json.loads(again.stdout) == scores
    both = CliRunner().invoke(main, ["evaluate", "--model", str(ckpt), "--pred", str(pred)])
    assert both.exit_code == 2 and "not both" in both.output
    zoomed = CliRunner().invoke(
        main,
        ["evaluate", "--model", str(ckpt), "--data", f"conic:{tmp_path / 'd'}", "--device", "cpu",
         "--json", "--zoom", "1.5"],
    )  # fmt: skip
    assert zoomed.exit_code == 0, zoomed.output
    assert set(json.loads(zoomed.stdout)) == set(scores)
    bad = CliRunner().invoke(
        main, ["evaluate", "--pred", str(pred), "--true", str(pred), "--zoom", "2"]
    )
    assert bad.exit_code == 2 and "go with --model" in bad.output


def test_min_gain_keeps_only_changes_that_raise_the_score_enough() -> None:
    _, labels = synthetic_dataset(3, size=64, seed=4, n_classes=3)
    probs = _weak_probabilities(labels, 3, strength=0.55)
    start = PostprocessParams.uniform(3, fg=0.5, seed=0.7, min_size=0, min_solidity=0.0)
    names = ["a", "b", "c"]
    per_class = dataclasses.replace(GRID, shared=False)  # many small steps, one per class
    free = tune_thresholds(probs, labels, names, grid=per_class, start=start)
    gains = np.diff([t["score"] for t in free.trace])
    assert len(gains) >= 2
    margin = float(np.sort(gains)[len(gains) // 2])  # half of the changes gain less than this
    strict = tune_thresholds(
        probs, labels, names, grid=dataclasses.replace(per_class, min_gain=margin), start=start
    )
    strict_gains = np.diff([t["score"] for t in strict.trace])
    assert len(strict_gains) >= 1 and np.all(strict_gains > margin)
    frozen = tune_thresholds(
        probs, labels, names, grid=dataclasses.replace(GRID, min_gain=1.0), start=start
    )
    assert frozen.params == start and frozen.score == frozen.start_score


def test_tuning_keeps_nuclei_whole_when_class_maps_split_them() -> None:
    # right, certain instance maps; class maps that give the right third of every nucleus
    # another class (an unsure network): the per-class watershed cuts every nucleus in two
    _, labels = synthetic_dataset(3, size=64, seed=4, n_classes=3)
    probs = []
    for lab in labels:
        sem, three = _weak_probabilities(lab[None], 3, strength=0.9)[0]
        cls = lab[..., 1].copy()
        cols = np.arange(lab.shape[1])[None, :].repeat(lab.shape[0], 0)
        for i in np.unique(lab[..., 0])[1:]:
            m = lab[..., 0] == i
            right = m & (cols > np.percentile(cols[m], 67))
            cls[right] = cls[m][0] % 3 + 1
        sem = np.stack([(cls == c).astype(np.float32) for c in range(4)])
        probs.append((sem, three))
    start = PostprocessParams.uniform(3, fg=0.5, seed=0.5, min_size=0, min_solidity=0.0)
    names = ["a", "b", "c"]
    tuned = tune_thresholds(probs, labels, names, grid=GRID, start=start)
    assert tuned.params.per_class_watershed is False
    assert any(t["step"] == "watershed" for t in tuned.trace)
    assert tuned.score > tuned.start_score + 0.1
    fixed = tune_thresholds(
        probs, labels, names, grid=dataclasses.replace(GRID, watershed=False), start=start
    )
    assert fixed.params.per_class_watershed is True and fixed.score < tuned.score


def test_shared_step_moves_every_class_in_one_change_that_passes_the_margin() -> None:
    # every class needs the same lower seed; per class each change gains a third of the total
    _, labels = synthetic_dataset(3, size=64, seed=4, n_classes=3)
    probs = _weak_probabilities(labels, 3, strength=0.55)
    start = PostprocessParams.uniform(3, fg=0.5, seed=0.7, min_size=0, min_solidity=0.0)
    names = ["a", "b", "c"]
    per_class = tune_thresholds(
        probs, labels, names, grid=dataclasses.replace(GRID, shared=False), start=start
    )
    step_gains = np.diff([t["score"] for t in per_class.trace])
    margin = float(step_gains.max()) + 0.01  # more than any single class's change gains
    strict = dataclasses.replace(GRID, min_gain=margin)
    shared = tune_thresholds(probs, labels, names, grid=strict, start=start)
    assert shared.trace[1]["step"] == "all classes fg/seed"
    assert all(c.seed <= 0.55 for c in shared.params.classes)
    assert shared.score > shared.start_score + margin
    alone = tune_thresholds(
        probs, labels, names, grid=dataclasses.replace(strict, shared=False), start=start
    )
    assert alone.params == start  # no single class gains the margin


def test_objective_chooses_the_task1_score() -> None:
    _, labels = synthetic_dataset(2, size=64, seed=4, n_classes=3)
    probs = _weak_probabilities(labels, 3, strength=0.55)
    start = PostprocessParams.uniform(3, fg=0.5, seed=0.5, min_size=0, min_solidity=0.0)
    names = ["a", "b", "c"]
    scores = {
        obj: tune_thresholds(
            probs,
            labels,
            names,
            grid=dataclasses.replace(GRID, objective=obj, rounds=0),
            start=start,
        ).start_score
        for obj in ("mpq+", "pq", "pq+mpq+")
    }
    # rounds=0: only the start is scored, so the three numbers are the three objectives
    assert scores["pq"] > 0.5 and scores["pq"] != scores["mpq+"]
    assert scores["pq+mpq+"] == pytest.approx((scores["pq"] + scores["mpq+"]) / 2)
    with pytest.raises(ConicQPError, match="objective"):
        TuneGrid(objective="aji")


def test_tuning_finds_the_seed_dynamic() -> None:
    # every nucleus's interior probability has two peaks: thresholded seeds cut it in two
    _, labels = synthetic_dataset(3, size=64, seed=4, n_classes=3)
    probs = []
    for sem, three in _weak_probabilities(labels, 3, strength=0.9):
        cols = np.arange(three.shape[2])[None, :]
        dip = 0.25 * (
            np.cos(cols * np.pi / 3) > 0.5
        )  # 0.9 -> 0.675 in stripes 2 px wide, 6 px apart: below the seed threshold 0.7
        interior = three[1] * (1 - dip)
        probs.append((sem, np.stack([three[0], interior, 1 - three[0] - interior])))
    start = PostprocessParams.uniform(3, fg=0.5, seed=0.7, min_size=0, min_solidity=0.0)
    grid = dataclasses.replace(GRID, seed_dynamic=(0.0, 0.3), shared=False, seed=(0.7,), fg=(0.5,))
    result = tune_thresholds(probs, labels, ["a", "b", "c"], grid=grid, start=start, task=1)
    assert result.params.seed_dynamic == 0.3
    assert result.trace[1]["step"] == "seed dynamic"
    assert result.score > result.start_score + 0.1
