"""`conic-qp omero ...` command line: bad input and refused logins give one line, exit 2, and
never show a password or session key (stderr and the debug log are searched for planted ones)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from conic_qp.cli import main

PASSWORD = "planted-Pa55word-7c1e"
KEY = "0c7d6a5e-planted-session-key-91b2"


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("OMERO_HOST", "OMERO_PORT", "OMERO_USER", "OMERO_PASSWORD", "OMERO_SESSION_KEY",
                "OMERO_GROUP"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMERO_SESSIONDIR", str(tmp_path / "no-sessions"))
    return tmp_path


def _invoke(args: list[str], env_vars: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(main, args, env=env_vars or {}, catch_exceptions=False)
    return res.exit_code, res.output


def test_help_lists_the_commands() -> None:
    code, out = _invoke(["omero", "--help"])
    assert code == 0 and "predict" in out and "composition" in out
    code, out = _invoke(["omero", "predict", "--help"])
    assert code == 0 and "--max-rois" in out and "--replace / --keep" in out
    assert "--cluster" in out and "--se-window" in out  # predict's engine options apply
    assert "--password" not in out  # passwords are never options


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["omero", "predict", "-o", "OUT"], "no OMERO image given"),
        (["omero", "predict", "-o", "OUT", "--image", "12"], "no OMERO login found"),
        (["omero", "predict", "-o", "OUT", "--image", "x1"], "names no OMERO image"),
        (["omero", "predict", "-o", "OUT", "--dataset", "omero://h/image/3"], "not a dataset"),
        (["omero", "predict", "-o", "OUT", "--image", "3", "--write", "table,cells"], "unknown"),
        (["omero", "predict", "-o", "OUT", "--image", "3", "--write", "rois"], "--max-rois"),
        (["omero", "predict", "-o", "OUT", "--image", "3", "--mpp", "50"], "--force-mpp"),
        (["omero", "predict", "-o", "OUT", "omero://a/image/1", "omero://b/image/2"], "several servers"),
        (["omero", "composition", "-o", "t.csv", "--image", "4"], "no OMERO login found"),
        (["omero", "predict", "-o", "OUT", "--image", "3", "--cluster", "nowhere"], "--cluster"),
        (["omero", "predict", "-o", "OUT", "--image", "3", "--cluster", "slurm"], "--cluster-config"),
        (["omero", "predict", "-o", "OUT", "--image", "3", "--cluster-config", "c.yaml"], "needs --cluster"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(env: Path, args: list[str], words: str) -> None:
    code, out = _invoke([a.replace("OUT", str(env / "out")) for a in args])
    assert code == 2
    assert words in out and out.count("error:") == 1
    assert not (env / "out").exists()  # nothing written


@pytest.mark.omero
def test_refused_login_never_shows_secrets(env: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens
    log = env / "debug.log"
    base = ["-vv", "--log-file", str(log), "omero", "predict", "-o", str(env / "out"),
            "--image", "12", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    code, out = _invoke(base, {"OMERO_USER": "ana", "OMERO_PASSWORD": PASSWORD})
    assert code == 2 and "connection refused" in out and f"127.0.0.1:{port}" in out
    code2, out2 = _invoke([*base, "--session-key", KEY])
    assert code2 == 2 and "connection refused" in out2
    text = out + out2 + log.read_text()
    assert PASSWORD not in text and KEY not in text
    assert not (env / "out").exists()
