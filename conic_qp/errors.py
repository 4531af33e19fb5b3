"""User-facing errors.

Every problem caused by bad input is raised as :class:`ConicQPError` with a one-line message that
says what is wrong and what to do. The CLI prints the message (no traceback) and exits non-zero.

Subclasses name the kinds of problem callers may want to treat differently (an output that
cannot be written, a path that would leave its folder, a slide without tissue); they never need
their message parsed.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "ConicQPError",
    "LockedError",
    "NoTissueError",
    "OutputError",
    "UnsafePathError",
    "describe_os_error",
]


class ConicQPError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as-is."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)


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
    cause, todo = _CAUSES.get(exc.errno or -1, (exc.strerror or str(exc) or type(exc).__name__, ""))
    if exc.errno == errno.ENOENT and action != "write":
        cause, todo = "no such file or folder", "check the path"
    subject = " ".join(part for part in (what, path) if part) or "a file"
    head = f"cannot {action} {subject}" if action else f"{subject}"
    return f"{head}: {cause}" + (f"; {todo}" if todo else "")
