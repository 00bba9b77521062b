"""Are the probabilities honest? Expected calibration error, temperature scaling, and
temperature plus a bias per class.

Temperature scaling (Guo et al. 2017) divides every logit by one number T,
fitted on validation logits by minimising the negative log-likelihood. It
never changes which class has the highest logit, so accuracy and ROC-AUC stay
the same; only the confidence changes.

Temperature plus bias, softmax(logits / T + b) ("bias-corrected temperature scaling",
Alexandari et al. 2020), also learns the class mix of the films it is fitted on. That is
what films from the deployment site should teach (`cxr evaluate --calibrate-on`), and what
validation from the training site must not: there it would carry the training site's mix
(74% pneumonia in Kermany's train/) to every site. BENCHMARKS.md ("Calibration: a bias per
class") has the measurements. For two classes neither changes the ranking (ROC-AUC); with
more, each class's one-vs-rest ranking can move a little.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp

N_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray, temperature: float,
                            bias: np.ndarray | float = 0.0) -> float:
    z = logits.astype(np.float64) / temperature + bias
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the NLL of softmax(logits / T) (1-D bounded search).

    Searching log T keeps the search symmetric: halving and doubling are equally far from 1.
    """
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    lo, hi = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, y, np.exp(log_t)),
                             bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def fit_temperature_and_bias(logits: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    """(T, b) minimising the NLL of softmax(logits / T + b); b[0] = 0 (only differences
    between classes matter). Starts from the temperature alone, so it can only do better
    on the films it is fitted on. Every class must be among `y`: a missing class's bias
    would run off to minus infinity."""
    missing = set(range(logits.shape[1])) - set(np.unique(y).tolist())
    if missing:
        raise ValueError(f"cannot fit a bias for class(es) {sorted(missing)}: no such films")
    start = np.r_[np.log(fit_temperature(logits, y)), np.zeros(logits.shape[1] - 1)]

    def nll(params: np.ndarray) -> float:
        return negative_log_likelihood(logits, y, np.exp(params[0]), np.r_[0.0, params[1:]])

    bounds = [tuple(np.log(TEMPERATURE_RANGE))] + [(None, None)] * (logits.shape[1] - 1)
    result = minimize(nll, start, method="L-BFGS-B", bounds=bounds)
    return float(np.exp(result.x[0])), [0.0, *map(float, result.x[1:])]


def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray,
                               weights: np.ndarray | None = None,
                               n_bins: int = N_BINS) -> np.ndarray:
    """ECE over equal-width confidence bins: sum_b (n_b / n) |mean confidence_b - frequency_b|.

    `confidence` is the probability of an event and `outcome` whether it happened
    (binary: P(positive) and y == positive; multi-class: the top probability and
    whether the top class was right). `weights` [B, N] gives one ECE per row
    (bootstrap resamples); None means every sample once. Returns [B].
    """
    weights = np.ones((1, len(confidence))) if weights is None else weights
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    one_hot = np.eye(n_bins)[bins]                                    # [N, bins]
    gap = weights @ (one_hot * (confidence - outcome)[:, None])      # [B, bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(gap).sum(axis=1) / weights.sum(axis=1)


def reliability_curve(confidence: np.ndarray, outcome: np.ndarray,
                      n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: mean confidence, observed frequency, and count (for the diagram)."""
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    mean_conf = np.bincount(bins, confidence, n_bins)
    freq = np.bincount(bins, outcome.astype(float), n_bins)
    filled = counts > 0
    return mean_conf[filled] / counts[filled], freq[filled] / counts[filled], counts[filled]
