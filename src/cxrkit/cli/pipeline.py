"""`cxr run` (the whole job: train, audit, evaluate, report) and `cxr adapt`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cxrkit.cli.app import (
    DATA_HELP,
    USER_ERRORS,
    app,
    console,
    fail,
    refuse_a_file_for_a_folder,
    route_lightning_logs,
    show_table,
)
from cxrkit.cli.evaluate import FRAMING_THRESHOLD, show_variants
from cxrkit.cli.train import (
    CONFIG,
    PRESET,
    RESUME_IF_EXISTS,
    SET,
    TRAINING_ERRORS,
    build_config,
    interrupted,
    refuse_options_beside_resume,
    say_skipped,
)
from cxrkit.runs import METRICS


@app.command("run")
def run_all(
    ctx: typer.Context,
    data: str = typer.Argument("kaggle", help=DATA_HELP),
    preset: str = PRESET,
    config: Path | None = CONFIG,
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders go."),
    name: str | None = typer.Option(None, "--name", help="Run folder name (default: time and "
                                    "model)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run "
                                       "folder, then evaluate and report it."),
    tta: bool = typer.Option(False, "--tta", help="Also evaluate with test-time augmentation."),
    framing: bool = typer.Option(False, "--framing", help="Also score the test films framed "
                                 "more tightly (the framing check of `cxr evaluate`)."),
    framing_threshold: bool = FRAMING_THRESHOLD,
    resume_if_exists: bool = RESUME_IF_EXISTS,
    set_: list[str] = SET,
) -> None:
    """The main job: train, audit the data, evaluate on the test split, write report.html."""
    from cxrkit.pipeline import run_pipeline
    from cxrkit.training import TrainingInterrupted

    route_lightning_logs()

    if resume is not None:  # the evaluation's options still apply
        refuse_options_beside_resume(ctx, allowed=("tta", "framing", "framing_threshold"))
    try:
        cfg = None if resume is not None else build_config(
            data, preset, config, {"runs_dir": str(runs_dir), "name": name}, set_)
        job = run_pipeline(cfg, resume=resume, resume_if_exists=resume_if_exists, tta=tta,
                           framing=framing, framing_threshold=framing_threshold)
    except TRAINING_ERRORS as e:
        fail(str(e))
    except TrainingInterrupted as e:
        given = [flag for flag, on in (("--tta", tta), ("--framing", framing),
                                       ("--framing-threshold", framing_threshold)) if on]
        interrupted(e, " ".join(["cxr run", *given]))  # which evaluates and reports too
    if job is None:  # a process Lightning launched (DDP): rank 0 reports
        return
    test = json.loads((job.evaluation / METRICS).read_text(encoding="utf-8"))
    show_table(job_table(test))
    show_variants(test)
    say_skipped(job.folder)
    console.print(f"report: {job.report}")
    console.print(next_steps(job.folder))
    typer.echo(job.folder)


def job_table(test: dict) -> Table:
    """The deployed rule on the validation films that chose it beside the test films: one
    rule for both columns (the training's own table is at P = 0.5), so that the gap between
    them is the shift to the test films, not a change of threshold."""
    from cxrkit.evaluation.results import HEADLINE, NAMES, format_metric, headline

    threshold, chosen = test["deployed_threshold"], test.get("selection_split")
    rule = f"threshold {threshold:.3f}" if threshold is not None else "the most probable class"
    table = Table("metric", title=f"At the deployed rule, {rule} ({test['threshold_chosen_on']})")
    columns = [headline(test)]
    if chosen:
        table.add_column(f"{chosen['name']} ({chosen['n']} films, chose it)", justify="right")
        columns.insert(0, headline(chosen | {
            "deployed_operating_point": test.get("deployed_operating_point")}))
    table.add_column(f"test ({test['n']} films, 95% CI)", justify="right")
    for key in HEADLINE:
        if columns[-1][key] is not None:
            table.add_row(NAMES[key], *(format_metric(key, c[key]) for c in columns))
    return table


def next_steps(folder: Path) -> str:
    """What a user does with a trained run, with its real path to copy."""
    run = escape(str(folder))
    return (f"next: `cxr predict {run} FILMS...`, `cxr evaluate {run} --data OTHER_SITE`, "
            f"`cxr export {run}`, `cxr serve {run}`")


@app.command()
def adapt(
    run: Path = typer.Argument(..., help="A trained run folder."),
    data: str = typer.Option(..., "--data", help="The new site's images (a folder, any layout; "
                             "labels are never read) or a dataset with splits."),
    split: str | None = typer.Option("test", "--split", help="Which split of a dataset with "
                                     "splits to adapt to (ignored for a plain folder)."),
    out: Path | None = typer.Option(None, "--out", help="The adapted run folder "
                                    "(default: RUN-adapted)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Films read at once."),
) -> None:
    """Adapt a model to a new hospital's unlabelled films (re-estimated BatchNorm statistics).

    Writes a new run folder that `cxr evaluate`, `predict`, `export` and `serve` accept.
    """
    from cxrkit.adapt import adapt_run

    refuse_a_file_for_a_folder(out)
    try:
        folder = adapt_run(run, data, split, out, batch_size)
    except USER_ERRORS as e:
        fail(str(e))
    console.print(f"adapted {run} to {data}; evaluate it with `cxr evaluate {folder}`")
    typer.echo(folder)
