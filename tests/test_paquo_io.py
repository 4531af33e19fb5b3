"""The paquo backend of `conic-qp annotate` (tests marked ``qupath`` need paquo + QuPath)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import torch

from conic_qp.annotate import annotate_project, choose_backend
from conic_qp.classes import CONIC
from conic_qp.errors import ConicQPError
from conic_qp.qupath import paquo_io
from conic_qp.synthetic import synthetic_slide_image
from tests.helpers_models import settings, stand_in_models
from tests.helpers_slides import write_pyramidal_tiff

torch.set_num_threads(1)
HAS_PAQUO = importlib.util.find_spec("paquo") is not None


def test_measurements_use_qupath_names_and_keep_nan() -> None:
    table = pd.DataFrame(
        {
            "class_prob": [0.9, 0.6],
            "area_um2": [30.0, np.nan],
            "solidity": [0.95, 0.9],
            "prob_lymphocyte": [0.9, 0.1],
            "unrelated": [1, 2],
        }
    )
    names, values = paquo_io.measurements_of(table, CONIC)
    assert names == [
        "Nucleus: Area µm^2",
        "Nucleus: Solidity",
        "Class probability",
        "Probability: lymphocyte",
    ]
    assert values.shape == (2, 4) and values.dtype == np.float64
    assert np.isnan(values[1, 0]) and values[0, 3] == pytest.approx(0.9)


@pytest.mark.skipif(HAS_PAQUO, reason="checks the messages given when paquo is missing")
def test_without_paquo_auto_is_geojson_and_paquo_is_a_clear_error() -> None:
    assert not paquo_io.paquo_available()
    assert choose_backend("auto") == "geojson"
    with pytest.raises(ConicQPError, match="paquo is not installed"):
        choose_backend("paquo")
    with pytest.raises(ConicQPError, match="unknown backend"):
        choose_backend("omero")  # type: ignore[arg-type]


def test_paquo_is_detected_the_way_paquo_finds_qupath(tmp_path: Path) -> None:
    """conftest's ``qupath`` marker and ``--backend auto`` use paquo's own finder (its settings,
    e.g. PAQUO_QUPATH_DIR), which accepts a QuPath folder by its layout."""
    pytest.importorskip("paquo")
    import platform

    from paquo._config import settings

    fake = tmp_path / "QuPath-0.5.1"
    if platform.system() != "Linux":
        pytest.skip("the fake QuPath layout below is Linux's")
    (fake / "lib" / "app").mkdir(parents=True)
    (fake / "lib" / "runtime" / "lib" / "server").mkdir(parents=True)
    old = settings.get("qupath_dir", "")
    try:
        settings.set("qupath_dir", str(fake))
        assert not paquo_io.paquo_available()  # no libjvm.so: not a QuPath
        (fake / "lib" / "runtime" / "lib" / "server" / "libjvm.so").write_bytes(b"")
        assert paquo_io.paquo_available()
    finally:
        settings.set("qupath_dir", old)
    assert paquo_io.paquo_available() == _real_qupath_found()


def _real_qupath_found() -> bool:
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath

        find_qupath(**to_kwargs(settings))
    except Exception:
        return False
    return True


@pytest.mark.skipif(not HAS_PAQUO, reason="needs paquo (without QuPath)")
def test_paquo_without_qupath_is_a_clear_error() -> None:
    if paquo_io.paquo_available():
        pytest.skip("QuPath is installed here")
    assert choose_backend("auto") == "geojson"
    with pytest.raises(ConicQPError, match="cannot find QuPath"):
        choose_backend("paquo")


def _paquo_project(tmp_path: Path, *, annotation: shapely.Geometry | None) -> Path:
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject

    img = synthetic_slide_image(256, 288, seed=4, tissue_fraction=0.7).image
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", img, mpp=0.5, levels=2)
    pdir = tmp_path / "proj"
    with QuPathProject(pdir, mode="x") as qp:
        entry = paquo_io.add_image_main_series(qp, slide)  # image type left "Not set"
        if annotation is not None:
            qp.path_classes = [QuPathPathClass("Tumor", color=(200, 0, 0))]
            entry.hierarchy.add_annotation(annotation, path_class=qp.path_classes[0])
    return pdir / "project.qpproj"


@pytest.mark.qupath
def test_paquo_backend_replaces_detections_and_keeps_annotations(tmp_path: Path) -> None:
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    roi = shapely.box(30, 30, 230, 220)
    project = _paquo_project(tmp_path, annotation=roi)
    s = settings(save_labels=False)
    res = annotate_project(project, stand_in_models(), s, backend="paquo")
    assert res.ok and res.backend == "paquo" and res.images[0].region_source == "paquo annotations"
    n = res.images[0].n_nuclei
    assert n > 5
    res2 = annotate_project(project, stand_in_models(), s, backend="paquo")
    assert res2.images[0].n_nuclei == n

    with QuPathProject(project, mode="r") as qp:
        image = qp.images[0]
        h = image.hierarchy
        dets = list(h.detections)
        assert len(dets) == n  # replaced, not doubled
        assert len(h.annotations) == 1 and h.annotations[0].roi.equals(roi)
        ann = h.annotations[0].java_object
        # every nucleus (inference ran inside the annotation) is a child of the annotation
        assert all(d.java_object.getParent() == ann for d in dets)
        names = [pc.name for pc in qp.path_classes]
        assert {"Tumor", "dark", "pale"} <= set(names)
        d = dets[0]
        assert d.path_class is not None and d.path_class.color is not None
        assert d.measurements["conic-qp"] == 1.0 and "Class probability" in d.measurements
        assert image.image_type == QuPathImageType.BRIGHTFIELD_H_E  # was "Not set"
    assert (project.with_name("project.qpproj.bak")).exists()


@pytest.mark.qupath
def test_paquo_adds_file_regions_to_an_image_without_annotations(tmp_path: Path) -> None:
    """Like the Groovy import: regions/<id>.geojson become annotations (with their UUIDs) and
    the nuclei sit below them; classes.json is merged as the geojson backend merges it."""
    import json
    import uuid

    from paquo.projects import QuPathProject

    from conic_qp.qupath.classes import QUPATH_DEFAULT_CLASSES

    project = _paquo_project(tmp_path, annotation=None)
    (project.parent / "classifiers" / "classes.json").unlink(missing_ok=True)
    rid = str(uuid.uuid4())
    region = shapely.box(40, 40, 200, 200)
    (project.parent / "regions").mkdir()
    (project.parent / "regions" / "1.geojson").write_text(
        json.dumps(
            {"type": "Feature", "id": rid, "geometry": shapely.geometry.mapping(region),
             "properties": {"objectType": "annotation", "name": "R",
                            "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
        )
    )  # fmt: skip
    res = annotate_project(project, stand_in_models(), settings(save_labels=False), backend="paquo")
    assert res.ok and res.images[0].region_source.endswith("1.geojson")
    with QuPathProject(project, mode="r") as qp:
        h = qp.images[0].hierarchy
        (ann,) = list(h.annotations)
        assert str(ann.java_object.getID()) == rid and ann.roi.equals(region)
        dets = list(h.detections)
        assert dets and all(d.java_object.getParent() == ann.java_object for d in dets)
        names = [pc.name for pc in qp.path_classes]
    # the same class list as the geojson backend: QuPath's defaults, then the model's classes
    assert names == [c["name"] for c in QUPATH_DEFAULT_CLASSES] + ["dark", "pale"]
    # a re-run does not add the regions twice
    annotate_project(project, stand_in_models(), settings(save_labels=False), backend="paquo")
    with QuPathProject(project, mode="r") as qp:
        assert len(qp.images[0].hierarchy.annotations) == 1
