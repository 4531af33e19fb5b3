"""Squeeze-excitation over a fixed window, so a network's output does not depend on the tiling.

EfficientNet-style encoders gate every block's channels with squeeze-excitation (SE): the gate is
computed from the feature map's mean over the *whole input*. The output at a pixel therefore
depends on every other pixel of the tile it is computed in: the same nucleus gets different
probabilities in a 512 px tile, a 1024 px tile and a whole 1536 px crop, however far it lies
from the tile edges (measured with the bundled model on CMU-1: the mean foreground probability
differs by 0.015-0.03 even at the centre of a 1024 px tile; only ~65 % of the nuclei of a 1536 px
crop come out the same when it is run as 512 px tiles). No blending can remove that, since the
whole-image result itself changes with the crop size.

:func:`set_se_window` replaces the global mean by a mean over a fixed window around each 32 px
cell (``window`` px, an odd number of cells, clipped at the image border), computed on the 32 px
cell grid of the input and applied per cell. The network then becomes a function of local
context only: tiles placed on the 32 px grid reproduce the whole-image output up to the
zero-padding edge effect of the convolutions, which decays within ~150 px of a tile edge and
which the blending window (:mod:`conic_qp.tiling`) suppresses. It also stays close to how the
network was trained: on training-size tiles (e.g. 128-256 px) a window as large as the tile is
the global mean. The weights are not touched; ``window=None`` restores the trained behaviour.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conic_qp.errors import ConicQPError

log = logging.getLogger(__name__)

__all__ = ["CELL", "check_se_window", "se_windows", "set_se_window"]

#: Cell of the pooled grid in input px (the encoder's deepest stride).
CELL = 32

_ATTR = "_conic_qp_se_window"


def check_se_window(window: int | None) -> None:
    """Raise a one-line ConicQPError unless ``window`` is None or an odd multiple of 32 px."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < CELL:
        raise ConicQPError(f"SE window {window!r} must be an odd multiple of {CELL} px, e.g. 288")
    if window % CELL or (window // CELL) % 2 == 0:
        raise ConicQPError(
            f"SE window {window} px must be an odd multiple of {CELL} px (centred on a cell), "
            "e.g. 160 or 288"
        )


def _eff_gate(m: Any, s: torch.Tensor) -> torch.Tensor:
    return m.gate(m.conv_expand(m.act1(m.conv_reduce(s))))


def _se_gate(m: Any, s: torch.Tensor) -> torch.Tensor:
    return m.gate(m.fc2(m.act(m.bn(m.fc1(s)))))


def _ese_gate(m: Any, s: torch.Tensor) -> torch.Tensor:
    return m.gate(m.fc(s))


def _gate_fn(module: nn.Module) -> Callable[[Any, torch.Tensor], torch.Tensor] | None:
    """The part of an SE module after its global mean, for the SE designs timm uses.

    Functions of the module (not closures over it), so a deep copy of a patched network (the
    ONNX export of :mod:`conic_qp.runtime` copies it) computes with its own layers.
    """
    from timm.layers import squeeze_excite as se_layers
    from timm.models import _efficientnet_blocks as eff

    m: Any = module
    if isinstance(module, eff.SqueezeExcite):
        return _eff_gate
    if isinstance(module, se_layers.SEModule) and not m.add_maxpool:
        return _se_gate
    if isinstance(module, se_layers.EffectiveSEModule) and not m.add_maxpool:
        return _ese_gate
    return None


def _is_global_gate(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return any(key in name for key in ("squeezeexcite", "semodule", "ecamodule", "cbam", "gather"))


def set_se_window(model: nn.Module, window: int | None) -> int:
    """Make every squeeze-excitation layer of ``model`` pool over ``window`` px around each cell.

    ``None`` restores the global mean (the layers' own ``forward``). Idempotent; the weights and
    the state dict are unchanged. Returns the number of SE layers set. Each layer's stride is
    found once by a 64 px probe through ``model``. SE-like layers of other designs are left
    global, with a warning (their output then depends on the tile size).
    """
    check_se_window(window)
    layers = [(m, g) for m in model.modules() if (g := _gate_fn(m)) is not None]
    if window is None:
        for module, _ in layers:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_ATTR, None)
        return len(layers)
    unsupported = sum(1 for m in model.modules() if _gate_fn(m) is None and _is_global_gate(m))
    if unsupported:
        log.warning(
            "%d global-pooling gate layers of an unsupported design stay global: the output "
            "depends on the tile size",
            unsupported,
        )
    strides = _strides(model, [m for m, _ in layers])
    for module, gate in layers:
        cell = max(1, CELL // strides[module])
        setattr(module, _ATTR, window)
        module.forward = types.MethodType(_local_forward(gate, cell, window // CELL), module)
    return len(layers)


def se_windows(model: nn.Module) -> list[int | None]:
    """The window of every SE layer of ``model`` (None: global mean), in module order."""
    return [getattr(m, _ATTR, None) for m in model.modules() if _gate_fn(m) is not None]


def _strides(model: nn.Module, layers: list[nn.Module]) -> dict[nn.Module, int]:
    """Input px per feature px at each layer, from one forward pass of a 64 px probe."""
    if not layers:
        return {}
    size = 2 * CELL
    seen: dict[nn.Module, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, int(args[0].shape[-2])))
        for m in layers
    ]
    param = next(iter(model.parameters()), None)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    probe = torch.zeros(
        1,
        channels,
        size,
        size,
        device=param.device if param is not None else None,
        dtype=param.dtype if param is not None and param.is_floating_point() else None,
    )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    missing = [m for m in layers if m not in seen]
    if missing:
        raise ValueError(f"{len(missing)} SE layers were not reached by a forward pass")
    return {m: max(1, size // seen[m]) for m in layers}


def _local_forward(
    gate: Callable[[Any, torch.Tensor], torch.Tensor], cell: int, k: int
) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """SE forward with the mean over ``k`` x ``k`` cells of ``cell`` feature px (32 input px)."""

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, cell) if cell > 1 else x
        if k > 1:
            pooled = F.avg_pool2d(pooled, k, stride=1, padding=k // 2, count_include_pad=False)
        g = gate(self, pooled)
        if cell > 1:
            g = g.repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1)
        return x * g

    return forward
