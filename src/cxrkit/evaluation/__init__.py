"""Evaluation: metrics with patient-level bootstrap intervals, thresholds and calibration
chosen on validation, test-time augmentation, and figures. Entry points: `evaluate_run`, and
`summary` to read an evaluation's headline back.

`evaluate_run` imports PyTorch; it is loaded on first use, so that reading evaluations
(`cxr report`, `cxr compare`, the metrics and paired modules here) does not."""

from typing import TYPE_CHECKING

from cxrkit.evaluation.results import summary
from cxrkit.runs import EVAL_DIR

__all__ = ["EVAL_DIR", "evaluate_run", "summary"]

if TYPE_CHECKING:  # for type checkers and editors; at run time, on first use below
    from cxrkit.evaluation.evaluate import evaluate_run


def __getattr__(name: str):
    if name == "evaluate_run":
        from cxrkit.evaluation.evaluate import evaluate_run

        return evaluate_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
