"""Grid search of the post-processing thresholds on a validation set (paper II.G, table IV).

The network runs once (with optional TTA); the search then only re-runs post-processing. It is a
coordinate search: first the seed h-maxima depth (``seed_dynamic``, which keeps pale nuclei
whole), then one (fg, seed) pair for all classes at once (two parameters, so it
follows the validation data less closely than per-class changes), then for each class in turn the
(fg, seed) grid jointly, the size limits and the solidity threshold, each time keeping the value
that maximises the task's score (Task 1: mPQ+ by default, or binary PQ, or their mean; Task 2: R2
of the counts); two rounds by default. Task 1 thresholds go
to the checkpoint's ``thresholds.json`` (the default for inference); Task 2 thresholds to
``thresholds_task2.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conic_qp.checkpoint import THRESHOLDS_TASK2_FILE
from conic_qp.errors import ConicQPError
from conic_qp.metrics import evaluate
from conic_qp.postprocess import PostprocessParams
from conic_qp.sinks import write_json_atomic
from conic_qp.train.predictions import iter_probabilities, labelled_truth, predicted_labels

logger = logging.getLogger(__name__)

ABLATION_FLAGS = (
    "class_specific_seed",
    "class_specific_fg",
    "split_and_size_filter",
    "solidity_filter",
)
#: What ``disable`` accepts: the ablation switches, and ``seed_dynamic`` (the paper's seeds).
DISABLE_CHOICES = (*ABLATION_FLAGS, "seed_dynamic")


#: Task 1 scores :func:`tune_thresholds` can maximise.
TASK1_OBJECTIVES = ("mpq+", "pq", "pq+mpq+")


@dataclass(frozen=True)
class TuneGrid:
    """Candidate values; sizes are in pixels at the model's um/px.

    ``min_gain``: a change is kept only if it raises the score by more than this. With few
    validation images, per-class thresholds otherwise follow the noise of a handful of nuclei
    (0 keeps every improvement, as the paper's search). ``watershed``: also try delineating
    instances across class regions (``PostprocessParams.per_class_watershed`` off), which keeps
    a nucleus the network is unsure about whole instead of cutting it at a class border.
    ``seed_dynamic``: candidate h-maxima depths of the seeds
    (:attr:`~conic_qp.postprocess.PostprocessParams.seed_dynamic`; empty: keep the start's).
    ``shared``: also try one (fg, seed) pair for all classes. ``objective``: the Task 1 score,
    ``"mpq+"`` (the challenge's), ``"pq"`` (binary PQ: outlines only) or ``"pq+mpq+"`` (their
    mean: outlines and classes alike).
    """

    fg: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    seed: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
    min_size: tuple[int, ...] = (0, 10, 20, 30)
    max_size: tuple[int | None, ...] = (None, 1000, 2000)
    min_solidity: tuple[float, ...] = (0.0, 0.6, 0.7, 0.8)
    seed_dynamic: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    rounds: int = 2
    min_gain: float = 0.0
    watershed: bool = True
    shared: bool = True
    objective: str = "mpq+"

    def __post_init__(self) -> None:
        if self.objective not in TASK1_OBJECTIVES:
            raise ConicQPError(
                f"objective {self.objective!r} must be one of {', '.join(TASK1_OBJECTIVES)}"
            )


@dataclass
class TuneResult:
    task: int
    params: PostprocessParams
    score: float
    start_score: float
    evaluations: int
    trace: list[dict[str, Any]] = field(default_factory=list)


def _score(task: int, result: Any, objective: str = "mpq+") -> float:
    if task == 2:
        return float(result.r2)
    return {
        "mpq+": float(result.mpq_plus),
        "pq": float(result.pq),
        "pq+mpq+": (float(result.pq) + float(result.mpq_plus)) / 2,
    }[objective]


def tune_thresholds(
    probabilities: Sequence[tuple[np.ndarray, np.ndarray]],
    true: np.ndarray,
    class_names: Sequence[str],
    task: int = 1,
    grid: TuneGrid = TuneGrid(),
    start: PostprocessParams | None = None,
    on_progress: Callable[[int, float], None] | None = None,
) -> TuneResult:
    """Search per-class thresholds maximising the Task 1 (mPQ+) or Task 2 (R2) score.

    Parameters
    ----------
    probabilities : per tile ``(semantic_prob (C+1, H, W), three_label_prob (3, H, W))``.
    true : (N, H, W, 2) truth (instance ids, class ids).
    class_names : names of classes 1..C.
    task : 1 or 2.
    """
    if task not in (1, 2):
        raise ConicQPError(f"task must be 1 (mPQ+) or 2 (R2), got {task}")
    if len(probabilities) != len(true):
        raise ConicQPError(f"{len(probabilities)} predictions for {len(true)} truth tiles")
    if len(true) == 0:
        raise ConicQPError("no validation tiles to tune on")
    n_classes = len(class_names)
    params = start or PostprocessParams.default(n_classes)
    cache: dict[str, float] = {}
    evaluations = 0

    def score(p: PostprocessParams) -> float:
        nonlocal evaluations
        key = json.dumps(p.to_json(), sort_keys=True)
        if key not in cache:
            cache[key] = _score(
                task,
                evaluate(predicted_labels(probabilities, p), true, class_names),
                grid.objective,
            )
            evaluations += 1
            if on_progress is not None:
                on_progress(evaluations, cache[key])
        return cache[key]

    margin = max(1e-9, float(grid.min_gain))
    start_score = best = score(params)
    trace: list[dict[str, Any]] = [{"step": "start", "score": best}]
    improved = False

    def consider(cand: PostprocessParams, step: str, change: Any) -> None:
        """Keep ``cand`` when it beats the best so far by more than the margin."""
        nonlocal best, params, improved
        sc = score(cand)
        if sc > best + margin:
            best, params, improved = sc, cand, True
            trace.append({"step": step, "change": change, "score": sc})

    for _ in range(grid.rounds):
        improved = False
        if grid.watershed:
            cand = dataclasses.replace(params, per_class_watershed=not params.per_class_watershed)
            consider(cand, "watershed", cand.per_class_watershed)
        for dyn in grid.seed_dynamic:
            consider(dataclasses.replace(params, seed_dynamic=dyn), "seed dynamic", dyn)
        if grid.shared and params.class_specific_fg and params.class_specific_seed:
            for f, s_ in itertools.product(grid.fg, grid.seed):
                if s_ < f:
                    continue
                cand = params
                for cid in range(1, n_classes + 1):
                    cand = cand.with_class(cid, fg=f, seed=s_)
                consider(cand, "all classes fg/seed", [f, s_])
        if not (params.class_specific_fg and params.class_specific_seed):
            # Table IV ablation: one threshold pair for all classes.
            for f, s_ in itertools.product(grid.fg, grid.seed):
                if s_ < f:
                    continue
                cand = dataclasses.replace(
                    params,
                    agnostic_fg=f if not params.class_specific_fg else params.agnostic_fg,
                    agnostic_seed=s_ if not params.class_specific_seed else params.agnostic_seed,
                )
                consider(cand, "agnostic fg/seed", [f, s_])
        for cid in range(1, n_classes + 1):
            searches: list[tuple[str, list[dict[str, Any]]]] = [
                (
                    "fg/seed",
                    [
                        {"fg": f, "seed": s}
                        for f, s in itertools.product(grid.fg, grid.seed)
                        if s >= f
                    ],
                ),
                (
                    "size",
                    [
                        {"min_size": a, "max_size": b}
                        for a, b in itertools.product(grid.min_size, grid.max_size)
                        if b is None or b > max(a, 1)
                    ],
                ),
                ("solidity", [{"min_solidity": v} for v in grid.min_solidity]),
            ]
            for name, candidates in searches:
                for change in candidates:
                    consider(params.with_class(cid, **change), f"class {cid} {name}", change)
        if not improved:
            break
    logger.info(
        "tuned task %d: %.4f -> %.4f in %d evaluations", task, start_score, best, evaluations
    )
    return TuneResult(task, params, best, start_score, evaluations, trace)


def write_thresholds(checkpoint: str | Path, result: TuneResult) -> Path:
    """Store tuned thresholds in the checkpoint folder (backup of the previous file, atomic)."""
    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise ConicQPError(f"{folder} is not a conic-qp checkpoint folder (no config.json)")
    target = folder / ("thresholds.json" if result.task == 1 else THRESHOLDS_TASK2_FILE)
    if target.exists():
        backup = target.with_name(target.name + ".bak")
        backup.write_bytes(target.read_bytes())
    write_json_atomic(target, result.params.to_json())
    return target


def tune_on_data(
    model_path: str | Path,
    data_specs: Sequence[str] = (),
    config_path: str | Path | None = None,
    tasks: Sequence[int] = (1, 2),
    tta: int = 1,
    max_tiles: int | None = None,
    device: str = "auto",
    seed: int = 0,
    grid: TuneGrid = TuneGrid(),
    on_progress: Callable[[int, float], None] | None = None,
    disable: Sequence[str] = (),
    output: str | Path | None = None,
    watershed: str = "auto",
    zoom: float | None = None,
) -> list[tuple[TuneResult, Path]]:
    """Load a checkpoint and validation data, tune each task, write the thresholds files.

    ``disable`` switches off post-processing steps (``seed_dynamic``: the paper's seeds; table
    IV: ``class_specific_seed``,
    ``class_specific_fg``, ``split_and_size_filter``, ``solidity_filter``); ``watershed``:
    ``per-class`` (the paper) or ``across-classes`` fixes the delineation, ``auto`` lets the
    search choose (:class:`TuneGrid` ``watershed``); ``output`` writes the
    thresholds to that file (task 2: ``<stem>_task2.json``) instead of into the checkpoint;
    ``zoom``: the input zoom the thresholds are for (None: the checkpoint's, which is what they
    will run with).
    """
    from conic_qp.train.evaluation import checkpoint_params, load_eval_data

    ckpt, val = load_eval_data(model_path, data_specs, config_path, max_tiles, device, seed)
    scheme = ckpt.classes
    start = checkpoint_params(ckpt, model_path)
    unknown = sorted(set(disable) - set(DISABLE_CHOICES))
    if unknown:
        raise ConicQPError(f"cannot disable {unknown}; choose from {', '.join(DISABLE_CHOICES)}")
    switches: dict[str, Any] = {flag: False for flag in disable if flag in ABLATION_FLAGS}
    start = dataclasses.replace(start, **switches)
    if "seed_dynamic" in disable:  # every seed marks a nucleus, as in the paper
        start = dataclasses.replace(start, seed_dynamic=0.0)
        grid = dataclasses.replace(grid, seed_dynamic=())
    if watershed not in ("auto", "per-class", "across-classes"):
        raise ConicQPError(f"watershed {watershed!r} must be auto, per-class or across-classes")
    if watershed != "auto":  # the user chose the delineation
        start = dataclasses.replace(start, per_class_watershed=watershed == "per-class")
        grid = dataclasses.replace(grid, watershed=False)
    # computed once, re-scored per grid point
    probs = list(iter_probabilities(ckpt.model, val.images, tta, seed, zoom=zoom))
    true = labelled_truth(val)
    results = []
    for task in tasks:
        result = tune_thresholds(probs, true, scheme.names, task, grid, start, on_progress)
        if output is None:
            results.append((result, write_thresholds(model_path, result)))
        else:
            target = Path(output)
            if task == 2:
                target = target.with_name(f"{target.stem}_task2{target.suffix or '.json'}")
            write_json_atomic(target, result.params.to_json())
            results.append((result, target))
    return results
