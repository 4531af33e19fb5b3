"""Whole-slide engine: tiled output equals whole-image output, outputs, ROI, batches, resume.

Seams are tested with :class:`HematoxylinNet`, a fixed "network" whose outputs are a local
function of the hematoxylin stain (receptive field 5 px, inside the part of a tile the blending
window trusts): nuclei are where hematoxylin is high, their interior where the smoothed nucleus
probability is high, and the class is dark vs pale. It computes in float64 and rounds its
probabilities away from every threshold, so the reference (the whole image at batch 1) and the
engine (tiles at batch 3, blended in float64) see identical numbers on any processor: the
whole-vs-tiled comparison checks geometry (tiles, blending, block ownership, panels), not
arithmetic. The real ConicNet path runs end to end with a tiny random encoder, compared across
tilings, batch sizes and thread counts with tolerances for float32 noise.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from skimage.color import hed_from_rgb

from conic_qp.cohort import predict_paths
from conic_qp.engine import SlideEngine, segment_image
from conic_qp.errors import ConicQPError
from conic_qp.metrics import match_instances
from conic_qp.plan import plan_slide
from conic_qp.postprocess import PostprocessParams, postprocess
from conic_qp.predict import (
    ModelSet,
    PredictSettings,
    Progress,
    expand_inputs,
    load_models,
    predict_slide,
    resolve_device,
    roi_from_boxes,
    slide_stem,
)
from conic_qp.sinks.tables import read_table
from conic_qp.slides import ImageSource
from conic_qp.synthetic import synthetic_slide_image
from conic_qp.tta import TTAConfig
from tests.helpers_models import (
    DARK_PALE,
    SYNTH_H,
    HematoxylinNet,
    make_tiny_checkpoint,
    settings,
    stand_in_models,
)
from tests.helpers_slides import write_pyramidal_tiff

torch.set_num_threads(1)


def whole_image_labels(image: np.ndarray, models: ModelSet) -> np.ndarray:
    """The reference: the network on the whole image at once (reflect-padded to x32)."""
    h, w = image.shape[:2]
    ph, pw = -h % 32, -w % 32
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = models.networks[0](x)
    sem = torch.softmax(out["semantic"], 1)[0, :, :h, :w].numpy()
    three = torch.softmax(out["three_label"], 1)[0, :, :h, :w].numpy()
    return postprocess(sem, three, models.params).labels


def read_labels(path: Path) -> tuple[np.ndarray, dict[str, object]]:
    import zarr

    arr = zarr.open_array(str(path), mode="r")
    return np.asarray(arr[:]), dict(arr.attrs)


def assert_same_instances(whole: np.ndarray, tiled: np.ndarray, table: pd.DataFrame) -> None:
    """>= 99% of whole-image nuclei found at IoU > 0.5, nothing extra, nothing twice."""
    n_whole = len(np.unique(whole)) - 1
    ids = np.unique(tiled)
    ids = ids[ids > 0]
    assert n_whole > 20
    stats = match_instances(whole, tiled)
    assert stats.tp >= 0.99 * n_whole, (stats, n_whole)
    assert stats.fp <= 0.01 * n_whole, (stats, n_whole)
    # every table row is one label of the map and vice versa: no nucleus written twice
    assert len(table) == ids.size
    np.testing.assert_array_equal(np.sort(table["label"].to_numpy()), ids)
    assert table["id"].is_unique
    assert abs(len(table) - n_whole) <= 0.01 * n_whole


@pytest.fixture(scope="module")
def synth() -> np.ndarray:
    return synthetic_slide_image(416, 384, seed=3, tissue_fraction=0.6).image


TILINGS = [
    # tile, overlap, window, panel width: several panels hand over blended columns
    (128, 64, "gaussian", 128),
    (128, 32, "crop", 128),
    (192, 64, "constant", 192),
    (256, 128, "gaussian", 4096),
]


@pytest.mark.parametrize(("tile", "overlap", "window", "panel"), TILINGS)
def test_tiled_equals_whole_image_on_synthetic_slide(
    synth: np.ndarray, tmp_path: Path, tile: int, overlap: int, window: str, panel: int
) -> None:
    models = stand_in_models()
    whole = whole_image_labels(synth, models)
    src = ImageSource(synth, 0.5, name="synth.png")
    s = settings(tile_size=tile, overlap=overlap, window=window, panel_width=panel)
    res = predict_slide(src, models, s, tmp_path)
    assert res.plan is not None and (len(res.plan.panels) > 1) == (panel < 384)
    tiled, attrs = read_labels(res.outputs["labels"])
    table = read_table(res.outputs["table"])
    assert tiled.shape == synth.shape[:2] and attrs["mpp"] == 0.5
    assert_same_instances(whole, tiled, table)
    # the exact case: a local model gives exactly the whole-image instances, pixel for pixel
    assert match_instances(whole, tiled).tp == len(np.unique(whole)) - 1
    np.testing.assert_array_equal(whole > 0, tiled > 0)
    assert res.n_nuclei == len(table) == sum(res.class_counts.values())


def test_blended_probabilities_equal_the_whole_image_exactly(synth: np.ndarray) -> None:
    """Gaussian blending of tiles that agree returns their value bit for bit, across panels."""
    models = stand_in_models()
    s = settings(tissue_detection=False)
    h, w = synth.shape[:2]
    x = torch.from_numpy(synth).permute(2, 0, 1)[None].float().div_(255.0)
    with torch.no_grad():
        out = models.networks[0](x)
    sem = torch.softmax(out["semantic"].float(), 1)[0].numpy()
    three = torch.softmax(out["three_label"].float(), 1)[0].numpy()
    src = ImageSource(synth, 0.5, name="synth.png")
    plan = plan_slide(src, 0.5, s)
    assert len(plan.panels) == 3
    seen = np.zeros((h, w), bool)
    for b in SlideEngine(src, plan, models, s).blended():
        c = b.block.context
        np.testing.assert_array_equal(b.semantic, sem[:, c.y0 : c.y1, c.x0 : c.x1])
        np.testing.assert_array_equal(b.three_label, three[:, c.y0 : c.y1, c.x0 : c.x1])
        seen[c.slices] = True
    assert seen.all()


def test_engine_is_an_iterator_of_owned_blocks(synth: np.ndarray, tmp_path: Path) -> None:
    """Consumed in memory, the engine gives what predict_slide writes, block by block."""
    models = stand_in_models()
    src = ImageSource(synth, 0.5, name="synth.png")
    s = settings()
    plan = plan_slide(src, models.mpp, s)
    engine = SlideEngine(src, plan, models, s, want_labels=True)
    blocks = list(engine)
    assert len(blocks) == engine.n_blocks > 10
    offsets = [b.label_offset for b in blocks]
    assert offsets == list(np.cumsum([0] + [b.n for b in blocks[:-1]]))
    ids = [i for b in blocks for i in b.table["id"]]
    assert len(ids) == len(set(ids)) == engine.n_nuclei
    for b in blocks:  # each block's nuclei have their reference point in its core
        core = b.block.core
        cx = (b.table["centroid_x"] - 0.5).to_numpy()  # level-0 = model px here
        assert ((cx >= core.x0 - 1) & (cx < core.x1 + 1)).all()
        assert b.labels is not None and b.labels.shape == b.block.context.shape
        assert b.labels.max(initial=0) == b.n
    written = read_table(predict_slide(src, models, s, tmp_path).outputs["table"])
    assert list(written["id"]) == ids
    assert engine.tiles_done == len(plan.selected)
    assert set(engine.stats) >= {"read_s", "network_s", "blend_s", "postprocess_s", "wait_s"}


def test_too_small_block_margin_fails_the_whole_vs_tiled_check(
    synth: np.ndarray, tmp_path: Path
) -> None:
    """The check above can fail: without a margin, nuclei on block seams are cut in two."""
    models = stand_in_models()
    whole = whole_image_labels(synth, models)
    src = ImageSource(synth, 0.5, name="synth.png")
    res = predict_slide(src, models, settings(block_size=48, block_margin=0), tmp_path)
    tiled, _ = read_labels(res.outputs["labels"])
    with pytest.raises(AssertionError):
        assert_same_instances(whole, tiled, read_table(res.outputs["table"]))
    run = json.loads(res.outputs["run"].read_text())
    assert run["blending"]["nuclei_touching_block_edges"] > 0


def test_image_smaller_than_a_tile_is_one_tile_of_its_own_size() -> None:
    """Labelled tiles (e.g. 128 px CoNIC/CoNSeP tiles) are smaller than the network tile."""
    image = synthetic_slide_image(100, 90, seed=7, tissue_fraction=0.9).image
    models = stand_in_models()
    labels, table = segment_image(image, 0.5, models, settings(tile_size=512, overlap=128))
    whole = whole_image_labels(image, models)
    assert labels.shape == (100, 90)
    n = len(np.unique(whole)) - 1
    assert n > 3 and match_instances(whole, labels).tp == n and len(table) == n
    plan = plan_slide(ImageSource(image, 0.5), 0.5, settings(tile_size=512, tissue_detection=False))
    assert plan.tiles.tile_shape == (128, 96) and len(plan.selected) == 1


def test_tiled_equals_whole_image_when_slide_is_resampled(tmp_path: Path) -> None:
    """A 0.25 um/px slide read at the model's 0.5 um/px: tiles resample like the whole image."""
    fine = synthetic_slide_image(640, 576, seed=5, mpp=0.25, tissue_fraction=0.6).image
    src = ImageSource(fine, 0.25, name="fine.png")
    models = stand_in_models()
    whole = whole_image_labels(src.read((0, 0, 576, 640), 0.5), models)
    res = predict_slide(src, models, settings(), tmp_path)
    tiled, attrs = read_labels(res.outputs["labels"])
    assert tiled.shape == (320, 288) and attrs["scale_level0"] == pytest.approx(2.0)
    table = read_table(res.outputs["table"])
    assert_same_instances(whole, tiled, table)
    # the table is in level-0 px of the slide: centroids land on the nuclei of the fine image
    lab = tiled[(table["centroid_y"] / 2).astype(int), (table["centroid_x"] / 2).astype(int)]
    assert (lab == table["label"].to_numpy()).mean() > 0.95
    assert table["area_px"].median() == pytest.approx(
        4 * np.median(np.bincount(tiled.ravel())[1:]), rel=0.25
    )


@pytest.mark.shared_data
def test_tiled_equals_whole_image_on_real_tissue(shared_data: Path, tmp_path: Path) -> None:
    from conic_qp.slides import open_slide

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        crop = slide.read((700, 1200, 448, 384), slide.mpp, size=(448, 384))
    od = -np.log(np.clip(crop.astype(np.float32) / 255, 1e-6, 1))
    h = (od @ hed_from_rgb.astype(np.float32))[..., 0]
    models = stand_in_models((float(np.percentile(h, 85)), float(np.percentile(h, 95))))
    whole = whole_image_labels(crop, models)
    res = predict_slide(ImageSource(crop, 0.5, "cmu-crop"), models, settings(), tmp_path)
    tiled, _ = read_labels(res.outputs["labels"])
    assert_same_instances(whole, tiled, read_table(res.outputs["table"]))


def test_roi_keeps_exactly_the_nuclei_whose_centroid_is_inside(
    synth: np.ndarray, tmp_path: Path
) -> None:
    models = stand_in_models()
    src = ImageSource(synth, 0.5, name="synth.png")
    full = read_table(predict_slide(src, models, settings(), tmp_path / "full").outputs["table"])
    roi = roi_from_boxes([(40, 60, 150, 120), (300, 250, 100.5, 160)])
    res = predict_slide(src, models, settings(), tmp_path / "roi", roi=roi)
    part = read_table(res.outputs["table"])
    inside = shapely.contains_xy(roi, full["centroid_x"], full["centroid_y"])
    assert 0 < len(part) < len(full)
    assert set(part["id"]) == set(full.loc[inside, "id"])
    labels, _ = read_labels(res.outputs["labels"])
    assert set(np.unique(labels)) - {0} == set(part["label"])
    run = json.loads(res.outputs["run"].read_text())
    assert (
        run["roi"].startswith("MULTIPOLYGON")
        and run["grid"]["tiles_run"] < run["grid"]["tiles_total"]
    )


def test_outputs_run_json_and_geojson(synth: np.ndarray, tmp_path: Path) -> None:
    models = stand_in_models()
    events: list[Progress] = []
    res = predict_slide(
        ImageSource(synth, 0.5, name="s1.png"), models, settings(), tmp_path, events.append
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "s1.nuclei.parquet",
        "s1.geojson.gz",
        "s1.labels.zarr",
        "s1.run.json",
    }
    table = read_table(res.outputs["table"])
    assert table.attrs["conic_qp"]["classes"]["classes"][0]["name"] == "dark"
    assert table.attrs["conic_qp"]["mpp"] == 0.5
    with gzip.open(res.outputs["geojson"], "rt") as fh:
        fc = json.load(fh)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(table)
    feat = fc["features"][0]
    assert feat["properties"]["classification"]["color"] and feat["id"] in set(table["id"])
    run = json.loads(res.outputs["run"].read_text())
    assert run["complete"] is True and run["nuclei"] == len(table)
    assert run["class_counts"] == table["class_name"].value_counts().to_dict()
    assert run["settings"]["tile_size"] == 128 and run["settings"]["tta"]["passes"] == 1
    assert run["version"] == 2 and run["blending"]["window"] == "gaussian"
    assert run["runtime"] == ["torch"]
    assert run["mc_dropout"] == [False]  # settings(): 1 pass, no MC dropout
    assert run["settings"]["overlap"] == 64 and run["settings"]["se_window"] == 160
    assert run["grid"]["panels"] == 3 and run["grid"]["tiles_run"] == res.n_tiles
    assert {"read_s", "network_s", "blend_s", "postprocess_s", "write_s", "total_s"} <= set(
        run["timings"]
    )
    assert run["slide"]["mpp"] == 0.5 and run["model_mpp"] == 0.5
    # Densities are per tissue area: the synthetic slide is partly glass.
    w, h = run["slide"]["dimensions"]
    assert 0.1 * w * h < run["tissue_area_px"] < 0.95 * w * h and run["roi_area_px"] is None
    # progress: tile counts grow to the total, the last event says done
    tiles = [e for e in events if e.stage == "tiles"]
    assert tiles[-1].tiles_done == tiles[-1].tiles_total == res.n_tiles
    assert events[-1].stage == "done" and events[-1].nuclei == len(table)
    # re-running replaces (no duplicates, no temporary files left)
    predict_slide(ImageSource(synth, 0.5, name="s1.png"), models, settings(), tmp_path)
    assert len(read_table(res.outputs["table"])) == len(table)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_that_fails_midway_leaves_the_previous_outputs(
    synth: np.ndarray, tmp_path: Path
) -> None:
    """Writers build under temporary names: a crash in the middle changes nothing on disk."""
    models = stand_in_models()
    src = ImageSource(synth, 0.5, name="s1.png")
    first = predict_slide(src, models, settings(), tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    table = read_table(first.outputs["table"])

    class Broken(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            self.calls += 1
            if self.calls > 4:
                raise RuntimeError("device lost")
            return self.net(x)

    broken = ModelSet([Broken(models.networks[0])], models.classes, 0.5, models.params)
    with pytest.raises(RuntimeError, match="device lost"):
        predict_slide(src, broken, settings(), tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    pd.testing.assert_frame_equal(read_table(first.outputs["table"]), table)


@pytest.mark.slow  # starting worker processes takes seconds on a busy 2-core machine
def test_worker_processes_give_the_same_result_as_inline(synth: np.ndarray, tmp_path: Path) -> None:
    models = stand_in_models()
    src = ImageSource(synth, 0.5, name="synth.png")
    a = predict_slide(src, models, settings(workers=0), tmp_path / "a")
    b = predict_slide(src, models, settings(workers=2, batch_size=2), tmp_path / "b")
    ta, tb = read_table(a.outputs["table"]), read_table(b.outputs["table"])
    pd.testing.assert_frame_equal(ta, tb)
    np.testing.assert_array_equal(
        read_labels(a.outputs["labels"])[0], read_labels(b.outputs["labels"])[0]
    )


def test_background_tiles_are_skipped_without_losing_nuclei(tmp_path: Path) -> None:
    tissue = synthetic_slide_image(256, 192, seed=2, tissue_fraction=0.8).image
    image = np.concatenate([np.full((256, 320, 3), 244, np.uint8), tissue], axis=1)
    src = ImageSource(image, 0.5, name="half.png")
    models = stand_in_models()
    on = predict_slide(src, models, settings(), tmp_path / "on")
    off = predict_slide(src, models, settings(tissue_detection=False), tmp_path / "off")
    assert on.n_tiles < off.n_tiles
    ids_on = set(read_table(on.outputs["table"])["id"])
    assert len(ids_on) > 10 and ids_on == set(read_table(off.outputs["table"])["id"])


def test_blank_slide_is_a_clear_error(tmp_path: Path) -> None:
    blank = np.full((256, 256, 3), 245, np.uint8)
    with pytest.raises(ConicQPError, match="no tissue"):
        predict_slide(ImageSource(blank, 0.5, "glass"), stand_in_models(), settings(), tmp_path)
    assert not list(tmp_path.glob("glass*"))


# ------------------------------------------------------------------ real ConicNet end to end


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _slide_file(folder: Path, name: str = "slide.tif", seed: int = 0) -> Path:
    img = synthetic_slide_image(320, 288, seed=seed, tissue_fraction=0.7).image
    return write_pyramidal_tiff(folder / name, img, mpp=0.25, levels=2)


def test_conicnet_batch_with_tta_is_reproducible_and_resumable(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    good = _slide_file(slides)
    bad = slides / "broken.tif"
    data = _slide_file(tmp_path, "whole.tif", seed=1).read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    models = load_models([tiny_ckpt], device="cpu")
    assert models.classes.names == ["dark", "pale"] and models.params.classes[0].min_size == 4
    s = settings(tta=TTAConfig(passes=2, mc_dropout=True), seed=7, save_labels=False)
    paths, missing = expand_inputs([slides])
    assert paths == [bad, good] and not missing

    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    r1 = predict_paths(paths, models, s, out1)
    assert list(r1.failures) == [str(bad)] and "truncated" in r1.failures[str(bad)]
    assert [r.name for r in r1.results] == ["slide.tif"]
    t1 = read_table(out1 / "slide.nuclei.parquet")
    assert r1.results[0].n_nuclei == len(t1) > 0
    assert not (out1 / "slide.labels.zarr").exists()
    run = json.loads((out1 / "slide.run.json").read_text())
    assert run["models"][0]["weights_sha256"] and run["slide"]["mpp"] == 0.25
    assert run["settings"]["tta"]["mc_dropout"] is True and run["settings"]["seed"] == 7
    # level-0 coordinates of a 0.25 um/px slide read at 0.5 um/px
    assert t1["centroid_x"].max() <= 288 and t1["centroid_y"].max() <= 320
    assert t1["area_um2"].to_numpy() == pytest.approx(t1["area_px"].to_numpy() * 0.25**2)

    r2 = predict_paths([good], models, s, out2)
    pd.testing.assert_frame_equal(t1, read_table(out2 / "slide.nuclei.parquet"))  # same seed
    assert r2.ok

    # resume skips a complete run of the same model, and reruns when thresholds change
    before = os.stat(out2 / "slide.nuclei.parquet").st_mtime_ns
    r3 = predict_paths([good], models, s, out2, resume=True)
    assert r3.results[0].skipped and r3.results[0].n_nuclei == len(t1)
    assert os.stat(out2 / "slide.nuclei.parquet").st_mtime_ns == before
    other = ModelSet(
        models.networks,
        models.classes,
        models.mpp,
        PostprocessParams.uniform(2, seed=0.75, min_size=4, min_solidity=0.0),
        models.info,
    )
    r4 = predict_paths([good], other, s, out2, resume=True)
    assert not r4.results[0].skipped


def test_conicnet_results_survive_batch_size_and_thread_changes(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """The real network through the same tiles at other batch sizes / thread counts.

    CPU kernels pick other algorithms for other batch shapes and thread counts, so the
    probabilities differ by float32 rounding (up to ~1e-3 after the network's amplification)
    and a few pixels near a threshold flip. That is arithmetic noise, not a seam: nearly every
    nucleus must still match at IoU > 0.5.
    """
    models = load_models([tiny_ckpt], device="cpu")
    img = synthetic_slide_image(320, 288, seed=4, tissue_fraction=0.7).image
    src = ImageSource(img, 0.5, name="noise.png")
    threads = torch.get_num_threads()
    labels = []
    try:
        for n_threads, batch in ((1, 1), (2, 3), (1, 4)):
            torch.set_num_threads(n_threads)
            res = predict_slide(src, models, settings(batch_size=batch), tmp_path / f"b{batch}")
            labels.append(read_labels(res.outputs["labels"])[0])
    finally:
        torch.set_num_threads(threads)
    n = len(np.unique(labels[0])) - 1
    assert n > 20
    for other in labels[1:]:
        stats = match_instances(labels[0], other)
        assert stats.tp >= 0.97 * n and stats.fp <= 0.03 * n, (stats, n)


def test_conicnet_tiled_equals_whole_image_up_to_float_noise(tiny_ckpt: Path) -> None:
    """The real network, tiled vs one whole-image tile.

    The tiny ConicNet's output near a tile edge differs from the whole-image output (its
    convolutions pad with zeros); measured on it, the difference falls below 1e-6 (float32
    noise) beyond ~100 px from the edge. With 256 px tiles overlapping by 192 px and the crop
    window every pixel comes from a tile in which it lies >= 96 px from any inner edge, so the
    tiled probabilities equal the whole-image ones up to float noise (tolerance 2e-5; the
    conv algorithms differ between the two input shapes), and so do the instances but for a
    pixel or two at a threshold. The same check with tiles that do not overlap (but for the last,
    flush one: pixels down to 32 px from an edge, difference ~5e-4) fails: the tolerance is
    tight enough to see the tiling.
    """
    models = load_models([tiny_ckpt], device="cpu")
    img = synthetic_slide_image(448, 416, seed=4, tissue_fraction=0.8).image
    big = settings(block_size=512, block_margin=64, panel_width=512)  # one block: tiling alone
    whole_s = settings(tile_size=448, overlap=0, block_size=512, panel_width=448)

    def probabilities(s: PredictSettings) -> np.ndarray:
        src = ImageSource(img, 0.5, name="x.png")
        s = dataclasses.replace(s, tissue_detection=False)
        (blended,) = list(SlideEngine(src, plan_slide(src, 0.5, s), models, s).blended())
        return np.concatenate([blended.semantic, blended.three_label])

    whole = probabilities(whole_s)
    near = dataclasses.replace(big, tile_size=256, overlap=192, window="crop")
    assert np.abs(probabilities(near) - whole).max() < 2e-5
    far = dataclasses.replace(big, tile_size=256, overlap=0, window="crop")
    assert np.abs(probabilities(far) - whole).max() > 1e-4
    lab_whole, _ = segment_image(img, 0.5, models, whole_s)
    lab_tiled, _ = segment_image(img, 0.5, models, near)
    n = len(np.unique(lab_whole)) - 1
    stats = match_instances(lab_whole, lab_tiled)
    assert n > 20 and stats.tp >= 0.99 * n and stats.fp <= 0.01 * n, (stats, n)


def test_expand_inputs_folders_globs_and_lists(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.tiff").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "list.txt").write_text("# cohort\na.svs\n\nmissing.svs\n")
    paths, missing = expand_inputs([tmp_path / "list.txt", str(tmp_path / "*.tiff"), "nope.svs"])
    assert paths == [tmp_path / "a.svs", tmp_path / "b.tiff"]
    assert set(missing) == {"missing.svs", "nope.svs"}
    paths, _ = expand_inputs([tmp_path])
    assert paths == [tmp_path / "a.svs", tmp_path / "b.tiff"]
    assert slide_stem("x/CMU-1.svs") == "CMU-1" and slide_stem("a.ome.tiff") == "a"


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ConicQPError, match="x,y,w,h"):
        roi_from_boxes([(1, 2, 3)])
    with pytest.raises(ConicQPError, match="positive"):
        roi_from_boxes([(1, 2, 0, 5)])
    with pytest.raises(ConicQPError, match="multiple of 32"):
        PredictSettings(tile_size=100)
    with pytest.raises(ConicQPError, match="smaller than the tile"):
        PredictSettings(tile_size=128, overlap=128)
    with pytest.raises(ConicQPError, match="multiple of 32"):
        PredictSettings(overlap=100)
    with pytest.raises(ConicQPError, match="odd multiple of 32"):
        PredictSettings(se_window=256)
    with pytest.raises(ConicQPError, match="panel width"):
        PredictSettings(panel_width=0)
    assert PredictSettings(tile_size=256, halo=40).overlap == 96  # the former halo, deprecated
    with pytest.raises(ConicQPError, match="thresholds are for 6 classes"):
        ModelSet([HematoxylinNet(*SYNTH_H)], DARK_PALE, 0.5, PostprocessParams.default(6))
    with pytest.raises(ConicQPError, match="pass model"):
        load_models([])
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConicQPError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_inference_matches_cpu(tiny_ckpt: Path, tmp_path: Path) -> None:
    slide = _slide_file(tmp_path)
    tables = []
    for dev in ("cpu", "cuda"):
        models = load_models([tiny_ckpt], device=dev)
        s = settings(device=dev, amp=False, save_labels=False)
        predict_paths([slide], models, s, tmp_path / dev)
        tables.append(read_table(tmp_path / dev / "slide.nuclei.parquet"))
    cpu, gpu = tables
    # float differences may flip a few threshold decisions, not the result as a whole
    assert abs(len(cpu) - len(gpu)) <= max(2, 0.02 * len(cpu))
    common = set(cpu["id"]) & set(gpu["id"])
    assert len(common) >= 0.95 * len(cpu)


@pytest.mark.gpu
def test_stand_in_tiled_equals_whole_image_on_cuda(synth: np.ndarray, tmp_path: Path) -> None:
    """Tiles, blending (float64 on the device) and block ownership on CUDA: the exact case."""
    cuda = torch.device("cuda")
    models = stand_in_models().to(cuda)
    x = torch.from_numpy(synth).permute(2, 0, 1)[None].float().div_(255.0).to(cuda)
    with torch.no_grad():
        out = models.networks[0](x)
    sem = torch.softmax(out["semantic"].float(), 1)[0].cpu().numpy()
    three = torch.softmax(out["three_label"].float(), 1)[0].cpu().numpy()
    whole = postprocess(sem, three, models.params).labels
    src = ImageSource(synth, 0.5, name="synth.png")
    res = predict_slide(src, models, settings(device="cuda", amp=False), tmp_path)
    tiled, _ = read_labels(res.outputs["labels"])
    n = len(np.unique(whole)) - 1
    assert n > 20 and match_instances(whole, tiled).tp == n
    np.testing.assert_array_equal(whole > 0, tiled > 0)
    assert json.loads(res.outputs["run"].read_text())["device"].startswith("cuda")
