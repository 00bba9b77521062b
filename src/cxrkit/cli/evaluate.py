"""`cxr evaluate | report | compare`: thin wrappers over cxrkit.evaluation, cxrkit.report and
cxrkit.compare.

Like every `cxrkit.cli` module, it imports the API inside each command: importing it here
would load PyTorch (seconds) for every `cxr` call, `cxr --help` included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cxrkit.cli.app import USER_ERRORS, app, console, fail, show_table
from cxrkit.runs import METRICS

SPEC_AT_97 = "Spec@97: the best specificity any threshold gives at 97% sensitivity"


def _summary(metrics: dict) -> Table:
    """One evaluation: threshold-free metrics in their own column, then each operating point."""
    from cxrkit.evaluation.metrics import COLLAPSED
    from cxrkit.evaluation.results import RATES, SCORES, format_metric
    from cxrkit.evaluation.thresholds import point_name

    deployed = metrics.get("deployed_operating_point")
    table = Table(title=f"{metrics['name']}: n={metrics['n']} images, "
                        f"{metrics['n_patients']} patients (95% CI)",
                  caption=deployed and f"deployed: {point_name(deployed)}, chosen on "
                                       f"{metrics['threshold_chosen_on']}")
    points = metrics.get("operating_points", {})
    table.add_column("metric")
    table.add_column("any threshold" if points else "each film its most probable class",
                     justify="right")
    for name, point in points.items():
        table.add_column(f"{point_name(name)} (t={point['threshold']:.3f})", justify="right")
    blank = [""] * len(points)
    if not points:  # multi-class
        for key in ("accuracy", "balanced_accuracy"):
            table.add_row(key, format_metric(key, metrics.get(key)))
        for key, value in metrics.get(COLLAPSED, {}).items():  # NORMAL against the rest
            table.add_row(f"not NORMAL: {key}", format_metric(key, value))
        for label, rates in metrics.get("per_class", {}).items():  # a class never called shows
            for key in ("sensitivity", "specificity", "ppv", "roc_auc"):
                table.add_row(f"{label}: {key}", format_metric(key, rates.get(key)))
    for key in SCORES if points else (k for k in SCORES if k in metrics):  # no PR-AUC of many
        table.add_row(key if points or key != "roc_auc" else "roc_auc (macro)",
                      format_metric(key, metrics.get(key)), *blank)
    for key in RATES if points else ():
        table.add_row(key, "", *[format_metric(key, p[key]) for p in points.values()])
    return table


def show_variants(metrics: dict) -> None:
    """The evaluation's TTA and framing tables, each beside the plain scoring."""
    from cxrkit.report import variant_tables

    rule = "deployed rule" if metrics["deployed_threshold"] is not None else "argmax"
    for variant in variant_tables(metrics):
        table = Table("metric", *variant["columns"], title=f"{variant['title']} ({rule})",
                      caption=variant.get("note"))  # how to read it, as the report says
        for row in variant["rows"]:
            table.add_row(*row)
        show_table(table)


FRAMING_THRESHOLD = typer.Option(
    False, "--framing-threshold",
    help="Choose (and deploy) the threshold on the validation films as filmed and "
         "centre-cropped to 85%: an operating point for sites whose films are framed "
         "differently (costs a little sensitivity on films like the training ones).")


@app.command("evaluate")
def evaluate_command(
    run: Path = typer.Argument(..., help="A run folder from `cxr train`."),
    split: str = typer.Option("test", "--split", help="test or val of the run's split.csv "
                              "(with --data: that split of the other data, if it has splits)."),
    data: str | None = typer.Option(None, "--data", help="Evaluate on another dataset instead "
                                    "(a folder, a CSV manifest or `kaggle`): external validation, "
                                    "written to RUN/eval/<its name>/."),
    tta: bool = typer.Option(False, "--tta", help="Also report test-time augmentation "
                             "(zoom and shifts, logits averaged), with its own temperature and "
                             "threshold chosen on validation films scored the same way."),
    framing: bool = typer.Option(False, "--framing", help="Also score the films framed more "
                                 "tightly (centre 85% and 70%): does the model read framing? "
                                 "Use with --split val to compare models without test data."),
    framing_threshold: bool = FRAMING_THRESHOLD,
    target_sensitivity: float | None = typer.Option(
        None, "--target-sensitivity",
        help="Also choose (and deploy) a threshold reaching this sensitivity on validation, "
             "in (0, 1], e.g. 0.95, calling the fewest validation films positive (midway to "
             "the next lower score); default: Youden's J."),
    calibrate_on: str | None = typer.Option(
        None, "--calibrate-on", help="Choose threshold, temperature and a bias per class "
        "(the site's class mix) on these labelled films (a folder or CSV manifest: its val "
        "split, or all of it) instead of the run's validation split, e.g. some films of the "
        "site you deploy to; never the films evaluated. Deployed to calibration.json."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Films scored at once."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0,
                                  help="Bootstrap resamples (by patient) for the 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    workers: int = typer.Option(0, "--num-workers", "--workers", min=0,
                                help="Image loading processes."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, mps; default: best."),
    figures: bool = typer.Option(True, "--figures/--no-figures",
                                 help="Write the PNG figures: ROC/PR curves, confusion "
                                 "matrix, reliability diagram, probability histograms, "
                                 "worst mistakes, Grad-CAM grids."),
    reset_calibration: bool = typer.Option(
        False, "--reset-calibration", help="Choose the operating point afresh (Youden's J on "
        "the run's validation split). Without it, and without --target-sensitivity, "
        "--framing-threshold or --calibrate-on, the options that chose the deployed one "
        "(calibration.json) are applied again."),
) -> None:
    """Metrics with patient-bootstrap intervals, threshold and calibration chosen on
    validation, and figures, in RUN/eval/<split>/."""
    from cxrkit.evaluation import evaluate_run
    from cxrkit.runs import read_calibration

    try:
        out = evaluate_run(run, split=split, data=data, tta=tta, framing=framing,
                           framing_threshold=framing_threshold,
                           target_sensitivity=target_sensitivity, batch_size=batch_size,
                           bootstrap=bootstrap, seed=seed, num_workers=workers, device=device,
                           figures=figures, calibrate_on=calibrate_on,
                           reset_calibration=reset_calibration)
    except USER_ERRORS as e:
        fail(str(e))
    metrics = json.loads((out / METRICS).read_text(encoding="utf-8"))
    show_table(_summary(metrics))
    show_variants(metrics)
    for note in metrics["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    calibration = read_calibration(run)
    threshold = metrics["deployed_threshold"]
    chosen = f"threshold {threshold:.4f} and " if threshold is not None else ""
    console.print(f"{chosen}calibration {calibration.describe()} "
                  f"({metrics['threshold_chosen_on']}) written to {Path(run) / 'calibration.json'}")
    console.print(f"[green]wrote[/] {out}")
    typer.echo(Path(out).absolute())  # stdout: the evaluation folder alone (eval/NAME/)


@app.command("report")
def report_command(
    run: Path = typer.Argument(..., help="A run folder from `cxr train`."),
    split: str = typer.Option("test", "--split", help="The split the report shows (evaluated "
                              "first if RUN/eval/<split>/ does not exist yet)."),
    audit: Path | None = typer.Option(
        None, "--audit", help="The data audit to show (a `cxr data audit --out` folder); by "
                              "default the run's own, or one of its data beside the run folder."),
) -> None:
    """One self-contained RUN/report.html: data, training, metrics, figures, model card."""
    from cxrkit.report import build_report

    try:
        out = build_report(run, split, audit=audit)
    except USER_ERRORS as e:
        fail(str(e))
    console.print(f"[green]wrote[/] {out}")
    typer.echo(Path(out).absolute())  # stdout: report.html alone


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare."),
    split: str = typer.Option("test", "--split", help="The split each run is compared on "
                              "(evaluated first where it is not yet)."),
    out: str | None = typer.Option(None, "--out", help="Also write the table as CSV (a folder, "
                                   "existing or ending in /, gets compare.csv)."),
    paired: bool = typer.Option(
        False, "--paired", help="Also each run minus the first on the films both scored, "
                                "with paired bootstrap intervals: is it really better?"),
) -> None:
    """Headline metrics of several runs at their deployed thresholds (calibration.json), and
    the best specificity any threshold gives at 97% sensitivity, with 95% intervals."""
    from cxrkit.compare import COMPARED, SHORT_NAMES, compare_runs, write_compare_csv
    from cxrkit.evaluation.results import format_metric

    if paired and len(runs) < 2:
        fail("--paired compares every run with the first one: give at least two runs")
    try:
        rows = compare_runs(runs, split, paired=paired)
    except USER_ERRORS as e:
        fail(str(e))
    table = Table(title=f"{split} split, at each run's deployed threshold (95% CI)",
                  caption=SPEC_AT_97)
    table.add_column("run", overflow="fold")
    table.add_column("n", justify="right")
    table.add_column("threshold", justify="right")
    for key in COMPARED:
        table.add_column(SHORT_NAMES[key], justify="right", overflow="fold")
    for r in rows:
        threshold = f"{r['threshold']:.3f}" if r["threshold"] is not None else "–"
        cells = [format_metric(k, r[k]).replace(" (", "\n(") for k in COMPARED]
        read_as = f", read as {r['read_as']}" if r["read_as"] else ""
        trained = f"\n{escape(r['recipe'])}" if r["recipe"] else ""  # what differs between runs
        table.add_row(f"{Path(r['run']).name}\n[dim]{r['model']}{read_as}{trained}[/]",
                      str(r["n"]),
                      threshold, *cells)
    show_table(table)
    for r in rows:
        if r["transductive"]:
            console.print(f"[yellow]note:[/] {Path(r['run']).name} was adapted (`cxr adapt`) to "
                          f"these films: a transductive result, not one on films it never saw")
    if paired:
        show_table(_paired_table(rows))
    if out is not None:  # (a str: a trailing slash says a folder, which Path would drop)
        where = Path(out) / "compare.csv" if out.endswith(("/", os.sep)) else Path(out)
        written = write_compare_csv(rows, where)
        console.print(f"[green]wrote[/] {written}")
        typer.echo(written)  # stdout: the CSV alone


def _paired_table(rows: list[dict]) -> Table:
    """Each run minus the first, on their shared films: an interval that excludes 0 is a
    difference these films show; the separate intervals above overlap far more often."""
    from cxrkit.compare import COMPARED, SHORT_NAMES
    from cxrkit.evaluation.results import format_metric

    table = Table(title=f"minus {Path(rows[0]['run']).name}, same films, same patient "
                        f"resamples (95% CI)", caption=SPEC_AT_97)
    table.add_column("run", overflow="fold")
    table.add_column("films", justify="right")
    for key in COMPARED:
        table.add_column(SHORT_NAMES[key], justify="right", overflow="fold")
    for r in rows[1:]:
        cells = [format_metric(k, r["paired"][k], difference=True).replace(" (", "\n(")
                 for k in COMPARED]
        table.add_row(Path(r["run"]).name, str(r["paired"]["n"]), *cells)
    return table
