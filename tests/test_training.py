"""Training on tiny synthetic films: the run folder, learning, checkpoints, freezing, losses."""

from __future__ import annotations

import copy
import csv
import gc
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, RichProgressBar, WeightAveraging
from lightning.pytorch.demos.boring_classes import BoringModel
from rich.console import Console
from sklearn.metrics import roc_auc_score
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

import cxrkit.data.dataset
from cxrkit.adapt import adapt_batchnorm
from cxrkit.cli import app
from cxrkit.cli.train import metrics_table
from cxrkit.config import ConfigError, OptimConfig, TrainConfig
from cxrkit.data.layout import DataLayoutError, Sample, load_source
from cxrkit.data.split import patient_split, read_manifest, shared_patients, write_manifest
from cxrkit.data.transforms import ModelInput, eval_transform
from cxrkit.evaluation import evaluate_run
from cxrkit.labels import choose_positive, positive_index
from cxrkit.models import create_model
from cxrkit.predict import predict
from cxrkit.report import build_report, val_rows
from cxrkit.runs import CALIBRATION, Calibration, load_model
from cxrkit.training import train
from cxrkit.training.callbacks import (
    ProgressBar,
    ProgressLog,
    make_callbacks,
    make_loggers,
    make_trainer,
    resolve_precision,
)
from cxrkit.training.curves import step_losses
from cxrkit.training.datamodule import (
    default_num_workers,
    prepare_samples,
    processes_here,
    task_classes,
)
from cxrkit.training.features import extract_features
from cxrkit.training.fit import (
    RUN_DIR_ENV,
    Run,
    build_model,
    build_stage,
    find_lr,
    loss_class_weights,
    new_run,
    training_lock,
)
from cxrkit.training.losses import FocalLoss, balanced_class_weights, mixup
from cxrkit.training.module import (
    ClassifierModule,
    make_metrics,
    make_schedule,
    metric_inputs,
    param_groups,
    set_trainable,
)
from tests.conftest import (
    REAL_DATA,
    make_kaggle_tree,
    requires_real_data,
    run_with_files_under,
    synthetic_film,
)

# simple_cnn on 32-pixel films: a few steps per epoch, each in milliseconds.
TINY = {
    "model.name": "simple_cnn", "model.pretrained": False, "model.input_size": 32,
    "data.batch_size": 8, "data.num_workers": 0, "trainer.progress_bar": False,
    "trainer.log_every_n_steps": 1, "trainer.checkpoint_every_n_steps": 4,
    "trainer.deterministic": True, "trainer.early_stopping_patience": None,
}
ARTIFACTS = ("config.yaml", "split.csv", "best.ckpt", "last.ckpt", "model.safetensors",
             "model.json", "labels.json", "metrics.csv", "training_curves.png",
             "val_metrics.json", "stages.json")


def tiny_config(data: Path, tmp: Path, preset: str = "scratch", **overrides) -> TrainConfig:
    return TrainConfig.preset(preset, data=str(data), overrides={
        **TINY, "data.cache_dir": str(tmp / "cache"), "runs_dir": str(tmp / "runs"), **overrides})


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_stage_run(tiny_kaggle, tmp_path_factory) -> Path:
    """The default recipe in small: head on frozen features, then everything fine-tuned.

    Selected on val_loss: on 8 validation films ROC-AUC reaches 1.0 and then cannot improve.
    """
    tmp = tmp_path_factory.mktemp("two_stage")
    return train(tiny_config(tiny_kaggle, tmp, "finetune", **{
        "stages.0.epochs": 2, "stages.0.batch_size": 8, "trainer.monitor": "val_loss",
        "stages.1.epochs": 4, "stages.1.lr": 3e-3, "stages.1.lr_decay": 0.8,
    }))


def test_run_folder_holds_every_artifact(two_stage_run):
    run = two_stage_run
    for name in ARTIFACTS:
        assert (run / name).is_file(), name
    assert list((run / "tb").rglob("events.out.tfevents*"))
    assert not list(run.glob("features-*"))  # the cached features go once their stage is done
    stages = json.loads((run / "stages.json").read_text())
    assert list(stages) == ["head", "finetune"]
    assert stages["finetune"]["global_step"] == 4 * 5  # 40 training images / 8, 4 epochs
    assert all(record["seconds"] > 0 for record in stages.values())
    with open(run / "metrics.csv", encoding="utf-8", newline="") as f:
        speeds = [r for r in csv.DictReader(f) if r["stage"] == "finetune" and r["epoch_seconds"]]
    assert len(speeds) == 4  # one per epoch
    for row in speeds:  # 40 training images an epoch
        assert float(row["train_images_per_s"]) * float(row["epoch_seconds"]) == pytest.approx(40)
    metrics = json.loads((run / "val_metrics.json").read_text())
    for name in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss"):
        assert 0 <= metrics[name] <= (1 if name != "loss" else 10), name
    assert metrics["images"] == len([s for s in read_manifest(run / "split.csv")
                                     if s.split == "val"])
    assert TrainConfig.load(run / "config.yaml").stages[1].lr_decay == 0.8
    assert json.loads((run / "labels.json").read_text()) == ["NORMAL", "PNEUMONIA"]


def test_best_epoch_names_the_epoch_whose_weights_were_kept(two_stage_run):
    """val_metrics.json's best_epoch (from 1, within best_stage) is the first epoch with the
    lowest val_loss in metrics.csv: the training curves mark it, the CLI and report print it."""
    chosen = json.loads((two_stage_run / "val_metrics.json").read_text())
    stages = list(json.loads((two_stage_run / "stages.json").read_text()))
    # over both stages: the first lowest, as a later stage replaces best.ckpt only if better
    losses = [(float(r["val_loss"]), stages.index(r["stage"]), int(r["epoch"]))
              for r in read_rows(two_stage_run / "metrics.csv") if r["val_loss"]]
    assert len({stage for _, stage, _ in losses}) == 2
    loss, stage, epoch = min(losses)
    assert (chosen["best_stage"], chosen["best_epoch"]) == (stages[stage], epoch + 1)
    # on a GPU, training validates under bf16 autocast; the final score is fp32, as deployed
    assert chosen["loss"] == pytest.approx(loss, rel=1e-2 if torch.cuda.is_available() else 1e-4)


def test_split_is_grouped_by_patient_and_keeps_test_apart(two_stage_run):
    samples = read_manifest(two_stage_run / "split.csv")
    assert shared_patients(samples, "train", "val") == set()
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert len([s for s in samples if s.split == "test"]) == 16  # kept as it is, for evaluation
    assert all(Path(s.path).is_absolute() for s in samples)  # resumable from any folder


def test_loss_goes_down_and_the_model_learns(two_stage_run):
    rows = [r for r in read_rows(two_stage_run / "metrics.csv") if r["train_loss_epoch"]]
    finetune = [float(r["train_loss_epoch"]) for r in rows if r["stage"] == "finetune"]
    assert len(finetune) == 4
    assert finetune[-1] < 0.6 * finetune[0]
    metrics = json.loads((two_stage_run / "val_metrics.json").read_text())
    assert metrics["best_stage"] == "finetune"
    assert metrics["accuracy"] >= 0.75 and metrics["roc_auc"] > 0.9


def test_discriminative_learning_rates_reach_the_optimizer(two_stage_run):
    """Logged by LearningRateMonitor: backbone group k of 5 runs at lr * 0.8**(5 - k)."""
    rows = [r for r in read_rows(two_stage_run / "metrics.csv")
            if r["stage"] == "finetune" and r.get("lr-AdamW/head")]
    assert rows
    for row in rows[:3]:
        head = float(row["lr-AdamW/head"])
        for k in range(5):
            assert float(row[f"lr-AdamW/backbone.{k}"]) == pytest.approx(head * 0.8 ** (5 - k),
                                                                         rel=1e-5)


def test_best_checkpoint_reloads_to_identical_outputs(two_stage_run):
    module = ClassifierModule.load_from_checkpoint(two_stage_run / "best.ckpt",
                                                   map_location="cpu", weights_only=True)
    model = load_model(two_stage_run)
    assert model.spec.input_size == 32  # the trained size, not the architecture's default
    val = [s for s in read_manifest(two_stage_run / "split.csv") if s.split == "val"][:4]
    prepare = eval_transform(model.spec)
    x = torch.stack([prepare(cxrkit.data.dataset.load_prepared(s.path, 32, False)) for s in val])
    module.eval()
    with torch.no_grad():
        expected, outputs = module.model(x), model(x)
    assert expected.std(0).max() > 1e-3  # a model that tells the films apart
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)
    last = torch.load(two_stage_run / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 20 and last["hyper_parameters"]["stage"]["name"] == "finetune"


def _fit_steps(data: Path, tmp: Path, steps: int, **stage) -> tuple[dict, dict]:
    """Weights before and after `steps` optimiser steps of one stage."""
    config = tiny_config(data, tmp, **{f"stages.0.{k}": v for k, v in stage.items()})
    samples = prepare_samples(config.data, config.seed)
    run = Run(tmp, config, samples, task_classes("binary", samples))
    model = build_model(config, run.classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module, datamodule = build_stage(run, 0, model)
    trainer = make_trainer(tmp, config.stages[0], config.trainer, callbacks=[], loggers=False,
                           max_steps=steps, enable_checkpointing=False, num_sanity_val_steps=0,
                           limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return before, model.state_dict()


@pytest.mark.parametrize("frozen_features", [False, True])
def test_frozen_backbone_and_its_batchnorm_statistics_do_not_change(tiny_kaggle, tmp_path,
                                                                     frozen_features):
    before, after = _fit_steps(tiny_kaggle, tmp_path, 3, unfreeze="none",
                               frozen_features=frozen_features)
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    for key in backbone:  # weights, running_mean/var and num_batches_tracked alike
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])


def test_a_manifests_row_order_does_not_change_the_training(tiny_kaggle, tmp_path):
    """The same films in reversed rows gave the same split but other subsamples and batch
    orders: another model (val ROC-AUC 0.81 against 0.88 in a review)."""
    films = load_source(tiny_kaggle).samples
    runs = []
    for name, rows in (("forward", films), ("reversed", films[::-1])):
        manifest = write_manifest(rows, tmp_path / f"{name}.csv")
        config = tiny_config(manifest, tmp_path, **{"data.max_train_images": 20})
        runs.append(prepare_samples(config.data, config.seed))
    assert runs[0] == runs[1]


def test_workers_hand_over_grayscale_and_the_module_finishes_batches(tiny_kaggle, tmp_path):
    config = tiny_config(tiny_kaggle, tmp_path, "default")
    samples = prepare_samples(config.data, config.seed)
    run = Run(tmp_path, config, samples, task_classes("binary", samples))
    model = build_model(config, run.classes)
    module, images = build_stage(run, 0, model)
    images.setup()
    x, y, idx = next(iter(images.loader("val", shuffle=False)))
    assert x.dtype == torch.uint8 and x.shape[1] == 1  # one channel, 8 bits, off the worker
    assert next(iter(images.train_dataloader()))[0].shape[1] == 1
    finished, labels, _ = module.on_after_batch_transfer([x, y, idx], 0)
    transform = eval_transform(model.spec)
    expected = torch.stack([transform(images.datasets["val"].load(i)) for i in idx.tolist()])
    assert torch.equal(finished, expected) and finished.shape[1] == model.spec.in_chans
    assert finished.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(labels, y)


def test_feature_views_add_augmented_passes_over_the_train_films_only(tiny_kaggle, tmp_path):
    config = tiny_config(tiny_kaggle, tmp_path, "finetune", **{"stages.0.feature_views": 3})
    samples = prepare_samples(config.data, config.seed)
    run = Run(tmp_path, config, samples, task_classes("binary", samples))
    model = build_model(config, run.classes)
    _, features = build_stage(run, 0, model)
    features.prepare_data()
    features.setup()
    train_x, train_y = features.datasets["train"].tensors
    val_x, val_y = features.datasets["val"].tensors
    n_train = len([s for s in samples if s.split == "train"])
    assert len(train_x) == 3 * n_train and len(val_x) == len(val_y) == 8  # val stays plain
    assert torch.equal(train_y, train_y[:n_train].repeat(3))
    plain, first_view, second_view = train_x.split(n_train)
    images = features.images
    expected, _ = extract_features(model.backbone, images.loader("train", shuffle=False,
                                                                 augment=False),
                                   ModelInput(model.spec), "cpu")
    torch.testing.assert_close(plain, expected)  # the first pass is the plain films
    for view in (first_view, second_view):  # every other pass an augmented one
        assert (view - plain).abs().mean() > 0.05 * plain.abs().mean()
    assert not torch.equal(first_view, second_view)
    # each pass's augmentations are the seed's alone: the same with any number of workers
    # (a machine-chosen default), so the same config trains the same model anywhere
    images.num_workers = 2
    again, _ = extract_features(model.backbone, images.loader("train", shuffle=False,
                                                              augment=True, draw=1),
                                ModelInput(model.spec), "cpu")
    torch.testing.assert_close(again, first_view)


def test_partly_unfrozen_backbone_trains_only_its_last_groups(tiny_kaggle, tmp_path):
    before, after = _fit_steps(tiny_kaggle, tmp_path, 3, unfreeze="2")
    for block in range(5):
        keys = [k for k in before if k.startswith(f"backbone.blocks.{block}.")]
        changed = [k for k in keys if not torch.equal(before[k], after[k])]
        if block < 3:
            assert not changed, f"frozen block {block} changed: {changed}"
        else:
            assert any("running_mean" in k for k in changed) and any("weight" in k for k in changed)


def test_frozen_norm_statistics_stay_while_the_whole_backbone_learns(tiny_kaggle, tmp_path):
    before, after = _fit_steps(tiny_kaggle, tmp_path, 3, unfreeze="all", freeze_norm_stats=True)
    stats = [k for k in before if k.startswith("backbone.") and "running_" in k]
    weights = [k for k in before if k.startswith("backbone.") and k.endswith(".weight")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert all(not torch.equal(before[k], after[k]) for k in weights)


def test_norm_stats_train_starts_from_the_training_films_statistics(tiny_kaggle, tmp_path):
    """A frozen head stage keeps whatever statistics it starts from: here the films' own."""
    config = tiny_config(tiny_kaggle, tmp_path, "finetune", **{
        "model.norm_stats": "train", "stages.0.epochs": 1, "stages.0.batch_size": 8})
    config.stages = config.stages[:1]  # finetune's frozen head stage alone
    run = train(config)
    torch.manual_seed(config.seed)  # the same initial weights as the run's
    fresh = build_model(config, ["NORMAL", "PNEUMONIA"])
    train_paths = [s.path for s in read_manifest(run / "split.csv") if s.split == "train"]
    # on the device the run used: a GPU's TF32 convolutions differ from the CPU's at 1e-3
    expected = adapt_batchnorm(copy.deepcopy(fresh), train_paths, 8)[0].state_dict()
    trained = load_model(run).state_dict()
    stats = [k for k in expected if k.startswith("backbone.") and "running_" in k]
    assert stats
    for key in stats:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-5)
    assert not all(torch.allclose(fresh.state_dict()[k], trained[k]) for k in stats)


class _RecordWeights(Callback):
    """The raw floating-point weights after every optimiser step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().cpu().clone()
                           for k, v in pl_module.model.state_dict().items()
                           if v.is_floating_point()})


def test_ema_stage_ends_with_the_moving_average_of_its_weights(tiny_kaggle, tmp_path):
    """With a warm-up: decay min(ema_decay, (1 + n) / (10 + n)) after n updates (2/11 at the
    first, then 0.2 here); without it, an average held mostly the stage's starting weights."""
    config = tiny_config(tiny_kaggle, tmp_path, **{"stages.0.ema_decay": 0.2})
    samples = prepare_samples(config.data, config.seed)
    run = Run(tmp_path, config, samples, task_classes("binary", samples))
    model = build_model(config, run.classes)
    module, datamodule = build_stage(run, 0, model)
    averaging = [c for c in make_callbacks(tmp_path, config.trainer, config.stages[0])
                 if isinstance(c, WeightAveraging)]
    recorder = _RecordWeights()
    trainer = make_trainer(tmp_path, config.stages[0], config.trainer,
                           callbacks=[*averaging, recorder], loggers=False, max_steps=3,
                           enable_checkpointing=False, num_sanity_val_steps=0,
                           limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert len(averaging) == 1 and len(recorder.steps) == 3
    expected = recorder.steps[0]
    for n, raw in enumerate(recorder.steps[1:], start=1):
        decay = min(0.2, (1 + n) / (10 + n))
        expected = {k: decay * expected[k] + (1 - decay) * raw[k] for k in expected}
    final = model.state_dict()
    assert any("running_mean" in k for k in expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value)
    assert not torch.allclose(final["head.1.weight"], recorder.steps[-1]["head.1.weight"])


def test_the_progress_bar_shows_no_cut_version_name_and_counts_epochs_from_1(tmp_path):
    stage = TrainConfig().stages[0]
    loggers = make_loggers(tmp_path, "train", TrainConfig().trainer)
    trainer = make_trainer(tmp_path, stage, TrainConfig().trainer, callbacks=[ProgressBar()],
                           loggers=loggers, enable_progress_bar=True)  # as on a terminal
    assert RichProgressBar().get_metrics(trainer, None)["v_num"] == "rain"  # what it hides
    assert "v_num" not in trainer.progress_bar_callback.get_metrics(trainer, None)
    bar = trainer.progress_bar_callback
    bar.setup(trainer, None, "fit")
    assert bar._get_train_description(0) == f"Epoch 1/{stage.epochs}"


def test_the_progress_bar_shows_the_steps_loss_alone_to_fit_80_columns(tiny_kaggle, tmp_path):
    """`train_loss_step: 0.675` and `val_loss: 0.217` wrapped the bar onto a second line at
    80 columns, where the log lines printed beside it then tore it."""
    config = tiny_config(tiny_kaggle, tmp_path)
    samples = prepare_samples(config.data, config.seed)
    run = Run(tmp_path, config, samples, task_classes("binary", samples))
    module, datamodule = build_stage(run, 0, build_model(config, run.classes))
    bar = ProgressBar()
    trainer = make_trainer(tmp_path, config.stages[0], config.trainer, callbacks=[bar],
                           loggers=False, max_epochs=1, enable_checkpointing=False,
                           enable_progress_bar=True)
    trainer.fit(module, datamodule=datamodule)
    assert "val_loss" in trainer.progress_bar_metrics  # what Lightning would show
    shown = bar.get_metrics(trainer, module)
    assert list(shown) == ["loss"]
    assert shown["loss"] == trainer.progress_bar_metrics["train_loss_step"]


def test_verbose_is_cxrkits_and_lightnings_debug_lines_not_every_librarys(tmp_path):
    """`cxr -v` printed 2,239 lines, 2,200 of them matplotlib's font search and PIL's PNG
    chunks."""
    # a fresh process: Lightning not imported before the command (it resets its own level)
    result = subprocess.run([sys.executable, "-c", f"""
import logging
from typer.testing import CliRunner
from cxrkit.cli import app
result = CliRunner().invoke(app, ["-v", "train", "--resume", {str(tmp_path / "none")!r}])
import lightning.pytorch  # as the commands that train do
print(result.exit_code, *(logging.getLogger(name).isEnabledFor(logging.DEBUG) for name in (
    "cxrkit.training", "lightning.pytorch", "matplotlib.font_manager", "PIL.PngImagePlugin")))
"""], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "True", "True", "False", "False"], result.stderr


def test_without_a_terminal_progress_comes_as_log_lines(tiny_kaggle, tmp_path, caplog):
    """A log file or a pipe shows no bar: `make run | tee` printed nothing for minutes."""
    config = tiny_config(tiny_kaggle, tmp_path, **{"stages.0.epochs": 2,
                                                   "trainer.progress_bar": True})
    callbacks = make_callbacks(tmp_path, config.trainer, config.stages[0])
    [progress] = [c for c in callbacks if isinstance(c, ProgressLog)]  # pytest: no terminal
    progress.every = 0.0  # a line after every step
    samples = prepare_samples(config.data, config.seed)
    run = Run(tmp_path, config, samples, task_classes("binary", samples))
    module, datamodule = build_stage(run, 0, build_model(config, run.classes))
    trainer = make_trainer(tmp_path, config.stages[0], config.trainer, callbacks=[progress],
                           loggers=False, enable_checkpointing=False)
    with caplog.at_level(logging.INFO, logger="cxrkit.training.callbacks"):
        trainer.fit(module, datamodule=datamodule)
    lines = [r.getMessage() for r in caplog.records if r.name == "cxrkit.training.callbacks"]
    steps = trainer.num_training_batches
    assert lines[0].startswith(f"train, epoch 1/2: step 1/{steps}, train loss ")
    assert lines[steps].startswith("train, epoch 1/2: val_accuracy ")
    assert "val_loss " in lines[steps] and len(lines) == 2 * (steps + 1)
    # which rule its rates are at: a student read val_sensitivity 0.08 as the model's own
    assert lines[steps].endswith("(rates at P = 0.5; `cxr evaluate` chooses the threshold)")
    assert lines[-1].startswith("train, epoch 2/2: val_accuracy ")


def test_a_resumed_epoch_estimates_its_end_from_the_steps_it_timed(monkeypatch, caplog):
    """A run resumed part way through an epoch gets no epoch start: the estimate used the
    machine's uptime over every step of the epoch (187309 s left where 4 minutes were)."""
    from types import SimpleNamespace

    import cxrkit.training.callbacks as callbacks

    clock = iter([1e6, 1e6 + 10.0, 1e6 + 20.0])  # uptime: one step every 10 s from step 40
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    trainer = SimpleNamespace(is_global_zero=True, num_training_batches=100, current_epoch=0,
                              max_epochs=1, callback_metrics={}, lightning_module=None)
    progress = ProgressLog(every=0.0)
    with caplog.at_level(logging.INFO, logger="cxrkit.training.callbacks"):
        for step in (40, 41, 42):  # no on_train_epoch_start: resumed at step 41
            progress.on_train_batch_end(trainer, None, None, None, step)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 1/1: step 41/100", "epoch 1/1: step 42/100, 580 s to the epoch's end",
                     "epoch 1/1: step 43/100, 570 s to the epoch's end"]


def test_param_groups_give_each_depth_its_learning_rate():
    model = create_model("efficientnet_lite0", pretrained=False)
    set_trainable(model, "all")
    groups = param_groups(model, lr=1.0, lr_decay=0.5)
    layers = model.layer_groups()
    assert [g["name"] for g in groups] == ["head", *[f"backbone.{k}" for k in range(7, -1, -1)]]
    assert [g["lr"] for g in groups] == [0.5 ** d for d in range(len(layers) + 1)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    set_trainable(model, "2")
    groups = param_groups(model, lr=1.0, lr_decay=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("head", 1.0), ("backbone.7", 0.5), ("backbone.6", 0.25)]
    trainable = sum(p.requires_grad for p in model.parameters())
    assert trainable == sum(len(g["params"]) for g in groups)


@pytest.mark.parametrize("warmup_fraction", [0.0, 0.1, 0.25, 0.5])
def test_onecycle_schedule_survives_runs_of_a_few_steps(warmup_fraction):
    # e.g. the default recipe for one epoch on 128 films: 4 steps, a 0.25 warm-up of one step
    optim = OptimConfig(schedule="onecycle", warmup_fraction=warmup_fraction)
    for total_steps in range(1, 13):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make_schedule(optimizer, optim, total_steps)
        rates = [optimizer.param_groups[0]["lr"]]
        for _ in range(total_steps - 1):
            optimizer.step()
            schedule.step()
            rates.append(optimizer.param_groups[0]["lr"])
        assert all(0 < rate <= 1.0 + 1e-9 for rate in rates), (total_steps, rates)
        if total_steps >= 3:
            assert max(rates) > 0.5 and rates[-1] < 0.01, (total_steps, rates)  # up, then down


def test_class_weights_balance_the_classes(tiny_kaggle, tmp_path):
    counts = [1341, 3875]  # the Kermany training split
    weights = balanced_class_weights(counts)
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])
    assert weights[0] / weights[1] == pytest.approx(3875 / 1341)
    with pytest.raises(ValueError, match="no training images"):
        balanced_class_weights([10, 0])
    config = tiny_config(tiny_kaggle, tmp_path)
    assert loss_class_weights(config, counts) == weights  # auto: weighted
    assert loss_class_weights(config.updated({"data.balanced_sampler": True}), counts) is None
    assert loss_class_weights(config.updated({"loss.class_weights": "none"}), counts) is None


def test_focal_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 2), torch.randint(0, 2, (16,))
    weight = torch.tensor([2.0, 0.5])
    ce = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    assert FocalLoss(0.0, weight, 0.1)(logits, target) == pytest.approx(float(ce(logits, target)))
    focal = FocalLoss(2.0)
    easy, hard = torch.tensor([[4.0, -4.0]]), torch.tensor([[-1.0, 1.0]])
    zero = torch.tensor([0])
    plain = torch.nn.functional.cross_entropy
    # an easy example loses far more of its loss than a hard one
    assert focal(easy, zero) / plain(easy, zero) < 0.01
    assert focal(hard, zero) / plain(hard, zero) > 0.3
    assert focal(torch.tensor([[1.0, 0.0]]), zero) < focal(torch.tensor([[0.0, 1.0]]), zero)


def test_mixup_blends_each_example_with_a_partner_from_its_batch():
    torch.manual_seed(0)
    x, y = torch.eye(8), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])  # row i: only feature i
    mixed, partner_y, lam = mixup(x, y, alpha=0.4)
    assert 0 < lam < 1 and lam != 0.5
    for i, row in enumerate(mixed):
        partner = [j for j in range(8) if j != i and row[j] > 0] or [i]
        assert len(partner) == 1
        assert row[i] == pytest.approx(lam if partner[0] != i else 1.0)
        assert row[partner[0]] == pytest.approx(1 - lam if partner[0] != i else 1.0)
        assert partner_y[i] == y[partner[0]]
    lams = [mixup(x, y, alpha=0.4)[2] for _ in range(200)]
    assert min(lams) < 0.1 and max(lams) > 0.9  # Beta(0.4, 0.4) puts most weight near 0 and 1


def _training_step_loss(mixup_alpha: float, augment: bool = True):
    """One `training_step` of an untrained simple_cnn on a random batch: (loss, module, x, y).

    The module is in eval mode, so its forward pass is deterministic (no dropout); its head
    is random, so the two classes' losses differ from film to film."""
    torch.manual_seed(0)
    model = create_model("simple_cnn", pretrained=False)
    torch.nn.init.normal_(model.head[1].weight, std=0.5)
    module = ClassifierModule(
        spec=model.spec.to_dict(), stage={"augment": augment}, optim={},
        loss={"mixup": mixup_alpha}, class_weights=None, positive_index=1,
        channels_last=False, model=model).eval()
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 64, 64), torch.tensor([0, 1, 0, 1, 1, 0])
    loss = module.training_step([x, y], 0)
    return float(loss.detach()), module, x, y


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_mixup_training_step_blends_the_loss_like_soft_targets():
    loss, module, x, y = _training_step_loss(0.4)
    torch.manual_seed(1)
    torch.randn(6, 1, 64, 64)  # the same draws as the step's batch, then the step's mixup
    mixed, partner_y, lam = mixup(x, y, 0.4)
    soft = lam * F.one_hot(y, 2).float() + (1 - lam) * F.one_hot(partner_y, 2).float()
    with torch.no_grad():
        expected = F.cross_entropy(module(mixed), soft)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    plain, module, x, y = _training_step_loss(0.0)
    with torch.no_grad():
        assert plain == pytest.approx(float(F.cross_entropy(module(x), y)), rel=1e-5)
    unaugmented, module, x, y = _training_step_loss(0.4, augment=False)  # e.g. a head stage
    with torch.no_grad():
        assert unaugmented == pytest.approx(float(F.cross_entropy(module(x), y)), rel=1e-5)


def test_a_run_with_mixup_learns_and_records_it(tiny_kaggle, tmp_path):
    run = train(tiny_config(tiny_kaggle, tmp_path, **{"loss.mixup": 0.4, "stages.0.epochs": 3}))
    assert TrainConfig.load(run / "config.yaml").loss.mixup == 0.4
    losses = [float(r["train_loss_epoch"]) for r in read_rows(run / "metrics.csv")
              if r["train_loss_epoch"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert json.loads((run / "val_metrics.json").read_text())["roc_auc"] > 0.8


def test_the_sanity_check_on_one_class_batches_does_not_warn(tiny_kaggle, tmp_path):
    """Lightning's sanity check sees two validation batches, here NORMAL films only."""
    config = tiny_config(tiny_kaggle, tmp_path, **{"data.batch_size": 2, "stages.0.epochs": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config)
    assert not [w for w in caught if "No positive samples" in str(w.message)]


def test_curves_place_logged_steps_in_epochs_of_their_stage():
    rows = [{"epoch": "0", "step": "4", "train_loss_step": "0.9", "train_loss_epoch": ""},
            {"epoch": "0", "step": "9", "train_loss_step": "0.5", "train_loss_epoch": ""},
            {"epoch": "0", "step": "9", "train_loss_step": "", "train_loss_epoch": "0.7"},
            {"epoch": "1", "step": "14", "train_loss_step": "0.3", "train_loss_epoch": ""}]
    assert step_losses(rows) == ([0.5, 1.0, 1.5], [0.9, 0.5, 0.3])
    assert step_losses(rows[:2]) == ([], [])  # killed before its first epoch ended: no scale


def test_metrics_score_the_positive_class():
    metrics = make_metrics(2)
    # NORMAL = 0, PNEUMONIA = 1: one false alarm among the normals, both pneumonias found
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    metrics.update(*metric_inputs(logits, torch.tensor([0, 0, 1, 1]), positive=1))
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["sensitivity"] == 1.0 and values["specificity"] == 0.5
    assert values["accuracy"] == 0.75 and values["roc_auc"] == 1.0
    assert values["f1"] == pytest.approx(0.8)


def test_validation_roc_auc_averages_the_classes_validation_has():
    """No VIRUS film in validation: torchmetrics counted its ROC-AUC as 0, and a model
    perfect on the other two showed 0.67, the checkpoint monitor included."""
    logits = torch.tensor([[3.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 2, 0]])
    target = torch.tensor([0, 0, 1, 1])
    metrics = make_metrics(3, sync=False)
    metrics.update(*metric_inputs(logits, target, positive=1))
    assert float(metrics.compute()["roc_auc"]) == 1.0
    metrics.reset()  # with every class present it is the usual macro average
    target = torch.tensor([0, 1, 2, 2])
    metrics.update(*metric_inputs(logits, target, positive=1))
    expected = roc_auc_score(target.numpy(), torch.softmax(logits, 1).numpy(), multi_class="ovr")
    assert float(metrics.compute()["roc_auc"]) == pytest.approx(expected, abs=1e-6)


def _three_class_tree(root: Path) -> Path:
    data = make_kaggle_tree(root, {"train": 24, "test": 4})
    for split in ("train", "test"):
        for i, path in enumerate(sorted((data / split / "PNEUMONIA").iterdir())):
            if i % 2:
                path.rename(path.with_name(path.name.replace("_bacteria_", "_virus_")))
    return data


def test_cli_trains_three_classes_without_reading_a_test_image(tmp_path, monkeypatch):
    data = _three_class_tree(tmp_path / "data")
    read = []
    original = cxrkit.data.dataset.read_image
    monkeypatch.setattr(cxrkit.data.dataset, "read_image",
                        lambda path: read.append(str(path)) or original(path))
    args = ["train", "--data", str(data), "--preset", "scratch", "--task", "3class",
            "--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--no-cache",
            *[f"--set={k}={v}" for k, v in TINY.items()]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])  # the last line is the run folder
    assert "roc-auc" in result.output and "sensitivity" in result.output  # the metrics table
    assert json.loads((run / "labels.json").read_text()) == ["NORMAL", "BACTERIA", "VIRUS"]
    assert load_model(run)(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert 0 <= json.loads((run / "val_metrics.json").read_text())["roc_auc"] <= 1
    assert read and not [p for p in read if "/test/" in p]
    assert any("/train/" in p for p in read)
    # three classes: each film's most probable class once calibrated (no threshold); here a
    # bias that makes NORMAL the most probable everywhere
    (run / CALIBRATION).write_text(json.dumps(Calibration(bias=[9.0, 0.0, 0.0]).to_dict()))
    predictions = predict(run, data / "test")
    assert {p.label for p in predictions} == {"NORMAL"}
    assert all(p.label == max(p.probabilities, key=p.probabilities.get) for p in predictions)


def test_three_class_labels_of_a_manifest_are_kept_over_file_names(tmp_path, caplog):
    """A curated manifest's NORMAL/BACTERIA/VIRUS is the truth; only PNEUMONIA films take
    their subtype from the Kermany file name."""
    data = _three_class_tree(tmp_path / "data")
    samples = load_source(data).samples
    virus = next(s for s in samples if "_virus_" in s.path and s.split == "train")
    relabelled = [replace(s, label="NORMAL") if s is virus else s for s in samples]
    write_manifest(relabelled, tmp_path / "curated.csv")
    config = tiny_config(tmp_path / "curated.csv", tmp_path, **{"data.task": "3class"})
    labels = {s.path: s.label for s in prepare_samples(config.data)}
    assert labels[virus.path] == "NORMAL"
    assert {labels[s.path] for s in samples if "_bacteria_" in s.path} == {"BACTERIA"}
    assert (f"1 film(s) are labelled otherwise than their file names say, e.g. {virus.path} "
            "labelled NORMAL: the label is kept") in caplog.text


def test_three_class_task_needs_the_subtypes(tiny_kaggle, tmp_path):
    config = tiny_config(tiny_kaggle, tmp_path, **{"data.task": "3class"})
    with pytest.raises(DataLayoutError, match="3class needs NORMAL, BACTERIA and VIRUS"):
        task_classes("3class", prepare_samples(config.data))


def test_three_class_task_splits_pneumonia_only(tmp_path):
    """A folder of other films with Kermany names (COVID 19 holding person1_virus_2.jpeg)
    became VIRUS without a word: four curated classes trained as three."""
    data = _three_class_tree(tmp_path / "data")
    for split in ("train", "test"):
        covid = data / split / "COVID 19"
        covid.mkdir()
        for film in sorted((data / split / "PNEUMONIA").glob("*_virus_*"))[:2]:
            shutil.copy(film, covid / film.name.replace("person", "person9"))
    config = tiny_config(data, tmp_path, **{"data.task": "3class"})
    with pytest.raises(DataLayoutError, match=r"found \['BACTERIA', 'COVID 19', 'NORMAL', "
                                              r"'VIRUS'\]"):
        task_classes("3class", prepare_samples(config.data))


def test_cli_reports_a_bad_key_clearly(tiny_kaggle, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_kaggle), "--runs-dir",
                                      str(tmp_path), "--set", "optim.lrr=0.1"])
    assert result.exit_code == 2
    assert "unknown config key 'optim.lrr'" in result.output
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("cache", [True, False])
def test_a_split_with_no_readable_image_stops_before_training(tiny_kaggle, tmp_path, cache):
    """A manifest whose validation paths are wrong (written relative to another folder)."""
    samples = patient_split(load_source(tiny_kaggle).samples)
    moved = [replace(s, path=f"elsewhere/{Path(s.path).name}") if s.split == "val" else s
             for s in samples]
    manifest = write_manifest(moved, tmp_path / "manifest.csv")
    result = CliRunner().invoke(app, [
        "train", "--data", str(manifest), "--runs-dir", str(tmp_path / "runs"),
        "--set", "data.val_fraction=0", "--set", f"data.cache={str(cache).lower()}",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
        *[f"--set={k}={v}" for k, v in TINY.items()]])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "none of the" in message and "val images can be read" in message
    assert "elsewhere" in message and "relative paths in a CSV manifest" in message


@pytest.mark.parametrize("cache", [True, False])
def test_a_class_with_no_readable_training_film_stops_before_training(tmp_path, cache):
    """Every NORMAL training film emptied or cut short (an interrupted copy): it trained a
    model that never saw NORMAL, and exited 0."""
    data = make_kaggle_tree(tmp_path / "data", {"train": 6, "test": 2})
    for film in (data / "train" / "NORMAL").iterdir():  # empty, or cut short (no cache: read)
        film.write_bytes(b"" if cache else film.read_bytes()[:200])
    with pytest.raises(DataLayoutError, match="none of the .* NORMAL training films can be "
                                              "read, e.g. .*could never call NORMAL"):
        train(tiny_config(data, tmp_path, **{"data.cache": cache, "name": "first"}))
    assert not (tmp_path / "runs" / "first").exists()  # the name is free for the retry


def test_cli_lr_find_saves_the_plot(tiny_kaggle, tmp_path):
    """On the finetune recipe's head stage: steps over frozen features cost next to nothing."""
    out = tmp_path / "lr.png"
    result = CliRunner().invoke(app, [
        "lr-find", "--data", str(tiny_kaggle), "--preset", "finetune", "--out", str(out),
        "--num-training", "30", "--batch-size", "4", *[f"--set={k}={v}" for k, v in TINY.items()],
        f"--set=data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
    assert 1e-6 <= float(result.stdout.strip().splitlines()[-1]) <= 1.0


def test_lr_find_runs_its_steps_past_the_stages_epochs(tiny_kaggle, tmp_path):
    """A one-epoch stage of a few batches: the range test still takes all its steps."""
    result = CliRunner().invoke(app, [
        "lr-find", "--data", str(tiny_kaggle), "--preset", "scratch", "--out",
        str(tmp_path), "--num-training", "20", "--batch-size", "8",
        *[f"--set={k}={v}" for k, v in TINY.items()], "--set=stages.0.epochs=1",
        f"--set=data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert "stopped early" not in result.output
    plot = tmp_path / "lr_find.png"  # --out a folder: the plot goes in it, and is named
    assert plot.is_file() and str(plot) in "".join(result.output.split())
    # too few steps for Lightning's suggestion: said before any step, not as its error twice
    result = CliRunner().invoke(app, ["lr-find", "--data", str(tiny_kaggle), "--num-training",
                                      "10", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "the range test needs at least 20 steps" in result.output


def test_lr_find_sweeps_each_layer_group_at_its_share_of_the_heads_rate(tiny_kaggle, tmp_path):
    """Lightning swept every parameter group at one rate (the stem at the head's), while the
    recipe trains group d layers down at lr_decay**d of the head's rate."""
    seen = []
    hook = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: seen.append(
            {g["name"]: g["lr"] for g in optimizer.param_groups}))
    config = tiny_config(tiny_kaggle, tmp_path, "default", **{"stages.0.lr_decay": 0.5})
    try:
        find_lr(config, num_training=20)
    finally:
        hook.remove()
    assert len(seen) == 20 and seen[-1]["head"] > 1000 * seen[0]["head"]  # a sweep
    layers = sorted(int(name.split(".")[1]) for name in seen[0] if name != "head")
    assert len(layers) >= 2
    for rates in seen:
        for layer in layers:
            depth = layers[-1] + 1 - layer
            assert rates[f"backbone.{layer}"] == pytest.approx(rates["head"] * 0.5**depth)


def test_find_lr_from_python_writes_no_file_unless_asked(tiny_kaggle, tmp_path, monkeypatch):
    """It left lr_find.png in a notebook's folder."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tiny_kaggle, tmp_path / "work", "finetune",
                         **{"stages.0.batch_size": 4})
    suggestion = find_lr(config, num_training=20)
    assert suggestion is None or suggestion > 0
    assert not list(tmp_path.rglob("*.png"))


def test_a_full_disk_is_said_with_its_place_and_fix_not_a_bus_error_or_a_torch_trace(
        tiny_kaggle, tmp_path):
    """The decode cache, written through a memory map, met a full disk as SIGBUS (exit 135,
    nothing said, a .tmp left filling the disk); a checkpoint, as 291 lines of traceback
    ending in torch's "unexpected pos". (A file size limit stands in for the full disk.)"""
    cxr = str(Path(sys.executable).with_name("cxr"))
    train = [cxr, "train", "--data", str(tiny_kaggle), "--preset", "scratch", "--epochs", "1",
             "--runs-dir", str(tmp_path / "runs"), "--set", "data.num_workers=0",
             "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    cache = run_with_files_under(1_000_000, [*train, "--name", "a", "--set",
                                             "model.input_size=512"])
    assert cache.returncode == 2, cache.stderr[-2000:]
    said = " ".join(cache.stderr.split())
    assert f"error: no room for the decode cache in {tmp_path / 'cache' / 'decoded'} (" in said
    assert "MiB needed, past a file size limit: `ulimit -f`" in said
    assert "--set data.cache=false" in said and said.endswith(
        "then train again (the run held nothing to resume and was removed)")
    assert not list((tmp_path / "cache" / "decoded").iterdir())  # nothing left taking space
    assert not (tmp_path / "runs" / "a").exists()
    checkpoint = run_with_files_under(1_000_000, [*train, "--name", "b", "--set",
                                                  "data.cache=false"])
    assert checkpoint.returncode == 2, checkpoint.stderr[-2000:]
    run = tmp_path / "runs" / "b"
    said = " ".join(checkpoint.stderr.split())
    assert f"error: no room for the checkpoint best.ckpt in {run} (at least" in said
    assert said.endswith(f"then resume it (`--resume {run}`)")
    assert "Traceback" not in checkpoint.stderr and not list(run.glob(".*.partial"))
    resumed = run_with_files_under(100_000_000, [cxr, "train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # as said: resumed, and trained
    assert (run / "model.safetensors").is_file()


def test_running_out_of_memory_says_what_to_lower_and_how_to_go_on(tiny_kaggle, tmp_path,
                                                                    monkeypatch):
    """`cxr train` and `cxr run` out of memory printed 739 lines of traceback ending in the
    allocator's "can't allocate memory" (also checked by hand under `ulimit -v`)."""
    from cxrkit.config import out_of_memory

    with pytest.raises(RuntimeError) as allocation:
        torch.empty(2**60, dtype=torch.uint8)  # what PyTorch's CPU allocator raises
    assert out_of_memory(allocation.value) and out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("Expected all tensors to be on the same device"))

    def allocation_fails(*args, **kwargs):  # a GPU's memory running out in a step
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ClassifierModule, "training_step", allocation_fails)
    result = CliRunner().invoke(app, [
        "train", "--data", str(tiny_kaggle), "--preset", "scratch", "--runs-dir",
        str(tmp_path / "runs"), "--name", "oom", *[f"--set={k}={v}" for k, v in TINY.items()],
        f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=data.num_workers=0"])
    run = tmp_path / "runs" / "oom"
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said, result.output
    assert ("error: out of memory training oom at batch 8: train again with --set "
            "data.batch_size=4 (and a stage's own stages.N.batch_size if set) from its "
            f"config: `--config {run.absolute() / 'config.yaml'} --name NEW`") in said
    assert "num_workers" not in said  # already 0: not asked for again


def test_unreadable_films_are_listed_in_the_run_and_said_every_run(tmp_path, caplog):
    """The decode cache warned only on the run that built it; now each run says how many
    films it skips, and RUN/skipped_files.csv lists them."""
    data = make_kaggle_tree(tmp_path / "data", {"train": 12, "test": 2})
    bad = data / "train" / "PNEUMONIA" / "person9999_bacteria_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name in ("first", "second"):  # the second run reuses the decode cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="cxrkit"):
            run = train(tiny_config(data, tmp_path, **{"stages.0.epochs": 1, "name": name,
                                                        "data.val_fraction": 0.3}))
        assert any("cannot be read and are skipped" in r.getMessage() and str(bad) in
                   r.getMessage() for r in caplog.records), name
        split = next(s.split for s in read_manifest(run / "split.csv") if s.path == str(bad))
        assert read_rows(run / "skipped_files.csv") == [{"split": split, "path": str(bad)}]


def test_films_found_unreadable_without_the_cache_are_listed_too(tmp_path):
    """--no-cache: loader worker processes find them, each as it loads a film; the list was
    not written at all before. Two stages read the film (features, then fine-tuning)."""
    data = make_kaggle_tree(tmp_path / "data", {"train": 12, "test": 2})
    bad = data / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    settings = {**TINY, "data.num_workers": 2, "data.val_fraction": 0.3,
                "stages.0.epochs": 1, "stages.1.epochs": 1}
    result = CliRunner().invoke(app, [
        "train", "--data", str(data), "--preset", "finetune", "--no-cache", "--name", "nc",
        "--runs-dir", str(tmp_path / "runs"), *[f"--set={k}={v}" for k, v in settings.items()]])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "nc"
    split = next(s.split for s in read_manifest(run / "split.csv") if s.path == str(bad))
    assert read_rows(run / "skipped_files.csv") == [{"split": split, "path": str(bad)}]
    assert not list(run.glob(".unreadable-*"))  # the stages' own lists go when they end
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"1 film(s) could not be read and were skipped: {run / 'skipped_files.csv'}" in said


def test_trainer_settings_lightning_refuses_are_config_errors(tiny_kaggle, tmp_path):
    """A traceback from deep inside Lightning before; and no run folder is left to block the
    name."""
    config = tiny_config(tiny_kaggle, tmp_path, **{"trainer.strategy": "bogus", "name": "x"})
    with pytest.raises(ConfigError, match="Lightning refuses the trainer settings.*bogus"):
        train(config)
    assert not (tmp_path / "runs" / "x").exists()
    tpu = tiny_config(tiny_kaggle, tmp_path, **{"trainer.accelerator": "tpu", "name": "y"})
    with pytest.raises(ConfigError, match="Lightning refuses the trainer settings.*accelerator "
                                          "tpu"):  # its package (torch_xla) is not installed
        train(tpu)


def test_lr_find_refuses_a_stage_the_config_lacks(tmp_path):
    """Before any film is read (the data folder does not even exist)."""
    with pytest.raises(ConfigError, match=r"stage 2: this config has stages 0\.\.1"):
        find_lr(TrainConfig.preset("finetune", data=str(tmp_path / "none")), stage=2)


@pytest.mark.integration
@requires_real_data
def test_quick_preset_on_real_films(tmp_path):
    """ImageNet Lite0, its last layers fine-tuned: well above chance from 64 real films."""
    run = train(TrainConfig.preset("quick", data=str(REAL_DATA), overrides={
        "data.max_train_images": 64, "data.max_val_images": 64, "data.num_workers": 0,
        "data.cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"),
        "stages.0.epochs": 3, "data.batch_size": 16, "trainer.progress_bar": False,
    }))
    for name in ARTIFACTS:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert metrics["images"] == 64
    assert metrics["roc_auc"] > 0.8


def test_binary_task_needs_exactly_two_classes_and_pneumonia_is_positive_in_any_case():
    films = [Sample(f"{label}{i}.png", label, "train", f"p{i}")
             for i, label in enumerate(["normal", "Pneumonia", "VIRUS"])]
    with pytest.raises(DataLayoutError, match=r"binary needs two classes; .* 3: 'Pneumonia' "
                                              r"\(1\), 'VIRUS' \(1\), 'normal' \(1\)\. Fix the "
                                              r"folder names.*--task multiclass"):
        task_classes("binary", films)
    # a misspelt folder is named as one, not offered as a class (--task multiclass)
    typo = [*films[:2], Sample("x.png", "PNEUMOINA", "train", "p9")]
    with pytest.raises(DataLayoutError, match=r"PNEUMOINA \(1 films\) looks like Pneumonia: "
                                              r"merge them\.$"):
        task_classes("binary", typo)
    labels = task_classes("binary", films[:2])
    assert labels == ["Pneumonia", "normal"] and positive_index(labels) == 0
    films[1] = replace(films[1], split="val")  # a class validation has and train has not
    with pytest.raises(DataLayoutError, match="no training film is labelled Pneumonia: only "
                                              "validation has them"):
        task_classes("binary", films[:2])
    subtypes = [Sample(f"{label}.png", label, "train", label)
                for label in ("NORMAL", "BACTERIA", "VIRUS")]
    with pytest.raises(DataLayoutError, match=r"or train them all: --task 3class \(cxr "
                                              r"run: --set data.task=3class; Python: "
                                              r"overrides=\{'data.task': '3class'\}\)"):
        task_classes("binary", subtypes)
    assert positive_index(["NORMAL", "PNEUMONIA"]) == 1 and positive_index(["A", "B"]) == 1
    # a negative class named as such: the other label is the finding, wherever it sorts
    assert choose_positive(["ABNORMAL", "NORMAL"]) == "ABNORMAL"
    assert choose_positive(["TB", "healthy"]) == "TB"


def test_two_labels_neither_naming_the_finding_get_a_warning(tmp_path, caplog):
    data = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 1})
    for split in ("train", "test"):
        for old, new in (("NORMAL", "LEFT"), ("PNEUMONIA", "RIGHT")):
            (data / split / old).rename(data / split / new)
    run = new_run(tiny_config(data, tmp_path))
    assert run.classes == ["LEFT", "RIGHT"] and positive_index(run.classes) == 1
    assert ("labels LEFT and RIGHT: sensitivity, specificity and the threshold will be about "
            "RIGHT (the last label)") in caplog.text
    assert "If the finding is LEFT, name the other class NORMAL" in caplog.text


def test_a_runs_config_yaml_alone_reproduces_it_from_any_folder(tiny_kaggle, tmp_path,
                                                                monkeypatch):
    """config.yaml holds the data as an absolute path, and `--config` it is enough."""
    monkeypatch.chdir(tiny_kaggle.parent)
    args = ["--preset", "scratch", "--epochs", "1", "--runs-dir", str(tmp_path / "runs"),
            "--no-cache", *[f"--set={k}={v}" for k, v in TINY.items()]]
    first = CliRunner().invoke(app, ["train", "--data", tiny_kaggle.name, "--name", "a", *args])
    assert first.exit_code == 0, first.output
    config = tmp_path / "runs" / "a" / "config.yaml"
    assert TrainConfig.load(config).data.path == str(tiny_kaggle.resolve())
    monkeypatch.chdir(tmp_path)
    again = CliRunner().invoke(app, ["train", "--config", str(config), "--name", "b",
                                     "--runs-dir", str(tmp_path / "runs")])
    assert again.exit_code == 0, again.output
    runs = [tmp_path / "runs" / name for name in ("a", "b")]
    assert (runs[0] / "split.csv").read_text() == (runs[1] / "split.csv").read_text()
    metrics = [json.loads((run / "val_metrics.json").read_text()) for run in runs]
    assert metrics[0]["roc_auc"] == metrics[1]["roc_auc"]  # deterministic: the same run
    missing = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path / "runs")])
    assert missing.exit_code == 2 and "--data is required" in missing.output


def test_a_model_that_cannot_be_built_is_one_line_and_leaves_no_run(tiny_kaggle, tmp_path,
                                                                     monkeypatch):
    """timm weights are unreachable offline: a clear error, and --name stays free."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_kaggle), "--model",
                                      "timm:resnet18", "--name", "r18", "--runs-dir",
                                      str(tmp_path / "runs"), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert "could not fetch pretrained weights for timm:resnet18" in " ".join(
        result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "r18").exists()


def test_training_warns_of_test_patients_and_films_seen_in_train(tmp_path, caplog):
    samples = load_source(make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 1})).samples
    first_test = next(i for i, s in enumerate(samples) if s.split == "test")
    samples[first_test] = replace(samples[first_test], patient_id=samples[0].patient_id)
    write_manifest(samples, tmp_path / "leaky.csv")
    copied = Path(next(s.path for s in samples if s.split == "test"))
    copied.write_bytes(Path(samples[0].path).read_bytes())  # and a test film copied from train
    new_run(tiny_config(tmp_path / "leaky.csv", tmp_path))
    assert (f"1 patient id(s) of the test split also occur in train or val (e.g. "
            f"{samples[0].patient_id})") in caplog.text
    assert f"test film {copied} is a byte-identical copy of {samples[0].path}" in caplog.text


def test_a_run_is_trained_by_one_process_at_a_time(tiny_kaggle, tmp_path):
    run = new_run(tiny_config(tiny_kaggle, tmp_path, name="busy")).folder
    busy = "busy is being trained by another process now: wait for it to end"
    # as another `cxr train --resume` holds it while it trains
    with training_lock(run), pytest.raises(FileExistsError, match=busy):
        train(resume=run)
    assert (run / "config.yaml").is_file()  # left as it was
    # using it meanwhile is told to wait, not to resume it (the lock would refuse that)
    with training_lock(run), pytest.raises(FileNotFoundError, match="busy is being trained "
                                           "now: it has no model.safetensors yet; use it once"):
        load_model(run)
    with pytest.raises(FileNotFoundError, match="has not finished"):  # no one trains it now
        load_model(run)
    # two new runs of one --name started together: the one that loses the lock fails and
    # leaves the folder alone (it removed the other's config.yaml and split.csv mid-training)
    race = tmp_path / "runs" / "race"
    race.mkdir(parents=True)
    with training_lock(race), pytest.raises(FileExistsError, match="being trained"):
        train(tiny_config(tiny_kaggle, tmp_path, name="race"))
    assert (race / "config.yaml").is_file() and (race / "split.csv").is_file()


def test_max_images_take_a_seeded_subset_of_train_and_val_and_leave_test_whole(tiny_kaggle):
    from cxrkit.config import DataConfig

    def subset(seed: int) -> list[Sample]:
        return prepare_samples(DataConfig(path=str(tiny_kaggle), max_train_images=10,
                                          max_val_images=3), seed)

    def counts(samples: list[Sample]) -> dict[str, int]:
        return {split: sum(s.split == split for s in samples) for split in ("train", "val", "test")}

    assert counts(subset(0)) == {"train": 10, "val": 3, "test": 16}
    assert subset(0) == subset(0) and subset(0) != subset(1)


def test_training_leaves_the_callers_randomness_and_environment_alone(tiny_kaggle, tmp_path,
                                                                      monkeypatch):
    """A notebook's next cell drew seed 0's numbers, CXRKIT_RUN_DIR pointed at the last
    run (a DDP launch in a later cell would have trained into it), and its own matmuls ran
    in TF32 and under deterministic algorithms."""
    monkeypatch.delenv("CXRKIT_RUN_DIR", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    # (a Trainer another test made left Lightning's deterministic algorithms on)
    before = torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()
    torch.set_float32_matmul_precision("highest")
    torch.use_deterministic_algorithms(False)
    try:
        train(tiny_config(tiny_kaggle, tmp_path, **{"stages.0.epochs": 1,
                                                    "trainer.deterministic": True}))
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
        assert "CXRKIT_RUN_DIR" not in os.environ and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert (torch.get_float32_matmul_precision(),
                torch.are_deterministic_algorithms_enabled()) == ("highest", False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.use_deterministic_algorithms(before[1])


def test_training_leaves_no_decode_cache_file_open(tiny_kaggle, tmp_path):
    """Each split's cache entry stays locked while a stage uses it; the files were left for
    the garbage collector to close (a ResourceWarning, in pytest and `python -X dev`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        train(tiny_config(tiny_kaggle, tmp_path, "finetune", **{
            "stages.0.epochs": 1, "stages.1.epochs": 1}))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)
                and "valid.json" in str(w.message)]


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "16-mixed"),  # T4
                                                      ((7, 0), "16-mixed"),  # V100
                                                      ((8, 0), "bf16-mixed"),  # A100
                                                      ((9, 0), "bf16-mixed")])  # H100
def test_auto_precision_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch, capability,
                                                                   expected):
    """torch.cuda.is_bf16_supported() is True on a T4 (it counts emulation): auto chose
    bf16 there, slow at best. The GPU's answers are stood in for: this machine has none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    trainer = TrainConfig.preset("quick").trainer
    assert resolve_precision(trainer) == expected
    assert resolve_precision(replace(trainer, accelerator="cpu")) == "32-true"
    assert resolve_precision(replace(trainer, precision="32-true")) == "32-true"


def test_a_true_precision_trains(tiny_kaggle, tmp_path):
    """Accepted by the config, bf16-true (16-true, 64-true) failed on the first batch: the
    images stayed float32 while Lightning had made the weights bfloat16."""
    run = train(tiny_config(tiny_kaggle, tmp_path, **{"trainer.precision": "bf16-true",
                                                       "stages.0.epochs": 1}))
    assert json.loads((run / "stages.json").read_text())["train"]["global_step"] > 0
    assert predict(run, [next((tiny_kaggle / "test" / "NORMAL").iterdir())])[0].ok


def test_processes_a_launcher_started_share_one_run_folder(tiny_kaggle, tmp_path, monkeypatch):
    """torchrun and srun start every process themselves: each named its folder by its own
    clock and made its own, and the two-stage recipe failed looking for its features."""
    monkeypatch.setenv(RUN_DIR_ENV, "restored at the end")  # (so that teardown removes it)
    monkeypatch.delenv(RUN_DIR_ENV)
    for variable in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS",
                     "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    # Lightning's own launch leaves WORLD_SIZE set in the first process: not a launcher's
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "simple_cnn" in new_run(tiny_config(tiny_kaggle, tmp_path)).folder.name
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's own when not given one
    with pytest.raises(ConfigError, match="Give every process the same --name"):
        new_run(tiny_config(tiny_kaggle, tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert new_run(tiny_config(tiny_kaggle, tmp_path)).folder.name == "torchelastic-job7-simple_cnn"
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    # srun: each step of a job its own folder (two trainings in one job collided)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    for step in ("0", "1"):
        monkeypatch.setenv("SLURM_STEP_ID", step)
        assert new_run(tiny_config(tiny_kaggle, tmp_path)).folder.name == \
            f"slurm-4242.{step}-simple_cnn"
        monkeypatch.delenv(RUN_DIR_ENV)
    # torchrun inside a SLURM job: its own rendezvous id (each torchrun its own folder)
    monkeypatch.delenv("SLURM_STEP_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job8")
    assert new_run(tiny_config(tiny_kaggle, tmp_path)).folder.name == "torchelastic-job8-simple_cnn"
    assert new_run(tiny_config(tiny_kaggle, tmp_path, name="mine")).folder.name == "mine"


def test_a_multiclass_task_trains_evaluates_and_reports_every_class(tmp_path):
    """Four classes named as a researcher names them: only two classes or Kermany's three
    could be trained."""
    data = make_kaggle_tree(tmp_path / "data", {"train": 12, "test": 3})
    for split, n in (("train", 12), ("test", 3)):
        for k, name in enumerate(("COVID 19", "Tuberculose_é")):
            (data / split / name).mkdir()
            for i in range(n):  # each film its own patient: no rule reads these names
                synthetic_film("PNEUMONIA", 900 + 100 * k + i + 50 * (split == "test")).save(
                    data / split / name / f"{name[:3]}-{i}.png")
    labels = ["COVID 19", "NORMAL", "PNEUMONIA", "Tuberculose_é"]
    films = load_source(data).samples
    with pytest.raises(DataLayoutError, match="or train them all: --task multiclass"):
        task_classes("binary", films)
    with pytest.raises(DataLayoutError, match="--task multiclass is for three or more"):
        task_classes("multiclass", [s for s in films if s.label in labels[1:3]])
    run = train(tiny_config(data, tmp_path, **{"data.task": "multiclass",
                                               "stages.0.epochs": 1}))
    assert json.loads((run / "labels.json").read_text()) == labels
    out = evaluate_run(run, bootstrap=10, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_class"]) == labels and metrics["positive_class"] is None
    assert (out / "confusion_matrix.png").is_file()
    page = " ".join(build_report(run, evaluate_missing=False).read_text().split())
    assert "class Tuberculose_é" in page and "NORMAL against the other classes" in page
    [prediction] = predict(run, [data / "test" / "COVID 19" / "COV-0.png"])
    assert list(prediction.probabilities) == labels
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0)


def test_the_weight_average_moves_with_the_model_to_its_device(tiny_kaggle, tmp_path):
    """Lightning makes the average at setup, before the model moves to the GPU: it stayed
    on the host and every step copied every weight there. ("meta" stands in for the GPU this
    machine lacks.)"""
    config = tiny_config(tiny_kaggle, tmp_path, **{"stages.0.ema_decay": 0.5})
    [averaging] = [c for c in make_callbacks(tmp_path, config.trainer, config.stages[0])
                   if isinstance(c, WeightAveraging)]
    module = BoringModel()
    averaging.setup(None, module, "fit")  # at setup: the model still where it was made
    module.to("meta")  # then the strategy moves it
    averaging.on_fit_start(None, module)
    assert {p.device.type for p in averaging._average_model.parameters()} == {"meta"}


def test_loader_workers_are_shared_by_the_training_processes_of_a_machine(monkeypatch):
    """Each DDP process took every core but one for its loaders: a 64-core node with 8 GPUs
    started 128 workers per loader. (The GPUs are stood in for: this machine has none.)"""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    trainer = TrainConfig.preset("quick").trainer
    assert processes_here(trainer) == 8  # devices auto: every GPU
    assert processes_here(replace(trainer, devices="2")) == 2
    assert processes_here(replace(trainer, devices="0,1,2")) == 3
    assert processes_here(replace(trainer, accelerator="cpu")) == 1
    assert default_num_workers(1) == 16 and default_num_workers(8) == 7


def test_validation_of_one_class_writes_undefined_scores_as_null(tiny_kaggle, tmp_path):
    """torchmetrics scores ROC-AUC and specificity 0.0 on films of one class: the worst
    possible, in val_metrics.json, where metrics.json writes null."""
    train_films = [s for s in load_source(tiny_kaggle).samples if s.split == "train"]
    pneumonia = [s for s in train_films if s.label == "PNEUMONIA"][:6]
    rows = [replace(s, split="val" if s in pneumonia else "train") for s in train_films]
    manifest = write_manifest(rows, tmp_path / "one_class_val.csv")
    run = train(tiny_config(manifest, tmp_path, **{"stages.0.epochs": 1, "name": "one",
                                                   "data.val_fraction": 0}))  # its own val
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert metrics["roc_auc"] is None and metrics["specificity"] is None
    assert 0 <= metrics["sensitivity"] <= 1 and metrics["threshold"] == 0.5
    rows = dict(val_rows(metrics))  # the report's training section, and `cxr train`'s table
    assert rows["ROC-AUC"] == rows["Specificity at P = 0.5"] == "–"
    console = Console(width=200, record=True)
    console.print(metrics_table(run))
    assert console.export_text().count(" – ") == 2  # ROC-AUC and specificity


def test_sgd_trains_at_any_momentum_the_config_allows(tiny_kaggle, tmp_path):
    """momentum 0 passed the config's check, then Nesterov SGD refused it mid-run."""
    config = tiny_config(tiny_kaggle, tmp_path, **{
        "optim.optimizer": "sgd", "optim.momentum": 0.0, "stages.0.epochs": 1, "name": "sgd"})
    assert (train(config) / "model.safetensors").is_file()


def test_training_says_the_datas_notes(tiny_kaggle, tmp_path, caplog):
    """Folders ignored, columns not read, rows repeated: the audit listed them, and training,
    which runs without an audit, said nothing (a VIRUS folder left empty was dropped)."""
    classes = tmp_path / "classes"
    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(tiny_kaggle / "train" / label, classes / label)
    (classes / "VIRUS").mkdir()
    config = tiny_config(classes, tmp_path)
    with caplog.at_level("INFO"):
        prepare_samples(config.data, config.seed)
    assert f"{classes}: ignored empty folders: VIRUS" in caplog.text


def test_the_datas_own_val_split_is_said_joined_or_checked(tiny_kaggle, tmp_path, caplog):
    """A curated val split went into train without a word; kept (val_fraction 0), a patient
    in both train and val went unsaid."""
    films = [s for s in load_source(tiny_kaggle).samples if s.split == "train"]
    val = {films[0].path, films[-1].path}  # each with a train film of its patient
    rows = [replace(s, split="val" if s.path in val else "train") for s in films]
    manifest = write_manifest(rows, tmp_path / "curated.csv")
    for fraction, said in ((0.15, "its own val split (2 films) joins train"),
                           (0, f"2 patient id(s) have films in both its train and val splits "
                               f"(e.g. {films[0].patient_id})")):
        caplog.clear()
        config = tiny_config(manifest, tmp_path, **{"data.val_fraction": fraction})
        with caplog.at_level("INFO"):
            prepare_samples(config.data, config.seed)
        assert said in caplog.text, fraction


def test_a_class_folder_without_images_is_named_in_the_error(tiny_kaggle, tmp_path):
    """PNEUMONIA/ left empty: the error said the data had one class folder when it had two."""
    classes = tmp_path / "classes"
    shutil.copytree(tiny_kaggle / "train" / "NORMAL", classes / "NORMAL")
    (classes / "PNEUMONIA").mkdir()
    with pytest.raises(DataLayoutError, match=r"has only the class \['NORMAL'\] \(ignored empty "
                                              r"folders: PNEUMONIA: they hold no images\); a "
                                              r"classifier needs at least two class folders with "
                                              r"images"):
        load_source(classes)


@pytest.mark.slow
def test_on_a_terminal_each_epoch_is_logged_above_the_bar_and_into_run_log(tiny_kaggle,
                                                                           tmp_path):
    """On a terminal the bar alone showed training: run.log recorded no epoch, and a log
    line said while the bar drew was written onto the bar's own line (torn)."""
    import pty
    import re

    primary, secondary = pty.openpty()
    run = tmp_path / "runs" / "tty"
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("cxr")), "train", "--data", str(tiny_kaggle),
         "--preset", "scratch", "--runs-dir", str(tmp_path / "runs"), "--name", "tty",
         "--num-workers", "0", "--set", "model.input_size=32", "--set", "stages.0.epochs=2",
         "--set", f"data.cache_dir={tmp_path / 'cache'}"], stdin=subprocess.DEVNULL,
        stdout=secondary, stderr=secondary, env={**os.environ, "TERM": "xterm-256color",
                                                 "COLUMNS": "100"})
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=120) == 0, output.decode(errors="replace")[-3000:]
    # colours and cursor moves out: what is left is the text, and where its lines begin
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert "Epoch 2/2" in shown  # the bar drew
    epochs = re.findall(r"(.)\[\d\d:\d\d:\d\d\] INFO train, epoch (\d)/2: val_accuracy", shown)
    # each at the start of a line of its own (the terminal sends a newline as "\r\n")
    assert [epoch for _, epoch in epochs] == ["1", "2"] and all(
        before in "\r\n" for before, _ in epochs), epochs
    assert (run / "run.log").read_text(encoding="utf-8").count(": val_accuracy ") == 2


def test_a_dumb_terminal_gets_log_lines_not_a_bar(monkeypatch):
    """TERM=dumb (CI's pseudo-terminals, Emacs shells): the bar was chosen because stdout is
    a terminal, and Rich, unable to redraw, showed nothing until training ended."""
    from cxrkit.training.callbacks import shows_a_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert shows_a_bar()
    monkeypatch.setenv("TERM", "dumb")
    assert not shows_a_bar()


def test_a_stage_that_stops_early_says_so(tiny_kaggle, tmp_path, caplog):
    """A fine-tuning stage ended two epochs into eight, its weights not kept, and nothing
    said it: students took the short curve for a bug."""
    config = tiny_config(tiny_kaggle, tmp_path, **{
        "stages.0.epochs": 4, "stages.0.lr": 1e-12,  # nothing learnt: nothing improves
        "trainer.early_stopping_patience": 1})
    with caplog.at_level(logging.INFO, logger="cxrkit.training.callbacks"):
        train(config)
    said = [r.getMessage() for r in caplog.records if "stops early" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("stage train stops early after epoch 2 of 4: "
                                                 "val_roc_auc has not improved for 1 epoch(s)")
