"""QuPath projects without Java: real projects of QuPath 0.2-0.7, moved projects, safety."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conic_qp.classes import CONIC, ClassScheme
from conic_qp.errors import ConicQPError, cli_flag, render
from conic_qp.qupath.classes import (
    argb_to_rgb,
    read_path_classes,
    rgb_to_argb,
    update_project_classes,
)
from conic_qp.qupath.project import (
    backup_file,
    detections_dir,
    ensure_project_writable,
    fix_image_uris,
    parse_remap,
    project_lock,
    qupath_file_uri,
    read_project,
    regions_path,
    uri_to_path_string,
    write_project,
)
from conic_qp.sinks.geojson import MANIFEST, MANIFEST_FORMAT, MARKER

REPO = Path(__file__).resolve().parents[1]

# (folder, version, number of images, first entry id, first image name)
REAL_PROJECTS = [
    ("stardist_example_v0.2/qupath_example_project", "0.2.0-m12", 2, "1", "Edu+_RFP+_(3).tif"),
    (
        "nedaghohabi_Histopathology-Image-Tiling_v0.3.2",
        "0.3.2",
        434,
        "1",
        "TCGA-D5-5539-01Z-00-DX1.9c46fe78-2adb-4f49-9141-cda135c2c90b.svs",
    ),
    (
        "orion-cirb_QuPath_Foci_v0.4.0",
        "0.4.0",
        44,
        "242",
        "381_P14_C1ql1-570_Cbln1-633_GFP-520_n2_1_w4CSU-6420000.tif",
    ),
    ("andrewzhang419_QuPath_v0.5.1", "0.5.1", 3, "1", "MTA3-8_GPC3 (2).svs"),
    ("sbalci_metadata-qupath_v0.6.0-rc3", "0.6.0-rc3", 107, "1", "kontrol15.01.25_14_6_134952.svs"),
    ("smith6jt-cop_SpleenFollicleCounterQP_v0.7.0", "0.7.0", 14, "1", "HDL011_PC33.ome.tiff"),
]


@pytest.mark.shared_data
@pytest.mark.parametrize(("folder", "version", "n", "first_id", "first_name"), REAL_PROJECTS)
def test_real_projects_parse(
    shared_data: Path, folder: str, version: str, n: int, first_id: str, first_name: str
) -> None:
    root = shared_data / "qupath" / "projects" / folder
    raw = json.loads((root / "project.qpproj").read_text(encoding="utf-8"))
    project = read_project(root)
    assert project.version == version
    assert len(project.images) == n == len(raw["images"])
    assert [im.entry_id for im in project.images] == [str(e["entryID"]) for e in raw["images"]]
    assert project.images[0].entry_id == first_id
    assert project.images[0].name == first_name
    for im in project.images:
        assert im.data_dir == root.resolve() / "data" / im.entry_id
        assert (im.path is None) == (im.problem is not None)


@pytest.mark.shared_data
def test_real_project_details(shared_data: Path) -> None:
    base = shared_data / "qupath" / "projects"
    # 0.2: images sit in the project's images/ folder; found relative to the old project uri
    p02 = read_project(base / "stardist_example_v0.2/qupath_example_project/project.qpproj")
    assert all(im.ok for im in p02.images)
    assert (
        p02.images[1].path
        == (
            base / "stardist_example_v0.2/qupath_example_project/images/Edu+_RFP+_(4).tif"
        ).resolve()
    )
    # 0.5.1: URL-encoded space, openslide provider, um/px from the metadata, entry 7 after 2
    p05 = read_project(base / "andrewzhang419_QuPath_v0.5.1")
    assert [im.entry_id for im in p05.images] == ["1", "2", "7"]
    assert p05.images[0].uri.endswith("MTA3-8_GPC3%20(2).svs")
    assert p05.images[0].mpp == pytest.approx(0.2532)
    assert p05.images[0].path is None and "MTA3-8_GPC3 (2).svs" in p05.images[0].problem
    # 0.6: Windows drive letters, percent-encoded Turkish letters, bioformats --series 0
    p06 = read_project(base / "sbalci_metadata-qupath_v0.6.0-rc3")
    im = p06.image(2)
    assert im.series == 0
    assert "E:/KONTROLHE_2025/ŞUBAT19.02.25_HE_0/" in im.problem
    # 0.4: non-micron calibration gives no mpp
    assert read_project(base / "orion-cirb_QuPath_Foci_v0.4.0").images[0].mpp is None


@pytest.mark.shared_data
def test_windows_project_remapped(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "qupath" / "projects" / "sbalci_metadata-qupath_v0.6.0-rc3"
    slide = tmp_path / "slides" / "OCAK15.01.25_HE_0" / "kontrol15.01.25_14_6_134952.svs"
    slide.parent.mkdir(parents=True)
    slide.write_bytes(b"x")
    p = read_project(src, remap=[f"e:\\KONTROLHE_2025={tmp_path / 'slides'}"])
    assert p.image(1).path == slide and p.image(1).ok
    assert not p.image(2).ok


def test_uri_to_path_string() -> None:
    assert uri_to_path_string("file:/C:/a%20b/c.svs") == "C:/a b/c.svs"
    assert uri_to_path_string("file:///home/u/x%2By.tif") == "/home/u/x+y.tif"
    assert uri_to_path_string("file:/home/u/%C5%9E.svs") == "/home/u/Ş.svs"
    assert uri_to_path_string("file://server/share/s.svs") == "//server/share/s.svs"
    assert uri_to_path_string("https://omero.example.org/webclient/?show=image-1") is None


def _slide(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00")
    return path


def test_write_project_reparses_and_is_minimal_valid(tmp_path: Path) -> None:
    a = _slide(tmp_path / "images" / "slide a.svs")
    b = _slide(tmp_path / "images" / "b.tif")
    file = write_project(tmp_path / "proj", [a, b])
    data = json.loads(file.read_text(encoding="utf-8"))
    for key in ("version", "createTimestamp", "modifyTimestamp", "uri", "lastID", "images"):
        assert key in data  # QuPath's loader needs all of these
    assert data["lastID"] == 2
    assert data["images"][0]["serverBuilder"]["uri"].endswith("slide%20a.svs")
    p = read_project(tmp_path / "proj")
    assert [im.entry_id for im in p.images] == ["1", "2"]
    assert [im.name for im in p.images] == ["slide a.svs", "b.tif"]
    assert [im.path for im in p.images] == [a.resolve(), b.resolve()]
    assert all(im.ok for im in p.images)
    with pytest.raises(ConicQPError, match="already exists"):
        write_project(tmp_path / "proj", [a])
    write_project(tmp_path / "proj", [a], overwrite=True)
    assert (tmp_path / "proj" / "project.qpproj.bak").exists()
    assert len(read_project(tmp_path / "proj").images) == 1


def test_moved_project_resolves_relative_and_remap(tmp_path: Path) -> None:
    old = tmp_path / "old"
    a = _slide(old / "cohort" / "images" / "a.svs")
    b = _slide(old / "elsewhere" / "deep" / "b.svs")
    write_project(old / "cohort" / "project", [a, b])
    # move the whole tree: a keeps its place relative to the project, b does not
    new = tmp_path / "new"
    (old).rename(new)
    p = read_project(new / "cohort" / "project")
    assert p.image(1).path == (new / "cohort" / "images" / "a.svs").resolve()
    assert (
        p.image(2).path == (new / "elsewhere" / "deep" / "b.svs").resolve()
    )  # same relative place
    # b moved somewhere unrelated: missing, with a problem, the project still loads
    moved_b = tmp_path / "archive" / "b.svs"
    moved_b.parent.mkdir()
    (new / "elsewhere" / "deep" / "b.svs").rename(moved_b)
    p = read_project(new / "cohort" / "project")
    assert p.image(1).ok and not p.image(2).ok
    assert "pass remap" in p.image(2).problem  # the CLI spells it --remap
    assert "--remap" in render(p.image(2).problem_template or "", cli_flag)
    # explicit remap of the old prefix
    p = read_project(
        new / "cohort" / "project", remap={str(old / "elsewhere" / "deep"): str(moved_b.parent)}
    )
    assert p.image(2).path == moved_b
    # suffix search: the image copied into the project folder
    _slide(new / "cohort" / "project" / "deep" / "b.svs")
    moved_b.unlink()
    p = read_project(new / "cohort" / "project")
    assert p.image(2).path == new / "cohort" / "project" / "deep" / "b.svs"
    assert not read_project(new / "cohort" / "project", search_relative=False).image(1).ok


def test_nested_and_special_builders(tmp_path: Path) -> None:
    a = _slide(tmp_path / "a.svs")
    write_project(tmp_path / "p", [a, a, a, a])
    file = tmp_path / "p" / "project.qpproj"
    data = json.loads(file.read_text())
    uri_builder = data["images"][0]["serverBuilder"]
    data["images"][1]["serverBuilder"] = {
        "builderType": "pyramidize",
        "builder": uri_builder,
        "metadata": {},
    }
    data["images"][2]["serverBuilder"] = {
        "builderType": "rotated",
        "rotation": "ROTATE_90",
        "builder": uri_builder,
    }
    data["images"][3]["serverBuilder"] = {
        "builderType": "uri",
        "uri": "https://omero.org/img/1",
        "args": [],
    }
    file.write_text(json.dumps(data))
    p = read_project(file)
    assert (
        p.images[1].ok
        and p.images[1].path == a.resolve()
        and p.images[1].builder_type == "pyramidize"
    )
    assert p.images[2].path == a.resolve() and "rotated" in p.images[2].problem
    assert p.images[3].path is None and "not a local file" in p.images[3].problem


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("", "empty"),
        ('{"version": "0.5.1"}', "not a QuPath project"),
        ('{"images": {}}', "not a list"),
        ('{"images": [{"imageName": "x"}]}', "no entryID"),
        ("[1, 2]", "not a QuPath project"),
    ],
)
def test_malformed_projects(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "project.qpproj").write_text(content)
    with pytest.raises(ConicQPError, match=match) as err:
        read_project(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_and_interrupted_projects(tmp_path: Path) -> None:
    with pytest.raises(ConicQPError, match="does not exist"):
        read_project(tmp_path / "nope" / "project.qpproj")
    with pytest.raises(ConicQPError, match="not a QuPath project folder"):
        read_project(tmp_path)
    (tmp_path / "project.qpproj.backup").write_text("{}")
    with pytest.raises(ConicQPError, match="interrupted"):
        read_project(tmp_path)


def test_locked_projects_are_refused(tmp_path: Path) -> None:
    a = _slide(tmp_path / "a.svs")
    file = write_project(tmp_path / "p", [a])
    assert ensure_project_writable(file) == file
    tmp = file.with_name("project.qpproj.tmp")  # QuPath mid-save (or crashed mid-save)
    tmp.write_text("{")
    with pytest.raises(ConicQPError, match="QuPath is saving"):
        ensure_project_writable(tmp_path / "p")
    tmp.unlink()
    with project_lock(tmp_path / "p"):
        with pytest.raises(ConicQPError, match="another conic-qp run"):
            with project_lock(tmp_path / "p"):
                pass
    assert not (tmp_path / "p" / ".conic-qp.lock").exists()
    if os.geteuid() != 0:  # root ignores permissions
        file.chmod(0o444)
        try:
            with pytest.raises(ConicQPError, match="read-only"):
                ensure_project_writable(file)
        finally:
            file.chmod(0o644)


def test_backup_file_never_overwrites(tmp_path: Path) -> None:
    f = tmp_path / "classes.json"
    assert backup_file(f) is None
    f.write_text("v1")
    b1 = backup_file(f)
    f.write_text("v2")
    b2 = backup_file(f)
    assert b1 == tmp_path / "classes.json.bak" and b1.read_text() == "v1"
    assert b2 != b1 and b2.read_text() == "v2" and b2.name.endswith(".bak")


def test_parse_remap() -> None:
    assert parse_remap(["/old/a=/new/a", "C:\\x = /mnt/x"]) == {
        "/old/a": "/new/a",
        "C:\\x": "/mnt/x",
    }
    with pytest.raises(ConicQPError, match="OLD_PREFIX=NEW_PREFIX"):
        parse_remap(["/only/old"])


def test_argb_packing_matches_qupath() -> None:
    assert rgb_to_argb((200, 0, 0)) == -3670016  # QuPath's "Tumor"
    assert argb_to_rgb(-3670016) == (200, 0, 0)
    assert rgb_to_argb((0, 0, 0)) == -16777216
    for rgb in [(255, 255, 255), (1, 2, 3), (0, 191, 255)]:
        assert argb_to_rgb(rgb_to_argb(rgb)) == rgb
        assert -(2**31) <= rgb_to_argb(rgb) < 2**31


def test_classes_merge_keeps_user_classes_and_backs_up(tmp_path: Path) -> None:
    path = tmp_path / "classifiers" / "classes.json"
    path.parent.mkdir()
    user = [{"name": "Tumor", "color": -3670016}, {"name": "epithelial", "color": -1}]
    path.write_text(json.dumps({"pathClasses": user}))
    added = update_project_classes(tmp_path, CONIC)
    assert "epithelial" not in added and set(added) == set(CONIC.names) - {"epithelial"}
    merged = read_path_classes(path)
    assert merged[:2] == user  # untouched, same order, same colour
    by_name = {c["name"]: c["color"] for c in merged}
    assert argb_to_rgb(by_name["lymphocyte"]) == CONIC.by_name("lymphocyte").color
    assert (
        json.loads((tmp_path / "classifiers" / "classes.json.bak").read_text())["pathClasses"]
        == user
    )
    # idempotent: nothing added, nothing rewritten, no second backup
    mtime = path.stat().st_mtime_ns
    assert update_project_classes(tmp_path, CONIC) == []
    assert path.stat().st_mtime_ns == mtime
    assert len(list(path.parent.glob("*.bak"))) == 1
    # another scheme adds its classes on top
    other = ClassScheme.from_names("x", ["tumour cell"])
    assert update_project_classes(tmp_path, other) == ["tumour cell"]
    final = [c["name"] for c in read_path_classes(path)]
    assert final == [c["name"] for c in merged] + ["tumour cell"]


def test_classes_created_with_qupath_defaults(tmp_path: Path) -> None:
    update_project_classes(tmp_path, CONIC)
    names = [c["name"] for c in read_path_classes(tmp_path / "classifiers" / "classes.json")]
    assert names[:2] == ["Tumor", "Stroma"] and names[-6:] == CONIC.names


def test_malformed_classes_json(tmp_path: Path) -> None:
    path = tmp_path / "classifiers" / "classes.json"
    path.parent.mkdir()
    path.write_text('{"pathClasses": [{"colour": 1}]}')
    with pytest.raises(ConicQPError, match="not a QuPath class list"):
        update_project_classes(tmp_path, CONIC)
    path.write_text("{oops")
    with pytest.raises(ConicQPError, match="cannot read"):
        update_project_classes(tmp_path, CONIC)


@pytest.mark.shared_data
def test_real_classes_json_merge(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "qupath" / "projects" / "smith6jt-cop_SpleenFollicleCounterQP_v0.7.0"
    dst = tmp_path / "classifiers"
    dst.mkdir()
    (dst / "classes.json").write_bytes((src / "classifiers" / "classes.json").read_bytes())
    before = read_path_classes(dst / "classes.json")
    update_project_classes(tmp_path, CONIC)
    after = read_path_classes(dst / "classes.json")
    assert after[: len(before)] == before and len(after) == len(before) + 6


def test_groovy_scripts_match_python_paths_and_marker(tmp_path: Path) -> None:
    imp = (REPO / "groovy" / "import_conic_qp.groovy").read_text(encoding="utf-8")
    exp = (REPO / "groovy" / "export_annotations_geojson.groovy").read_text(encoding="utf-8")
    det = detections_dir(tmp_path, 7)
    reg = regions_path(tmp_path, 7)
    assert re.search(rf"MARKER = '{re.escape(MARKER)}'", imp)
    assert f"DETECTIONS_DIR = '{det.parent.name}'" in imp and det.name == "7"
    assert f"MANIFEST = '{MANIFEST}'" in imp and f"MANIFEST_FORMAT = '{MANIFEST_FORMAT}'" in imp
    assert f"REGIONS_DIR = '{reg.parent.name}'" in exp
    assert f"SUFFIX = '{reg.name[1:]}'" in exp
    for text in (imp, exp):
        assert "0.4" in text and "0.7" in text  # versions in the header
        assert "getProjectEntry().getID()" in text or "entry.getID()" in text
        assert text.count("{") == text.count("}") and text.count("(") == text.count(")")
    # the manifest keys the script reads are those write_detection_folder writes
    for key in ("'files'", "'file'", "'count'", "'parent'", "'annotations'", "'area'", "'id'",
                "'regions_file'", "'format'"):  # fmt: skip
        assert key in imp
    # the command it documents has no --save: the script saves the images it changes itself
    assert (
        "QuPath script -p" in imp and "QuPath script -p /path/to/project.qpproj --save" not in imp
    )
    for call in ("readObjectsFromGeoJSON", "removeObjects", "addObjectBelowParent",
                 "insertPathObjects", "GZIPInputStream", "saveImageData", "BRIGHTFIELD_H_E",
                 "ImageType.UNSET", "setProperty"):  # fmt: skip
        assert call in imp
    assert "resolveHierarchy()" in imp.split("MissingMethodException")[1]  # only as fallback
    assert "exportObjectsToGeoJson" in exp and "FEATURE_COLLECTION" in exp


# ------------------------------------------------------------------------------ image URIs


@pytest.mark.parametrize(
    ("path", "ascii_only", "uri"),
    [
        ("/data/MTA3-8_GPC3 (2).svs", True, "file:/data/MTA3-8_GPC3%20(2).svs"),
        ("/data/ŞUBAT/k.svs", True, "file:/data/%C5%9EUBAT/k.svs"),
        ("/data/ŞUBAT/k.svs", False, "file:/data/ŞUBAT/k.svs"),
        ("/a/b#c%d?e[f]g.svs", True, "file:/a/b%23c%25d%3Fe%5Bf%5Dg.svs"),
        ("/a/~x!$&'()*+,;=:@y.tif", True, "file:/a/~x!$&'()*+,;=:@y.tif"),
    ],
)
def test_file_uri_is_the_form_java_writes(path: str, ascii_only: bool, uri: str) -> None:
    assert qupath_file_uri(path, ascii_only=ascii_only) == uri
    assert uri_to_path_string(uri) == path  # and it reads back


@pytest.mark.shared_data
def test_file_uris_equal_those_real_qupath_projects_store(shared_data: Path) -> None:
    """Every POSIX image URI of the real QuPath 0.4-0.7 projects is exactly what we would write."""
    checked = 0
    for folder in ("orion-cirb_QuPath_Foci_v0.4.0", "andrewzhang419_QuPath_v0.5.1",
                   "smith6jt-cop_SpleenFollicleCounterQP_v0.7.0"):  # fmt: skip
        data = json.loads(
            (shared_data / "qupath" / "projects" / folder / "project.qpproj").read_text()
        )
        for entry in data["images"]:
            uri = entry["serverBuilder"]["uri"]
            path = uri_to_path_string(uri)
            assert path is not None and path.startswith("/")
            assert qupath_file_uri(path) == uri
            checked += 1
        assert qupath_file_uri(uri_to_path_string(data["uri"]), ascii_only=False) == data["uri"]
    # Windows drives, non-ASCII (QuPath 0.6 writes UTF-8 escapes) and spaces, as strings
    data = json.loads(
        (
            shared_data
            / "qupath"
            / "projects"
            / "sbalci_metadata-qupath_v0.6.0-rc3"
            / "project.qpproj"
        ).read_text()
    )
    for entry in data["images"]:
        uri = entry["serverBuilder"]["uri"]
        path = uri_to_path_string(uri)
        assert path is not None and path[1] == ":"
        assert "file:/" + path[:2] + _quote_rest(path[2:]) == uri
        checked += 1
    assert checked > 150


def _quote_rest(rest: str) -> str:
    return qupath_file_uri(rest)[len("file:") :]


def test_fix_image_uris_rewrites_moved_images_in_qupath_form(tmp_path: Path) -> None:
    old = tmp_path / "old place"
    a = _slide(old / "proj" / "images" / "slide a.svs")
    b = _slide(old / "elsewhere" / "b.svs")
    write_project(old / "proj", [a, b])
    original = json.loads((old / "proj" / "project.qpproj").read_text())
    new = tmp_path / "moved"
    old.rename(new)
    file = new / "proj" / "project.qpproj"
    before = file.read_bytes()
    qp = read_project(file)
    assert all(im.ok and im.moved for im in qp.images)
    fixes, backup = fix_image_uris(qp)
    assert backup is not None and backup.read_bytes() == before
    assert [f.entry_id for f in fixes] == ["1", "2"]
    data = json.loads(file.read_text(encoding="utf-8"))
    uris = [e["serverBuilder"]["uri"] for e in data["images"]]
    assert uris == [
        "file:" + (new / "proj" / "images" / "slide%20a.svs").as_posix(),
        "file:" + (new / "elsewhere" / "b.svs").as_posix(),
    ]
    assert data["uri"] == "file:" + file.as_posix()  # every image found: the project's uri too
    # everything else is QuPath's as it was
    for key in ("version", "createTimestamp", "lastID"):
        assert data[key] == original[key]
    for e, o in zip(data["images"], original["images"], strict=True):
        assert {k: v for k, v in e.items() if k != "serverBuilder"} == {
            k: v for k, v in o.items() if k != "serverBuilder"
        }
        assert e["serverBuilder"]["args"] == o["serverBuilder"]["args"]
    again = read_project(file)
    assert all(im.ok and not im.moved for im in again.images)
    assert fix_image_uris(again) == ([], None)  # nothing moved: nothing written
    assert not list(file.parent.glob(".*.tmp"))


def test_fix_keeps_the_project_uri_while_an_image_is_missing(tmp_path: Path) -> None:
    a = _slide(tmp_path / "old" / "p" / "a.svs")
    b = _slide(tmp_path / "old" / "p" / "b.svs")
    write_project(tmp_path / "old" / "p", [a, b])
    data = json.loads((tmp_path / "old" / "p" / "project.qpproj").read_text())
    # a pyramidize wrapper around image 2: the nested uri is the one to fix
    data["images"][1]["serverBuilder"] = {
        "builderType": "pyramidize",
        "builder": data["images"][1]["serverBuilder"],
    }
    (tmp_path / "old" / "p" / "project.qpproj").write_text(json.dumps(data))
    (tmp_path / "old").rename(tmp_path / "new")
    (tmp_path / "new" / "p" / "a.svs").unlink()
    file = tmp_path / "new" / "p" / "project.qpproj"
    fixes, _ = fix_image_uris(read_project(file))
    assert [f.entry_id for f in fixes] == ["2"]
    out = json.loads(file.read_text())
    assert out["images"][1]["serverBuilder"]["builder"]["uri"] == fixes[0].new
    assert out["images"][0]["serverBuilder"]["uri"] == data["images"][0]["serverBuilder"]["uri"]
    assert out["uri"] == data["uri"]  # QuPath's search relative still needs the old one


def test_write_project_as_if_at_stores_no_local_path(tmp_path: Path) -> None:
    a = _slide(tmp_path / "proj" / "CMU 1.svs")
    file = write_project(tmp_path / "proj", [a], as_if_at="/path/to/examples/proj")
    text = file.read_text()
    assert str(tmp_path) not in text
    data = json.loads(text)
    assert data["uri"] == "file:/path/to/examples/proj/project.qpproj"
    assert data["images"][0]["serverBuilder"]["uri"] == "file:/path/to/examples/proj/CMU%201.svs"
    (im,) = read_project(file).images
    assert im.ok and im.moved and im.path == a.resolve()  # found beside the project
    with pytest.raises(ValueError, match="inside"):
        write_project(tmp_path / "other", [a], as_if_at="/x")
