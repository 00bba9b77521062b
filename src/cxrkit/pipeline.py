"""The main job in one call, as `cxr run` does it: train (or resume), audit the data,
evaluate on the test split, write the report.

    from cxrkit.config import TrainConfig
    from cxrkit.pipeline import run_pipeline
    from cxrkit.evaluation import summary
    job = run_pipeline(TrainConfig.preset("quick", data="chest_xray/"))
    summary(job.evaluation)  # {'accuracy': 0.907, 'roc_auc': 0.959, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxrkit.config import TrainConfig
from cxrkit.runs import CONFIG


@dataclass(frozen=True)
class RunResult:
    folder: Path  # the run folder: model, checkpoints, logs, audit/, report.html
    evaluation: Path  # the test evaluation: metrics.json, predictions.csv, figures
    report: Path  # report.html


def run_pipeline(config: TrainConfig | None = None, *, resume: str | Path | None = None,
                 tta: bool = False, framing: bool = False,
                 framing_threshold: bool = False) -> RunResult | None:
    """Train `config` (default: the `default` preset on Kaggle's data), or continue the run
    folder `resume`; audit the data it trained on into RUN/audit/ (its patient rule, its
    model's input size; unless the audit there is of the data as it is now); evaluate it
    once on the test split (its threshold and calibration chosen on validation); write
    RUN/report.html. `tta`, `framing`, `framing_threshold`: as in
    `cxrkit.evaluation.evaluate_run`. None in the other processes of a multi-device run
    (DDP): rank 0 alone evaluates and reports."""
    from lightning.pytorch.utilities import rank_zero_only

    from cxrkit.data.audit import audit_dataset, audit_is_current
    from cxrkit.evaluation import evaluate_run
    from cxrkit.report import build_report
    from cxrkit.runs import load_spec
    from cxrkit.training import train

    _refuse_data_without_test(config, resume)  # before the training, not after it
    folder = train(config, resume)
    if rank_zero_only.rank != 0:  # a process Lightning launched, its training done
        return None
    trained, spec = TrainConfig.load(folder / CONFIG).data, load_spec(folder)
    if not audit_is_current(folder / "audit", trained.path, trained.patient_pattern, spec):
        audit_dataset(trained.path, folder / "audit", trained.patient_pattern, spec=spec)
    evaluation = evaluate_run(folder, split="test", tta=tta, framing=framing,
                              framing_threshold=framing_threshold)
    return RunResult(folder, evaluation, build_report(folder, split="test"))


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
