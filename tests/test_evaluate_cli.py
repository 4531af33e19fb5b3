"""``conic-qp evaluate``: output formats and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conic_qp.classes import CONIC
from conic_qp.cli import main
from conic_qp.metrics import evaluate


def make_labels() -> tuple[np.ndarray, np.ndarray]:
    """Three 40x40 images; the prediction misses one nucleus and shrinks another."""
    true = np.zeros((3, 40, 40, 2), np.int32)
    true[0, 5:15, 5:15] = (1, 2)
    true[0, 18:26, 18:26] = (2, 3)
    true[1, 10:20, 20:30] = (4, 1)
    true[2, 16:24, 16:24] = (9, 6)
    true[2, 30:38, 2:10] = (3, 2)
    pred = true.copy()
    pred[0, 18:26, 18:26] = 0
    pred[1, 10:13, 20:30] = 0
    return pred, true


def write(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, arr)
    return path


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["evaluate", *args])


def test_json_output(tmp_path: Path) -> None:
    pred, true = make_labels()
    p, t = write(tmp_path, "pred.npy", pred), write(tmp_path, "true.npy", true)
    res = invoke("--pred", str(p), "--true", str(t), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # stdout holds the JSON object and nothing else
    assert set(data) == {"pq", "mpq_plus", "pq_per_class", "r2", "r2_per_class"}
    assert list(data["pq_per_class"]) == CONIC.names
    assert list(data["r2_per_class"]) == CONIC.names
    expected = evaluate(pred, true).to_json()
    assert data == expected
    assert 0 < data["pq"] < 1
    assert data["pq_per_class"]["plasma"] == 0.0  # absent everywhere
    assert data["pq_per_class"]["epithelial"] == pytest.approx(1.0, abs=1e-5)
    assert data["pq_per_class"]["lymphocyte"] == 0.0  # its only nucleus is missed


def test_custom_classes(tmp_path: Path) -> None:
    pred, true = make_labels()
    pred[..., 1] = np.minimum(pred[..., 1], 2)
    true[..., 1] = np.minimum(true[..., 1], 2)
    p, t = write(tmp_path, "pred.npy", pred), write(tmp_path, "true.npy", true)
    res = invoke("--pred", str(p), "--true", str(t), "--json", "--classes", "tumour, stroma")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert list(data["pq_per_class"]) == ["tumour", "stroma"]
    assert data == evaluate(pred, true, ["tumour", "stroma"]).to_json()


def test_table_output_names_classes(tmp_path: Path) -> None:
    pred, true = make_labels()
    p, t = write(tmp_path, "pred.npy", pred), write(tmp_path, "true.npy", true)
    res = invoke("--pred", str(p), "--true", str(t))
    assert res.exit_code == 0, res.output
    for name in [*CONIC.names, "mPQ+", "PQ", "R2"]:
        assert name in res.stdout
    expected = evaluate(pred, true)
    assert f"{expected.mpq_plus:.4f}" in res.stdout


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    pred, true = make_labels()
    t = write(tmp_path, "true.npy", true)
    cases: dict[str, tuple[np.ndarray | None, str]] = {}
    cases["ndim"] = (pred[..., 0], "expected (N, H, W, 2)")
    cases["lastdim"] = (np.concatenate([pred, pred[..., :1]], axis=-1), "expected (N, H, W, 2)")
    cases["float"] = (pred.astype(np.float32), "float dtype")
    nan = pred.astype(np.float64)
    nan[1, 3, 3, 0] = np.nan
    cases["nan"] = (nan, "NaN")
    cases["bool"] = (pred > 0, "non-integer dtype")
    neg = pred.copy()
    neg[0, 0, 0, 0] = -1
    cases["negative_inst"] = (neg, "negative instance ids")
    negc = pred.copy()
    negc[0, 0, 0, 1] = -3
    cases["negative_class"] = (negc, "negative class ids")
    big = pred.copy()
    big[2, 16:24, 16:24, 1] = 7
    cases["class_range"] = (big, "class id 7 but only 6 classes")
    cases["n_mismatch"] = (pred[:2], "2 images but truth has 3")
    cases["hw_mismatch"] = (pred[:, :32], "32x40 px but truth images are 40x40")
    mixed = pred.copy()
    mixed[1, 15:20, 20:30, 1] = 4
    cases["mixed_class"] = (mixed, "image 1 instance 4 carries several class ids [1, 4]")
    out: dict[str, tuple[list[str], str]] = {}
    for key, (arr, msg) in cases.items():
        p = write(tmp_path, f"{key}.npy", arr)
        out[key] = (["--pred", str(p), "--true", str(t)], msg)
    out["missing"] = (["--pred", str(tmp_path / "nope.npy"), "--true", str(t)], "does not exist")
    txt = tmp_path / "labels.txt"
    txt.write_text("1 2 3")
    out["not_npy"] = (["--pred", str(txt), "--true", str(t)], "is not a .npy file")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array")
    out["unreadable"] = (
        ["--pred", str(junk), "--true", str(t)],
        "is text (it starts with 'not an array'), not a NumPy .npy array",
    )
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out["pickled"] = (["--pred", str(obj), "--true", str(t)], "holds Python objects")
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    out["empty"] = (["--pred", str(empty), "--true", str(t)], "is an empty file (0 bytes)")
    cut = tmp_path / "cut.npy"
    cut.write_bytes(write(tmp_path, "full.npy", pred).read_bytes()[:200])
    out["incomplete"] = (["--pred", str(cut), "--true", str(t)], "is incomplete or damaged")
    good = write(tmp_path, "good.npy", pred)
    bad_true = true.copy()
    bad_true[0, 0, 0, 0] = -2
    out["bad_truth"] = (
        ["--pred", str(good), "--true", str(write(tmp_path, "bt.npy", bad_true))],
        "truth labels have negative instance ids",
    )
    out["classes_too_few"] = (
        ["--pred", str(good), "--true", str(t), "--classes", "a,b"],
        "class id 6 but only 2 classes",
    )
    out["classes_empty"] = (
        ["--pred", str(good), "--true", str(t), "--classes", "a,,b"],
        "empty name",
    )
    out["classes_dup"] = (
        ["--pred", str(good), "--true", str(t), "--classes", "a,a,b,c,d,e"],
        "duplicate",
    )
    return out


BAD = [
    "ndim", "lastdim", "float", "nan", "bool", "negative_inst", "negative_class", "class_range",
    "n_mismatch", "hw_mismatch", "mixed_class", "missing", "not_npy", "unreadable", "pickled",
    "empty", "incomplete", "bad_truth", "classes_too_few", "classes_empty", "classes_dup",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    args, message = _bad_cases(tmp_path)[case]
    res = invoke(*args, "--json")
    assert res.exit_code == 2, res.output
    assert res.stdout == ""  # nothing half-printed where the JSON would go
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:")
    assert message in lines[0]
    assert "Traceback" not in res.output
