"""`cxr run`, the main job: train, audit, evaluate on test, write the report."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.config import ConfigError, TrainConfig
from cxrkit.data.layout import DataLayoutError
from cxrkit.evaluation import summary
from cxrkit.pipeline import run_pipeline
from tests.test_training import TINY


def test_cxr_run_does_the_whole_job_on_the_default_recipe_as_an_ensemble(tiny_kaggle, tmp_path):
    data = tmp_path / "data"  # with one film that cannot be read
    shutil.copytree(tiny_kaggle, data)
    bad = data / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = CliRunner().invoke(app, [
        "run", str(data), "--preset", "default", "--runs-dir", str(tmp_path / "runs"),
        "--name", "main", *[f"--set={k}={v}" for k, v in TINY.items()],
        f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=stages.0.epochs=2",
        "--set=model.ensemble_with=[simple_cnn]", "--framing-threshold"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    assert run == (tmp_path / "runs" / "main").absolute()
    assert sorted(p.name for p in (run / "members").iterdir()) == ["0-simple_cnn", "1-simple_cnn"]
    audit = json.loads((run / "audit" / "audit.json").read_text())
    assert audit["n_images"] == 65 and audit["counts"]["test"] == {"NORMAL": 8, "PNEUMONIA": 8}
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["n"] == 16 and 0 <= metrics["roc_auc"]["value"] <= 1
    chosen_on = json.loads((run / "calibration.json").read_text())["chosen_on"]
    assert chosen_on == "validation as filmed and framed 85%: Youden's J"
    assert metrics["deployed_operating_point"] == "validation_framing"
    report = (run / "report.html").read_text()
    assert "members/1-simple_cnn" in report and "audit" in report.lower()
    said = " ".join(result.output.split())  # the job's results, not only a folder
    # validation and test side by side at the one deployed threshold (the training's own
    # table was at P = 0.5, beside a test line at the deployed threshold)
    chosen, deployed = metrics["selection_split"], metrics["deployed_operating_point"]
    assert (f"At the deployed rule, threshold {metrics['deployed_threshold']:.3f} "
            f"({metrics['threshold_chosen_on']})") in said
    specificity = [f"{m['operating_points'][deployed]['specificity']['value']:.1%}"
                   for m in (chosen, metrics)]
    assert f"Specificity │ {specificity[0]} │ {specificity[1]} (" in said
    assert "test (16 films, at the deployed threshold; 95% intervals): Accuracy " in said
    assert f"1 film(s) could not be read and were skipped: {run / 'skipped_files.csv'}" in said
    assert str(bad) in (run / "skipped_files.csv").read_text()


def test_the_main_job_from_python(tiny_kaggle, tmp_path, caplog):
    """`cxrkit.pipeline.run_pipeline`, what `cxr run` calls: one call from config to report."""
    config = TrainConfig.preset("scratch", data=str(tiny_kaggle), epochs=2, overrides={
        **TINY, "data.cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"),
        "name": "job"})
    with caplog.at_level(logging.DEBUG, logger="cxrkit.evaluation"):
        job = run_pipeline(config)
    # the validation films, scored once for val_metrics.json, are read back by the evaluation
    assert "split.csv val: logits of these 8 films read back" in caplog.text
    logits = sorted((job.folder / "eval" / "logits").glob("*.npz"))
    assert len(logits) == 2  # validation and test
    assert job.folder == tmp_path / "runs" / "job"
    assert job.evaluation == job.folder / "eval" / "test" and job.report.is_file()
    assert (job.folder / "audit" / "audit.html").is_file()
    numbers = summary(job.evaluation)
    assert numbers["n"] == 16 and 0 <= numbers["roc_auc"] <= 1
    stages = (job.folder / "stages.json").read_text()  # each stage's steps and seconds
    with pytest.raises(ConfigError, match="not both"):
        run_pipeline(config, resume=job.folder)
    audited = (job.folder / "audit" / "audit.json").stat().st_mtime_ns
    again = run_pipeline(resume=job.folder)  # a finished run: evaluated again, not retrained
    # nor audited again: the data has not changed
    assert (job.folder / "audit" / "audit.json").stat().st_mtime_ns == audited
    assert (job.folder / "stages.json").read_text() == stages
    assert sorted((job.folder / "eval" / "logits").glob("*.npz")) == logits  # no film rescored
    assert summary(again.evaluation) == numbers
    # data without a test split is refused before the training, not after it
    untested = replace(config, data=replace(config.data, path=str(tiny_kaggle / "train")),
                       name="untested")
    with pytest.raises(DataLayoutError, match=r"train has no test split, and `cxr run` ends "
                                              r"by evaluating on it"):
        run_pipeline(untested)
    assert not (tmp_path / "runs" / "untested").exists()


def test_version():
    from importlib.metadata import version

    from cxrkit import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"cxrkit {__version__}"
    assert version("cxrkit") == __version__  # the package's metadata takes it from there
    as_module = subprocess.run([sys.executable, "-m", "cxrkit", "--version"],
                               capture_output=True, text=True)  # `cxr` not on PATH
    assert as_module.stdout.strip() == f"cxrkit {__version__}", as_module.stderr


def test_the_cli_starts_without_loading_pytorch():
    """Every `cxr` call, `--help` included, imports the command modules; PyTorch (seconds to
    import) is loaded only by the commands that run a model."""
    heavy = ("torch", "torchvision", "timm", "lightning", "matplotlib", "onnx", "fastapi")
    code = ("import sys; from cxrkit.cli import app; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
    assert "evaluate" in CliRunner().invoke(app, ["--help"]).stdout  # and the commands are there


def test_every_option_reads_in_full_in_an_80_column_help():
    """An option name cut to `--framing-thresho…` cannot be copied from the help."""
    import typer.main

    root = typer.main.get_command(app)

    def commands(group, prefix=()):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, (*prefix, name))
            else:
                yield (*prefix, name), command

    checked = 0
    for path, command in commands(root):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, color=False)
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, path
        for option in (o for p in command.params for o in p.opts if o.startswith("--")):
            assert option in result.output, (path, option)
            checked += 1
    assert checked > 50



def test_a_job_stopped_after_its_training_says_how_to_finish_it(tiny_kaggle, tmp_path,
                                                                 monkeypatch, ctrl_c_raises):
    """Ctrl+C while the test films were scored exited 130 in silence (SIGTERM: 143), the run
    left without eval/test or report.html and nothing said how to finish it."""
    import cxrkit.evaluation
    import cxrkit.report

    trained = CliRunner().invoke(app, [
        "train", "--data", str(tiny_kaggle), "--preset", "scratch", "--runs-dir",
        str(tmp_path / "runs"), "--name", "job", *[f"--set={k}={v}" for k, v in TINY.items()],
        f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=stages.0.epochs=1"])
    assert trained.exit_code == 0, trained.output
    run = (tmp_path / "runs" / "job").absolute()
    assert f"run folder: {run}" in " ".join(trained.output.split())  # said before training

    def stopped_by(stop, step):
        def stopped(*args, **kwargs):
            signal.raise_signal(stop)  # the real signal, as from the terminal or a scheduler
            return step(*args, **kwargs)
        return stopped

    for module, name, stop, code, said in (
            (cxrkit.evaluation, "evaluate_run", signal.SIGINT, 130, "the evaluation "
                                                                    "interrupted (Ctrl+C)"),
            (cxrkit.report, "build_report", signal.SIGTERM, 143, "the report interrupted "
                                                                 "(SIGTERM)")):
        monkeypatch.setattr(module, name, stopped_by(stop, getattr(module, name)))
        result = CliRunner().invoke(app, ["run", "--resume", str(run), "--tta"])
        assert result.exit_code == code, result.output
        assert f"{said}; continue it with `cxr run --tta --resume {run}`" in " ".join(
            result.output.split())  # with the options that evaluation was to use
        assert not (run / "report.html").exists()
        monkeypatch.undo()
    finished = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert finished.exit_code == 0, finished.output
    assert (run / "report.html").is_file() and f"`cxr predict {run} FILMS...`" in " ".join(
        finished.output.split())
    logged = (run / "run.log").read_text(encoding="utf-8")  # each attempt's lines, in order
    assert logged.index("decoding 40 films at 32 px") < logged.index(  # training's lines too
        "evaluating job on the test split") and logged.count("evaluating job on the test") == 3
    # Its checkpoints deleted to save space (78 of quick's 98 MiB): the model is all the job
    # needs (`make run` on a finished run is this resume; it failed on the missing best.ckpt)
    weights = (run / "model.safetensors").read_bytes()
    for checkpoint in run.glob("*.ckpt"):
        checkpoint.unlink()
    (run / "report.html").unlink()
    again = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert again.exit_code == 0, again.output
    assert "its checkpoints are gone" in " ".join(again.output.split())
    assert (run / "report.html").is_file() and (run / "model.safetensors").read_bytes() == weights
    # and its config.yaml is still held to what trained it (best.ckpt did that)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("\nseed: 0\n", "\nseed: 1\n"))
    edited = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert edited.exit_code == 2 and "changed since the run was trained (seed)" in " ".join(
        edited.output.split()), edited.output


def test_the_help_lists_the_main_job_first():
    """`run` came sixth in `cxr --help`, after evaluate, report, compare, train, lr-find."""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    commands = result.output.split("Commands:")[1].split()
    assert result.exit_code == 0 and commands[0] == "run" and "evaluate" in commands


def test_log_lines_after_a_command_go_to_the_stderr_of_the_moment(tmp_path, capsys):
    """The handler a command set up kept the stream it was made with: in a notebook or a test
    after `app(...)`, each later log line hit a closed file ("--- Logging error ---")."""
    result = CliRunner().invoke(app, ["data", "cache", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    logging.getLogger("cxrkit.tests").warning("said after the command")
    said = capsys.readouterr().err
    assert "said after the command" in said and "Logging error" not in said
