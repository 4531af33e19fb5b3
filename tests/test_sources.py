"""Slides by reference: SlideRef round trips, input expansion, QuPath entries, the scheme registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conic_qp.errors import ConicQPError
from conic_qp.qupath.project import write_project
from conic_qp.slides import ImageSource
from conic_qp.sources import (
    SlideRef,
    expand_refs,
    is_dicom_folder,
    open_ref,
    parse_ref,
    project_refs,
    register_scheme,
    registered_schemes,
)
from tests.helpers_slides import smooth_image, write_pyramidal_tiff


def test_slide_ref_round_trips_through_json() -> None:
    refs = [
        SlideRef.file("slides/a b.svs"),
        SlideRef("omero", "omero://host:4064/image/12", name="img", mpp=0.25),
        SlideRef.file("/x/y.tif", project="/p/project.qpproj", entry_id="3", problem="missing"),
    ]
    for ref in refs:
        back = SlideRef.from_json(json.loads(json.dumps(ref.to_json())))
        assert back == ref
    assert refs[0].name == "a b.svs" and refs[0].uri.endswith("/slides/a%20b.svs")
    assert refs[0].uri.startswith("file:///") and refs[1].uri == "omero://host:4064/image/12"
    with pytest.raises(ValueError, match="not a file"):
        _ = refs[1].path
    with pytest.raises(ValueError, match="unknown SlideRef fields"):
        SlideRef.from_json({"scheme": "file", "location": "a", "colour": 1})


def test_expand_refs_keeps_expand_inputs_semantics(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.tiff").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "list.txt").write_text("# cohort\na.svs\n\nmissing.svs\n")
    refs, missing = expand_refs([tmp_path / "list.txt", str(tmp_path / "*.tiff"), "nope.svs"])
    assert [r.path for r in refs] == [tmp_path / "a.svs", tmp_path / "b.tiff"]
    assert set(missing) == {"missing.svs", "nope.svs"}
    assert "listed in" in missing["missing.svs"]
    refs, _ = expand_refs([tmp_path, tmp_path / "a.svs"])  # duplicates once
    assert [r.path for r in refs] == [tmp_path / "a.svs", tmp_path / "b.tiff"]
    refs, _ = expand_refs([(tmp_path / "a.svs").as_uri()])
    assert refs[0].path == tmp_path / "a.svs"


def test_a_folder_of_dicom_files_is_one_slide(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    dicom = cohort / "case1"
    dicom.mkdir(parents=True)
    for level in range(3):
        (dicom / f"level{level}.dcm").write_bytes(b"x")
    (cohort / "b.svs").write_bytes(b"x")
    assert is_dicom_folder(dicom) and not is_dicom_folder(cohort)
    refs, missing = expand_refs([cohort])
    assert [r.path for r in refs] == [cohort / "b.svs", dicom] and not missing
    refs, _ = expand_refs([dicom])
    assert [r.path for r in refs] == [dicom]


def _project(tmp_path: Path) -> Path:
    slides = tmp_path / "slides"
    slides.mkdir()
    paths = [
        write_pyramidal_tiff(slides / f"s{i}.tif", smooth_image(64, 64, i), mpp=0.5, levels=1)
        for i in range(2)
    ]
    project = write_project(tmp_path / "proj", paths)
    data = json.loads(project.read_text())
    # an OMERO image as QuPath's OMERO extension stores it, and a third, missing file
    data["images"].append(
        {
            "serverBuilder": {
                "builderType": "uri",
                "providerClassName": "qupath.ext.omero.core.imageserver.OmeroImageServerBuilder",
                "uri": "https://omero.example.org/webclient/?show%3Dimage-4321",
                "args": [],
            },
            "entryID": 3,
            "imageName": "omero image",
        }
    )
    data["images"][1]["serverBuilder"]["uri"] = "file:/nowhere/s1.tif"
    data["images"][0]["serverBuilder"]["metadata"] = {
        "pixelCalibration": {"pixelWidth": {"value": 0.25, "unit": "µm"}}
    }
    project.write_text(json.dumps(data))
    return project


def test_qupath_entries_become_references(tmp_path: Path) -> None:
    seen: list[str] = []

    def parse(text: str) -> SlideRef | None:
        seen.append(text)
        if "webclient/?show" in text.replace("%3D", "="):
            return SlideRef("omero", "omero://omero.example.org/image/4321")
        return None

    saved = registered_schemes()["omero"]
    register_scheme("omero", saved.open, parse=parse, requires=saved.requires)
    try:
        qp, refs = project_refs(_project(tmp_path))
        assert [r.entry_id for r in refs] == ["1", "2", "3"]
        first, missing, omero = refs
        assert first.is_file and first.path.name == "s0.tif" and first.mpp == 0.25
        assert first.project == str(qp.path) and first.problem is None
        assert missing.problem is not None and "not found" in missing.problem
        assert omero.scheme == "omero" and omero.location.endswith("/image/4321")
        assert omero.name == "omero image" and omero.entry_id == "3" and omero.problem is None
        with pytest.raises(ConicQPError, match="not found"):
            open_ref(missing)
        # a project given as an input expands to its entries
        listed, _ = expand_refs([qp.path])
        assert [r.entry_id for r in listed] == ["1", "2", "3"]
    finally:
        register_scheme(
            "omero", saved.open, parse=saved.parse, expand=saved.expand,
            requires=saved.requires, install=saved.install,
        )  # fmt: skip


def test_registry_opens_by_scheme_and_uses_calibration_only_as_a_fallback(
    tmp_path: Path,
) -> None:
    image = smooth_image(40, 50)
    opened: list[tuple[str, float | None]] = []

    def opener(ref: SlideRef, mpp: float | None = None) -> ImageSource:
        opened.append((ref.location, mpp))
        if mpp is None and "nompp" in ref.location:
            from conic_qp.errors import MppError

            raise MppError(f"{ref.name} has no um/px")
        return ImageSource(image, mpp or 0.5, name=ref.name)

    register_scheme(
        "mem", opener, parse=lambda t: SlideRef("mem", t) if t.startswith("mem://") else None
    )
    try:
        ref = parse_ref("mem://nompp")
        assert ref is not None and ref.scheme == "mem"
        calibrated = SlideRef("mem", "mem://nompp", mpp=0.3)
        with open_ref(calibrated) as src:
            assert src.mpp == 0.3  # the metadata had none: the project's calibration
        with open_ref(calibrated, mpp=0.4) as src:
            assert src.mpp == 0.4  # an explicit value wins
        with open_ref(SlideRef("mem", "mem://ok", mpp=0.3)) as src:
            assert src.mpp == 0.5  # the slide's own metadata wins over the calibration
        with pytest.raises(ConicQPError, match="no um/px"):
            open_ref(SlideRef("mem", "mem://nompp"))
        assert opened[0] == ("mem://nompp", None) and opened[1] == ("mem://nompp", 0.3)
        refs, missing = expand_refs(["mem://a", "mem://a"])
        assert [r.location for r in refs] == ["mem://a"] and not missing
    finally:
        from conic_qp import sources

        sources._SCHEMES.pop("mem")
    with pytest.raises(ConicQPError, match="unknown slide reference scheme"):
        open_ref(SlideRef("mem", "mem://a"))


def test_omero_references_without_the_omero_module_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name.startswith("conic_qp.omero") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    ref = parse_ref("omero://host/image/5")
    assert ref is not None and ref.scheme == "omero"
    assert parse_ref("https://example.org/page") is None
    with pytest.raises(ConicQPError, match="omero extra"):
        open_ref(ref)


def test_file_references_open_slides(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "a.tif", smooth_image(48, 64), mpp=0.5, levels=2)
    with open_ref(SlideRef.file(path)) as src:
        assert src.dimensions == (64, 48) and src.mpp == 0.5
        assert np.array_equal(src.read((0, 0, 64, 48), 0.5), src.read((0, 0, 64, 48), 0.5))
