"""Reading evaluations back: each RUN/eval/<name>/metrics.json, its headline at the deployed
threshold, and numbers formatted as the report and the command line show them.

    summary(evaluate_run(run))  # {'accuracy': 0.907, 'roc_auc': 0.959, ..., 'n': 624}

Torch-free: `cxr report` and `cxr compare` read evaluations without importing PyTorch
(`ensure_evaluated` imports it only when it must evaluate).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from cxrkit.evaluation.metrics import COLLAPSED
from cxrkit.runs import (
    EVAL_DIR,
    METRICS,
    PREDICTIONS,
    Calibration,
    model_folder,
    read_calibration,
    weights_file_digest,
)

log = logging.getLogger(__name__)

RATES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
         "sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV (precision)",
         "npv": "NPV", "f1": "F1", "roc_auc": "ROC-AUC"}
SCORES = ("roc_auc", "pr_auc", "brier", "ece")  # shown as decimals; everything else in percent
HEADLINE = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1")


def read_predictions(folder: Path) -> list[dict[str, str]]:
    """An evaluation's predictions.csv: one row per film, every value as written."""
    with open(folder / PREDICTIONS, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def evaluations(run: Path) -> list[dict]:
    """Every RUN/eval/<name>/metrics.json: the internal test first, then external data, then val."""
    found = [m | {"folder": p.parent} for p in sorted((run / EVAL_DIR).glob("*/metrics.json"))
             if (m := read_json(p)) is not None]

    def rank(m: dict) -> tuple[int, str]:
        internal = not m.get("external")
        return (0 if internal and m["split"] == "test" else 2 if internal and m["split"] == "val"
                else 1), m["name"]

    return sorted(found, key=rank)


def at_calibration(metrics: dict, calibration: Calibration,
                   weights_file: str | None = None) -> bool:
    """Whether an evaluation was made with this calibration (its threshold, temperature and
    bias) and of the weights it was chosen for. A later `cxr evaluate --target-sensitivity
    ...` (say) deploys another one, and the numbers of earlier evaluations are then not
    those of the model `cxr predict` runs. `weights_file`: the run's model.safetensors
    digest now (`weights_file_digest`), which the evaluation must have scored."""
    if weights_file and metrics.get("weights_file_sha256") not in (None, weights_file):
        return False  # the weights were replaced since
    made = metrics.get("calibrated", {})
    threshold = metrics.get("deployed_threshold")
    chosen_for, scored = calibration.weights_sha256, metrics.get("weights_sha256")
    return ((threshold is None or threshold == calibration.threshold)
            and made.get("temperature") == calibration.temperature
            and made.get("bias", []) == calibration.bias
            and not (chosen_for and scored and chosen_for != scored))  # a model replaced


def ensure_evaluated(run: str | Path, split: str = "test") -> Path:
    """RUN's evaluation of its `split` at the deployed calibration (calibration.json):
    RUN/eval/<split>/ (or <split>-calibrated-<films>/ after --calibrate-on), evaluated (again)
    when there is none yet or it was made with an earlier calibration."""
    run = model_folder(run)
    calibration, weights = read_calibration(run), weights_file_digest(run)
    candidates = [run / EVAL_DIR / split, *sorted((run / EVAL_DIR).glob(f"{split}-calibrated-*"))]
    for folder in candidates:
        metrics = read_json(folder / METRICS)
        if metrics is not None and at_calibration(metrics, calibration, weights):
            return folder
    if any((folder / METRICS).is_file() for folder in candidates):
        log.info("%s: the %s evaluation is of an earlier calibration or of other weights than "
                 "model.safetensors now: evaluating again", run.name, split)
    from cxrkit.evaluation import evaluate_run  # PyTorch: only to evaluate

    return evaluate_run(run, split=split)


def format_metric(key: str, metric: dict | None, difference: bool = False) -> str:
    """'93.2% (91.0–95.1)' for rates, '0.968 (0.951–0.981)' for scores; '–' when undefined.
    `difference`: signed, rates in percentage points: '+1.6 pp (-0.8 to +4.0)'."""
    if not metric or metric.get("value") is None:
        return "–"
    value, (lo, hi) = metric["value"], metric.get("ci95") or (None, None)
    sign, scale = ("+" if difference else ""), (1 if key in SCORES else 100)
    digits = 3 if key in SCORES else 1

    def number(x: float) -> str:
        return f"{scale * x:{sign}.{digits}f}"

    unit = "" if key in SCORES else (" pp" if difference else "%")
    between = " to " if difference else "–"
    interval = f" ({number(lo)}{between}{number(hi)})" if lo is not None and hi is not None else ""
    return number(value) + unit + interval


def deployed_point(metrics: dict) -> dict:
    """The operating point at the deployed threshold (older evaluations: Youden's J)."""
    name = metrics.get("deployed_operating_point") or "validation"
    return metrics.get("operating_points", {}).get(name, {})


def headline(metrics: dict) -> dict[str, dict | None]:
    """Accuracy, ROC-AUC, sensitivity, specificity and F1 at the deployed threshold
    (multi-class: accuracy and macro ROC-AUC only)."""
    at = deployed_point(metrics)
    return {k: metrics.get(k) if k == "roc_auc" or not at else at.get(k) for k in HEADLINE}


def headline_text(metrics: dict) -> str:
    """'Accuracy 92.0% (89.6–94.0), ROC-AUC 0.980 (...), ...': the headline in one line."""
    return ", ".join(f"{NAMES[k]} {format_metric(k, v)}" for k, v in headline(metrics).items()
                     if v is not None)


def as_deployed(variant: dict, metrics: dict) -> dict:
    """A TTA or framing block of `metrics`, read at the evaluation's deployed operating point
    (its rule; TTA's threshold for that rule is its own, chosen on TTA-scored validation)."""
    return {**variant, "deployed_operating_point": metrics.get("deployed_operating_point")}


def summary(folder: str | Path, tta: bool = False) -> dict[str, float | int | None]:
    """An evaluation folder's headline as plain numbers, for a notebook:

        summary(evaluate_run(run))  # {'accuracy': 0.907, 'roc_auc': 0.959, ..., 'n': 624}

    At the deployed threshold (`threshold`; None for multi-class runs); `tta`: with test-time
    augmentation (an evaluation made with `tta=True`). A multi-class run's sensitivity,
    specificity and F1 are those of NORMAL against the other classes (its own calls, read
    as pneumonia or not), comparable with a two-class run's; its accuracy and ROC-AUC are
    over its classes (macro ROC-AUC), beside `balanced_accuracy` (`cxr compare` reads those
    two as NORMAL against the rest as well: metrics.json's `not_normal`). Each value's 95%
    interval is in the folder's metrics.json."""
    file = Path(folder) / METRICS
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder} holds no evaluation ({METRICS}): give an evaluation folder, e.g. "
            f"summary(evaluate_run(run)) or {Path(folder) / EVAL_DIR / 'test'} once evaluated")
    metrics = json.loads(file.read_text(encoding="utf-8"))
    if tta and "tta" not in metrics:
        raise ValueError(f"{folder} was evaluated without test-time augmentation: "
                         "evaluate_run(run, tta=True) first (`cxr evaluate RUN --tta`)")
    block = as_deployed(metrics["tta"], metrics) if tta else metrics
    values = {k: v and v["value"] for k, v in headline(block).items()}
    if not metrics.get("positive_class"):
        collapsed = block.get(COLLAPSED, {})
        values |= {k: (collapsed.get(k) or {}).get("value")
                   for k in ("sensitivity", "specificity", "f1")}
        values["balanced_accuracy"] = (block.get("balanced_accuracy") or {}).get("value")
    threshold = metrics["tta"].get("threshold") if tta else metrics.get("deployed_threshold")
    return {**values, "threshold": threshold, "n": metrics["n"]}
