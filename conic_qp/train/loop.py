"""The training loop (paper II.E): AdamW + cosine schedule, importance sampling, weighted loss.

Everything that can fail because of the data (missing files, mismatched labels, an empty split,
classes outside the class list) fails in :func:`prepare_data` before the first step. The loop
logs; a caller (the CLI) can render progress through the ``on_event`` callback.

Output folder layout::

    OUT/config.yaml        the full resolved config
    OUT/metrics.csv        one row per logged step / validation
    OUT/best/              checkpoint with the best validation mPQ+ (the one to use)
    OUT/last/              latest checkpoint
    OUT/train_state.pt     optimizer, scheduler, scaler, EMA prior, step: what --resume needs
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import pickle
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from conic_qp.checkpoint import load_checkpoint, save_checkpoint
from conic_qp.classes import CONIC, CONSEP, ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.inputs import read_json
from conic_qp.locks import clean_stale_temps
from conic_qp.metrics import EvaluationResult, evaluate
from conic_qp.model import ConicNet, ModelConfig, resolve_device
from conic_qp.paths import check_output_dir, temp_path
from conic_qp.postprocess import PostprocessParams
from conic_qp.sinks import atomic_open
from conic_qp.targets import make_targets
from conic_qp.train.augment import Augmenter
from conic_qp.train.config import BUNDLED, DataSection, DataSource, TrainConfig
from conic_qp.train.data import (
    IGNORE,
    NUCLS,
    LabelledSet,
    concat_sets,
    make_split,
    read_conic,
    read_lizard,
    read_nucls,
    read_tile_folder,
    retile,
    scheme_from_json,
)
from conic_qp.train.losses import ConicLoss
from conic_qp.train.predictions import iter_probabilities, labelled_truth, predicted_labels
from conic_qp.train.sampling import EpochSampler, class_pixel_fractions, importance_weights
from conic_qp.workers import watch_parent

logger = logging.getLogger(__name__)

Event = Callable[[str, dict[str, Any]], None]

STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------------------------- devices


# -------------------------------------------------------------------------------------- data


def resolve_scheme(spec: str) -> ClassScheme:
    """``conic``, ``consep``, ``nucls`` or the path of a classes.json."""
    named = {"conic": CONIC, "consep": CONSEP, "nucls": NUCLS}
    if spec.lower() in named:
        return named[spec.lower()]
    path = Path(spec)
    if not path.is_file():
        raise ConicQPError(
            f"classes {spec!r} is neither conic/consep/nucls nor a classes.json file"
        )
    data = read_json(path, "classes file", "fix the JSON or use conic, consep or nucls")
    return scheme_from_json(data, name=path.stem)


def read_source(src: DataSource, data: DataSection, scheme: ClassScheme) -> LabelledSet:
    """One configured data set at the model's um/px, in the model's class scheme, cut in tiles."""
    src_scheme = resolve_scheme(src.classes) if src.classes else None
    mapping: dict[int | str, int | str | None] | None = (
        {k: v for k, v in src.class_mapping.items()} if src.class_mapping and src.labelled else None
    )
    target = scheme if mapping else None
    common: dict[str, Any] = {
        "class_mapping": mapping,
        "target_scheme": target,
        "target_mpp": data.mpp,
    }
    path = Path(src.path)
    if src.format == "conic":
        out = read_conic(path, scheme=src_scheme or CONIC, mpp=src.mpp or 0.5, **common)
    elif src.format == "lizard":
        out = read_lizard(
            path, mpp=src.mpp or 0.5, tile_size=data.tile_size or None, stride=data.stride, **common
        )
    elif src.format == "nucls":
        out = read_nucls(
            path,
            splits=(src.split,) if src.split else ("train", "test"),
            mpp=src.mpp or 0.2,
            tile_size=data.tile_size or None,
            stride=data.stride,
            **common,
        )
    elif src.format == "tiles":
        out = read_tile_folder(
            path,
            mpp=src.mpp,
            scheme=src_scheme,
            split=src.split,
            tile_size=data.tile_size or None,
            stride=data.stride,
            **common,
        )
    else:
        raise ConicQPError(f"unknown data format {src.format!r}")
    if not src.labelled:
        out = replace(out, class_maps=None, scheme=None)
    if data.tile_size and out.tile_shape != (data.tile_size, data.tile_size):
        out = retile(out, data.tile_size, data.stride)
    if out.scheme is not None and out.scheme.names != scheme.names:
        raise ConicQPError(
            f"{src.path} has classes {out.scheme.names} but the model is trained on {scheme.names}; "
            "add a class_mapping to this data source (or set labelled: false)"
        )
    prefix = path.name
    meta = out.meta.copy()
    meta["name"] = [f"{prefix}/{n}" for n in meta["name"]]
    logger.info("read %d tiles from %s (%s)", len(out), src.path, src.format)
    return replace(out, meta=meta)


@dataclass
class PreparedData:
    train: LabelledSet
    val: LabelledSet
    scheme: ClassScheme


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read, map, resample and split all configured data; every data error surfaces here."""
    config.validate()
    scheme = resolve_scheme(config.data.classes)
    sets = [read_source(s, config.data, scheme) for s in config.data.train]
    if all(s.class_maps is None for s in sets):
        raise ConicQPError(
            "none of the training data has class labels; add a labelled data set (the semantic "
            "branch cannot learn classes from instance-only data)"
        )
    sets = [replace(s, scheme=scheme) if s.class_maps is not None else s for s in sets]
    full = concat_sets(sets)
    if config.data.val:
        val = concat_sets(
            [
                replace(s, scheme=scheme)
                for s in (read_source(v, config.data, scheme) for v in config.data.val)
            ]
        )
        train = full
    else:
        split = make_split(full, config.data.split, n_val=config.data.n_val, seed=config.seed)
        train, val = full.subset(split.train), full.subset(split.val)
    if len(train) == 0:
        raise ConicQPError("the training split is empty; check data.split and the data folders")
    if len(val) == 0:
        raise ConicQPError("the validation split is empty; set data.n_val or data.val")
    if val.class_maps is None:
        raise ConicQPError("the validation data has no class labels; mPQ+ cannot be computed")
    if config.validation.max_tiles is not None and len(val) > config.validation.max_tiles:
        rng = np.random.default_rng(config.seed)
        val = val.subset(np.sort(rng.choice(len(val), config.validation.max_tiles, replace=False)))
    logger.info("training on %d tiles, validating on %d (%s)", len(train), len(val), scheme.name)
    return PreparedData(train, val, scheme)


class TileDataset(Dataset[dict[str, torch.Tensor]]):
    """Augmented tiles and their targets, recomputed after the geometric transform."""

    def __init__(self, data: LabelledSet, augmenter: Augmenter | None) -> None:
        self.data = data
        self.augmenter = augmenter

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = np.asarray(self.data.images[index])
        inst = np.asarray(self.data.inst_maps[index])
        cls = None if self.data.class_maps is None else np.asarray(self.data.class_maps[index])
        valid = None
        if self.augmenter is not None:
            image, inst, cls, valid = self.augmenter(image, inst, cls, return_valid=True)
        targets = make_targets(inst)
        if cls is None:
            semantic = np.where(inst > 0, IGNORE, 0)
        else:
            semantic = np.where(inst > 0, cls, 0)
        three_label = targets.three_label.astype(np.int64)
        if valid is not None:
            # Pixels mirrored in from outside the tile show nuclei without labels: no loss there.
            semantic = np.where(valid, semantic, IGNORE)
            three_label = np.where(valid, three_label, IGNORE)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
            / 255.0,
            "semantic": torch.from_numpy(semantic.astype(np.int64)),
            "three_label": torch.from_numpy(three_label),
            "vectors": torch.from_numpy(targets.vectors),
        }


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The optimiser state of ``--resume``, read with ``weights_only`` (tensors and plain values;
    never code): a state file that holds anything else was not written by conic-qp."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ConicQPError(
            f"cannot resume from {path}: it is not a training state conic-qp wrote (or it is "
            f"damaged: {str(exc).splitlines()[0][:200]}); delete it to start that run afresh, "
            "or choose another output folder"
        ) from None
    if not isinstance(state, dict):
        raise ConicQPError(
            f"cannot resume from {path}: it holds a {type(state).__name__}, not a training "
            "state; delete it or choose another output folder"
        )
    return state


def _sigchld_handler() -> Any:
    """The process's SIGCHLD handler before a loader's workers start (None where there is none
    to keep: Windows, or not the main thread)."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGCHLD)


def _end_workers(loader: DataLoader, sigchld: Any) -> None:
    """Leave the process as training found it: the loader's persistent workers ended now, not
    when it is garbage-collected, and SIGCHLD handled as before.

    PyTorch installs a SIGCHLD handler for its workers and never removes it; in a process that
    goes on to start and reap other children under an alternate signal stack (``faulthandler``,
    as pytest enables) every later child exit is then delivered to it, which crashed a whole
    test session with SIGSEGV on this machine.
    """
    it = getattr(loader, "_iterator", None)
    shutdown = getattr(it, "_shutdown_workers", None)  # PyTorch's own clean-up of the iterator
    if callable(shutdown):
        shutdown()
    if sigchld is not None and signal.getsignal(signal.SIGCHLD) is not sigchld:
        signal.signal(signal.SIGCHLD, sigchld)
        # let a later loader install its handler again (PyTorch sets it once per process)
        from torch.utils.data._utils import signal_handling

        if hasattr(signal_handling, "_SIGCHLD_handler_set"):
            signal_handling._SIGCHLD_handler_set = False


def _worker_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _worker_init(worker_id: int) -> None:
    watch_parent()  # the worker ends with the training process (also after SIGKILL)
    info = torch.utils.data.get_worker_info()
    if (
        info is not None
        and isinstance(info.dataset, TileDataset)
        and info.dataset.augmenter is not None
    ):
        info.dataset.augmenter.reseed(info.seed % 2**32)


# -------------------------------------------------------------------------------- validation


def validate(
    model: torch.nn.Module,
    val: LabelledSet,
    scheme: ClassScheme,
    params: PostprocessParams | None = None,
    batch_size: int = 8,
) -> EvaluationResult:
    """CoNIC scores of the model (on its own device) on labelled tiles, no TTA."""
    if val.class_maps is None:
        raise ConicQPError("validation data has no class labels")
    params = params or PostprocessParams.default(scheme.n_classes)
    pred = predicted_labels(iter_probabilities(model, val.images, batch_size=batch_size), params)
    return evaluate(pred, labelled_truth(val), scheme.names)


# -------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    out: Path
    best: Path
    best_mpq: float
    steps: int
    history: list[dict[str, Any]]


def initial_weights(spec: str, config: ModelConfig, scheme: ClassScheme) -> dict[str, torch.Tensor]:
    """The state dict ``model.init_from`` names, checked against the network being trained."""
    if spec == BUNDLED:
        from conic_qp.predict import default_model_path

        folder = default_model_path()
        if folder is None:
            raise ConicQPError(
                "model.init_from is 'bundled' but this installation has no bundled model; "
                "give a checkpoint folder"
            )
        spec = str(folder)
    ckpt = load_checkpoint(spec)  # fp32 whatever the checkpoint stores
    if ckpt.classes.names != scheme.names:
        raise ConicQPError(
            f"model.init_from {spec!r} predicts classes {ckpt.classes.names}, the training data "
            f"has {scheme.names}; set data.classes to the checkpoint's scheme (map other labels "
            "with class_mapping)"
        )
    if ckpt.config.architecture != config.architecture:
        theirs = ckpt.config
        raise ConicQPError(
            f"model.init_from {spec!r} is a {theirs.encoder} with decoder channels "
            f"{list(theirs.decoder_channels)}, the config builds a {config.encoder} with "
            f"{list(config.decoder_channels)}; set model.encoder and model.decoder_channels to "
            "the checkpoint's"
        )
    return ckpt.model.state_dict()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - libraries that still use the global RNG
    torch.manual_seed(seed)


def _lr_factor(step: int, config: TrainConfig) -> float:
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    floor = o.min_lr / o.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class _MetricsLog:
    FIELDS = (
        "step",
        "time_s",
        "lr",
        "loss",
        "semantic",
        "three_label",
        "vector",
        "val_pq",
        "val_mpq_plus",
        "val_r2",
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerow(self.FIELDS)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow([row.get(k, "") for k in self.FIELDS])


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_event: Event | None = None,
    data: PreparedData | None = None,
) -> TrainResult:
    """Train a model as configured; returns where the best checkpoint is.

    ``on_event(kind, info)`` receives ``start``, ``step`` (every ``log_every`` steps),
    ``validation`` and ``end`` events.
    """
    emit = on_event or (lambda kind, info: None)
    out = Path(config.out)
    state_path = out / STATE_FILE
    if state_path.exists() and not resume:
        raise ConicQPError(
            f"{out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    check_output_dir(out, what="training output folder")  # before reading data or writing
    data = data or prepare_data(config)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)  # what a killed run left (its pid is gone)
    with atomic_open(out / "config.yaml", "w", encoding="utf-8") as fh:
        fh.write(config.to_yaml())

    scheme = data.scheme
    mcfg = ModelConfig(
        encoder=config.model.encoder,
        n_classes=scheme.n_classes,
        decoder_channels=tuple(config.model.decoder_channels),
        decoder_dropout=config.model.decoder_dropout,
        encoder_drop_path=config.model.encoder_drop_path,
        pretrained=config.model.pretrained or bool(config.model.pretrained_file),
        pretrained_file=config.model.pretrained_file,
    )
    resuming = resume and state_path.exists()
    init_from = None if resuming else config.model.init_from
    model = ConicNet(mcfg, load_pretrained=not resuming and init_from is None)
    if init_from is not None:
        model.load_state_dict(initial_weights(init_from, mcfg, scheme))
    model = model.to(device)
    memory_format = (
        torch.channels_last
        if config.channels_last and device.type in ("cpu", "cuda")
        else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format)
    loss_fn = ConicLoss(
        scheme.n_classes + 1,
        weighted=config.balance.loss_weighting,
        gamma=config.balance.gamma,
        rho=config.balance.rho,
        label_smoothing=config.balance.label_smoothing,
    ).to(device)
    encoder_params = list(model.encoder.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if config.optim.encoder_lr_scale != 1.0:  # one group otherwise, as runs before this option
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in encoder_ids]},
            {"params": encoder_params, "lr": config.optim.lr * config.optim.encoder_lr_scale},
        ]
    optimizer = torch.optim.AdamW(
        groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    # One lambda per group: the schedule scales each group's own base lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s: _lr_factor(s, config)] * len(groups)
    )
    use_amp = config.optim.amp and device.type == "cuda"
    autocast_dtype = torch.float16
    if config.optim.bf16_cpu and device.type == "cpu":
        use_amp, autocast_dtype = True, torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")

    step, best_mpq, epoch = 0, -1.0, 0
    history: list[dict[str, Any]] = []
    if resuming:
        ckpt = load_checkpoint(out / "last", device=str(device))
        model.load_state_dict(ckpt.model.state_dict())
        state = _load_state(state_path, device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["loss"])
        step, best_mpq, epoch = int(state["step"]), float(state["best_mpq"]), int(state["epoch"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed %s at step %d (best mPQ+ %.4f)", out, step, best_mpq)

    train_set = data.train
    if train_set.class_maps is not None:
        fractions = class_pixel_fractions(train_set.class_maps, scheme.n_classes)
        weights = (
            importance_weights(fractions)
            if config.balance.importance_sampling
            else np.ones(len(train_set))
        )
    else:  # pragma: no cover - prepare_data refuses unlabelled training data
        weights = np.ones(len(train_set))
    if not np.any(weights > 0):
        weights = np.ones(len(train_set))
    sampler = EpochSampler(
        weights,
        seed=config.seed,
        enabled=config.balance.importance_sampling,
        uniform_mix=config.balance.uniform_mix,
    )
    augmenter = Augmenter(config.augment, seed=config.seed)
    dataset = TileDataset(train_set, augmenter)
    loader = DataLoader(
        dataset,
        batch_size=config.optim.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        worker_init_fn=_worker_init if config.workers else None,  # also watches the parent
        drop_last=len(train_set) >= config.optim.batch_size,
        pin_memory=device.type == "cuda",
        # Workers live across epochs: small data sets have short epochs, and restarting the
        # workers every epoch would cost more than the overlap gains.
        persistent_workers=config.workers > 0,
        # Not fork: the training process may already run threads (OpenMP, an ONNX Runtime or
        # OpenVINO pool in a notebook or test session) that a forked child would inherit broken.
        multiprocessing_context=_worker_context() if config.workers > 0 else None,
    )
    metrics_log = _MetricsLog(out / "metrics.csv")
    postprocess_params = PostprocessParams.default(scheme.n_classes)
    training_info = {
        "encoder": mcfg.encoder,
        "data": [s.path for s in config.data.train],
        "split": config.data.split,
        "importance_sampling": config.balance.importance_sampling,
        "loss_weighting": config.balance.loss_weighting,
    }
    if config.model.init_from is not None:
        training_info["init_from"] = config.model.init_from

    def save(folder: str, extra: dict[str, Any]) -> None:
        save_checkpoint(
            out / folder,
            model,
            scheme,
            config.data.mpp,
            thresholds=postprocess_params.to_json(),
            training={**training_info, **extra},
            half=config.half_checkpoint and folder == "best",
            inference=dataclasses.asdict(config.inference),
        )

    def save_state() -> None:
        save("last", {"steps": step, "best_val_mpq_plus": best_mpq})
        tmp = temp_path(state_path)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "loss": loss_fn.state_dict(),
                "step": step,
                "best_mpq": best_mpq,
                "epoch": epoch,
                "torch_rng": torch.get_rng_state(),
            },
            tmp,
        )
        os.replace(tmp, state_path)

    emit(
        "start",
        {
            "steps": config.optim.steps,
            "start_step": step,
            "train_tiles": len(train_set),
            "val_tiles": len(data.val),
            "device": str(device),
        },
    )
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    n_running = 0
    model.train()
    loss_fn.train()
    accum = config.optim.grad_accum
    micro = 0
    sigchld = _sigchld_handler()
    try:
        while step < config.optim.steps:
            sampler.set_epoch(epoch)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                images = batch["image"].contiguous(memory_format=memory_format)
                with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=use_amp):
                    outputs = model(images)
                outputs = {k: v.float() for k, v in outputs.items()}
                parts = loss_fn(outputs, batch)
                if not torch.isfinite(parts["loss"]):
                    raise ConicQPError(
                        f"training loss became {parts['loss'].item()} at step {step}; lower optim.lr or disable optim.amp"
                    )
                scaler.scale(parts["loss"] / accum).backward()
                micro += 1
                for k, v in parts.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                n_running += 1
                if micro % accum:
                    continue
                if config.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if step % config.log_every == 0 or step == config.optim.steps:
                    row = {k: v / n_running for k, v in running.items()}
                    row.update(
                        step=step,
                        time_s=round(time.perf_counter() - t0, 1),
                        lr=float(scheduler.get_last_lr()[0]),
                    )
                    metrics_log.write(row)
                    history.append(row)
                    emit("step", row)
                    logger.info("step %d loss %.4f", step, row["loss"])
                    running, n_running = {}, 0
                if step % config.validation.every == 0 or step == config.optim.steps:
                    result = validate(
                        model,
                        data.val,
                        scheme,
                        postprocess_params,
                        config.validation.batch_size,
                    )
                    model.train()
                    row = {
                        "step": step,
                        "time_s": round(time.perf_counter() - t0, 1),
                        "val_pq": result.pq,
                        "val_mpq_plus": result.mpq_plus,
                        "val_r2": result.r2,
                    }
                    metrics_log.write(row)
                    history.append(row)
                    improved = result.mpq_plus > best_mpq
                    if improved:
                        best_mpq = result.mpq_plus
                        save("best", {"steps": step, "val": result.to_json()})
                    emit("validation", {**row, "best": best_mpq, "improved": improved})
                    logger.info("step %d val PQ %.4f mPQ+ %.4f", step, result.pq, result.mpq_plus)
                    save_state()
                elif step % config.checkpoint_every == 0:
                    save_state()
                if step >= config.optim.steps:
                    break
            epoch += 1
    finally:
        _end_workers(loader, sigchld)
    save_state()
    emit("end", {"best": best_mpq, "steps": step, "out": str(out)})
    return TrainResult(out, out / "best", best_mpq, step, history)
