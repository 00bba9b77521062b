"""`cxr train --resume` after a SIGKILL part way through an epoch: the same run as without it."""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from typer.testing import CliRunner

from cxrkit.cli import app
from tests.conftest import signal_once_checkpointed

CXR = [str(Path(sys.executable).with_name("cxr"))]  # the installed command
STEPS_PER_EPOCH = 10  # 40 training images, batches of 4
FINETUNE_EPOCHS = 4


def train_args(data: Path, tmp: Path, name: str) -> list[str]:
    settings = {
        "model.name": "simple_cnn", "model.pretrained": "false", "model.input_size": 32,
        "stages.0.epochs": 1, "stages.1.epochs": FINETUNE_EPOCHS,
        "trainer.checkpoint_every_n_steps": 3, "trainer.early_stopping_patience": "null",
        "trainer.progress_bar": "false", "trainer.log_every_n_steps": 1,
        "data.cache_dir": tmp / "cache",
    }
    return ["train", "--data", str(data), "--preset", "finetune", "--runs-dir", str(tmp / "runs"),
            "--name", name, "--deterministic", "--num-workers", "0", "--batch-size", "4",
            *[f"--set={k}={v}" for k, v in settings.items()]]


def checkpoint(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not there yet, or caught half written
        return None


def kill_mid_epoch(args: list[str], run: Path) -> dict:
    """Start `cxr train`, SIGKILL it once last.ckpt is from the middle of stage 2."""
    process = subprocess.Popen([*CXR, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            last = run / "last.ckpt"
            if last.exists() and last.stat().st_mtime_ns != seen:
                seen = last.stat().st_mtime_ns
                ckpt = checkpoint(last)
                if (ckpt and ckpt["hyper_parameters"]["stage"]["name"] == "finetune"
                        and ckpt["global_step"] >= 12):
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        process.kill()
        stderr = process.communicate()[1]
    assert process.returncode == -signal.SIGKILL, f"the run was not killed:\n{stderr[-3000:]}"
    return checkpoint(run / "last.ckpt")


def val_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", encoding="utf-8", newline="") as f:
        return [r for r in csv.DictReader(f) if r["val_loss"] and r["stage"] == "finetune"]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_kaggle, tmp_path):
    killed = tmp_path / "runs" / "killed"
    at_kill = kill_mid_epoch(train_args(tiny_kaggle, tmp_path, "killed"), killed)
    step = at_kill["global_step"]
    assert step % STEPS_PER_EPOCH != 0, "the kill should land mid-epoch"
    assert json.loads((killed / "stages.json").read_text()).keys() == {"head"}
    assert not (killed / "model.safetensors").exists()

    resumed = subprocess.run([*CXR, "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("Restored all states") == 1  # one trainer, each line once
    said = " ".join(resumed.stderr.split())
    assert f"stage finetune resumes from last.ckpt, after its step {step}" in said
    assert "GPU available" not in resumed.stderr  # Lightning's lines nobody can act on
    assert resumed.stdout.strip().splitlines()[-1] == str(killed)

    reference = CliRunner().invoke(app, train_args(tiny_kaggle, tmp_path, "reference"))
    assert reference.exit_code == 0, reference.output
    uninterrupted = tmp_path / "runs" / "reference"

    def steps_and_epochs(run):  # wall-clock seconds differ between the two runs
        return {name: {k: v for k, v in record.items() if k != "seconds"}
                for name, record in json.loads((run / "stages.json").read_text()).items()}

    stages = steps_and_epochs(killed)
    assert stages == steps_and_epochs(uninterrupted)
    assert stages["finetune"]["global_step"] == FINETUNE_EPOCHS * STEPS_PER_EPOCH
    # stage 1 was not trained again; stage 2 went on from the checkpoint, not from step 0
    assert not (killed / "logs" / "head" / "version_1").exists()
    log = killed / "logs" / "finetune" / "version_1" / "metrics.csv"
    with open(log, encoding="utf-8", newline="") as f:
        assert min(int(r["step"]) for r in csv.DictReader(f)) >= step
    rows, expected_rows = val_rows(killed), val_rows(uninterrupted)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(FINETUNE_EPOCHS)]
    # the interrupted epoch went on with its own remaining films, their augmentations and
    # dropout as drawn before: the resumed run is the uninterrupted one, epoch for epoch
    for row, expected in zip(rows, expected_rows, strict=True):
        assert float(row["val_loss"]) == pytest.approx(float(expected["val_loss"]), abs=1e-5)
        assert row["val_accuracy"] == expected["val_accuracy"]
    for name in ("model.safetensors", "val_metrics.json", "training_curves.png", "best.ckpt"):
        assert (killed / name).is_file()


@pytest.mark.slow
def test_sigterm_stops_with_exit_143_and_says_how_to_resume(tiny_kaggle, tmp_path):
    """A scheduler's SIGTERM: Lightning stops after the batch; the command must not exit 0
    (a job chain would take it for success) and must name the resume command."""
    run = tmp_path / "runs" / "stopped"
    process = subprocess.Popen([*CXR, *train_args(tiny_kaggle, tmp_path, "stopped")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_once_checkpointed(process, run, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "".join(f"cxr train --resume {run}".split()) in "".join(stderr.split())
    assert "weights_only" not in stderr  # Lightning's word on saving read as an unsafe load
    assert not (run / "model.safetensors").exists() and stdout == ""
    assert "training stopped by SIGTERM" in (run / "run.log").read_text(encoding="utf-8")
    # `cxr run` (`make run`) names itself: `cxr train --resume` would not evaluate or report
    sets = {"model.name": "simple_cnn", "model.pretrained": "false", "model.input_size": 32,
            "stages.0.epochs": FINETUNE_EPOCHS, "trainer.checkpoint_every_n_steps": 3,
            "trainer.early_stopping_patience": "null", "trainer.progress_bar": "false",
            "trainer.deterministic": "true", "data.num_workers": 0, "data.batch_size": 4,
            "data.cache_dir": tmp_path / "cache"}
    process = subprocess.Popen([*CXR, "run", str(tiny_kaggle), "--preset", "scratch",
                                "--runs-dir", str(tmp_path / "runs"), "--name", "job",
                                *[f"--set={k}={v}" for k, v in sets.items()]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_once_checkpointed(process, tmp_path / "runs" / "job", signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr[-3000:]
    said = "".join(stderr.split())
    assert "".join(f"cxr run --resume {tmp_path / 'runs' / 'job'}".split()) in said


@pytest.mark.slow
def test_a_retried_job_continues_its_run_and_refuses_another_config(tiny_kaggle, tmp_path):
    """`--resume-if-exists`: one command line a CI retry or a restarted container repeats
    as it is; it continues the run it names, never replaces it with another config."""
    sets = {"model.name": "simple_cnn", "model.pretrained": "false", "model.input_size": 32,
            "stages.0.epochs": 2, "trainer.checkpoint_every_n_steps": 3,
            "trainer.progress_bar": "false", "data.num_workers": 0, "data.batch_size": 4,
            "data.cache_dir": tmp_path / "cache"}
    options = [str(tiny_kaggle), "--preset", "scratch", "--runs-dir", str(tmp_path / "runs"),
               "--name", "job", "--resume-if-exists", *[f"--set={k}={v}" for k, v in
                                                        sets.items()]]
    job, run = [*CXR, "train", "--data", *options], tmp_path / "runs" / "job"
    process = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_once_checkpointed(process, run, signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr[-3000:]
    stopped_at = checkpoint(run / "last.ckpt")["global_step"]

    again = subprocess.run(job, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == str(run), again.stderr[-3000:]
    assert f"{run} holds this run already: continuing it" in " ".join(again.stderr.split())
    with open(run / "split.csv", encoding="utf-8", newline="") as f:
        trained = sum(row["split"] == "train" for row in csv.DictReader(f))
    [stage] = json.loads((run / "stages.json").read_text(encoding="utf-8")).values()
    assert stage["global_step"] == 2 * -(-trained // 4) > stopped_at  # both epochs, once

    model = (run / "model.safetensors").read_bytes()
    changed = CliRunner().invoke(app, ["run", *options, "--set", "stages.0.epochs=5"])
    said = " ".join(changed.output.split())
    assert changed.exit_code == 2 and "holds a run of another config (stages.0.epochs" in said
    assert (run / "model.safetensors").read_bytes() == model  # left as it was
    nameless = CliRunner().invoke(app, ["train", "--data", str(tiny_kaggle),
                                        "--resume-if-exists"])
    assert nameless.exit_code == 2 and "needs --name" in " ".join(nameless.output.split())


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path):
    """Written beside and renamed over: a crash mid-write (here: something torch.save cannot
    pickle, raised half way) must not truncate the last good checkpoint."""
    from cxrkit.training.callbacks import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3, "w": torch.ones(1000)}, path)
    with pytest.raises(Exception):  # noqa: B017 (pickle's error type is not the point)
        io.save_checkpoint({"global_step": 4, "w": torch.ones(1000), "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_a_moved_run_folder_keeps_its_best_score(tmp_path):
    """Lightning drops the restored best score when the folder's path changed; the next,
    worse epoch would then replace best.ckpt."""
    from cxrkit.config import TrainerConfig
    from cxrkit.training.callbacks import best_checkpoint

    old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
    new.mkdir(parents=True)
    state = {"monitor": "val_roc_auc", "best_model_score": torch.tensor(0.99),
             "best_model_path": str(old / "best.ckpt"), "current_score": torch.tensor(0.99),
             "dirpath": str(old), "best_k_models": {str(old / "best.ckpt"): torch.tensor(0.99)},
             "kth_best_model_path": str(old / "best.ckpt"), "kth_value": torch.tensor(0.99),
             "last_model_path": ""}
    # saved under Lightning's own ModelCheckpoint key, as runs before this class were
    key = ModelCheckpoint(dirpath=new, filename="best", monitor="val_roc_auc", mode="max",
                          save_top_k=1, auto_insert_metric_name=False,
                          enable_version_counter=False).state_key
    torch.save({"callbacks": {key: state}}, new / "best.ckpt")
    callback = best_checkpoint(new, TrainerConfig())
    assert callback.state_key == key
    assert float(callback.best_model_score) == pytest.approx(0.99)
    assert callback.best_model_path == str(new / "best.ckpt")
    assert list(callback.best_k_models) == [str(new / "best.ckpt")]
    # nothing it keeps is a view into best.ckpt: on Windows a mapped file cannot be replaced
    gc.collect()
    maps = Path("/proc/self/maps")
    if maps.is_file():
        assert str(new / "best.ckpt") not in maps.read_text(encoding="utf-8")


class CtrlCDuringStep(Callback):
    """A real Ctrl+C (SIGINT to this process), delivered in the middle of training step
    `step`: after its forward pass, before its optimiser step."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def test_ctrl_c_stops_after_its_step_and_the_resumed_run_is_the_uninterrupted_one(
        tiny_kaggle, tmp_path, monkeypatch):
    """Ctrl+C mid-step finishes that step, writes last.ckpt there (step checkpoints alone
    would lose up to checkpoint_every_n_steps) and exits as interrupted; resuming after
    config.yaml was edited, with a damaged last.ckpt or after the data moved is refused with
    the fix; the resumed run then equals one never interrupted."""
    from cxrkit.config import ConfigError, DamagedCheckpointError, TrainConfig
    from cxrkit.data.layout import DataLayoutError
    from cxrkit.training import fit, train

    data = shutil.copytree(tiny_kaggle, tmp_path / "data")  # moved below
    config = scratch_config(data, tmp_path, epochs=2, checkpoint_every=1000)
    before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN under `pytest &`
    interrupt_at_step(config, 12, monkeypatch)
    assert signal.getsignal(signal.SIGINT) is before  # given back
    run = tmp_path / "runs" / "stopped"
    assert checkpoint(run / "last.ckpt")["global_step"] == 13  # step 12 finished, none lost

    original = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(original.replace("epochs: 2", "epochs: 3"))
    with pytest.raises(ConfigError, match=r"changed since last.ckpt.*\(stages.0.epochs\)"):
        train(resume=run)
    (run / "config.yaml").write_text(original.replace("batch_size: 4", "batch_size: 8", 1))
    with pytest.raises(ConfigError, match=r"\(data.batch_size\)"):  # not only the stage keys
        train(resume=run)
    (run / "config.yaml").write_text(original.replace("num_workers: 0", "num_workers: 1"))
    assert fit.resume_point(run, TrainConfig.load(run / "config.yaml"), 0) == run / "last.ckpt"
    (run / "config.yaml").write_text(original)

    good = (run / "last.ckpt").read_bytes()
    (run / "last.ckpt").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match="delete it and resume"):
        train(resume=run)
    (run / "last.ckpt").write_bytes(good)

    data.rename(tmp_path / "moved")  # the data moved since the run started: one clear error
    with pytest.raises(DataLayoutError, match=r"none of the \d+ train/val films.*moved"):
        train(resume=run)
    (tmp_path / "moved").rename(data)

    train(resume=run)
    assert json.loads((run / "stages.json").read_text())["train"]["global_step"] == 2 * 10
    reference = train(config.updated({"name": "reference"}))
    assert column(run, "val_loss") == column(reference, "val_loss")
    # the interrupted epoch's mean training loss covers its steps before the stop too
    assert column(run, "train_loss_epoch") == column(reference, "train_loss_epoch")
    # finished: resuming trains nothing, and an edited config.yaml is refused there too
    (run / "config.yaml").write_text(original.replace("lr: 0.002", "lr: 0.003", 1))
    with pytest.raises(ConfigError, match=r"changed since the run was trained "
                                          r"\(stages.0.lr\): it no longer describes"):
        train(resume=run)
    (run / "config.yaml").write_text(original)
    stages = (run / "stages.json").read_text()
    assert train(resume=run) == run and (run / "stages.json").read_text() == stages


def test_a_stop_in_an_epochs_last_batch_resumes_into_its_validation(tiny_kaggle, tmp_path,
                                                                     monkeypatch):
    """A step checkpoint that falls on an epoch's last batch (10 steps an epoch, one every
    10) would resume with that epoch counted as done: its validation never run, its mean
    loss never logged. Stopped there (Ctrl+C, so during that validation), the resumed run is
    still the uninterrupted one, epoch for epoch."""
    from cxrkit.training import train

    config = scratch_config(tiny_kaggle, tmp_path, epochs=3, checkpoint_every=10)
    interrupt_at_step(config, 19, monkeypatch)  # the last batch of the second epoch
    run = train(resume=tmp_path / "runs" / "stopped")
    reference = train(config.updated({"name": "reference"}))
    for name in ("val_loss", "train_loss_epoch"):
        assert len(column(reference, name)) == 3
        assert column(run, name) == column(reference, name), name


def scratch_config(data: Path, tmp_path: Path, epochs: int, checkpoint_every: int):
    """A from-scratch simple_cnn run named `stopped`: 40 training films, 10 steps an epoch."""
    from cxrkit.config import TrainConfig

    return TrainConfig.preset("scratch", data=str(data), overrides={
        "model.name": "simple_cnn", "model.pretrained": False, "model.input_size": 32,
        "data.batch_size": 4, "data.num_workers": 0, "data.cache_dir": str(tmp_path / "cache"),
        "trainer.progress_bar": False, "trainer.log_every_n_steps": 1,
        "trainer.checkpoint_every_n_steps": checkpoint_every,
        "trainer.early_stopping_patience": None, "stages.0.epochs": epochs,
        "runs_dir": str(tmp_path / "runs"), "name": "stopped"})


def interrupt_at_step(config, step: int, monkeypatch) -> None:
    """Train `config` with a real Ctrl+C in the middle of training step `step`."""
    from cxrkit.training import TrainingInterrupted, fit, train

    make_callbacks = fit.make_callbacks
    monkeypatch.setattr(fit, "make_callbacks", lambda *a, **k: [*make_callbacks(*a, **k),
                                                                 CtrlCDuringStep(step)])
    with pytest.raises(TrainingInterrupted, match=r"Ctrl\+C"):
        train(config)
    monkeypatch.setattr(fit, "make_callbacks", make_callbacks)


def column(run: Path, name: str) -> list[float]:
    """The values of metrics.csv's column `name`, in order, to 6 decimals."""
    with open(run / "metrics.csv", encoding="utf-8", newline="") as f:
        return [round(float(r[name]), 6) for r in csv.DictReader(f) if r[name]]


def test_resume_refuses_the_options_it_would_ignore(tmp_path):
    run = tmp_path / ("a-run-folder-with-a-long-name-" * 3)  # longer than the terminal is wide
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2",
                                      "--set", "optim.schedule=constant"], env={"COLUMNS": "80"})
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "--epochs, --set would be ignored" in message
    # the command to run instead is printed whole, never cut inside a path: it stays copyable
    assert f"--config {run}/config.yaml --name NEW" in result.output
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path), "--tta", "--name", "x"])
    assert result.exit_code == 2 and "--name would be ignored" in " ".join(result.output.split())


def test_a_frozen_features_stage_resumed_part_way_is_the_uninterrupted_one(tiny_kaggle, tmp_path,
                                                                         monkeypatch):
    """The head fit on features extracted once goes on, after Ctrl+C mid-epoch, with that
    epoch's own remaining batches, as the image stages do."""
    from cxrkit.training import train

    config = scratch_config(tiny_kaggle, tmp_path, epochs=2, checkpoint_every=1000).updated({
        "stages": [{"name": "head", "epochs": 2, "lr": 3e-3, "unfreeze": "none",
                    "frozen_features": True}]})
    interrupt_at_step(config, 13, monkeypatch)
    run = tmp_path / "runs" / "stopped"
    assert checkpoint(run / "last.ckpt")["global_step"] == 14  # in the second epoch
    train(resume=run)
    reference = train(config.updated({"name": "reference"}))
    assert column(run, "val_loss") == column(reference, "val_loss")


class Killed(BaseException):
    """The process dies here: no handler runs, nothing more is written (as with SIGKILL)."""


class KillOnceBestIsOfStage(Checkpoint):
    """Dies at an epoch's end between best.ckpt's save and last.ckpt's, once best.ckpt holds
    `stage`'s weights (a Checkpoint: Lightning runs those in their order, after the rest)."""

    def __init__(self, run: Path, stage: str):
        self.run, self.stage = run, stage

    def on_train_epoch_end(self, trainer, pl_module):
        best = checkpoint(self.run / "best.ckpt")
        if best and best["hyper_parameters"]["stage"]["name"] == self.stage:
            raise Killed


def test_a_later_stage_killed_before_its_own_last_ckpt_starts_again_from_its_start(
        tiny_kaggle, tmp_path, monkeypatch):
    """Killed in stage 2 after its first validation rewrote best.ckpt but before last.ckpt
    of its own (at that epoch's end, between the two saves): the resume trains stage 2 again
    from the best of stage 1, not from the killed attempt's weights best.ckpt then held."""
    import cxrkit.training.fit
    from cxrkit.training import train
    from tests.test_training import tiny_config

    # a head that learns nearly nothing: the first fine-tuning epoch already beats it, and
    # its end is where the kill can fall between best.ckpt's save and last.ckpt's
    settings = {"stages.0.epochs": 1, "stages.0.lr": 1e-5, "stages.1.epochs": 3,
                "stages.1.lr": 2e-3, "trainer.monitor": "val_loss",
                "trainer.checkpoint_every_n_steps": 1000}
    uninterrupted = train(tiny_config(tiny_kaggle, tmp_path, "finetune", name="whole",
                                      **settings))
    config = tiny_config(tiny_kaggle, tmp_path, "finetune", name="killed", **settings)
    killed = Path(config.runs_dir) / "killed"
    real_callbacks = cxrkit.training.fit.make_callbacks

    def with_a_kill(*args, **kwargs):  # between best_checkpoint (first) and last.ckpt's
        best, *rest = real_callbacks(*args, **kwargs)
        return [best, KillOnceBestIsOfStage(killed, "finetune"), *rest]

    monkeypatch.setattr(cxrkit.training.fit, "make_callbacks", with_a_kill)
    with pytest.raises(Killed):
        train(config)
    stage = {name: checkpoint(killed / name)["hyper_parameters"]["stage"]["name"]
             for name in ("best.ckpt", "last.ckpt")}
    assert stage == {"best.ckpt": "finetune", "last.ckpt": "head"}  # the case in question
    monkeypatch.undo()
    train(resume=killed)
    assert not list(killed.glob("start-*.ckpt"))  # kept only while its stage runs
    weights = [safetensors.torch.load_file(run / "model.safetensors")
               for run in (killed, uninterrupted)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=1e-6, msg=name)


class SignalAtBatch(Callback):
    """Ctrl+C delivered to this process as training batch `index` ends."""

    def __init__(self, index: int):
        self.index, self.sent = index, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.index and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_with_accumulated_gradients_waits_for_the_end_of_the_step(
        tiny_kaggle, tmp_path, monkeypatch):
    """Ctrl+C in the middle of an optimiser step's batches: the stop waits for the step's
    last batch (the gradients of a step part done are in no checkpoint), and the resumed
    run is the uninterrupted one."""
    import cxrkit.training.fit
    from cxrkit.training import TrainingInterrupted, train
    from tests.test_training import tiny_config

    settings = {"data.batch_size": 4, "trainer.accumulate_grad_batches": 4, "stages.0.epochs": 2,
                "trainer.checkpoint_every_n_steps": 1000}
    uninterrupted = train(tiny_config(tiny_kaggle, tmp_path, name="whole", **settings))
    real_callbacks = cxrkit.training.fit.make_callbacks
    monkeypatch.setattr(cxrkit.training.fit, "make_callbacks", lambda *a, **k: [
        *real_callbacks(*a, **k), SignalAtBatch(5)])  # batches 4-7 make the second step
    config = tiny_config(tiny_kaggle, tmp_path, name="stopped", **settings)
    with pytest.raises(TrainingInterrupted):
        train(config)
    stopped = Path(config.runs_dir) / "stopped"
    progress = checkpoint(stopped / "last.ckpt")["loops"]["fit_loop"]
    assert progress["epoch_loop.batch_progress"]["current"]["completed"] == 8
    assert checkpoint(stopped / "last.ckpt")["global_step"] == 2
    monkeypatch.undo()
    train(resume=stopped)
    weights = [safetensors.torch.load_file(run / "model.safetensors")
               for run in (stopped, uninterrupted)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=1e-6, msg=name)


class SavesAt(Callback):
    """Notes how many batches of its epoch had run at each checkpoint save."""

    def __init__(self):
        self.batches: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.batches.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def test_no_checkpoint_is_taken_part_way_through_an_optimiser_step(tiny_kaggle, tmp_path,
                                                                   monkeypatch):
    """With gradients accumulated over 2 batches and a step checkpoint every 5 steps (an
    epoch's 5), no checkpoint falls between an optimiser step's batches: its gradients
    would be in no file, and a run resumed there would differ."""
    import cxrkit.training.fit
    from cxrkit.training import train
    from tests.test_training import tiny_config

    saves = SavesAt()
    real_callbacks = cxrkit.training.fit.make_callbacks
    monkeypatch.setattr(cxrkit.training.fit, "make_callbacks",
                        lambda *a, **k: [*real_callbacks(*a, **k), saves])
    train(tiny_config(tiny_kaggle, tmp_path, name="run", **{
        "data.batch_size": 4, "trainer.accumulate_grad_batches": 2, "stages.0.epochs": 3,
        "trainer.checkpoint_every_n_steps": 5}))
    assert saves.batches and all(n % 2 == 0 for n in saves.batches), saves.batches


class KillOnceStopped(Checkpoint):
    """Dies at the end of the epoch where early stopping ends the stage, its saves made."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.should_stop:
            raise Killed


def test_a_stage_stopped_early_stays_stopped_after_a_kill(tiny_kaggle, tmp_path, monkeypatch):
    """Lightning does not save that early stopping ended a stage: killed after the stopping
    epoch's checkpoint, the resume trained on (and replaced best.ckpt)."""
    import cxrkit.training.fit
    from cxrkit.training import train
    from tests.test_training import tiny_config

    settings = {"stages.0.epochs": 8, "trainer.early_stopping_patience": 1,
                "trainer.monitor": "val_loss"}
    whole = train(tiny_config(tiny_kaggle, tmp_path, name="whole", **settings))
    steps = json.loads((whole / "stages.json").read_text())["train"]["global_step"]
    assert len(column(whole, "val_loss")) < 8  # it did stop early
    real_callbacks = cxrkit.training.fit.make_callbacks
    monkeypatch.setattr(cxrkit.training.fit, "make_callbacks",
                        lambda *a, **k: [*real_callbacks(*a, **k), KillOnceStopped()])
    config = tiny_config(tiny_kaggle, tmp_path, name="killed", **settings)
    with pytest.raises(Killed):
        train(config)
    monkeypatch.undo()
    killed = train(resume=Path(config.runs_dir) / "killed")
    assert json.loads((killed / "stages.json").read_text())["train"]["global_step"] == steps
    assert column(killed, "val_loss") == column(whole, "val_loss")


def test_a_resume_clears_what_a_finished_stage_left_behind(tiny_kaggle, tmp_path):
    """Killed just after a stage was marked finished, before it removed its extracted
    features and starting point: the next resume removes them (they are tens of MB)."""
    from cxrkit.training import train
    from tests.test_training import tiny_config

    run = train(tiny_config(tiny_kaggle, tmp_path, name="run", **{"stages.0.epochs": 1}))
    [stage] = json.loads((run / "stages.json").read_text())
    leftovers = [run / f"features-{stage}.safetensors", run / f"start-{stage}.ckpt"]
    for file in leftovers:
        file.write_bytes(b"left by a kill")
    stages = (run / "stages.json").read_text()
    train(resume=run)
    assert not any(file.exists() for file in leftovers)
    assert (run / "stages.json").read_text() == stages  # nothing trained again


class SigtermWhilePickled:
    """Sends SIGTERM to this process while torch.save pickles it."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (dict, ())


def test_a_sigterm_during_a_checkpoint_write_waits_for_the_write(tmp_path):
    """Raised inside torch.save, SIGTERM turned into torch's RuntimeError (a traceback, no
    resume command): it is raised once the checkpoint is whole."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cxrkit.training.callbacks import AtomicCheckpointIO, sigterm_raises

    with sigterm_raises(), pytest.raises(SIGTERMException):
        AtomicCheckpointIO().save_checkpoint({"state": torch.ones(3), "x": SigtermWhilePickled()},
                                             tmp_path / "last.ckpt")
    # whole (this test's own file; its object pickles by a reduce weights_only refuses)
    written = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(written["state"], torch.ones(3)) and written["x"] == {}


def test_a_sigterm_during_feature_extraction_stops_with_the_resume_command(
        tiny_kaggle, tmp_path, monkeypatch):
    """Outside a stage's fit SIGTERM killed the process silently; now it stops as inside
    one (TrainingInterrupted: exit 143 and the command), and the resume loses nothing."""
    import cxrkit.training.features
    from cxrkit.training import TrainingInterrupted, train
    from tests.test_training import tiny_config

    settings = {"stages.0.epochs": 1, "stages.1.epochs": 1}
    uninterrupted = train(tiny_config(tiny_kaggle, tmp_path, "finetune", name="whole",
                                      **settings))
    real_extract = cxrkit.training.features.extract_features

    def terminated_extraction(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(cxrkit.training.features, "extract_features", terminated_extraction)
    config = tiny_config(tiny_kaggle, tmp_path, "finetune", name="stopped", **settings)
    with pytest.raises(TrainingInterrupted, match=r"interrupted \(SIGTERM\).*--resume"):
        train(config)
    monkeypatch.undo()
    stopped = train(resume=Path(config.runs_dir) / "stopped")
    weights = [safetensors.torch.load_file(run / "model.safetensors")
               for run in (stopped, uninterrupted)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=1e-6, msg=name)


def test_a_checkpoint_of_an_older_cxrkit_resumes_with_a_warning(tmp_path, caplog):
    """Its training order may differ from this version's: the resumed model was another
    than the older version would have finished, and nothing said so."""
    from cxrkit.config import TrainConfig, to_dict
    from cxrkit.training.fit import resume_point

    config = TrainConfig.preset("quick")
    stage = config.stages[0]
    torch.save({"global_step": 5, "hyper_parameters": {  # what an older cxrkit recorded
        "stage": to_dict(stage), "optim": to_dict(config.optim), "loss": to_dict(config.loss)}},
        tmp_path / "last.ckpt")
    with caplog.at_level("WARNING"):
        assert resume_point(tmp_path, config, 0) == tmp_path / "last.ckpt"
    assert "was written by an older cxrkit: stage" in caplog.text
    assert "close to, not equal to" in " ".join(caplog.text.split())
