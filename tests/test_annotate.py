"""`conic-qp annotate` end to end on tiny QuPath projects: GeoJSON rules, classes.json merge,
idempotent re-runs, interruptions, per-image failures and refused projects.

Nuclei come from the deterministic stand-in network of ``tests/test_predict.py`` (hematoxylin
thresholds on synthetic H&E), so the detections are real objects; the CLI runs the real ConicNet
path with a tiny random-init checkpoint.
"""

from __future__ import annotations

import gzip
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from click.testing import CliRunner

from conic_qp.annotate import annotate_project, import_command
from conic_qp.checkpoint import save_checkpoint
from conic_qp.cli import main
from conic_qp.composition import load_cohort
from conic_qp.errors import ConicQPError
from conic_qp.model import ConicNet, ModelConfig
from conic_qp.postprocess import PostprocessParams
from conic_qp.predict import ModelSet, PredictSettings
from conic_qp.qupath.classes import QUPATH_DEFAULT_CLASSES, argb_to_rgb
from conic_qp.qupath.project import fix_image_uris, read_project, regions_path, write_project
from conic_qp.sinks.geojson import read_regions
from conic_qp.sinks.tables import read_table
from conic_qp.synthetic import synthetic_slide_image
from tests.helpers_models import DARK_PALE, settings, stand_in_models
from tests.helpers_slides import write_pyramidal_tiff

torch.set_num_threads(1)

GROOVY = Path(__file__).resolve().parents[1] / "conic_qp" / "groovy" / "import_conic_qp.groovy"
REGION = shapely.box(40, 30, 220, 200)


def make_project(root: Path, n: int = 2) -> Path:
    slides = root / "slides"
    slides.mkdir(parents=True)
    paths = []
    for i in range(n):
        img = synthetic_slide_image(256, 288, seed=10 + i, tissue_fraction=0.7).image
        paths.append(write_pyramidal_tiff(slides / f"slide{i + 1}.tif", img, mpp=0.5, levels=2))
    project = write_project(root / "proj", paths)
    # a user's class list, and the exported annotations of image 1
    classes = project.parent / "classifiers" / "classes.json"
    classes.parent.mkdir()
    classes.write_text(
        json.dumps(
            {"pathClasses": [{"name": "Tumor", "color": -3670016}, {"name": "Mine", "color": 255}]}
        )
    )
    regions = project.parent / "regions"
    regions.mkdir()
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": shapely.geometry.mapping(REGION),
                "properties": {
                    "objectType": "annotation",
                    "name": "ROI 1",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                },
            }
        ],
    }
    (regions / "1.geojson").write_text(json.dumps(fc))
    return project


def features(path: Path) -> list[dict]:
    """Features of one GeoJSON file, or of every file of a detection folder (manifest order)."""
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return [f for e in manifest["files"] for f in features(path / e["file"])]
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        fc = json.load(fh)
    assert fc["type"] == "FeatureCollection"
    return fc["features"]


def check_qupath_rules(feats: list[dict], object_type: str = "detection") -> None:
    for f in feats:
        assert f["type"] == "Feature"
        assert str(uuid.UUID(f["id"])) == f["id"]
        props = f["properties"]
        assert props["objectType"] == object_type
        cls = props["classification"]
        assert cls["name"] in DARK_PALE.names
        assert cls["color"] == list(DARK_PALE.by_name(cls["name"]).color)
        meas = props["measurements"]
        assert meas["conic-qp"] == 1.0
        assert all(type(v) in (int, float) for v in meas.values())
        assert "Class probability" in meas and "Nucleus: Area µm^2" in meas
        if object_type == "cell":
            assert f["nucleusGeometry"]["type"] == "Polygon" and "nucleusGeometry" not in props
        assert f["geometry"]["type"] == "Polygon"


def fast(**kw: object) -> PredictSettings:
    """Engine settings for tiny slides: a few 256 px tiles, one pass, inline post-processing."""
    base: dict[str, object] = {"tile_size": 256, "halo": 40, "save_labels": False}
    base.update(kw)
    return settings(**base)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path)


def test_annotate_writes_detections_classes_script_and_tables(project: Path) -> None:
    pdir = project.parent
    before = project.read_bytes()
    old_classes = (pdir / "classifiers" / "classes.json").read_bytes()
    events = []
    res = annotate_project(
        project, stand_in_models(), fast(), backend="geojson",
        on_progress=events.append,
    )  # fmt: skip
    assert res.ok and res.backend == "geojson"
    assert [o.status for o in res.images] == ["done", "done"]
    assert project.read_bytes() == before  # the geojson backend never touches project.qpproj
    # detections per image, QuPath's GeoJSON rules
    one = features(pdir / "detections" / "1")
    two = features(pdir / "detections" / "2")
    assert len(one) == res.images[0].n_nuclei > 5 and len(two) == res.images[1].n_nuclei > 5
    check_qupath_rules(one + two)
    assert not {f["id"] for f in one} & {f["id"] for f in two}
    # image 1 ran inside its annotation, image 2 on the tissue
    assert res.images[0].region_source.endswith("regions/1.geojson")
    assert res.images[1].region_source == "tissue"
    # the regions the run used, recorded as QuPath annotations (id kept, class with its colour)
    (used,) = features(pdir / "conic-qp" / "1.regions.geojson")
    exported = json.loads((pdir / "regions" / "1.geojson").read_text())["features"][0]
    assert used["id"] == exported["id"] and used["properties"]["objectType"] == "annotation"
    assert used["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    m1 = json.loads((pdir / "detections" / "1" / "manifest.json").read_text())
    assert [a["id"] for a in m1["annotations"]] == [exported["id"]]
    assert {e["parent"] for e in m1["files"]} == {exported["id"]}  # all inside the annotation
    assert res.images[0].parent_counts == {"ROI 1": len(one)}
    m2 = json.loads((pdir / "detections" / "2" / "manifest.json").read_text())
    assert m2["annotations"] == [] and m2["regions_file"] is None
    assert {e["parent"] for e in m2["files"]} == {None}  # no annotations: at the root
    t1 = read_table(pdir / "conic-qp" / "1.nuclei.parquet")
    assert len(t1) == len(one)
    assert shapely.covers(REGION, shapely.points(t1["centroid_x"], t1["centroid_y"])).all()
    t2 = read_table(pdir / "conic-qp" / "2.nuclei.parquet")
    assert not shapely.covers(REGION, shapely.points(t2["centroid_x"], t2["centroid_y"])).all()
    # classes.json: user classes kept in order, model classes added with colours, backup
    merged = json.loads((pdir / "classifiers" / "classes.json").read_text())["pathClasses"]
    assert [c["name"] for c in merged] == ["Tumor", "Mine", "dark", "pale"]
    assert merged[0]["color"] == -3670016 and merged[1]["color"] == 255
    assert argb_to_rgb(merged[2]["color"]) == DARK_PALE.by_name("dark").color
    assert (pdir / "classifiers" / "classes.json.bak").read_bytes() == old_classes
    assert res.classes_added == ["dark", "pale"]
    # the Groovy import script and the one command that imports everything
    script = pdir / "groovy" / "import_conic_qp.groovy"
    assert script.read_bytes() == GROOVY.read_bytes()
    assert res.command == import_command(project, script)
    assert res.command.startswith("QuPath script -p ") and "--save" not in res.command
    assert not res.uri_fixes and res.project_backup is None and not res.unresolved
    # run record
    run = json.loads((pdir / "conic-qp" / "run.json").read_text())
    assert run["complete"] is True and run["backend"] == "geojson"
    assert run["images"]["1"]["n_nuclei"] == len(one) and run["images"]["2"]["status"] == "done"
    assert run["images"]["1"]["roi_area_px"] == pytest.approx(REGION.area)
    assert run["images"]["2"]["tissue_area_px"] > 0
    assert events[-1].stage == "finished" and {e.slide_index for e in events} == {0, 1}
    assert not list(pdir.rglob(".*.tmp")) and not (pdir / ".conic-qp.lock").exists()

    # composition of the annotated project: image 1 in its annotation, image 2 as a whole
    slides, missing = load_cohort(project)
    assert not missing and [r.label for r in slides[0].regions] == ["ROI 1"]
    assert [r.label for r in slides[1].regions] == ["all"]
    assert slides[1].regions[0].area == run["images"]["2"]["tissue_area_px"]
    code, out = cli(
        "composition", str(project), "-o", str(pdir / "comp.csv"), "--report", str(pdir / "r.html")
    )
    assert code == 0, out
    tidy = pd.read_csv(pdir / "comp.csv")
    assert tidy.groupby("slide")["count"].sum().to_dict() == {
        "slide1.tif": len(one),
        "slide2.tif": len(two),
    }
    assert (pdir / "comp.parquet").exists() and (pdir / "comp.summary.csv").exists()
    assert (pdir / "r_files" / "composition.png").exists() and "overlay_2" in (
        pdir / "r.html"
    ).read_text()


def test_example_project_resolves_when_cloned_elsewhere(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "CMU-1"
    source = example / "project.qpproj"
    here = "file:" + source.as_posix().replace(" ", "%20")
    if (
        json.loads(source.read_text())["uri"] == here
        and source.with_suffix(".qpproj.bak").is_file()
    ):
        # the README's annotate already fixed this clone's URIs, keeping the committed file as
        # its first backup: check that one
        source = source.with_suffix(".qpproj.bak")
    committed = json.loads(source.read_text())
    # no path of the machine that wrote it; the slide's place relative to the project's uri is
    # what QuPath's "search relative" and conic-qp use to find it in a clone
    placeholder = "file:/path/to/conic-qp/examples/CMU-1"
    assert committed["uri"] == f"{placeholder}/project.qpproj"
    assert committed["images"][0]["serverBuilder"]["uri"] == f"{placeholder}/CMU-1-Small-Region.svs"
    copy = tmp_path / "some where" / "CMU-1"
    shutil.copytree(example, copy, ignore=shutil.ignore_patterns(*IGNORED))
    shutil.copyfile(source, copy / "project.qpproj")  # the example as committed
    qp = read_project(copy / "project.qpproj")
    (im,) = qp.images
    assert im.ok and im.moved and im.path == copy / "CMU-1-Small-Region.svs"
    regions = {r.name: r for r in read_regions(regions_path(copy, im.entry_id))}
    assert set(regions) == {"Tumor", "Stroma"}
    assert regions["Tumor"].class_name == "Tumor" and regions["Stroma"].geometry.is_valid
    assert not regions["Tumor"].geometry.intersects(regions["Stroma"].geometry)
    assert all(shapely.box(0, 0, 2220, 2967).contains(r.geometry) for r in regions.values())
    # what annotate does first: the clone's own paths, in QuPath's form, backup kept
    fixes, backup = fix_image_uris(qp)
    assert backup is not None and json.loads(backup.read_text()) == committed
    data = json.loads((copy / "project.qpproj").read_text())
    assert (
        data["images"][0]["serverBuilder"]["uri"]
        == fixes[0].new
        == ("file:" + (copy / "CMU-1-Small-Region.svs").as_posix().replace(" ", "%20"))
    )
    assert data["uri"] == "file:" + (copy / "project.qpproj").as_posix().replace(" ", "%20")
    assert "/path/to/" not in json.dumps(data)


#: what `conic-qp annotate` / QuPath leave in the example (its .gitignore)
IGNORED = ("detections", "conic-qp", "groovy", "classifiers", "data", "*.bak", ".conic-qp.lock")


def test_cells_carry_nucleus_geometry_and_a_project_without_classes_gets_defaults(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path, n=1)
    (project.parent / "classifiers" / "classes.json").unlink()
    res = annotate_project(
        project, stand_in_models(), fast(object_type="cell"),
        backend="geojson", regions="tissue",
    )  # fmt: skip
    assert res.ok and res.images[0].region_source == "tissue"
    check_qupath_rules(features(project.parent / "detections" / "1"), "cell")
    names = [
        c["name"]
        for c in json.loads((project.parent / "classifiers" / "classes.json").read_text())[
            "pathClasses"
        ]
    ]
    assert names == [c["name"] for c in QUPATH_DEFAULT_CLASSES] + ["dark", "pale"]


class FailingNet(torch.nn.Module):
    """The stand-in network that raises on its ``fail_at``-th forward call (only that one)."""

    def __init__(self, inner: torch.nn.Module, fail_at: int, exc: type[BaseException]) -> None:
        super().__init__()
        self.inner, self.fail_at, self.exc, self.calls = inner, fail_at, exc, 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("simulated failure")
        return self.inner(x)


def failing_models(fail_at: int, exc: type[BaseException]) -> ModelSet:
    m = stand_in_models()
    return ModelSet([FailingNet(m.networks[0], fail_at, exc)], m.classes, m.mpp, m.params, m.info)


def test_rerun_is_idempotent_and_interruptions_keep_old_detections(project: Path) -> None:
    pdir = project.parent
    s = fast(batch_size=1)  # one tile per forward call: failures land inside image 1
    annotate_project(project, stand_in_models(), s, backend="geojson")
    det = {i: (pdir / "detections" / i) for i in ("1", "2")}
    first = {i: features(p) for i, p in det.items()}
    annotate_project(project, stand_in_models(), s, backend="geojson")
    for i, p in det.items():
        again = features(p)
        assert [f["id"] for f in again] == [f["id"] for f in first[i]]  # same ids, not twice

    def folder_bytes(p: Path) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in sorted(p.iterdir())}

    old_bytes = {i: folder_bytes(p) for i, p in det.items()}
    project_bytes = project.read_bytes()

    # Ctrl-C in the middle of image 1: it propagates, nothing half-written stays behind
    with pytest.raises(KeyboardInterrupt):
        annotate_project(project, failing_models(2, KeyboardInterrupt), s, backend="geojson")
    assert {i: folder_bytes(p) for i, p in det.items()} == old_bytes
    assert project.read_bytes() == project_bytes and read_project(project).images
    assert not (pdir / ".conic-qp.lock").exists() and not list(pdir.rglob(".*.tmp"))
    run = json.loads((pdir / "conic-qp" / "run.json").read_text())
    assert run["complete"] is False and run["images"]["1"]["error"] == "interrupted"

    # an error inside image 1: recorded, image 2 still done, image 1's old detections intact
    res = annotate_project(project, failing_models(2, RuntimeError), s, backend="geojson")
    assert [o.status for o in res.images] == ["failed", "done"]
    assert "simulated failure" in res.failures["1 (slide1.tif)"]
    assert folder_bytes(det["1"]) == old_bytes["1"]


def test_missing_image_fails_alone_and_unknown_images_are_refused(project: Path) -> None:
    (project.parent.parent / "slides" / "slide1.tif").unlink()
    res = annotate_project(project, stand_in_models(), fast(), backend="geojson")
    assert [o.status for o in res.images] == ["failed", "done"]
    assert "not found" in res.failures["1 (slide1.tif)"]
    assert (project.parent / "detections" / "2" / "manifest.json").exists()
    with pytest.raises(ConicQPError, match="not in project"):
        annotate_project(project, stand_in_models(), fast(), images=["nope"], backend="geojson")
    with pytest.raises(ConicQPError, match="not a folder"):
        annotate_project(project, stand_in_models(), fast(), regions_geojson=project)


def test_regions_geojson_folder_by_image_name(project: Path, tmp_path: Path) -> None:
    rdir = tmp_path / "exported"
    rdir.mkdir()
    square = shapely.box(100, 100, 200, 220)
    (rdir / "slide2.geojson").write_text(
        json.dumps(
            {"type": "Feature", "geometry": shapely.geometry.mapping(square), "properties": {}}
        )
    )
    res = annotate_project(
        project, stand_in_models(), fast(), images=["slide2.tif"],
        regions_geojson=rdir, backend="geojson",
    )  # fmt: skip
    assert [o.entry_id for o in res.images] == ["2"] and res.images[0].n_regions == 1
    t2 = read_table(project.parent / "conic-qp" / "2.nuclei.parquet")
    assert (
        len(t2) and shapely.covers(square, shapely.points(t2["centroid_x"], t2["centroid_y"])).all()
    )


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = ConicNet(ModelConfig("test_efficientnet", 2, decoder_channels=(32, 16, 16, 8, 8)))
    params = PostprocessParams.uniform(2, fg=0.3, seed=0.34, min_size=4, min_solidity=0.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(path, net, DARK_PALE, 0.5, thresholds=params.to_json())


def one_error_line(out: str) -> str:
    """The CLI's error: exactly one line starting with ``error:``."""
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def test_cli_annotate_exit_codes(project: Path, tiny_ckpt: Path) -> None:
    common = [
        "--model",
        str(tiny_ckpt),
        "--tta",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--backend",
        "geojson",
    ]
    # a missing image: the other is done, exit 1 with the failure listed
    (project.parent.parent / "slides" / "slide2.tif").unlink()
    code, out = cli("annotate", str(project), *common)
    assert code == 1, out
    assert "slide2.tif" in out and "not found" in out
    assert "QuPath script -p" in out and (project.parent / "detections" / "1").is_dir()
    code, out = cli("annotate", str(project), "--list")
    assert code == 0 and "slide1.tif" in out

    # locked by a QuPath save in progress: refused, nothing written
    tmp = project.with_name("project.qpproj.tmp")
    tmp.write_text("{}")
    code, out = cli("annotate", str(project), *common)
    assert code == 2 and "QuPath is saving" in one_error_line(out)
    tmp.unlink()

    # malformed project: one-line error, the file left byte for byte
    project.write_bytes(b'{"version": "0.5.1", "images": [')
    before = project.read_bytes()
    listing = sorted(p.relative_to(project.parent) for p in project.parent.rglob("*"))
    code, out = cli("annotate", str(project), *common)
    assert code == 2 and "not valid JSON" in one_error_line(out)
    assert project.read_bytes() == before
    assert sorted(p.relative_to(project.parent) for p in project.parent.rglob("*")) == listing


# ---------------------------------------------------------- moved projects, QuPath's hierarchy


def test_moved_project_gets_its_uris_fixed_and_reported(tmp_path: Path) -> None:
    project = make_project(tmp_path / "before")
    (tmp_path / "before").rename(tmp_path / "after")
    project = tmp_path / "after" / "proj" / "project.qpproj"
    before = project.read_bytes()
    # --no-fix-uris: the project file is left byte for byte, the images are listed as unreachable
    res = annotate_project(
        project, stand_in_models(), fast(), backend="geojson", fix_uris=False, images=["2"]
    )
    assert res.ok and not res.uri_fixes and project.read_bytes() == before
    assert res.unresolved == ["1 (slide1.tif)", "2 (slide2.tif)"]
    res = annotate_project(project, stand_in_models(), fast(), backend="geojson", images=["2"])
    assert res.ok and [f.entry_id for f in res.uri_fixes] == ["1", "2"]  # every image that moved
    assert res.project_backup is not None and res.project_backup.read_bytes() == before
    assert not res.unresolved
    data = json.loads(project.read_text())
    slides = tmp_path / "after" / "slides"
    assert [e["serverBuilder"]["uri"] for e in data["images"]] == [
        f"file:{(slides / n).as_posix()}" for n in ("slide1.tif", "slide2.tif")
    ]
    assert data["uri"] == f"file:{project.as_posix()}"
    assert "before" not in project.read_text()
    again = annotate_project(project, stand_in_models(), fast(), backend="geojson", images=["2"])
    assert not again.uri_fixes and project.read_text() == json.dumps(data, indent=2) + "\n"


def _qupath_placement(folder: Path) -> tuple[dict[str, shapely.Geometry], dict[str | None, int]]:
    """What the import script leaves in QuPath, from the files alone: the annotations (from
    regions.geojson) and the number of detections below each (QuPath's "Num Detections":
    children and the children of nested annotations). Also checks that every file's parent is
    the annotation QuPath's own rule gives the feature as written (smallest annotation holding
    its outline's centroid, coordinates as float32)."""
    m = json.loads((folder / "manifest.json").read_text())
    regions = {r.id: r.geometry for r in read_regions(folder / m["regions_file"])}
    assert list(regions) == [a["id"] for a in m["annotations"]]
    by_area = sorted(regions, key=lambda k: regions[k].area)
    placed: dict[str | None, int] = {}
    for entry in m["files"]:
        for f in features(folder / entry["file"]):
            ring = np.asarray(f["geometry"]["coordinates"][0], dtype=np.float32).astype(float)
            c = shapely.Polygon(ring).centroid
            rule = next((k for k in by_area if regions[k].covers(c)), None)
            assert rule == entry["parent"]
            placed[rule] = placed.get(rule, 0) + 1
    # annotation tree (an annotation's parent: the smallest other one covering it)
    parent_of = {
        k: next((o for o in by_area if o != k and regions[o].covers(regions[k])), None)
        for k in regions
    }
    below: dict[str | None, int] = {k: 0 for k in regions}
    for k, n in placed.items():
        while k is not None:
            below[k] += n
            k = parent_of[k]
    below[None] = placed.get(None, 0)
    return regions, below


def test_detections_under_their_annotations_give_compositions_counts(project: Path) -> None:
    """Per-annotation counts in QuPath (after the import) equal `conic-qp composition`'s."""
    pdir = project.parent
    outer, inner, side = (
        shapely.box(20, 20, 230, 250),
        shapely.box(60, 60, 150, 150),
        shapely.box(235, 20, 280, 250),
    )
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": str(uuid.uuid4()), "geometry": shapely.geometry.mapping(g),
             "properties": {"objectType": "annotation", "name": name,
                            "classification": {"name": cls, "color": [200, 0, 0]}}}
            for g, name, cls in ((outer, "outer", "Tumor"), (inner, "inner", "Stroma"),
                                 (side, "side", "Tumor"))
        ],
    }  # fmt: skip
    (pdir / "regions" / "1.geojson").write_text(json.dumps(fc))
    res = annotate_project(
        project, stand_in_models(), fast(), images=["1"], regions="tissue",
        backend="geojson", detections_per_file=7,
    )  # fmt: skip
    assert res.ok and res.images[0].region_source == "tissue"  # inference on the whole tissue
    folder = pdir / "detections" / "1"
    m = json.loads((folder / "manifest.json").read_text())
    assert len(m["files"]) > 4 and all(e["count"] <= 7 for e in m["files"])
    regions, below = _qupath_placement(folder)
    assert below[None] > 0  # nuclei outside every annotation stay at the root
    names = {a["id"]: a["name"] for a in m["annotations"]}
    code, out = cli("composition", str(project), "-o", str(pdir / "comp.csv"))
    assert code == 1 and "slide2.tif" in out, out  # image 2 was not annotated in this test
    tidy = pd.read_csv(pdir / "comp.csv")
    assert set(tidy["slide"]) == {"slide1.tif"}
    comp = tidy.groupby("region")["count"].sum().to_dict()
    assert {names[k]: below[k] for k in regions} == comp
    assert all(comp.values()) and comp["outer"] > comp["inner"]
    direct: dict[str, int] = {}
    for e in m["files"]:
        key = names[e["parent"]] if e["parent"] else "root"
        direct[key] = direct.get(key, 0) + e["count"]
    assert res.images[0].parent_counts == direct and direct["root"] == below[None]


def test_cli_reports_fixed_uris_and_respects_no_fix_uris(tmp_path: Path, tiny_ckpt: Path) -> None:
    make_project(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    project = tmp_path / "b" / "proj" / "project.qpproj"
    common = ["--model", str(tiny_ckpt), "--tta", "1", "--workers", "0", "--device", "cpu",
              "--backend", "geojson", "--images", "2", "--detections-per-file", "5"]  # fmt: skip
    before = project.read_bytes()
    code, out = cli("annotate", str(project), *common, "--no-fix-uris")
    assert code == 0, out
    assert project.read_bytes() == before and "will not find 2 image(s)" in out
    code, out = cli("annotate", str(project), *common)
    assert code == 0, out
    assert "updated the image paths of 2 image(s)" in out and "project.qpproj.bak" in out
    assert str(tmp_path / "b" / "slides" / "slide2.tif") in out.replace("\n", "")
    m = json.loads((project.parent / "detections" / "2" / "manifest.json").read_text())
    assert all(e["count"] <= 5 for e in m["files"])
    code, out = cli("annotate", str(project), *common[:-2], "--detections-per-file", "0")
    assert code == 2
