"""TrainConfig: presets, YAML round trips, dotted overrides, and clear errors."""

from __future__ import annotations

import pytest

from cxrkit.cli.train import build_config
from cxrkit.config import PRESETS, ConfigError, TrainConfig, parse_assignments


def test_presets_describe_their_strategy():
    quick, default, finetune, scratch = (TrainConfig.preset(name) for name in PRESETS)
    [train] = default.stages  # the whole pretrained network, fine-tuned from the start
    assert default.model.name == "efficientnet_lite0" and default.model.pretrained
    assert train.unfreeze == "all" and not train.frozen_features and train.augment
    assert train.lr_decay < 1 and default.optim.schedule == "onecycle"

    [short] = quick.stages  # default's recipe, shorter, with the earliest layers frozen
    assert quick.model == default.model and quick.optim == default.optim
    assert short.epochs < train.epochs and short.unfreeze.isdigit() and not short.frozen_features

    head, tune = finetune.stages
    assert head.frozen_features and head.unfreeze == "none"
    assert tune.unfreeze == "all" and not tune.frozen_features and tune.augment
    assert tune.lr_decay < 1 and tune.lr < head.lr

    assert scratch.model.name == "simple_cnn" and not scratch.model.pretrained
    assert scratch.stages[0].unfreeze == "all"
    assert scratch.optim.schedule == "onecycle"


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_round_trip(tmp_path, name):
    config = TrainConfig.preset(name, data="some/folder",
                                overrides={"data.augment.scale": [0.8, 1.0], "seed": 7})
    loaded = TrainConfig.load(config.save(tmp_path / "config.yaml"))
    assert loaded == config
    assert loaded.data.augment.scale == (0.8, 1.0)  # tuples survive YAML's lists


def test_partial_yaml_goes_on_top_of_a_preset(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("optim:\n  schedule: onecycle\nloss:\n  name: focal\n  focal_gamma: 1.5\n")
    config = TrainConfig.load(file, TrainConfig.preset("quick"))
    assert config.optim.schedule == "onecycle"
    assert config.loss.name == "focal" and config.loss.focal_gamma == 1.5
    assert config.stages == TrainConfig.preset("quick").stages  # untouched fields keep the preset
    # the run remembers which recipe it began as (its name is only the folder's); a file of
    # fields on top may make it any recipe: not the preset's then, unless the file says so
    assert config.recipe is None and TrainConfig().recipe is None
    started = TrainConfig.preset("quick", overrides={"stages.0.epochs": 2})
    assert started.recipe == "quick"
    started.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml", TrainConfig.preset("default")).recipe == \
        "quick"


def test_dotted_overrides_reach_every_level():
    config = TrainConfig.preset("finetune").updated({
        "stages.1.epochs": 2, "optim.weight_decay": "1e-3", "trainer.devices": 2,
        "data.augment.degrees": 3, "model.input_size": 64,
        "trainer.early_stopping_patience": "None",
    })
    assert config.stages[1].epochs == 2
    assert config.optim.weight_decay == pytest.approx(1e-3)  # YAML reads 1e-3 as a string
    assert config.trainer.devices == "2"
    assert config.data.augment.degrees == 3.0 and isinstance(config.data.augment.degrees, float)
    assert config.model.input_size == 64
    assert config.trainer.early_stopping_patience is None


def test_a_dict_override_merges_into_its_section():
    """{"loss": {"label_smoothing": 0.1}} changes one field: quick keeps its mixup."""
    quick = TrainConfig.preset("quick")
    assert quick.loss.mixup > 0
    changed = quick.updated({"loss": {"label_smoothing": 0.1}})
    assert changed.loss.label_smoothing == 0.1 and changed.loss.mixup == quick.loss.mixup
    assert TrainConfig.preset("quick", overrides={"loss": {"label_smoothing": 0.1}}) == changed
    with pytest.raises(ConfigError, match="unknown config key"):
        quick.updated({"loss": {"smoothing": 0.1}})


def test_set_assignments_are_parsed_as_yaml():
    assert parse_assignments(["a.b=3", "c=true", "d=[1, 2]", "e=null", "f=bf16-mixed"]) == {
        "a.b": 3, "c": True, "d": [1, 2], "e": None, "f": "bf16-mixed"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["optim.lr"])
    with pytest.raises(ConfigError, match=r"model.ensemble_with=\[a.*not valid YAML"):
        parse_assignments(["model.ensemble_with=[a"])  # the shell ate a closing bracket


@pytest.mark.parametrize(("overrides", "message"), [
    ({"optim.lrr": 1}, r"unknown config key 'optim.lrr'.*weight_decay"),
    ({"stages.4.lr": 1}, r"stages is a list of 2; use an index 0..1"),
    ({"data.batch_size": "many"}, r"data.batch_size must be int, got 'many'"),
    ({"data.task": "4class"}, r"data.task must be one of binary, 3class"),
    ({"seed.value": 1}, r"seed is a value, not a section"),
    ({"stages.1.frozen_features": True}, r"frozen_features needs unfreeze: none"),
    ({"stages.1.feature_views": 2}, r"feature_views must be >= 1, and above 1 only with"),
    ({"stages.0.unfreeze": "some"}, r"unfreeze must be none, all or a number"),
    ({"stages.1.name": "head"}, r"stage names must be unique"),
    ({"stages.1.ema_decay": 1.5}, r"stages.1.ema_decay must be in \(0, 1\)"),
    ({"model.norm_stats": "imagenet"}, r"model.norm_stats must be one of pretrained, train"),
    ({"loss.mixup": -0.2}, r"loss.mixup must be >= 0"),
    ({"loss.label_smoothing": 2}, r"loss.label_smoothing must be in \[0, 1\), e.g. 0.1, got 2"),
    ({"model.dropout": 1.5}, r"model.dropout must be in \[0, 1\), got 1.5"),
    ({"data.batch_size": 0}, r"data.batch_size must be >= 1, got 0"),
    ({"model.input_size": 8}, r"model.input_size must be 32..4096 or null"),
    # (a disk-space error came first, whose fix, no decode cache, was worse)
    ({"model.input_size": 100000}, r"model.input_size must be 32..4096 or null"),
    ({"data.patient_pattern": "("}, r"data.patient_pattern: patient pattern '\(' is not a "
                                    r"valid regex"),  # (a traceback from the first film read)
    ({"data.max_train_images": 0}, r"data.max_train_images must be >= 1 or null"),
    ({"stages.1.lr_decay": 0}, r"stages.1 needs lr_decay in \(0, 1\]"),
    # each of these crashed mid-run with a traceback, or silently disabled resuming
    ({"trainer.checkpoint_every_n_steps": 0}, r"checkpoint_every_n_steps must be >= 1"),
    ({"trainer.accumulate_grad_batches": 0}, r"accumulate_grad_batches must be >= 1"),
    ({"trainer.log_every_n_steps": 0}, r"log_every_n_steps must be >= 1"),
    ({"trainer.early_stopping_patience": -1}, r"early_stopping_patience must be >= 0 or null"),
    ({"trainer.gradient_clip_val": -1}, r"gradient_clip_val must be > 0 or null"),
    ({"trainer.devices": "abc"}, r"trainer.devices must be auto, a count >= 1, -1 \(all\) or "
                                 r"device indices such as 0,1, got abc"),
    ({"trainer.devices": "0"}, r"trainer.devices must be auto, a count >= 1"),
    ({"trainer.precision": "17"}, r"trainer.precision must be one of auto, 32"),
    ({"data.num_workers": -1}, r"data.num_workers must be >= 0 or null"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ({"stages.0.epochs": 0}, r"stages.0 needs epochs >= 1 and a finite lr > 0, got 0 and"),
    # these too: torch refused them mid-run, or (NaN, gamma 0) trained on garbage
    ({"stages.0.lr": float("nan")}, r"stages.0 needs epochs >= 1 and a finite lr > 0, got "
                                    r"\d+ and nan"),
    ({"stages.0.lr": float("inf")}, r"a finite lr > 0, got \d+ and inf"),
    ({"optim.momentum": -1}, r"optim.momentum must be in \[0, 1\)"),
    ({"data.augment.scale": [0.9, 0.1]}, r"data.augment.scale must be \[low, high\] with 0 < "
                                         r"low <= high <= 1"),
    ({"data.augment.gamma": [0, 0]}, r"data.augment.gamma must be \[low, high\] with 0 < low"),
    ({"data.augment.degrees": -5}, r"data.augment.degrees must be in \[0, 180\]"),
    ({"data.augment.translate": 1.5}, r"data.augment.translate must be in \[0, 1\)"),
    ({"data.augment.brightness": -0.5}, r"data.augment.brightness must be >= 0"),
    ({"data.augment.contrast": -0.5}, r"data.augment.contrast must be >= 0"),
    ({"data.augment.blur_p": 3}, r"data.augment.blur_p must be in \[0, 1\]"),
    ({"data.augment.noise_std": -1}, r"data.augment.noise_std must be >= 0"),
])
def test_bad_overrides_say_what_is_wrong(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.preset("finetune").updated(overrides)


@pytest.mark.parametrize("devices", ["auto", "2", "-1", "0,1", "1,"])
def test_every_device_form_lightning_takes_is_accepted(devices):
    assert TrainConfig.preset("quick").updated({"trainer.devices": devices}).trainer.devices \
        == devices


def test_bad_yaml_key_names_the_file(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("model:\n  nmae: simple_cnn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.nmae'"):
        TrainConfig.load(file)


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    """Two configs merged into one file: PyYAML kept the last `data:` section, unsaid."""
    merged = tmp_path / "merged.yaml"
    merged.write_text("data:\n  batch_size: 8\noptim:\n  weight_decay: 0.01\n"
                      "data:\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"merged.yaml as YAML text: the key 'data' is given "
                                          r"twice \(keep one\)"):
        TrainConfig.load(merged)
    once = tmp_path / "once.yaml"
    once.write_text("data:\n  batch_size: 8\n  augment: {degrees: 3}\n")
    assert TrainConfig.load(once).data.batch_size == 8  # each key once: read as before
    merged_by_anchor = tmp_path / "anchors.yaml"  # YAML's own merge key, not a repeat
    merged_by_anchor.write_text("stages:\n- &base {name: head, epochs: 2, lr: 0.001}\n"
                                "- <<: *base\n  name: finetune\n  epochs: 5\n")
    stages = TrainConfig.load(merged_by_anchor).stages
    assert [(s.name, s.epochs, s.lr) for s in stages] == [("head", 2, 0.001),
                                                          ("finetune", 5, 0.001)]


def test_unknown_preset():
    with pytest.raises(ConfigError, match="quick, default, finetune, scratch"):
        TrainConfig.preset("fast")


def test_preset_takes_the_clis_shortcuts_and_overrides_win():
    config = TrainConfig.preset("finetune", data="data/x", epochs=4, lr=0.01, batch_size=16,
                                overrides={"stages.0.batch_size": 8})
    assert [s.epochs for s in config.stages] == [15, 4]  # epochs: the last stage's
    assert config.stages[1].lr == 0.01 and config.stages[0].lr == 3e-3
    assert config.data.batch_size == 16 and [s.batch_size for s in config.stages] == [8, 16]
    assert TrainConfig.preset("finetune") == TrainConfig.preset("finetune", epochs=None)
    replaced = TrainConfig.preset("quick", epochs=3, overrides={
        "stages": [{"name": "head", "epochs": 1}, {"name": "all"}]})
    assert [s.epochs for s in replaced.stages] == [1, 3]  # on the stages the overrides give
    assert TrainConfig.preset("quick", task="3class").data.task == "3class"  # --task
    with pytest.raises(ConfigError, match="data.task must be one of binary, 3class"):
        TrainConfig.preset("quick", task="4class")


def test_cli_options_map_onto_the_config(tmp_path):
    config = build_config(
        "data/x", "finetune", None,
        {"epochs": 4, "lr": 0.01, "data.batch_size": 16, "model.name": "simple_cnn",
         "trainer.precision": None},
        ["optim.schedule=constant"],
    )
    assert config.data.path == "data/x"
    assert [s.epochs for s in config.stages] == [15, 4]  # --epochs: the last stage
    assert config.stages[1].lr == 0.01 and config.stages[0].lr == 3e-3
    assert config.data.batch_size == 16 and all(s.batch_size == 16 for s in config.stages)
    assert config.model.name == "simple_cnn" and config.optim.schedule == "constant"
    assert config.trainer.precision == "auto"  # not given: the preset's


def test_a_config_file_that_is_not_text_is_a_config_error(tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="cannot read config .*model.safetensors as YAML text"):
        TrainConfig.load(binary)
