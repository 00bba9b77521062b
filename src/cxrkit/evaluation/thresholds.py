"""Decision thresholds, always chosen on the validation split and then applied elsewhere.

A threshold is a probability t: `p >= t` is called positive. Both rules pick a
cut between two neighbouring validation scores, so the chosen value reproduces
the validation confusion matrix exactly.
"""

from __future__ import annotations

import numpy as np

from cxrkit.evaluation.metrics import rates

# How each operating point of an evaluation (metrics.json's `operating_points`) reads in a
# figure, table or report; every one was chosen before the films it is applied to.
POINT_NAMES = {"default_0.5": "fixed 0.5", "validation": "Youden's J",
               "validation_framing": "Youden's J, framing-robust",
               "target_sensitivity": "sensitivity target"}


def point_name(name: str) -> str:
    return POINT_NAMES.get(name, name)


def _check_both_classes(y: np.ndarray) -> None:
    if y.all() or not y.any():
        raise ValueError(
            "choosing a threshold needs films of both classes; the films it is chosen on "
            f"(the validation split, or --calibrate-on's) have only "
            f"{'positive' if y.all() else 'negative'} ones. Choose it on labelled films that "
            "hold both (`cxr evaluate RUN --calibrate-on FILMS`), or train with more patients "
            "of the other class: a class of one patient stays whole in train"
        )


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    The best cut lies between the lowest score called positive and the next
    lower score; the midpoint of that gap is returned rather than its upper
    end (sklearn's choice), so an unseen positive scoring just below the lowest
    validation positive is not lost. Ties in J: the highest cut.
    """
    y = np.asarray(y, bool)
    _check_both_classes(y)
    return float(youden_cuts(y, p, np.ones((1, len(p))))[0])


def youden_cuts(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Youden's J threshold [B] under each row of image weights `w` [B, N]."""
    tpr, fpr, thresholds = rates(y, p, w)
    j = np.nan_to_num(tpr - fpr, nan=-np.inf)
    # ties: the highest cut (the first column). J values equal as fractions differ in their
    # last bit (3/6 - 1/6 against 2/6 - 0/6), and argmax alone took whichever rounding favoured
    best = np.argmax(j >= j.max(axis=1, keepdims=True) - 1e-12, axis=1)
    below = np.r_[thresholds[1:], thresholds[-1]]  # the next lower score (the lowest: itself)
    cuts = (thresholds[best] + below[best]) / 2
    # best == 0, calling nothing positive (a useless model): cut just above every score
    return np.where(best == 0, np.nextafter(thresholds[1], np.inf), cuts)


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """A threshold whose sensitivity reaches `target` (e.g. 0.95) calling the fewest films
    positive: the midpoint between the lowest score it must call positive and the next lower
    score, as for Youden's J. On that score itself, the film that decides the target was
    called either way by float rounding (PyTorch's float32 against ONNX Runtime's)."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y, bool)
    _check_both_classes(y)
    tpr, _, thresholds = rates(y, p, np.ones((1, len(p))))
    first = np.flatnonzero(tpr[0] >= target - 1e-12)[0]
    # the lowest score of all: halfway to 0, every validation film called as on the score
    below = thresholds[first + 1] if first + 1 < len(thresholds) else 0.0
    return float((thresholds[first] + below) / 2)
