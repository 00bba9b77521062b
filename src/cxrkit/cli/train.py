"""`cxr train` and `cxr lr-find`: thin wrappers over cxrkit.training.

Options build a `TrainConfig`: the preset, then the `--config` YAML on top, then the
named options, then every `--set key=value` (any config field, e.g.
`--set optim.schedule=onecycle --set stages.0.epochs=3`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from cxrkit.cli.app import DATA_HELP, app, console, fail, route_lightning_logs, show_table
from cxrkit.config import (
    PRESETS,
    ConfigError,
    DamagedCheckpointError,
    NoSpaceError,
    OutOfMemoryError,
    TrainConfig,
    parse_assignments,
)
from cxrkit.data.kaggle import KaggleDownloadError
from cxrkit.data.layout import DataLayoutError
from cxrkit.runs import SKIPPED, VAL_METRICS

# Narrower than the other commands' USER_ERRORS: a bare ValueError from deep inside a
# training run is a bug, and keeps its traceback.
TRAINING_ERRORS = (ConfigError, DataLayoutError, KaggleDownloadError, FileExistsError,
                   FileNotFoundError, DamagedCheckpointError, NoSpaceError, OutOfMemoryError)

DATA = typer.Option(None, "--data", help="Required (unless --resume, or a --config that sets "
                    f"data.path): {DATA_HELP}")
PRESET = typer.Option("default", "--preset", help=f"One of {', '.join(PRESETS)}: quick (default's "
                      "recipe for one epoch at twice the learning rate, earliest layers "
                      "frozen, mixup: 2-3 min of training on a 2-core CPU, about 4 min for "
                      "all of `cxr run`), default (the whole pretrained "
                      "Lite0 fine-tuned, 34-59 min on a 2-core CPU), finetune (head on frozen "
                      "features, then fine-tune all), scratch (simple_cnn from scratch).")
CONFIG = typer.Option(None, "--config", help="YAML with the config fields to change (a run's "
                      "config.yaml reproduces it, with --name NEW), applied on top of the "
                      "preset. A `stages:` list replaces the preset's stages, each starting "
                      "from the stage defaults; to change one field of a preset's stage, --set "
                      "stages.0.epochs=1.")
MODEL = typer.Option(None, "--model", help="efficientnet_lite0/1/2, simple_cnn, timm:<name>, "
                     "or one a package registers (cxrkit.models.register_model).")
WEIGHTS = typer.Option(None, "--weights", help="Start from these weights (.safetensors or a "
                       "state dict).")
PRETRAINED = typer.Option(None, "--pretrained/--no-pretrained", help="ImageNet weights "
                          "(default: the preset's).")
TASK = typer.Option(None, "--task", help="binary (two classes, e.g. NORMAL/PNEUMONIA), "
                    "3class (NORMAL/BACTERIA/VIRUS from Kermany's file names) or "
                    "multiclass (every class of the data, as named).")
BATCH_SIZE = typer.Option(None, "--batch-size", help="Batch size of every stage.")
SEED = typer.Option(None, "--seed", help="Seed of the split, sampling and initialisation.")
MAX_TRAIN = typer.Option(None, "--max-train-images", help="Train on a random subset of this "
                         "many images (quick tries).")
WORKERS = typer.Option(None, "--num-workers", help="DataLoader processes (default: chosen "
                       "for this machine).")
CACHE = typer.Option(None, "--cache/--no-cache", help="Decode every image once into a "
                     "memory-mapped cache (default on), kept for later runs in "
                     "$CXRKIT_CACHE/decoded, else ~/.cache/cxrkit/decoded (Kermany's train "
                     "split at 224 px: 212 MiB; at most CXRKIT_CACHE_MAX_GB, default 20; `cxr "
                     "data cache --clear` frees it).")
RESUME_IF_EXISTS = typer.Option(False, "--resume-if-exists", help="With --name: continue the "
                                "run RUNS_DIR/NAME where it exists (refused if its config "
                                "differs), else start it: a command a retried job can repeat.")
SET = typer.Option([], "--set", help="Any config field: key=value, dotted, repeatable.")


def refuse_options_beside_resume(ctx: typer.Context, allowed: tuple[str, ...] = ()) -> None:
    """`--resume RUN` continues RUN exactly as it was configured (its config.yaml): any other
    training option given beside it would be ignored, or half applied over the restored
    optimiser state, so it is refused instead."""
    def given_by_user(name: str) -> bool:  # by the source's name: typer vendors its own click
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    given = [param.opts[-1] if param.opts[-1].startswith("--") else param.name
             for param in ctx.command.params
             if param.name not in ("resume", *allowed) and given_by_user(param.name)]
    if given:
        fail(f"--resume continues {ctx.params['resume']} with its own config.yaml, so "
             f"{', '.join(given)} would be ignored: drop {'them' if len(given) > 1 else 'it'}, "
             "or start a new run from that "
             f"config (--config {ctx.params['resume']}/config.yaml --name NEW plus your changes)")


def build_config(data: str | None, preset: str, config: Path | None,
                 options: dict[str, object], assignments: list[str]) -> TrainConfig:
    """preset -> YAML -> named options (None = not given) -> --set."""
    base = TrainConfig.preset(preset)
    cfg = TrainConfig.load(config, base) if config else base
    overrides = {key: value for key, value in options.items() if value is not None}
    if data is not None:
        overrides["data.path"] = data
    overrides.update(cfg.shortcuts(overrides.pop("epochs", None), overrides.pop("lr", None),
                                   overrides.pop("data.batch_size", None)))
    return cfg.updated({**overrides, **parse_assignments(assignments)})


def _sets_data(config: Path | None) -> bool:
    """Whether a --config YAML names the data (a run's config.yaml does)."""
    if config is None or not config.is_file():
        return False
    try:
        settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return False  # TrainConfig.load reports it properly
    data = settings.get("data") if isinstance(settings, dict) else None
    return isinstance(data, dict) and bool(data.get("path"))


def interrupted(stop, command: str = "cxr train") -> None:
    """Say how to continue a run that a signal stopped (with `command`, the one that was
    running), and exit as killed by it (130 for Ctrl+C, 143 for SIGTERM: a scheduler or `&&`
    chain must not take it for success)."""
    console.print(f"[yellow]{stop.during} interrupted ({stop.signal_name}); continue it with "
                  f"`{command} --resume {escape(str(stop.folder))}`[/]")
    raise typer.Exit(143 if stop.signal_name == "SIGTERM" else 130)


def metrics_table(run: Path) -> Table:
    """The validation metrics `cxr train` wrote into RUN/val_metrics.json."""
    metrics = json.loads((run / VAL_METRICS).read_text(encoding="utf-8"))
    binary = len(json.loads((run / "labels.json").read_text(encoding="utf-8"))) == 2
    if metrics.get("members"):
        chosen = f"ensemble of {len(metrics['members'])} members"
    else:
        chosen = f"best of stage {metrics['best_stage']}, epoch {metrics['best_epoch']}"
    caption = ("accuracy, sensitivity, specificity, f1 at P = 0.5: `cxr evaluate` chooses the "
               "threshold on validation" if binary else "of the most probable class; "
               "sensitivity, specificity, f1: macro averages over the classes")
    caption += ("; loss: the training loss over all films at once (class weights included), "
                "not the log's mean over batches")
    table = Table(title=f"Validation ({metrics['images']} images, {chosen})", caption=caption)
    for name in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss"):
        table.add_column(name.replace("_", "-"), justify="right")
    table.add_row(*("–" if metrics[name] is None else f"{metrics[name]:.4f}" for name in
                    ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss")))
    return table


@app.command()
def train(
    ctx: typer.Context,
    data: str | None = DATA,
    preset: str = PRESET,
    config: Path | None = CONFIG,
    model: str | None = MODEL,
    weights: Path | None = WEIGHTS,
    pretrained: bool | None = PRETRAINED,
    task: str | None = TASK,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs of the last stage (others: "
                                      "--set stages.0.epochs=N)."),
    batch_size: int | None = BATCH_SIZE,
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of the last stage's head."),
    runs_dir: Path | None = typer.Option(None, "--runs-dir", help="Where run folders go "
                                         "(default: runs)."),
    name: str | None = typer.Option(None, "--name", help="Run folder name (default: time and "
                                    "model; give one for multi-node runs)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run folder from its "
                                       "last.ckpt, config.yaml and split.csv."),
    accelerator: str | None = typer.Option(None, "--accelerator", help="auto, cpu, gpu, ..."),
    devices: str | None = typer.Option(None, "--devices", help="auto or a device count."),
    num_nodes: int | None = typer.Option(None, "--num-nodes", help="Machines of a multi-node "
                                         "DDP run (Lightning's num_nodes)."),
    strategy: str | None = typer.Option(None, "--strategy", help="auto, ddp, fsdp, ..."),
    precision: str | None = typer.Option(None, "--precision", help="auto, 32, bf16-mixed, "
                                         "16-mixed."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile."),
    deterministic: bool | None = typer.Option(None, "--deterministic/--no-deterministic",
                                              help="PyTorch's deterministic algorithms (slower "
                                              "on a GPU)."),
    seed: int | None = SEED,
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Of train, by "
                                              "patient, for validation (default 0.15)."),
    max_train_images: int | None = MAX_TRAIN,
    num_workers: int | None = WORKERS,
    cache: bool | None = CACHE,
    resume_if_exists: bool = RESUME_IF_EXISTS,
    set_: list[str] = SET,
) -> None:
    """Train a classifier; prints validation metrics, and last the run folder."""
    from lightning.pytorch.utilities import rank_zero_only

    from cxrkit.training import TrainingInterrupted
    from cxrkit.training import train as train_run

    route_lightning_logs()

    if resume is not None:
        refuse_options_beside_resume(ctx)
    try:
        if resume is not None:
            run = train_run(resume=resume)
        else:
            if data is None and not _sets_data(config):
                fail("--data is required (or --resume RUN, or a --config that sets data.path): "
                     "`kaggle` or a dataset folder.")
            options = {
                "model.name": model, "model.weights": weights and str(weights),
                "model.pretrained": pretrained, "data.task": task, "epochs": epochs,
                "data.batch_size": batch_size, "lr": lr, "runs_dir": runs_dir and str(runs_dir),
                "name": name, "trainer.accelerator": accelerator, "trainer.devices": devices,
                "trainer.num_nodes": num_nodes, "trainer.strategy": strategy,
                "trainer.precision": precision, "trainer.compile": compile,
                "trainer.deterministic": deterministic, "seed": seed,
                "data.val_fraction": val_fraction, "data.max_train_images": max_train_images,
                "data.num_workers": num_workers, "data.cache": cache,
            }
            run = train_run(build_config(data, preset, config, options, set_),
                            resume_if_exists=resume_if_exists)
    except TRAINING_ERRORS as e:
        fail(str(e))
    except TrainingInterrupted as e:
        interrupted(e)
    if rank_zero_only.rank != 0:  # a process Lightning launched: rank 0 reports
        return
    show_table(metrics_table(run))
    say_skipped(run)
    typer.echo(run)


def say_skipped(run: Path) -> None:
    """Last before the run folder: the warnings that named them scrolled by long ago."""
    skipped = run / SKIPPED
    if skipped.is_file():
        with open(skipped, encoding="utf-8", newline="") as f:
            films = sum(1 for _ in csv.DictReader(f))  # rows, whatever a path holds
        console.print(f"[yellow]{films} film(s) could not be read and were skipped: "
                      f"{escape(str(skipped))} lists them; `cxr data audit` says why[/]")


@app.command("lr-find")
def lr_find(
    data: str = typer.Option(None, "--data", help=f"Required: {DATA_HELP}"),
    preset: str = PRESET,
    config: Path | None = CONFIG,
    model: str | None = MODEL,
    weights: Path | None = WEIGHTS,
    pretrained: bool | None = PRETRAINED,
    task: str | None = TASK,
    batch_size: int | None = BATCH_SIZE,
    seed: int | None = SEED,
    max_train_images: int | None = MAX_TRAIN,
    num_workers: int | None = WORKERS,
    cache: bool | None = CACHE,
    stage: int = typer.Option(0, "--stage", help="Index of the stage to test (0: the first)."),
    num_training: int = typer.Option(100, "--num-training",
                                     help="Steps of the range test (at least 20)."),
    out: Path = typer.Option(Path("lr_find.png"), "--out", help="Where the plot goes."),
    set_: list[str] = SET,
) -> None:
    """Lightning's learning-rate range test: saves the loss-vs-LR plot, prints a suggestion
    for the stage's `lr` (the head's rate; each backbone group sweeps at its lr_decay share)."""
    from cxrkit.training import find_lr

    route_lightning_logs()

    if data is None:
        fail("--data is required: `kaggle` or a dataset folder.")
    options = {"model.name": model, "model.weights": weights and str(weights),
               "model.pretrained": pretrained, "data.task": task, "data.batch_size": batch_size,
               "seed": seed, "data.max_train_images": max_train_images,
               "data.num_workers": num_workers, "data.cache": cache}
    if out.is_dir():  # a folder: the plot goes in it
        out = out / "lr_find.png"
    elif not out.suffix:  # matplotlib would add .png: say the name it writes
        out = out.with_suffix(".png")
    try:
        cfg = build_config(data, preset, config, options, set_)
        suggestion = find_lr(cfg, stage, out, num_training)
    except TRAINING_ERRORS as e:
        fail(str(e))
    console.print(f"learning-rate plot: {out}")
    if suggestion is None:
        fail("no suggestion: the loss did not fall over the range; try more --num-training steps")
    console.print(f"suggested learning rate for stage {cfg.stages[stage].name}: {suggestion:.3g} "
                  f"(use it with --set stages.{stage}.lr={suggestion:.3g})")
    typer.echo(f"{suggestion:.6g}")
