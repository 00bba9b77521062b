"""RUN/metrics.csv (every stage's CSVLogger output in one table) and RUN/training_curves.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

# The object API, no pyplot: drawing into a Figure of its own neither needs a display nor
# changes the caller's backend (a notebook's inline plots).
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cxrkit.plots import save_figure
from cxrkit.runs import LABELS, VAL_METRICS

METRICS_CSV = "metrics.csv"
CURVES_PNG = "training_curves.png"


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _stage_rows(folder: Path) -> list[dict[str, str]]:
    """One stage's rows over its attempts; a resumed attempt replaces what it replayed."""
    versions = sorted(folder.glob("version_*/" + METRICS_CSV),
                      key=lambda p: int(p.parent.name.removeprefix("version_")))
    rows: list[dict[str, str]] = []
    for path in versions:
        new = _read_rows(path)
        if new:
            resumed_at = min(int(r["step"]) for r in new)
            rows = [r for r in rows if int(r["step"]) < resumed_at]
        rows += new
    return rows


def collect_metrics(run: Path, stages: list[str]) -> Path:
    """Flatten RUN/logs/STAGE/version_N/metrics.csv into RUN/metrics.csv with a stage column."""
    rows = [{"stage": stage, **row}
            for stage in stages for row in _stage_rows(run / "logs" / stage)]
    columns = ["stage", "epoch", "step"]
    columns += sorted({k for r in rows for k in r} - set(columns))
    with open(run / METRICS_CSV, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return run / METRICS_CSV


def _per_epoch(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["epoch"]): float(r[key]) for r in rows if r.get(key) and r.get("epoch")}


def step_losses(rows: list[dict[str, str]]) -> tuple[list[float], list[float]]:
    """The logged training-loss steps in epochs since the stage began (1.0: the end of its
    first epoch), so a one-epoch run still shows how its loss fell."""
    ends = [int(r["step"]) for r in rows if r.get("train_loss_epoch") and r["epoch"] == "0"]
    steps = [(int(r["step"]), float(r["train_loss_step"])) for r in rows
             if r.get("train_loss_step")]
    if not ends or not steps:
        return [], []
    steps_per_epoch = ends[0] + 1
    return [(s + 1) / steps_per_epoch for s, _ in steps], [loss for _, loss in steps]


def _best(run: Path) -> tuple[str, int] | None:
    """(stage, 1-based epoch) of the checkpoint training kept, from val_metrics.json."""
    path = run / VAL_METRICS
    if not path.is_file():
        return None
    chosen = json.loads(path.read_text(encoding="utf-8"))
    stage, epoch = chosen.get("best_stage"), chosen.get("best_epoch")
    return (stage, epoch) if stage and epoch else None


def plot_curves(run: Path) -> Path:
    """Loss (train per logged step and per epoch, val per epoch) and validation ROC-AUC /
    accuracy per epoch, stages marked, and the epoch whose weights were kept."""
    rows = _read_rows(run / METRICS_CSV)
    best = _best(run)
    # Several classes call each film its most probable one: there is no P=0.5 to name.
    labels = json.loads(labels_file.read_text(encoding="utf-8")) if (
        labels_file := run / LABELS).is_file() else []
    accuracy = "val accuracy at P=0.5" if len(labels) <= 2 else "val accuracy (most probable)"
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_score = fig.subplots(1, 2)
    offset = 0
    for i, stage in enumerate(stages):
        stage_rows = [r for r in rows if r["stage"] == stage]
        series = [  # the second of each panel dashed, squares: apart without colour too
            (ax_loss, "train_loss_epoch", "train loss", "tab:blue", "o-"),
            (ax_loss, "val_loss", "val loss (mean over batches)", "tab:orange", "s--"),
            (ax_score, "val_roc_auc", "val ROC-AUC", "tab:green", "o-"),
            (ax_score, "val_accuracy", accuracy, "tab:purple", "s--"),
        ]
        x, loss = step_losses(stage_rows)
        ax_loss.plot([offset + v for v in x], loss, "-", color="tab:blue", alpha=0.3,
                     linewidth=1, label="train loss per step" if i == 0 and x else None)
        last_epoch = 0
        for ax, key, label, color, style in series:
            points = _per_epoch(stage_rows, key)
            if points:
                epochs = sorted(points)
                ax.plot([offset + e + 1 for e in epochs], [points[e] for e in epochs], style,
                        color=color, label=label if i == 0 else None, markersize=3)
                last_epoch = max(last_epoch, epochs[-1] + 1)
        if i > 0:
            for ax in (ax_loss, ax_score):
                ax.axvline(offset, color="gray", linestyle="--", linewidth=1)  # its start
                ax.text(offset + 0.1, 1.01, stage, transform=ax.get_xaxis_transform(),
                        va="bottom", fontsize=8, color="gray", clip_on=False)
        if best and best[0] == stage:
            for ax in (ax_loss, ax_score):
                ax.axvline(offset + best[1], color="black", linewidth=1, alpha=0.6,
                           label="weights kept" if ax is ax_score else None)
        offset += last_epoch
    ax_loss.set(xlabel="epoch", ylabel="loss (the training objective)", title="Loss")
    # From the lowest point, not from 0: a ROC-AUC rising from 0.96 to 0.997 would be a flat
    # line at the top.
    low = min([v for line in ax_score.get_lines() if line.get_marker() in ("o", "s")  # no vline
               for v in line.get_ydata() if math.isfinite(v)] or [0.0])
    ax_score.set(xlabel="epoch", ylabel="validation metric", title="Validation",
                 ylim=(max(0.0, low - 0.02), 1.005))
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, max(offset, 1) + 0.1)  # from the start: the first epoch ends at 1
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"Training of {run.name}: stage{'s' if len(stages) > 1 else ''} "
                 f"{' -> '.join(stages)}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, run / CURVES_PNG, 110)
    return run / CURVES_PNG
