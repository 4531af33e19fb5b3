"""Command-line interface. Thin: parses options, calls the library, renders with rich."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from conic_qp import __version__
from conic_qp.errors import ConicQPError, OutputError, cli_flag, describe_os_error, render

if TYPE_CHECKING:
    from rich.console import RenderableType

    from conic_qp.metrics import EvaluationResult

console = Console(stderr=True, soft_wrap=True)  # messages stay one line (logs, pipes)
log = logging.getLogger("conic_qp")


class _Group(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit code.

    :class:`ConicQPError` carries its own message and exit code. Any :class:`OSError` that
    reaches here (disk full, read-only file system, permission denied, a folder where a file
    was expected) becomes one line naming the path and the cause, exit code 1, never a
    traceback: the library converts the errors of its own writes (:class:`OutputError`), this
    catches the rest in one place.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConicQPError as exc:
            _fail(exc.render(cli_flag), exc.exit_code)
        except OSError as exc:
            _fail(describe_os_error(exc), OutputError.exit_code)


def _fail(message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="conic-qp")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--log-file", type=click.Path(dir_okay=False), default=None, help="Also log to this file."
)
def main(verbose: int, log_file: str | None) -> None:
    """Find, outline and classify nuclei in H&E slides (CoNIC 2022 method)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handlers: list[logging.Handler] = []
    from rich.logging import RichHandler

    rich_handler = RichHandler(console=console, show_path=False, level=level)
    rich_handler.setFormatter(logging.Formatter("%(message)s"))  # rich shows time and level
    handlers.append(rich_handler)
    if log_file:
        try:
            fh = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise OutputError.from_os_error(exc, log_file, what="log file") from None
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=logging.DEBUG if log_file else level, handlers=handlers, force=True)


def _passive_omp_threads() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    Must run before torch is imported. On a CPU shared with other jobs a spinning thread burns
    the time its partner needs, and every operator waits for the slowest: training ran 10-20x
    slower with two spinning threads than with passive ones on a loaded 2-core machine
    (benchmarks/train_bench.py); on an idle machine the difference is small.
    """
    import os

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


ZOOM_HELP = (
    "Enlarge the input this much for the network (default: as the checkpoint says; 1 is fastest)."
)


@main.command("evaluate")
@click.option("--pred", "pred_path", default=None, metavar="P.npy", help="Predicted labels.")
@click.option("--true", "true_path", default=None, metavar="T.npy", help="Ground-truth labels.")
@click.option(
    "--model",
    "model_path",
    default=None,
    type=click.Path(file_okay=False),
    help="Instead of --pred/--true: score this checkpoint on --data.",
)
@click.option(
    "--data",
    "data_specs",
    multiple=True,
    metavar="FORMAT:PATH[@SPLIT]",
    help="Labelled tiles for --model, e.g. tiles:../shared/data/consep@test (repeatable).",
)
@click.option("--tta", type=int, default=1, show_default=True, help="TTA passes (with --model).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --model, instead of --data: score the validation split of this training config.",
)
@click.option(
    "--zoom",
    type=float,
    default=None,
    help=ZOOM_HELP,
)
@click.option(
    "--task",
    type=click.Choice(["1", "2"]),
    default="1",
    show_default=True,
    help="With --model: thresholds tuned for Task 1 (thresholds.json) or 2 (thresholds_task2.json).",
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option(
    "--save-pred",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --model: also save the predicted (N, H, W, 2) labels (and the truth as *.true.npy).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--classes",
    default=None,
    help="Comma-separated names of class ids 1..C (default: the six CoNIC classes).",
)
@click.option(
    "--whole-images",
    is_flag=True,
    help="With --model: also reassemble each source image from its tiles and score it whole "
    "(HoVer-Net's protocol: PQ, DQ, SQ, AJI, type F1).",
)
def evaluate_cmd(
    pred_path: str | None,
    true_path: str | None,
    model_path: str | None,
    data_specs: tuple[str, ...],
    tta: int,
    config_path: str | None,
    zoom: float | None,
    task: str,
    device: str,
    save_pred: str | None,
    as_json: bool,
    classes: str | None,
    whole_images: bool,
) -> None:
    """Score label maps with the CoNIC 2022 metrics (PQ, mPQ+, R2 of Task-2 counts).

    Either --pred/--true: both files hold (N, H, W, 2) integer arrays (channel 0 instance ids,
    0 = background; channel 1 class ids 0..C). Or --model with --data: the checkpoint predicts the
    labelled tiles (at its um/px, with its thresholds) and is scored against their labels; with
    --whole-images the tiles of each source image are also put back together (tiles folders with
    orig_instance_ids.json, e.g. CoNSeP) and every image is predicted and scored whole.
    """
    _passive_omp_threads()
    import json

    from conic_qp.evaluate import evaluate_files, parse_class_names

    if model_path is not None:
        if pred_path or true_path:
            raise ConicQPError("give either --pred/--true or --model/--data, not both")
        from conic_qp.train.evaluation import evaluate_checkpoint

        result = evaluate_checkpoint(
            model_path,
            data_specs,
            tta=tta,
            task=int(task),
            device=device,
            save_pred=save_pred,
            zoom=zoom,
            config_path=config_path,
        )
        if whole_images:
            from conic_qp.train.evaluation import evaluate_whole_images_checkpoint

            whole = evaluate_whole_images_checkpoint(
                model_path, data_specs, tta=tta, task=int(task), device=device, zoom=zoom
            )
            if as_json:
                click.echo(json.dumps({"tiles": result.to_json(), "whole_images": whole.to_json()}))
            else:
                Console().print(_render_scores(result))
                Console().print(_render_whole(whole))
            return
    elif whole_images:
        raise ConicQPError("--whole-images needs --model and --data (it predicts whole images)")
    elif config_path or zoom is not None:
        raise ConicQPError("--config and --zoom go with --model (they set what it predicts)")
    elif pred_path and true_path:
        result = evaluate_files(pred_path, true_path, parse_class_names(classes))
    else:
        raise ConicQPError(
            "give --pred P.npy and --true T.npy, or --model CKPT and --data FORMAT:PATH"
        )
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        Console().print(_render_scores(result))


@main.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML training config (defaults: the paper's hyperparameters).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override any config value, e.g. --set optim.lr=3e-4 (repeatable).",
)
@click.option("--out", default=None, help="Output folder (config: out).")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--steps", type=int, default=None, help="Training steps (config: optim.steps).")
@click.option("--batch-size", type=int, default=None, help="Batch size (config: optim.batch_size).")
@click.option("--encoder", default=None, help="timm encoder (config: model.encoder).")
@click.option(
    "--init-from",
    default=None,
    metavar="CHECKPOINT",
    help="Start from a checkpoint folder's weights, or 'bundled' (fine-tuning; config: "
    "model.init_from).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last state.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
def train_cmd(
    config_path: str | None,
    overrides: tuple[str, ...],
    out: str | None,
    device: str | None,
    steps: int | None,
    batch_size: int | None,
    encoder: str | None,
    init_from: str | None,
    resume: bool,
    print_config: bool,
) -> None:
    """Train a model with the paper's recipe (II.A-E); keeps the checkpoint with the best mPQ+."""
    _passive_omp_threads()
    import json

    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from conic_qp.train.config import load_config
    from conic_qp.train.loop import train

    sets = list(overrides)
    for key, value in (
        ("out", out),
        ("device", device),
        ("optim.steps", steps),
        ("optim.batch_size", batch_size),
        ("model.encoder", encoder),
        ("model.init_from", init_from),
    ):
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")  # a JSON value is YAML: paths stay strings
    config = load_config(config_path, sets)
    if print_config:
        click.echo(config.to_yaml())
        return
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task("train", total=config.optim.steps, info="")
    state = {"loss": float("nan"), "mpq": float("nan"), "best": float("nan")}

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "start":
            progress.update(task, completed=info["start_step"])
            console.print(
                f"training on {info['train_tiles']} tiles, validating on {info['val_tiles']} ({info['device']})"
            )
        elif kind == "step":
            state["loss"] = info["loss"]
            progress.update(task, completed=info["step"])
        elif kind == "validation":
            state["mpq"], state["best"] = info["val_mpq_plus"], info["best"]
            progress.update(task, completed=info["step"])
        progress.update(
            task,
            info=f"loss {state['loss']:.3f}  val mPQ+ {state['mpq']:.3f} (best {state['best']:.3f})",
        )

    with progress:
        result = train(config, resume=resume, on_event=on_event)
    console.print(
        f"best checkpoint: {result.best} (val mPQ+ {result.best_mpq:.4f}, {result.steps} steps)"
    )


@main.command("tune")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(file_okay=False),
    help="Checkpoint folder whose thresholds are tuned (written back into it).",
)
@click.option(
    "--data",
    "data_specs",
    multiple=True,
    metavar="FORMAT:PATH[@SPLIT]",
    help="Validation data, e.g. tiles:../consep@test or conic:data/conic (repeatable).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Use the validation split of this training config instead of --data.",
)
@click.option(
    "--task",
    type=click.Choice(["1", "2", "both"]),
    default="both",
    help="1: maximise mPQ+ (thresholds.json); 2: maximise R2 (thresholds_task2.json).",
)
@click.option(
    "--objective",
    type=click.Choice(["mpq+", "pq", "pq+mpq+"]),
    default="mpq+",
    show_default=True,
    help="Task 1 score: mPQ+ (the challenge's), binary PQ (outlines) or their mean.",
)
@click.option(
    "--tta", type=int, default=1, show_default=True, help="TTA passes for the probabilities."
)
@click.option(
    "--zoom",
    type=float,
    default=None,
    help="Input zoom the thresholds are tuned for (default: the checkpoint's, which inference "
    "uses).",
)
@click.option(
    "--max-tiles", type=int, default=None, help="Tune on a random subset of this many tiles."
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--disable",
    multiple=True,
    type=click.Choice(
        [
            "class_specific_seed",
            "class_specific_fg",
            "split_and_size_filter",
            "solidity_filter",
            "seed_dynamic",
        ]
    ),
    help="Switch a post-processing step off (paper table IV ablation; seed_dynamic: every seed "
    "marks a nucleus, as in the paper; repeatable).",
)
@click.option(
    "--watershed",
    type=click.Choice(["auto", "per-class", "across-classes"]),
    default="auto",
    show_default=True,
    help="Instances delineated per class region (the paper), across class regions, or "
    "auto: whichever scores better on the validation data (by more than --min-gain).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write thresholds to this file instead of into the checkpoint.",
)
@click.option(
    "--min-gain",
    type=float,
    default=0.0,
    show_default=True,
    help="Keep a threshold change only if it raises the score by more than this (few "
    "validation images: e.g. 0.005 against fitting noise).",
)
def tune_cmd(
    model_path: str,
    data_specs: tuple[str, ...],
    config_path: str | None,
    task: str,
    objective: str,
    tta: int,
    zoom: float | None,
    max_tiles: int | None,
    device: str,
    seed: int,
    disable: tuple[str, ...],
    watershed: str,
    output: str | None,
    min_gain: float,
) -> None:
    """Grid-search per-class post-processing thresholds on validation data (paper II.G)."""
    _passive_omp_threads()
    from rich.table import Table

    from conic_qp.train.tune import TuneGrid, tune_on_data

    results = tune_on_data(
        model_path,
        data_specs,
        config_path,
        tasks=(1, 2) if task == "both" else (int(task),),
        tta=tta,
        max_tiles=max_tiles,
        device=device,
        seed=seed,
        on_progress=lambda n, s: (
            console.print(f"  evaluation {n}: {s:.4f}", highlight=False) if n % 25 == 0 else None
        ),
        disable=disable,
        watershed=watershed,
        output=output,
        grid=TuneGrid(min_gain=min_gain, objective=objective),
        zoom=zoom,
    )
    table = Table(title=f"tuned thresholds of {model_path}")
    for col in ("task", "score", "before", "evaluations", "written to"):
        table.add_column(col)
    task1 = {"mpq+": "mPQ+", "pq": "PQ", "pq+mpq+": "(PQ + mPQ+) / 2"}[objective]
    for r, path in results:
        name = task1 if r.task == 1 else "R2"
        table.add_row(
            f"{r.task} ({name})",
            f"{r.score:.4f}",
            f"{r.start_score:.4f}",
            str(r.evaluations),
            str(path),
        )
    Console().print(table)


# ------------------------------------------------------------------------ shared options


def _options(*decorators: Any) -> Any:
    """One decorator applying ``decorators`` in order (the first is the first in --help)."""

    def apply(f: Any) -> Any:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


#: The model: checkpoints, thresholds, device and CPU runtime (predict, annotate, omero predict).
_model_options = _options(
    click.option("--model", "model_paths", multiple=True, metavar="CKPT",
                 help="Checkpoint folder; repeat for an ensemble (members count as TTA passes; "
                 "default: the bundled model)."),
    click.option("--thresholds", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="thresholds.json overriding the checkpoint's."),
    click.option("--device", default="auto", show_default=True,
                 help="auto, cpu, cuda[:N] or mps."),
    click.option("--runtime", type=click.Choice(["auto", "torch", "onnx", "openvino"]),
                 default="auto", show_default=True, envvar="CONIC_QP_RUNTIME",
                 help="CPU inference: auto = OpenVINO, else ONNX Runtime when installed, else "
                 "torch."),
)  # fmt: skip

#: Test-time augmentation and batching (predict, annotate, omero predict).
_tta_options = _options(
    click.option("--tta", "tta_passes", type=int, default=16, show_default=True,
                 help="Test-time augmentation passes per model (paper: 16)."),
    click.option(
        "--no-mc-dropout",
        is_flag=True,
        help="Disable dropout at test time (default: as the checkpoint says).",
    ),
    click.option("--zoom", type=float, default=None, help=ZOOM_HELP),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Makes TTA reproducible."),
    click.option("--batch-size", type=int, default=2, show_default=True,
                 help="Tiles per network step (and images per forward pass)."),
)  # fmt: skip

#: The slides' level-0 resolution when their metadata lacks it or is wrong (predict, annotate,
#: omero predict); :func:`conic_qp.slides.check_mpp` refuses an implausible one unless forced.
_mpp_options = _options(
    click.option("--mpp", type=float, default=None,
                 help="Level-0 um/px of the slides, when their metadata lacks it or is wrong."),
    click.option("--force-mpp", is_flag=True, help="Accept an --mpp outside 0.1-2 um/px."),
)  # fmt: skip

#: Every engine setting of `predict` (also `omero predict`): the model, TTA, tiling, blending,
#: post-processing; :func:`_predict_settings` and :func:`_engine_models` read them.
_engine_options = _options(
    _model_options,
    _mpp_options,
    _tta_options,
    click.option("--workers", type=int, default=None,
                 help="Post-processing processes (default: CPU cores - 1, at most 8; 0 = "
                 "inline)."),
    click.option("--amp/--no-amp", default=True, show_default=True,
                 help="Mixed precision on CUDA."),
    click.option("--compile", "compile_models", is_flag=True, help="torch.compile the networks."),
    click.option("--tile-size", type=int, default=1024, show_default=True,
                 help="Network tile edge (px at the model's um/px, a multiple of 32)."),
    click.option("--overlap", type=int, default=256, show_default=True,
                 help="Px shared by neighbouring tiles (a multiple of 32)."),
    click.option("--window", "blend_window", type=click.Choice(["gaussian", "constant", "crop"]),
                 default="gaussian", show_default=True,
                 help="How overlapping tiles are blended (crop = nearest tile, no blending)."),
    click.option("--se-window", default="160", show_default=True, metavar="PX|global",
                 help="Squeeze-excitation window (odd multiple of 32 px) so results do not "
                 "depend on the tiling; 'global' = as trained."),
    click.option("--block-size", type=int, default=1024, show_default=True,
                 help="Post-processing block (px); --block-margin of context around it."),
    click.option("--block-margin", type=int, default=64, show_default=True,
                 help="Context around each block (px); above the largest nucleus."),
    click.option("--halo", type=int, default=None, hidden=True,
                 help="Deprecated: overlap = 2 x halo."),
    click.option("--no-tissue", is_flag=True, help="Run every tile (no tissue detection)."),
    click.option("--save-labels", is_flag=True,
                 help="Also write the instance label map (zarr)."),
    click.option("--object-type", type=click.Choice(["detection", "cell"]), default="detection",
                 show_default=True, help="QuPath object type in the GeoJSON."),
)  # fmt: skip

#: Where slides run (predict, annotate, omero predict).
_cluster_options = _options(
    click.option("--cluster", default=None, metavar="local[:N]|ADDRESS|slurm|pbs|lsf",
                 help="Run the slides on Dask: local processes, a scheduler, or batch jobs "
                 "(docs/cohorts.md)."),
    click.option("--cluster-config", type=click.Path(dir_okay=False), default=None,
                 metavar="FILE.yaml",
                 help="Jobs for slurm/pbs/lsf: cores, memory, gpus, walltime..."),
)  # fmt: skip


def _predict_settings(engine: dict[str, Any]) -> Any:
    """The PredictSettings of the :data:`_engine_options` of a command."""
    import os

    from conic_qp.predict import PredictSettings
    from conic_qp.tta import TTAConfig

    workers = engine["workers"]
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    return PredictSettings(
        tile_size=engine["tile_size"],
        overlap=engine["overlap"],
        window=engine["blend_window"],
        se_window=_parse_se_window(engine["se_window"]),
        block_size=engine["block_size"],
        block_margin=engine["block_margin"],
        halo=engine["halo"],
        batch_size=engine["batch_size"],
        tta=TTAConfig(
            passes=engine["tta_passes"],
            mc_dropout=False if engine["no_mc_dropout"] else None,
            zoom=engine["zoom"],
        ),
        seed=engine["seed"],
        device=engine["device"],
        amp=engine["amp"],
        compile=engine["compile_models"],
        workers=workers,
        tissue_detection=not engine["no_tissue"],
        save_labels=engine["save_labels"],
        object_type=engine["object_type"],
    )


def _engine_models(engine: dict[str, Any], spec: Any) -> Any:
    """The model set of the :data:`_engine_options`: here with its runtime; with a cluster
    (``spec``) on the CPU only, for classes and the fingerprint (the workers load their own)."""
    from conic_qp.predict import load_models, resolve_device

    paths = engine["model_paths"] or (_bundled_model(),)
    runtime, compiled = engine["runtime"], engine["compile_models"]
    dev = resolve_device("cpu" if spec is not None else engine["device"])
    models = load_models(paths, device=dev, thresholds=engine["thresholds"])
    if spec is None:
        return _with_runtime(models, runtime, compiled)
    if compiled and runtime in ("onnx", "openvino"):
        raise ConicQPError("--compile works with --runtime torch only")
    return models


@main.command("annotate")
@click.argument("project", type=click.Path(path_type=str))
@_model_options
@_tta_options
@click.option(
    "--images", default=None, help="Comma-separated entry ids or image names (default: all)."
)
@click.option(
    "--regions",
    type=click.Choice(["annotations", "tissue"]),
    default="annotations",
    show_default=True,
    help="Run inside each image's annotations (when found), or on the whole tissue.",
)
@click.option(
    "--regions-geojson",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Folder of annotation GeoJSONs named <entryID>.geojson or <image name>.geojson.",
)
@click.option("--remap", multiple=True, metavar="OLD=NEW", help="Image path prefix remapping.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "paquo", "geojson"]),
    default="auto",
    show_default=True,
    help="paquo writes into the project (needs QuPath); geojson writes files + a Groovy import.",
)
@click.option("--object-type", type=click.Choice(["detection", "cell"]), default="detection")
@click.option(
    "--workers", type=int, default=2, show_default=True, help="Post-processing processes."
)
@_mpp_options
@click.option("--tile-size", type=int, default=1024, show_default=True,
              help="Network tile edge (px); tiles overlap as in `predict`.")  # fmt: skip
@click.option(
    "--no-fix-uris",
    is_flag=True,
    help="Leave project.qpproj as it is even when images were found elsewhere than their URI.",
)
@click.option(
    "--detections-per-file",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Most detections per GeoJSON file QuPath reads at once (geojson backend).",
)
@_cluster_options
@click.option("--list", "list_only", is_flag=True, help="List the project's images and exit.")
def annotate_cmd(
    project: str,
    model_paths: tuple[str, ...],
    images: str | None,
    regions: str,
    regions_geojson: str | None,
    remap: tuple[str, ...],
    backend: str,
    object_type: str,
    device: str,
    runtime: str,
    batch_size: int,
    workers: int,
    tta_passes: int,
    no_mc_dropout: bool,
    zoom: float | None,
    seed: int,
    mpp: float | None,
    force_mpp: bool,
    thresholds: str | None,
    tile_size: int,
    no_fix_uris: bool,
    detections_per_file: int,
    cluster: str | None,
    cluster_config: str | None,
    list_only: bool,
) -> None:
    """Detect and classify nuclei in the images of a QuPath project and write them back.

    Exit code 0 when every image succeeded, 1 when some failed (listed at the end), 2 on bad
    input (nothing written). With --cluster the images run as Dask tasks (docs/cohorts.md);
    detections are written into the project by this process, one image at a time.
    """
    from rich.table import Table

    from conic_qp.predict import PredictSettings, load_models
    from conic_qp.qupath.project import read_project
    from conic_qp.slides import check_mpp
    from conic_qp.tta import TTAConfig

    if mpp is not None:
        check_mpp(mpp, force=force_mpp)  # bad options: exit 2 before the project is read
    if list_only:
        qp = read_project(project, remap=remap)
        listing = Table(title=str(qp.path))
        for col in ("entry id", "name", "file"):
            listing.add_column(col)
        for im in qp.images:
            problem = render(im.problem_template or im.problem or "", cli_flag)
            listing.add_row(im.entry_id, im.name, str(im.path) if im.ok else f"[red]{problem}")
        Console().print(listing)
        return
    paths = list(model_paths)
    if not paths:
        paths = [_bundled_model()]
    settings = PredictSettings(
        tile_size=tile_size,
        batch_size=batch_size,
        tta=TTAConfig(passes=tta_passes, mc_dropout=False if no_mc_dropout else None, zoom=zoom),
        seed=seed,
        device=device,
        workers=workers,
        object_type=object_type,  # type: ignore[arg-type]
    )
    spec = _cluster_spec(cluster, cluster_config)
    # on a cluster the workers load the models; here they only give classes and the fingerprint
    models = load_models(paths, device="cpu" if spec is not None else device, thresholds=thresholds)
    if spec is None:
        models = _with_runtime(models, runtime)
    selection = [s.strip() for s in images.split(",") if s.strip()] if images else None
    with contextlib.ExitStack() as stack:
        runner = None if spec is None else _dask_runner(stack, spec, device, quiet=False)
        result = _annotate_with_progress(
            project,
            models,
            settings,
            runner,
            model_spec=_worker_models(models, device, runtime) if runner is not None else None,
            images=selection,
            regions=regions,
            regions_geojson=regions_geojson,
            remap=remap,
            backend=backend,
            mpp=mpp,
            force_mpp=force_mpp,
            fix_uris=not no_fix_uris,
            detections_per_file=detections_per_file,
        )
    _print_annotate_result(result)


def _annotate_with_progress(
    project: str, models: Any, settings: Any, runner: Any, **options: Any
) -> Any:
    """annotate_project with a progress bar per image."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from conic_qp.annotate import annotate_project

    if runner is not None:  # slides finish on workers: count them, no tile-level bars
        with _CohortProgress(None, disabled=False) as cohort_bar:
            return annotate_project(
                project, models, settings, on_progress=cohort_bar.update, runner=runner,
                **options,
            )  # fmt: skip
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[nuclei]} nuclei"),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[int, Any] = {}

        def on_progress(p: Any) -> None:
            if p.slide_index not in tasks:
                tasks[p.slide_index] = bar.add_task(
                    f"[{p.slide_index + 1}/{p.slides_total}] {p.slide}", total=None, nuclei=0
                )
            task = tasks[p.slide_index]
            if p.stage == "tiles":
                bar.update(task, completed=p.tiles_done, total=p.tiles_total, nuclei=p.nuclei)

        return annotate_project(
            project, models, settings, on_progress=on_progress, runner=runner, **options
        )


def _print_annotate_result(result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"conic-qp annotate ({result.backend})")
    for col in ("entry id", "image", "regions", "nuclei", "under annotations", "status"):
        table.add_column(col)
    for o in result.images:
        status = {"done": "[green]done", "no_tissue": "[yellow]no tissue"}.get(
            o.status, "[red]failed"
        )
        under = ", ".join(f"{k}: {v}" for k, v in o.parent_counts.items() if k != "root")
        table.add_row(o.entry_id, o.name, o.region_source, str(o.n_nuclei), under, status)
    Console().print(table)
    if result.uri_fixes:
        console.print(
            f"updated the image paths of {len(result.uri_fixes)} image(s) in {result.project} "
            f"(QuPath opens images only at their stored paths; backup: {result.project_backup}):",
            highlight=False,
            soft_wrap=True,
        )
        for fix in result.uri_fixes:
            console.print(
                f"  {fix.entry_id} ({fix.name}): {fix.new}", highlight=False, soft_wrap=True
            )
    if result.unresolved:
        console.print(
            f"[yellow]QuPath will not find {len(result.unresolved)} image(s) at their paths "
            f"({', '.join(result.unresolved[:5])}); its command-line import stops at the first "
            "one: fix them with File > Project > Check project URIs in QuPath, or --remap",
            highlight=False,
            soft_wrap=True,
        )
    if result.classes_added:
        console.print(
            f"added classes {', '.join(result.classes_added)} to classifiers/classes.json"
        )
    if result.command and any(o.status == "done" for o in result.images):
        console.print("Import the detections into QuPath (close the project in QuPath first):")
        click.echo(result.command)
    failures = result.failure_messages(cli_flag)
    _exit_on_failures(failures, "image")


@main.command("composition")
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option(
    "--regions-geojson",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Folder of region GeoJSONs named by entry id, image name or slide stem.",
)
@click.option(
    "--rule",
    type=click.Choice(["centroid", "any-pixel"]),
    default="centroid",
    show_default=True,
    help="centroid: QuPath's rule; any-pixel: CoNIC Task 2 (outline intersects the region).",
)
@click.option("-o", "--output", required=True, metavar="TABLE.csv", help="Tidy table (CSV).")
@click.option("--report", default=None, metavar="REPORT.html", help="Also write an HTML report.")
@click.option("--remap", multiple=True, metavar="OLD=NEW", help="Image path prefix remapping.")
def composition_cmd(
    source: str,
    regions_geojson: str | None,
    rule: str,
    output: str,
    report: str | None,
    remap: tuple[str, ...],
) -> None:
    """Count nuclei per class in regions (QuPath annotations, GeoJSON) or whole slides.

    SOURCE is an annotated QuPath project (project.qpproj) or a folder of `conic-qp predict`
    outputs. Writes TABLE.csv (tidy), TABLE.parquet and TABLE.summary.csv (one row per slide x
    region).
    """
    from conic_qp.composition import compose_cohort, load_cohort, write_composition

    slides, failures = load_cohort(source, regions_geojson=regions_geojson, remap=remap)
    tidy, summary, scheme, failed = compose_cohort(slides, rule=rule)  # type: ignore[arg-type]
    failures.update(failed)
    if tidy.empty:
        raise ConicQPError(f"no slide of {source} could be composed; first problem: "
                           f"{next(iter(failures.values()), 'no tables')}")  # fmt: skip
    if report:
        from pathlib import Path

        from conic_qp.paths import check_output_dir

        check_output_dir(Path(report).absolute().parent, what="report folder")
    paths = write_composition(tidy, summary, output)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}", highlight=False)
    if report:
        from conic_qp.report import write_report

        done = [s for s in slides if s.slide not in failures]
        html = write_report(tidy, summary, report, classes=scheme, slides=done, failures=failures)
        console.print(f"report: {html}", highlight=False)
    _exit_on_failures(failures, "slide")


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="SLIDES...")
@click.option(
    "-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
    help="Output folder: <slide>.nuclei.parquet, .geojson.gz, .run.json (and .labels.zarr).",
)  # fmt: skip
@click.option("--roi", "rois", multiple=True, metavar="X,Y,W,H",
              help="Only this level-0 rectangle (repeatable).")  # fmt: skip
@click.option("--roi-geojson", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Only inside these polygon annotations (level-0 px).")  # fmt: skip
@_engine_options
@click.option("--resume", is_flag=True, help="Skip slides already complete for this model.")
@_cluster_options
@click.option("--strict", is_flag=True, help="Exit 1 also when a slide has no tissue.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary.")
def predict_cmd(
    inputs: tuple[str, ...],
    out_dir: str,
    rois: tuple[str, ...],
    roi_geojson: str | None,
    resume: bool,
    cluster: str | None,
    cluster_config: str | None,
    strict: bool,
    quiet: bool,
    **engine: Any,
) -> None:
    """Segment and classify nuclei in whole slides.

    SLIDES are slide files, folders (all slides in them), globs, .txt lists (one per line), QuPath
    projects (project.qpproj: every image) or OMERO links. A failed slide does not stop the
    batch; failures are listed at the end (exit code 1); slides without tissue are listed and
    recorded with status no_tissue (exit code 0 unless --strict). With --cluster slides run as Dask
    tasks (local processes, an existing scheduler, or SLURM/PBS/LSF jobs; docs/cohorts.md).
    """
    from conic_qp.cohort import predict_paths
    from conic_qp.predict import roi_from_boxes, roi_from_geojson
    from conic_qp.slides import check_mpp
    from conic_qp.sources import expand_refs

    mpp, force_mpp = engine["mpp"], engine["force_mpp"]
    if mpp is not None:
        check_mpp(mpp, force=force_mpp)  # bad options: exit 2 before anything is read or written
    refs, missing = expand_refs(inputs)
    if not refs:
        first = next(iter(missing.values()), "no input given")
        raise ConicQPError(f"no slide to run: {first}")
    roi = None
    if rois or roi_geojson:
        boxes = [_parse_roi(text) for text in rois]
        parts = ([roi_from_boxes(boxes)] if boxes else []) + (
            [roi_from_geojson(roi_geojson)] if roi_geojson else []
        )
        import shapely

        roi = shapely.union_all(parts)
    spec = _cluster_spec(cluster, cluster_config)
    settings = _predict_settings(engine)
    # on a cluster the workers load the models; this process needs them only to check the
    # checkpoints and for the fingerprint --resume compares
    models = _engine_models(engine, spec)
    device = engine["device"]
    with contextlib.ExitStack() as stack:
        runner = None if spec is None else _dask_runner(stack, spec, device, quiet)
        bar = _PredictProgress if runner is None else _CohortProgress
        worker_models = None
        if runner is not None:
            runtime, compiled = engine["runtime"], engine["compile_models"]
            worker_models = _worker_models(models, device, runtime, compiled)
        with bar(len(refs), disabled=quiet) as progress:
            batch = predict_paths(
                refs, models, settings, out_dir, progress.update, roi, mpp=mpp,
                force_mpp=force_mpp, resume=resume, runner=runner, model_spec=worker_models,
            )  # fmt: skip
    results = batch.cohort.results if batch.cohort is not None else []
    failures = {**missing, **{r.ref.label: r.message(cli_flag) for r in results if not r.ok}}
    if not quiet:
        done = [r for r in results if r.status == "done"]
        skipped = sum(r.status == "skipped" for r in results)
        blank = [r for r in results if r.status == "no_tissue"]
        nuclei = sum(r.n_nuclei for r in done)
        console.print(
            f"[bold green]{len(done)} slide(s) done[/], {nuclei} nuclei"
            + (f", {skipped} skipped (--resume)" if skipped else "")
            + (f", {len(blank)} without tissue" if blank else "")
            + f"; outputs in {out_dir}",
            highlight=False,
        )
        for r in blank:
            console.print(f"  no tissue: {r.ref.label}", highlight=False, soft_wrap=True)
    _exit_on_failures(failures, "slide")
    if strict and any(r.status == "no_tissue" for r in results):
        sys.exit(1)


def _exit_on_failures(failures: dict[str, str], what: str) -> None:
    """List the failed slides or images (one line each) and exit 1; nothing when none failed."""
    if not failures:
        return
    console.print(f"[bold red]{len(failures)} {what}(s) failed:[/]", highlight=False)
    for key, msg in failures.items():
        console.print(f"  {key}: {msg}", highlight=False, soft_wrap=True)
    sys.exit(1)


def _worker_models(models: Any, device: str, runtime: str, compiled: bool = False) -> Any:
    """The ModelSpec a cluster's workers load: these checkpoints, on their device and runtime."""
    from conic_qp.cohort import ModelSpec

    if compiled and runtime == "auto":
        runtime = "torch"  # torch.compile compiles torch networks
    return ModelSpec.from_models(models, device, compile=compiled, runtime=runtime)


def _cluster_spec(cluster: str | None, config: str | None) -> Any:
    """The ClusterSpec of --cluster/--cluster-config (None: run in this process)."""
    if cluster is None:
        if config is not None:
            raise ConicQPError("--cluster-config needs --cluster slurm, pbs or lsf (or local)")
        return None
    from conic_qp.cluster import ClusterSpec

    return ClusterSpec.parse(cluster, config)


def _dask_runner(
    stack: contextlib.ExitStack,
    spec: Any,
    device: str,
    quiet: bool,
    *,
    worker_env: dict[str, str] | None = None,
    task: Any = None,
) -> Any:
    """A DaskRunner on the cluster of ``spec``, which ``stack`` closes; prints where it runs."""
    from conic_qp.cluster import DaskRunner, open_cluster

    client = stack.enter_context(open_cluster(spec, device=device, worker_env=worker_env))
    _print_cluster(client, spec, quiet)
    return DaskRunner(client, retries=spec.retries, task=task)


def _print_cluster(client: Any, spec: Any, quiet: bool) -> None:
    if quiet:
        return
    from conic_qp.cluster import dashboard_link

    n = len(client.scheduler_info().get("workers", {}))
    link = dashboard_link(client)
    console.print(
        f"running on {spec.describe()}: {n} worker(s) now"
        + (f"; Dask dashboard: {link}" if link else "; install bokeh for the Dask dashboard"),
        highlight=False,
    )


def _parse_se_window(text: str) -> int | None:
    if text.strip().lower() == "global":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConicQPError(
            f"--se-window {text!r} must be a number of px (e.g. 288) or 'global'"
        ) from None


def _parse_roi(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConicQPError(f"--roi {text!r} must be x,y,w,h in level-0 pixels, e.g. 0,0,2048,2048")
    return values


class _PredictProgress:
    """rich progress bars for `predict`: slides, tiles of the current slide, nuclei/s."""

    def __init__(self, n_slides: int | None, disabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            disable=disabled,
            transient=False,
        )
        self._slides = self._progress.add_task("slides", total=n_slides, rate="")
        self._tiles = self._progress.add_task("tiles", total=None, rate="", visible=False)
        self._start = 0.0
        self._current = ""

    def __enter__(self) -> _PredictProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, event: Any) -> None:
        import time

        if event.slide != self._current:
            self._current = event.slide
            self._start = time.perf_counter()
            self._progress.reset(self._tiles, total=None, visible=True)
        if event.stage == "tiles":
            rate = event.nuclei / max(time.perf_counter() - self._start, 1e-6)
            self._progress.update(
                self._tiles,
                description=f"tiles {event.slide}",
                completed=event.tiles_done,
                total=event.tiles_total,
                rate=f"{rate:,.0f} nuclei/s",
            )
        elif event.stage in ("finished", "failed", "skipped"):
            self._progress.update(self._slides, completed=event.slide_index + 1)
        else:
            self._progress.update(self._tiles, description=f"{event.stage} {event.slide}")


class _CohortProgress:
    """rich progress of a cohort on a cluster: slides done/failed, nuclei, time left."""

    def __init__(self, n_slides: int | None, disabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("slides"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=disabled,
        )
        self._task = self._progress.add_task("slides", total=n_slides, info="")
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "nuclei": 0}

    def __enter__(self) -> _CohortProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, event: Any) -> None:
        if event.stage not in ("finished", "failed", "skipped"):
            return
        key = {"finished": "done"}.get(event.stage, event.stage)
        self.counts[key] += 1
        self.counts["nuclei"] += int(event.nuclei or 0)
        c = self.counts
        info = f"{c['done']} done, {c['failed']} failed" + (
            f", {c['skipped']} skipped" if c["skipped"] else ""
        )
        self._progress.update(self._task, advance=1, info=f"{info}, {c['nuclei']:,} nuclei")


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.4f}"


def _render_whole(result: Any) -> RenderableType:
    """Tables of whole-image scores (HoVer-Net's protocol) and per-class PQ / type F1."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="whole images (HoVer-Net protocol)", title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for label, value in (
        ("PQ (binary, mean over images)", result.pq),
        ("DQ", result.dq),
        ("SQ", result.sq),
        ("AJI", result.aji),
        ("detection F1 (centroids within 3 um)", result.f1_detection),
        ("type accuracy of detected nuclei", result.accuracy),
        ("mPQ+ (pooled over images)", result.mpq_plus),
    ):
        summary.add_row(label, _fmt(value))
    per_class = Table(title="per class", title_justify="left")
    for col in ("class", "PQ", "type F1"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for name, pq in result.pq_per_class.items():
        per_class.add_row(name, _fmt(pq), _fmt(result.f1_per_class[name]))
    return Group(summary, per_class)


def _render_scores(result: EvaluationResult) -> RenderableType:
    """Summary table and per-class table of CoNIC scores."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="CoNIC metrics", title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("PQ (binary, mean over images)", _fmt(result.pq))
    summary.add_row("mPQ+ (pooled over images)", _fmt(result.mpq_plus))
    summary.add_row("R2 (Task-2 counts)", _fmt(result.r2))
    per_class = Table(title="per class", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("PQ", justify="right")
    per_class.add_column("R2", justify="right")
    for name, pq in result.pq_per_class.items():
        per_class.add_row(name, _fmt(pq), _fmt(result.r2_per_class[name]))
    return Group(summary, per_class)


def _with_runtime(models: Any, runtime: str, compiled: bool = False) -> Any:
    """The model set with its networks run by ``--runtime`` (see conic_qp.runtime)."""
    import dataclasses

    from conic_qp.runtime import apply_runtime

    if compiled and runtime == "auto":
        runtime = "torch"  # torch.compile compiles torch networks
    networks = apply_runtime(models.networks, runtime)
    if compiled and any(a is not b for a, b in zip(networks, models.networks, strict=True)):
        raise ConicQPError("--compile works with --runtime torch only")
    return dataclasses.replace(models, networks=networks)


def _bundled_model() -> str:
    from conic_qp.predict import default_model_path

    default = default_model_path()
    if default is None:
        raise ConicQPError("no model given and none is bundled; pass --model CHECKPOINT_FOLDER")
    console.print(
        f"[yellow]using the bundled demonstration model ({default.name}, CoNSeP classes; "
        "see docs/models.md); pass --model for your own[/]",
        highlight=False,
    )
    return str(default)


# ----------------------------------------------------------------------------------- omero


@main.group("omero")
def omero_group() -> None:
    """Run OMERO batch jobs: images by id, dataset, project or plate (docs/omero.md).

    Log in first with `omero login HOST` (the session is reused), or set OMERO_HOST,
    OMERO_USER and OMERO_PASSWORD, or pass --session-key. Passwords are never options.
    """


def _omero_target_options(f: Any) -> Any:
    """Options naming the server and the images (shared by the omero commands)."""
    for opt in reversed(
        [
            click.argument("refs", nargs=-1, metavar="[REFS]..."),
            click.option(
                "--image", "images", multiple=True, metavar="ID", help="Image id (repeatable)."
            ),
            click.option(
                "--dataset",
                "datasets",
                multiple=True,
                metavar="ID",
                help="Every image of a dataset.",
            ),
            click.option(
                "--project",
                "projects",
                multiple=True,
                metavar="ID",
                help="Every image of a project.",
            ),
            click.option(
                "--plate", "plates", multiple=True, metavar="ID", help="Every image of a plate."
            ),
            click.option(
                "--qupath-project",
                type=click.Path(exists=True),
                default=None,
                help="The OMERO images of a QuPath project (its project.qpproj).",
            ),
            click.option(
                "--host",
                default=None,
                help="OMERO server (default: OMERO_HOST or the `omero login` host).",
            ),
            click.option(
                "--port", type=int, default=None, help="Blitz port (default: OMERO_PORT or 4064)."
            ),
            click.option(
                "--group",
                default=None,
                help="Group name or id (default: OMERO_GROUP, else all your groups).",
            ),
            click.option(
                "--session-key",
                default=None,
                envvar="OMERO_SESSION_KEY",
                show_envvar=True,
                help="Join this session instead of logging in.",
            ),
        ]
    ):
        f = opt(f)
    return f


#: The parameters of :func:`_omero_target_options`.
_OMERO_TARGETS = ("refs", "images", "datasets", "projects", "plates", "qupath_project", "host",
                  "port", "group", "session_key")  # fmt: skip


def _omero_connection(
    refs: tuple[str, ...],
    images: tuple[str, ...],
    datasets: tuple[str, ...],
    projects: tuple[str, ...],
    plates: tuple[str, ...],
    qupath_project: str | None,
    host: str | None,
    port: int | None,
    group: str | None,
    session_key: str | None,
) -> tuple[Any, list[Any]]:
    """The (not yet open) connection and the references of the :func:`_omero_target_options`."""
    from conic_qp.omero.connection import OmeroConnection, resolve_credentials
    from conic_qp.omero.refs import collect_refs

    targets = collect_refs(
        refs,
        images=images,
        datasets=datasets,
        projects=projects,
        plates=plates,
        qupath_project=qupath_project,
    )
    first = next((r for r in targets if r.host), None)
    creds = resolve_credentials(
        host,
        port,
        session_key,
        group,
        ref_host=first.host if first else None,
        ref_port=first.port if first else None,
    )
    return OmeroConnection(creds), targets


@omero_group.command("predict")
@_omero_target_options
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Local folder: per-image outputs as `predict` writes them, plus upload records.")  # fmt: skip
@click.option("--write", "write", default="table,attachment,map", show_default=True,
              help="What goes to OMERO: table,attachment,map,rois.")  # fmt: skip
@click.option("--max-rois", type=int, default=0, show_default=True,
              help="Polygon ROIs per image (at most; 0 = none). Viewers slow down with many.")  # fmt: skip
@click.option("--replace/--keep", default=True, show_default=True,
              help="Replace earlier conic-qp results of each image, or keep them.")  # fmt: skip
@click.option("--regions", type=click.Choice(["rois", "none"]), default="rois", show_default=True,
              help="Compose per existing OMERO ROI (and the whole tissue), or whole tissue only.")  # fmt: skip
@click.option("--inside-rois", is_flag=True, help="Run only inside each image's ROIs (if any).")
@click.option("--retries", type=int, default=1, show_default=True,
              help="New logins and attempts of an image after a dropped connection.")  # fmt: skip
@click.option("--roi", "rois", multiple=True, metavar="X,Y,W,H",
              help="Only this level-0 rectangle (repeatable).")  # fmt: skip
@_engine_options
@click.option("--resume", is_flag=True, help="Skip images already uploaded with this model.")
@_cluster_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def omero_predict_cmd(
    out_dir: str,
    write: str,
    max_rois: int,
    replace: bool,
    regions: str,
    inside_rois: bool,
    retries: int,
    rois: tuple[str, ...],
    resume: bool,
    cluster: str | None,
    cluster_config: str | None,
    quiet: bool,
    **options: Any,
) -> None:
    """Segment and classify nuclei in OMERO images and write the results back to OMERO.

    REFS are omero://host[:port]/image/ID (or dataset/, project/, plate/) references or
    OMERO.web links. Per image, under conic-qp namespaces: an OMERO.table (one row per
    nucleus), the QuPath GeoJSON as an attachment, key-value pairs with the composition of the
    image and of each ROI, and (with --max-rois) polygon ROIs. A failed image does not stop the
    batch; failures are listed at the end (exit code 1). With --cluster the predictions run on
    Dask workers, which log in themselves (docs/omero.md); the results are written back from
    here, one image at a time, each once it is complete.
    """
    from rich.table import Table

    from conic_qp.omero.jobs import expand_refs, run_omero_images
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import WriteOptions
    from conic_qp.predict import roi_from_boxes
    from conic_qp.slides import check_mpp

    target = {k: options.pop(k) for k in _OMERO_TARGETS}
    engine = options
    write_options = WriteOptions.parse(write, max_rois=max_rois, replace=replace)
    mpp, force_mpp = engine["mpp"], engine["force_mpp"]
    if mpp is not None:
        check_mpp(mpp, force=force_mpp)
    if retries < 0:
        raise ConicQPError(f"--retries must be >= 0 (got {retries})")
    spec = _cluster_spec(cluster, cluster_config)
    settings = _predict_settings(engine)
    roi = roi_from_boxes([_parse_roi(t) for t in rois]) if rois else None
    connection, targets = _omero_connection(**target)
    with connection, contextlib.ExitStack() as stack:  # log in before the model loads
        console.print(f"connected to {connection.credentials}", highlight=False)
        ids = expand_refs(connection, targets)
        models = _engine_models(engine, spec)
        runner = model_spec = None
        if spec is not None:
            runner, model_spec = _omero_cluster(
                stack, spec, connection, models, engine, retries, quiet
            )
        bar = _PredictProgress if spec is None else _CohortProgress
        with bar(len(ids), disabled=quiet) as progress:
            batch = run_omero_images(
                connection,
                [OmeroRef("image", i) for i in ids],
                models,
                settings,
                out_dir,
                write=write_options,
                mpp=mpp,
                force_mpp=force_mpp,
                roi=roi,
                regions=regions,  # type: ignore[arg-type]
                inside_rois=inside_rois,
                resume=resume,
                retries=retries,
                on_progress=progress.update,
                runner=runner,
                model_spec=model_spec,
            )
    table = Table(title=f"conic-qp omero predict ({connection.server})")
    for col in ("image", "name", "nuclei", "regions", "status"):
        table.add_column(col)
    for r in batch.images:
        colour = {"done": "green", "skipped": "yellow", "failed": "red"}[r.status]
        table.add_row(
            str(r.image_id), r.name, str(r.n_nuclei), str(r.n_regions), f"[{colour}]{r.status}"
        )
    Console().print(table)
    console.print(f"local outputs in {out_dir}", highlight=False)
    failures = batch.failure_messages(cli_flag)
    _exit_on_failures(failures, "image")


def _omero_cluster(
    stack: contextlib.ExitStack,
    spec: Any,
    connection: Any,
    models: Any,
    engine: dict[str, Any],
    retries: int,
    quiet: bool,
) -> tuple[Any, Any]:
    """The Dask runner of `omero predict --cluster` and what its workers load. Workers log in
    themselves; a local cluster's get this process's session key in their environment."""
    import functools

    from conic_qp.omero.jobs import local_worker_env, run_omero_job_task

    env = local_worker_env(connection) if spec.kind == "local" else {}
    if spec.kind != "local" and not quiet:
        console.print(
            "cluster workers log in to OMERO themselves: give them OMERO_SESSION_KEY (or "
            "OMERO_USER/OMERO_PASSWORD) in their environment or an `omero login` session "
            "(docs/omero.md)",
            highlight=False,
        )
    task = functools.partial(run_omero_job_task, retries=retries)
    runner = _dask_runner(stack, spec, engine["device"], quiet, worker_env=env, task=task)
    return runner, _worker_models(
        models, engine["device"], engine["runtime"], engine["compile_models"]
    )


@omero_group.command("composition")
@_omero_target_options
@click.option("-o", "--output", required=True, metavar="TABLE.csv", help="Tidy table (CSV).")
@click.option("--regions", type=click.Choice(["rois", "none"]), default="rois", show_default=True,
              help="Count per OMERO ROI, or over the whole area each run covered.")  # fmt: skip
@click.option("--report", default=None, metavar="REPORT.html", help="Also write an HTML report.")
def omero_composition_cmd(output: str, regions: str, report: str | None, **target: Any) -> None:
    """Count nuclei per class in OMERO images from their conic-qp tables (centroid rule).

    Reads each image's OMERO.table written by `conic-qp omero predict` and its ROIs; writes the
    same TABLE.csv / .parquet / .summary.csv as `conic-qp composition`.
    """
    from conic_qp.composition import compose_cohort, write_composition
    from conic_qp.omero.jobs import load_omero_cohort

    connection, targets = _omero_connection(**target)
    with connection:
        slides, failures, tmp = load_omero_cohort(connection, targets, regions=regions)  # type: ignore[arg-type]
    try:
        tidy, summary, scheme, failed = compose_cohort(slides, rule="centroid")
        failures.update(failed)
        if tidy.empty:
            raise ConicQPError(
                "no OMERO image could be composed; first problem: "
                f"{next(iter(failures.values()), 'no tables')}"
            )
        for kind, path in write_composition(tidy, summary, output).items():
            console.print(f"{kind}: {path}", highlight=False)
        if report:
            from conic_qp.report import write_report

            done = [s for s in slides if s.slide not in failures]
            html = write_report(
                tidy, summary, report, classes=scheme, slides=done, failures=failures
            )
            console.print(f"report: {html}", highlight=False)
    finally:
        if tmp is not None:
            tmp.cleanup()
    _exit_on_failures(failures, "image")


if __name__ == "__main__":  # pragma: no cover
    main()
