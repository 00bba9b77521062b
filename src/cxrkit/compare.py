"""`compare_runs(runs)`: several runs side by side on the same split, each at its deployed
threshold; `paired=True` adds each run minus the first on the films both scored, with
paired bootstrap intervals. `cxr compare` prints it, `write_compare_csv` saves it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from cxrkit.adapt import is_transductive
from cxrkit.data.split import read_manifest
from cxrkit.evaluation.metrics import COLLAPSED
from cxrkit.evaluation.paired import paired_difference, read_scored
from cxrkit.evaluation.results import (
    HEADLINE,
    deployed_point,
    ensure_evaluated,
    headline,
    read_predictions,
)
from cxrkit.runs import METRICS, SPLIT, load_spec, model_folder, read_run_config

log = logging.getLogger(__name__)

# `cxr compare` adds the best specificity any threshold reaches at 97% sensitivity on the
# films compared: how well a model ranks where a screening tool operates, whatever threshold
# validation chose (a reading, not a way to choose one).
SPEC_AT_SENS = "specificity_at_sensitivity/0.97"
COMPARED = (*HEADLINE, SPEC_AT_SENS)
SHORT_NAMES = {"accuracy": "Acc", "roc_auc": "AUC", "sensitivity": "Sens", "specificity": "Spec",
               "f1": "F1", SPEC_AT_SENS: "Spec@97"}  # `cxr compare`'s column headers


def compare_runs(runs: Iterable[str | Path], split: str = "test",
                 paired: bool = False) -> list[dict]:
    """One row per run: its headline metrics on `split` (evaluated first where missing).
    `paired`: every row after the first also holds "paired", its headline metrics minus the
    first run's on the films both scored, with paired bootstrap intervals."""
    if isinstance(runs, str | Path):  # a string iterates letter by letter: "r is not a run"
        raise TypeError(f"compare_runs takes a list of run folders, e.g. [{str(runs)!r}, "
                        "another]")
    runs = list(runs)  # read more than once: a generator (Path.glob) would run dry
    if paired:  # said before any run is evaluated
        several = [str(run) for run in runs if len(load_spec(run).labels) != 2]
        if several:
            raise ValueError(f"paired differences need two-class runs; {', '.join(several)} "
                             "predict(s) more classes: compare them unpaired")
    rows, folders = [], [ensure_evaluated(run, split) for run in runs]
    for run, folder in zip(runs, folders, strict=True):
        metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
        threshold = deployed_point(metrics).get("threshold")
        rows.append({"run": str(model_folder(run)), "model": metrics.get("model", ""),
                     "split": split, "n": metrics["n"], "threshold": threshold,
                     "transductive": is_transductive(metrics),
                     "recipe": recipe(model_folder(run)), **comparable(metrics)})
    films = [_films(folder) for folder in folders]
    if any(f != films[0] for f in films[1:]):
        log.warning("these runs were evaluated on different films (%s): their rows do not "
                    "compare like with like%s", ", ".join(str(len(f)) for f in films),
                    "; --paired (paired=True) uses the films they share" if paired else "")
    if paired:
        base = read_scored(folders[0])
        for row, folder in zip(rows[1:], folders[1:], strict=True):
            row["paired"] = paired_difference(base, read_scored(folder), COMPARED)
    return rows


def recipe(folder: Path) -> str:
    """How a run was trained, in a few words (its preset, each stage's epochs, its training
    films), so that a table of runs says what differs between them; "" where unknown."""
    config = read_run_config(folder)
    try:
        films = sum(s.split == "train" for s in read_manifest(folder / SPLIT))
    except (OSError, ValueError):  # a run without one (trained elsewhere)
        return ""
    epochs = "+".join(str(stage.get("epochs", "?")) for stage in config.get("stages") or [])
    return ", ".join(filter(None, [config.get("recipe"), epochs and f"{epochs} epoch(s)",
                                   f"{films} training films"]))


def comparable(metrics: dict) -> dict:
    """The headline in the columns' one meaning, NORMAL against pneumonia: a NORMAL/BACTERIA/
    VIRUS run's is read as NORMAL against the rest (its macro ROC-AUC over three classes sat
    beside two-class AUCs, and sensitivity, specificity and F1 were blank), said in
    `read_as`."""
    block, level = SPEC_AT_SENS.split("/")  # metrics.json nests such keys
    collapsed = metrics.get(COLLAPSED) if metrics.get("positive_class") is None else None
    if not collapsed:
        return {**headline(metrics), SPEC_AT_SENS: metrics.get(block, {}).get(level),
                "read_as": None}
    return {**{k: collapsed.get(k) for k in HEADLINE},
            SPEC_AT_SENS: collapsed.get(block, {}).get(level), "read_as": "NORMAL vs the rest"}


def _films(folder: Path) -> set[str]:
    """The films an evaluation scored (its predictions.csv)."""
    return {str(Path(row["path"]).resolve()) for row in read_predictions(folder)}


def write_compare_csv(rows: list[dict], path: str | Path) -> Path:
    """Flat CSV: each metric as value, ci_low, ci_high columns; a folder gets compare.csv."""
    path = Path(path)
    if path.is_dir():
        path = path / "compare.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["run", "model", "read_as", "split", "n", "threshold"]
    parts = ("", "_ci_low", "_ci_high")
    columns += [f"{k}{part}" for k in COMPARED for part in parts]
    paired = any("paired" in r for r in rows)
    if paired:
        columns += ["paired_n", *(f"diff_{k}{part}" for k in COMPARED for part in parts)]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            cells = [r["run"], r["model"], r["read_as"], r["split"], r["n"], r["threshold"]]
            cells += _value_and_interval(r)
            if paired:
                cells += [r["paired"]["n"], *_value_and_interval(r["paired"])] if "paired" in r \
                    else [None] * (1 + 3 * len(COMPARED))
            w.writerow(["" if c is None else c for c in cells])
    return path


def _value_and_interval(metrics: dict) -> list:
    cells = []
    for k in COMPARED:
        m = metrics.get(k) or {}
        lo, hi = m.get("ci95") or (None, None)
        cells += [m.get("value"), lo, hi]
    return cells
