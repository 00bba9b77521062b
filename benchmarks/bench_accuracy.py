"""Accuracy on the Kermany test split: each preset trained, chosen on validation, tested once.

    python benchmarks/bench_accuracy.py [--data DIR] [--runs-dir runs]
                                        [--presets default quick scratch] [--runs RUN ...]

For each preset: `cxr train` (everything - epochs, threshold, temperature - chosen on the
patient-grouped validation split carved from train), then `cxr evaluate RUN --tta` on the
624-image test split. For the first preset it also runs `cxr adapt` (BatchNorm statistics
re-estimated on the *unlabelled* test films) and evaluates that as its own row: it is
transductive, so it is never mixed with the strict result. An existing run folder of the
same name is reused, not retrained. `--runs` adds experiment runs already trained (each
evaluated, and adapted as its own row). `--framing-threshold` instead evaluates the runs
once more, choosing the threshold on the validation films as filmed and cropped to 85%
(`cxr evaluate --framing-threshold`), and prints that row beside the plain Youden one.
Prints markdown tables for BENCHMARKS.md: the strict rows, then each run's ROC curve read at
Kermany et al.'s operating point (the best any threshold gives on the test films: a
comparison of ranking, labelled as an upper bound, never a result).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cxrkit.adapt import adapt_run
from cxrkit.config import TrainConfig
from cxrkit.evaluation import evaluate_run
from cxrkit.evaluation.published import PUBLISHED, at_published_point
from cxrkit.training import train

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))
COLUMNS = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1")


def train_once(preset: str, data: Path, runs_dir: Path) -> tuple[Path, float | None]:
    """The run folder of `preset`, trained unless it exists; and its training seconds."""
    run = runs_dir / preset
    if (run / "model.safetensors").is_file():
        return run, None
    start = time.perf_counter()
    train(TrainConfig.preset(preset, data=str(data), overrides={"runs_dir": str(runs_dir),
                                                                 "name": preset}))
    return run, time.perf_counter() - start


def evaluated(run: Path, tta: bool) -> dict:
    """metrics.json of RUN's test split, evaluating only if it is missing (or lacks TTA)."""
    file = run / "eval" / "test" / "metrics.json"
    if not file.is_file() or (tta and "tta" not in json.loads(file.read_text())):
        evaluate_run(run, "test", tta=tta)
    return json.loads(file.read_text())


def cell(metric: dict, percent: bool) -> str:
    value, (lo, hi) = metric["value"], metric["ci95"]
    if percent:
        interval = "" if lo is None else f" ({100 * lo:.1f}-{100 * hi:.1f})"
        return f"{100 * value:.1f}%{interval}"
    return f"{value:.3f}" + ("" if lo is None else f" ({lo:.3f}-{hi:.3f})")  # none: degenerate


def table_row(label: str, metrics: dict, seconds: float | None, block: str | None = None,
              operating_point: str = "validation") -> str:
    source = metrics[block] if block else metrics
    point = source["operating_points"][operating_point]
    cells = [cell(source["roc_auc"] if name == "roc_auc" else point[name], name != "roc_auc")
             for name in COLUMNS]
    took = f"{seconds / 60:.1f} min" if seconds else "see above"
    return f"| {label} | {point['threshold']:.3f} | " + " | ".join(cells) + f" | {took} |"


def strict_rows(label: str, run: Path, seconds: float | None) -> list[str]:
    metrics = evaluated(run, tta=True)
    return [table_row(label, metrics, seconds), table_row(f"{label} + TTA", metrics, None, "tta")]


def adapted_row(label: str, run: Path, data: Path) -> str:
    """`cxr adapt` to the unlabelled test films: transductive, so a row of its own."""
    adapted = run.with_name(f"{run.name}-adapted")
    if not (adapted / "model.safetensors").is_file():
        adapt_run(run, data, split="test", out=adapted)
    return table_row(f"{label} + `cxr adapt` to the unlabelled test films (transductive)",
                     evaluated(adapted, tta=False), None)


def framing_threshold_rows(label: str, run: Path) -> list[str]:
    """The run evaluated once with the framing-robust threshold, beside plain Youden's J."""
    out = evaluate_run(run, "test", framing_threshold=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return [table_row(label, metrics, None),
            table_row(f"{label}, framing-robust threshold", metrics, None,
                      operating_point="validation_framing")]


def published_point_row(label: str, run: Path) -> str:
    ours = at_published_point(run / "eval" / "test")
    return f"| {label} | {cell(ours['sensitivity'], True)} | {cell(ours['specificity'], True)} |"


def preset_and_run_rows(presets: list[str], runs: list[Path], data: Path,
                        runs_dir: Path) -> tuple[list[str], list[str]]:
    """The strict table's rows and the published-point table's rows."""
    rows, points = [], []
    for i, preset in enumerate(presets):
        run, seconds = train_once(preset, data, runs_dir)
        rows += strict_rows(f"`{preset}`", run, seconds)
        points.append(published_point_row(f"`{preset}`", run))
        if i == 0:
            rows.append(adapted_row(f"`{preset}`", run, data))
    for run in runs:  # experiments trained by hand: their command is in BENCHMARKS.md
        rows += strict_rows(f"`{run.name}`", run, None)
        points.append(published_point_row(f"`{run.name}`", run))
        rows.append(adapted_row(f"`{run.name}`", run, data))
    return rows, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    parser.add_argument("--presets", nargs="*", default=["default", "quick", "scratch"])
    parser.add_argument("--runs", nargs="*", type=Path, default=[],
                        help="run folders already trained (experiments): evaluated and adapted")
    parser.add_argument("--framing-threshold", action="store_true",
                        help="evaluate --runs with the framing-robust threshold instead")
    args = parser.parse_args()
    points = []
    if args.framing_threshold:
        rows = [row for run in args.runs for row in framing_threshold_rows(f"`{run.name}`", run)]
    else:
        rows, points = preset_and_run_rows(args.presets, args.runs, args.data, args.runs_dir)
    print("| recipe | threshold (from val) | accuracy | ROC-AUC | sensitivity | specificity "
          "| F1 | training time |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if points:
        print(f"\n| recipe | sensitivity at specificity >= {PUBLISHED['specificity']:.1%} "
              f"| specificity at sensitivity >= {PUBLISHED['sensitivity']:.1%} |")
        print("|---|---|---|")
        print("\n".join(points))


if __name__ == "__main__":
    main()
