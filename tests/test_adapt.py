"""BatchNorm adaptation re-estimates statistics on target images, without labels."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from typer.testing import CliRunner

from cxrkit.adapt import adapt_batchnorm, adapt_run, is_transductive, target_images
from cxrkit.cli import app
from cxrkit.data.transforms import ModelInput
from cxrkit.evaluation import evaluate_run
from cxrkit.evaluation.evaluate import deployed_options
from cxrkit.inference import file_batches
from cxrkit.models import create_model
from cxrkit.provenance import read_attempts, record_attempt
from cxrkit.report import build_report
from cxrkit.runs import Calibration, load_model, save_model, write_calibration
from tests.conftest import make_kaggle_tree


def _first_bn_input_mean(model, paths):
    """Per-channel mean of the first conv's output over all target images."""
    conv = model.backbone.blocks[0][0]
    outs = [conv(ModelInput(model.spec)(x)) for x, *_ in file_batches(model.spec, paths, 8)]
    return torch.cat(outs).mean(dim=(0, 2, 3))


def test_adapted_statistics_are_the_target_statistics(tmp_path):
    target = make_kaggle_tree(tmp_path / "target", {"test": 6})
    paths = target_images(target, "test")
    assert len(paths) == 12
    model = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"])
    before = model.backbone.blocks[0][1].running_mean.clone()
    adapted, read = adapt_batchnorm(model, paths, batch_size=4, device="cpu")  # equal batches
    assert read == len(paths)
    bn = adapted.backbone.blocks[0][1]
    with torch.no_grad():
        expected = _first_bn_input_mean(adapted, paths)
    assert not torch.allclose(bn.running_mean, before)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-3, atol=1e-4)
    assert not adapted.training


def test_a_model_without_batchnorm_is_refused_not_blamed_on_the_films(tmp_path):
    """LayerNorm models (ConvNeXt, ViT) have nothing to re-estimate; update_bn then reads no
    film, and the films were said to be unreadable."""
    target = make_kaggle_tree(tmp_path / "target", {"test": 2})
    model = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"])
    for block in model.backbone.blocks:
        for i, layer in enumerate(block):
            if isinstance(layer, torch.nn.BatchNorm2d):
                block[i] = torch.nn.Identity()
    with pytest.raises(ValueError, match="simple_cnn has no BatchNorm layers, so no statistics "
                                         "to re-estimate"):
        adapt_batchnorm(model, target_images(target, "test"), device="cpu")


def test_adapt_run_writes_a_new_run_and_reads_no_labels(tmp_path):
    run = tmp_path / "run"
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), run)
    # Target images in a folder whose class names are meaningless: labels are never used.
    target = make_kaggle_tree(tmp_path / "site", {"test": 4})
    (target / "test" / "NORMAL").rename(target / "test" / "unknown_a")
    (target / "test" / "PNEUMONIA").rename(target / "test" / "unknown_b")
    out = adapt_run(run, target / "test", split="test")  # (the CLI's default split)
    assert out == tmp_path / "run-adapted"
    info = json.loads((out / "adaptation.json").read_text())
    assert info["n_images"] == 8 and info["labels_used"] is False
    assert info["target_split"] is None  # a plain folder has no splits: all of it was read
    original, adapted = load_model(run), load_model(out)
    assert not torch.allclose(original.backbone.blocks[0][1].running_var,
                              adapted.backbone.blocks[0][1].running_var)


def _run_best_from_head(folder, config_yaml: str):
    """A run folder whose best model came from a stage named `head`, trained with config_yaml."""
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), folder)
    (folder / "config.yaml").write_text(config_yaml)
    (folder / "val_metrics.json").write_text(json.dumps({"best_stage": "head"}))
    return folder


FROZEN_HEAD = "stages:\n- {name: head, unfreeze: none}\n- {name: finetune, unfreeze: all}\n"


def test_adapting_a_frozen_backbone_run_warns(tmp_path, caplog):
    run = _run_best_from_head(tmp_path / "run", FROZEN_HEAD)
    target = make_kaggle_tree(tmp_path / "site", {"train": 2, "test": 2})
    out = adapt_run(run, target, split="test")
    assert "frozen-backbone stage 'head'" in caplog.text
    assert "ImageNet" in json.loads((out / "adaptation.json").read_text())["warning"]
    (run / "val_metrics.json").write_text(json.dumps({"best_stage": "finetune"}))
    again = adapt_run(run, target, "test", out=tmp_path / "again")
    warning = json.loads((again / "adaptation.json").read_text())["warning"]
    assert "ImageNet" not in warning and "only 4 target film(s) read" in warning  # a tiny site


def test_adapting_on_a_few_films_warns_and_enough_do_not(tmp_path, caplog, monkeypatch):
    run = tmp_path / "run"
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), run)
    target = make_kaggle_tree(tmp_path / "site", {"train": 1, "test": 4})
    out = adapt_run(run, target, split="test")
    assert json.loads((out / "adaptation.json").read_text())["target_split"] == "test"
    assert "only 8 target film(s) read" in caplog.text
    assert "fewer than 100 films" in json.loads((out / "adaptation.json").read_text())["warning"]
    monkeypatch.setattr("cxrkit.adapt.MIN_TARGET_IMAGES", 8)
    again = adapt_run(run, target, "test", out=tmp_path / "again")
    assert json.loads((again / "adaptation.json").read_text())["warning"] is None


def test_adapt_never_overwrites_a_run_nor_adapts_on_films_it_cannot_read(tmp_path, caplog):
    run = tmp_path / "run"
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), run)
    write_calibration(run, Calibration(0.3, 1.5, "validation: sensitivity >= 0.9",
                                       chosen_with={"target_sensitivity": 0.9}))
    weights = (run / "model.safetensors").read_bytes()
    target = make_kaggle_tree(tmp_path / "site", {"train": 2, "test": 2})
    adapted = adapt_run(run, target, "test")
    # its logits differ: the source's operating point is not carried over, but chosen again
    assert not (adapted / "calibration.json").exists()
    assert deployed_options(adapted) == (0.9, False, None)  # chosen again the source's way
    # once chosen afresh (--reset-calibration: Youden's J), kept so, not the source's again
    write_calibration(adapted, Calibration(0.5, 1.0, "validation: Youden's J"))
    assert deployed_options(adapted) == (None, False, None)
    assert not list(run.glob(".calibration.json.*"))  # written whole, nothing left beside
    assert Path(json.loads((adapted / "adaptation.json").read_text())["target_data"]).is_absolute()
    for out in (run, adapted):  # the source run, an earlier adaptation
        with pytest.raises(FileExistsError, match="already holds a run: .* give another --out"):
            adapt_run(run, target, "test", out=out)
    assert (run / "model.safetensors").read_bytes() == weights
    fake = tmp_path / "fake"
    fake.mkdir()
    for i in range(3):
        (fake / f"film{i}.jpeg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"none of the 3 files to adapt on can be read as a "
                                         r"film \(e.g. .*film0.jpeg"):
        adapt_run(run, fake, split=None, out=tmp_path / "from_fake")
    assert not (tmp_path / "from_fake").exists()
    model = load_model(run)
    before = model.state_dict()["backbone.blocks.0.1.running_mean"].clone()
    with pytest.raises(ValueError, match="no films to adapt on"):
        adapt_batchnorm(model, [])
    assert torch.equal(model.state_dict()["backbone.blocks.0.1.running_mean"], before)
    with pytest.raises(ValueError, match="has the splits train, test, no 'val'"):
        adapt_run(run, target, split="val", out=tmp_path / "from_val")
    shutil.copy(target / "test" / "NORMAL" / next(iter(sorted(
        p.name for p in (target / "test" / "NORMAL").iterdir()))), fake / "real.jpeg")
    out = adapt_run(run, fake, split=None, out=tmp_path / "one_real")
    assert json.loads((out / "adaptation.json").read_text())["n_images"] == 1
    assert "3 of the 4 files could not be read and were left out" in caplog.text


def test_adapting_an_ensemble_judges_its_members(tmp_path, caplog):
    run = tmp_path / "run"
    _run_best_from_head(run / "members" / "0-simple_cnn", FROZEN_HEAD)
    save_model(create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]), run)
    target = make_kaggle_tree(tmp_path / "site", {"train": 2, "test": 2})
    adapt_run(run, target, split="test")
    assert "0-simple_cnn's best model comes from the frozen-backbone stage" in caplog.text


def test_a_frozen_stage_on_training_film_statistics_is_adapted_without_warning(tmp_path, caplog):
    run = _run_best_from_head(tmp_path / "run", "model: {norm_stats: train}\n" + FROZEN_HEAD)
    target = make_kaggle_tree(tmp_path / "site", {"train": 2, "test": 2})
    adapt_run(run, target, split="test")
    assert "frozen-backbone" not in caplog.text


def test_an_adapted_run_says_so_in_its_evaluations_and_report(trained_run, tiny_kaggle,
                                                               tmp_path):
    """Adapted to the test films, then evaluated on them: honest only if it says so."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    record_attempt(run, "train", Trainer(accelerator="cpu", logger=False), 0, resumed=False)
    adapted = adapt_run(run, tiny_kaggle, split="test")
    assert read_attempts(adapted) == read_attempts(run)  # what trained it goes with it
    metrics = json.loads((evaluate_run(adapted, bootstrap=10, figures=False, device="cpu")
                          / "metrics.json").read_text())
    assert any("adapted with `cxr adapt`" in n and "16 of the 16 films evaluated are among "
               "them (transductive" in n for n in metrics["notes"])
    assert metrics["adapted_to_films"] == 16 and is_transductive(metrics)
    plain = evaluate_run(run, bootstrap=10, figures=False, device="cpu")
    assert not any("adapt" in n for n in json.loads((plain / "metrics.json").read_text())["notes"])
    page = " ".join(build_report(adapted).read_text().split())
    assert "adapted with <code>cxr adapt</code> from" in page and "transductive" in page
    assert "`" not in page  # commands set as code everywhere on the page
    brief = page[page.index("In brief"):page.index("</ul>")]
    assert "the model was adapted (<code>cxr adapt</code>) to these very films" in brief
    result = CliRunner().invoke(app, ["compare", str(run), str(adapted)])
    assert result.exit_code == 0 and "run-adapted was adapted (`cxr adapt`) to these films" in (
        " ".join(result.output.split()))



def test_a_run_adapted_to_other_films_is_not_transductive_whatever_their_folders_name(
        trained_run, tiny_kaggle, tmp_path):
    """Its notes name the site's folder: one called transductive-study made the report and
    `cxr compare` call the result on the run's own test films transductive."""
    site = shutil.copytree(tiny_kaggle, tmp_path / "transductive-study")
    adapted = adapt_run(trained_run, site, split="test", out=tmp_path / "adapted")
    folder = evaluate_run(adapted, bootstrap=10, figures=False, device="cpu")  # its own test
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["adapted_to_films"] == 0 and not is_transductive(metrics)
    assert any("transductive-study" in n for n in metrics["notes"])
    page = " ".join(build_report(adapted).read_text().split())
    assert "to these very films" not in page
