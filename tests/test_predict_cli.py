"""`conic-qp predict`: options, batch failures (exit 1), resume, one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conic_qp.cli import main
from conic_qp.postprocess import PostprocessParams
from conic_qp.sinks.tables import read_table
from conic_qp.synthetic import synthetic_slide_image
from tests.helpers_models import make_tiny_checkpoint
from tests.helpers_slides import write_pyramidal_tiff

FAST = ["--tta", "1", "--no-mc-dropout", "--device", "cpu", "--workers", "0"]
TILES = ["--tile-size", "128", "--overlap", "64", "--batch-size", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for i, name in enumerate(("a.svs", "b.tif")):
        img = synthetic_slide_image(224, 256, seed=i, tissue_fraction=0.7).image
        write_pyramidal_tiff(folder / name, img, mpp=0.5, levels=2)
    return folder


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["predict", *args])
    return result.exit_code, result.output


def test_predict_folder_writes_outputs_and_resumes(
    ckpt: Path, slides: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, text = run(
        str(slides), "--model", str(ckpt), "-o", str(out), *FAST, *TILES, "--save-labels"
    )
    assert code == 0, text
    for stem in ("a", "b"):
        for suffix in (".nuclei.parquet", ".geojson.gz", ".run.json", ".labels.zarr"):
            assert (out / f"{stem}{suffix}").exists()
        run_json = json.loads((out / f"{stem}.run.json").read_text())
        table = read_table(out / f"{stem}.nuclei.parquet")
        assert run_json["complete"] and run_json["nuclei"] == len(table)
        assert run_json["settings"]["overlap"] == 64 and run_json["settings"]["tta"]["passes"] == 1
        assert run_json["settings"]["window"] == "gaussian" and run_json["settings"]["se_window"]
        assert run_json["models"][0]["path"] == str(ckpt.resolve())
    assert "2 slide(s) done" in text

    code, text = run(str(slides), "--model", str(ckpt), "-o", str(out), *FAST, *TILES, "--resume")
    assert code == 0 and "2 skipped" in text


def test_batch_continues_past_a_truncated_slide(ckpt: Path, slides: Path, tmp_path: Path) -> None:
    data = (slides / "a.svs").read_bytes()
    broken = tmp_path / "broken.svs"
    broken.write_bytes(data[: len(data) // 3])
    listing = tmp_path / "cohort.txt"
    listing.write_text(f"{broken}\n{slides / 'b.tif'}\nmissing.svs\n")
    out = tmp_path / "out"
    code, text = run(str(listing), "--model", str(ckpt), "-o", str(out), *FAST, *TILES)
    assert code == 1
    assert "2 slide(s) failed" in text and "broken.svs" in text and "missing.svs" in text
    assert (out / "b.run.json").exists() and not (out / "broken.run.json").exists()


def test_roi_thresholds_and_quiet(ckpt: Path, slides: Path, tmp_path: Path) -> None:
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps(PostprocessParams.uniform(2, min_size=30).to_json()))
    out = tmp_path / "out"
    args = [str(slides / "b.tif"), "--model", str(ckpt), "-o", str(out), *FAST, *TILES]
    code, text = run(*args, "--roi", "10,20,100,120", "--thresholds", str(thr), "-q")
    assert code == 0 and text.strip() == ""
    table = read_table(out / "b.nuclei.parquet")
    assert table["centroid_x"].between(10, 110).all() and table["centroid_y"].between(20, 140).all()
    assert (table["area_px"] >= 30).all()
    assert json.loads((out / "b.run.json").read_text())["thresholds_source"] == str(thr)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "pass --model"),
        (["--model", "/nonexistent/ckpt"], "does not exist"),
        (["--roi", "1,2,3"], "x,y,w,h"),
        (["--tile-size", "100"], "multiple of 32"),
        (["--overlap", "1024"], "smaller than the tile"),
        (["--se-window", "big"], "--se-window"),
        (["--se-window", "256"], "odd multiple of 32"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(
    ckpt: Path,
    slides: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An installation without the bundled model: no --model is then an error.
    monkeypatch.setattr("conic_qp.predict.default_model_path", lambda: None)
    if extra and extra[0] != "--model":
        extra = ["--model", str(ckpt), *extra]
    code, text = run(str(slides / "b.tif"), "-o", str(tmp_path), *FAST, *extra)
    assert code == 2, text
    assert message in text and len(text.strip().splitlines()) == 1


def test_blending_options_reach_the_run_record(ckpt: Path, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(slides / "b.tif"), "--model", str(ckpt), "-o", str(out), *FAST, *TILES]
    extra = [
        "--window",
        "crop",
        "--se-window",
        "global",
        "--block-size",
        "64",
        "--block-margin",
        "32",
    ]
    code, text = run(*args, *extra, "-q")
    assert code == 0, text
    run_json = json.loads((out / "b.run.json").read_text())
    assert run_json["blending"] == {
        "window": "crop", "overlap": 64, "se_window": None, "block_size": 64,
        "block_margin": 32, "nuclei_touching_block_edges": run_json["blending"]["nuclei_touching_block_edges"],
    }  # fmt: skip
    assert run_json["grid"]["blocks_total"] == 16  # 224 x 256 px in 64 px blocks
    code, _ = run(*args, "--halo", "40", "-q")  # deprecated, still accepted
    assert code == 0
    assert json.loads((out / "b.run.json").read_text())["settings"]["overlap"] == 96


def test_missing_mpp_fails_that_slide_with_a_hint(ckpt: Path, tmp_path: Path) -> None:
    img = synthetic_slide_image(128, 128, seed=0).image
    slide = write_pyramidal_tiff(tmp_path / "nompp.tif", img, mpp=None, levels=1)
    code, text = run(str(slide), "--model", str(ckpt), "-o", str(tmp_path / "o"), *FAST, *TILES)
    assert code == 1 and "--mpp" in text
    code, text = run(
        str(slide), "--model", str(ckpt), "-o", str(tmp_path / "o"), *FAST, *TILES, "--mpp", "0.5"
    )
    assert code == 0, text
