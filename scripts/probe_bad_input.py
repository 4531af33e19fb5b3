"""Probe the CLI as a careless user and a hostile input would (SPEC section 9, issue 14).

Every case runs one ``conic-qp`` command in its own sandbox folder (also the working directory)
and checks that

* the exit code is the documented one (0 done, 1 something failed, 2 bad input);
* a failing command prints exactly one ``error:`` line, and never a traceback;
* the output says what the case expects (the cause in the user's terms, the next step);
* nothing outside the folders the command may write changed: every other file under the
  sandbox is byte for byte as before (no file created, replaced or deleted there).

Usage, from the repository root: ``python scripts/probe_bad_input.py [-k SUBSTRING] [-v]``.
Prints one line per case and a summary; exit code 1 when a case does not behave. Inputs are
tiny synthetic slides and a tiny random-init checkpoint (``tests/helpers_*``), so the probe runs
in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from conic_qp.cli import main  # noqa: E402
from conic_qp.paths import host_tag  # noqa: E402
from conic_qp.qupath.project import write_project  # noqa: E402
from conic_qp.synthetic import synthetic_slide_image  # noqa: E402
from tests.helpers_models import make_tiny_checkpoint  # noqa: E402
from tests.helpers_slides import write_pyramidal_tiff  # noqa: E402

torch.set_num_threads(1)

FAST = ["--tta", "1", "--no-mc-dropout", "--device", "cpu", "--workers", "0"]
TILES = ["--tile-size", "128", "--overlap", "64", "--batch-size", "2"]


@dataclass
class Case:
    """One hostile command: ``make(sandbox)`` prepares inputs and returns the arguments."""

    name: str
    make: Callable[[Path], list[str]]
    code: int
    says: tuple[str, ...] = ()
    #: sandbox-relative paths the command may change (outputs); everything else must not
    writable: tuple[str, ...] = ("out",)
    #: extra check after the run: returns a problem, or None
    check: Callable[[Path, str], str | None] | None = None
    #: a failure is one error line (False: a batch's summary lists what failed)
    one_line: bool = True
    cleanup: list[Callable[[], None]] = field(default_factory=list)


# ------------------------------------------------------------------------------- inputs


class Shared:
    """Inputs built once: slides, a checkpoint, a QuPath project template."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ckpt = make_tiny_checkpoint(root / "ckpt" / "tiny")
        (root / "slides").mkdir(parents=True)
        img = synthetic_slide_image(192, 224, seed=1, tissue_fraction=0.7).image
        self.slide = write_pyramidal_tiff(root / "slides" / "a.tif", img, mpp=0.5, levels=1)
        blank = np.full((192, 192, 3), 245, np.uint8)
        self.blank = write_pyramidal_tiff(root / "slides" / "glass.tif", blank, mpp=0.5)

    def model(self) -> list[str]:
        return ["--model", str(self.ckpt), *FAST]


S: Shared  # set in main()


def slide_copy(box: Path, name: str = "a.tif", src: Path | None = None) -> Path:
    dst = box / "in" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src or S.slide, dst)
    return dst


def write(box: Path, rel: str, data: bytes | str) -> Path:
    p = box / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        p.write_text(data, encoding="utf-8")
    else:
        p.write_bytes(data)
    return p


def predict(
    box: Path, *extra: str, slides: list[Path] | None = None, quiet: bool = True
) -> list[str]:
    inputs = [str(s) for s in (slides if slides is not None else [slide_copy(box)])]
    q = ["-q"] if quiet else []
    return ["predict", *inputs, "-o", str(box / "out"), *S.model(), *TILES, *q, *extra]


def project(box: Path, n: int = 1) -> Path:
    slides = [slide_copy(box, f"s{i}.tif") for i in range(n)]
    return write_project(box / "out" / "proj", slides)


def annotate(box: Path, file: Path, *extra: str) -> list[str]:
    return ["annotate", str(file), "--model", str(S.ckpt), "--tta", "1", "--device", "cpu",
            "--workers", "0", "--backend", "geojson", "--tile-size", "512", *extra]  # fmt: skip


def edit_project(file: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def fc(coords: list) -> str:
    return json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "r1", "geometry": {"type": "Polygon", "coordinates": [coords]},
        "properties": {"objectType": "annotation", "name": "T1"}}]})  # fmt: skip


NAN_RING = [[0, 0], [float("nan"), 0], [50, 50], [0, 0]]


def predictions(box: Path) -> Path:
    """A folder of predict outputs (made by a real run)."""
    pred = box / "in" / "pred"
    res = CliRunner().invoke(main, ["predict", str(S.slide), "-o", str(pred), *S.model(),
                                    *TILES, "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return pred


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def read_only(case: Case, path: Path) -> None:
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    case.cleanup.append(lambda: [os.chmod(p, m) for p, m in modes.items()])  # type: ignore[func-returns-value]


class RunsCode:
    """Pickles to ``open(path, 'w')``: what a crafted data file would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------- checks


def outputs_of(box: Path) -> list[str]:
    return sorted(p.name for p in (box / "out").glob("*.nuclei.parquet"))


def n_tables(n: int) -> Callable[[Path, str], str | None]:
    def check(box: Path, _: str) -> str | None:
        got = outputs_of(box)
        return None if len(got) == n else f"expected {n} result tables, found {got}"

    return check


def absent(rel: str) -> Callable[[Path, str], str | None]:
    def check(box: Path, _: str) -> str | None:
        return f"{rel} exists" if (box / rel).exists() else None

    return check


def unchanged_project(box: Path, _: str) -> str | None:
    proj = box / "out" / "proj"
    extra = [p.name for p in proj.iterdir() if p.name not in ("project.qpproj", "classifiers")]
    return f"the project gained {extra}" if extra else None


# -------------------------------------------------------------------------------- cases


def cases() -> list[Case]:
    out: list[Case] = []

    def add(name: str, make: Callable[[Path], list[str]], code: int, *says: str, **kw) -> Case:  # type: ignore[no-untyped-def]
        c = Case(name, make, code, says, **kw)
        out.append(c)
        return c

    # --- slides that are not what their name says (exit 1: the slide fails, the batch goes on)
    add("zero-byte .tif", lambda b: predict(b, slides=[write(b, "in/z.tif", b"")]), 1, "empty file")
    add(
        "text named .tif",
        lambda b: predict(b, slides=[write(b, "in/t.tif", "hello\n" * 9)]),
        1,
        "not an image",
    )
    add(
        "HTML named .svs",
        lambda b: predict(b, slides=[write(b, "in/h.svs", "<!DOCTYPE html><html>login</html>")]),
        1,
        "not an image",
    )
    add(
        "truncated TIFF",
        lambda b: predict(b, slides=[write(b, "in/cut.tif", S.slide.read_bytes()[:3000])]),
        1,
        "incomplete",
    )
    add(
        "TIFF declaring 200000 x 200000 px",
        lambda b: predict(b, slides=[huge_tiff(b)]),
        1,
        "200000 x 200000",
    )
    add("missing slide", lambda b: predict(b, slides=[b / "in" / "nope.tif"]), 2, "no slide to run")
    add("a good and a broken slide", lambda b: predict(
        b, slides=[slide_copy(b), write(b, "in/z.tif", b"")]), 1, "1 slide(s) failed",
        check=n_tables(1))  # fmt: skip

    # --- implausible values and bad options (exit 2, nothing written)
    for mpp in ("0", "-1", "50", "1e-9", "nan", "inf"):
        add(f"predict --mpp {mpp}", lambda b, m=mpp: predict(b, "--mpp", m), 2, "--mpp",
            check=absent("out"))  # fmt: skip
    add(
        "predict --mpp 2.5 --force-mpp",
        lambda b: predict(b, "--mpp", "2.5", "--force-mpp"),
        0,
        check=n_tables(1),
    )
    add(
        "predict --roi with negative size",
        lambda b: predict(b, "--roi", "0,0,-5,5"),
        2,
        "--roi",
        check=absent("out"),
    )
    add(
        "predict --roi not numbers",
        lambda b: predict(b, "--roi", "a,b,c,d"),
        2,
        "--roi",
        check=absent("out"),
    )
    add(
        "predict --roi-geojson with NaN",
        lambda b: predict(b, "--roi-geojson", str(write(b, "in/r.geojson", fc(NAN_RING)))),
        2,
        "feature 0",
        "not a number",
        check=absent("out"),
    )
    add(
        "predict --roi-geojson not JSON",
        lambda b: predict(b, "--roi-geojson", str(write(b, "in/r.geojson", "x,y\n1,2\n"))),
        2,
        "r.geojson",
        check=absent("out"),
    )
    add(
        "predict --thresholds trailing comma",
        lambda b: predict(b, "--thresholds", str(write(b, "in/t.json", '{"classes": [1,],}'))),
        2,
        "line 1, column",
        "conic-qp tune",
        check=absent("out"),
    )
    add(
        "predict --thresholds empty",
        lambda b: predict(b, "--thresholds", str(write(b, "in/t.json", ""))),
        2,
        "is empty",
        check=absent("out"),
    )
    add(
        "predict --thresholds a list",
        lambda b: predict(b, "--thresholds", str(write(b, "in/t.json", "[1, 2]"))),
        2,
        "JSON object",
        check=absent("out"),
    )
    add(
        "predict --tile-size 0",
        lambda b: predict(b, "--tile-size", "0"),
        2,
        "tile",
        check=absent("out"),
    )
    add("predict --tta 0", lambda b: predict(b, "--tta", "0"), 2, "tta", check=absent("out"))
    add(
        "predict --se-window bogus",
        lambda b: predict(b, "--se-window", "wide"),
        2,
        "--se-window",
        check=absent("out"),
    )
    add("predict --model not a checkpoint", lambda b: ["predict", str(slide_copy(b)), "-o",
        str(b / "out"), "--model", str(write(b, "in/m/x.txt", "x").parent), *FAST], 2,
        "checkpoint", check=absent("out"))  # fmt: skip

    # --- outputs that cannot be written (exit 1, one line naming the path and the cause)
    def ro_out(b: Path, case: Case) -> list[str]:
        (b / "out").mkdir()
        read_only(case, b / "out")
        return predict(b)

    c = add("predict into a read-only folder (root too)", lambda b: [], 1, "read-only")
    c.make = lambda b, c=c: ro_out(b, c)  # type: ignore[misc]
    add(
        "predict -o naming a file",
        lambda b: predict(b) if write(b, "out", "a file") else [],
        2,
        "is a file",
    )
    add("--log-file in a missing folder", lambda b: ["--log-file", str(b / "no" / "x.log"),
        *predict(b)], 1, "folder does not exist", check=absent("out"))  # fmt: skip

    # --- silent overwrite
    add(
        "two same.tif from different folders",
        lambda b: predict(b, slides=[slide_copy(b, "a/same.tif"), slide_copy(b, "b/same.tif")]),
        0,
        check=n_tables(2),
    )
    add(
        "the same slide twice",
        lambda b: predict(b, slides=[slide_copy(b), b / "in" / ".." / "in" / "a.tif"]),
        0,
        check=n_tables(1),
    )

    def second_same(b: Path) -> list[str]:
        first = CliRunner().invoke(main, predict(b, slides=[slide_copy(b, "a/same.tif")]))
        assert first.exit_code == 0, first.output
        return predict(b, slides=[slide_copy(b, "b/same.tif")])

    add("a later same.tif into the same folder", second_same, 0, check=n_tables(2))

    # --- blank slides
    add(
        "blank slide in a batch",
        lambda b: predict(
            b, slides=[slide_copy(b), slide_copy(b, "glass.tif", S.blank)], quiet=False
        ),
        0,
        "1 without tissue",
        "no tissue: ",
        check=n_tables(2),
    )
    add(
        "blank slide with --strict",
        lambda b: predict(b, "--strict", slides=[slide_copy(b, "glass.tif", S.blank)], quiet=False),
        1,
        "no tissue: ",
        check=n_tables(1),
        one_line=False,
    )

    # --- stale temp files of a killed run
    def stale(b: Path) -> list[str]:
        write(b, f"out/.a.nuclei.parquet.cqp-{dead_pid()}-{host_tag()}-0000abcd.tmp", b"half")
        return predict(b)

    add(
        "dead run's temp file in the output folder",
        stale,
        0,
        check=lambda b, _: None if not list((b / "out").glob(".a.*.tmp")) else "temp left",
    )

    # --- evaluate: data files must not run code
    def npy(b: Path, obj: object, name: str = "p.npy") -> str:
        p = b / "in" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, obj, allow_pickle=True)
        return str(p)

    good = np.zeros((1, 8, 8, 2), np.int32)
    add("evaluate --pred text named .npy", lambda b: ["evaluate", "--pred", str(write(
        b, "in/p.npy", "1 2 3\n")), "--true", npy(b, good, "t.npy")], 2, "is text",
        check=lambda b, o: ("allow_pickle" in o and "numpy's advice passed on") or None)  # fmt: skip
    add("evaluate --pred pickled code", lambda b: ["evaluate", "--pred", npy(
        b, np.array([RunsCode(str(b / "pwned"))], dtype=object)), "--true",
        npy(b, good, "t.npy")], 2, "pickled data", check=absent("pwned"))  # fmt: skip
    add("evaluate --pred empty file", lambda b: ["evaluate", "--pred", str(write(
        b, "in/p.npy", b"")), "--true", npy(b, good, "t.npy")], 2, "empty")  # fmt: skip
    add("evaluate --pred missing", lambda b: ["evaluate", "--pred", str(b / "in" / "no.npy"),
        "--true", npy(b, good, "t.npy")], 2)  # fmt: skip

    # --- composition
    add("composition -o naming a folder", lambda b: ["composition", str(predictions(b)), "-o",
        str((b / "out" / "c.csv").mkdir(parents=True) or b / "out" / "c.csv")], 1,
        "is a folder")  # fmt: skip
    add("composition -o not .csv", lambda b: ["composition", str(predictions(b)), "-o",
        str(b / "out" / "c.txt")], 2, ".csv")  # fmt: skip

    def comp_ro(b: Path, case: Case) -> list[str]:
        pred = predictions(b)
        (b / "out").mkdir()
        read_only(case, b / "out")
        return ["composition", str(pred), "-o", str(b / "out" / "c.csv")]

    c = add("composition into a read-only folder", lambda b: [], 1, "read-only")
    c.make = lambda b, c=c: comp_ro(b, c)  # type: ignore[misc]

    def truncated(b: Path) -> list[str]:
        pred = predictions(b)
        t = pred / "a.nuclei.parquet"
        t.write_bytes(t.read_bytes()[:200])
        return ["composition", str(pred), "-o", str(b / "out" / "c.csv")]

    add(
        "composition of a truncated table",
        truncated,
        2,
        "re-run `conic-qp predict`",
        writable=("out", "in/pred"),
    )
    add("composition of an empty folder", lambda b: ["composition", str(
        (b / "in" / "e").mkdir(parents=True) or b / "in" / "e"), "-o",
        str(b / "out" / "c.csv")], 2, "run `conic-qp predict` first")  # fmt: skip
    add("composition --regions-geojson with NaN", lambda b: ["composition", str(predictions(b)),
        "--regions-geojson", str(write(b, "in/reg/a.geojson", fc(NAN_RING)).parent), "-o",
        str(b / "out" / "c.csv")], 2, "a.geojson", "feature 0")  # fmt: skip

    # --- annotate: the project is the output; nothing outside it may change
    def ann(change: Callable[[Path], None] | None = None, n: int = 1, *extra: str):  # type: ignore[no-untyped-def]
        def make(b: Path) -> list[str]:
            file = project(b, n)
            if change is not None:
                change(file)
            return annotate(b, file, *extra)

        return make

    add("annotate --mpp 0", ann(None, 1, "--mpp", "0"), 2, "--mpp", check=unchanged_project)
    add("annotate --mpp 50", ann(None, 1, "--mpp", "50"), 2, "--force-mpp", check=unchanged_project)

    def missing_images(file: Path) -> None:
        for p in (file.parent.parent.parent / "in").glob("*.tif"):
            p.unlink()

    add(
        "annotate with every image missing",
        ann(missing_images, 2),
        2,
        "nothing was written",
        check=unchanged_project,
        writable=("out", "in"),
    )

    def hostile(entry: str) -> Callable[[Path], None]:
        def change(file: Path) -> None:
            edit_project(file, lambda d: d["images"][0].__setitem__("entryID", entry))

        return change

    add("annotate entryID ../../../x", ann(hostile("../../../x")), 0,
        writable=("out/proj",), check=lambda b, _: None if not (b / "x.nuclei.parquet").exists()
        else "wrote outside")  # fmt: skip
    add(
        "annotate absolute entryID",
        lambda b: ann(hostile(str(b / "abs" / "y")))(b),
        0,
        writable=("out/proj",),
    )
    add("annotate duplicate entry ids", ann(lambda f: edit_project(
        f, lambda d: d["images"][1].__setitem__("entryID", d["images"][0]["entryID"])), 2), 2,
        "share entryID", "lastID")  # fmt: skip
    add("annotate non-object image entry", ann(lambda f: edit_project(
        f, lambda d: d["images"].append("image 2"))), 2, "not an object")  # fmt: skip

    def latin1(file: Path) -> None:
        file.write_bytes(file.read_bytes().replace(b'"s0.tif"', b'"caf\xe9"', 1))

    add("annotate project with invalid UTF-8", ann(latin1), 2, "not UTF-8", "backup")
    add(
        "annotate truncated project",
        ann(lambda f: f.write_bytes(f.read_bytes()[:40])),
        2,
        "not valid JSON",
    )
    add(
        "annotate while QuPath saves",
        ann(lambda f: write(f.parent, "project.qpproj.tmp", "{}")),
        2,
        "QuPath is saving",
    )

    def ro_project(b: Path, case: Case) -> list[str]:
        file = project(b)
        read_only(case, file.parent)
        return annotate(b, file)

    c = add("annotate a read-only project (root too)", lambda b: [], 1, "read-only")
    c.make = lambda b, c=c: ro_project(b, c)  # type: ignore[misc]

    def dead_lock(file: Path) -> None:
        write(
            file.parent,
            ".conic-qp.lock",
            json.dumps(
                {"pid": dead_pid(), "host": os.uname().nodename, "since": "2026-01-01T00:00:00"}
            ),
        )

    add("annotate with a dead run's lock", ann(dead_lock), 0, writable=("out/proj",))
    add(
        "annotate malformed classes.json",
        ann(lambda f: write(f.parent, "classifiers/classes.json", '{"pathClasses": [')),
        2,
        "classes.json",
    )

    # --- train
    def train_ro(b: Path, case: Case) -> list[str]:
        (b / "out").mkdir()
        read_only(case, b / "out")
        return ["train", "--out", str(b / "out"), "--steps", "1"]

    c = add("train into a read-only folder", lambda b: [], 1, "read-only")
    c.make = lambda b, c=c: train_ro(b, c)  # type: ignore[misc]
    return out


def huge_tiff(b: Path) -> Path:
    """A valid little TIFF whose header then claims 200000 x 200000 px."""
    import tifffile

    p = b / "in" / "huge.tif"
    p.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")  # fmt: skip
    with tifffile.TiffFile(p, mode="r+") as tif:
        page = tif.pages.first
        page.tags["ImageWidth"].overwrite(200000)
        page.tags["ImageLength"].overwrite(200000)
    return p


# -------------------------------------------------------------------------------- runner


def snapshot(root: Path, allowed: list[Path]) -> dict[str, str]:
    state: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if any(p == a or a in p.parents for a in allowed):
            continue
        if p.is_symlink():
            state[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_dir():
            state[str(p.relative_to(root))] = "dir"
        else:
            state[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def run_case(i: int, case: Case, scratch: Path) -> list[str]:
    box = scratch / f"{i:02d}"
    box.mkdir()
    problems: list[str] = []
    cwd = os.getcwd()
    try:
        args = case.make(box)
        allowed = [box / w for w in case.writable]
        before = snapshot(scratch.parent, [*allowed, scratch.parent / "shared"])
        shared = snapshot(S.root, [])
        os.chdir(box)
        try:
            res = CliRunner().invoke(main, args)
        finally:
            os.chdir(cwd)
            for undo in case.cleanup:
                undo()
        output = res.output
        stderr = res.stderr
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            problems.append("raised " + "".join(traceback.format_exception(res.exception))[-600:])
        if res.exit_code != case.code:
            problems.append(f"exit {res.exit_code}, expected {case.code}")
        if "Traceback" in output:
            problems.append("printed a traceback")
        errors = [ln for ln in stderr.splitlines() if ln.lower().startswith("error:")]
        one_line = case.one_line and "failed:" not in output
        if case.code != 0 and res.exit_code != 0 and one_line and len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        for s in case.says:
            if s not in output:
                problems.append(f"does not say {s!r}")
        after = snapshot(scratch.parent, [*allowed, scratch.parent / "shared"])
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            problems.append(f"changed outside its outputs: {[k for k, _ in changed][:4]}")
        if snapshot(S.root, []) != shared:
            problems.append("changed the shared inputs")
        if case.check is not None:
            extra = case.check(box, output)
            if extra:
                problems.append(extra)
        if problems:
            problems.append("output: " + " | ".join(output.strip().splitlines()[-3:])[:400])
    except Exception:  # the probe's own set-up failed: report it as a problem of the case
        problems.append("probe error: " + traceback.format_exc()[-600:])
    return problems


def main_probe() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("-v", action="store_true", help="print the output of every case")
    args = parser.parse_args()
    global S
    with tempfile.TemporaryDirectory(prefix="conic-qp-probe-") as tmp:
        base = Path(tmp)
        S = Shared(base / "shared")
        scratch = base / "cases"
        scratch.mkdir()
        selected = [c for c in cases() if args.k in c.name]
        failed = 0
        for i, case in enumerate(selected):
            problems = run_case(i, case, scratch)
            mark = "ok  " if not problems else "FAIL"
            failed += bool(problems)
            print(f"{mark} [{case.code}] {case.name}", flush=True)
            for p in problems:
                print(f"       {p}", flush=True)
        print(f"{len(selected) - failed} of {len(selected)} cases behave", flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_probe())
