"""Temperature scaling and calibration error on toy models whose truth is known."""

import numpy as np
import pytest

from cxrkit.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    fit_temperature_and_bias,
    negative_log_likelihood,
    reliability_curve,
)
from cxrkit.evaluation.metrics import roc_auc
from cxrkit.runs import softmax


def overconfident(n: int, factor: float, seed: int = 0):
    """Labels drawn from true probabilities; the 'model' reports logits `factor` times too big."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = np.stack([np.zeros(n), factor * true_logit], 1)
    return logits, y


def ece_of(logits, y, temperature):
    p = softmax(logits, temperature)[:, 1]
    return expected_calibration_error(p, (y == 1).astype(float))[0]


def test_temperature_scaling_fixes_an_overconfident_model():
    val_logits, val_y = overconfident(4000, factor=4.0, seed=0)
    test_logits, test_y = overconfident(4000, factor=4.0, seed=1)
    t = fit_temperature(val_logits, val_y)
    assert t == pytest.approx(4.0, rel=0.15)  # it recovers how much too confident the model is
    assert ece_of(test_logits, test_y, t) < 0.5 * ece_of(test_logits, test_y, 1.0)
    assert (negative_log_likelihood(test_logits, test_y, t)
            < negative_log_likelihood(test_logits, test_y, 1.0))


def test_temperature_keeps_the_ranking():
    logits, y = overconfident(500, factor=3.0)
    p1, p2 = softmax(logits, 1.0)[:, 1], softmax(logits, 3.0)[:, 1]
    ones = np.ones((1, 500))
    assert roc_auc(y == 1, p1, ones)[0] == pytest.approx(roc_auc(y == 1, p2, ones)[0])
    assert ((p1 >= 0.5) == (p2 >= 0.5)).all()  # two classes: 0.5 stays 0.5


def test_well_calibrated_model_keeps_temperature_near_one():
    logits, y = overconfident(6000, factor=1.0, seed=2)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)
    assert ece_of(logits, y, 1.0) < 0.03


def shifted(n: int, factor: float, shift: float, seed: int):
    """Like `overconfident`, and the model also favours class 1 by `shift` logits: what
    training-site weighting or a different class mix does to a model at a new site."""
    logits, y = overconfident(n, factor, seed)
    return logits + np.array([0.0, shift]), y


def test_temperature_and_bias_undo_a_shift_temperature_alone_cannot():
    val_logits, val_y = shifted(4000, factor=2.0, shift=1.5, seed=3)
    test_logits, test_y = shifted(4000, factor=2.0, shift=1.5, seed=4)
    t, bias = fit_temperature_and_bias(val_logits, val_y)
    # The truth is logit = (z - 1.5) / 2: T = 2 and a bias of -1.5 / 2 on class 1.
    assert t == pytest.approx(2.0, rel=0.15)
    assert bias[0] == 0.0 and bias[1] == pytest.approx(-0.75, abs=0.15)
    p_both = softmax(test_logits, t, bias)[:, 1]
    t_only = fit_temperature(val_logits, val_y)
    ece_both = expected_calibration_error(p_both, (test_y == 1).astype(float))[0]
    assert ece_both < 0.03 < ece_of(test_logits, test_y, t_only)
    assert (negative_log_likelihood(test_logits, test_y, t, np.array(bias))
            < negative_log_likelihood(test_logits, test_y, t_only))
    ones = np.ones((1, len(test_y)))  # a monotone map: the ranking stays
    assert roc_auc(test_y == 1, p_both, ones)[0] == pytest.approx(
        roc_auc(test_y == 1, test_logits[:, 1], ones)[0])


def test_a_bias_needs_films_of_every_class():
    logits, y = overconfident(200, factor=2.0)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]: no such films"):
        fit_temperature_and_bias(logits[y == 0], y[y == 0])


def test_reliability_curve_by_hand():
    conf = np.array([0.05, 0.05, 0.95, 0.95, 0.95, 0.95])
    outcome = np.array([0, 1, 1, 1, 1, 0], float)
    mean_conf, freq, counts = reliability_curve(conf, outcome)
    assert mean_conf.tolist() == pytest.approx([0.05, 0.95])
    assert freq.tolist() == pytest.approx([0.5, 0.75])
    assert counts.tolist() == [2, 4]
    # ECE = 2/6 * |0.05 - 0.5| + 4/6 * |0.95 - 0.75|
    expected = 2 / 6 * 0.45 + 4 / 6 * 0.2
    assert expected_calibration_error(conf, outcome)[0] == pytest.approx(expected)
