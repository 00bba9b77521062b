"""What a labelled local validation source buys: thresholds chosen on half of a site's films.

    python benchmarks/local_calibration.py runs/exp-e2e-8ep-frame runs/exp-quick-frame
                                           [--data DIR] [--out DIR] [--seed 0]
                                           [--target-sensitivity 0.97]

The test split stands in for a new site. Its patients are split into two halves (seeded,
stratified by class, patient-grouped); for each run, `cxr evaluate --calibrate-on` chooses
temperature and threshold on one half and measures the other, and the other way round, and
the same halves are also measured at the run's own validation threshold. Runs are evaluated
as copies (under --out) so that their calibration.json stays as it is. Prints, per run and
half, both operating points and their paired difference (local minus validation), then the
cross-fitted result over all films: each judged by the threshold the other half chose.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from cxrkit.data.layout import load_source
from cxrkit.data.split import patient_split, write_manifest
from cxrkit.evaluation import evaluate_run
from cxrkit.evaluation.paired import paired_difference, read_scored
from cxrkit.evaluation.results import format_metric, headline

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))
SHOWN = ("accuracy", "sensitivity", "specificity")


def write_halves(data: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """The test split's patients in two halves, as two manifests without a split column."""
    films = [replace(s, split="") for s in load_source(data).split("test")]
    halves = patient_split(films, 0.5, seed)
    return (write_manifest([replace(s, split="") for s in halves if s.split == "val"],
                           out / "half_a.csv"),
            write_manifest([replace(s, split="") for s in halves if s.split == "train"],
                           out / "half_b.csv"))


def copy_of(run: Path, out: Path) -> Path:
    return shutil.copytree(run, out / run.name, dirs_exist_ok=True,
                           ignore=shutil.ignore_patterns("*.ckpt", "eval", "tb", "logs"))


def cells(folder: Path) -> str:
    """'t 0.245: 92.1% / 99.0% / 80.2%' at the evaluation's deployed threshold."""
    metrics = json.loads((folder / "metrics.json").read_text())
    at = headline(metrics)
    return (f"t {metrics['deployed_threshold']:.3f}: "
            + " / ".join(format_metric(k, at[k]).split(" ")[0] for k in SHOWN))


def cross_fitted(folders: list[Path]) -> str:
    """Accuracy / sensitivity / specificity over the films of every folder together."""
    rows = []
    for folder in folders:
        with open(folder / "predictions.csv", encoding="utf-8", newline="") as f:
            rows += list(csv.DictReader(f))
    truth = np.array([r["label"] == "PNEUMONIA" for r in rows])
    called = np.array([r["predicted"] == "PNEUMONIA" for r in rows])
    rates = ((truth == called).mean(), called[truth].mean(), (~called[~truth]).mean())
    return " / ".join(f"{100 * x:.1f}%" for x in rates) + f" (n = {len(rows)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--out", type=Path, default=Path("/tmp/local_calibration"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-sensitivity", type=float, default=None,
                        help="choose both thresholds for this sensitivity instead of Youden's J")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    halves = write_halves(args.data.resolve(), args.out, args.seed)
    print("| run | evaluated half | validation threshold: acc. / sens. / spec. | local threshold "
          "(other half): same | local minus validation, paired: accuracy | specificity |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        copy, local_folders = copy_of(run, args.out), []
        for evaluated, chooser in (halves, halves[::-1]):
            options = dict(data=evaluated, bootstrap=1000, figures=False,
                           target_sensitivity=args.target_sensitivity)
            # reset: else the copy re-applies the previous half's --calibrate-on choice
            plain = evaluate_run(copy, reset_calibration=True, **options)
            local = evaluate_run(copy, calibrate_on=chooser, **options)
            local_folders.append(local)
            diff = paired_difference(read_scored(plain), read_scored(local), SHOWN)
            print(f"| `{run.name}` | {evaluated.stem} ({diff['n']} films) | {cells(plain)} | "
                  f"{cells(local)} | {format_metric('accuracy', diff['accuracy'], True)} | "
                  f"{format_metric('specificity', diff['specificity'], True)} |", flush=True)
        print(f"| `{run.name}` | both, cross-fitted | | {cross_fitted(local_folders)} | | |")


if __name__ == "__main__":
    main()
