"""Class 3 (no code execution from data files) and the file-reading half of class 10 (messages in
the user's terms) of the data-safety issue."""

from __future__ import annotations

import glob
import os
import pickle
import pickletools
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conic_qp.errors import ConicQPError
from conic_qp.inputs import describe_content, load_npy, load_pickled_arrays, read_json
from conic_qp.train.data import read_label_image, read_nucls


class _Gadget:
    """Unpickling this calls os.mkdir(marker): stands in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


class _Call:
    """Unpickling this calls ``func(*args)``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _crafted_labels(path: Path, marker: Path) -> Path:
    """A NuCLS-looking label file whose pickle runs code: a dict with the two keys."""
    payload = {"inst_map": _Gadget(marker), "type_map": np.zeros((4, 4), np.int32)}
    np.save(path, np.array(payload, dtype=object), allow_pickle=True)
    return path


def _raw_pickle_npy(path: Path, payload: bytes) -> Path:
    """An .npy of dtype object whose body is ``payload`` (a hand-made pickle)."""
    header = {"descr": "|O", "fortran_order": False, "shape": ()}
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(payload)
    return path


def test_crafted_pickle_does_not_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _crafted_labels(tmp_path / "evil.npy", marker)
    with pytest.raises(ConicQPError, match="nothing in it was run") as err:
        load_pickled_arrays(evil)
    assert "posix.mkdir" in str(err.value) or "nt.mkdir" in str(err.value)
    assert not marker.exists()
    # other ways in, in old and new pickle protocols, and a persistent reference
    gadgets = {
        "builtins.exec": pickle.dumps(_Call(exec, f"open({str(marker)!r}, 'w')"), protocol=0),
        "subprocess.Popen": pickle.dumps(_Call(subprocess.Popen, ["touch", str(marker)]), 4),
        "builtins.eval": pickle.dumps({"inst_map": _Call(eval, "1")}, protocol=2),
        "persistent reference": b"(P1\nt.",
    }
    for name, payload in gadgets.items():
        with pytest.raises(ConicQPError, match="not a pickle of plain arrays") as err:
            load_pickled_arrays(_raw_pickle_npy(tmp_path / f"{name}.npy", payload))
        assert name in str(err.value)
    assert not marker.exists()
    # the file is armed: numpy's own loader runs its code (why the reader must not use it)
    np.load(evil, allow_pickle=True)
    assert marker.is_dir()


def test_plain_pickled_arrays_still_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = {
        "inst_map": rng.integers(0, 5, (26, 28)).astype(np.int32),
        "type_map": rng.integers(0, 3, (26, 28)).astype(np.int32),
    }
    path = tmp_path / "labels.npy"
    np.save(path, np.array(labels, dtype=object), allow_pickle=True)
    ops = {op.name for op, _, _ in pickletools.genops(path.read_bytes()[128:])}
    assert "GLOBAL" in ops or "STACK_GLOBAL" in ops  # a real pickle, not a plain array
    got = load_pickled_arrays(path)
    assert set(got) == set(labels)
    for key, arr in labels.items():
        np.testing.assert_array_equal(got[key], arr)
        assert got[key].dtype == arr.dtype
    # object arrays nested in the dict are refused (they could hide anything)
    nested = tmp_path / "nested.npy"
    np.save(nested, np.array({"a": np.array([1, "x"], dtype=object)}, dtype=object))
    with pytest.raises(ConicQPError, match="array of Python objects"):
        load_pickled_arrays(nested)


def test_nucls_reader_refuses_crafted_labels(tmp_path: Path) -> None:
    folder = tmp_path / "nucls"
    (folder / "train" / "images").mkdir(parents=True)
    (folder / "train" / "labels").mkdir()
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6] = 1
    cls = (inst > 0).astype(np.int32)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / "train/images/a.png")
    label = folder / "train" / "labels" / "a.npy"
    np.save(label, np.array({"inst_map": inst, "type_map": cls}, dtype=object), allow_pickle=True)
    data = read_nucls(folder, splits=("train",))
    assert len(data) == 1 and data.class_maps is not None
    np.testing.assert_array_equal(data.class_maps[0], cls)
    marker = tmp_path / "pwned"
    _crafted_labels(label, marker)
    with pytest.raises(ConicQPError, match="NuCLS label file"):
        read_nucls(folder, splits=("train",))
    assert not marker.exists()


@pytest.mark.shared_data
def test_real_nucls_labels_load_without_pickle_execution(shared_data: Path) -> None:
    files = sorted(
        glob.glob(str(shared_data / "nucls" / "**" / "labels" / "*.npy"), recursive=True)
    )
    assert len(files) == 15
    for f in files:
        ours = load_pickled_arrays(f)
        theirs = np.load(f, allow_pickle=True).item()
        assert set(ours) == set(theirs) == {"inst_map", "type_map"}
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_load_npy_never_unpickles_and_names_the_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(load_npy(good, "labels"), np.arange(6).reshape(2, 3))
    marker = tmp_path / "pwned"
    cases = {
        "text.npy": (b"1 2 3\n4 5 6\n", "is text (it starts with '1 2 3 4 5 6')"),
        "empty.npy": (b"", "is an empty file (0 bytes)"),
        "html.npy": (b"<!DOCTYPE html><html>404</html>", "is an HTML page"),
        "binary.npy": (bytes(range(256)), "does not start with the .npy signature"),
        "cut.npy": (good.read_bytes()[:140], "is incomplete or damaged"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConicQPError, match="labels file") as err:
            load_npy(tmp_path / name, "labels")
        assert message in str(err.value), str(err.value)
        assert "allow_pickle" not in str(err.value) and "pickled" not in str(err.value)
    evil = _crafted_labels(tmp_path / "evil.npy", marker)
    with pytest.raises(ConicQPError, match=r"holds Python objects .* unpickling can run code"):
        load_npy(evil, "labels")
    with pytest.raises(ConicQPError, match="holds Python objects"):
        read_label_image(evil)
    assert not marker.exists()


def test_describe_content() -> None:
    assert describe_content(Path("/nonexistent/file")) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1 "b": 2}', "line 1, column 9: a comma is missing between two values"),
        ('{"a": 1,\n "b": 2,\n}', "line 3, column 1: a key is not in double quotes"),
        ('{"a": [1, 2,]}', "a value is missing"),
        ("{'a': 1}", "a key is not in double quotes"),
        ('{"a": "open}', "a string is not closed"),
        ('{"a": 1}{"b": 2}', "more text after the JSON value"),
        ('{"a": NaN}', "NaN is not a number in JSON"),
        ("", "is empty"),
        ("   \n", "is empty"),
    ],
)
def test_read_json_says_what_is_wrong(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConicQPError) as err:
        read_json(path, "thresholds file", "re-run conic-qp tune")
    message = str(err.value)
    assert expected in message and message.endswith("re-run conic-qp tune")
    assert str(path) in message and "\n" not in message


def test_read_json_encodings(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')  # a BOM from a Windows editor is fine
    assert read_json(path, "file", "fix it") == {"a": 1}
    path.write_bytes(b'{"name": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(ConicQPError, match=r"not UTF-8 text \(byte 0xe9 at offset 13\)"):
        read_json(path, "file", "fix it")
    with pytest.raises(ConicQPError, match="does not exist"):
        read_json(tmp_path / "missing.json", "file", "fix it")
    path.write_text('{"a": NaN}')
    assert np.isnan(read_json(path, "file", "fix it", allow_nan=True)["a"])
