"""Classification metrics with patient-level bootstrap confidence intervals.

Every metric takes a weight matrix `w` [B, N]: row b says how many times each
of the N images is counted. The point estimate is one row of ones; a bootstrap
resample is a row of counts. So one vectorised implementation serves both, and
1000 resamples cost a few matrix products instead of a Python loop.

Resampling is by patient when patient ids are known: images of one patient are
correlated (same lungs, often the same day), and resampling images as if they
were independent would give intervals that are too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cxrkit.evaluation.calibration import expected_calibration_error

CI_LEVEL = 95
RESAMPLES_PER_CHUNK = 250  # bounds memory: 250 x N float64 weights at a time
SENSITIVITY_AT_SPECIFICITY = (0.90, 0.95)
SPECIFICITY_AT_SENSITIVITY = (0.95, 0.97)
_EPS = 1e-12  # float slack when comparing rates with targets like 0.95

Statistics = Callable[[np.ndarray], dict[str, np.ndarray]]

COLLAPSED = "not_normal"  # a multi-class model's NORMAL against every other class


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, NaN where b == 0 (e.g. specificity of a resample without negatives)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n))


# ---- threshold-free (ranking) metrics -------------------------------------------------------

def ranked_counts(y: np.ndarray, p: np.ndarray, w: np.ndarray):
    """Weighted positives and negatives per distinct score, highest score first.

    Returns (pos [B, G], neg [B, G], scores [G]). Predicting positive for
    `p >= scores[g]` catches the positives of groups 0..g: cumulative sums give
    the ROC and PR curves, and ties are handled as one step.
    """
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    w_sorted, y_sorted = w[:, order], y[order].astype(bool)
    pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)
    neg = np.add.reduceat(w_sorted * ~y_sorted, starts, axis=1)
    return pos, neg, sorted_p[starts]


def rates(y: np.ndarray, p: np.ndarray, w: np.ndarray):
    """(tpr [B, G+1], fpr [B, G+1], thresholds [G+1]); column 0 is 'nothing positive'."""
    pos, neg, scores = ranked_counts(y, p, w)
    zero = np.zeros((len(w), 1))
    tpr = _ratio(np.hstack([zero, pos.cumsum(1)]), pos.sum(1, keepdims=True))
    fpr = _ratio(np.hstack([zero, neg.cumsum(1)]), neg.sum(1, keepdims=True))
    return tpr, fpr, np.r_[np.inf, scores]


def roc_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    pos, neg, _ = ranked_counts(y, p, w)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    negatives_below = n_neg[:, None] - neg.cumsum(1)
    return _ratio((pos * (negatives_below + 0.5 * neg)).sum(1), n_pos * n_neg)


def average_precision(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """PR-AUC as average precision: sum over thresholds of (recall step) x precision."""
    pos, neg, _ = ranked_counts(y, p, w)
    tp, fp = pos.cumsum(1), neg.cumsum(1)
    precision = np.nan_to_num(_ratio(tp, tp + fp))
    # undefined without negatives, as ROC-AUC is (it was 1.0 there, and such resamples
    # raised the interval's upper end)
    return np.where(neg.sum(1) > 0, _ratio((pos * precision).sum(1), pos.sum(1)), np.nan)


def sensitivity_at_specificity(tpr: np.ndarray, fpr: np.ndarray, target: float) -> np.ndarray:
    """The best sensitivity of any threshold whose specificity is at least `target`."""
    best = np.where(1 - fpr >= target - _EPS, tpr, -np.inf).max(1)
    return np.where(np.isfinite(best), best, np.nan)


def specificity_at_sensitivity(tpr: np.ndarray, fpr: np.ndarray, target: float) -> np.ndarray:
    """The best specificity of any threshold whose sensitivity is at least `target`."""
    best = np.where(tpr >= target - _EPS, 1 - fpr, -np.inf).max(1)
    return np.where(np.isfinite(best), best, np.nan)


def ranking_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold-free metrics of P(positive) `p` against booleans `y`."""
    tpr, fpr, _ = rates(y, p, w)
    out = {
        "roc_auc": roc_auc(y, p, w),
        "pr_auc": average_precision(y, p, w),
    }
    for s in SENSITIVITY_AT_SPECIFICITY:
        out[f"sensitivity_at_specificity/{s:.2f}"] = sensitivity_at_specificity(tpr, fpr, s)
    for s in SPECIFICITY_AT_SENSITIVITY:
        out[f"specificity_at_sensitivity/{s:.2f}"] = specificity_at_sensitivity(tpr, fpr, s)
    return out


# ---- probability quality ---------------------------------------------------------------------

def probability_metrics(y: np.ndarray, probs: np.ndarray, positive: int | None,
                        w: np.ndarray) -> dict[str, np.ndarray]:
    """Brier score and ECE of probabilities [N, C] for class indices `y`.

    Binary (`positive` given): both on P(positive), the number a reader sees.
    Multi-class: the Brier score summed over classes, and the top-label ECE.
    """
    if positive is not None:
        p, event = probs[:, positive], (y == positive).astype(float)
        brier = (p - event) ** 2
    else:
        p, event = probs.max(1), (probs.argmax(1) == y).astype(float)
        brier = ((probs - np.eye(probs.shape[1])[y]) ** 2).sum(1)
    return {"brier": _ratio(w @ brier, w.sum(1)),
            "ece": expected_calibration_error(p, event, w)}


# ---- metrics at a decision threshold --------------------------------------------------------

def confusion_counts(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> tuple:
    """(tp, fp, fn, tn), each weighted by `w` ([B, N] or [N]), when `p >= threshold` is
    called positive."""
    y, called = y.astype(bool), p >= threshold
    return w @ (y & called), w @ (~y & called), w @ (y & ~called), w @ (~y & ~called)


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float,
                      w: np.ndarray) -> dict[str, np.ndarray]:
    """Confusion-matrix metrics when `p >= threshold` is called positive."""
    tp, fp, fn, tn = confusion_counts(y, p, threshold, w)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def proportion_counts(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, tuple]:
    """(successes, trials) in films of the rates that are plain proportions."""
    tp, fp, fn, tn = map(int, confusion_counts(y, p, threshold, np.ones(len(y), dtype=int)))
    return {"accuracy": (tp + tn, tp + tn + fp + fn), "sensitivity": (tp, tp + fn),
            "specificity": (tn, tn + fp), "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if trials == 0:
        return math.nan, math.nan
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(rate * (1 - rate) / trials
                                                  + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)  # not -1e-17 at 0 (shown "-0.0")


def widen_to_wilson(entry: dict, successes: int, trials: int) -> dict:
    """A proportion's bootstrap interval, widened to its Wilson interval where that is wider:
    at 0% or 100% every resample agrees, and the percentile interval shrinks to a point
    (0 false positives of 12 is not a specificity of exactly 100%)."""
    low, high = wilson_interval(successes, trials)
    ci = entry["ci95"]
    if None in ci or not math.isfinite(low):
        return entry
    return {**entry, "ci95": [round(min(ci[0], low), 6), round(max(ci[1], high), 6)]}


def confusion_matrix(y: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    return np.bincount(y * n_classes + predicted, minlength=n_classes**2).reshape(n_classes, -1)


def multiclass_metrics(y: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                       w: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro ROC-AUC (one-vs-rest) and per-class metrics."""
    predicted = probs.argmax(1)
    out = {"accuracy": _ratio(w @ (predicted == y), w.sum(1))}
    for c, name in enumerate(labels):
        is_c = y == c
        per_class = threshold_metrics(is_c, (predicted == c).astype(float), 0.5, w)
        for rate in ("sensitivity", "specificity", "ppv", "npv", "f1"):  # this class's calls
            out[f"{name}/{rate}"] = per_class[rate]
        out[f"{name}/roc_auc"] = roc_auc(is_c, probs[:, c], w)
    # Macro averages over the classes of the films evaluated (a class with no film there has
    # no sensitivity, as in sklearn); a resample that drew no film of one of them is NaN, left
    # out of the interval: averaged over fewer classes, it was another quantity.
    present = [labels[c] for c in np.unique(y)]
    out["balanced_accuracy"] = np.mean([out[f"{n}/sensitivity"] for n in present], 0)
    out["roc_auc"] = np.mean([out[f"{n}/roc_auc"] for n in present], 0)
    return out


# ---- bootstrap ------------------------------------------------------------------------------

def resample_weights(groups: Sequence, n_resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Bootstrap weights [chunk, N]: draw len(unique groups) groups with replacement;
    each image counts as often as its group was drawn."""
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = group_of.max() + 1
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, RESAMPLES_PER_CHUNK):
        size = min(RESAMPLES_PER_CHUNK, n_resamples - start)
        draws = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=size)
        yield draws[:, group_of].astype(float)


def with_ci(statistics: Statistics, groups: Sequence, n_resamples: int = 1000,
            seed: int = 0) -> dict[str, dict]:
    """{name: {"value": point estimate, "ci95": [lo, hi]}} for each statistic.

    `statistics(w)` returns {name: [B]} for weights [B, N]; the interval is the
    percentile interval over resamples (resamples where a metric is undefined,
    e.g. no positives drawn, are left out of that metric's interval).
    """
    point = statistics(_ones(len(groups)))
    draws: dict[str, list[np.ndarray]] = {name: [] for name in point}
    for w in resample_weights(groups, n_resamples, seed) if n_resamples else ():
        for name, values in statistics(w).items():
            draws[name].append(values)
    tail = (100 - CI_LEVEL) / 2
    out = {}
    for name, value in point.items():
        values = np.concatenate(draws[name]) if draws[name] else np.array([])
        values = values[np.isfinite(values)]
        ci = np.percentile(values, [tail, 100 - tail]) if len(values) else [np.nan, np.nan]
        out[name] = {"value": _clean(value[0]), "ci95": [_clean(ci[0]), _clean(ci[1])]}
    return out


def drop_degenerate(tree: dict, prefix: str = "") -> list[str]:
    """Null every interval of zero width left in a metrics tree (after the Wilson widening),
    returning their names: where every patient resample gives the same value (perfect
    separation, all wrong, very few patients), the bootstrap shows no uncertainty, which is
    not certainty, and "1.000 (1.000-1.000)" read as one."""
    dropped = []
    for key, entry in tree.items():
        if not isinstance(entry, dict):
            continue
        low, high = entry.get("ci95") or (None, None)
        if "value" in entry and low is not None and low == high:
            entry["ci95"] = [None, None]
            dropped.append(f"{prefix}{key}")
        elif "value" not in entry:
            dropped += drop_degenerate(entry, f"{prefix}{key}/")
    return dropped


def _clean(x: float) -> float | None:
    """JSON-friendly: rounded, and None instead of NaN/inf (not valid JSON)."""
    return round(float(x), 6) if np.isfinite(x) else None
