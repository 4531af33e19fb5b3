"""Model checkpoints: one folder holding the weights, the architecture and what the model means.

::

    my-model/
      weights.safetensors   ConicNet state dict (fp32, or fp16 with ``half=True``)
      config.json           format + version, ModelConfig, ClassScheme, um/px, provenance
      thresholds.json       post-processing thresholds (optional; PostprocessParams JSON)
      thresholds_task2.json thresholds tuned for Task 2 counting (optional)

The class list and the resolution live here, never in the pipeline. A checkpoint is written into a
temporary folder beside the target and renamed, so readers never see half a checkpoint and an
existing one is only replaced once the new one is complete. Thresholds are kept as a plain dict:
``conic_qp.postprocess.PostprocessParams.from_json`` turns them into parameters.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.inputs import read_json
from conic_qp.model import ConicNet, ModelConfig
from conic_qp.paths import temp_path
from conic_qp.sinks import replace_dir

logger = logging.getLogger(__name__)

FORMAT = "conic-qp-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
#: Thresholds tuned for Task 2 (counting, R2) by `conic-qp tune --task 2`, beside the Task 1 ones.
THRESHOLDS_TASK2_FILE = "thresholds_task2.json"

_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network (eval mode) and everything needed to use its output."""

    model: ConicNet
    config: ModelConfig
    classes: ClassScheme
    mpp: float
    thresholds: dict[str, Any] | None
    path: Path
    training: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: ConicNet,
    classes: ClassScheme,
    mpp: float,
    thresholds: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    half: bool = False,
    inference: Mapping[str, Any] | None = None,
    thresholds_task2: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a checkpoint folder at ``path``, atomically.

    Parameters
    ----------
    path : the checkpoint folder; an existing checkpoint there is replaced, anything else is
        refused so user data is never deleted.
    model : the network; its ``config`` is stored as the architecture.
    classes : the class scheme; must have ``model.config.n_classes`` classes.
    mpp : micrometres per pixel the model works at (0.5 for CoNIC models).
    thresholds : post-processing thresholds (``PostprocessParams.to_json()``).
    training : free-form provenance (steps, data split, metrics...), must be JSON-serialisable.
    half : store floating-point tensors as fp16 (half the size; loaded back as fp32).
    inference : how the model is best run, measured by whoever trained it (``mc_dropout``:
        whether TTA keeps dropout on when the user leaves it to the model; ``zoom``: how much
        the input is enlarged for the network, :mod:`conic_qp.tta`).
    thresholds_task2 : thresholds tuned for Task 2 counting (``thresholds_task2.json``).

    Returns
    -------
    Path : the checkpoint folder.
    """
    target = Path(path)
    # Unwrap DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers.
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, ConicNet):
            model = inner
    if not isinstance(model, ConicNet):
        raise ConicQPError(f"save_checkpoint needs a ConicNet, got {type(model).__name__}")
    if classes.n_classes != model.config.n_classes:
        raise ConicQPError(
            f"class scheme {classes.name!r} has {classes.n_classes} classes but the model predicts "
            f"{model.config.n_classes}; save with the scheme the model was trained for"
        )
    mpp = _check_mpp(mpp, "mpp")
    if target.exists() and not target.is_dir():
        raise ConicQPError(f"{str(target)!r} exists and is not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
        raise ConicQPError(
            f"{str(target)!r} is a non-empty folder that is not a conic-qp checkpoint; refusing "
            "to replace it, choose another path"
        )

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_json(),
        "classes": classes.to_json(),
        "mpp": mpp,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "conic_qp_version": _package_version(),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "weights_dtype": "float16" if half else "float32",
    }
    if inference:
        config["inference"] = check_inference(dict(inference), "inference")
    if training is not None:
        config["training"] = dict(training)
    _dumps(config, "checkpoint config (training info)")  # fail before writing anything
    thresholds_text = _dumps(dict(thresholds), "thresholds") if thresholds is not None else None
    task2_text = (
        _dumps(dict(thresholds_task2), "Task 2 thresholds")
        if thresholds_task2 is not None
        else None
    )
    tensors = _state_for_storage(model, half)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)  # a name clean_stale_temps knows (pid, host)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(_dumps(config, "checkpoint config"), encoding="utf-8")
        if thresholds_text is not None:
            (tmp / THRESHOLDS_FILE).write_text(thresholds_text, encoding="utf-8")
        if task2_text is not None:
            (tmp / THRESHOLDS_TASK2_FILE).write_text(task2_text, encoding="utf-8")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s (%s)", target, config["weights_dtype"])
    return target


def blend_checkpoints(first: Checkpoint, second: Checkpoint, weight: float) -> ConicNet:
    """The network whose weights are ``(1 - weight) * first + weight * second``.

    WiSE-FT (Wortsman et al., CVPR 2022): blending a fine-tuned model with the model it was
    fine-tuned from keeps most of what fine-tuning gained on its data and recovers what it lost on
    other data (docs/models.md measures it on CoNSeP and NuCLS). Meaningful only for two
    checkpoints on one training path, one fine-tuned from the other (``train --init-from``).
    Integer buffers (batch-norm counters) come from ``second``.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
        raise ConicQPError(f"blend weight must be a number from 0 to 1, got {weight!r}")
    arch_a, arch_b = first.config.architecture, second.config.architecture
    if arch_a != arch_b:
        raise ConicQPError(
            f"cannot blend {str(first.path)!r} and {str(second.path)!r}: different networks "
            f"(encoder, classes, decoder channels, input channels: {arch_a} vs {arch_b}); blend a "
            "model with one fine-tuned from it"
        )
    if first.classes.names != second.classes.names or first.mpp != second.mpp:
        raise ConicQPError(
            f"cannot blend {str(first.path)!r} and {str(second.path)!r}: their classes or um/px "
            "differ; blend checkpoints of the same scheme and resolution"
        )
    sa, sb = first.model.state_dict(), second.model.state_dict()
    mixed = {
        k: (1 - weight) * sa[k] + weight * v if v.is_floating_point() else v for k, v in sb.items()
    }
    model = ConicNet(second.config, load_pretrained=False)
    model.load_state_dict(mixed)
    model.mc_dropout_default = second.model.mc_dropout_default
    model.inference_zoom = second.model.inference_zoom
    return model.eval()


def read_checkpoint_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint's config.json without touching the weights.

    Returns the raw dict; ``ModelConfig.from_json(cfg["model"])`` and
    ``ClassScheme.from_json(cfg["classes"])`` give the typed parts.
    """
    folder = _checkpoint_folder(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ConicQPError(
            f"{str(folder)!r} has no {CONFIG_FILE}; it is not a conic-qp checkpoint folder"
        )
    data = read_json(
        config_path, "checkpoint config", "copy the checkpoint folder again or re-save it"
    )
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConicQPError(
            f"{str(config_path)!r} is not a conic-qp checkpoint config (format {found!r}, "
            f"expected {FORMAT!r})"
        )
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConicQPError(f"{str(config_path)!r} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ConicQPError(
            f"checkpoint {str(folder)!r} has format version {version}, newer than this conic-qp "
            f"reads ({FORMAT_VERSION}); upgrade conic-qp"
        )
    if version < 1:
        raise ConicQPError(f"checkpoint {str(folder)!r} has invalid format version {version}")
    for key in ("model", "classes", "mpp"):
        if key not in data:
            raise ConicQPError(f"{str(config_path)!r} lacks {key!r}; re-save the checkpoint")
    _check_mpp(data["mpp"], f"{config_path} mpp")
    return data


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder; the model is returned in eval mode on ``device``."""
    folder = _checkpoint_folder(path)
    data = read_checkpoint_config(folder)
    try:
        config = ModelConfig.from_json(data["model"])
        classes = ClassScheme.from_json(data["classes"])
    except ConicQPError as exc:
        raise ConicQPError(f"checkpoint {str(folder)!r}: {exc}") from exc
    if classes.n_classes != config.n_classes:
        raise ConicQPError(
            f"checkpoint {str(folder)!r} declares {classes.n_classes} classes but its model "
            f"predicts {config.n_classes}; the checkpoint is inconsistent, re-save it"
        )
    thresholds = _read_thresholds(folder)
    training = data.get("training")
    if training is not None and not isinstance(training, dict):
        raise ConicQPError(f"{str(folder / CONFIG_FILE)!r}: 'training' must be a JSON object")

    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ConicQPError(f"checkpoint {str(folder)!r} has no {WEIGHTS_FILE}; copy it again")
    expected = data.get("weights_sha256")
    if isinstance(expected, str) and _sha256(weights_path) != expected:
        raise ConicQPError(
            f"weights {str(weights_path)!r} do not match the checksum in {CONFIG_FILE} (corrupt, "
            "truncated or replaced); copy the checkpoint again"
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConicQPError(
            f"weights {str(weights_path)!r} are corrupt or truncated ({_short(exc)}); copy the "
            "checkpoint again"
        ) from exc

    model = ConicNet(config, load_pretrained=False)
    _load_state(model, state, config, weights_path)
    try:
        model.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConicQPError(
            f"cannot put the model on device {str(device)!r} ({_short(exc)}); choose an available "
            "device, e.g. cpu"
        ) from exc
    model.eval()
    inference = data.get("inference")
    if inference is not None:
        settings = check_inference(inference, str(folder / CONFIG_FILE))
        model.mc_dropout_default = settings["mc_dropout"]
        model.inference_zoom = settings["zoom"]
    meta = {k: v for k, v in data.items() if k not in {"model", "classes", "mpp", "training"}}
    return Checkpoint(
        model=model,
        config=config,
        classes=classes,
        mpp=float(data["mpp"]),
        thresholds=thresholds,
        path=folder,
        training=training,
        meta=meta,
    )


def check_inference(data: Any, where: str) -> dict[str, Any]:
    """The ``inference`` section: a JSON object with ``mc_dropout`` (true or false) and ``zoom``
    (a number, :data:`conic_qp.tta.MIN_ZOOM` to :data:`conic_qp.tta.MAX_ZOOM`), both optional."""
    from conic_qp.tta import MAX_ZOOM, MIN_ZOOM

    if not isinstance(data, dict) or set(data) - {"mc_dropout", "zoom"}:
        raise ConicQPError(
            f"{where!r}: 'inference' must be an object with only 'mc_dropout' and 'zoom'; fix or "
            "remove it"
        )
    mc = data.get("mc_dropout", True)
    if not isinstance(mc, bool):
        raise ConicQPError(f"{where!r}: 'inference.mc_dropout' must be true or false, got {mc!r}")
    zoom = data.get("zoom", 1.0)
    if (
        isinstance(zoom, bool)
        or not isinstance(zoom, int | float)
        or not MIN_ZOOM <= zoom <= MAX_ZOOM
    ):
        raise ConicQPError(
            f"{where!r}: 'inference.zoom' must be a number from {MIN_ZOOM} to {MAX_ZOOM}, got "
            f"{zoom!r}"
        )
    return {"mc_dropout": mc, "zoom": float(zoom)}


def _checkpoint_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise ConicQPError(f"checkpoint {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise ConicQPError(
            f"checkpoint {str(folder)!r} is not a folder; a checkpoint is a folder with "
            f"{WEIGHTS_FILE} and {CONFIG_FILE}"
        )
    return folder


def _read_thresholds(folder: Path) -> dict[str, Any] | None:
    p = folder / THRESHOLDS_FILE
    if not p.is_file():
        return None
    data = read_json(p, "checkpoint thresholds", "re-run `conic-qp tune` or delete the file")
    if not isinstance(data, dict):
        raise ConicQPError(f"{str(p)!r} must hold a JSON object of thresholds")
    return data


def _state_for_storage(model: ConicNet, half: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        if half and t.is_floating_point():
            finite = t[torch.isfinite(t)]
            if finite.numel() and float(finite.abs().max()) > _FP16_MAX:
                raise ConicQPError(
                    f"tensor {key} has values beyond the float16 range; save with half=False"
                )
            t = t.to(torch.float16)
        # clone: safetensors refuses tensors that share storage (e.g. views of one buffer).
        state[key] = t.contiguous().clone()
    return state


def _load_state(
    model: ConicNet, state: dict[str, torch.Tensor], config: ModelConfig, weights_path: Path
) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[0]})")
        raise ConicQPError(
            f"weights {str(weights_path)!r} do not match the architecture config.json declares "
            f"(encoder {config.encoder}, {config.n_classes} classes, decoder "
            f"{list(config.decoder_channels)}): {'; '.join(parts)}; use the weights saved with "
            "this config"
        )
    # Stored fp16 tensors come back in the model's dtypes (fp32).
    converted = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(converted, strict=True)


def _check_mpp(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConicQPError(f"{what} must be a number of micrometres per pixel, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ConicQPError(f"{what} must be a positive number of micrometres per pixel, got {v}")
    return v


def _dumps(data: Any, what: str) -> str:
    try:
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ConicQPError(
            f"{what} is not JSON-serialisable ({exc}); use plain numbers, strings, lists, dicts"
        ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_version() -> str:
    from conic_qp import __version__

    return __version__


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
