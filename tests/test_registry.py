"""`register_model`: a model of the user's own, from Python and from an installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cxrkit import models
from cxrkit.config import TrainConfig
from cxrkit.models import Backbone, create_model, list_models, register_model
from cxrkit.predict import predict
from cxrkit.training import train

CXR = str(Path(sys.executable).with_name("cxr"))


class TwoConvs(nn.Module):
    """A backbone of the user's own: no timm, no layer_groups, no gradcam_layer."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.convs(x).mean((2, 3))


@pytest.fixture
def registered():
    @register_model("two_convs")
    def two_convs(pretrained: bool) -> Backbone:
        return Backbone(TwoConvs(), input_size=40, mean=(0.5,), std=(0.25,), in_chans=1)

    yield "two_convs"
    models._REGISTRY.pop("two_convs")


def test_a_registered_model_is_built_trained_and_reloaded_by_name(registered, tiny_kaggle,
                                                                  tmp_path):
    assert registered in list_models()
    model = create_model(registered, labels=["NORMAL", "PNEUMONIA"])
    assert (model.spec.input_size, model.spec.in_chans, model.spec.std) == (40, 1, (0.25,))
    assert model(torch.randn(2, 1, 40, 40)).shape == (2, 2)
    # the defaults for a plain module: one layer group, Grad-CAM on its last convolution
    assert sum(map(len, model.layer_groups())) == len(list(model.backbone.parameters()))
    assert model.gradcam_layer() is model.backbone.convs[2]

    config = TrainConfig.preset("finetune", data=str(tiny_kaggle), overrides={
        "model.name": registered, "model.pretrained": False, "data.batch_size": 8,
        "data.num_workers": 0, "data.cache_dir": str(tmp_path / "cache"),
        "trainer.progress_bar": False, "stages.0.epochs": 1, "stages.1.epochs": 1,
        "runs_dir": str(tmp_path / "runs")})
    run = train(config)  # a frozen head stage, then the whole backbone as one group
    film = next((tiny_kaggle / "test" / "NORMAL").iterdir())
    [prediction] = predict(run, [film])  # rebuilt from model.json by its registered name
    assert prediction.error is None and set(prediction.probabilities) == {"NORMAL", "PNEUMONIA"}


def test_registering_a_name_again_replaces_it_with_a_warning(registered):
    with pytest.warns(UserWarning, match="two_convs.*registered again"):
        register_model(registered)(lambda pretrained: Backbone(nn.Identity(), 8, (0.5,), (0.5,)))
    with pytest.raises(ValueError, match="timm's models"):
        register_model("timm:mine")


def test_a_bare_decorator_names_the_model_after_its_function_and_bad_returns_say_why():
    @register_model
    def bare_net(pretrained: bool) -> Backbone:
        return Backbone(TwoConvs(), 40, (0.5,), (0.25,), in_chans=1)

    @register_model
    def returns_a_module(pretrained: bool):
        return TwoConvs()

    try:
        assert create_model("bare_net").spec.input_size == 40
        with pytest.raises(TypeError, match=r"'returns_a_module' must return Backbone\("):
            create_model("returns_a_module")
    finally:
        models._REGISTRY.pop("bare_net")
        models._REGISTRY.pop("returns_a_module")


PLUGIN = '''
from torch import nn
from cxrkit.models import Backbone, register_model


class Net(nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax((2, 3))


@register_model("plugin_net")
def plugin_net(pretrained: bool) -> Backbone:
    return Backbone(Net(), input_size=32, mean=(0.5,), std=(0.25,), in_chans=1)


@register_model("simple_cnn")  # a name taken: the built-in model stays
def not_the_baseline(pretrained: bool) -> Backbone:
    return Backbone(Net(), input_size=32, mean=(0.5,), std=(0.25,), in_chans=1)
'''


def installed_plugin(folder: Path) -> dict[str, str]:
    """A package installed the way pip leaves one: a module and its dist-info, naming it
    (and a second, broken module) under the `cxrkit.models` entry points."""
    (folder / "cxr_plugin_demo.py").write_text(PLUGIN)
    info = folder / "cxr_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cxr-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [cxrkit.models]
        demo = cxr_plugin_demo
        broken = cxr_plugin_not_installed
        """))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}


@pytest.mark.slow
def test_cxr_trains_and_predicts_with_a_model_an_installed_package_registers(tiny_kaggle,
                                                                             tmp_path):
    (tmp_path / "site").mkdir()
    env = installed_plugin(tmp_path / "site")
    runs = tmp_path / "runs"
    args = [CXR, "train", "--data", str(tiny_kaggle), "--preset", "scratch", "--runs-dir",
            str(runs), "--name", "plugin", "--epochs", "1", "--num-workers", "0",
            "--set", "trainer.progress_bar=false", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    typo = subprocess.run([*args, "--model", "plugin_nett"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert typo.returncode == 2 and "did you mean plugin_net?" in typo.stderr
    trained = subprocess.run([*args, "--model", "plugin_net"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # the broken package is named and skipped; the working one trained
    said = "".join(trained.stderr.split())
    for message in ("plugin broken (cxr_plugin_not_installed) failed to load, skipped",
                    "plugin demo (cxr_plugin_demo): its model 'simple_cnn' is not registered, "
                    "the name is taken"):
        assert "".join(message.split()) in said, message
    film = next((tiny_kaggle / "test" / "PNEUMONIA").iterdir())
    predicted = subprocess.run([CXR, "predict", str(runs / "plugin"), str(film), "--out",
                                str(tmp_path / "p.json"), "--cam", str(tmp_path / "cam")],
                               env=env, capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    [row] = json.loads((tmp_path / "p.json").read_text())
    assert row["path"] == str(film) and row["label"] in ("NORMAL", "PNEUMONIA")
    assert len(list((tmp_path / "cam").glob("*.png"))) == 1  # Grad-CAM on its last conv


def test_a_run_of_a_model_nothing_registers_here_says_what_to_install(registered, tiny_kaggle,
                                                                     tmp_path):
    config = TrainConfig.preset("scratch", data=str(tiny_kaggle), overrides={
        "model.name": registered, "data.batch_size": 8, "data.num_workers": 0,
        "data.cache_dir": str(tmp_path / "cache"), "trainer.progress_bar": False,
        "stages.0.epochs": 1, "runs_dir": str(tmp_path / "runs")})
    run = train(config)
    models._REGISTRY.pop(registered)  # a new process, where its package is not installed
    try:
        with pytest.raises(ValueError, match=r"trained as 'two_convs', which nothing "
                                             r"registers here: install the package"):
            predict(run, [next((tiny_kaggle / "test" / "NORMAL").iterdir())])
    finally:
        register_model(registered)(lambda pretrained: None)  # for the fixture to remove
