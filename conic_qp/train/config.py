"""Training configuration: one YAML file whose defaults are the paper's hyperparameters (II.E).

Every value can be overridden on the command line with ``--set section.key=value`` (the value is
parsed as YAML, so ``--set optim.lr=3e-4`` or ``--set data.train='[{format: conic, path: x}]'``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conic_qp.errors import ConicQPError
from conic_qp.train.augment import AugmentConfig

DATA_FORMATS = ("conic", "lizard", "tiles", "nucls")
#: ``model.init_from`` value naming the model shipped with conic-qp.
BUNDLED = "bundled"


@dataclass
class DataSource:
    """One training/validation data set on disk.

    Attributes
    ----------
    format : ``conic`` (images.npy + labels.npy), ``lizard`` (png + mat), ``tiles`` (folders of
        image tiles + instance PNGs [+ type .mat], e.g. CoNSeP, MoNuSeg) or ``nucls``.
    path : the folder.
    mpp : um/px of the data when the folder does not declare it.
    split : read only this official split of the folder (e.g. ``train``).
    classes : class scheme of the folder's labels (``conic``, ``consep``, ``nucls`` or a
        classes.json path); default: what the folder declares.
    class_mapping : source class (name or id) -> model class name or ``ignore``; needed when the
        folder's classes differ from the model's.
    labelled : False trains only the instance branch on this set (its classes are ignored).
    """

    format: str
    path: str
    mpp: float | None = None
    split: str | None = None
    classes: str | None = None
    class_mapping: dict[str, str] | None = None
    labelled: bool = True


@dataclass
class ModelSection:
    """The network. ``init_from`` starts from a trained checkpoint folder (or ``bundled``: the
    model shipped with conic-qp) instead of ImageNet weights: fine-tuning on a lab's own
    annotations, or continuing a run with a fresh schedule. Its encoder, decoder channels and
    classes must match this config; optimiser and schedule start anew (``--resume`` continues
    them instead)."""

    encoder: str = "efficientnet_b5"
    pretrained: bool = True
    pretrained_file: str | None = None
    init_from: str | None = None
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    decoder_dropout: float = 0.2
    encoder_drop_path: float = 0.2


@dataclass
class DataSection:
    train: list[DataSource] = field(default_factory=list)
    val: list[DataSource] = field(default_factory=list)
    split: str = "random"
    n_val: int = 500
    classes: str = "conic"
    mpp: float = 0.5
    tile_size: int = 256  # 0: keep the tiles as read (scoring only)
    stride: int | None = None


@dataclass
class OptimSection:
    steps: int = 600_000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    amp: bool = True
    grad_clip: float | None = 10.0
    encoder_lr_scale: float = 1.0
    bf16_cpu: bool = False


@dataclass
class BalanceSection:
    importance_sampling: bool = True
    loss_weighting: bool = True
    rho: float = 3.0
    gamma: float = 0.99
    label_smoothing: float = 0.05
    uniform_mix: float = 0.0


@dataclass
class ValidationSection:
    every: int = 2000
    max_tiles: int | None = None
    batch_size: int = 8


@dataclass
class InferenceSection:
    """How the trained model is best run, written into its checkpoints (``inference``).

    ``mc_dropout``: whether TTA keeps dropout on when the user leaves it to the model (the
    paper: on; switch it off when MC dropout is measured to lower the validation scores).
    ``zoom``: input enlargement at inference (:mod:`conic_qp.tta`; 1 = none), chosen by
    scoring the validation tiles at a few zooms (``conic-qp evaluate --zoom``).
    """

    mc_dropout: bool = True
    zoom: float = 1.0

    def __post_init__(self) -> None:
        from conic_qp.checkpoint import check_inference

        check_inference(dataclasses.asdict(self), "the training config")


@dataclass
class TrainConfig:
    """The whole training recipe (defaults: paper II.E).

    Speed knobs that leave the recipe unchanged: ``workers`` (augmentation in that many
    processes, overlapping the network step), ``threads`` (torch intra-op threads; None keeps
    torch's default), ``channels_last`` (NHWC memory layout: faster convolutions on CPU and on
    tensor-core GPUs), ``optim.amp`` (float16 autocast on CUDA) and ``optim.bf16_cpu`` (bfloat16
    autocast on CPU; helps only on CPUs with AVX512-BF16/AMX). ``optim.encoder_lr_scale``
    multiplies the encoder's learning rate (below 1 fine-tunes pretrained weights gently).
    """

    out: str = "runs/conic-qp"
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    threads: int | None = None
    channels_last: bool = True
    log_every: int = 50
    checkpoint_every: int = 1000
    half_checkpoint: bool = False
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    inference: InferenceSection = field(default_factory=InferenceSection)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, data, "config")

    def validate(self) -> None:
        """Check what can be checked before any data is read."""
        if not self.data.train:
            raise ConicQPError(
                "no training data: add data.train entries (format + path) to the config"
            )
        for src in [*self.data.train, *self.data.val]:
            if src.format not in DATA_FORMATS:
                raise ConicQPError(
                    f"unknown data format {src.format!r}; use one of {', '.join(DATA_FORMATS)}"
                )
            if not Path(src.path).exists():
                raise ConicQPError(
                    f"training data folder {src.path} does not exist; fix data paths in the config"
                )
        from conic_qp.checkpoint import CONFIG_FILE

        init = self.model.init_from
        if init is not None and init != BUNDLED and not (Path(init) / CONFIG_FILE).is_file():
            raise ConicQPError(
                f"model.init_from {init!r} is not a checkpoint folder (no config.json); give a "
                "folder that conic-qp train wrote, or 'bundled'"
            )
        if self.data.tile_size % 32:
            raise ConicQPError(f"data.tile_size={self.data.tile_size} must be a multiple of 32")
        o = self.optim
        if o.steps < 1 or o.batch_size < 1 or o.grad_accum < 1:
            raise ConicQPError("optim.steps, optim.batch_size and optim.grad_accum must be >= 1")
        if o.encoder_lr_scale <= 0:
            raise ConicQPError(
                f"optim.encoder_lr_scale={o.encoder_lr_scale} must be > 0 (1 = same lr as the decoders)"
            )
        if self.workers < 0 or (self.threads is not None and self.threads < 1):
            raise ConicQPError("workers must be >= 0 and threads >= 1 (or null: torch's default)")
        if self.validation.every < 1:
            raise ConicQPError("validation.every must be >= 1 step")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith(
            "cuda:"
        ):
            raise ConicQPError(f"unknown device {self.device!r}; use auto, cpu, cuda or mps")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConicQPError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConicQPError(
                f"config file {p} is not valid YAML ({str(exc).splitlines()[0]})"
            ) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConicQPError(f"config file {p} must hold a mapping of sections")
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConicQPError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConicQPError(f"override {item!r}: value is not valid YAML") from exc
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConicQPError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return TrainConfig.from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: Any, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConicQPError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConicQPError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    hints = _section_types(cls)
    for name, value in data.items():
        sub = hints.get(name)
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        elif name in ("train", "val") and cls is DataSection:
            if not isinstance(value, list):
                raise ConicQPError(f"{where}.{name} must be a list of data sources")
            kwargs[name] = [
                _build(DataSource, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)
            ]
        elif isinstance(value, list) and name in ("decoder_channels", "blur_sigma", "zoom"):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = _coerce(value, str(fields[name].type), f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConicQPError(f"{where}: {exc}") from exc


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """Numbers written the YAML-1.1 way (``3e-4``) arrive as strings; convert by declared type."""
    if value is None or isinstance(value, bool):
        return value
    kinds = {t.strip() for t in type_name.split("|")}
    try:
        if "float" in kinds and isinstance(value, (int, str)):
            return float(value)
        if "int" in kinds and isinstance(value, str):
            return int(value)
    except ValueError as exc:
        raise ConicQPError(f"{where}={value!r} is not a number") from exc
    return value


def _section_types(cls: Any) -> dict[str, Any]:
    if cls is TrainConfig:
        return {
            "model": ModelSection,
            "data": DataSection,
            "optim": OptimSection,
            "balance": BalanceSection,
            "validation": ValidationSection,
            "augment": AugmentConfig,
            "inference": InferenceSection,
        }
    return {}
