"""The records of one model must agree: its weights, model.json, the calibration chosen for
them, and an export of them. One replaced or edited by hand is refused with the fix, never
applied to the others unnoticed."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cxrkit.evaluation import evaluate_run
from cxrkit.evaluation.results import at_calibration
from cxrkit.export import export_model
from cxrkit.models import weights_digest
from cxrkit.onnx_backend import load_onnx
from cxrkit.predict import Predictor
from cxrkit.runs import (
    CALIBRATION,
    METRICS,
    Calibration,
    load_model,
    read_calibration,
    save_model,
    write_calibration,
)


def replace_weights(run):
    """Other weights in RUN/model.safetensors, as a file copied over it would leave them."""
    model = load_model(run)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    save_model(model, run)
    return weights_digest(model)


def test_an_evaluation_binds_the_calibration_to_the_weights_it_chose_it_for(trained_run,
                                                                          tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    evaluation = evaluate_run(run, split="val", bootstrap=0, figures=False)
    digest = weights_digest(load_model(run))
    metrics = json.loads((evaluation / METRICS).read_text(encoding="utf-8"))
    assert read_calibration(run).weights_sha256 == metrics["weights_sha256"] == digest
    assert metrics["libraries"]["torch"] == torch.__version__  # which code scored the films
    assert at_calibration(metrics, read_calibration(run))
    chosen_for_others = Calibration(**{**read_calibration(run).to_dict(),
                                       "weights_sha256": "0" * 64})
    assert not at_calibration(metrics, chosen_for_others)  # `cxr report` evaluates again


def test_weights_replaced_since_their_evaluation_are_refused_by_predict_and_export(
        trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    chosen_for = weights_digest(load_model(run))
    write_calibration(run, Calibration(0.3, 1.2, "val", weights_sha256=chosen_for))
    assert Predictor.load(run).calibration.threshold == 0.3  # its own weights
    replace_weights(run)
    for use in (lambda: Predictor.load(run), lambda: export_model(run)):
        with pytest.raises(ValueError, match=r"the deployed calibration was chosen for other "
                                             r"weights than .*model.safetensors holds \(sha256 "
                                             rf"{chosen_for[:12]}\.\.\. against .*`cxr evaluate "):
            use()
    # a calibration of an older cxrkit names no weights: used as before
    write_calibration(run, Calibration(0.3, 1.2, "val"))
    assert Predictor.load(run).calibration.threshold == 0.3


def test_a_runs_export_of_other_weights_than_its_calibration_is_refused(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    write_calibration(run, Calibration(0.3, 1.2, "val",
                                       weights_sha256=weights_digest(load_model(run))))
    export_model(run)
    assert Predictor.load(run, backend="onnx").calibration.threshold == 0.3
    new = replace_weights(run)
    write_calibration(run, Calibration(0.6, 1.0, "val", weights_sha256=new))  # re-evaluated
    with pytest.raises(ValueError, match=r"other weights than .*export/model.onnx holds .* "
                                         r"`cxr export .*` exports them anew"):
        Predictor.load(run, backend="onnx")


def test_a_server_keeps_the_calibration_of_the_model_it_loaded(trained_run, tmp_path, caplog):
    """Weights replaced and evaluated under a running server: it went on with its old
    weights in memory under the new weights' temperature and threshold, a mix nothing had
    evaluated."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    loaded = weights_digest(load_model(run))
    write_calibration(run, Calibration(0.3, 1.2, "val", weights_sha256=loaded))
    predictor = Predictor.load(run)
    new = replace_weights(run)
    write_calibration(run, Calibration(0.6, 5.0, "val", weights_sha256=new))
    with caplog.at_level(logging.ERROR, logger="cxrkit.predict"):
        predictor.follow_calibration()
    assert (predictor.calibration.threshold, predictor.calibration.temperature) == (0.3, 1.2)
    assert "keeping the calibration of the model served; restart the server" in caplog.text
    write_calibration(run, Calibration(0.45, 1.1, "val", weights_sha256=loaded))  # its own
    predictor.follow_calibration()
    assert predictor.calibration.threshold == 0.45


def test_a_model_json_that_is_not_the_weights_own_is_refused(trained_run, tmp_path):
    """Its labels swapped by hand called every NORMAL film PNEUMONIA, labels.json beside it
    still saying otherwise."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    described = json.loads((run / "model.json").read_text(encoding="utf-8"))
    (run / "model.json").write_text(json.dumps({**described,
                                                "labels": described["labels"][::-1]}))
    with pytest.raises(ValueError, match=r"model.json is not the one .*model.safetensors was "
                                         r"saved with .* Put the run's own model.json back"):
        load_model(run)
    with pytest.raises(ValueError, match="is not the one"):
        Predictor.load(run)
    # weights saved by an older cxrkit carry no model.json: read as before
    save_file(load_file(run / "model.safetensors"), run / "model.safetensors")
    assert load_model(run).spec.labels == described["labels"][::-1]


def test_an_exports_model_json_must_be_the_one_inside_its_model_file(trained_run, tmp_path,
                                                                   caplog):
    run = shutil.copytree(trained_run, tmp_path / "run")
    write_calibration(run, Calibration(0.3, 1.2, "val"))
    export = export_model(run).parent
    edited = shutil.copytree(export, tmp_path / "edited")
    sidecar = json.loads((edited / "model.json").read_text(encoding="utf-8"))
    (edited / "model.json").write_text(json.dumps({**sidecar, "labels": ["PNEUMONIA",
                                                                          "NORMAL"]}))
    with pytest.raises(ValueError, match=r"model.json and .*model.onnx disagree on labels "
                                         r"\(e.g. labels: \['PNEUMONIA', 'NORMAL'\] beside, "
                                         r"\['NORMAL', 'PNEUMONIA'\] inside the model\): "
                                         r"model.json was edited, or comes from another export"):
        Predictor.load(edited)
    # a calibration alone other than the embedded one (an export a cxrkit of 0f9a7de..9f0551e
    # updated after a recalibration, model.onnx's copy left behind): said, model.json's used
    (edited / "model.json").write_text(json.dumps({**sidecar, "threshold": 0.05}))
    with caplog.at_level(logging.WARNING, logger="cxrkit.onnx_backend"):
        assert Predictor.load(edited).calibration.threshold == 0.05
    assert "disagree on threshold (e.g. threshold: 0.05 beside, 0.3 inside the model): using " \
           "model.json's" in caplog.text
    other = shutil.copytree(run, tmp_path / "other")  # another model's file in the folder
    replace_weights(other)
    (other / CALIBRATION).unlink()
    shutil.copy(export_model(other).parent / "model.onnx", edited / "model.onnx")
    (edited / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match=r"disagree on .*weights_sha256"):
        load_onnx(edited)


def test_report_and_compare_evaluate_again_where_the_weights_were_replaced(trained_run,
                                                                        tmp_path):
    """The calibration and the evaluation named the same (old) weights, so both looked
    current: the report showed the old model's numbers and digest for the new one."""
    from cxrkit.evaluation.results import ensure_evaluated

    run = shutil.copytree(trained_run, tmp_path / "run")
    first = json.loads((ensure_evaluated(run) / METRICS).read_text(encoding="utf-8"))
    assert json.loads((ensure_evaluated(run) / METRICS).read_text()) == first  # current
    new = replace_weights(run)
    again = json.loads((ensure_evaluated(run) / METRICS).read_text(encoding="utf-8"))
    assert again["weights_sha256"] == new != first["weights_sha256"]
    assert read_calibration(run).weights_sha256 == new  # and predict takes the run again
    assert Predictor.load(run).calibration.weights_sha256 == new
