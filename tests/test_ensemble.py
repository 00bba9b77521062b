"""Ensembles: the averaged model, its run folder, training its members, exporting it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.config import ConfigError, TrainConfig
from cxrkit.data.split import read_manifest
from cxrkit.evaluation import evaluate_run
from cxrkit.export import export_model
from cxrkit.inference import predict_logits
from cxrkit.models import create_model
from cxrkit.models.ensemble import Ensemble
from cxrkit.provenance import read_attempts
from cxrkit.report import build_report
from cxrkit.runs import load_model, save_model
from cxrkit.training import train
from cxrkit.training.fit import member_config
from tests.test_training import TINY, tiny_config

LABELS = ["NORMAL", "PNEUMONIA"]


def _two_sizes() -> Ensemble:
    """Two small CNNs, the second trained (here: built) for 48-pixel films."""
    torch.manual_seed(0)
    first = create_model("simple_cnn", labels=LABELS)
    second = create_model("simple_cnn", labels=LABELS)
    first.spec.input_size, second.spec.input_size = 32, 48
    return Ensemble([first, second]).eval()


def test_ensemble_averages_member_probabilities_each_at_its_own_size():
    model = _two_sizes()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        first = model.members[0](x).softmax(1)
        upsized = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear")
        second = model.members[1](upsized).softmax(1)
    assert model.spec.input_size == 32 and model.spec.labels == LABELS
    torch.testing.assert_close(out.softmax(1), (first + second) / 2)
    assert not torch.allclose(first, second)  # two different opinions were averaged


def test_members_that_read_films_differently_are_refused():
    lite = create_model("efficientnet_lite0", pretrained=False, labels=LABELS)
    cnn = create_model("simple_cnn", labels=LABELS)
    with pytest.raises(ValueError, match="must read films the same way"):
        Ensemble([cnn, lite])
    # same films, another finding: their thresholds would be about different classes
    labels = ["ABNORMAL", "NORMAL"]
    new, old = (create_model("simple_cnn", labels=labels) for _ in range(2))
    old.spec.positive_label = None  # a run saved before the finding was recorded: NORMAL
    with pytest.raises(ValueError, match="must read films the same way .*'ABNORMAL'\\).* "
                                         "differs from .*'NORMAL'\\)"):
        Ensemble([old, new])


def test_ensemble_run_folder_round_trips_and_exports_to_onnx(tmp_path):
    model = _two_sizes()
    save_model(model, tmp_path / "run")
    described = json.loads((tmp_path / "run" / "model.json").read_text())
    assert [m["input_size"] for m in described["members"]] == [32, 48]
    loaded = load_model(tmp_path / "run")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    onnx_file = export_model(tmp_path / "run", out=tmp_path / "export")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    batch = torch.rand(5, 1, 32, 32)
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(batch).numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def ensemble_run(tiny_kaggle, tmp_path_factory):
    """Two small CNNs trained with the `scratch` recipe on the same split, seeds 0 and 1."""
    tmp = tmp_path_factory.mktemp("ensemble")
    return train(tiny_config(tiny_kaggle, tmp, **{
        "model.ensemble_with": ["simple_cnn"], "stages.0.epochs": 2, "stages.0.batch_size": 8}))


def test_training_an_ensemble_trains_each_member_on_the_runs_split(ensemble_run):
    members = sorted((ensemble_run / "members").iterdir())
    assert [m.name for m in members] == ["0-simple_cnn", "1-simple_cnn"]
    split = read_manifest(ensemble_run / "split.csv")
    for member in members:
        assert read_manifest(member / "split.csv") == split
        assert json.loads((member / "stages.json").read_text())["train"]["epochs"] == 2
    assert [TrainConfig.load(m / "config.yaml").seed for m in members] == [0, 1]
    model = load_model(ensemble_run)
    assert isinstance(model, Ensemble)
    val = [s.path for s in split if s.split == "val"]
    logits, _ = predict_logits(model, val, batch_size=8)
    member_probs = [torch.from_numpy(predict_logits(load_model(m), val, 8)[0]).softmax(1)
                    for m in members]
    assert not torch.allclose(member_probs[0], member_probs[1])  # different seeds, weights
    torch.testing.assert_close(torch.from_numpy(logits).softmax(1),
                               (member_probs[0] + member_probs[1]) / 2, rtol=1e-4, atol=1e-5)
    metrics = json.loads((ensemble_run / "val_metrics.json").read_text())
    assert metrics["members"] == ["members/0-simple_cnn", "members/1-simple_cnn"]
    assert metrics["images"] == len(val)
    # what trained it: every member's attempts, each marked (the model card reads them)
    attempts = read_attempts(ensemble_run)
    assert [a["member"] for a in attempts] == ["0-simple_cnn", "1-simple_cnn"]


def test_an_ensemble_is_evaluated_like_any_run(ensemble_run):
    folder = evaluate_run(ensemble_run, "test")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["roc_auc"]["value"] <= 1
    assert (ensemble_run / "calibration.json").is_file()
    assert list(folder.glob("*gradcam*.png"))  # through the first member's last conv layer
    report = build_report(ensemble_run, split="test").read_text()
    assert "members/0-simple_cnn" in report and "members/1-simple_cnn" in report


def test_a_resumed_ensemble_keeps_its_finished_members(ensemble_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ensemble_run, run)
    first = run / "members" / "0-simple_cnn" / "model.safetensors"
    stamp = first.stat().st_mtime_ns
    shutil.rmtree(run / "members" / "1-simple_cnn")  # killed before the second member
    (run / "model.safetensors").unlink()
    assert train(resume=run) == run
    assert first.stat().st_mtime_ns == stamp
    assert (run / "members" / "1-simple_cnn" / "model.safetensors").is_file()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(run)(x), load_model(ensemble_run)(x))
    config = (run / "config.yaml").read_text()  # edited since: no longer what trained it
    (run / "config.yaml").write_text(config.replace("dropout: 0.3", "dropout: 0.1", 1))
    with pytest.raises(ConfigError, match=r"changed since its member 0-simple_cnn started "
                                          r"\(model.dropout\)"):
        train(resume=run)


def test_every_member_trains_at_the_size_the_ensemble_gives_it(tmp_path):
    """Lite2 (260 px) beside Lite0 (224): films are prepared at 224 for both, so Lite2 trains
    at 224 too (at 260 it learnt on other pixels than the ensemble's bilinear resample)."""
    mixed = TrainConfig.preset("quick", overrides={
        "model.name": "efficientnet_lite0", "model.ensemble_with": ["efficientnet_lite2"]})
    lite2 = member_config(mixed, 1, "efficientnet_lite2", tmp_path / "1-efficientnet_lite2")
    assert lite2.model.name == "efficientnet_lite2" and lite2.model.input_size == 224
    assert member_config(mixed, 0, "efficientnet_lite0", tmp_path / "0").model.input_size is None
    chosen = mixed.updated({"model.input_size": 256})  # a size asked for applies to all
    assert member_config(chosen, 1, "efficientnet_lite2", tmp_path / "1").model.input_size == 256
    # a member started at its own size (before this rule) resumes as it started: its run was
    # refused as edited, though nothing had been
    before = lite2.updated({"model.input_size": None})
    assert member_config(mixed, 1, "efficientnet_lite2", tmp_path / "1",
                         started=before).model.input_size is None
    # a model made for one size only keeps it (a ViT trained at 260 px failed mid-run)
    vit = TrainConfig.preset("quick", overrides={
        "model.name": "efficientnet_lite2", "model.ensemble_with": ["timm:vit_tiny_patch16_224"]})
    assert member_config(vit, 1, "timm:vit_tiny_patch16_224",
                         tmp_path / "1").model.input_size is None


def test_members_that_cannot_share_an_input_fail_before_training(tiny_kaggle, tmp_path):
    config = tiny_config(tiny_kaggle, tmp_path, "quick", **{
        "model.ensemble_with": ["efficientnet_lite0"], "model.pretrained": False})
    with pytest.raises(ConfigError, match=r"read films the same way.*ensemble_with=\[\]"):
        train(config)
    assert not list((tmp_path / "runs").glob("*/members/*/stages.json"))


def test_cli_trains_an_ensemble_and_says_so(tiny_kaggle, tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--data", str(tiny_kaggle), "--preset", "default", "--epochs", "1",
        "--runs-dir", str(tmp_path / "runs"), *[f"--set={k}={v}" for k, v in TINY.items()],
        f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=model.ensemble_with=[simple_cnn]"])
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 members" in result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    assert isinstance(load_model(run), Ensemble)
