"""The main job in one call, as `cxr run` does it: train (or resume), audit the data,
evaluate on the test split, write the report.

    from cxrkit.config import TrainConfig
    from cxrkit.pipeline import run_pipeline
    from cxrkit.report import summary
    job = run_pipeline(TrainConfig.preset("quick", data="chest_xray/"))
    summary(job.evaluation)  # {'accuracy': 0.907, 'roc_auc': 0.959, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxrkit.config import TrainConfig


@dataclass(frozen=True)
class RunResult:
    folder: Path  # the run folder: model, checkpoints, logs, audit/, report.html
    evaluation: Path  # the test evaluation: metrics.json, predictions.csv, figures
    report: Path  # report.html


def run_pipeline(config: TrainConfig | None = None, *, resume: str | Path | None = None,
                 tta: bool = False, framing: bool = False,
                 framing_threshold: bool = False) -> RunResult:
    """Train `config` (default: the `default` preset on Kaggle's data), or continue the run
    folder `resume`; audit the data it trained on into RUN/audit/ (its patient rule, its
    model's input size); evaluate it once on the test split (its threshold and calibration
    chosen on validation); write RUN/report.html. `tta`, `framing`, `framing_threshold`: as
    in `cxrkit.evaluation.evaluate_run`."""
    from cxrkit.data.audit import audit_dataset
    from cxrkit.evaluation import evaluate_run
    from cxrkit.report import build_report
    from cxrkit.runs import load_spec
    from cxrkit.training import train

    folder = train(config, resume)
    trained = TrainConfig.load(folder / "config.yaml").data
    audit_dataset(trained.path, folder / "audit", trained.patient_pattern,
                  spec=load_spec(folder))
    evaluation = evaluate_run(folder, split="test", tta=tta, framing=framing,
                              framing_threshold=framing_threshold)
    return RunResult(folder, evaluation, build_report(folder, split="test"))
