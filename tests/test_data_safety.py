"""Phase 2 of the data-safety issue: the commands use the mechanisms of ``paths``, ``locks``,
``workers`` and ``inputs``, so hostile names, duplicate inputs, read-only folders, dead runs'
leftovers and implausible values are handled where they enter (one test per class)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conic_qp.annotate import annotate_project
from conic_qp.cohort import predict_paths
from conic_qp.composition import load_cohort
from conic_qp.outputs import entry_stem
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
