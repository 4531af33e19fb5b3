"""Scoring a checkpoint on labelled tiles: shared by ``conic-qp tune`` and ``conic-qp evaluate``.

Tiles are read at the checkpoint's um/px in its class scheme; tiles whose size is not a multiple
of 32 are re-cut into 256 px tiles so the network can run on them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from conic_qp.errors import ConicQPError, option
from conic_qp.train.predictions import iter_probabilities, labelled_truth, predicted_labels

logger = logging.getLogger(__name__)

__all__ = [
    "checkpoint_params",
    "evaluate_checkpoint",
    "evaluate_whole_images_checkpoint",
    "iter_probabilities",
    "labelled_truth",
    "load_eval_data",
    "parse_data_spec",
    "predict_whole_image",
    "predicted_labels",
    "whole_image_probabilities",
]


def parse_data_spec(spec: str) -> Any:
    """``FORMAT:PATH[@SPLIT]`` -> DataSource (e.g. ``tiles:../shared/data/consep@test``)."""
    from conic_qp.train.config import DATA_FORMATS, DataSource

    fmt, sep, rest = spec.partition(":")
    if not sep or fmt not in DATA_FORMATS or not rest:
        raise ConicQPError(
            f"{option('data')} {spec!r} must look like FORMAT:PATH[@SPLIT] with FORMAT in "
            f"{', '.join(DATA_FORMATS)}"
        )
    path, _, split = rest.partition("@")
    return DataSource(format=fmt, path=path, split=split or None)


def load_eval_data(
    model_path: str | Path,
    data_specs: Sequence[str] = (),
    config_path: str | Path | None = None,
    max_tiles: int | None = None,
    device: str = "auto",
    seed: int = 0,
) -> tuple[Any, Any]:
    """(Checkpoint, LabelledSet) for scoring: ``--data`` specs or a training config's val split."""
    from conic_qp.checkpoint import load_checkpoint
    from conic_qp.model import resolve_device
    from conic_qp.train.config import DataSection, load_config
    from conic_qp.train.data import concat_sets, retile
    from conic_qp.train.loop import prepare_data, read_source

    dev = resolve_device(device)
    ckpt = load_checkpoint(model_path, device=str(dev))
    scheme = ckpt.classes
    if config_path is not None:
        val = prepare_data(load_config(config_path)).val
    elif data_specs:
        section = DataSection(mpp=ckpt.mpp, tile_size=0)
        sets = []
        for spec in data_specs:
            data = read_source(parse_data_spec(spec), section, scheme)
            if any(v % 32 for v in data.tile_shape):
                data = retile(data, 256)
            sets.append(replace(data, scheme=scheme) if data.class_maps is not None else data)
        val = concat_sets(sets)
    else:
        raise ConicQPError(
            f"give labelled data with {option('data')} FORMAT:PATH[@SPLIT] or {option('config')}"
        )
    if val.class_maps is None:
        raise ConicQPError("the data has no class labels; scoring needs labelled tiles")
    if max_tiles is not None and len(val) > max_tiles:
        idx = np.sort(np.random.default_rng(seed).choice(len(val), max_tiles, replace=False))
        val = val.subset(idx)
    return ckpt, val


def evaluate_checkpoint(
    model_path: str | Path,
    data_specs: Sequence[str],
    tta: int = 1,
    task: int = 1,
    device: str = "auto",
    seed: int = 0,
    save_pred: str | Path | None = None,
    zoom: float | None = None,
    config_path: str | Path | None = None,
) -> Any:
    """CoNIC scores of a checkpoint on labelled tiles, with its tuned thresholds for ``task``.

    ``config_path`` scores the validation split of a training config instead of ``data_specs``;
    ``zoom`` None runs the network at the checkpoint's input zoom."""
    from conic_qp.metrics import evaluate
    from conic_qp.sinks import atomic_path

    if not data_specs and config_path is None:
        raise ConicQPError(
            f"{option('model')} needs labelled tiles: pass {option('data')} FORMAT:PATH[@SPLIT]"
        )
    ckpt, data = load_eval_data(model_path, data_specs, config_path, device=device, seed=seed)
    params = checkpoint_params(ckpt, Path(model_path), task)
    probs = iter_probabilities(ckpt.model, data.images, tta, seed, zoom=zoom)
    pred = predicted_labels(probs, params)
    true = labelled_truth(data)
    if save_pred is not None:
        target = Path(save_pred)
        for arr, path in ((pred, target), (true, target.with_name(target.stem + ".true.npy"))):
            with atomic_path(path) as tmp, tmp.open("wb") as fh:
                np.save(fh, arr)  # a file object: np.save would append .npy to a path
    logger.info("scored %s on %d tiles", model_path, len(data))
    return evaluate(pred, true, ckpt.classes.names)


def whole_image_probabilities(
    model: Any, image: np.ndarray, tta: int = 1, seed: int = 0, zoom: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(semantic, three_label) probabilities of one whole (H, W, 3) uint8 image in one pass.

    The image is padded by reflection to a multiple of 32 and the padding cropped off again, so
    images of any size run without tiling (whole CoNSeP images are 500 x 500 px at 0.5 um/px).
    """
    from conic_qp.model import SIZE_MULTIPLE

    h, w = image.shape[:2]
    ph, pw = (-h) % SIZE_MULTIPLE, (-w) % SIZE_MULTIPLE
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else image
    sem, tl = next(iter_probabilities(model, padded[None], tta, seed, zoom=zoom))
    return sem[:, :h, :w], tl[:, :h, :w]


def predict_whole_image(
    ckpt: Any,
    image: np.ndarray,
    mpp: float,
    params: Any,
    tta: int = 1,
    seed: int = 0,
    zoom: float | None = None,
) -> np.ndarray:
    """(H, W, 2) instance and class ids of one whole (H, W, 3) image at ``mpp``, at its own size.

    The image is predicted whole at the checkpoint's um/px and the labels are scaled back
    (nearest neighbour), so they can be scored against the image's full-resolution truth.
    """
    from skimage.transform import resize

    from conic_qp.postprocess import postprocess
    from conic_qp.train.data import resample_labelled

    small, _, _ = resample_labelled(
        image, np.zeros(image.shape[:2], np.int32), None, mpp / ckpt.mpp
    )
    sem, tl = whole_image_probabilities(ckpt.model, small, tta=tta, seed=seed, zoom=zoom)
    inst = postprocess(sem, tl, params)
    lut = np.concatenate([[0], inst.classes]).astype(np.int32)
    pred = np.stack([inst.labels, lut[inst.labels]], axis=-1)
    if pred.shape[:2] != image.shape[:2]:
        pred = resize(
            pred, (*image.shape[:2], 2), order=0, preserve_range=True, anti_aliasing=False
        ).astype(np.int32)
    return pred


def evaluate_whole_images_checkpoint(
    model_path: str | Path,
    data_specs: Sequence[str],
    tta: int = 1,
    task: int = 1,
    device: str = "auto",
    seed: int = 0,
    zoom: float | None = None,
) -> Any:
    """Score a checkpoint on whole source images reassembled from overlapping tiles.

    HoVer-Net's protocol: each image (e.g. a 1000 x 1000 px CoNSeP test image at 0.25 um/px) is
    predicted whole at the model's um/px, the predicted label map is scaled back to the image's
    own resolution (nearest neighbour) and scored there against the full-resolution truth:
    binary PQ, DQ, SQ and AJI per image, HoVer-Net's type F1 from centroid pairing within 3 um,
    and the class-pooled mPQ+. Only ``tiles`` folders with ``orig_instance_ids.json`` qualify.
    """
    from conic_qp.checkpoint import load_checkpoint
    from conic_qp.metrics import HOVERNET_RADIUS_UM, evaluate_whole_images
    from conic_qp.model import resolve_device
    from conic_qp.train.data import read_tile_folder

    if not data_specs:
        raise ConicQPError(
            f"{option('whole_images')} needs labelled tiles: pass {option('data')} tiles:PATH[@SPLIT]"
        )
    ckpt = load_checkpoint(model_path, device=str(resolve_device(device)))
    params = checkpoint_params(ckpt, Path(model_path), task)
    scored: list[tuple[str, np.ndarray, np.ndarray]] = []
    mpp = None
    for spec in data_specs:
        src = parse_data_spec(spec)
        if src.format != "tiles":
            raise ConicQPError(
                f"{option('data')} {spec!r}: whole images are reassembled from a tiles folder with "
                "orig_instance_ids.json; use tiles:PATH[@SPLIT]"
            )
        data = read_tile_folder(Path(src.path), split=src.split, whole_images=True)
        if data.scheme is None or data.class_maps is None:
            raise ConicQPError(f"{src.path} has no class labels; scoring needs labelled images")
        if data.scheme.names != ckpt.classes.names:
            raise ConicQPError(
                f"{src.path} has classes {data.scheme.names} but the model predicts "
                f"{ckpt.classes.names}; whole-image scoring needs the model's own class list"
            )
        mpp = data.mpp
        for i in range(len(data)):
            name = str(data.meta["name"].iloc[i])
            image = np.asarray(data.images[i])
            pred = predict_whole_image(
                ckpt, image, data.mpp, params, tta=tta, seed=seed + i, zoom=zoom
            )
            cls = np.where(data.class_maps[i] < 0, 0, data.class_maps[i])
            true = np.stack([data.inst_maps[i], cls], axis=-1).astype(np.int32)
            scored.append((name, true, pred))
            logger.info("scored whole image %s", name)
    assert mpp is not None
    return evaluate_whole_images(scored, ckpt.classes.names, radius=HOVERNET_RADIUS_UM / mpp)


def checkpoint_params(ckpt: Any, folder: str | Path, task: int = 1) -> Any:
    """The post-processing parameters of checkpoint ``folder`` for ``task``: its
    ``thresholds.json`` (Task 2: ``thresholds_task2.json`` where tuned), else the defaults."""
    from conic_qp.checkpoint import THRESHOLDS_TASK2_FILE
    from conic_qp.inputs import read_json
    from conic_qp.postprocess import PostprocessParams

    thresholds = ckpt.thresholds
    task2 = Path(folder) / THRESHOLDS_TASK2_FILE
    if task == 2 and task2.is_file():
        thresholds = read_json(task2, "Task 2 thresholds", "re-run `conic-qp tune --task 2`")
    if thresholds:
        return PostprocessParams.from_json(thresholds)
    return PostprocessParams.default(ckpt.classes.n_classes)
