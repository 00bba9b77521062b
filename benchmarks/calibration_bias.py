"""Temperature alone, or temperature plus a bias per class? Fitted where, measured where.

    python benchmarks/calibration_bias.py runs/exp-e2e-8ep-mix runs/exp-quick-mix-s3 [...]

Reads each run's `eval/val/predictions.csv` and `eval/test/predictions.csv` (their logits;
`cxr evaluate RUN --split val` and `cxr evaluate RUN` write them) and fits both
calibrations, softmax(logits / T) and softmax(logits / T + b), in two places:

- on the run's validation split (from `train/`): measured on validation cross-fitted
  (fitted on one half of its patients, measured on the other, both ways) and on test;
- on the test films as a new site's labelled films (`--calibrate-on`), cross-fitted the
  same way over test's patients (each half stratified by class).

Prints expected calibration error (ECE, 15 bins) and negative log-likelihood (NLL) of
P(PNEUMONIA) for each. No threshold is involved and nothing here chooses a preset.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from cxrkit.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    fit_temperature_and_bias,
    negative_log_likelihood,
)
from cxrkit.runs import softmax

Fitted = tuple[float, list[float]]


def read_logits(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [N, K], class index [N], patient [N]) from an evaluation's predictions.csv."""
    rows = list(csv.DictReader(file.open(encoding="utf-8")))
    labels = [k.removeprefix("logit_") for k in rows[0] if k.startswith("logit_")]
    logits = np.array([[float(r[f"logit_{name}"]) for name in labels] for r in rows])
    y = np.array([labels.index(r["label"]) for r in rows])
    return logits, y, np.array([r["patient_id"] or r["path"] for r in rows])


def fits(logits: np.ndarray, y: np.ndarray) -> dict[str, Fitted]:
    return {"T": (fit_temperature(logits, y), []), "T+b": fit_temperature_and_bias(logits, y)}


def scores(fitted: Fitted, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(ECE, NLL) of P(class 1) under one fitted calibration."""
    temperature, bias = fitted
    p = softmax(logits, temperature, bias)[:, 1]
    ece = expected_calibration_error(p, (y == 1).astype(float))[0]
    return np.array([ece, negative_log_likelihood(logits, y, temperature, np.r_[bias or 0.0])])


def halves(y: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """True for one half of the patients: every other patient of each class, in name order."""
    first = np.zeros(len(y), bool)
    for label in np.unique(y):
        names = sorted(set(patients[y == label]))
        first |= np.isin(patients, names[::2]) & (y == label)
    return first


def cross_fitted(logits: np.ndarray, y: np.ndarray, patients: np.ndarray) -> dict[str, np.ndarray]:
    """Mean (ECE, NLL) of each calibration fitted on one half and measured on the other."""
    a = halves(y, patients)
    results = {"T": [], "T+b": []}
    for fit_on in (a, ~a):
        for name, fitted in fits(logits[fit_on], y[fit_on]).items():
            results[name].append(scores(fitted, logits[~fit_on], y[~fit_on]))
    return {name: np.mean(r, axis=0) for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | bias (val) | val cross-fitted: T | T+b | test, fitted on val: T | T+b "
          "| test as a site, cross-fitted: T | T+b |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        val, test = (read_logits(run / "eval" / split / "predictions.csv")
                     for split in ("val", "test"))
        on_val = fits(*val[:2])
        cells = [cross_fitted(*val), {k: scores(f, *test[:2]) for k, f in on_val.items()},
                 cross_fitted(*test)]
        text = [f"{c[k][0]:.3f} / {c[k][1]:.3f}" for c in cells for k in ("T", "T+b")]
        print(f"| `{run.name}` | {on_val['T+b'][1][1]:+.2f} | " + " | ".join(text) + " |")
    print("Cells: ECE / NLL of P(PNEUMONIA).")


if __name__ == "__main__":
    main()
