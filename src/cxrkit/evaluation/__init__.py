"""Evaluation: metrics with patient-level bootstrap intervals, thresholds and calibration
chosen on validation, test-time augmentation, and figures. Entry point: `evaluate_run`."""

from cxrkit.evaluation.evaluate import EVAL_DIR, evaluate_run

__all__ = ["EVAL_DIR", "evaluate_run"]
