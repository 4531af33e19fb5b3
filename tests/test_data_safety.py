"""Phase 2 of the data-safety issue: the commands use the mechanisms of ``paths``, ``locks``,
``workers`` and ``inputs``, so hostile names, duplicate inputs, read-only folders, dead runs'
leftovers and implausible values are handled where they enter (one test per class)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conic_qp.annotate import annotate_project
from conic_qp.cli import main
from conic_qp.cohort import predict_paths
from conic_qp.composition import load_cohort
from conic_qp.errors import ConicQPError, OutputError
from conic_qp.outputs import entry_stem
from conic_qp.paths import host_tag
from conic_qp.sinks.tables import read_table
from conic_qp.synthetic import synthetic_slide_image
from tests.helpers_models import settings, stand_in_models
from tests.helpers_slides import write_pyramidal_tiff
from tests.test_annotate import fast, make_project

torch.set_num_threads(1)


def _tree(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path under ``root`` (outside ``skip``) with its bytes (None for folders)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


# ------------------------------------------------------------------ class 1: path traversal


def test_hostile_entry_ids_stay_inside_the_project(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    project = make_project(root)
    absolute = tmp_path / "abs" / "y"
    absolute.parent.mkdir()
    data = json.loads(project.read_text())
    data["images"][0]["entryID"] = "../../../x"
    data["images"][1]["entryID"] = str(absolute)
    project.write_text(json.dumps(data))
    # files where the entry ids would put (and the stale-file clean-up delete) outputs
    victims = [tmp_path / "a" / "x.regions.geojson", Path(f"{absolute}.regions.geojson")]
    for v in victims:
        v.write_text("user data")
    outside = _tree(tmp_path, skip=project.parent)

    result = annotate_project(project, stand_in_models(), fast(), backend="geojson",
                              regions="tissue")  # fmt: skip
    assert [im.status for im in result.images] == ["done", "done"], result.failures
    assert _tree(tmp_path, skip=project.parent) == outside  # nothing written or deleted
    stems = [entry_stem("../../../x"), entry_stem(str(absolute))]
    assert all(re.fullmatch(r"[^/\\]+~[0-9a-f]{8}", s) for s in stems)
    for stem in stems:
        assert (project.parent / "conic-qp" / f"{stem}.nuclei.parquet").is_file()
        assert (project.parent / "detections" / stem / "manifest.json").is_file()
    # composition finds the tables under the same mapped names
    slides, failures = load_cohort(project)
    assert not failures and len(slides) == 2


@pytest.mark.parametrize("entry_id", ["1", "42", "0017", "abc_D-9", "x" * 100])
def test_plain_entry_ids_keep_their_name(entry_id: str) -> None:
    """The import script accepts exactly the ids ``entry_stem`` keeps (and refuses others)."""
    assert entry_stem(entry_id) == entry_id


@pytest.mark.parametrize("entry_id", ["../x", "/etc/x", "a/b", "CON", "nul", ".", "..", "a b"])
def test_other_entry_ids_are_mapped(entry_id: str) -> None:
    groovy = Path(__file__).resolve().parents[1] / "conic_qp" / "groovy"
    plain = re.compile(r"[0-9A-Za-z_-]{1,100}")
    reserved = re.compile(r"(?i)(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])")
    refused = not plain.fullmatch(entry_id) or bool(reserved.fullmatch(entry_id))
    for script in groovy.glob("*.groovy"):  # the rule the scripts apply
        text = script.read_text()
        assert plain.pattern in text and reserved.pattern in text, script
    if entry_id == "a b":
        assert refused and entry_stem(entry_id) == entry_id  # kept, but the script refuses it
    else:
        assert refused and entry_stem(entry_id) != entry_id


# ------------------------------------------------------------------ class 2: silent overwrite


def _slide(path: Path, seed: int) -> Path:
    img = synthetic_slide_image(192, 224, seed=seed, tissue_fraction=0.7).image
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pyramidal_tiff(path, img, mpp=0.5, levels=1)


def _slides_of(out: Path) -> dict[str, str]:
    """Output stem -> the slide its table says it came from."""
    return {
        t.name[: -len(".nuclei.parquet")]: json.loads(
            t.with_name(t.name.replace(".nuclei.parquet", ".run.json")).read_text()
        )["slide"]["path"]
        for t in out.glob("*.nuclei.parquet")
    }


def test_same_names_never_replace_each_others_results(tmp_path: Path) -> None:
    a = _slide(tmp_path / "a" / "same.tif", 1)
    b = _slide(tmp_path / "b" / "same.tif", 2)
    c = _slide(tmp_path / "c" / "same.tif", 3)
    out = tmp_path / "out"
    models, st = stand_in_models(), settings(save_labels=False)
    # the same file twice (another spelling) runs once
    batch = predict_paths([a, tmp_path / "b" / ".." / "a" / "same.tif"], models, st, out)
    assert batch.ok and len(batch.cohort.results) == 1  # type: ignore[union-attr]
    assert _slides_of(out) == {"same": str(a.resolve())}
    before = (out / "same.nuclei.parquet").read_bytes()
    # a later batch with another same.tif gets its own stem; a's results are left alone
    predict_paths([b], models, st, out)
    second = _slides_of(out)
    assert len(second) == 2 and second["same"] == str(a.resolve())
    assert (out / "same.nuclei.parquet").read_bytes() == before
    # names clashing within a batch and with the folder: every input keeps its own outputs
    predict_paths([c, a], models, st, out)
    third = _slides_of(out)
    assert len(third) == 3 and {k: third[k] for k in second} == second
    # an input recorded earlier keeps its stem, so --resume finds it
    res = predict_paths([b, a], models, st, out, resume=True)
    assert [r.status for r in res.cohort.results] == ["skipped", "skipped"]  # type: ignore[union-attr]


# ----------------------------------------------------------- class 4: read-only, also for root


def _chmod_tree(root: Path, mode_dir: int, mode_file: int) -> None:
    for p in [root, *root.rglob("*")]:
        os.chmod(p, mode_dir if p.is_dir() else mode_file)


def test_read_only_outputs_are_refused_before_the_first_write(tmp_path: Path) -> None:
    """``chmod -R a-w`` protects outputs whoever runs conic-qp (root ignores the bits)."""
    slide = _slide(tmp_path / "s" / "a.tif", 1)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        with pytest.raises(OutputError, match="read-only"):
            predict_paths([slide], stand_in_models(), settings(save_labels=False), out)
        assert list(out.iterdir()) == []
        # a folder predict would create below a read-only one
        with pytest.raises(OutputError, match="read-only"):
            predict_paths([slide], stand_in_models(), settings(), out / "new" / "deeper")
    finally:
        os.chmod(out, 0o755)
    project = make_project(tmp_path / "p")
    before = _tree(project.parent)
    _chmod_tree(project.parent, 0o555, 0o444)
    try:
        with pytest.raises(OutputError, match="read-only"):
            annotate_project(project, stand_in_models(), fast(), backend="geojson")
    finally:
        _chmod_tree(project.parent, 0o755, 0o644)
    assert _tree(project.parent) == before
    # conic-qp's own folder read-only, the rest writable: refused before the project changes
    annotate_project(project, stand_in_models(), fast(), backend="geojson", regions="tissue")
    before = _tree(project.parent)
    os.chmod(project.parent / "conic-qp", 0o555)
    try:
        with pytest.raises(OutputError, match="conic-qp is read-only"):
            annotate_project(project, stand_in_models(), fast(), backend="geojson")
    finally:
        os.chmod(project.parent / "conic-qp", 0o755)
    assert _tree(project.parent) == before


def test_composition_refuses_a_read_only_folder(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "s" / "a.tif", 1)
    pred = tmp_path / "pred"
    predict_paths([slide], stand_in_models(), settings(save_labels=False), pred)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.chmod(dest, 0o555)
    try:
        res = CliRunner().invoke(main, ["composition", str(pred), "-o", str(dest / "c.csv")])
    finally:
        os.chmod(dest, 0o755)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "read-only" in res.output and list(dest.iterdir()) == []


# --------------------------------------------------------- class 5: writes before validation


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


@pytest.mark.parametrize("mpp", ["0", "-1", "50", "1e-9", "nan"])
def test_annotate_bad_mpp_leaves_the_project_alone(tmp_path: Path, mpp: str) -> None:
    project = make_project(tmp_path)
    before = _tree(project.parent)
    code, out = _cli("annotate", str(project), "--mpp", mpp, "--backend", "geojson")
    assert code == 2 and "--mpp" in out, out
    assert _tree(project.parent) == before


def test_annotate_with_every_image_missing_writes_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    for p in (tmp_path / "slides").iterdir():
        p.unlink()
    before = _tree(project.parent)
    with pytest.raises(ConicQPError, match=r"none of the 2 selected image\(s\).*was found"):
        annotate_project(project, stand_in_models(), fast(), backend="geojson")
    assert _tree(project.parent) == before
    code, out = _cli("annotate", str(project), "--backend", "geojson", "--device", "cpu")
    assert code == 2 and "nothing was written" in out and "--remap" in out
    assert _tree(project.parent) == before


def test_annotate_touches_project_files_only_once_an_image_is_written(tmp_path: Path) -> None:
    """Images found but none giving detections (all fail): no classes.json merge, no script."""
    project = make_project(tmp_path)
    for p in (tmp_path / "slides").iterdir():
        p.write_bytes(b"")  # found, but empty: every image fails
    classes = (project.parent / "classifiers" / "classes.json").read_bytes()
    result = annotate_project(project, stand_in_models(), fast(), backend="geojson")
    assert all(im.status == "failed" for im in result.images)
    assert (project.parent / "classifiers" / "classes.json").read_bytes() == classes
    assert not (project.parent / "groovy").exists() and result.script is None
    assert not list((project.parent / "classifiers").glob("*.bak"))


# ------------------------------------------------------------- class 8: implausible values


def test_implausible_mpp_is_refused_before_any_write_unless_forced(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "s" / "a.tif", 1)
    out = tmp_path / "out"
    with pytest.raises(ConicQPError, match=r"outside the 0\.1-2 um/px"):
        predict_paths([slide], stand_in_models(), settings(save_labels=False), out, mpp=2.5)
    assert not out.exists()
    code, text = _cli("predict", str(slide), "-o", str(out), "--mpp", "50")
    assert code == 2 and "--force-mpp" in text and not out.exists()
    code, text = _cli("annotate", str(tmp_path / "nowhere"), "--mpp", "50")
    assert code == 2 and "--force-mpp" in text
    # forced: the value is used (here 2.5 um/px: the slide is read 5x finer than the model)
    batch = predict_paths([slide], stand_in_models(), settings(save_labels=False), out,
                          mpp=2.5, force_mpp=True)  # fmt: skip
    assert batch.ok
    run = json.loads((out / "a.run.json").read_text())
    assert run["slide"]["mpp"] == pytest.approx(2.5)


# --------------------------------------------------- class 6: what dead runs left is cleaned


def _dead_temp(folder: Path, target: str, *, folder_temp: bool = False) -> Path:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = folder / f".{target}.cqp-{proc.pid}-{host_tag()}-0000abcd.tmp"
    if folder_temp:
        path.mkdir(parents=True)
        (path / "part.geojson").write_text("{}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    return path


def test_dead_runs_temp_files_are_removed_by_the_next_run(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "s" / "a.tif", 1)
    out = tmp_path / "out"
    models, st = stand_in_models(), settings(save_labels=False)
    predict_paths([slide], models, st, out)
    stale = _dead_temp(out, "a.nuclei.parquet")
    foreign = out / ".a.nuclei.parquet.1234.tmp"  # not a conic-qp temp name: never touched
    foreign.write_bytes(b"someone else's")
    res = predict_paths([slide], models, st, out, resume=True)  # also when nothing runs
    assert [r.status for r in res.cohort.results] == ["skipped"]  # type: ignore[union-attr]
    assert not stale.exists() and foreign.exists()
    # annotate: leftovers in the project's folders conic-qp writes (detections, conic-qp, ...)
    project = make_project(tmp_path / "p")
    det = _dead_temp(project.parent / "detections", "1", folder_temp=True)
    own = _dead_temp(project.parent / "conic-qp", "1.nuclei.parquet")
    cls = _dead_temp(project.parent / "classifiers", "classes.json")
    annotate_project(project, stand_in_models(), fast(), backend="geojson", regions="tissue")
    assert not det.exists() and not own.exists() and not cls.exists()


# ------------------------------------------------------------------ blank slides: no tissue


def test_a_blank_slide_gets_empty_outputs_and_counts_as_zero_nuclei(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    tissue = _slide(slides / "tissue.tif", 1)
    glass = write_pyramidal_tiff(slides / "glass.tif", np.full((192, 192, 3), 245, np.uint8),
                                 mpp=0.5)  # fmt: skip
    out = tmp_path / "out"
    batch = predict_paths([tissue, glass], stand_in_models(), settings(save_labels=False), out)
    assert batch.ok
    status = {r.key: r.status for r in batch.cohort.results}  # type: ignore[union-attr]
    assert status == {"tissue": "done", "glass": "no_tissue"}
    table = read_table(out / "glass.nuclei.parquet")
    assert len(table) == 0 and "class_name" in table.columns
    run = json.loads((out / "glass.run.json").read_text())
    assert run["status"] == "no_tissue" and run["nuclei"] == 0 and run["complete"] is True
    with gzip.open(out / "glass.geojson.gz", "rt") as fh:
        assert json.load(fh)["features"] == []
    # composition lists the slide with 0 nuclei
    code, text = _cli("composition", str(out), "-o", str(tmp_path / "c.csv"))
    assert code == 0, text
    summary = pd.read_csv(tmp_path / "c.summary.csv")
    counts = dict(zip(summary["slide"], summary["total"], strict=True))
    assert counts["glass"] == 0 and counts["tissue"] > 0
    # resumed, it stays a blank slide (not "skipped"), so --strict still sees it
    again = predict_paths([tissue, glass], stand_in_models(), settings(save_labels=False), out,
                          resume=True)  # fmt: skip
    assert [r.status for r in again.cohort.results] == ["skipped", "no_tissue"]  # type: ignore[union-attr]


def test_a_blank_project_image_is_no_tissue_with_an_empty_table(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    glass = np.full((256, 288, 3), 245, np.uint8)
    write_pyramidal_tiff(tmp_path / "slides" / "slide2.tif", glass, mpp=0.5, levels=2)
    result = annotate_project(project, stand_in_models(), fast(), backend="geojson",
                              regions="tissue")  # fmt: skip
    assert [im.status for im in result.images] == ["done", "no_tissue"] and result.ok
    assert len(read_table(project.parent / "conic-qp" / "2.nuclei.parquet")) == 0
    slides, failures = load_cohort(project)
    assert not failures and len(slides) == 2
    code, text = _cli("composition", str(project), "-o", str(tmp_path / "c.csv"))
    assert code == 0, text
    summary = pd.read_csv(tmp_path / "c.summary.csv")
    assert summary.groupby("slide")["total"].sum()["slide2.tif"] == 0


# ------------------------------------------------------------ class 9: OS errors on outputs

FULL_DISK = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from conic_qp.cohort import predict_paths
from tests.helpers_models import settings, stand_in_models
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # files stop growing: a full disk
st = settings(save_labels=False, panel_width=int(sys.argv[3]))
batch = predict_paths([sys.argv[1]], stand_in_models(), st, sys.argv[2])
print(json.dumps(batch.failures))
"""


@pytest.mark.parametrize(("panel_width", "target"), [(4096, "a.nuclei.parquet"), (128, "")])
def test_a_full_disk_fails_the_slide_with_one_line_naming_the_output(
    tmp_path: Path, panel_width: int, target: str
) -> None:
    """The table being written, or the scratch files of a slide read in several panels."""
    slide = _slide(tmp_path / "s" / "a.tif", 1)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(slide), str(out), str(panel_width)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (message,) = json.loads(proc.stdout.strip().splitlines()[-1]).values()
    assert "\n" not in message and "Traceback" not in message
    named = f"{out / target}" if target else f"scratch files in {out}"
    assert message.startswith(f"cannot write {named}: "), message
    assert "file is too large" in message or "disk is full" in message
    assert not [p.name for p in out.iterdir() if p.name.startswith(".a.")]  # no temp left
    assert not (out / "a.nuclei.parquet").exists()


# -------------------------------------------------------------- class 10: messages that help


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"version": 1, "classes": [1,],}', "line 1, column"),
        ("", "is empty"),
        ('{"version": 1, "classes": [{"fg": NaN}]}', "not a number"),
    ],
)
def test_malformed_thresholds_say_what_and_what_to_do(tmp_path: Path, text: str, says: str) -> None:
    slide = _slide(tmp_path / "s" / "a.tif", 1)
    bad = tmp_path / "t.json"
    bad.write_text(text)
    out = tmp_path / "out"
    code, output = _cli("predict", str(slide), "-o", str(out), "--thresholds", str(bad))
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, output
    assert says in errors[0] and "--thresholds" in errors[0]
    assert "re-run `conic-qp tune`" in errors[0] and not out.exists()
