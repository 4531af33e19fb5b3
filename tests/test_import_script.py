"""Run the real ``import_conic_qp.groovy`` against a fake of the QuPath API it calls.

QuPath cannot be installed here; ``tests/qupath_fake`` imitates the QuPath classes the script
uses (see its README) so that the script's Groovy, its control flow and its contract with
``write_detection_folder`` are exercised: regions added once, detections below their parent
annotation with counts equal to ``conic_qp.composition``, re-runs replacing only conic-qp's
objects, the image type, which images are saved, and nothing removed when a file is unreadable.
Needs a ``groovy`` command and Gson (``CONIC_QP_GSON_JAR``, default ``/usr/share/java/gson.jar``:
Debian's ``groovy`` and ``libgoogle-gson-java``); skipped otherwise.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from conic_qp.classes import CONIC
from conic_qp.composition import assign_nuclei
from conic_qp.objects import instances_to_table
from conic_qp.postprocess import Instances
from conic_qp.qupath.project import detections_dir, write_project
from conic_qp.sinks.geojson import Region, write_detection_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "conic_qp" / "groovy" / "import_conic_qp.groovy"
FAKE = REPO / "tests" / "qupath_fake"
GSON = Path(os.environ.get("CONIC_QP_GSON_JAR", "/usr/share/java/gson.jar"))
GROOVY = shutil.which("groovy")

pytestmark = pytest.mark.skipif(
    GROOVY is None or not GSON.is_file(), reason="needs a groovy command and Gson to run the script"
)


def _java_home() -> str | None:
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    java = shutil.which("java")
    return str(Path(java).resolve().parents[1]) if java else None


def run_import(project: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    home = _java_home()
    if home:
        env["JAVA_HOME"] = home
    assert GROOVY is not None
    return subprocess.run(
        [GROOVY, "-cp", f"{FAKE}{os.pathsep}{GSON}", str(FAKE / "run_import.groovy"),
         str(project), str(SCRIPT)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def grid_table(n_side: int = 24, spacing: float = 10.0) -> pd.DataFrame:
    labels = np.zeros((n_side * 8, n_side * 8), np.int32)
    k = 0
    for r in range(n_side):
        for c in range(n_side):
            k += 1
            labels[r * 8 + 1 : r * 8 + 6, c * 8 + 2 : c * 8 + 7] = k
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=k).astype(np.float32)
    return instances_to_table(
        Instances(labels, probs.argmax(1) + 1, probs), CONIC,
        scale=spacing / 8, mpp_level0=0.5, image_id="grid",
    )  # fmt: skip


def state(project: Path, entry: str) -> dict:
    return json.loads((project.parent / "data" / entry / "fake-hierarchy.json").read_text())


def walk(node: dict, parent: dict | None = None):  # type: ignore[no-untyped-def]
    for c in node["children"]:
        yield c, node
        yield from walk(c, node)


def below(node: dict) -> int:
    """QuPath's "Num Detections": detections below an object, nested annotations included."""
    return sum(1 for c, _ in walk(node) if c["type"] in ("detection", "cell"))


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, pd.DataFrame, list[Region]]:
    slides = tmp_path / "slides"
    slides.mkdir()
    for n in ("a.svs", "b.svs"):
        (slides / n).write_bytes(b"x")
    project = write_project(tmp_path / "proj", [slides / "a.svs", slides / "b.svs"])
    table = grid_table()  # 576 nuclei over 240 x 240 px
    regions = [
        Region(shapely.box(10, 10, 150, 150), "outer", "Tumor", str(uuid.uuid4()),
               {"classification": {"name": "Tumor", "color": [200, 0, 0]}}),
        Region(shapely.box(40, 40, 80, 80), "inner", "Stroma", None),
        Region(shapely.Polygon([(160, 0), (240, 0), (240, 240)]), "side", "Tumor", None),
    ]  # fmt: skip
    write_detection_folder(
        table, detections_dir(project.parent, "1"), CONIC, regions=regions, add_regions=True,
        per_file=100, info={"entry_id": "1"},
    )  # fmt: skip
    return project, table, regions


def test_import_places_detections_under_regions_with_compositions_counts(setup) -> None:  # type: ignore[no-untyped-def]
    project, table, regions = setup
    res = run_import(project)
    assert res.returncode == 0, res.stdout + res.stderr
    s = state(project, "1")
    assert s["imageType"] == "BRIGHTFIELD_H_E" and s["saves"] == 1
    assert "conic-qp.regions" in s["properties"]
    objs = list(walk(s["root"]))
    anns = {o["name"]: (o, p) for o, p in objs if o["type"] == "annotation"}
    assert set(anns) == {"outer", "inner", "side"}
    assert anns["inner"][1]["name"] == "outer"  # nested annotations nest
    assert anns["outer"][0]["pathClass"] == "Tumor"
    members = assign_nuclei(table, [r.geometry for r in regions])
    for r, idx in zip(regions, members, strict=True):
        assert below(anns[r.name][0]) == len(idx) > 0
    n_det = sum(1 for o, _ in objs if o["type"] == "detection")
    assert n_det == len(table)
    at_root = sum(1 for c in s["root"]["children"] if c["type"] == "detection")
    assert at_root == len(table) - len(members[0]) - len(members[2]) > 0
    assert all("conic-qp" in o["measurements"] for o, _ in objs if o["type"] == "detection")
    assert not (project.parent / "data" / "2").exists()  # no manifest: image 2 not saved
    assert "'b.svs': no detections/2/manifest.json" in res.stdout.replace('"', "'")
    assert "outer (" in res.stdout and "annotations differ" not in res.stdout  # the fast path


def test_rerun_replaces_only_conic_qp_objects_and_adds_regions_once(setup) -> None:  # type: ignore[no-untyped-def]
    project, table, _regions = setup
    assert run_import(project).returncode == 0
    # the user adds their own detection (no conic-qp marker) and re-runs the import
    s = state(project, "1")
    user = {"type": "detection", "id": str(uuid.uuid4()), "name": "mine", "pathClass": None,
            "xs": [1.0, 2.0, 2.0, 1.0], "ys": [1.0, 1.0, 2.0, 1.0], "measurements": {},
            "children": []}  # fmt: skip
    s["root"]["children"].append(user)
    (project.parent / "data" / "1" / "fake-hierarchy.json").write_text(json.dumps(s))
    res = run_import(project)
    assert res.returncode == 0, res.stdout + res.stderr
    s2 = state(project, "1")
    objs = [o for o, _ in walk(s2["root"])]
    assert sum(o["type"] == "annotation" for o in objs) == 3  # not added twice
    assert sum(o["type"] == "detection" and "conic-qp" in o["measurements"] for o in objs) == len(
        table
    )
    assert any(o["id"] == user["id"] for o in objs) and s2["saves"] == 2
    assert f"removed {len(table)} previous" in res.stdout


def test_changed_annotations_let_qupath_place_the_detections(setup) -> None:  # type: ignore[no-untyped-def]
    project, table, regions = setup
    assert run_import(project).returncode == 0
    s = state(project, "1")
    # the user deletes the "inner" annotation (its children go to "outer", as in QuPath)
    for node, parent in list(walk(s["root"])):
        if node["type"] == "annotation" and node["name"] == "inner":
            parent["children"].remove(node)
            parent["children"].extend(node["children"])
    (project.parent / "data" / "1" / "fake-hierarchy.json").write_text(json.dumps(s))
    res = run_import(project)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "annotations differ" in res.stdout
    anns = {o["name"]: o for o, _ in walk(state(project, "1")["root"]) if o["type"] == "annotation"}
    assert set(anns) == {"outer", "side"}
    members = assign_nuclei(table, [regions[0].geometry, regions[2].geometry])
    assert [below(anns["outer"]), below(anns["side"])] == [len(m) for m in members]


def test_an_unreadable_file_removes_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    project, _, _ = setup
    assert run_import(project).returncode == 0
    before = (project.parent / "data" / "1" / "fake-hierarchy.json").read_text()
    folder = detections_dir(project.parent, "1")
    m = json.loads((folder / "manifest.json").read_text())
    last = folder / m["files"][-1]["file"]
    with gzip.open(last, "rt") as fh:
        text = fh.read()
    with gzip.open(last, "wt") as fh:  # what QuPath rejects: a classification without colour
        fh.write(text.replace(',"color":[', ',"colour":['))
    res = run_import(project)
    assert res.returncode != 0
    assert (project.parent / "data" / "1" / "fake-hierarchy.json").read_text() == before


def test_a_hostile_entry_id_is_refused_not_resolved(setup) -> None:  # type: ignore[no-untyped-def]
    """An entry id that is not a plain name (``../../x``) never becomes a path in the script:
    the image is left unchanged with a line saying why (conic-qp maps such ids itself)."""
    project, _, _ = setup
    data = json.loads(project.read_text())
    data["images"][0]["entryID"] = "../../x"
    project.write_text(json.dumps(data))
    outside = project.parent.parent / "x"
    # what the script would read if it resolved the id: a real detection folder
    shutil.copytree(detections_dir(project.parent, "1"), outside)
    res = run_import(project)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "entry id '../../x' is not a plain name" in res.stdout
    assert "added" not in res.stdout.split("is not a plain name")[0]
    assert not (outside / "fake-hierarchy.json").exists()
    assert not (project.parent / "data" / "1" / "fake-hierarchy.json").exists()
