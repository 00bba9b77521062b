"""The main job in one call, as `cxr run` does it: train (or resume), audit the data,
evaluate on the test split, write the report.

    from cxrkit.config import TrainConfig
    from cxrkit.pipeline import run_pipeline
    from cxrkit.evaluation import summary
    job = run_pipeline(TrainConfig.preset("quick", data="chest_xray/"))
    summary(job.evaluation)  # {'accuracy': 0.907, 'roc_auc': 0.959, ...}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cxrkit.config import NoSpaceError, OutOfMemoryError, TrainConfig, out_of_memory
from cxrkit.runs import CONFIG, logged_to

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    folder: Path  # the run folder: model, checkpoints, logs, audit/, report.html
    evaluation: Path  # the test evaluation: metrics.json, predictions.csv, figures
    report: Path  # report.html


def run_pipeline(config: TrainConfig | None = None, *, resume: str | Path | None = None,
                 resume_if_exists: bool = False, tta: bool = False, framing: bool = False,
                 framing_threshold: bool = False) -> RunResult | None:
    """Train `config` (default: the `default` preset on Kaggle's data), or continue the run
    folder `resume` (or the run `config` names, with `resume_if_exists`: see `train`);
    audit the data it trained on into RUN/audit/ (its patient rule, its model's input size;
    unless the audit there is of the data as it is now); evaluate it once on the test split
    (its threshold and calibration chosen on validation); write RUN/report.html. `tta`,
    `framing`, `framing_threshold`: as in `cxrkit.evaluation.evaluate_run`. None in the
    other processes of a multi-device run (DDP): rank 0 alone evaluates and reports."""
    from lightning.pytorch.utilities import rank_zero_only

    from cxrkit.training import train

    _refuse_data_without_test(config, resume)  # before the training, not after it
    folder = train(config, resume, resume_if_exists)
    if rank_zero_only.rank != 0:  # a process Lightning launched, its training done
        return None
    with logged_to(folder):
        return _audit_evaluate_report(folder, tta, framing, framing_threshold)


def _audit_evaluate_report(folder: Path, tta: bool, framing: bool,
                           framing_threshold: bool) -> RunResult:
    """The job's steps after training."""
    from cxrkit.data.audit import audit_dataset, audit_is_current
    from cxrkit.evaluation import evaluate_run
    from cxrkit.report import build_report
    from cxrkit.runs import load_spec

    trained, spec = TrainConfig.load(folder / CONFIG).data, load_spec(folder)
    batch = trained.batch_size
    with step(folder, "the data audit", batch):
        if not audit_is_current(folder / "audit", trained.path, trained.patient_pattern, spec):
            log.info("auditing %s into %s", trained.path, folder / "audit")
            audit_dataset(trained.path, folder / "audit", trained.patient_pattern, spec=spec)
    with step(folder, "the evaluation", batch):
        log.info("evaluating %s on the test split%s", folder.name, " (and with TTA)" * tta)
        evaluation = evaluate_run(folder, split="test", tta=tta, framing=framing,
                                  framing_threshold=framing_threshold,
                                  batch_size=batch)  # a small machine's, too
    with step(folder, "the report", batch):
        report = build_report(folder, split="test")
    log.info("%s", headline_line(evaluation))  # in run.log too
    return RunResult(folder, evaluation, report)


def headline_line(evaluation: Path) -> str:
    """'test (624 films, at the deployed threshold; 95% intervals): Accuracy 90.7% (...)'."""
    from cxrkit.evaluation.results import headline_text
    from cxrkit.runs import METRICS

    test = json.loads((evaluation / METRICS).read_text(encoding="utf-8"))
    rule = "at the deployed threshold" if test["deployed_threshold"] is not None else "argmax"
    return f"test ({test['n']} films, {rule}; 95% intervals): {headline_text(test)}"


@contextmanager
def step(folder: Path, name: str, batch: int) -> Iterator[None]:
    """A step after training, stopped by Ctrl+C or SIGTERM: TrainingInterrupted, which names
    the resume that finishes the job (killed silently, a run was left without eval/ or
    report.html and nothing said how to finish it). A full disk, or memory run out at the
    evaluation's `batch`, is said with the way on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cxrkit.training.callbacks import sigterm_raises
    from cxrkit.training.fit import TrainingInterrupted

    finish = f"`cxr run --resume {folder}`"
    try:
        with sigterm_raises():
            yield
    except SIGTERMException as e:
        raise TrainingInterrupted(folder, "SIGTERM", name) from e
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(folder, "Ctrl+C", name) from e
    except NoSpaceError as e:
        raise NoSpaceError(f"{e}, then {finish}") from e
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        lower = (f"`cxr evaluate {folder} --batch-size {max(1, batch // 2)}`" if
                 name == "the evaluation" else "free memory (other programs)")
        raise OutOfMemoryError(f"out of memory in {name} (the training is done): {lower}, "
                               f"then {finish}") from e


def _refuse_data_without_test(config: TrainConfig | None, resume: str | Path | None) -> None:
    """The job ends by evaluating on the data's test split: data without one is said now."""
    from cxrkit.data.layout import DataLayoutError, load_source

    saved = Path(resume) / CONFIG if resume is not None else None
    if saved is not None and not saved.is_file():
        return  # not a run folder: `train` says so
    data = (TrainConfig.load(saved) if saved else config or TrainConfig.preset("default")).data
    source = load_source(data.path, data.patient_pattern)
    if "test" not in source.splits:
        raise DataLayoutError(
            f"{data.path} has no test split, and `cxr run` ends by evaluating on it. Train "
            "with `cxr train --data ...`, then evaluate with `cxr evaluate RUN --data "
            "OTHER_FILMS` (or --split val); or give data with a test split: the Kaggle "
            "layout, or a manifest with test rows")
