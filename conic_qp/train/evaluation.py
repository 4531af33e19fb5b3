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
    "evaluate_checkpoint",
    "iter_probabilities",
    "labelled_truth",
    "load_eval_data",
    "parse_data_spec",
    "predicted_labels",
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
) -> Any:
    """CoNIC scores of a checkpoint on labelled tiles, with its tuned thresholds for ``task``."""
    from conic_qp.checkpoint import THRESHOLDS_TASK2_FILE
    from conic_qp.inputs import read_json
    from conic_qp.metrics import evaluate
    from conic_qp.postprocess import PostprocessParams
    from conic_qp.sinks import atomic_path

    if not data_specs:
        raise ConicQPError(
            f"{option('model')} needs labelled tiles: pass {option('data')} FORMAT:PATH[@SPLIT]"
        )
    ckpt, data = load_eval_data(model_path, data_specs, device=device, seed=seed)
    thresholds = ckpt.thresholds
    task2 = Path(model_path) / THRESHOLDS_TASK2_FILE
    if task == 2 and task2.is_file():
        thresholds = read_json(task2, "Task 2 thresholds", "re-run `conic-qp tune --task 2`")
    params = (
        PostprocessParams.from_json(thresholds)
        if thresholds
        else PostprocessParams.default(ckpt.classes.n_classes)
    )
    pred = predicted_labels(iter_probabilities(ckpt.model, data.images, tta, seed), params)
    true = labelled_truth(data)
    if save_pred is not None:
        target = Path(save_pred)
        for arr, path in ((pred, target), (true, target.with_name(target.stem + ".true.npy"))):
            with atomic_path(path) as tmp, tmp.open("wb") as fh:
                np.save(fh, arr)  # a file object: np.save would append .npy to a path
    logger.info("scored %s on %d tiles", model_path, len(data))
    return evaluate(pred, true, ckpt.classes.names)
