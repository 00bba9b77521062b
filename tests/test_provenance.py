"""RUN/provenance.json: the code, libraries and machine of each training attempt."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lightning
import pytest
import timm
import torch
from lightning.pytorch import Trainer

from cxrkit import __version__
from cxrkit.provenance import PROVENANCE, code_version, first_attempt, record_attempt
from cxrkit.report import build_report
from tests.test_training import tiny_config, train


def test_a_run_records_what_trained_each_stage(tiny_kaggle, tmp_path):
    run = train(tiny_config(tiny_kaggle, tmp_path, "finetune", **{
        "stages.0.epochs": 1, "stages.1.epochs": 1}))
    attempts = json.loads((run / PROVENANCE).read_text(encoding="utf-8"))
    assert [a["stage"] for a in attempts] == ["head", "finetune"]
    assert not any(a["resumed"] for a in attempts)
    first = first_attempt(run)
    assert first["cxrkit"].startswith(__version__)
    assert first["libraries"]["torch"] == torch.__version__
    assert first["libraries"]["lightning"] == lightning.__version__
    # as Lightning resolved `auto`, not as config.yaml asks for it
    assert first["machine"]["precision"] == "32-true" and first["machine"]["accelerator"] == "cpu"
    assert first["machine"]["devices"] == 1 and first["num_workers"] == 0
    page = " ".join(build_report(run).read_text(encoding="utf-8").split())
    assert (f"Trained with cxrkit {first['cxrkit']}, PyTorch {torch.__version__}, timm "
            f"{timm.__version__}, Lightning {lightning.__version__} on cpu, precision 32-true"
            in page)


def test_a_resume_at_another_precision_is_warned_about(tmp_path, caplog):
    """A run begun in bf16 on a GPU and resumed on a CPU trains its rest in fp32."""
    record_attempt(tmp_path, "finetune", Trainer(accelerator="cpu", precision="bf16-mixed",
                                                 logger=False), num_workers=0, resumed=False)
    with caplog.at_level("WARNING", logger="cxrkit"):
        record_attempt(tmp_path, "finetune", Trainer(accelerator="cpu", logger=False),
                       num_workers=0, resumed=True)
    assert "resumes with precision bf16-mixed -> 32-true" in caplog.text
    assert len(json.loads((tmp_path / PROVENANCE).read_text(encoding="utf-8"))) == 2


def test_the_code_version_names_the_commit_in_a_checkout():
    """`__version__` stays 0.1.0 from commit to commit: audits, evaluations and reports
    record the commit too, and an audit of other code is not taken for today's."""
    here = Path(__file__).parent
    described = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"],
                               capture_output=True, text=True)
    if described.returncode != 0:
        pytest.skip("not a git checkout (an sdist): the version alone is recorded")
    assert code_version() == f"{__version__}+{described.stdout.strip()}"
