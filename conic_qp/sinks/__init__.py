"""Result writers (QuPath GeoJSON, Parquet tables) and the atomic-write helpers they share.

Every file conic-qp writes goes to a temporary name in the destination folder first and is
renamed over the target with :func:`os.replace`, so a crash, a full disk or Ctrl-C never leaves a
half-written result (or a half-written user file) behind. Temporary names follow
:func:`conic_qp.paths.temp_path` (pid and host inside), so what a killed run leaves is found and
removed later by :func:`conic_qp.locks.clean_stale_temps`.

Given ``root`` (the output folder), every helper first proves with
:func:`conic_qp.paths.ensure_inside` that its target lies inside it, so a name taken from input
data can never write or delete elsewhere. Failures of the file system (disk full, read-only,
permission denied) surface as :class:`~conic_qp.errors.OutputError` naming the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from conic_qp.errors import OutputError
from conic_qp.paths import ensure_inside, temp_path, temp_prefix

__all__ = ["atomic_open", "atomic_path", "remove_inside", "replace_dir", "write_json_atomic"]

Root = str | os.PathLike[str] | None


def _checked(path: str | os.PathLike[str], root: Root) -> Path:
    return Path(path) if root is None else ensure_inside(root, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, root: Root = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder so the final :func:`os.replace` is atomic (same
    file system). On any exception the temporary file is removed and ``path`` is left untouched.
    The result keeps the permissions of the file it replaces (a new file gets 0666 minus the
    umask, like ``open``), not ``mkstemp``'s private 0600. With ``root``, ``path`` must lie
    inside that folder (:func:`conic_qp.paths.ensure_inside`).

    An :class:`OSError` from creating, filling (the block's writes to the temporary file) or
    renaming it becomes an :class:`~conic_qp.errors.OutputError` naming ``path``; other errors
    of the block pass through unchanged.
    """
    target = _checked(path, root)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=temp_prefix(target), suffix=".tmp"
        )
        os.close(fd)
    except OSError as exc:
        raise OutputError.from_os_error(exc, target) from exc
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename not in (None, tmp_name, str(tmp)):
                raise  # about another file (e.g. an input read inside the block)
            raise OutputError.from_os_error(exc, target) from exc
        try:
            os.chmod(tmp, _mode_for(target))
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError.from_os_error(exc, target) from exc
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
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, root: Root = None, **kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing and atomically replace ``path`` with it on success.

    The data are flushed and fsync'ed before the rename so that a power cut cannot leave an empty
    file under the final name. ``root``: as for :func:`atomic_path`.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing; got mode {mode!r}")
    with atomic_path(path, root=root) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, root: Root = None
) -> Path:
    """Write ``data`` as UTF-8 JSON to ``path`` atomically (QuPath reads JSON as UTF-8)."""
    with atomic_open(path, "w", root=root, encoding="utf-8") as fh:
        json.dump(data, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")
    return Path(path)


def replace_dir(tmp: Path, target: Path, *, root: Root = None) -> None:
    """Move a complete temporary folder onto ``target``, replacing an old one safely.

    The old folder is moved aside first (to a :func:`~conic_qp.paths.temp_path` ``.old`` name)
    and deleted only once the new one is in place; if the swap fails it is put back, so
    ``target`` always holds one complete version. A crash between the two renames leaves the old
    version under its ``.old`` name, which :func:`conic_qp.locks.clean_stale_temps` moves back.
    ``root``: as for :func:`atomic_path`.
    """
    target = _checked(target, root)
    try:
        if not target.exists():
            os.replace(tmp, target)
            return
        old = temp_path(target, "old")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
    except OSError as exc:
        raise OutputError.from_os_error(exc, target) from exc
    shutil.rmtree(old, ignore_errors=True)


def remove_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Delete the file, link or folder ``path`` after proving it lies inside ``root``.

    The one delete helper for outputs (stale results, leftovers): a name from input data can
    never make it remove something outside the output folder, nor the folder itself. A symbolic
    link is removed, never followed. Returns False when there was nothing to remove.
    """
    p = ensure_inside(root, path, link_ok=True)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError.from_os_error(exc, p, action="remove") from exc
    return True
