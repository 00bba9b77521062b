"""The evaluation figures, as PNG files. Plain matplotlib `Figure`s: no pyplot state, no GUI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from cxrkit.evaluation.calibration import reliability_curve
from cxrkit.evaluation.metrics import ranked_counts, rates

DPI = 110
MARKERS = {"default_0.5": "o", "validation": "s", "target_sensitivity": "^"}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # the constrained layout already fits everything in
    return path


def confusion_figure(counts: np.ndarray, labels: Sequence[str], path: Path,
                     subtitle: str = "") -> Path:
    """Counts and row-normalised rates (each row: how one true class was called)."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    for ax, values, title, fmt in zip(fig.subplots(1, 2), (counts, normalised),
                                      ("counts", "fraction of each true class"), ("d", ".2f"),
                                      strict=True):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, format(v, fmt), ha="center", va="center",
                    color="white" if normalised[i, j] > 0.6 else "black", fontsize=12)
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels,
               yticklabels=labels, xlabel="predicted", ylabel="true", title=title)
    fig.suptitle(f"Confusion matrix {subtitle}".strip())
    return _save(fig, path)


def curves_figure(y: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                  positive: int | None, operating_points: dict[str, dict], path: Path) -> Path:
    """ROC and precision-recall curves (one-vs-rest per class when multi-class),
    with the binary operating points marked."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    classes = [positive] if positive is not None else range(len(labels))
    ones = np.ones((1, len(y)))
    for c in classes:
        is_c, p = y == c, probs[:, c]
        tpr, fpr, _ = rates(is_c, p, ones)
        pos, neg, _ = ranked_counts(is_c, p, ones)
        tp, fp = pos.cumsum(1)[0], neg.cumsum(1)[0]
        name = labels[c]
        roc_ax.plot(fpr[0], tpr[0], label=name)
        pr_ax.step(tp / max(tp[-1], 1), tp / (tp + fp), where="post", label=name)
    for name, point in operating_points.items():
        sens, spec, ppv = (point[k]["value"] for k in ("sensitivity", "specificity", "ppv"))
        if None in (sens, spec, ppv):
            continue
        label = f"{name} (t={point['threshold']:.3f})"
        roc_ax.plot(1 - spec, sens, MARKERS.get(name, "x"), ms=8, label=label)
        pr_ax.plot(sens, ppv, MARKERS.get(name, "x"), ms=8, label=label)
    roc_ax.plot([0, 1], [0, 1], ":", color="gray")
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1),
               ylim=(0, 1.02))
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_figure(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                       calibration: str, what: str, path: Path) -> Path:
    """Observed frequency against predicted probability, before and after calibration
    (`calibration` names it in the legend, e.g. 'T=1.23').

    `before`/`after`: (confidence, outcome) pairs, as for `expected_calibration_error`."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    curve_ax, hist_ax = fig.subplots(1, 2)
    curve_ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for (conf, outcome), name in ((before, "before"), (after, f"after ({calibration})")):
        mean_conf, freq, _ = reliability_curve(conf, outcome)
        curve_ax.plot(mean_conf, freq, "o-", label=name)
        hist_ax.hist(conf, bins=20, range=(0, 1), alpha=0.5, label=name)
    curve_ax.set(xlabel=f"predicted {what}", ylabel="observed frequency", xlim=(0, 1),
                 ylim=(0, 1), title="Reliability diagram")
    hist_ax.set(xlabel=f"predicted {what}", ylabel="images", title="Distribution")
    for ax in (curve_ax, hist_ax):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def histograms_figure(y: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                      positive: int | None, thresholds: dict[str, float], path: Path) -> Path:
    """Per class of interest: its predicted probability, split by the true class."""
    classes = [positive] if positive is not None else list(range(len(labels)))
    fig = Figure(figsize=(5.5 * len(classes), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(classes)))
    for ax, c in zip(axes, classes, strict=True):
        for true in range(len(labels)):
            ax.hist(probs[y == true, c], bins=25, range=(0, 1), alpha=0.55,
                    label=f"true {labels[true]} (n={int((y == true).sum())})")
        for name, t in thresholds.items():
            ax.axvline(t, ls="--", color="black" if name == "validation" else "gray",
                       label=f"{name} threshold {t:.3f}")
        ax.set(xlabel=f"P({labels[c]})", ylabel="images", title=f"P({labels[c]}) by true class")
        ax.legend(fontsize=8, loc="upper center")
    return _save(fig, path)


def image_grid(images: Sequence[Image.Image], captions: Sequence[str], title: str, path: Path,
               columns: int = 4) -> Path:
    """Images in a grid, each with a small caption (file name, truth, probability)."""
    rows = max(1, -(-len(images) // columns))
    # ~2.6 inches at DPI: about the 224-256 px the films were seen at, no larger
    fig = Figure(figsize=(2.6 * columns, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions, strict=False):
        ax.imshow(image, cmap="gray" if image.mode == "L" else None)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
