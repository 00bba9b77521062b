"""`evaluate_run` end to end on a tiny trained run: files, layout, and the protocol
(threshold and temperature from validation only, then applied to test)."""

import csv
import io
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.cli.app import log_handler
from cxrkit.data.layout import Sample, load_source
from cxrkit.data.patients import has_parsed_patient
from cxrkit.data.split import patient_split, read_manifest, write_manifest
from cxrkit.data.transforms import prepare
from cxrkit.evaluation import evaluate_run, summary
from cxrkit.evaluation.evaluate import choose_calibration
from cxrkit.evaluation.metrics import ranking_metrics, wilson_interval, with_ci
from cxrkit.evaluation.results import headline, read_predictions
from cxrkit.evaluation.scoring import Scored
from cxrkit.evaluation.tta import DEFAULT_VIEWS
from cxrkit.export import export_model
from cxrkit.inference import predict_logits
from cxrkit.models import create_model
from cxrkit.predict import predict
from cxrkit.report import build_report
from cxrkit.runs import load_model, read_calibration, save_model, softmax, write_calibration
from tests.conftest import make_kaggle_tree, synthetic_film

TOP_LEVEL = ("roc_auc", "pr_auc", "brier", "ece")
AT_THRESHOLD = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")


def copy_run(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def assert_metric(m):
    assert set(m) == {"value", "ci95"}
    lo, hi = m["ci95"]
    assert lo - 1e-9 <= m["value"] <= hi + 1e-9


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    run = copy_run(trained_run, tmp_path_factory.mktemp("evaluated"))
    out = evaluate_run(run, bootstrap=200, device="cpu")
    return run, out, json.loads((out / "metrics.json").read_text())


def test_writes_predictions_metrics_and_figures(evaluated):
    run, out, metrics = evaluated
    assert "not_normal" not in metrics  # two classes: nothing to collapse
    # a handful of validation films chose the threshold: the notes say how rough that is
    assert any("validation has only" in n and "films: the threshold" in n
               for n in metrics["notes"])
    assert out == run / "eval" / "test"
    assert metrics["split"] == "test" and metrics["n"] == 16 and metrics["n_patients"] == 8
    assert metrics["positive_class"] == "PNEUMONIA"
    for key in TOP_LEVEL:
        assert_metric(metrics[key])
    assert set(metrics["operating_points"]) == {"default_0.5", "validation"}
    for point in metrics["operating_points"].values():
        assert 0 < point["threshold"] <= 1
        for key in AT_THRESHOLD:
            assert_metric(point[key])
    for block, levels in (("sensitivity_at_specificity", {"0.90", "0.95"}),
                          ("specificity_at_sensitivity", {"0.95", "0.97"})):
        assert set(metrics[block]) == levels
    calibrated = metrics["calibrated"]
    assert calibrated["temperature"] > 0 and calibrated["ece_after"] == metrics["ece"]
    for key in ("ece_before", "brier_before", "brier_after"):
        assert_metric(calibrated[key])
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 16
    assert {"path", "patient_id", "label", "predicted", "p_NORMAL", "p_PNEUMONIA"} <= set(rows[0])
    for name in ("confusion_matrix", "roc_pr", "reliability", "histograms", "worst_errors",
                 "gradcam_errors", "gradcam_correct"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
    # a notebook reads the headline without knowing metrics.json's layout
    deployed = metrics["operating_points"][metrics["deployed_operating_point"]]
    assert summary(out) == {"accuracy": deployed["accuracy"]["value"],
                            "roc_auc": metrics["roc_auc"]["value"],
                            "sensitivity": deployed["sensitivity"]["value"],
                            "specificity": deployed["specificity"]["value"],
                            "f1": deployed["f1"]["value"],
                            "threshold": metrics["deployed_threshold"], "n": 16}


def test_evaluating_again_leaves_no_figure_of_the_last_evaluation(evaluated, tmp_path):
    """Figures drawn at another threshold must not sit beside new metrics (the report would
    embed them): an evaluation without figures leaves none."""
    run = shutil.copytree(evaluated[0], tmp_path / "run")
    out = evaluate_run(run, target_sensitivity=0.3, bootstrap=0, figures=False, device="cpu")
    assert out == run / "eval" / "test" and (out / "metrics.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.csv"]


def test_validation_threshold_is_chosen_on_val_and_used_on_test(evaluated):
    run, out, metrics = evaluated
    temperature = metrics["calibrated"]["temperature"]
    # Recompute Youden's J on the validation images independently (sklearn's ROC).
    val = [s for s in read_manifest(run / "split.csv") if s.split == "val"]
    logits, _ = predict_logits(load_model(run), [s.path for s in val], device="cpu")
    p_val = softmax(logits.astype(np.float64), temperature)[:, 1]
    fpr, tpr, thresholds = roc_curve([s.label == "PNEUMONIA" for s in val], p_val,
                                     drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    expected = (thresholds[best] + thresholds[best + 1]) / 2  # middle of the gap below it
    threshold = read_calibration(run).threshold
    assert threshold == pytest.approx(expected, abs=1e-5)
    assert metrics["operating_points"]["validation"]["threshold"] == pytest.approx(threshold)

    # ... and the test metrics are computed at that threshold.
    rows = read_rows(out / "predictions.csv")
    y = np.array([r["label"] == "PNEUMONIA" for r in rows])
    called = np.array([float(r["p_PNEUMONIA"]) for r in rows]) >= threshold
    assert [r["predicted"] == "PNEUMONIA" for r in rows] == called.tolist()
    tn, fp, fn, tp = confusion_matrix(y, called).ravel()
    at_val = metrics["operating_points"]["validation"]
    assert at_val["sensitivity"]["value"] == pytest.approx(tp / (tp + fn), abs=1e-6)
    assert at_val["specificity"]["value"] == pytest.approx(tn / (tn + fp), abs=1e-6)
    assert at_val["accuracy"]["value"] == pytest.approx((tp + tn) / len(y), abs=1e-6)
    assert metrics["confusion_matrix"]["counts"] == [[tn, fp], [fn, tp]]


def test_test_labels_never_influence_threshold_or_temperature(evaluated, trained_run, tmp_path):
    _, _, metrics = evaluated
    run = copy_run(trained_run, tmp_path)
    flipped = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}
    samples = [replace(s, label=flipped[s.label]) if s.split == "test" else s
               for s in read_manifest(run / "split.csv")]
    write_manifest(samples, run / "split.csv")
    other = json.loads((evaluate_run(run, bootstrap=0, figures=False, device="cpu")
                        / "metrics.json").read_text())
    assert (other["operating_points"]["validation"]["threshold"]
            == metrics["operating_points"]["validation"]["threshold"])
    assert other["calibrated"]["temperature"] == metrics["calibrated"]["temperature"]
    assert other["roc_auc"]["value"] == pytest.approx(1 - metrics["roc_auc"]["value"])


def test_a_patient_id_a_spreadsheet_would_run_is_written_as_text(trained_run, tmp_path):
    """A manifest's free-text patient column (`=HYPERLINK(...)`) must not become a formula
    in eval/<split>/predictions.csv; the paired comparison still reads it back."""
    from cxrkit.evaluation.paired import read_scored

    run = copy_run(trained_run, tmp_path)
    samples = [replace(s, patient_id="=HYPERLINK(\"http://evil.example\")")
               if s.split == "test" else s for s in read_manifest(run / "split.csv")]
    write_manifest(samples, run / "split.csv")
    out = evaluate_run(run, bootstrap=0, figures=False, device="cpu")
    with open(out / "predictions.csv", encoding="utf-8", newline="") as f:
        ids = {row["patient_id"] for row in csv.DictReader(f)}
    assert ids == {"'=HYPERLINK(\"http://evil.example\")"}
    assert len(read_scored(out).groups) == len(samples) - sum(s.split != "test" for s in samples)


def test_target_sensitivity_threshold_is_deployed(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    out = evaluate_run(run, target_sensitivity=1.0, bootstrap=0, figures=False,
                       device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    threshold = metrics["operating_points"]["target_sensitivity"]["threshold"]
    calibration = read_calibration(run)
    assert calibration.threshold == pytest.approx(threshold)
    assert "sensitivity >= 1.0" in calibration.chosen_on
    # every validation positive is called positive at it
    val = [s for s in read_manifest(run / "split.csv") if s.split == "val"]
    logits, _ = predict_logits(load_model(run), [s.path for s in val], device="cpu")
    p = softmax(logits.astype(np.float64), calibration.temperature)[:, 1]
    positives = np.array([s.label == "PNEUMONIA" for s in val])
    assert (p[positives] >= calibration.threshold).all()
    # the fewest films called: those at or above the lowest positive, and none on the cut
    lowest = p[positives].min()
    assert lowest > calibration.threshold and not (p == calibration.threshold).any()
    assert (p >= calibration.threshold).sum() == (p >= lowest).sum()


def make_class_folders(root, names, n=3, seed=500):
    for name in names:
        (root / name).mkdir(parents=True)
        label = "PNEUMONIA" if name.upper() != "NORMAL" else "NORMAL"
        for i in range(n):
            synthetic_film(label, seed + i).save(root / name / f"{name}_{i}.png")
    return root


def test_external_data_goes_to_its_own_folder(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    # Another hospital's class-per-folder tree, folder names in another case.
    hospital = make_class_folders(tmp_path / "hospital_b", ["normal", "pneumonia"])
    out = evaluate_run(run, data=hospital, bootstrap=50, figures=False, device="cpu")
    assert out == run / "eval" / "hospital_b"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["external"] and metrics["split"] == "all" and metrics["n"] == 6
    assert {r["label"] for r in read_rows(out / "predictions.csv")} == {"NORMAL", "PNEUMONIA"}
    assert not (run / "eval" / "test").exists()  # the internal test is left alone
    # Another site's folder of the same name, or another split, never replaces this one
    other = make_class_folders(tmp_path / "site_c" / "hospital_b", ["NORMAL", "PNEUMONIA"], n=2)
    second = evaluate_run(run, data=other, bootstrap=0, figures=False, device="cpu")
    assert second.name.startswith("hospital_b-") and json.loads(
        (second / "metrics.json").read_text())["data"] == str(other.resolve())
    assert json.loads((out / "metrics.json").read_text()) == metrics  # untouched
    again = evaluate_run(run, data=other, bootstrap=0, figures=False, device="cpu")
    assert again == second  # the same folder each time
    assert evaluate_run(run, data=hospital, bootstrap=0, figures=False, device="cpu") == out


def test_a_site_with_normal_films_only_measures_specificity(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    normals = make_class_folders(tmp_path / "clinic_normals", ["NORMAL"])
    out = evaluate_run(run, data=normals, bootstrap=20, figures=False, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and "The external data has no PNEUMONIA images." in metrics["notes"]
    specificity = metrics["operating_points"]["validation"]["specificity"]["value"]
    assert specificity == np.mean([r["predicted"] == "NORMAL"
                                   for r in read_rows(out / "predictions.csv")])


def test_external_kaggle_tree_uses_its_test_split(trained_run, tiny_kaggle, tmp_path):
    run = copy_run(trained_run, tmp_path)
    out = evaluate_run(run, data=tiny_kaggle, bootstrap=0, figures=False, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert out.name == "chest_xray" and metrics["split"] == "test" and metrics["n"] == 16


def test_external_labels_must_match_by_name(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    other = make_class_folders(tmp_path / "covid", ["NORMAL", "COVID"])
    with pytest.raises(ValueError, match="COVID.*not among the model's labels"):
        evaluate_run(run, data=other, bootstrap=0, figures=False, device="cpu")


def test_tta_is_reported_beside_the_plain_result(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    out = evaluate_run(run, tta=True, bootstrap=50, figures=False, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["tta"]["views"]) == 5
    assert_metric(metrics["tta"]["roc_auc"])
    assert "validation" in metrics["tta"]["operating_points"]
    rows = read_rows(out / "predictions.csv")
    assert rows[0]["tta_p_PNEUMONIA"] != rows[0]["p_PNEUMONIA"]  # the views changed something
    # a predictor of its own: temperature and threshold chosen on validation films scored
    # with the same views (averaged logits have another scale than the plain ones)
    val = [s for s in read_manifest(run / "split.csv") if s.split == "val"]
    logits, _ = predict_logits(load_model(run), [s.path for s in val], device="cpu",
                               views=list(DEFAULT_VIEWS.values()))
    labels = json.loads((run / "labels.json").read_text())
    val_tta = Scored(val, np.array([labels.index(s.label) for s in val]),
                     logits.astype(np.float64), [])
    chosen, _ = choose_calibration(val_tta, positive=1, target_sensitivity=None)
    assert metrics["tta"]["temperature"] == pytest.approx(chosen.temperature)
    assert metrics["tta"]["threshold"] == pytest.approx(chosen.threshold)
    assert metrics["tta"]["operating_points"]["validation"]["threshold"] == pytest.approx(
        chosen.threshold)
    assert chosen.temperature != pytest.approx(read_calibration(run).temperature)
    assert summary(out, tta=True)["threshold"] == metrics["tta"]["threshold"]
    assert summary(out)["threshold"] == metrics["deployed_threshold"]


def test_framing_check_scores_the_same_films_framed_more_tightly(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    out = evaluate_run(run, framing=True, bootstrap=50, figures=False, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    framing = metrics["framing"]
    assert framing["crops"] == ["85%", "70%"]
    test = [s for s in read_manifest(run / "split.csv") if s.split == "test"]
    y = np.array([s.label == "PNEUMONIA" for s in test])
    for crop, fraction in (("85%", 0.85), ("70%", 0.7)):
        assert_metric(framing[crop]["roc_auc"])
        assert framing[crop]["operating_points"]["validation"]["threshold"] == \
            metrics["operating_points"]["validation"]["threshold"]  # nothing re-chosen
        cropped = [centre_cropped_copy(s.path, fraction, tmp_path / crop) for s in test]
        logits, _ = predict_logits(load_model(run), cropped, device="cpu")
        p = softmax(logits, metrics["calibrated"]["temperature"])[:, 1]
        assert framing[crop]["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=0.02)
    assert framing["70%"]["brier"]["value"] != metrics["brier"]["value"]
    assert not (out / "framing.png").exists()  # figures=False
    evaluate_run(run, framing=True, bootstrap=20, device="cpu")  # the check drawn
    assert (out / "framing.png").stat().st_size > 10_000


def two_class_scores(y, z) -> Scored:
    """Validation scores whose P(positive) is sigmoid(z / temperature)."""
    z = np.asarray(z, float)
    return Scored([], np.asarray(y), np.stack([np.zeros_like(z), z], 1), [])


def test_framing_threshold_rises_above_tightly_framed_normal_films():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    plain = two_class_scores(y, [-3, -2.5, -2, -1.5, 1.5, 2, 2.5, 3])
    # framed more tightly, two NORMAL films look more like pneumonia; no positive changes
    framed = two_class_scores(y, [0.5, 0.8, -2, -1.5, 1.5, 2, 2.5, 3])
    calibration, thresholds = choose_calibration(plain, 1, None, framed)

    def p(z):
        return 1 / (1 + np.exp(-z / calibration.temperature))

    assert thresholds["validation"] == pytest.approx((p(-1.5) + p(1.5)) / 2)
    assert thresholds["validation_framing"] == pytest.approx((p(0.8) + p(1.5)) / 2)
    assert calibration.threshold == thresholds["validation_framing"]  # deployed
    assert "framed 85%" in calibration.chosen_on
    # the temperature is the one fitted on the films as filmed alone
    assert calibration.temperature == choose_calibration(plain, 1, None)[0].temperature
    # a sensitivity target, when asked, still decides what is deployed
    calibration, thresholds = choose_calibration(plain, 1, 1.0, framed)
    assert calibration.threshold == thresholds["target_sensitivity"]


def test_framing_threshold_is_deployed_and_reported(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    out = evaluate_run(run, framing_threshold=True, bootstrap=0, figures=False,
                       device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    points = metrics["operating_points"]
    assert set(points) == {"default_0.5", "validation", "validation_framing"}
    assert metrics["deployed_operating_point"] == "validation_framing"
    assert read_calibration(run).threshold == pytest.approx(points["validation_framing"]
                                                            ["threshold"])
    assert metrics["deployed_threshold"] == points["validation_framing"]["threshold"]
    assert headline(metrics)["accuracy"] == points["validation_framing"]["accuracy"]


def test_evaluating_again_keeps_the_deployed_operating_point(trained_run, tmp_path):
    """A plain evaluation (as `cxr report` and `cxr compare` make when one is missing)
    re-applies what chose the deployed threshold; --reset-calibration chooses afresh."""
    run = copy_run(trained_run, tmp_path)
    options = {"bootstrap": 0, "figures": False, "device": "cpu"}
    evaluate_run(run, target_sensitivity=0.5, **options)
    deployed = read_calibration(run)
    assert deployed.chosen_with == {"target_sensitivity": 0.5}
    assert json.loads((run / "calibration.json").read_text())["chosen_with"] == {
        "target_sensitivity": 0.5}
    again = json.loads((evaluate_run(run, split="val", **options) / "metrics.json").read_text())
    assert read_calibration(run) == deployed
    assert again["deployed_operating_point"] == "target_sensitivity"
    assert not any("operating point changed" in n for n in again["notes"])
    export_model(run)  # an export made before the change: said to be behind it
    reset = json.loads((evaluate_run(run, reset_calibration=True, **options)
                        / "metrics.json").read_text())
    fresh = read_calibration(run)
    assert fresh.chosen_with == {} and "Youden" in fresh.chosen_on
    # a new choice is said out loud, old and new threshold both named
    moved = [n for n in reset["notes"] if "deployed operating point changed" in n]
    assert moved and all(f"{c.threshold:.4f}" in moved[0] for c in (deployed, fresh))
    assert moved[0].endswith(f"{run / 'export'} still applies another one: `cxr export "
                             f"{run}` updates it (and export copies anew).")
    export_model(run)  # the export holds the new one: nothing to say of it
    write_calibration(run, deployed)
    again = json.loads((evaluate_run(run, reset_calibration=True, **options)
                        / "metrics.json").read_text())
    moved = [n for n in again["notes"] if "deployed operating point changed" in n]
    assert moved and "still applies" not in moved[0]
    assert reset["deployed_operating_point"] == "validation"
    # one name for the films that chose it (fitted_on said "val")
    assert reset["calibrated"]["fitted_on"] == reset["selection_split"]["name"] == "validation"
    assert fresh.threshold == pytest.approx(reset["operating_points"]["validation"]["threshold"])
    assert fresh.threshold != pytest.approx(deployed.threshold)  # the test can tell them apart


def centre_cropped_copy(path: str, fraction: float, folder) -> str:
    """The central `fraction` of the film's sides, saved losslessly at its own size."""
    image = Image.open(path).convert("L")
    w, h = image.size
    cw, ch = round(w * fraction), round(h * fraction)
    left, top = (w - cw) // 2, (h - ch) // 2
    folder.mkdir(exist_ok=True)
    out = folder / (Path(path).stem + ".png")
    image.crop((left, top, left + cw, top + ch)).save(out)
    return str(out)


def test_crop_prepares_the_central_part_of_the_film():
    film = Image.new("L", (200, 100), 0)
    film.paste(255, (50, 25, 150, 75))  # a bright centre, half of each side
    centre = prepare(film, 32, crop=0.5)
    assert centre.shape == (1, 32, 32)
    assert (centre[..., 2:-2, 2:-2] == 255).all()  # the edges blend in a little of the outside
    assert centre.float().mean() > 240
    plain = prepare(film, 32)
    assert plain.float().mean() == pytest.approx(255 / 4, rel=0.05)  # the whole film


def test_unreadable_image_is_skipped_and_listed(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not a jpeg")
    samples = read_manifest(run / "split.csv")
    write_manifest(samples + [replace(samples[-1], path=str(broken))], run / "split.csv")
    out = evaluate_run(run, bootstrap=0, figures=False, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 16
    assert [u["path"] for u in metrics["unreadable"]] == [str(broken)]


def test_evaluating_val_is_labelled(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    metrics = json.loads((evaluate_run(run, split="val", bootstrap=0, figures=False,
                                       device="cpu") / "metrics.json").read_text())
    assert metrics["split"] == "val" and "optimistic" in " ".join(metrics["notes"])


def make_three_class_run(data, run):
    """An (untrained) NORMAL/BACTERIA/VIRUS run over the NORMAL/PNEUMONIA `data`."""
    model = create_model("simple_cnn", labels=["BACTERIA", "NORMAL", "VIRUS"])
    model.spec.input_size = 64
    save_model(model, run)
    write_manifest(patient_split(load_source(data).samples), run / "split.csv")
    return run


def test_three_class_run(tiny_kaggle, tmp_path):
    """NORMAL/BACTERIA/VIRUS model on NORMAL/PNEUMONIA data: subtypes from the file names."""
    run = make_three_class_run(tiny_kaggle, tmp_path / "three")
    for option in ({"target_sensitivity": 0.95}, {"framing_threshold": True}):
        with pytest.raises(ValueError, match="which only two-class models have"):
            evaluate_run(run, bootstrap=0, figures=False, device="cpu", **option)
    out = evaluate_run(run, bootstrap=50, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "operating_points" not in metrics and metrics["positive_class"] is None
    assert set(metrics["per_class"]) == {"BACTERIA", "NORMAL", "VIRUS"}
    assert_metric(metrics["accuracy"])
    counts = np.array(metrics["confusion_matrix"]["counts"])
    assert counts.shape == (3, 3) and counts.sum() == 16
    assert counts[2].sum() == 0  # tiny_kaggle has no virus films
    assert (out / "confusion_matrix.png").is_file() and (out / "roc_pr.png").is_file()
    # read as NORMAL against pneumonia too, to compare with two-class runs
    rows = read_rows(out / "predictions.csv")
    abnormal = np.array([r["label"] != "NORMAL" for r in rows])
    called = np.array([r["predicted"] != "NORMAL" for r in rows])
    collapsed = metrics["not_normal"]
    assert collapsed["accuracy"]["value"] == pytest.approx(np.mean(abnormal == called), abs=1e-6)
    assert collapsed["sensitivity"]["value"] == pytest.approx(called[abnormal].mean(), abs=1e-6)
    if collapsed["roc_auc"]["ci95"] == [None, None]:  # an untrained model's constant scores:
        assert "not_normal/roc_auc" in metrics["degenerate_intervals"]  # every resample agreed
        assert any("No 95% interval for" in note for note in metrics["notes"])
    else:
        assert_metric(collapsed["roc_auc"])
    # every proportion's interval holds its Wilson interval (a rate of 0 or 1 on few films
    # is no point): NORMAL against the rest, and each class's sensitivity and PPV
    truth = np.array([r["label"] for r in rows])
    said = np.array([r["predicted"] for r in rows])
    proportions = [(collapsed["specificity"], (~called[~abnormal]).sum(), (~abnormal).sum()),
                   (metrics["accuracy"], (truth == said).sum(), len(rows))]
    for name in ("BACTERIA", "NORMAL"):  # (no VIRUS films: its sensitivity is undefined)
        hits = ((truth == name) & (said == name)).sum()
        passes = ((truth != name) & (said != name)).sum()  # the others, not called this one
        rates = metrics["per_class"][name]
        proportions += [(rates["sensitivity"], hits, (truth == name).sum()),
                        (rates["ppv"], hits, (said == name).sum()),
                        (rates["specificity"], passes, (truth != name).sum()),
                        (rates["npv"], passes, (said != name).sum())]
        assert rates["specificity"]["value"] == pytest.approx(
            passes / (truth != name).sum(), abs=1e-6)
    for entry, k, n in proportions:
        if n:
            low, high = wilson_interval(int(k), int(n))
            assert entry["ci95"][0] <= low + 1e-6 and entry["ci95"][1] >= high - 1e-6, entry
    # the command's table names every class's rates, and no PR-AUC it cannot have
    shown = CliRunner().invoke(app, ["evaluate", str(run), "--bootstrap", "0", "--no-figures",
                                     "--device", "cpu"]).output
    assert "BACTERIA: specificity" in shown and "VIRUS: sensitivity" in shown
    assert "pr_auc" not in shown and "each film its most probable class" in shown
    # its export says no threshold (it said 0.5, which a consumer of model.json might apply)
    sidecar = json.loads((export_model(run).parent / "model.json").read_text())
    assert sidecar["threshold"] is None and sidecar["positive_label"] is None
    # the evaluation names the weights it scored as the export does: one can be joined to
    # the other (two runs of one preset were the same "model" in metrics.json)
    assert metrics["weights_sha256"] == sidecar["weights_sha256"]
    exported, plain = (predict(where, rows[0]["path"])[0] for where in (run / "export", run))
    assert exported.threshold is None and exported.label == plain.label


def test_calibrating_on_another_sites_films_is_validating_on_them(trained_run, tmp_path):
    """--calibrate-on FILMS chooses the operating point the run's validation split would
    choose if it held those films, and fits a bias per class besides the temperature (their
    class mix is the site's); the evaluation goes to its own folder and calibration.json
    follows."""
    site = make_class_folders(tmp_path / "site_b", ["NORMAL", "PNEUMONIA"], n=8)
    run = copy_run(trained_run, tmp_path)
    out = evaluate_run(run, calibrate_on=site, bootstrap=50, figures=False, device="cpu")
    assert out == run / "eval" / "test-calibrated-site_b"
    as_validation = shutil.copytree(trained_run, tmp_path / "as_validation")
    manifest = read_manifest(as_validation / "split.csv")
    write_manifest([s for s in manifest if s.split != "val"]
                   + [replace(s, split="val") for s in load_source(site).samples],
                   as_validation / "split.csv")
    reference = evaluate_run(as_validation, bootstrap=50, figures=False, device="cpu")
    got, expected = (json.loads((f / "metrics.json").read_text()) for f in (out, reference))
    assert got["confusion_matrix"]["counts"] == expected["confusion_matrix"]["counts"]
    assert expected["calibrated"]["bias"] == [] and len(got["calibrated"]["bias"]) == 2
    assert got["calibrated"]["bias"][0] == 0.0  # (these films are separable: the rest is free)
    assert read_calibration(run).bias == got["calibrated"]["bias"]  # deployed with it
    assert str(site) in got["threshold_chosen_on"] and got["calibrated"]["fitted_on"] == str(site)
    assert read_calibration(run).threshold == pytest.approx(got["deployed_threshold"])
    assert read_calibration(run).chosen_with == {"calibrate_on": str(site.resolve())}
    again = evaluate_run(run, bootstrap=0, figures=False, device="cpu")  # re-applied
    assert again == out and read_calibration(run).threshold == pytest.approx(
        got["deployed_threshold"])
    said = "(<code>--calibrate-on</code>), the site this model is deployed to: every result here"
    assert said in build_report(run, evaluate_missing=False).read_text()  # In brief says so
    internal = evaluate_run(run, bootstrap=0, figures=False, device="cpu",
                            reset_calibration=True)
    assert said not in build_report(run, evaluate_missing=False).read_text()
    assert json.loads((internal / "metrics.json").read_text())["deployed_threshold"] != (
        pytest.approx(got["deployed_threshold"]))  # the two choices differ on these films
    assert read_calibration(run).bias == []  # the training site's mix is not learnt
    result = CliRunner().invoke(app, ["evaluate", str(run), "--calibrate-on", str(site),
                                      "--bootstrap", "10", "--no-figures"])
    assert result.exit_code == 0, result.output
    # stdout: the evaluation's folder alone, its name unguessable (a digest of the films)
    [written] = result.stdout.splitlines()
    assert Path(written).parent == (run / "eval").absolute()
    assert (Path(written) / "metrics.json").is_file()
    unwrapped = "".join(result.output.split())  # Rich wraps lines, even inside a path
    assert "".join(f"deployed: Youden's J, chosen on {site}: Youden's J".split()) in unwrapped


def test_calibrating_on_the_evaluated_films_is_refused(trained_run, tmp_path):
    site = make_class_folders(tmp_path / "site_b", ["NORMAL", "PNEUMONIA"], n=4)
    for i, film in enumerate(sorted(site.glob("*/*.png"))):  # Kermany names: patient ids too
        film.rename(film.with_name(f"person{i}_bacteria_{i}.png"))
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ValueError, match="8 films are both in .* the same file") as error:
        evaluate_run(run, data=site, calibrate_on=site, bootstrap=10, figures=False,
                     device="cpu")
    assert "do not evaluate on" in str(error.value)
    assert "--reset-calibration" not in str(error.value)  # asked for now: no hint needed
    code = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(site),
                                    "--calibrate-on", str(site)]).exit_code
    assert code != 0 and not (run / "eval").exists()
    # Deployed from the site's films, then those films evaluated with no option: the choice
    # is re-applied, so refused, and the error names the way out.
    other = make_class_folders(tmp_path / "site_c", ["NORMAL", "PNEUMONIA"], n=4, seed=600)
    evaluate_run(run, data=other, calibrate_on=site, bootstrap=10, figures=False,
                 device="cpu")
    with pytest.raises(ValueError, match="deployed calibration .* --reset-calibration"):
        evaluate_run(run, data=site, bootstrap=10, figures=False, device="cpu")
    assert evaluate_run(run, data=site, bootstrap=10, figures=False, device="cpu",
                        reset_calibration=True).name == "site_b"
    # Copies of the evaluated films, under other names, are the same films
    copies = shutil.copytree(site, tmp_path / "site_b_copy")
    for film in list(copies.rglob("*.png")):
        film.rename(film.with_name(f"copy_{film.name}"))
    with pytest.raises(ValueError, match=r"8 films are both in .*site_b_copy.* the same file or "
                                         r"a byte-identical copy as .*site_b_copy"):
        evaluate_run(run, data=site, calibrate_on=copies, bootstrap=10, figures=False,
                     device="cpu")


def test_on_a_terminal_log_records_are_coloured_lines_never_folded_inside_a_path():
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=40, color_system="standard")
    logger = logging.getLogger("cxrkit.test.terminal")
    logger.addHandler(log_handler(terminal))
    path = "/data/" + "a-long-folder-name/" * 6 + "film.jpeg"
    logger.warning("could not read %s", path)
    written = screen.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", written)
    assert re.fullmatch(rf"\[\d\d:\d\d:\d\d\] WARNING could not read {path}\n", plain)
    assert written != plain  # the level is coloured


def test_cli_evaluate(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)

    def cxr(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, " ".join(result.output.split())  # undo Rich's line wrapping

    code, output = cxr("evaluate", run, "--bootstrap", 20, "--device", "cpu", "--no-figures")
    assert code == 0, output
    # no terminal: each log record one plain line, never wrapped inside its path
    logged = CliRunner().invoke(app, ["evaluate", str(run), "--bootstrap", "0", "--device",
                                      "cpu", "--no-figures"]).stderr.splitlines()
    assert re.search(rf"^\[\d\d:\d\d:\d\d\] INFO wrote {run}/eval/test$", "\n".join(logged),
                     re.MULTILINE), logged
    assert "validation" in output and (run / "eval" / "test" / "metrics.json").is_file()
    code, output = cxr("evaluate", run, "--bootstrap", 0, "--device", "cpu", "--no-figures",
                       "--tta", "--framing")  # their tables beside the plain numbers
    assert code == 0, output
    assert "Test-time augmentation: test (n=16)" in output and "Framing check: test" in output
    assert "Views: " in output  # each table with its note on how to read it, as the report
    assert not list((run / "eval" / "test").glob("*.png"))
    code, output = cxr("evaluate", tmp_path / "nowhere")
    assert code == 2 and "nowhere does not exist" in output
    (tmp_path / "empty").mkdir()
    code, output = cxr("evaluate", tmp_path / "empty")
    assert code == 2 and "not a cxrkit run" in output
    code, output = cxr("evaluate", run, "--split", "train")
    assert code == 2 and "choose test or val" in output
    with pytest.raises(ValueError, match="choose test or val"):  # the API refuses it too
        evaluate_run(run, split="train")
    shutil.rmtree(run / "eval" / "logits")
    code, output = cxr("evaluate", run, "--target-sensitivity", 95)  # meant 95%
    assert code == 2 and "give a fraction in (0, 1], e.g. 0.95 for 95%" in output
    assert not (run / "eval" / "logits").exists()  # said before any film was scored


def test_evaluating_again_reuses_the_logits_until_a_film_or_the_weights_change(trained_run,
                                                                               tmp_path):
    run = copy_run(trained_run, tmp_path)
    cache = run / "eval" / "logits"

    def evaluate(**options) -> dict:
        out = evaluate_run(run, bootstrap=50, figures=False, device="cpu", **options)
        return json.loads((out / "metrics.json").read_text())

    first = evaluate()
    assert len(list(cache.glob("*.npz"))) == 2  # the validation films and the test films
    again = evaluate()
    assert len(list(cache.glob("*.npz"))) == 2  # both read back, nothing scored afresh
    for key in ("roc_auc", "operating_points", "calibrated", "confusion_matrix"):
        assert again[key] == first[key]
    tta = evaluate(tta=True)["tta"]
    assert len(list(cache.glob("*.npz"))) == 4  # the validation and test films' TTA logits
    assert evaluate(tta=True)["tta"] == tta and len(list(cache.glob("*.npz"))) == 4
    val_film = next(s.path for s in read_manifest(run / "split.csv") if s.split == "val")
    Path(val_film).touch()  # a film changed: its split is scored again
    evaluate()
    assert len(list(cache.glob("*.npz"))) == 5
    save_model(load_model(run), run)  # the same weights again (a finished run resumed)
    evaluate()
    assert len(list(cache.glob("*.npz"))) == 5
    model = load_model(run)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_model(model, run)  # new weights: everything is scored again
    latest = evaluate()
    assert len(list(cache.glob("*.npz"))) == 7
    # An evaluation killed while writing leaves whole files or none; a damaged one (cut
    # short, or without its list of unreadable films) is scored again, not a crash
    assert not [p for p in cache.iterdir() if p.suffix not in (".npz", ".json")]
    newest = sorted(cache.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)[-2:]
    newest[0].write_bytes(newest[0].read_bytes()[:100])
    newest[1].with_suffix(".json").unlink()
    assert evaluate()["confusion_matrix"] == latest["confusion_matrix"]
    assert len(list(cache.glob("*.npz"))) == 7 and newest[1].with_suffix(".json").is_file()


def test_films_left_out_are_said_again_when_the_logits_are_read_back(trained_run, tmp_path,
                                                                     caplog):
    run = copy_run(trained_run, tmp_path)
    site = make_class_folders(tmp_path / "site", ["NORMAL", "PNEUMONIA"], n=2)
    (site / "NORMAL" / "cut.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    for _ in range(2):  # scored, then read back from eval/logits/
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="cxrkit.evaluation"):
            evaluate_run(run, data=site, bootstrap=0, figures=False, device="cpu")
        assert "site: skipped unreadable image" in caplog.text and "cut.jpeg" in caplog.text
    assert "read back from" in caplog.text


def test_a_run_copied_with_cp_r_keeps_its_scores(trained_run, tmp_path, caplog):
    """`cp -r` gives the weights a new time: the key held it, and a copy scored every film
    again (2 min 55 s against 12 s for `quick`). Other weights still score afresh."""
    run = copy_run(trained_run, tmp_path)
    evaluate_run(run, bootstrap=0, figures=False, device="cpu")
    copied = shutil.copytree(run, tmp_path / "copied", copy_function=shutil.copy)  # new times
    with caplog.at_level(logging.DEBUG, logger="cxrkit.evaluation"):
        evaluate_run(copied, bootstrap=0, figures=False, device="cpu")
    assert [r.getMessage().split(":")[0].split()[-1] for r in caplog.records
            if "read back from" in r.getMessage()] == ["val", "test"]  # none scored again
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), copied)  # retrained
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="cxrkit.evaluation"):
        evaluate_run(copied, bootstrap=0, figures=False, device="cpu")
    assert "read back from" not in caplog.text


def test_external_data_that_holds_the_runs_own_films_or_no_patient_ids_says_so(
        trained_run, tiny_kaggle, tmp_path):
    run = copy_run(trained_run, tmp_path)
    site = make_class_folders(tmp_path / "site", ["NORMAL", "PNEUMONIA"], n=2)
    for label in ("NORMAL", "PNEUMONIA"):  # a test film of the run's, copied under a new name
        own = sorted((tiny_kaggle / "test" / label).iterdir())[0]
        shutil.copy(own, site / label / f"copied{own.suffix}")
    notes = json.loads((evaluate_run(run, data=site, bootstrap=0, figures=False,
                                     device="cpu") / "metrics.json").read_text())["notes"]
    assert ("2 of these 6 films are files of the run's own data (test 2): this is not "
            "independent external data.") in notes
    assert any(n.startswith("No patient id could be read from the file names") for n in notes)
    # Kermany names carry patient ids; films of no run: neither note
    other = make_kaggle_tree(tmp_path / "other", {"train": 2, "test": 2}, seed=7)
    notes = json.loads((evaluate_run(run, data=other, bootstrap=0, figures=False,
                                     device="cpu") / "metrics.json").read_text())["notes"]
    assert not any("own data" in n or "patient id" in n for n in notes), notes


def test_test_patients_seen_in_training_are_noted(trained_run, tmp_path, caplog):
    run = copy_run(trained_run, tmp_path)
    samples = read_manifest(run / "split.csv")
    train_patient = next(s.patient_id for s in samples if s.split == "train")
    first_test = next(i for i, s in enumerate(samples) if s.split == "test")
    samples[first_test] = replace(samples[first_test], patient_id=train_patient)
    write_manifest(samples, run / "split.csv")
    out = evaluate_run(run, bootstrap=0, figures=False, device="cpu")
    said = f"1 patient id(s) of the test split also occur in train or val (e.g. {train_patient})"
    metrics = json.loads((out / "metrics.json").read_text())
    assert any(n.startswith(said) for n in metrics["notes"])
    assert said not in caplog.text  # a note `cxr evaluate` prints: not a warning again too
    # the same numbers on the films of the test patients not seen in training, beside them
    rows = [r for r in read_rows(out / "predictions.csv") if r["patient_id"] != train_patient]
    unseen = metrics["unseen_patients"]
    assert unseen["n"] == len(rows) == metrics["n"] - 1
    deployed = unseen["operating_points"]["validation"]
    assert deployed["accuracy"]["value"] == pytest.approx(
        np.mean([r["correct"] == "1" for r in rows]), abs=1e-6)
    # and on the films of the shared id, so that each class's rate compares across the two
    seen = metrics["seen_patients"]
    label = samples[first_test].label
    assert seen["n"] == 1 and seen["n_per_class"][label] == 1
    assert sum(unseen["n_per_class"].values()) == unseen["n"]
    page = " ".join(build_report(run).read_text().split())
    assert f"Test patients not in train or val ({unseen['n']} of {metrics['n']} films)" in page
    assert "ids also in train or val (1 film: " in page
    other = next(c for c in seen["n_per_class"] if c != label)
    assert f"No {other} film belongs to a shared id: that rate can only be read" in page
    caplog.clear()
    evaluate_run(run, split="val", bootstrap=0, figures=False, device="cpu")
    assert said not in caplog.text  # a note of the test split's numbers only


def test_the_same_site_named_relatively_is_the_same_choice(trained_run, tmp_path, caplog,
                                                           monkeypatch):
    site = make_class_folders(tmp_path / "site_b", ["NORMAL", "PNEUMONIA"], n=6)
    run = copy_run(trained_run, tmp_path)
    evaluate_run(run, calibrate_on=site, bootstrap=0, figures=False, device="cpu")
    caplog.clear()
    monkeypatch.chdir(tmp_path)
    evaluate_run(run, calibrate_on="site_b", bootstrap=0, figures=False, device="cpu")
    assert "deployed operating point changed" not in caplog.text
    assert read_calibration(run).chosen_on.startswith(str(site))  # named absolutely
    # and the films of data given relatively are named absolutely, as split.csv names the
    # test films (a file joined on `path` found none of them)
    out = evaluate_run(run, data="site_b", reset_calibration=True, bootstrap=0, figures=False,
                       device="cpu")
    paths = [row["path"] for row in read_predictions(out)]
    assert len(paths) == 12 and all(p.startswith(f"{site}/") for p in paths)


def test_calibrating_on_other_films_of_the_evaluated_patients_is_refused(trained_run, tmp_path):
    """Re-saved films (other bytes, the same patients) are not new evidence either."""
    def site(name: str, seed: int) -> Path:
        for label, stem in (("NORMAL", "IM-{:04d}-0001"), ("PNEUMONIA", "person{}_bacteria_1")):
            (tmp_path / name / label).mkdir(parents=True)
            for i in range(4):
                synthetic_film(label, seed + i).save(tmp_path / name / label /
                                                     f"{stem.format(i + 1)}.png")
        return tmp_path / name
    evaluated, resaved = site("site_eval", 700), site("site_resaved", 800)
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ValueError, match=r"8 patient\(s\) have films both in .*site_resaved.* "
                                         r"choose on other patients' films"):
        evaluate_run(run, data=evaluated, calibrate_on=resaved, bootstrap=0, figures=False,
                     device="cpu")


def test_a_patient_id_read_from_a_name_is_told_from_the_fallback_path():
    def film(path: str, patient: str) -> Sample:
        return Sample(path, "NORMAL", "test", patient)

    assert has_parsed_patient(film("/d/cxr_12345.png", "12345"))  # a rule read it
    assert has_parsed_patient(film("/d/NORMAL/img_17.png", "7"))
    assert not has_parsed_patient(film("/d/NORMAL/film0.png", "NORMAL/film0"))  # the fallback
    assert not has_parsed_patient(film("/d/NORMAL/1.2.840.0001", "NORMAL/1.2.840.0001"))
    assert not has_parsed_patient(film("/d/NORMAL/a.png", ""))


def test_the_worst_mistakes_shown_include_each_kind():
    """At a high threshold every false positive is more confident than any false negative:
    ranked all together, the figures never showed a false negative."""
    from cxrkit.evaluation.evaluate import worst_mistakes

    y = np.array([1] * 5 + [0] * 20 + [1] * 3)  # 5 false negatives, 20 false positives, 3 right
    predicted = np.array([0] * 5 + [1] * 20 + [1] * 3)
    confidence = np.r_[[0.6, 0.7, 0.55, 0.8, 0.5], np.linspace(0.81, 0.99, 20), [0.9] * 3]
    shown = worst_mistakes(y, predicted, confidence, 8)
    assert list(y[shown]) == [0] * 4 + [1] * 4  # four of each kind, grouped
    assert list(confidence[shown]) == [*np.linspace(0.81, 0.99, 20)[::-1][:4], 0.8, 0.7, 0.6,
                                       0.55]  # each kind's most confident first
    assert len(worst_mistakes(y, predicted, confidence, 100)) == 25  # every mistake, no more


def test_evaluation_intervals_resample_patients(trained_run, tmp_path):
    """metrics.json's intervals are the patient-level bootstrap's (films resampled alone
    give narrower, wrong ones: a patient's films are not independent)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    out = evaluate_run(run, bootstrap=200, seed=0, figures=False, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    y = np.array([r["label"] == "PNEUMONIA" for r in rows])
    p = np.array([float(r["p_PNEUMONIA"]) for r in rows])
    groups = [r["patient_id"] for r in rows]
    assert len(set(groups)) < len(groups)  # several films per patient
    expected = with_ci(lambda w: ranking_metrics(y, p, w), groups, 200, seed=0)["roc_auc"]
    assert metrics["roc_auc"]["ci95"] == expected["ci95"]


def test_tta_averages_the_plain_film_and_each_view_and_the_views_do_as_named(trained_run,
                                                                            tiny_kaggle):
    from cxrkit.evaluation.tta import center_zoom, shift

    model = load_model(trained_run)
    paths = sorted(str(p) for p in (tiny_kaggle / "test").glob("*/*.jpeg"))[:4]
    plain, _ = predict_logits(model, paths, device="cpu")
    with_blank, _ = predict_logits(model, paths, views=[torch.zeros_like], device="cpu")
    size = model.spec.input_size
    with torch.no_grad():
        blank = model.eval()(torch.zeros(1, model.spec.in_chans, size, size)).numpy()
    np.testing.assert_allclose(with_blank, (plain + blank) / 2, atol=1e-5)
    centre = torch.zeros(1, 1, 8, 8)
    centre[..., 2:6, 2:6] = 1.0
    assert torch.equal(center_zoom(0.5)(centre), torch.ones(1, 1, 8, 8))  # the centre, whole
    ramp = torch.arange(8.0).repeat(1, 1, 8, 1)  # columns 0..7
    moved = shift(0.25, 0)(ramp)  # right by 2 columns, the left edge repeated
    assert moved[0, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]


def test_a_figures_film_keeps_its_shape(tmp_path):
    """The report's Grad-CAM and worst-error tiles were the model's square input: a 300 x 200
    film's anatomy squashed, in the figures a paper takes."""
    from PIL import Image

    from cxrkit.evaluation.evaluate import shown_film

    wide = np.tile(np.linspace(100, 110, 300).astype(np.uint8), (200, 1))  # low contrast
    Image.fromarray(wide).save(tmp_path / "wide.png")
    shown = shown_film(str(tmp_path / "wide.png"), 96, equalize=False)
    assert shown.size == (96, 64) and shown.mode == "L"
    assert np.ptp(np.asarray(shown)) <= 10
    equalised = np.asarray(shown_film(str(tmp_path / "wide.png"), 96, equalize=True))
    assert equalised.shape == (64, 96) and np.ptp(equalised) > 200  # as the model read it


def test_a_run_of_data_without_a_test_split_says_how_to_evaluate_it(trained_run, tmp_path):
    """Trained on class folders (no splits): `cxr evaluate RUN` said only that split.csv had
    no 'test' images."""
    run = copy_run(trained_run, tmp_path)
    rows = [s for s in read_manifest(run / "split.csv") if s.split != "test"]
    write_manifest(rows, run / "split.csv")
    with pytest.raises(ValueError, match=r"has no 'test' images \(it has \['train', 'val'\]\): "
                                         r"its data had no test split\. Evaluate on other "
                                         r"labelled films, `cxr evaluate .* --data OTHER_FILMS`"):
        evaluate_run(run, bootstrap=0, figures=False, device="cpu")


def test_one_process_evaluates_a_run_at_a_time(trained_run, tmp_path):
    """Two evaluations at once chose and wrote calibration.json and eval/ over each other:
    one's deployed threshold beside the other's metrics, both exiting 0."""
    import fcntl

    run = copy_run(trained_run, tmp_path)
    with open(run / ".evaluation.lock", "a", encoding="utf-8") as held:  # another process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match=r"is being evaluated by another process "
                                                  r"now: wait for it to end"):
            evaluate_run(run, bootstrap=0, figures=False, device="cpu")
        assert not (run / "eval" / "test").exists()
    assert (evaluate_run(run, bootstrap=0, figures=False, device="cpu") /
            "metrics.json").is_file()  # once it is let go


def test_an_older_cxrkits_calibration_keeps_the_rule_its_words_record(trained_run, tmp_path):
    """Before `chosen_with`, calibration.json said its rule in `chosen_on` alone: evaluating
    the run again (`cxr report`) deployed Youden's J in place of a sensitivity target."""
    from cxrkit.evaluation.evaluate import deployed_options

    run = copy_run(trained_run, tmp_path)
    for chosen_on, options in (("validation: sensitivity >= 0.95", (0.95, False, None)),
                               ("validation as filmed and framed 85%: Youden's J",
                                (None, True, None)),
                               ("validation: Youden's J", (None, False, None)),
                               ("val: Youden's J", (None, False, None))):
        (run / "calibration.json").write_text(json.dumps(
            {"threshold": 0.46, "temperature": 1.2, "chosen_on": chosen_on}))  # no chosen_with
        assert deployed_options(run) == options
    (run / "calibration.json").write_text(json.dumps(
        {"threshold": 0.46, "temperature": 1.2, "chosen_on": "site_b: Youden's J"}))
    with pytest.raises(ValueError, match=r"chosen on site_b .* by an older cxrkit, which did "
                                         r"not record where those films are: evaluate with "
                                         r"--calibrate-on FILMS .* or --reset-calibration"):
        evaluate_run(run, bootstrap=0, figures=False)
