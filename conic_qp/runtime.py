"""Faster CPU inference: ConicNet exported once to ONNX and run by OpenVINO or ONNX Runtime.

:func:`cpu_network` wraps a network in an ``nn.Module`` that returns ConicNet's output dict, so
the inference engine (:func:`conic_qp.tta.predict_probabilities`) uses it unchanged: TTA passes
still arrive as one batch per call. Runtimes:

- ``"torch"``: the network itself (PyTorch eager; the only choice on a GPU);
- ``"onnx"``: ONNX Runtime (``pip install onnxruntime onnx onnxscript``);
- ``"openvino"``: OpenVINO (``pip install conic-qp[cpu-fast]``), fastest on x86 CPUs.

The graph is exported by ``torch.onnx.export`` per input size (batch dynamic), checked against
PyTorch on a random input, and cached in the user's cache folder (``$CONIC_QP_CACHE``, else
``~/.cache/conic-qp/graphs``) under a key of the weights' sha256, the architecture and the input
size, so later runs load it in a second; nothing is written inside the installed package.

MC dropout works: a second graph takes the dropout masks as inputs (one per dropout layer:
per-channel for the decoders' Dropout2d, per-sample for the encoder's drop path), drawn with
torch's generator, so ``--seed`` keeps runs reproducible. The masks follow the same
distributions as PyTorch's layers but are drawn in another order, so MC-dropout passes are not
bit-identical to eager PyTorch's (deterministic passes agree to ~1e-5).

Benchmark: ``benchmarks/cpu_runtime_bench.py``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from conic_qp.errors import ConicQPError
from conic_qp.model import DROPOUT_TYPES

log = logging.getLogger(__name__)

Runtime = Literal["torch", "onnx", "openvino"]
RUNTIMES: tuple[str, ...] = ("torch", "onnx", "openvino")
OUTPUTS: tuple[str, ...] = ("semantic", "three_label", "vectors")

#: Bump when the exported graph's layout changes: older cached graphs are then not used.
GRAPH_VERSION = 1
#: Largest difference accepted between an exported graph and PyTorch: of the softmax
#: probabilities post-processing uses, and of the centre vectors relative to their range. Raw
#: logits are not compared: with MC dropout masks they reach |150| and float32 reassociation
#: moves them by a few 1e-3 while the probabilities move by < 1e-3.
EXPORT_TOLERANCE = 1e-3

_INSTALL = {
    "onnx": "pip install onnxruntime onnx onnxscript",
    "openvino": "pip install 'conic-qp[cpu-fast]'",
}


def cache_dir() -> Path:
    """Folder of exported graphs: ``$CONIC_QP_CACHE`` or the user's cache folder."""
    env = os.environ.get("CONIC_QP_CACHE")
    if env:
        return Path(env).expanduser() / "graphs"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "conic-qp" / "graphs"


def available_runtimes() -> list[str]:
    """Runtimes whose packages import here (``torch`` always)."""
    out = ["torch"]
    if _importable("onnxruntime") and _importable("onnxscript"):
        out.append("onnx")
    if _importable("openvino") and _importable("onnxscript"):
        out.append("openvino")
    return out


def resolve_runtime(name: str, device: torch.device | str) -> str:
    """The runtime for ``name`` (``auto``: OpenVINO, else ONNX Runtime, else torch on CPU)."""
    dev = torch.device(device)
    if name == "auto":
        if dev.type != "cpu":
            return "torch"
        avail = available_runtimes()
        return "openvino" if "openvino" in avail else "onnx" if "onnx" in avail else "torch"
    if name not in RUNTIMES:
        raise ConicQPError(f"unknown runtime {name!r}; use one of auto, {', '.join(RUNTIMES)}")
    if name != "torch" and dev.type != "cpu":
        raise ConicQPError(
            f"runtime {name} runs on the CPU but the device is {dev}; use runtime torch there"
        )
    if name != "torch" and name not in available_runtimes():
        raise ConicQPError(f"runtime {name} is not installed; {_INSTALL[name]}")
    return name


def cpu_network(
    net: nn.Module,
    runtime: str,
    *,
    threads: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    fallback: bool = False,
) -> nn.Module:
    """``net`` run by ``runtime``: itself for ``torch``, else an :class:`ExportedNetwork`.

    ``threads`` defaults to ``torch.get_num_threads()``. ``fallback``: run PyTorch (with a
    warning) when the graph cannot be exported or disagrees with PyTorch, instead of failing.
    """
    if runtime == "torch":
        return net
    if runtime not in ("onnx", "openvino"):
        raise ConicQPError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    return ExportedNetwork(
        net,
        runtime,  # type: ignore[arg-type]
        threads=threads,
        cache=cache,
        fallback=fallback,
    )


def network_device(net: nn.Module) -> torch.device:
    """Device of a network's first parameter or buffer (CPU when it has none)."""
    for t in (*net.parameters(), *net.buffers()):
        return t.device
    return torch.device("cpu")


def runtime_used(net: nn.Module) -> str:
    """What ran ``net`` for ``run.json``: ``torch``, ``onnx`` or ``openvino``, naming the input
    sizes an ``auto`` runtime handed back to PyTorch."""
    if not isinstance(net, ExportedNetwork):
        return "torch"
    if not net._torch_shapes:
        return net.runtime
    sizes = ", ".join(f"{h}x{w}" for h, w, _ in sorted(net._torch_shapes))
    return f"{net.runtime} (torch for {sizes} inputs)"


def apply_runtime(networks: Sequence[nn.Module], runtime: str) -> list[nn.Module]:
    """The networks of an ensemble, each run by ``runtime`` (``auto``: see
    :func:`resolve_runtime`); networks on a GPU stay as they are (``auto`` or ``torch``).

    A runtime chosen by ``auto`` falls back to PyTorch when a graph cannot be exported or fails
    the agreement check; one asked for by name fails instead.
    """
    out = []
    for net in networks:
        name = resolve_runtime(runtime, network_device(net))
        if name != "torch":
            log.info("CPU inference runtime: %s", name)
        out.append(cpu_network(net, name, fallback=runtime == "auto"))
    return out


# ---------------------------------------------------------------------------- exported


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _dropout_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Dropout-like layers (those :func:`conic_qp.model.set_mc_dropout` switches), in order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, DROPOUT_TYPES)]


def _drop_rate(module: nn.Module) -> float:
    return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)) or 0.0)


_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class _MaskDropout(nn.Module):
    """Stands in for a dropout layer during export: multiplies by mask input ``index``."""

    owner: _MaskedNet

    def __init__(self, owner: _MaskedNet, index: int) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "owner", owner)  # not a submodule (no cycle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.owner.masks[self.index]


class _MaskedNet(nn.Module):
    """An export copy of the network: outputs as a tuple, dropout layers removed or, for the
    layers named in ``masked``, multiplied by mask inputs (in that order)."""

    def __init__(self, net: nn.Module, masked: Sequence[str] = ()) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).eval()
        self.masks: tuple[torch.Tensor, ...] = ()
        index = {name: i for i, name in enumerate(masked)}
        for name, _ in _dropout_layers(self.net):
            parent_name, _, attr = name.rpartition(".")
            parent = self.net.get_submodule(parent_name) if parent_name else self.net
            i = index.get(name)
            setattr(parent, attr, nn.Identity() if i is None else _MaskDropout(self, i))

    def forward(self, x: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.masks = masks
        out = self.net(x)
        return tuple(out[k] for k in OUTPUTS)


def _mask_layers(net: nn.Module) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Dropout layers that MC dropout makes random, with their mask shape for a batch of 1:
    (1, C, 1, 1) for channel dropout, (1, 1, 1, 1) for per-sample drop path.

    Found with one forward pass and hooks: layers with rate 0 and layers the network never
    calls (e.g. the drop path of a block without a shortcut) get no mask.
    """
    calls: dict[str, list[tuple[int, ...]]] = {}
    hooks = []
    for name, m in _dropout_layers(net):
        if _drop_rate(m) <= 0:
            continue

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0]
            width = x.shape[1] if isinstance(mod, _CHANNEL_DROPOUT) else 1
            calls.setdefault(name, []).append((1, int(width)) + (1,) * (x.ndim - 2))

        hooks.append(m.register_forward_pre_hook(hook))
    modes = [(m, m.training) for m in net.modules()]  # MC dropout leaves modes mixed
    try:
        net.eval()  # no dropout: this pass draws no random numbers
        with torch.no_grad():
            net(torch.zeros(1, 3, 64, 64))
    finally:
        for m, mode in modes:
            m.training = mode
        for hk in hooks:
            hk.remove()
    layers = []
    for name, m in _dropout_layers(net):
        shapes = calls.get(name, [])
        if not shapes:
            continue
        if len(shapes) > 1:
            raise ConicQPError(
                f"dropout layer {name} runs {len(shapes)} times per forward pass; MC dropout "
                "needs runtime torch for this network"
            )
        if not isinstance(m, _CHANNEL_DROPOUT) and type(m).__name__ != "DropPath":
            raise ConicQPError(
                f"dropout layer {name} ({type(m).__name__}) is not channel dropout or drop "
                "path; MC dropout needs runtime torch for this network"
            )
        layers.append((name, m, shapes[0]))
    return layers


def weights_key(net: nn.Module) -> str:
    """sha256 of the network's weights, buffers and architecture: the cache key of its graphs."""
    h = hashlib.sha256(f"conic-qp graph v{GRAPH_VERSION}".encode())
    config = getattr(net, "config", None)
    if config is not None and hasattr(config, "to_json"):
        h.update(json.dumps(config.to_json(), sort_keys=True).encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    from conic_qp.local_se import se_windows

    windows = se_windows(net)
    if any(w is not None for w in windows):  # windowed squeeze-excitation: another function
        h.update(json.dumps(windows).encode())
    return h.hexdigest()


def export_graph(
    net: nn.Module, path: Path, h: int, w: int, masked: Sequence[tuple[str, Any, Any]]
) -> Path:
    """Export ``net`` for (B, 3, h, w) inputs (B dynamic) to one ONNX file, atomically.

    ``masked`` are the :func:`_mask_layers` that become mask inputs (none: no dropout).
    """
    from conic_qp.sinks import atomic_path

    module = _MaskedNet(net, [name for name, _, _ in masked]).eval()
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))  # not the run's RNG
    masks = tuple(torch.ones((2, *shape[1:])) for _, _, shape in masked)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic: dict[str, Any] = {"x": {0: batch}}
    if masks:
        dynamic["masks"] = tuple({0: batch} for _ in masks)
    names = ["image", *(f"mask{i}" for i in range(len(masks)))]
    log.info("exporting the network for %dx%d inputs to %s (once per model and size)", h, w, path)
    chatter = io.StringIO()  # the exporter prints its progress: keep it for the debug log
    with atomic_path(path) as tmp, torch.no_grad():
        try:
            with (
                contextlib.redirect_stdout(chatter),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (x, *masks),
                    str(tmp),
                    dynamo=True,
                    input_names=names,
                    output_names=list(OUTPUTS),
                    dynamic_shapes=dynamic,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
        except Exception as exc:  # the exporter raises many types
            log.debug("exporter output:\n%s", chatter.getvalue())
            raise ConicQPError(
                f"could not export the network to ONNX ({type(exc).__name__}: "
                f"{str(exc)[:200]}); use runtime torch"
            ) from exc
    return path


class ExportedNetwork(nn.Module):
    """A ConicNet run from its exported graph by ONNX Runtime or OpenVINO, on CPU tensors.

    The wrapped PyTorch network stays a submodule: it gives the device, the dropout switches
    that :func:`conic_qp.model.set_mc_dropout` turns on (which select the MC-dropout graph) and
    the source of the export.
    """

    def __init__(
        self,
        net: nn.Module,
        runtime: Literal["onnx", "openvino"],
        *,
        threads: int | None = None,
        cache: str | os.PathLike[str] | None = None,
        fallback: bool = False,
    ) -> None:
        super().__init__()
        if runtime not in ("onnx", "openvino"):
            raise ValueError(f"ExportedNetwork runs onnx or openvino, not {runtime!r}")
        if runtime not in available_runtimes():
            raise ConicQPError(f"runtime {runtime} is not installed; {_INSTALL[runtime]}")
        self.net = net.eval()
        self.runtime = runtime
        self.threads = int(threads or torch.get_num_threads())
        self.cache = Path(cache) if cache is not None else cache_dir()
        self._key = weights_key(net)
        self._layers = _dropout_layers(net)
        self._masked: list[tuple[str, nn.Module, tuple[int, ...]]] | None = None
        self._graphs: dict[tuple[int, int, bool], Any] = {}
        self.fallback = fallback
        #: input shapes (h, w, mc) that run on PyTorch after a failed export (``fallback``)
        self._torch_shapes: set[tuple[int, int, bool]] = set()

    def network_changed(self) -> None:
        """Forget the graphs of the wrapped network as it was (e.g. before its squeeze-excitation
        window changed, :func:`conic_qp.engine.apply_se_window`): they are made anew."""
        self._key = weights_key(self.net)
        self._graphs.clear()
        self._torch_shapes.clear()
        self._masked = None

    def graph_path(self, h: int, w: int, with_masks: bool) -> Path:
        kind = "mc" if with_masks else "plain"
        return self.cache / f"{self._key[:24]}-{h}x{w}-{kind}.onnx"

    def mc_active(self) -> bool:
        """Whether MC dropout is switched on (any dropout layer with a rate in train mode)."""
        return any(m.training and _drop_rate(m) > 0 for _, m in self._layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.device.type != "cpu":
            raise ConicQPError(
                f"runtime {self.runtime} runs on the CPU; got a tensor on {x.device}: use "
                "runtime torch on a GPU"
            )
        check = getattr(self.net, "check_input", None)
        if check is not None:
            check(x)
        if self.net.training and any(
            m.training for m in self.net.modules() if not isinstance(m, DROPOUT_TYPES)
        ):
            raise ValueError("exported networks run inference only; call .eval() first")
        b, _, h, w = (int(s) for s in x.shape)
        mc = self.mc_active()
        if (h, w, mc) in self._torch_shapes:
            return dict(self.net(x))
        try:
            runner = self._runner(h, w, mc)
        except ConicQPError as exc:
            if not self.fallback:
                raise
            log.warning("runtime %s unusable for %dx%d inputs (%s); using PyTorch", self.runtime,
                        h, w, exc)  # fmt: skip
            self._torch_shapes.add((h, w, mc))
            return dict(self.net(x))
        inputs = [np.ascontiguousarray(x.detach().float().numpy())]
        if mc:
            inputs += self._draw_masks(b)
        outputs = runner(inputs)
        return {k: torch.from_numpy(v) for k, v in zip(OUTPUTS, outputs, strict=True)}

    # -- internals ---------------------------------------------------------------------

    def _draw_masks(self, b: int, generator: torch.Generator | None = None) -> list[np.ndarray]:
        """Keep-masks scaled by 1 / keep, as PyTorch's dropout and timm's drop path apply
        (torch's default generator unless ``generator``)."""
        out = []
        for _, m, shape in self._mask_inputs():
            keep = 1.0 - (_drop_rate(m) if m.training else 0.0)
            if keep <= 0:
                mask = torch.zeros((b, *shape[1:]))
            else:
                full = torch.full((b, *shape[1:]), keep)
                mask = torch.bernoulli(full, generator=generator) / keep
            out.append(mask.numpy())
        return out

    def _mask_inputs(self) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
        if self._masked is None:
            self._masked = _mask_layers(self.net)
        return self._masked

    def _runner(self, h: int, w: int, mc: bool) -> Any:
        key = (h, w, mc)
        runner = self._graphs.get(key)
        if runner is None:
            path = self.graph_path(h, w, mc)
            fresh = not path.is_file()
            if fresh:
                export_graph(self.net, path, h, w, self._mask_inputs() if mc else [])
            runner = self._load(path)
            if fresh:
                self._verify(runner, h, w, mc, path)
            self._graphs[key] = runner
        return runner

    def _load(self, path: Path) -> Any:
        if self.runtime == "onnx":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]

            def run_ort(inputs: list[np.ndarray]) -> list[np.ndarray]:
                return list(sess.run(list(OUTPUTS), dict(zip(names, inputs, strict=True))))

            return run_ort
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32",  # bf16 would be faster but moves outputs by ~0.1
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # pinned threads crawl on a shared machine
            "CACHE_DIR": str(self.cache / "openvino"),
        }
        model = core.read_model(str(path))
        compiled: dict[tuple[int, ...], Any] = {}

        def run_ov(inputs: list[np.ndarray]) -> list[np.ndarray]:
            shape = tuple(inputs[0].shape)
            entry = compiled.get(shape)
            if entry is None:  # static shapes compile to faster code than a dynamic batch
                m = model.clone()
                m.reshape({m.inputs[i]: list(a.shape) for i, a in enumerate(inputs)})
                cm = core.compile_model(m, "CPU", config)
                entry = compiled[shape] = (cm, cm.create_infer_request())
            cm, request = entry
            result = request.infer({i: a for i, a in enumerate(inputs)})
            # the request reuses its output buffers: copy before the next call
            return [np.array(result[cm.output(k)]) for k in OUTPUTS]

        return run_ov

    def _verify(self, runner: Any, h: int, w: int, mc: bool, path: Path) -> None:
        """Compare a freshly exported graph with PyTorch on a random input; drop it if off."""
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, h, w, generator=gen)
        masks = self._draw_masks(1, gen) if mc else []  # the run's own draws stay as they are
        names = [name for name, _, _ in self._mask_inputs()] if mc else []
        reference = _MaskedNet(self.net, names).eval()
        with torch.no_grad():
            want = reference(x, *(torch.from_numpy(m) for m in masks))
        got = runner([x.numpy(), *masks])
        diff = _disagreement(
            dict(zip(OUTPUTS, got, strict=True)), dict(zip(OUTPUTS, want, strict=True))
        )
        if not diff <= EXPORT_TOLERANCE:
            path.unlink(missing_ok=True)
            raise ConicQPError(
                f"the exported graph differs from PyTorch by {diff:.2g} (limit "
                f"{EXPORT_TOLERANCE}); use runtime torch"
            )
        log.info("exported graph agrees with PyTorch to %.1e", diff)


def _disagreement(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> float:
    """What post-processing would see differ: the largest probability difference of the two
    softmax heads, and of the centre vectors relative to their range (see EXPORT_TOLERANCE)."""
    diffs = []
    for key in ("semantic", "three_label"):
        p_got = torch.softmax(torch.from_numpy(np.asarray(got[key], np.float32)), dim=1)
        p_want = torch.softmax(want[key].float(), dim=1)
        diffs.append(float((p_got - p_want).abs().max()))
    v_want = want["vectors"].float().numpy()
    scale = max(1.0, float(np.abs(v_want).max()))
    diffs.append(float(np.abs(np.asarray(got["vectors"]) - v_want).max()) / scale)
    return max(diffs)
