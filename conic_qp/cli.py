"""Command-line interface. Thin: parses options, calls the library, renders with rich."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from rich.console import Console

from conic_qp import __version__
from conic_qp.errors import ConicQPError

console = Console(stderr=True)
log = logging.getLogger("conic_qp")


class _Group(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConicQPError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)


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

    handlers.append(RichHandler(console=console, show_path=False, level=level))
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=logging.DEBUG if log_file else level, handlers=handlers, force=True)


@main.command("evaluate")
@click.option("--pred", "pred_path", required=True, metavar="P.npy", help="Predicted labels.")
@click.option("--true", "true_path", required=True, metavar="T.npy", help="Ground-truth labels.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--classes",
    default=None,
    help="Comma-separated names of class ids 1..C (default: the six CoNIC classes).",
)
def evaluate_cmd(pred_path: str, true_path: str, as_json: bool, classes: str | None) -> None:
    """Score label maps with the CoNIC 2022 metrics (PQ, mPQ+, R2 of Task-2 counts).

    Both files hold (N, H, W, 2) integer arrays: channel 0 instance ids (0 = background),
    channel 1 class ids 0..C.
    """
    import json

    from conic_qp.evaluate import evaluate_files, parse_class_names, render_result

    result = evaluate_files(pred_path, true_path, parse_class_names(classes))
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        Console().print(render_result(result))


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
    resume: bool,
    print_config: bool,
) -> None:
    """Train a model with the paper's recipe (II.A-E); keeps the checkpoint with the best mPQ+."""
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
    ):
        if value is not None:
            sets.append(f"{key}={value}")
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
    "--tta", type=int, default=1, show_default=True, help="TTA passes for the probabilities."
)
@click.option(
    "--max-tiles", type=int, default=None, help="Tune on a random subset of this many tiles."
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--disable",
    multiple=True,
    type=click.Choice(["class_specific_seed", "class_specific_fg", "split_and_size_filter", "solidity_filter"]),
    help="Switch a post-processing step off (paper table IV ablation; repeatable).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write thresholds to this file instead of into the checkpoint.",
)
def tune_cmd(
    model_path: str,
    data_specs: tuple[str, ...],
    config_path: str | None,
    task: str,
    tta: int,
    max_tiles: int | None,
    device: str,
    seed: int,
    disable: tuple[str, ...],
    output: str | None,
) -> None:
    """Grid-search per-class post-processing thresholds on validation data (paper II.G)."""
    from rich.table import Table

    from conic_qp.train.tune import tune_on_data

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
        output=output,
    )
    table = Table(title=f"tuned thresholds of {model_path}")
    for col in ("task", "score", "before", "evaluations", "written to"):
        table.add_column(col)
    for r, path in results:
        name = "mPQ+" if r.task == 1 else "R2"
        table.add_row(
            f"{r.task} ({name})",
            f"{r.score:.4f}",
            f"{r.start_score:.4f}",
            str(r.evaluations),
            str(path),
        )
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
