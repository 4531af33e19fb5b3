"""Result writers (QuPath GeoJSON, Parquet tables) and the atomic-write helpers they share.

Every file conic-qp writes goes to a temporary name in the destination folder first and is
renamed over the target with :func:`os.replace`, so a crash, a full disk or Ctrl-C never leaves a
half-written result (or a half-written user file) behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "replace_dir", "write_json_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder so the final :func:`os.replace` is atomic (same
    file system). On any exception the temporary file is removed and ``path`` is left untouched.
    The result keeps the permissions of the file it replaces (a new file gets 0666 minus the
    umask, like ``open``), not ``mkstemp``'s private 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing and atomically replace ``path`` with it on success.

    The data are flushed and fsync'ed before the rename so that a power cut cannot leave an empty
    file under the final name.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing; got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as UTF-8 JSON to ``path`` atomically (QuPath reads JSON as UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")
    return Path(path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a complete temporary folder onto ``target``, replacing an old one safely.

    The old folder is moved aside first and deleted only once the new one is in place; if the
    swap fails it is put back, so ``target`` always holds one complete version.
    """
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
