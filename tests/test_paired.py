"""Paired comparison of runs on the same films (`cxr compare --paired`)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.compare import SPEC_AT_SENS, compare_runs, write_compare_csv
from cxrkit.evaluation import evaluate_run, summary
from cxrkit.evaluation.metrics import roc_auc, with_ci
from cxrkit.evaluation.paired import ScoredFilms, paired_difference, read_scored
from cxrkit.evaluation.results import HEADLINE, format_metric
from tests.conftest import train_tiny_run
from tests.test_evaluate import make_three_class_run


@pytest.fixture(scope="module")
def two_runs(tiny_kaggle, trained_run, tmp_path_factory):
    """Two different models evaluated on the same test films."""
    root = tmp_path_factory.mktemp("paired")
    first = shutil.copytree(trained_run, root / "first")
    second = train_tiny_run(tiny_kaggle, root / "second", steps=3)
    for run in (first, second):
        evaluate_run(run, bootstrap=50, figures=False, device="cpu")
    return first, second


def deployed(run: Path) -> dict:
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    at = metrics["operating_points"][metrics["deployed_operating_point"]]
    return {k: metrics[k] if k == "roc_auc" else at[k] for k in HEADLINE}


def test_the_difference_is_the_second_run_minus_the_first(two_runs):
    first, second = two_runs
    diff = paired_difference(read_scored(first / "eval" / "test"),
                             read_scored(second / "eval" / "test"), HEADLINE, 200)
    a, b = deployed(first), deployed(second)
    assert diff["n"] == 16
    for k in HEADLINE:
        expected = b[k]["value"] - a[k]["value"]
        assert diff[k]["value"] == pytest.approx(expected, abs=1e-5), k
        lo, hi = diff[k]["ci95"]
        assert lo <= diff[k]["value"] <= hi, k
    assert any(a[k]["value"] != b[k]["value"] for k in HEADLINE)  # the two models differ


def test_a_run_against_itself_differs_by_nothing(two_runs):
    films = read_scored(two_runs[0] / "eval" / "test")
    diff = paired_difference(films, films, HEADLINE, 100)
    assert all(diff[k] == {"value": 0.0, "ci95": [0.0, 0.0]} for k in HEADLINE)


def synthetic(p: np.ndarray, y: np.ndarray, name: str) -> ScoredFilms:
    return ScoredFilms(Path(name), [f"/films/{i}.png" for i in range(len(y))],
                       [f"patient{i // 2}" for i in range(len(y))], y, p, 0.5)


def test_pairing_sees_a_small_consistent_gain_that_separate_intervals_miss():
    """Model B is model A with a little less noise on every film: the separate ROC-AUC
    intervals overlap, the paired interval of B - A lies above zero."""
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.6
    signal, noise = np.where(y, 1.0, -1.0), rng.normal(size=400)
    a = synthetic(1 / (1 + np.exp(-(signal + 1.3 * noise))), y, "a")
    b = synthetic(1 / (1 + np.exp(-(signal + 1.1 * noise))), y, "b")
    diff = paired_difference(a, b, ["roc_auc"], 500)["roc_auc"]
    assert diff["value"] > 0 and diff["ci95"][0] > 0
    # Each model's own interval: they overlap (the unpaired reading would be "a tie").
    separate = [with_ci(lambda w, m=m: {"auc": roc_auc(y, m.p, w)}, m.groups, 500)["auc"]["ci95"]
                for m in (a, b)]
    assert separate[0][1] > separate[1][0]


def test_only_the_shared_films_are_compared(two_runs, caplog):
    first, second = (read_scored(r / "eval" / "test") for r in two_runs)
    fewer = first.subset(np.arange(10))
    assert paired_difference(fewer, second, HEADLINE, 20)["n"] == 10
    assert "share only 10 films: their paired intervals are wide" in caplog.text


def test_runs_on_different_films_are_refused_with_both_folders_named(two_runs):
    first = read_scored(two_runs[0] / "eval" / "test")
    elsewhere = ScoredFilms(Path("elsewhere"), [p + ".other" for p in first.paths],
                            first.groups, first.is_positive, first.p, 0.5)
    with pytest.raises(ValueError, match="share no films") as error:
        paired_difference(first, elsewhere, HEADLINE, 20)
    assert str(first.folder) in str(error.value) and "elsewhere" in str(error.value)


def test_a_multiclass_evaluation_is_refused(tiny_kaggle, tmp_path):
    run = make_three_class_run(tiny_kaggle, tmp_path / "three")
    folder = evaluate_run(run, bootstrap=10, figures=False, device="cpu")
    with pytest.raises(ValueError, match="binary model"):
        read_scored(folder)


def test_compare_paired_rows_csv_and_cli(two_runs, tmp_path):
    first, second = two_runs
    rows = compare_runs([first, second], paired=True)
    assert "paired" not in rows[0] and rows[1]["paired"]["n"] == 16
    # any iterable of runs, a generator too (it was read twice, and ran dry)
    assert compare_runs((run for run in two_runs), paired=True) == rows
    out = write_compare_csv(rows, tmp_path / "table.csv")
    with open(out, encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["diff_roc_auc"] == "" and table[1]["paired_n"] == "16"
    assert float(table[1]["diff_roc_auc"]) == pytest.approx(
        rows[1]["paired"]["roc_auc"]["value"])
    # the ranking at 97% sensitivity: each run's from its metrics.json, their difference paired
    at_97 = [json.loads((r / "eval" / "test" / "metrics.json").read_text())
             ["specificity_at_sensitivity"]["0.97"]["value"] for r in two_runs]
    assert [row[SPEC_AT_SENS]["value"] for row in rows] == at_97
    assert rows[1]["paired"][SPEC_AT_SENS]["value"] == pytest.approx(at_97[1] - at_97[0],
                                                                     abs=1e-5)
    assert float(table[1][f"diff_{SPEC_AT_SENS}"]) == pytest.approx(at_97[1] - at_97[0],
                                                                   abs=1e-5)

    result = CliRunner().invoke(app, ["compare", str(first), str(second), "--paired"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "minus first, same films" in result.output
    assert result.output.count("Spec@97: the best specificity any threshold") == 2  # both
    assert "second" in result.output.split("minus first")[1]


def test_differences_are_signed_and_rates_in_percentage_points():
    rate = {"value": 0.016, "ci95": [-0.008, 0.04]}
    assert format_metric("accuracy", rate, difference=True) == "+1.6 pp (-0.8 to +4.0)"
    assert format_metric("accuracy", rate) == "1.6% (-0.8–4.0)"
    score = {"value": -0.0098, "ci95": [-0.0204, -0.0005]}
    assert format_metric("roc_auc", score, difference=True) == "-0.010 (-0.020 to -0.001)"


def test_paired_needs_two_runs(two_runs):
    result = CliRunner().invoke(app, ["compare", str(two_runs[0]), "--paired"])
    assert result.exit_code != 0 and "at least two runs" in result.output


def test_compare_and_summary_say_what_they_take(tmp_path):
    """compare_runs("run") read the string letter by letter ("r is not a cxrkit run"), and
    summary(run folder) was a bare FileNotFoundError about metrics.json."""
    with pytest.raises(TypeError, match="compare_runs takes a list of run folders, e.g. "
                                        r"\['runs/a', another\]"):
        compare_runs("runs/a")
    with pytest.raises(FileNotFoundError, match="holds no evaluation .metrics.json.: give an "
                                                r"evaluation folder, e.g. summary\(evaluate_run"):
        summary(tmp_path)
