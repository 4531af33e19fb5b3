"""``<slide>.run.json``: what produced a slide's outputs, written last as the mark of completion.

A run record names the slide, the models (with weights hashes), thresholds, every setting
(tiling, blending, squeeze-excitation window, TTA...), the plan's geometry, timings, counts and
library versions. ``--resume`` trusts a slide whose record says ``"complete": true`` for the same
model fingerprint and whose outputs exist (:func:`is_complete`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from conic_qp.runtime import runtime_used
from conic_qp.tta import mc_dropout_for, zoom_for

if TYPE_CHECKING:
    from conic_qp.plan import SlidePlan
    from conic_qp.predict import ModelSet
    from conic_qp.settings import PredictSettings

__all__ = [
    "RUN_FORMAT",
    "RUN_VERSION",
    "build_run_record",
    "is_complete",
    "read_record",
    "record_head",
    "versions",
]

RUN_FORMAT = "conic-qp predict run"
#: 2: blended tiles (``settings.overlap``, ``window``, ``se_window``, blocks) replace the halo.
RUN_VERSION = 2


def build_run_record(
    *,
    plan: SlidePlan,
    models: ModelSet,
    settings: PredictSettings,
    slide_path: str,
    image_id: str,
    device: str,
    timings: dict[str, float],
    nuclei: int,
    class_counts: dict[str, int],
    outputs: dict[str, str],
    n_cut: int = 0,
) -> dict[str, Any]:
    """The JSON-serialisable run record of one finished slide."""
    return {
        **record_head(
            models,
            settings,
            slide_path=slide_path,
            name=plan.name,
            image_id=image_id,
            mpp=plan.slide_mpp,
            dimensions=plan.level0_size,
        ),
        "blending": {
            "window": settings.window,
            "overlap": settings.overlap,
            "se_window": settings.se_window,
            "block_size": settings.block_size,
            "block_margin": settings.block_margin,
            "nuclei_touching_block_edges": int(n_cut),
        },
        "device": device,
        "runtime": [runtime_used(net) for net in models.networks],
        "mc_dropout": [mc_dropout_for(net, settings.tta) for net in models.networks],
        "zoom": [zoom_for(net, settings.tta) for net in models.networks],
        "roi": shapely.to_wkt(plan.roi, rounding_precision=2) if plan.roi is not None else None,
        "roi_area_px": plan.roi_area_px,
        "tissue_area_px": plan.tissue_area_px,
        "grid": plan.summary(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "nuclei": int(nuclei),
        "class_counts": class_counts,
        "outputs": outputs,
        "versions": versions(),
    }


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON record (run.json, an upload record...) as a dict; ``{}`` when it is missing,
    unreadable or not an object: records are evidence of work done, never required input."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_head(
    models: ModelSet,
    settings: PredictSettings,
    *,
    slide_path: str,
    name: str,
    image_id: str,
    mpp: float,
    dimensions: tuple[int, int],
) -> dict[str, Any]:
    """The fields every run record starts with (finished or no-tissue): what ran on what."""
    w0, h0 = dimensions
    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "complete": True,
        "fingerprint": models.fingerprint,
        "slide": {
            "path": slide_path,
            "name": name,
            "image_id": image_id,
            "mpp": float(mpp),
            "dimensions": [int(w0), int(h0)],
        },
        "models": models.info,
        "model_mpp": models.mpp,
        "classes": models.classes.to_json(),
        "thresholds": models.params.to_json(),
        "thresholds_source": models.thresholds_source,
        "settings": settings.to_json(),
    }


def is_complete(run_json: Path, fingerprint: str) -> bool:
    """True when ``run_json`` records a complete run of the same models with its outputs."""
    try:
        data = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or data.get("complete") is not True:
        return False
    if data.get("fingerprint") != fingerprint:
        return False
    outs = data.get("outputs") or {}
    return all((run_json.parent / str(name)).exists() for name in outs.values())


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the results."""
    import pyarrow as pa
    import torch

    from conic_qp import __version__

    out = {
        "conic_qp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }
    for mod in ("timm", "tiffslide", "skimage", "shapely"):
        m = sys.modules.get(mod)
        if m is None:
            with contextlib.suppress(Exception):
                m = __import__(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    return out
