"""Class 6 of the data-safety issue: locks and temporary files left by killed runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conic_qp.errors import LockedError
from conic_qp.locks import LockOwner, clean_stale_temps, hold_lock, process_start
from conic_qp.paths import host_tag, parse_temp_name, temp_path
from conic_qp.qupath.project import LOCK_FILE, project_lock, write_project

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def project(tmp_path: Path) -> Path:
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    return write_project(tmp_path / "p", [image]).parent


def test_lock_of_a_killed_run_is_taken_over(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL inside the lock (and inside an atomic write): the next run goes on, with a warning,
    and the dead run's temporary file is gone."""
    proc = _python(
        f"""
        import os, signal
        from conic_qp.qupath.project import project_lock
        from conic_qp.sinks import atomic_path
        with project_lock({str(project)!r}):
            with atomic_path({str(project / "classes.json")!r}) as tmp:
                tmp.write_text("half")
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert proc.wait(timeout=120) == -signal.SIGKILL
    lock = project / LOCK_FILE
    owner = LockOwner.parse(lock.read_text())
    assert owner is not None and owner.pid == proc.pid
    leftovers = [p for p in project.iterdir() if parse_temp_name(p.name)]
    assert len(leftovers) == 1 and parse_temp_name(leftovers[0].name).pid == proc.pid  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, logger="conic_qp.locks"):
        with project_lock(project):
            mine = LockOwner.parse(lock.read_text())
            assert mine is not None and mine.pid == os.getpid()
            assert not leftovers[0].exists()
    assert "dead conic-qp run" in caplog.text and f"pid {proc.pid}" in caplog.text
    assert not lock.exists()
    assert not (project / "classes.json").exists()  # the half-written file never landed


def test_lock_of_a_live_run_is_refused(project: Path) -> None:
    proc = _python(
        f"""
        import sys, time
        from conic_qp.qupath.project import project_lock
        with project_lock({str(project)!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """,
        stdin=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"another conic-qp run \(pid {proc.pid} on"):
            with project_lock(project):
                pass
    finally:
        proc.kill()
        proc.wait(timeout=60)
    with project_lock(project):  # the holder died: the lock is free again
        pass


def test_locks_this_host_cannot_check_are_kept(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "another-node", "since": "Mon"}))
    with pytest.raises(LockedError, match=r"another-node.*delete the lock if that run is dead"):
        with hold_lock(lock):
            pass
    assert LockOwner.parse(lock.read_text()).host == "another-node"  # type: ignore[union-attr]
    # the format of earlier conic-qp versions is understood, and its dead owner detected
    lock.write_text(f"pid={_dead_pid()} host={socket.gethostname()} since=Mon Jan 1\n")
    with hold_lock(lock) as me:
        assert me.pid == os.getpid()
    # a second holder in the same process is refused too (the OS lock is per open file)
    with hold_lock(lock), pytest.raises(LockedError):
        with hold_lock(lock):
            pass


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="no process start times here")
def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = tmp_path / "x.lock"
        fake = LockOwner(proc.pid, socket.gethostname(), "another-boot:1", "long ago")
        lock.write_text(json.dumps(fake.to_json()))
        with hold_lock(lock) as me:  # same pid, another process: the owner is dead
            assert me.pid == os.getpid()
        real = LockOwner(proc.pid, socket.gethostname(), process_start(proc.pid), "now")
        lock.write_text(json.dumps(real.to_json()))
        with pytest.raises(LockedError):  # a live process without the OS lock (e.g. NFS)
            with hold_lock(lock):
                pass
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_clean_stale_temps_removes_only_dead_runs_files(tmp_path: Path) -> None:
    dead, me = _dead_pid(), os.getpid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:

        def named(target: str, pid: int, kind: str = "tmp", host: str | None = None) -> Path:
            host = host or host_tag()
            return tmp_path / f".{target}.cqp-{pid}-{host}-abc123.{kind}"

        dead_file = named("s.nuclei.parquet", dead)
        dead_file.write_bytes(b"partial")
        dead_dir = named("s.labels.zarr", dead)
        (dead_dir / "0").mkdir(parents=True)
        (dead_dir / "0" / "chunk").write_bytes(b"x")
        live_file = named("t.nuclei.parquet", live.pid)
        live_file.write_bytes(b"being written")
        own_file = temp_path(tmp_path / "u.geojson.gz")
        own_file.write_bytes(b"mine")
        remote = named(
            "v.nuclei.parquet", dead, host="0123abcd" if host_tag() != "0123abcd" else "fedcba98"
        )
        remote.write_bytes(b"another node's")
        foreign = [
            tmp_path / ".s.nuclei.parquet.1234.tmp",
            tmp_path / "notes.tmp",
            tmp_path / "a.txt",
        ]
        for f in foreign:
            f.write_text("user")
        # a crash between the two renames of replace_dir: the old version is the only one left
        moved = named("w.labels.zarr", dead, "old")
        moved.mkdir()
        (moved / "keep").write_text("old labels")
        # ... or after them: the new version is in place, the old one is garbage
        (tmp_path / "z.labels.zarr").mkdir()
        garbage = named("z.labels.zarr", dead, "old")
        garbage.mkdir()
        link_target = tmp_path.parent / f"outside-{me}"
        link_target.mkdir(exist_ok=True)
        (link_target / "data").write_text("outside")
        dead_link = named("l.labels.zarr", dead)
        dead_link.symlink_to(link_target, target_is_directory=True)

        done = clean_stale_temps(tmp_path)

        assert set(done) == {dead_file, dead_dir, moved, garbage, dead_link}
        for kept in (live_file, own_file, remote, *foreign):
            assert kept.exists()
        assert (tmp_path / "w.labels.zarr" / "keep").read_text() == "old labels"
        assert (tmp_path / "z.labels.zarr").is_dir() and not garbage.exists()
        assert (link_target / "data").read_text() == "outside"  # a link is removed, not followed
    finally:
        live.kill()
        live.wait(timeout=60)
