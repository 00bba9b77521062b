"""The evaluation figures, as PNG files. Plain matplotlib `Figure`s: no pyplot state, no GUI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from PIL import Image

from cxrkit.evaluation.calibration import (
    N_BINS,
    expected_calibration_error,
    reliability_curve,
)
from cxrkit.evaluation.metrics import average_precision, ranked_counts, rates, roc_auc
from cxrkit.evaluation.thresholds import point_name
from cxrkit.explain import CAM_COLORMAP, overlay_key
from cxrkit.plots import line_style, save_figure

DPI = 110
MARKERS = {"default_0.5": ("o", "tab:gray"), "validation": ("s", "tab:red"),
           "validation_framing": ("D", "tab:purple"), "target_sensitivity": ("^", "tab:green")}


def point_label(name: str, threshold: float, deployed: str | None) -> str:
    """'Youden's J, t=0.156 (deployed)': the legend entry of an operating point."""
    label = f"{point_name(name)}, t={threshold:.3f}"
    return f"{label} (deployed)" if name == deployed else label


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, DPI)  # the constrained layout already fits everything in


def confusion_figure(counts: np.ndarray, labels: Sequence[str], path: Path,
                     subtitle: str = "") -> Path:
    """Counts and row-normalised rates (each row: how one true class was called); both
    shaded by the rate."""
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    for ax, values, title, fmt in zip(fig.subplots(1, 2), (counts, normalised),
                                      ("films", "fraction of each true class"), ("d", ".2f"),
                                      strict=True):
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, format(v, fmt), ha="center", va="center",
                    color="white" if normalised[i, j] > 0.6 else "black", fontsize=12)
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels,
               yticklabels=labels, xlabel="predicted", ylabel="true", title=title)
    fig.suptitle(f"Confusion matrix: {subtitle}" if subtitle else "Confusion matrix")
    return _save(fig, path)


def curves_figure(y: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                  positive: int | None, operating_points: dict[str, dict], path: Path,
                  deployed: str | None = None, where: str = "") -> Path:
    """ROC and precision-recall curves (one-vs-rest per class when multi-class), each with
    its area, the PR panel with each class's prevalence (a classifier without skill), and
    the binary operating points marked. `where`: the films, e.g. 'test split, 624 films'."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    classes = [positive] if positive is not None else range(len(labels))
    ones = np.ones((1, len(y)))
    for i, c in enumerate(classes):
        is_c, p = y == c, probs[:, c]
        tpr, fpr, _ = rates(is_c, p, ones)
        pos, neg, _ = ranked_counts(is_c, p, ones)
        tp, fp = pos.cumsum(1)[0], neg.cumsum(1)[0]
        recall, precision = tp / max(tp[-1], 1), tp / np.maximum(tp + fp, 1)
        line, = roc_ax.plot(fpr[0], tpr[0], ls=line_style(i),
                            label=f"{labels[c]}: AUC {roc_auc(is_c, p, ones)[0]:.3f}")
        # each precision holds over the recall step up to its own point, as average
        # precision sums it (drawn after its point, the area was not the AP said)
        ap = average_precision(is_c, p, ones)[0]
        pr_ax.step(np.r_[0, recall], np.r_[precision[:1], precision], where="pre",
                   color=line.get_color(), ls=line_style(i),
                   label=f"{labels[c]}: AP {'–' if np.isnan(ap) else f'{ap:.3f}'}")
        pr_ax.axhline(is_c.mean(), ls=":", color=line.get_color(),
                      label=f"prevalence {is_c.mean():.2f}")
    for name, point in operating_points.items():
        sens, spec, ppv = (point[k]["value"] for k in ("sensitivity", "specificity", "ppv"))
        if None in (sens, spec, ppv):
            continue
        label = point_label(name, point["threshold"], deployed)
        marker, color = MARKERS.get(name, ("x", "black"))
        # clip_on=False: a point at sensitivity 1 is drawn whole on the axis' edge
        roc_ax.plot(1 - spec, sens, marker, color=color, ms=8, label=label, clip_on=False)
        pr_ax.plot(sens, ppv, marker, color=color, ms=8, label=label, clip_on=False)
    roc_ax.plot([0, 1], [0, 1], ":", color="gray")
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1),
               ylim=(0, 1.02), aspect="equal")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    if where:
        fig.suptitle(where)
    return _save(fig, path)


def reliability_figure(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                       calibration: str, what: str, path: Path, where: str = "") -> Path:
    """Observed frequency against predicted probability, before and after calibration
    (`calibration` names it in the legend, e.g. 'temperature 1.23'), each with its ECE on
    these films; a marker's area is its bin's share of the films (a bin of three films
    swings freely).

    `before`/`after`: (confidence, outcome) pairs, as for `expected_calibration_error`."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    curve_ax, hist_ax = fig.subplots(1, 2)
    curve_ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for i, ((conf, outcome), name) in enumerate(((before, "before"),
                                                 (after, f"after ({calibration})"))):
        mean_conf, freq, counts = reliability_curve(conf, outcome)
        ece = expected_calibration_error(conf, outcome)[0]
        line, = curve_ax.plot(mean_conf, freq, ls=line_style(i), label=f"{name}: ECE {ece:.3f}")
        curve_ax.scatter(mean_conf, freq, s=8 + 400 * counts / counts.sum(),
                         color=line.get_color(), zorder=3, clip_on=False)
        hist_ax.hist(conf, bins=N_BINS, range=(0, 1), histtype="step", lw=1.5,
                     ls=line_style(i), label=name)  # the diagram's bins
    curve_ax.set(xlabel=f"predicted {what}", ylabel="observed frequency", xlim=(0, 1),
                 ylim=(0, 1), title="Reliability diagram (marker area: films in the bin)")
    hist_ax.set(xlabel=f"predicted {what}", ylabel="films (log scale)", yscale="log",
                title="Distribution")
    for ax in (curve_ax, hist_ax):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if where:
        fig.suptitle(where)
    return _save(fig, path)


def histograms_figure(y: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                      positive: int | None, thresholds: dict[str, float], path: Path,
                      deployed: str | None = None, where: str = "") -> Path:
    """Per class of interest: its predicted (calibrated) probability, split by the true
    class, on a log scale so that the few films between the peaks, where the errors are,
    stay visible."""
    classes = [positive] if positive is not None else list(range(len(labels)))
    fig = Figure(figsize=(5.5 * len(classes), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(classes)))
    for ax, c in zip(axes, classes, strict=True):
        for true in range(len(labels)):
            ax.hist(probs[y == true, c], bins=25, range=(0, 1), histtype="step", lw=1.5,
                    ls=line_style(true), label=f"true {labels[true]} (n={int((y == true).sum())})")
        for name, t in thresholds.items():  # dotted: apart from the histograms; deployed bold
            ax.axvline(t, ls=":", lw=2.2 if name == deployed else 1.2,
                       color="black" if name == deployed else "gray",
                       label=point_label(name, t, deployed))
        ax.set(xlabel=f"P({labels[c]}) as deployed (after the calibration)",
               ylabel="films (log scale)", yscale="log",
               title=f"P({labels[c]}) by true class")
        ax.legend(fontsize=8, loc="upper center")
    if where:
        fig.suptitle(where)
    return _save(fig, path)


def framing_figure(points: dict[str, dict], path: Path, where: str = "") -> Path:
    """Sensitivity and specificity, with their 95% intervals, on the same films as filmed and
    framed tighter (`points`: {'as filmed': operating point, '85%': ..., ...}): a model that
    reads how tightly a film is framed, not its lungs, loses specificity as the crop tightens."""
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(points))
    for i, rate in enumerate(("sensitivity", "specificity")):
        values = np.array([p[rate]["value"] for p in points.values()], dtype=float)
        spans = [p[rate].get("ci95") or [v, v] for p, v in zip(points.values(), values,
                                                               strict=True)]
        errors = np.abs(np.array(spans, dtype=float).T - values)
        ax.errorbar(x + (i - 0.5) * 0.06, values, yerr=errors, ls=line_style(i), marker="o",
                    capsize=4, label=rate, clip_on=False)  # (side by side: intervals apart)
    ax.set(xticks=x, xticklabels=list(points), ylim=(0, 1), ylabel="rate (95% interval)",
           xlabel="framing (the central share of each side kept)",
           title="Framing check at the deployed threshold")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if where:
        fig.suptitle(where)
    return _save(fig, path)


def image_grid(images: Sequence[Image.Image], captions: Sequence[str], title: str, path: Path,
               columns: int = 4, colorbar: str | None = None) -> Path:
    """Images in a grid, each with a small caption (file name, truth, probability);
    `colorbar`: the label of a Grad-CAM colour key beside the grid."""
    rows = max(1, -(-len(images) // columns))
    # ~2.6 inches at DPI: about the 224-256 px the films were seen at, no larger
    fig = Figure(figsize=(2.6 * columns, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions, strict=False):
        ax.imshow(image, cmap="gray" if image.mode == "L" else None)
        ax.set_title(caption, fontsize=8)
    if colorbar:  # the bar's place and ticks, drawn as the overlay's own blend
        bar = fig.colorbar(ScalarMappable(cmap=CAM_COLORMAP), ax=axes.tolist(), shrink=0.8)
        bar.set_label(f"{colorbar}\n(over films dark to bright;\n0: the film as it is)",
                      fontsize=8)
        bar.ax.imshow(overlay_key(), extent=(0, 1, 0, 1), aspect="auto", zorder=3)
    fig.suptitle(title)
    return _save(fig, path)
