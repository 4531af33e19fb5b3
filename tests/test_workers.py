"""Class 7 of the data-safety issue: pool workers (and the fork server, the resource tracker)
must not outlive a main process that was killed."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent(
    """
    import json, multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import forkserver, resource_tracker
    from conic_qp.workers import watch_parent

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        if sys.argv[2] == "engine":  # the post-processing pool predict and annotate use
            from conic_qp.predict import make_executor

            pool = make_executor(2)
        else:
            init = watch_parent if sys.argv[2] == "watch" else None
            pool = ProcessPoolExecutor(2, mp_context=ctx, initializer=init)
        workers = sorted({f.result() for f in [pool.submit(os.getpid) for _ in range(8)]})
        helpers = [
            getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None),
        ]
        print(json.dumps({"workers": workers, "helpers": [p for p in helpers if p]}), flush=True)
        time.sleep(600)
    """
)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(script: Path, method: str, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, str(script), method, mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group: the clean-up reaches every child
    )
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, [*info["workers"], *info["helpers"]]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see processes")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_exit_when_the_main_process_is_killed(tmp_path: Path, method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    watched, watched_pids = _start(script, method, "watch")
    control, control_pids = _start(script, method, "none")  # today's behaviour, for contrast
    try:
        assert watched_pids and all(_running(p) for p in watched_pids)
        for proc in (watched, control):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # a bound on waiting, not a speed requirement
        while any(_running(p) for p in watched_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in watched_pids if _running(p)], "orphans survived their parent"
        # without the watch, the workers of the killed control run are still there
        assert any(_running(p) for p in control_pids)
    finally:
        _kill_groups(watched, control)


def _kill_groups(*procs: subprocess.Popen[str]) -> None:
    """End every process a test run started, also workers it never reported (a pool starts
    them on demand), so no orphan outlives the test: each parent leads its own group."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see processes")
def test_the_post_processing_pool_ends_with_a_killed_run(tmp_path: Path) -> None:
    """predict's and annotate's pool (``make_executor``) watches its parent."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver start method here")
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc, pids = _start(script, "forkserver", "engine")
    try:
        assert pids and all(_running(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # a bound on waiting, not a speed requirement
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _running(p)], "orphans survived their parent"
    finally:
        _kill_groups(proc)
