"""Locks that survive a crash of their owner, and the clean-up of temporary files a dead run left.

A run that is killed (SIGKILL, power cut, out-of-memory killer) cannot remove its lock file or
its temporary files. Both record who made them, so a later run can tell a dead owner from a live
one instead of refusing forever or deleting a live run's work:

* :func:`hold_lock` writes the owner's pid, host, process start time and start date into the
  lock file and holds an OS lock (``flock``) on it while the run lives; the OS drops that lock
  when the process dies, whatever the cause. A later run that finds the file on the same host
  with the pid gone (or reused by a newer process) takes it over with a warning. A lock from
  another host is never taken over: its pid cannot be checked from here.
* :func:`clean_stale_temps` removes the ``.<name>.cqp-<pid>-<host>-*.tmp`` files and folders of
  :func:`conic_qp.paths.temp_path` whose run is dead (same host, pid gone), and puts back a
  ``.old`` folder that a crash left moved aside without its replacement. Nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conic_qp.errors import LockedError, OutputError
from conic_qp.paths import ensure_inside, host_tag, parse_temp_name

log = logging.getLogger(__name__)

__all__ = ["LockOwner", "clean_stale_temps", "hold_lock", "pid_alive", "process_start"]

_LEGACY = re.compile(r"pid=(?P<pid>\d+)\s+host=(?P<host>\S+)(?:\s+since=(?P<since>.*))?")


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    started: str | None = None
    since: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "started": self.started, "since": self.since}

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner recorded in a lock file (also the older ``pid=.. host=..`` format)."""
        text = text.strip()
        if not text:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            m = _LEGACY.search(text)
            if m is None:
                return None
            return cls(int(m["pid"]), m["host"], None, (m["since"] or "").strip())
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            return None
        started = data.get("started")
        return cls(
            data["pid"],
            str(data.get("host", "")),
            started if isinstance(started, str) else None,
            str(data.get("since", "")),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f", since {self.since}" if self.since else "")


def _me() -> LockOwner:
    return LockOwner(
        os.getpid(), socket.gethostname(), process_start(os.getpid()), time.strftime("%c")
    )


def process_start(pid: int) -> str | None:
    """An identifier of when process ``pid`` started (None when unknown): detects pid reuse.

    Linux: the boot id and the start time in clock ticks from ``/proc``; elsewhere psutil's
    creation time when psutil is installed.
    """
    try:
        stat_text = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = stat_text.rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"  # field 22 of stat; fields[0] is field 3
    except (OSError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time():.3f}"
    except Exception:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (zombies count as dead)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - no os.kill(pid, 0) semantics there
        try:
            import psutil
        except ImportError:
            return True  # cannot tell: assume alive, never take over
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_dead(owner: LockOwner) -> bool:
    """True only when ``owner`` certainly no longer runs: same host, pid gone or reused."""
    if owner.host != socket.gethostname():
        return False
    if not pid_alive(owner.pid):
        return True
    if owner.started is None:
        return False
    now = process_start(owner.pid)
    return now is not None and now != owner.started


def _try_os_lock(fd: int) -> bool:
    """Take the OS lock on ``fd`` without waiting; False when another process holds it."""
    if sys.platform == "win32":  # pragma: no cover - released by Windows when the owner dies
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _refuse(lock: Path, what: str, owner: LockOwner | None, hint: str) -> LockedError:
    who = owner.describe() if owner is not None else "an unknown run"
    return LockedError(f"another conic-qp run ({who}) is writing {what}; {hint} (lock: {lock})")


@contextlib.contextmanager
def hold_lock(lock: str | os.PathLike[str], *, what: str | None = None) -> Iterator[LockOwner]:
    """Hold ``lock`` (a file) for the block; refuse with :class:`LockedError` if a live run does.

    A lock left by a dead run on this host is taken over with a warning. ``what`` names the
    locked thing in messages (default: the lock's folder).
    """
    lock = Path(lock)
    label = what or str(lock.parent)
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError.from_os_error(exc, lock, what="lock file") from None
        if not _try_os_lock(fd):
            owner = LockOwner.parse(_read_fd(fd))
            os.close(fd)
            raise _refuse(lock, label, owner, "wait for it to finish")
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock
    else:  # pragma: no cover - only under a storm of competing runs
        raise LockedError(f"could not take the lock {lock}: other runs keep replacing it; retry")
    try:
        previous = LockOwner.parse(_read_fd(fd))
        if previous is not None:
            if not _owner_dead(previous):
                hint = (
                    "wait for it, or delete the lock if that run is dead"
                    if previous.host != socket.gethostname()
                    else "wait for it to finish"
                )
                raise _refuse(lock, label, previous, hint)
            log.warning(
                "took over the lock of %s left by a dead conic-qp run (%s)",
                label,
                previous.describe(),
            )
        me = _me()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me.to_json()) + "\n").encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield me
    finally:
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.unlink(lock)  # while still holding the OS lock, so nobody locks a ghost
        except OSError:
            pass
        os.close(fd)


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and folders dead runs on this host left in ``folder``.

    Only names made by :func:`conic_qp.paths.temp_path` count; a live run's (pid alive, or
    another host) are kept. A ``.old`` version whose replacement never arrived (the target is
    missing) is moved back instead of deleted. Returns what was removed or restored.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    mine = host_tag()
    done: list[Path] = []
    with os.scandir(root) as entries:
        names = [e.name for e in entries]
    for name in sorted(names):
        parsed = parse_temp_name(name)
        if parsed is None or parsed.host != mine or parsed.pid == os.getpid():
            continue
        if pid_alive(parsed.pid):
            continue
        path = ensure_inside(root, root / name, link_ok=True)
        target = root / parsed.target
        try:
            if parsed.kind == "old" and not os.path.lexists(target):
                os.replace(path, ensure_inside(root, target))
                log.warning("restored %s, which a crashed run had moved aside", target)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another run cleaned it first
        except OSError as exc:
            log.warning("could not remove %s left by a dead run: %s", path, exc)
            continue
        done.append(path)
    if done:
        log.info("removed %d temporary file(s) left by dead runs in %s", len(done), root)
    return done
