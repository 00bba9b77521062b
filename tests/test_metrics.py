"""Metrics, thresholds and bootstrap intervals on small cases computed by hand."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from cxrkit.evaluation.metrics import (
    average_precision,
    confusion_matrix,
    multiclass_metrics,
    probability_metrics,
    proportion_counts,
    ranking_metrics,
    resample_weights,
    roc_auc,
    threshold_metrics,
    widen_to_wilson,
    wilson_interval,
    with_ci,
)
from cxrkit.evaluation.thresholds import sensitivity_threshold, youden_threshold


def ones(n):
    return np.ones((1, n))


def test_threshold_metrics_by_hand():
    # 3 positives, 5 negatives; at 0.5: TP=2 FN=1 FP=1 TN=4
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.4, 0.3, 0.1, 0.0])
    m = {k: float(v[0]) for k, v in threshold_metrics(y, p, 0.5, ones(8)).items()}
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # the threshold itself counts as positive
    assert threshold_metrics(y, p, 0.6, ones(8))["sensitivity"][0] == pytest.approx(2 / 3)


def test_ranking_metrics_by_hand():
    y = np.array([0, 0, 1, 1], bool)
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, p, ones(4))[0] == pytest.approx(0.75)  # 3 of 4 pairs ordered
    # ties count one half: pairs (0.8,0.8)=.5 (0.8,0.1)=1 (0.3,0.8)=0 (0.3,0.1)=1
    y2, p2 = np.array([1, 0, 1, 0], bool), np.array([0.8, 0.8, 0.3, 0.1])
    assert roc_auc(y2, p2, ones(4))[0] == pytest.approx(2.5 / 4)
    # AP: a positive at rank 1 (precision 1), the other at rank 3 (precision 2/3)
    y3, p3 = np.array([1, 0, 1, 0], bool), np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(y3, p3, ones(4))[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    m = ranking_metrics(y, p, ones(4))
    # specificity >= 0.90 allows no false positive: only 0.8 is called, sensitivity 1/2
    assert m["sensitivity_at_specificity/0.90"][0] == pytest.approx(0.5)
    # sensitivity >= 0.95 needs 0.35 called positive, which also calls 0.4: specificity 1/2
    assert m["specificity_at_sensitivity/0.95"][0] == pytest.approx(0.5)
    # exactly at the target counts: with 20 negatives, 2 false positives is specificity 0.90,
    # and that threshold calls 8 of 10 positives (with 1 false positive, only 5)
    scores = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.905, 0.05, 0.02,
              *np.linspace(0.1, 0.5, 18)]
    truth = np.array([1] * 5 + [0, 0] + [1] * 5 + [0] * 18, bool)
    exact = ranking_metrics(truth, np.array(scores), ones(30))
    assert exact["sensitivity_at_specificity/0.90"][0] == pytest.approx(0.8)


def test_probability_metrics_by_hand():
    y = np.array([1, 0, 0, 0])
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.8, 0.2], [0.8, 0.2]])
    m = probability_metrics(y, probs, 1, ones(4))
    assert m["brier"][0] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4)
    # bins: 0.9 -> mean 0.9 vs frequency 0.5; 0.2 -> 0.2 vs 0: (2 * 0.4 + 2 * 0.2) / 4
    assert m["ece"][0] == pytest.approx(0.3)


def test_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    p = np.round(np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1), 2)  # rounded: many ties
    assert roc_auc(y, p, ones(300))[0] == pytest.approx(roc_auc_score(y, p))
    assert average_precision(y, p, ones(300))[0] == pytest.approx(average_precision_score(y, p))
    probs = np.stack([1 - p, p], 1)
    assert probability_metrics(y.astype(int), probs, 1, ones(300))["brier"][0] == pytest.approx(
        brier_score_loss(y, p))


def test_weights_count_images_that_many_times():
    """A bootstrap weight of 2 must equal the image appearing twice."""
    y = np.array([1, 0, 1, 0, 1], bool)
    p = np.array([0.9, 0.6, 0.4, 0.3, 0.8])
    w = np.array([[2, 1, 0, 3, 1]], float)
    repeated = np.repeat(np.arange(5), w[0].astype(int))
    for metric in (roc_auc, average_precision):
        assert metric(y, p, w)[0] == pytest.approx(metric(y[repeated], p[repeated],
                                                          ones(len(repeated)))[0])
    got = threshold_metrics(y, p, 0.5, w)
    want = threshold_metrics(y[repeated], p[repeated], 0.5, ones(len(repeated)))
    for k in got:
        assert got[k][0] == pytest.approx(want[k][0])


def test_multiclass_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8],
                      [.5, .2, .3]])
    m = multiclass_metrics(y, probs, ["A", "B", "C"], ones(6))
    assert m["accuracy"][0] == pytest.approx(4 / 6)
    assert m["A/sensitivity"][0] == pytest.approx(1 / 2)
    assert m["B/ppv"][0] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"][0] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert confusion_matrix(y, probs.argmax(1), 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_youden_threshold_by_hand():
    y = np.array([0, 0, 1, 1], bool)
    p = np.array([0.1, 0.4, 0.35, 0.8])
    # J = 0.5 calling only 0.8 positive (and again calling 0.35 and up): the highest cut,
    # in the middle of the gap between 0.8 and the next score 0.4
    assert youden_threshold(y, p) == pytest.approx(0.6)
    # between the lowest score that must be called and the next lower one, never on a score
    assert sensitivity_threshold(y, p, 0.5) == pytest.approx(0.6)  # 0.8 and 0.4
    assert sensitivity_threshold(y, p, 1.0) == pytest.approx(0.225)  # 0.35 and 0.1
    # the lowest score of all must be called: halfway between it and 0, off every score
    assert sensitivity_threshold(np.array([0, 1], bool), np.array([0.5, 0.2]), 1.0) == 0.1
    with pytest.raises(ValueError, match=r"only negative ones\. Choose it on labelled films "
                                         r"that hold both \(`cxr evaluate RUN --calibrate-on"):
        youden_threshold(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]))
    # ties in J whose fractions differ in their last bit (1/3 against 1/3 + 2**-54) still go
    # to the highest cut: 0.85 (sensitivity 1/3, specificity 1), not 0.45 (1, 1/3)
    tied = np.array([1, 0, 1, 0, 1, 0], bool)
    assert youden_threshold(tied, np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])) == pytest.approx(0.85)


def test_a_resample_without_one_of_the_classes_is_left_out_of_the_macro_intervals():
    """Averaged over the classes a resample drew, a macro metric was another quantity (and
    PR-AUC of a resample without negatives was 1.0): both raised the upper ends."""
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 3), 0.2)
    probs[np.arange(6), [0, 1, 1, 0, 2, 1]] = 0.6
    w = np.array([[1.0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # no film of class 2; all
    macro = multiclass_metrics(y, probs, ["NORMAL", "BACTERIA", "VIRUS"], w)
    assert np.isnan(macro["balanced_accuracy"][0]) and np.isnan(macro["roc_auc"][0])
    assert macro["balanced_accuracy"][1] == pytest.approx(np.mean([0.5, 0.5, 0.5]))
    # a class no film of the evaluation has stays out of the point estimate, as in sklearn
    two = multiclass_metrics(y[:4], probs[:4], ["NORMAL", "BACTERIA", "VIRUS"], np.ones((1, 4)))
    assert two["balanced_accuracy"][0] == pytest.approx(0.5)
    no_negatives = average_precision(np.ones(3, bool), np.array([0.9, 0.5, 0.2]),
                                     np.ones((1, 3)))
    assert np.isnan(no_negatives[0])


def test_bootstrap_interval_contains_estimate_and_narrows():
    rng = np.random.default_rng(1)

    def accuracy_ci(n):
        right = rng.random(n) < 0.8
        ci = with_ci(lambda w: {"acc": w @ right / w.sum(1)}, np.arange(n), 500, seed=0)["acc"]
        return ci["value"], ci["ci95"]

    small_value, (small_lo, small_hi) = accuracy_ci(50)
    large_value, (large_lo, large_hi) = accuracy_ci(5000)
    assert small_lo <= small_value <= small_hi
    assert large_lo <= large_value <= large_hi
    assert (large_hi - large_lo) < (small_hi - small_lo) / 4  # ~ 1/sqrt(100)
    # seeded: the same call gives the same interval
    right = np.arange(40) % 3 > 0
    twice = [with_ci(lambda w: {"a": w @ right / w.sum(1)}, np.arange(40), 200, seed=3)
             for _ in range(2)]
    assert twice[0] == twice[1]


def test_patient_bootstrap_is_wider_for_correlated_images():
    """Ten identical images per patient carry the information of one: resampling images
    as if independent gives a ~sqrt(10) too narrow interval."""
    rng = np.random.default_rng(2)
    per_patient = rng.random(30) < 0.7  # is the model right on this patient
    right = np.repeat(per_patient, 10)
    patients = np.repeat(np.arange(30), 10)

    def width(groups):
        ci = with_ci(lambda w: {"acc": w @ right / w.sum(1)}, groups, 1000, seed=0)["acc"]["ci95"]
        return ci[1] - ci[0]

    assert width(patients) > 2 * width(np.arange(300))


def test_undefined_metrics_are_none_not_nan():
    y = np.ones(4, bool)  # no negatives: specificity is undefined
    ci = with_ci(lambda w: threshold_metrics(y, np.full(4, 0.9), 0.5, w), np.arange(4), 50)
    assert ci["specificity"] == {"value": None, "ci95": [None, None]}
    assert ci["sensitivity"]["value"] == 1.0


@pytest.mark.parametrize(("k", "n"), [(12, 12), (0, 12), (156, 157), (184, 234), (0, 30),
                                      (20, 20)])  # (0 of 30, 20 of 20: just beyond 0 and 1)
def test_wilson_interval_agrees_with_scipy(k, n):
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n), (expected.low, expected.high), atol=1e-9)
    low, high = wilson_interval(k, n)
    assert low >= 0.0 and high <= 1.0 and f"{100 * low:.1f}" != "-0.0"  # it printed "-0.0"


def test_a_rate_at_100_percent_gets_an_interval_not_a_point():
    """12 of 12 normal films called normal: every bootstrap resample says 100%."""
    y = np.array([0] * 12 + [1] * 12)
    p = np.array([0.1] * 12 + [0.9] * 11 + [0.2])
    rates = with_ci(lambda w: threshold_metrics(y, p, 0.5, w), list(range(24)), 200)
    assert rates["specificity"]["ci95"] == [1.0, 1.0]  # what the percentile interval gives
    k, n = proportion_counts(y, p, 0.5)["specificity"]
    widened = widen_to_wilson(rates["specificity"], k, n)
    assert widened["value"] == 1.0 and widened["ci95"][1] == 1.0
    assert widened["ci95"][0] == pytest.approx(wilson_interval(12, 12)[0], abs=1e-6)
    assert widened["ci95"][0] < 0.76
    wide = {"value": 0.5, "ci95": [0.1, 0.9]}  # a bootstrap interval wider than Wilson's stays
    assert widen_to_wilson(wide, 12, 24) == wide


def test_an_interval_every_resample_agrees_on_is_not_claimed():
    """Perfect separation: ROC-AUC, PR-AUC and F1 were "1.000 (1.000-1.000)", as if certain;
    the plain proportions keep their Wilson intervals."""
    from cxrkit.data.layout import Sample
    from cxrkit.evaluation.evaluate import compute_metrics
    from cxrkit.evaluation.scoring import Scored
    from cxrkit.runs import Calibration

    y = np.array([0] * 20 + [1] * 30)
    logits = np.zeros((50, 2))
    logits[:, 1] = np.where(y == 1, 3.0, -3.0) + np.linspace(-0.5, 0.5, 50)
    samples = [Sample(f"/films/{i}.png", ["NORMAL", "PNEUMONIA"][c], "", f"p{i}")
               for i, c in enumerate(y)]
    metrics = compute_metrics(Scored(samples, y, logits, []), ["NORMAL", "PNEUMONIA"], 1,
                              Calibration(), {"validation": 0.5}, n_resamples=200)
    assert metrics["roc_auc"] == {"value": 1.0, "ci95": [None, None]}
    point = metrics["operating_points"]["validation"]
    assert point["f1"]["ci95"] == [None, None]
    assert point["sensitivity"]["ci95"][0] == pytest.approx(wilson_interval(30, 30)[0], abs=1e-6)
    assert {"roc_auc", "pr_auc", "operating_points/validation/f1"} <= set(
        metrics["degenerate_intervals"])
    assert "operating_points/validation/sensitivity" not in metrics["degenerate_intervals"]
    mistaken = logits.copy()  # a model with some mistakes: intervals everywhere
    mistaken[:, 1] += np.random.default_rng(0).normal(0, 3, 50)
    assert "degenerate_intervals" not in compute_metrics(
        Scored(samples, y, mistaken, []), ["NORMAL", "PNEUMONIA"], 1, Calibration(),
        {"validation": 0.5}, n_resamples=200)


def test_the_note_names_the_intervals_left_out_of_every_block():
    """TTA's, framing's and the seen patients' blocks too (only the plain one was said)."""
    from cxrkit.evaluation.evaluate import degenerate_note

    [note] = degenerate_note({"degenerate_intervals": ["roc_auc"], "roc_auc": {"value": 1.0},
                              "tta": {"degenerate_intervals": ["pr_auc"]},
                              "framing": {"85%": {"degenerate_intervals": ["f1"]}}})
    assert note.startswith("No 95% interval for roc_auc, tta/pr_auc, framing/85%/f1: ")
    assert degenerate_note({"tta": {}, "roc_auc": {"value": 0.9}}) == []


def test_the_interval_is_the_2_5th_to_97_5th_percentile_of_the_resamples():
    """The 95% level is pinned: a change would narrow every interval in every report."""
    right = np.random.default_rng(1).random(60) < 0.7
    groups = np.arange(60) // 2
    ci = with_ci(lambda w: {"a": w @ right / w.sum(1)}, groups, 400, seed=1)["a"]["ci95"]
    draws = np.concatenate([w @ right / w.sum(1) for w in resample_weights(groups, 400, 1)])
    assert ci == pytest.approx(np.percentile(draws, [2.5, 97.5]), abs=1e-6)
