"""Whole images put back together from overlapping or touching tiles, and scored whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from conic_qp.cli import main
from conic_qp.errors import ConicQPError
from conic_qp.synthetic import synthetic_dataset
from conic_qp.train.data import locate_tiles, read_tile_folder
from tests.helpers_models import make_tiny_checkpoint

SIZE = 256


def _source(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = synthetic_dataset(1, size=SIZE, seed=seed, n_classes=2)
    return images[0], labels[0, ..., 0].astype(np.int32), labels[0, ..., 1].astype(np.int32)


def _write_tiles(
    folder: Path, sources: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], tile: int,
    starts: list[int], order_seed: int = 0,
) -> None:  # fmt: skip
    """Cut each source into ``tile`` px tiles at ``starts`` (both axes), in a shuffled order,
    with per-tile instance ids 1..N and ``orig_instance_ids.json`` mapping them back."""
    for sub in ("images/test", "inst_png/test", "type_mat/test"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(
        json.dumps({"mpp": 0.5, "classes": {"1": "dark", "2": "pale"}})
    )
    ids: dict[str, list[int]] = {}
    rows = []
    rng = np.random.default_rng(order_seed)
    for src, (image, inst, cls) in sources.items():
        cells = [(y, x) for y in starts for x in starts]
        for k, (y, x) in enumerate(rng.permutation(cells)):
            name = f"test/{src}_{k:03d}"
            sl = (slice(y, y + tile), slice(x, x + tile))
            glob = inst[sl]
            present = np.unique(glob[glob > 0])
            local = np.searchsorted(present, glob) + 1
            local[glob == 0] = 0
            Image.fromarray(image[sl]).save(folder / "images" / f"{name}.png")
            Image.fromarray(local.astype(np.uint16)).save(folder / "inst_png" / f"{name}.png")
            classes = [int(cls[sl][glob == g][0]) for g in present]
            scipy.io.savemat(
                folder / "type_mat" / f"{name}.mat",
                {"inst_type": np.asarray(classes, dtype=np.int32).reshape(-1, 1)},
            )
            ids[name] = [int(g) for g in present]
            rows.append(f"{name},{src},test")
    (folder / "orig_instance_ids.json").write_text(json.dumps(ids))
    (folder / "patch_info.csv").write_text("tile,source_image,split\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize(
    ("tile", "starts"),
    [(96, [0, 80, 160]), (128, [0, 128]), (112, [0, 112, 144])],
    ids=["overlapping", "touching", "touching-then-flush"],
)
def test_tiles_are_put_back_into_the_source_image(
    tmp_path: Path, tile: int, starts: list[int]
) -> None:
    sources = {"imgA": _source(1), "imgB": _source(2)}
    _write_tiles(tmp_path, sources, tile, starts)
    data = read_tile_folder(tmp_path, split="test", whole_images=True)
    assert sorted(data.meta["name"]) == ["imgA", "imgB"]
    for i, name in enumerate(data.meta["name"]):
        image, inst, cls = sources[name]
        assert np.array_equal(data.images[i], image)
        assert np.array_equal(data.inst_maps[i], inst)
        assert np.array_equal(data.class_maps[i], np.where(inst > 0, cls, 0))


def test_tiles_without_shared_nuclei_are_placed_by_their_images() -> None:
    image, _, _ = _source(3)
    starts = [0, 128]
    tiles = [(y, x) for y in starts for x in starts]
    empty = [np.zeros((128, 128), np.int32) for _ in tiles]  # no label evidence at all
    crops = [image[y : y + 128, x : x + 128] for y, x in tiles]
    origins = locate_tiles(empty, crops)
    assert origins.tolist() == [list(t) for t in tiles]
    with pytest.raises(ConicQPError, match="cannot be related"):
        locate_tiles(empty)


def test_whole_images_need_the_id_file(tmp_path: Path) -> None:
    _write_tiles(tmp_path, {"imgA": _source(1)}, 128, [0, 128])
    (tmp_path / "orig_instance_ids.json").unlink()
    with pytest.raises(ConicQPError, match=r"orig_instance_ids\.json"):
        read_tile_folder(tmp_path, split="test", whole_images=True)


def test_evaluate_whole_images_reports_both_protocols(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_tiles(data, {"imgA": _source(1), "imgB": _source(2)}, 128, [0, 128])
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    res = CliRunner().invoke(
        main,
        [
            "evaluate", "--model", str(ckpt), "--data", f"tiles:{data}@test", "--whole-images",
            "--device", "cpu", "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"tiles", "whole_images"}
    whole = out["whole_images"]
    assert sorted(whole["per_image"]) == ["imgA", "imgB"]
    for key in ("pq", "dq", "sq", "aji", "f1_detection", "mpq_plus"):
        assert 0.0 <= whole[key] <= 1.0
    assert whole["pq"] == pytest.approx(np.mean([r["pq"] for r in whole["per_image"].values()]))
    assert set(whole["f1_per_class"]) == {"dark", "pale"}
    assert set(out["tiles"]) == {"pq", "mpq_plus", "pq_per_class", "r2", "r2_per_class"}

    table = CliRunner().invoke(
        main,
        ["evaluate", "--model", str(ckpt), "--data", f"tiles:{data}@test", "--whole-images",
         "--device", "cpu"],
    )  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "whole images" in table.output and "AJI" in table.output

    bad = CliRunner().invoke(main, ["evaluate", "--pred", "p.npy", "--whole-images"])
    assert bad.exit_code != 0 and "--model" in bad.output
