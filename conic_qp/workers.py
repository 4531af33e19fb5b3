"""Worker processes that end with the run that started them.

A process pool's workers wait for tasks on a queue whose pipe they hold open themselves, so when
the main process is killed (SIGKILL, the out-of-memory killer, a closed terminal) they wait
forever, and with them the fork server and the resource tracker, which keep the caller's pipes
open. :func:`watch_parent` is an initializer for :class:`concurrent.futures.ProcessPoolExecutor`
(or any :mod:`multiprocessing` child): it starts a daemon thread that waits on the parent's
sentinel (a pipe multiprocessing gives every child; it reads end-of-file the moment the parent
dies, also when the child came from a fork server) and then ends the worker at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["ORPHAN_EXIT", "watch_parent"]

#: Exit status of a worker that ended because its parent died.
ORPHAN_EXIT = 70
_watching: int | None = None  # pid of the process whose watch thread runs (forks inherit this)


def _exit_orphan() -> None:
    os._exit(ORPHAN_EXIT)  # no clean-up: the run that wanted the results is gone


def _wait_sentinel(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    _exit_orphan()


def _poll_ppid(ppid: int, interval: float) -> None:
    while os.getppid() == ppid:
        time.sleep(interval)
    _exit_orphan()


def watch_parent(interval: float = 1.0) -> None:
    """End this process as soon as the process that started it dies.

    Pass it as ``initializer=`` to a process pool (or call it first thing in a worker). In a
    :mod:`multiprocessing` child it watches the parent's sentinel; in any other process it polls
    the parent pid every ``interval`` seconds. Idempotent per process.
    """
    global _watching
    if _watching == os.getpid():
        return
    parent = multiprocessing.parent_process()
    target: Callable[..., None]
    args: tuple[float, ...]
    if parent is not None:
        target, args = _wait_sentinel, (parent.sentinel,)
    else:
        target, args = _poll_ppid, (os.getppid(), interval)
    threading.Thread(target=target, args=args, name="conic-qp-parent-watch", daemon=True).start()
    _watching = os.getpid()
