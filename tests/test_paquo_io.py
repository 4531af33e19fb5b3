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


@pytest.mark.qupath
def test_paquo_backend_replaces_detections_and_keeps_annotations(tmp_path: Path) -> None:
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    img = synthetic_slide_image(256, 288, seed=4, tissue_fraction=0.7).image
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", img, mpp=0.5, levels=2)
    pdir = tmp_path / "proj"
    roi = shapely.box(30, 30, 230, 220)
    with QuPathProject(pdir, mode="x") as qp:
        entry = qp.add_image(slide, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        qp.path_classes = [QuPathPathClass("Tumor", color=(200, 0, 0))]
        entry.hierarchy.add_annotation(roi, path_class=qp.path_classes[0])
    project = pdir / "project.qpproj"

    s = settings(save_labels=False)
    res = annotate_project(project, stand_in_models(), s, backend="paquo")
    assert res.ok and res.backend == "paquo" and res.images[0].region_source == "paquo annotations"
    n = res.images[0].n_nuclei
    assert n > 5
    res2 = annotate_project(project, stand_in_models(), s, backend="paquo")
    assert res2.images[0].n_nuclei == n

    with QuPathProject(project, mode="r") as qp:
        h = qp.images[0].hierarchy
        dets = list(h.detections)
        assert len(dets) == n  # replaced, not doubled
        assert len(h.annotations) == 1 and h.annotations[0].roi.equals(roi)
        names = {pc.name for pc in qp.path_classes}
        assert {"Tumor", "dark", "pale"} <= names
        d = dets[0]
        assert d.path_class is not None and d.path_class.color is not None
        assert d.measurements["conic-qp"] == 1.0 and "Class probability" in d.measurements
    assert (project.with_name("project.qpproj.bak")).exists()
