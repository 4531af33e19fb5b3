"""User-facing errors.

Every problem caused by bad input is raised as :class:`ConicQPError` with a one-line message that
says what is wrong and what to do. The CLI prints the message (no traceback) and exits non-zero.

Internal invariants (a caller broke a contract) raise ``ValueError``/``TypeError`` instead.

Subclasses name the kinds of problem callers may want to treat differently (an output that
cannot be written, a path that would leave its folder, a slide without tissue, a slide without a
usable um/px); they never need their message parsed.

Messages name settings, not command-line flags: a message built with :func:`option` reads
``pass mpp ...`` from the library and ``pass --mpp ...`` from the CLI, which renders the marks
with :meth:`ConicQPError.render` (or :func:`render` for a stored message).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable

__all__ = [
    "ConicQPError",
    "LockedError",
    "MppError",
    "NoTissueError",
    "OutputError",
    "UnsafePathError",
    "cli_flag",
    "describe_os_error",
    "option",
    "render",
]

_MARK = "\x1f"
_MARKED = re.compile(f"{_MARK}([^{_MARK}|]+)(?:\\|([^{_MARK}]*))?{_MARK}")


def option(name: str, flag: str | None = None) -> str:
    """Mark the setting ``name`` inside a message (``flag``: the CLI's spelling if not
    ``--name-with-dashes``), e.g. ``f"... pass {option('mpp')} with the scan's um/px"``."""
    if _MARK in name or "|" in name or (flag is not None and _MARK in flag):
        raise ValueError(f"invalid option name {name!r}")
    return f"{_MARK}{name}|{flag}{_MARK}" if flag else f"{_MARK}{name}{_MARK}"


def cli_flag(name: str, flag: str | None = None) -> str:
    """How the CLI spells a setting: the explicit ``flag``, else ``--`` + ``name`` with dashes."""
    return flag or "--" + name.replace("_", "-")


def render(message: str, flag: Callable[[str, str | None], str] | None = None) -> str:
    """A marked message as text: settings by their library name, or through ``flag``."""
    if flag is None:
        return _MARKED.sub(lambda m: m.group(1), message)
    return _MARKED.sub(lambda m: flag(m.group(1), m.group(2) or None), message)


class ConicQPError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as-is."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)

    @property
    def template(self) -> str:
        """The message with its settings marked (:func:`option`)."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return render(self.template)

    def render(self, flag: Callable[[str, str | None], str] | None = None) -> str:
        """The message with its settings spelled by ``flag`` (the CLI passes :func:`cli_flag`)."""
        return render(self.template, flag)


class OutputError(ConicQPError):
    """An output (file, folder, log file) cannot be written: disk full, read-only, no permission.

    Built from the :class:`OSError` with :meth:`from_os_error`, so every such failure reads the
    same way: the path, the cause in plain words and what to do. Exit code 1 (something failed),
    as for a failed slide, rather than 2 (bad input).
    """

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)

    @classmethod
    def from_os_error(
        cls,
        exc: OSError,
        path: str | os.PathLike[str] | None = None,
        what: str = "",
        action: str = "write",
    ) -> OutputError:
        """One line for ``exc``; ``path`` overrides the error's own file name (e.g. a temp file)."""
        target = os.fspath(path) if path is not None else _filename(exc)
        return cls(describe_os_error(exc, target, what=what, action=action), target)


class UnsafePathError(ConicQPError):
    """A path built from input data (an entry id, a slide or feature name) leaves its folder."""


class LockedError(ConicQPError):
    """Another live conic-qp run holds the lock on a folder or project."""


class MppError(ConicQPError):
    """A slide's level-0 um/px is missing or implausible and no override was given.

    Callers with another calibration (a QuPath project's pixel size) retry with it.
    """


class NoTissueError(ConicQPError):
    """Tissue detection found nothing to analyse (a blank or glass-only image).

    Batch callers record it as its own status ("no tissue", zero nuclei, empty outputs) rather
    than as a failure.
    """


#: errno -> (cause in plain words, what to do)
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free some space or write to another disk"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
    errno.EACCES: (
        "permission denied",
        "fix the folder's permissions or write to another folder",
    ),
    errno.EPERM: (
        "the operation is not permitted",
        "fix the folder's permissions or write to another folder",
    ),
    errno.ENOENT: ("its folder does not exist", "create the folder first or choose another path"),
    errno.ENOTDIR: (
        "a part of the path is a file, not a folder",
        "choose a path whose folders are folders",
    ),
    errno.EISDIR: ("it is a folder", "give a file name, not a folder"),
    errno.EEXIST: ("it already exists", "remove it or choose another name"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EFBIG: ("the file is too large for this file system", "write to another disk"),
    errno.EIO: ("an input/output error occurred", "check the disk or write to another one"),
    errno.EMFILE: ("too many files are open", "raise the open-file limit (ulimit -n) and retry"),
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _CAUSES[errno.EDQUOT] = ("the disk quota is exceeded", "free some space or write elsewhere")


def _filename(exc: OSError) -> str | None:
    name = exc.filename if exc.filename is not None else None
    return os.fsdecode(name) if isinstance(name, str | bytes) else None


def describe_os_error(
    exc: OSError, path: str | None = None, *, what: str = "", action: str = ""
) -> str:
    """``"cannot write PATH: the disk is full; free some space ..."`` for an :class:`OSError`.

    ``action`` (``"write"``, ``"read"``) and ``what`` (``"log file"``) make the line concrete;
    unknown errnos fall back to the system's own text.
    """
    path = path if path is not None else _filename(exc)
    code = exc.errno
    if code is None:  # pyarrow and zarr put the errno into the text only
        found = re.search(r"\[Errno (\d+)\]", str(exc))
        code = int(found.group(1)) if found else None
    cause, todo = _CAUSES.get(code or -1, (exc.strerror or str(exc) or type(exc).__name__, ""))
    if code == errno.ENOENT and action != "write":
        cause, todo = "no such file or folder", "check the path"
    subject = " ".join(part for part in (what, path) if part) or "a file"
    head = f"cannot {action} {subject}" if action else f"{subject}"
    return f"{head}: {cause}" + (f"; {todo}" if todo else "")
