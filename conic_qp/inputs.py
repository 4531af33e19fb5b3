"""Read users' data files without running code, and say in their terms what is wrong with one.

* :func:`load_npy` reads ``.npy`` arrays with pickle switched off: an ``.npy`` that holds Python
  objects is refused (unpickling can run arbitrary code), and a file that is no ``.npy`` at all
  (text, an empty file, an incomplete copy) is called what it is.
* :func:`load_pickled_arrays` reads the one pickled format conic-qp must accept, the NuCLS
  ``labels/*.npy`` (a pickled dict of integer arrays), with an unpickler that can only build
  numpy arrays and dtypes; anything else in the pickle stops it before it runs.
* :func:`read_json` gives JSON mistakes as "line 3, column 7: a comma is missing ..." plus the
  offending line, instead of the decoder's bare position.
* :func:`describe_content` recognises empty files, text and HTML pages where a binary file was
  expected; the slide, table and array readers use it for their messages.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conic_qp.errors import ConicQPError

log = logging.getLogger(__name__)

__all__ = ["describe_content", "load_npy", "load_pickled_arrays", "read_json"]

_NPY_MAGIC = b"\x93NUMPY"


def _head(path: Path, n: int = 512) -> bytes:
    with path.open("rb") as fh:
        return fh.read(n)


def describe_content(path: str | os.PathLike[str]) -> str | None:
    """``"an empty file (0 bytes)"`` / ``"text (it starts with '...')"``, else None.

    Recognises what users most often hand over by mistake instead of a binary data file: a
    zero-byte file from a failed copy, an HTML error page saved by a failed download, a text
    file renamed to ``.tif`` or ``.npy``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        head = _head(p)
    except OSError:
        return None
    if size == 0:
        return "an empty file (0 bytes)"
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return None
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    if not text or printable < 0.95 * len(text):
        return None
    first = " ".join(text.split())[:40]
    kind = "an HTML page" if first.lower().startswith(("<!doctype html", "<html")) else "text"
    return f"{kind} (it starts with {first!r})"


def _not_npy(p: Path, what: str) -> ConicQPError:
    content = describe_content(p)
    if content is not None:
        return ConicQPError(
            f"{what} file {p} is {content}, not a NumPy .npy array; save the array with numpy.save"
        )
    return ConicQPError(
        f"{what} file {p} is not a NumPy .npy array (it does not start with the .npy "
        "signature); save the array with numpy.save"
    )


def load_npy(
    path: str | os.PathLike[str], what: str = "array", *, mmap_mode: Any = None
) -> np.ndarray:
    """Load one ``.npy`` array without pickle; one-line :class:`ConicQPError` for bad files.

    Refuses arrays of Python objects (pickled data) outright: loading them could run code.
    ``mmap_mode`` as for :func:`numpy.load` (``"r"`` maps large files instead of reading them).
    """
    p = Path(path)
    try:
        head = _head(p, 8)
    except FileNotFoundError:
        raise ConicQPError(f"{what} file {p} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConicQPError(f"{what} file {p} is a folder; pass the .npy file itself") from None
    except OSError as exc:
        raise ConicQPError(f"cannot read {what} file {p}: {exc.strerror or exc}") from None
    if not head.startswith(_NPY_MAGIC):
        raise _not_npy(p, what)
    try:
        with p.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            dtype = _header_dtype(fh, version)
    except (ValueError, OSError, EOFError) as exc:
        raise ConicQPError(
            f"{what} file {p} has a damaged .npy header ({exc}); save the array again"
        ) from None
    if dtype.hasobject:
        raise ConicQPError(
            f"{what} file {p} holds Python objects (pickled data), which conic-qp does not load "
            "because unpickling can run code; save a plain numeric array (numpy.save of an "
            "integer or float array)"
        )
    try:
        arr = np.load(p, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        size = p.stat().st_size
        raise ConicQPError(
            f"{what} file {p} is incomplete or damaged ({size} bytes; {str(exc)[:120]}); copy "
            "it again or save the array again"
        ) from None
    if not isinstance(arr, np.ndarray):  # pragma: no cover - .npy files hold one array
        raise ConicQPError(f"{what} file {p} does not hold a single array")
    return arr


def _header_dtype(fh: Any, version: tuple[int, int]) -> np.dtype[Any]:
    if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        _, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return np.dtype(dtype)


# ------------------------------------------------------------------------- restricted pickle

#: The only globals a pickled numpy array needs (numpy 1.x and 2.x module names).
_ARRAY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds builtin containers and numpy arrays only; any other global is refused unrun."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent reference")


def _check_arrays(value: Any, where: str) -> None:
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise pickle.UnpicklingError(f"{where} is an array of Python objects")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"{where} has a non-text key {k!r}")
            _check_arrays(v, f"{where}[{k!r}]")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_arrays(v, f"{where}[{i}]")
        return
    if value is None or isinstance(value, bool | int | float | str):
        return
    raise pickle.UnpicklingError(f"{where} is a {type(value).__name__}")


def load_pickled_arrays(path: str | os.PathLike[str], what: str = "label file") -> Any:
    """Load a pickled ``.npy`` (an object array wrapping e.g. a dict of arrays) safely.

    The pickle may only contain numpy arrays (of numbers), dicts, lists, tuples, numbers and
    text: :class:`pickle.Unpickler` is restricted to the globals that rebuild numpy arrays, so
    a crafted file cannot import or call anything else. Returns the wrapped object (what
    ``np.load(path, allow_pickle=True).item()`` would give for a 0-d array).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            if fh.read(6) != _NPY_MAGIC:
                raise _not_npy(p, what)
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            if not np.dtype(dtype).hasobject:  # a plain array: no pickle involved
                return load_npy(p, what)
            obj = _ArrayUnpickler(fh).load()
    except FileNotFoundError:
        raise ConicQPError(f"{what} {p} does not exist; check the path") from None
    except ConicQPError:
        raise
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, AttributeError) as exc:
        raise ConicQPError(
            f"{what} {p} is not a pickle of plain arrays ({exc}); conic-qp reads only numpy "
            "arrays, dicts and lists from pickled files, so nothing in it was run"
        ) from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        if shape != () and obj.size != 1:
            raise ConicQPError(f"{what} {p} holds {obj.size} objects; expected one")
        obj = obj.reshape(()).item() if obj.size == 1 else obj
    try:
        _check_arrays(obj, "the content")
    except pickle.UnpicklingError as exc:
        raise ConicQPError(f"{what} {p}: {exc}; expected arrays of numbers") from None
    return obj


# ------------------------------------------------------------------------------------ JSON


def _json_hint(msg: str) -> str:
    hints = {
        "Expecting ',' delimiter": "a comma is missing between two values",
        "Expecting ':' delimiter": "a colon is missing after a key",
        "Expecting property name enclosed in double quotes": (
            "a key is not in double quotes, or a trailing comma precedes '}'"
        ),
        "Expecting value": "a value is missing (a trailing comma, or text that is not JSON)",
        "Unterminated string starting at": "a string is not closed with a double quote",
        "Invalid control character at": "a string contains a raw line break or tab",
        "Extra data": "there is more text after the JSON value (two objects in one file?)",
        "Invalid \\escape": "a backslash in a string is not a valid escape (use / or \\\\)",
    }
    for key, hint in hints.items():
        if msg.startswith(key):
            return hint
    return msg


def read_json(path: str | os.PathLike[str], what: str, fix: str, *, allow_nan: bool = False) -> Any:
    """Parse the JSON file ``path``; any problem is one line naming ``what`` and ``fix``.

    ``fix`` says what to do (e.g. ``"re-run conic-qp tune or restore the file"``). Says in
    words what is wrong: missing file, empty file, not UTF-8, which JSON mistake on which line
    (with the line's text), NaN/Infinity (refused unless ``allow_nan``: QuPath's own files may
    hold them, thresholds must not).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConicQPError(f"{what} {p} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConicQPError(f"{what} {p} is a folder; pass the JSON file itself") from None
    except OSError as exc:
        raise ConicQPError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ConicQPError(f"{what} {p} is empty (an interrupted save or copy?); {fix}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConicQPError(
            f"{what} {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            f"it is damaged, or not a JSON file; {fix}"
        ) from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a number in JSON")

    try:
        return json.loads(text, parse_constant=None if allow_nan else no_constants)
    except json.JSONDecodeError as exc:
        lines = text.splitlines()
        line = lines[exc.lineno - 1].strip() if 0 < exc.lineno <= len(lines) else ""
        shown = f" in {line[:60]!r}" if line else ""
        raise ConicQPError(
            f"{what} {p} is not valid JSON: line {exc.lineno}, column {exc.colno}: "
            f"{_json_hint(exc.msg)}{shown}; {fix}"
        ) from None
    except ValueError as exc:
        raise ConicQPError(f"{what} {p} is not valid JSON: {exc}; {fix}") from None
