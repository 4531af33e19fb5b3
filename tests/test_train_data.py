"""Training data readers, resampling, tiling, class mapping and splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from conic_qp.classes import CONIC, CONSEP, ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.synthetic import synthetic_dataset, synthetic_tile
from conic_qp.train.data import (
    CONSEP_TO_CONIC,
    IGNORE,
    NUCLS_TO_CONIC,
    LabelledSet,
    class_lut,
    concat_sets,
    make_split,
    read_conic,
    read_label_image,
    read_lizard,
    read_nucls,
    read_tile_folder,
    resample_labelled,
    retile,
    save_conic_patches,
    split_by_centre,
    split_by_source,
    split_from_file,
    split_official,
    split_random,
)


def _loadmat(path: Path) -> dict:
    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}


CONIC_NAMES = ["consep_1-0000", "glas_2-0001", "crag_3-0002", "glas_4-0000"]


# --------------------------------------------------------------------------- CoNIC


@pytest.fixture
def conic_dir(tmp_path: Path) -> Path:
    images, labels = synthetic_dataset(4, size=64, seed=0)
    return save_conic_patches(tmp_path / "conic", images, labels, CONIC_NAMES)


def test_read_conic(conic_dir: Path) -> None:
    data = read_conic(conic_dir)
    images, labels = synthetic_dataset(4, size=64, seed=0)
    assert isinstance(data.images, np.memmap)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.inst_maps, labels[..., 0])
    assert data.class_maps is not None and data.inst_maps.dtype == np.int32
    np.testing.assert_array_equal(data.class_maps, labels[..., 1])
    assert data.scheme is CONIC and data.mpp == 0.5
    assert data.meta["source"].tolist() == ["consep_1", "glas_2", "crag_3", "glas_4"]
    assert data.meta["centre"].tolist() == ["consep", "glas", "crag", "glas"]
    counts = pd.read_csv(conic_dir / "counts.csv")
    assert list(counts.columns) == CONIC.names and counts.to_numpy().sum() > 0


def test_read_conic_class_mapping_keeps_source_without(conic_dir: Path) -> None:
    two = ClassScheme.from_names("two", ["immune", "other"])
    mapping = {
        "neutrophil": "immune",
        "lymphocyte": "immune",
        "plasma": "immune",
        "eosinophil": "immune",
        "epithelial": "other",
        "connective": "ignore",
    }
    data = read_conic(conic_dir, class_mapping=mapping, target_scheme=two)
    src = read_conic(conic_dir).class_maps
    assert data.scheme is two and data.class_maps is not None and src is not None
    np.testing.assert_array_equal(data.class_maps[np.isin(src, [1, 3, 4, 5])], 1)
    np.testing.assert_array_equal(data.class_maps[src == 2], 2)
    np.testing.assert_array_equal(data.class_maps[src == 6], IGNORE)
    np.testing.assert_array_equal(data.class_maps[src == 0], 0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "labels.npy").unlink(), "labels.npy not found"),
        (
            lambda d: np.save(d / "labels.npy", np.zeros((3, 64, 64, 2), np.int32)),
            "differ in count",
        ),
        (lambda d: np.save(d / "labels.npy", np.full((4, 64, 64, 2), 7, np.int32)), "outside"),
        (lambda d: np.save(d / "labels.npy", np.zeros((4, 64, 64), np.int32)), r"\(N, H, W, 2\)"),
        (lambda d: np.save(d / "images.npy", np.zeros((4, 64, 64, 3), np.float32)), "uint8"),
        (lambda d: np.save(d / "images.npy", np.zeros((4, 64, 64), np.uint8)), "RGB"),
        (lambda d: pd.DataFrame({"patch_info": ["a-1"]}).to_csv(d / "patch_info.csv"), "rows"),
        (lambda d: pd.DataFrame({"x": [1]}).to_csv(d / "counts.csv"), "counts.csv has 1 rows"),
    ],
)
def test_read_conic_errors(conic_dir: Path, mutate, message: str) -> None:
    mutate(conic_dir)
    with pytest.raises(ConicQPError, match=message):
        read_conic(conic_dir)


def test_read_conic_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConicQPError, match="not found"):
        read_conic(tmp_path / "nope")


# --------------------------------------------------------------------------- Lizard


def _write_lizard(root: Path, name: str, size: tuple[int, int], seed: int) -> np.ndarray:
    t = synthetic_tile(size, seed=seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(exist_ok=True)
    Image.fromarray(t.image).save(root / "images" / f"{name}.png")
    k = len(t.inst_classes)
    order = np.random.default_rng(seed).permutation(k)  # rows not in id order
    ids = (order + 1)[:, None]
    scipy.io.savemat(
        root / "Labels" / f"{name}.mat",
        {
            "inst_map": t.inst_map.astype(np.float64),
            "id": ids,
            "class": t.inst_classes[order][:, None],
            "bbox": np.zeros((k, 4)),
            "centroid": np.zeros((k, 2)),
        },
    )
    return t.class_map


def test_read_lizard_tiles_and_classes_by_id(tmp_path: Path) -> None:
    class_a = _write_lizard(tmp_path, "crag_1", (100, 140), 1)
    _write_lizard(tmp_path, "glas_2", (70, 64), 2)
    data = read_lizard(tmp_path, tile_size=64)
    # crag_1: rows at 0, 36; columns at 0, 64, 76 -> 6 tiles; glas_2: rows 0, 6 -> 2 tiles
    assert len(data) == 8 and data.tile_shape == (64, 64)
    assert data.meta["centre"].tolist() == ["crag"] * 6 + ["glas"] * 2
    row = data.meta.index[data.meta["name"] == "crag_1@36,76"][0]
    assert data.class_maps is not None
    np.testing.assert_array_equal(data.class_maps[row], class_a[36:100, 76:140])
    with pytest.raises(ConicQPError, match="different sizes"):
        read_lizard(tmp_path, tile_size=None)


def test_read_lizard_errors(tmp_path: Path) -> None:
    _write_lizard(tmp_path, "crag_1", (64, 64), 1)
    (tmp_path / "images" / "crag_1.png").unlink()
    with pytest.raises(ConicQPError, match=r"crag_1\.png"):
        read_lizard(tmp_path)
    _write_lizard(tmp_path, "crag_1", (64, 64), 1)
    m = _loadmat(tmp_path / "Labels" / "crag_1.mat")
    m["class"][0, 0] = 7
    scipy.io.savemat(tmp_path / "Labels" / "crag_1.mat", m)
    with pytest.raises(ConicQPError, match="outside the class list"):
        read_lizard(tmp_path)
    m["class"][0, 0] = 1
    m["id"], m["class"] = m["id"][1:], m["class"][1:]
    scipy.io.savemat(tmp_path / "Labels" / "crag_1.mat", m)
    with pytest.raises(ConicQPError, match="has no class entry"):
        read_lizard(tmp_path)
    with pytest.raises(ConicQPError, match="no Labels"):
        read_lizard(tmp_path / "images")


# --------------------------------------------------------------------------- tile folders


def _write_tiles(root: Path, *, classes: bool = True, mpp: float | None = 0.25) -> dict:
    """Four 64 px tiles (train/a, train/b, test/c, test/d) at 0.25 um/px in CoNSeP layout."""
    truth = {}
    rows = []
    for i, rel in enumerate(["train/a", "train/b", "test/c", "test/d"]):
        t = synthetic_tile(64, n_nuclei=8, n_classes=4, seed=i, mpp=0.25)
        for d in ("images", "inst_png", "type_mat") if classes else ("images", "inst_png"):
            (root / d / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(t.image).save(root / "images" / f"{rel}.png")
        Image.fromarray(t.inst_map.astype(np.uint16)).save(root / "inst_png" / f"{rel}.png")
        if classes:
            scipy.io.savemat(
                root / "type_mat" / f"{rel}.mat", {"inst_type": t.inst_classes[:, None]}
            )
        truth[rel] = t
        rows.append({"tile": rel, "source_image": f"img{i // 2}", "split": rel.split("/")[0]})
    pd.DataFrame(rows).to_csv(root / "patch_info.csv", index=False)
    declared: dict = {
        "classes": {
            "0": "background",
            "1": "other",
            "2": "inflammatory",
            "3": "epithelial",
            "4": "spindle",
        }
    }
    if mpp is not None:
        declared["mpp"] = mpp
    (root / "classes.json").write_text(json.dumps(declared))
    return truth


def test_read_tile_folder_native(tmp_path: Path) -> None:
    truth = _write_tiles(tmp_path)
    data = read_tile_folder(tmp_path, centre="consep")
    assert data.scheme is CONSEP and data.mpp == 0.25 and len(data) == 4
    assert data.meta["split"].tolist() == ["test", "test", "train", "train"]  # sorted paths
    assert data.meta["source"].tolist() == ["img1", "img1", "img0", "img0"]
    assert set(data.meta["centre"]) == {"consep"}
    i = data.meta.index[data.meta["name"] == "train/b"][0]
    np.testing.assert_array_equal(data.images[i], truth["train/b"].image)
    np.testing.assert_array_equal(data.inst_maps[i], truth["train/b"].inst_map)
    assert data.class_maps is not None
    np.testing.assert_array_equal(data.class_maps[i], truth["train/b"].class_map)


def test_read_tile_folder_resampled_mapped_and_split(tmp_path: Path) -> None:
    truth = _write_tiles(tmp_path)
    data = read_tile_folder(
        tmp_path, split="train", target_mpp=0.5, class_mapping=CONSEP_TO_CONIC, target_scheme=CONIC
    )
    assert len(data) == 2 and data.tile_shape == (32, 32) and data.mpp == 0.5
    assert data.scheme is CONIC and data.class_maps is not None
    for i, name in enumerate(data.meta["name"]):
        t = truth[name]
        ids = np.unique(data.inst_maps[i])
        assert set(ids.tolist()) <= set(np.unique(t.inst_map).tolist())
        for k in ids[ids > 0]:
            src = t.inst_classes[k - 1]
            want = {1: IGNORE, 2: IGNORE, 3: 2, 4: 6}[int(src)]
            assert set(np.unique(data.class_maps[i][data.inst_maps[i] == k])) == {want}
    assert split_official(read_tile_folder(tmp_path).meta["split"].tolist()).val.size == 2


def test_read_tile_folder_unlabelled(tmp_path: Path) -> None:
    _write_tiles(tmp_path, classes=False, mpp=None)
    with pytest.raises(ConicQPError, match="declares no um/px"):
        read_tile_folder(tmp_path)
    data = read_tile_folder(tmp_path, mpp=0.25)
    assert data.class_maps is None and data.scheme is None and not data.labelled
    with pytest.raises(ConicQPError, match="cannot apply"):
        read_tile_folder(tmp_path, mpp=0.25, class_mapping=CONSEP_TO_CONIC, target_scheme=CONIC)


def _errors_cases() -> list:
    def missing_inst(d: Path) -> None:
        (d / "inst_png" / "train" / "a.png").unlink()

    def shape_mismatch(d: Path) -> None:
        Image.fromarray(np.zeros((10, 10), np.uint16)).save(d / "inst_png" / "train" / "a.png")

    def grey(d: Path) -> None:
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "images" / "train" / "a.png")

    def class_out_of_range(d: Path) -> None:
        m = _loadmat(d / "type_mat" / "train" / "a.mat")
        m["inst_type"][0, 0] = 5
        scipy.io.savemat(d / "type_mat" / "train" / "a.mat", m)

    def too_few_rows(d: Path) -> None:
        scipy.io.savemat(d / "type_mat" / "train" / "a.mat", {"inst_type": np.ones((1, 1))})

    def missing_mat(d: Path) -> None:
        (d / "type_mat" / "train" / "a.mat").unlink()

    def no_images(d: Path) -> None:
        for p in (d / "images").rglob("*.png"):
            p.unlink()

    def bad_json(d: Path) -> None:
        (d / "classes.json").write_text("{nope")

    return [
        (missing_inst, "instance map for tile train/a not found"),
        (shape_mismatch, "does not match image"),
        (grey, "not an 8-bit RGB image"),
        (class_out_of_range, "outside the class list"),
        (too_few_rows, "has no class entry"),
        (missing_mat, "class file for tile train/a not found"),
        (no_images, "no images"),
        (bad_json, "not valid JSON"),
    ]


@pytest.mark.parametrize(("mutate", "message"), _errors_cases())
def test_read_tile_folder_errors(tmp_path: Path, mutate, message: str) -> None:
    _write_tiles(tmp_path)
    mutate(tmp_path)
    with pytest.raises(ConicQPError, match=message):
        read_tile_folder(tmp_path)


def test_read_tile_folder_empty_split_and_bad_mapping(tmp_path: Path) -> None:
    _write_tiles(tmp_path)
    with pytest.raises(ConicQPError, match="no tiles of split 'val'"):
        read_tile_folder(tmp_path, split="val")
    with pytest.raises(ConicQPError, match=r"\['other'\].*no mapping"):
        read_tile_folder(
            tmp_path,
            class_mapping={"inflammatory": "ignore", "epithelial": 2, "spindle": "connective"},
            target_scheme=CONIC,
        )
    with pytest.raises(ConicQPError, match="unknown class name"):
        class_lut(CONSEP, CONIC, {**CONSEP_TO_CONIC, "spindle": "fibroblast"})


# --------------------------------------------------------------------------- resampling, tiling


def test_resample_labelled_literal() -> None:
    inst = np.kron(np.array([[1, 2], [0, 3]], np.int32), np.ones((2, 2), np.int32))
    cls = np.kron(np.array([[4, 5], [0, 6]], np.int32), np.ones((2, 2), np.int32))
    image = np.stack([inst * 60] * 3, axis=-1).astype(np.uint8)
    img, small, small_cls = resample_labelled(image, inst, cls, 0.5)
    np.testing.assert_array_equal(small, [[1, 2], [0, 3]])
    np.testing.assert_array_equal(small_cls, [[4, 5], [0, 6]])
    assert img.shape == (2, 2, 3) and img.dtype == np.uint8
    _, big, _ = resample_labelled(image, inst, None, 2.0)
    np.testing.assert_array_equal(big, np.kron(inst, np.ones((2, 2), np.int32)))


def _set(images: np.ndarray, inst: np.ndarray, cls: np.ndarray | None) -> LabelledSet:
    n = len(images)
    meta = pd.DataFrame(
        {
            "name": [f"t{i}" for i in range(n)],
            "source": ["s"] * n,
            "split": [""] * n,
            "centre": [""] * n,
        }
    )
    return LabelledSet(images, inst, cls, meta, None if cls is None else CONIC, 0.5)


def test_retile_covers_image_and_pads_small_ones() -> None:
    images, labels = synthetic_dataset(1, size=100, seed=1)
    tiled = retile(_set(images, labels[..., 0], labels[..., 1]), size=64)
    assert len(tiled) == 4 and tiled.meta["name"].tolist()[-1] == "t0@36,36"
    np.testing.assert_array_equal(tiled.inst_maps[3], labels[0, 36:, 36:, 0])
    np.testing.assert_array_equal(tiled.images[1], images[0, :64, 36:])
    small = retile(_set(images[:, :40, :50], labels[:, :40, :50, 0], None), size=64)
    assert len(small) == 1 and small.class_maps is None
    assert (small.images[0, 40:] == 255).all() and (small.inst_maps[0, :, 50:] == 0).all()
    np.testing.assert_array_equal(small.inst_maps[0, :40, :50], labels[0, :40, :50, 0])


def test_labelled_set_validation_and_concat() -> None:
    images, labels = synthetic_dataset(2, size=32, seed=2)
    with pytest.raises(ConicQPError, match="uint8 RGB"):
        _set(images.astype(np.float32), labels[..., 0], None)
    with pytest.raises(ConicQPError, match="do not match"):
        _set(images, labels[:, :16, :, 0], None)
    a = _set(images, labels[..., 0], labels[..., 1])
    b = _set(images, labels[..., 0], None)
    b.meta["name"] = ["u0", "u1"]
    both = concat_sets([a, b])
    assert len(both) == 4 and both.scheme is CONIC and both.class_maps is not None
    np.testing.assert_array_equal(both.class_maps[2][labels[0, ..., 0] > 0], IGNORE)
    np.testing.assert_array_equal(both.class_maps[:2], labels[..., 1])
    with pytest.raises(ConicQPError, match="repeat"):
        concat_sets([a, a])
    sub = both.subset([3, 0])
    assert sub.meta["name"].tolist() == ["u1", "t0"]


# --------------------------------------------------------------------------- splits


def test_split_random_paper_sizes() -> None:
    s = split_random(4981, 500, seed=0)
    assert s.train.size == 4481 and s.val.size == 500
    assert np.intersect1d(s.train, s.val).size == 0
    np.testing.assert_array_equal(s.val, split_random(4981, 500, seed=0).val)
    assert not np.array_equal(s.val, split_random(4981, 500, seed=1).val)
    with pytest.raises(ConicQPError):
        split_random(10, 10)


def test_split_by_source_and_centre() -> None:
    sources = [f"img{i // 3}" for i in range(30)]
    s = split_by_source(sources, val_fraction=0.2, seed=1)
    val_src = {sources[i] for i in s.val}
    assert val_src.isdisjoint({sources[i] for i in s.train}) and s.val.size >= 6
    centres = ["crag", "glas", "glas", "consep"]
    c = split_by_centre(centres, "glas")
    assert c.val.tolist() == [1, 2] and c.train.tolist() == [0, 3]
    with pytest.raises(ConicQPError, match="not in the data"):
        split_by_centre(centres, "pannuke")
    with pytest.raises(ConicQPError, match="empty"):
        split_by_centre(["glas", "glas"], "glas")


def test_split_from_file_and_official(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    f = tmp_path / "val.txt"
    f.write_text("# validation tiles\nb\n\nc  # last\n")
    assert split_from_file(names, f).val.tolist() == [1, 2]
    f.write_text("b\nzz\n")
    with pytest.raises(ConicQPError, match="not in the data"):
        split_from_file(names, f)
    with pytest.raises(ConicQPError, match="not found"):
        split_from_file(names, tmp_path / "missing.txt")
    assert split_official(["train", "test", "train"]).val.tolist() == [1]
    with pytest.raises(ConicQPError, match="no official split"):
        split_official(["", ""])
    with pytest.raises(ConicQPError, match="empty"):
        split_official(["train", "train"])


def test_make_split_specs(conic_dir: Path, tmp_path: Path) -> None:
    data = read_conic(conic_dir)
    assert make_split(data, "centre:glas").val.tolist() == [1, 3]
    assert make_split(data, "random", n_val=1).val.size == 1
    assert make_split(data, "source", n_val=1).val.size >= 1
    (tmp_path / "v.txt").write_text("crag_3-0002\n")
    assert make_split(data, f"file:{tmp_path / 'v.txt'}").val.tolist() == [2]
    with pytest.raises(ConicQPError, match="no official split"):
        make_split(data, "official")
    with pytest.raises(ConicQPError, match="unknown split"):
        make_split(data, "bogus")


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_consep_resampled_keeps_instance_ids(shared_data: Path) -> None:
    root = shared_data / "consep"
    half = read_tile_folder(root, split="test", target_mpp=0.5)
    assert half.scheme is CONSEP and half.mpp == 0.5 and len(half) == 224
    assert half.tile_shape == (128, 128)  # 256 px tiles at 0.25 um/px, halved
    assert set(half.meta["split"]) == {"test"} and half.class_maps is not None
    kept = total = 0
    for i in range(0, len(half), 16):
        name = half.meta["name"][i]
        inst = read_label_image(root / "inst_png" / f"{name}.png")
        types = scipy.io.loadmat(root / "type_mat" / f"{name}.mat")["inst_type"].ravel()
        assert inst.shape == (256, 256)
        ids_native, ids_half = np.unique(inst), np.unique(half.inst_maps[i])
        assert set(ids_half.tolist()) <= set(ids_native.tolist())
        kept, total = kept + len(ids_half), total + len(ids_native)
        for k in ids_half[ids_half > 0]:
            got = np.unique(half.class_maps[i][half.inst_maps[i] == k])
            assert got.tolist() == [types[k - 1]]
    assert kept > 0.95 * total


@pytest.mark.shared_data
def test_real_monuseg_unlabelled(shared_data: Path) -> None:
    data = read_tile_folder(shared_data / "monuseg_train", mpp=0.25, target_mpp=0.5, tile_size=256)
    assert data.class_maps is None and data.scheme is None
    assert len(data) == 13 * 4 and data.tile_shape == (256, 256)
    assert (data.inst_maps > 0).mean() > 0.05


@pytest.mark.shared_data
def test_real_nucls(shared_data: Path) -> None:
    data = read_nucls(shared_data / "nucls")
    assert len(data) == 15 and data.mpp == 0.2 and data.tile_shape == (260, 288)
    assert data.meta["split"].value_counts().to_dict() == {"train": 10, "test": 5}
    assert data.class_maps is not None
    assert set(np.unique(data.class_maps).tolist()) == {0, 1, 2}
    mapped = read_nucls(
        shared_data / "nucls", class_mapping=NUCLS_TO_CONIC, target_scheme=CONIC, target_mpp=0.5
    )
    assert mapped.class_maps is not None and mapped.tile_shape == (104, 115)
    assert set(np.unique(mapped.class_maps).tolist()) <= {IGNORE, 0, 2}
