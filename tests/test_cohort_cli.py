"""`conic-qp predict` as a cohort: manifest, blank slides as their own status, --strict, options
of --cluster (the Dask runs themselves are tested in test_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conic_qp.cli import main
from conic_qp.synthetic import synthetic_slide_image
from tests.helpers_models import make_tiny_checkpoint
from tests.helpers_slides import write_pyramidal_tiff

FAST = ["--tta", "1", "--no-mc-dropout", "--device", "cpu", "--workers", "0"]
TILES = ["--tile-size", "128", "--halo", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["predict", *args])
    return result.exit_code, result.output


def test_blank_slide_is_listed_not_failed_and_strict_fails(ckpt: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    img = synthetic_slide_image(224, 256, seed=3, tissue_fraction=0.7).image
    write_pyramidal_tiff(slides / "tissue.tif", img, mpp=0.5, levels=2)
    write_pyramidal_tiff(slides / "glass.tif", np.full((256, 256, 3), 245, np.uint8), mpp=0.5)
    out = tmp_path / "out"
    code, text = run(str(slides), "--model", str(ckpt), "-o", str(out), *FAST, *TILES)
    assert code == 0, text
    assert "1 slide(s) done" in text and "1 without tissue" in text and "glass.tif" in text
    manifest = pd.read_parquet(out / "manifest.parquet")
    rows = dict(zip(manifest["key"], manifest["status"], strict=True))
    assert rows == {"glass": "no_tissue", "tissue": "done"}
    assert "--no-tissue" not in str(manifest["error"][0])  # the record names the setting
    assert "tissue_detection=False" in str(manifest["error"][0])
    code, text = run(str(slides), "--model", str(ckpt), "-o", str(out), *FAST, *TILES,
                     "--resume", "--strict")  # fmt: skip
    assert code == 1 and "1 skipped" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cluster", "local:zero"], "--cluster 'local:zero'"),
        (["--cluster", "slurm"], "pass --cluster-config FILE.yaml"),
        (["--cluster-config", "x.yaml"], "--cluster-config needs --cluster"),
        (["--cluster", "somewhere"], "not local[:N]"),
    ],
)
def test_cluster_options_are_checked_before_anything_runs(
    ckpt: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    slide = write_pyramidal_tiff(
        tmp_path / "a.tif", synthetic_slide_image(128, 128, seed=0).image, mpp=0.5
    )
    out = tmp_path / "out"
    code, text = run(str(slide), "--model", str(ckpt), "-o", str(out), *FAST, *extra)
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists()
