"""`cxr train --resume` after a SIGKILL part way through an epoch of the second stage."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cxrkit.cli import app

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
    with open(run / "metrics.csv", newline="") as f:
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
    assert resumed.stderr.count("GPU available") == 1  # one trainer, each log line once
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
    with open(killed / "logs" / "finetune" / "version_1" / "metrics.csv", newline="") as f:
        assert min(int(r["step"]) for r in csv.DictReader(f)) >= step
    rows, expected_rows = val_rows(killed), val_rows(uninterrupted)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(FINETUNE_EPOCHS)]
    # before the kill the two runs are the same run (deterministic, same seed)
    assert rows[0]["val_loss"] == expected_rows[0]["val_loss"]
    # after it, Lightning replays the rest of the interrupted epoch with freshly shuffled
    # batches (a plain DataLoader cannot resume mid-epoch): close, not identical
    final, expected = rows[-1], expected_rows[-1]
    assert float(final["val_loss"]) == pytest.approx(float(expected["val_loss"]), abs=0.15)
    assert float(final["val_accuracy"]) == pytest.approx(float(expected["val_accuracy"]), abs=0.13)
    for name in ("model.safetensors", "val_metrics.json", "training_curves.png", "best.ckpt"):
        assert (killed / name).is_file()


@pytest.mark.slow
def test_sigterm_stops_with_exit_143_and_says_how_to_resume(tiny_kaggle, tmp_path):
    """A scheduler's SIGTERM: Lightning stops after the batch; the command must not exit 0
    (a job chain would take it for success) and must name the resume command."""
    run = tmp_path / "runs" / "stopped"
    process = subprocess.Popen([*CXR, *train_args(tiny_kaggle, tmp_path, "stopped")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and not (run / "last.ckpt").exists():
        assert time.monotonic() < deadline, "no checkpoint within two minutes"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "".join(f"cxr train --resume {run}".split()) in "".join(stderr.split())
    assert not (run / "model.safetensors").exists() and stdout == ""
