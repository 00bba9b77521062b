"""Is one run better than another on the same films? Paired bootstrap differences.

Two models scored on the same films are correlated: a film that is hard for one is
usually hard for the other. Their separate 95% intervals therefore overlap even when one
model is ahead on nearly every resample. The interval of the *difference*, taken over the
same patient-level resamples for both runs, answers the question directly
(`cxr compare --paired`). Each run is judged at its own deployed threshold (from its
evaluation's metrics.json) on the calibrated probabilities in its predictions.csv: no
model is run again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrkit.evaluation.metrics import ranking_metrics, threshold_metrics, with_ci
from cxrkit.evaluation.results import read_predictions
from cxrkit.runs import METRICS

log = logging.getLogger(__name__)


@dataclass
class ScoredFilms:
    """One binary evaluation as written: per film its patient, truth and P(positive)."""

    folder: Path
    paths: list[str]
    groups: list[str]
    is_positive: np.ndarray
    p: np.ndarray
    threshold: float

    def subset(self, index: np.ndarray) -> ScoredFilms:
        return ScoredFilms(self.folder, [self.paths[i] for i in index],
                           [self.groups[i] for i in index], self.is_positive[index],
                           self.p[index], self.threshold)


def read_scored(folder: str | Path) -> ScoredFilms:
    """An eval folder (RUN/eval/<split>/) of a binary model, from its two files."""
    folder = Path(folder)
    metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    positive = metrics.get("positive_class")
    if not positive:
        raise ValueError(f"{folder}: paired differences need a binary model "
                         f"(labels {metrics.get('labels')}); compare multi-class runs unpaired")
    rows = read_predictions(folder)
    return ScoredFilms(
        folder=folder,
        paths=[str(Path(r["path"]).resolve()) for r in rows],
        groups=[r["patient_id"] or r["path"] for r in rows],
        is_positive=np.array([r["label"] == positive for r in rows]),
        p=np.array([float(r[f"p_{positive}"]) for r in rows]),
        threshold=float(metrics["deployed_threshold"]),
    )


FEW_SHARED_FILMS = 50  # below this a paired bootstrap says little


def common_films(base: ScoredFilms, other: ScoredFilms) -> tuple[ScoredFilms, ScoredFilms]:
    """Both evaluations restricted to the films they share, in the same order."""
    where = {path: i for i, path in enumerate(other.paths)}
    shared = [(i, where[path]) for i, path in enumerate(base.paths) if path in where]
    if not shared:
        raise ValueError(f"{base.folder} and {other.folder} share no films: a paired "
                         f"comparison needs both runs evaluated on the same images "
                         f"(the same split of the same data, or the same --data)")
    a, b = (np.array(index) for index in zip(*shared, strict=True))
    if not np.array_equal(base.is_positive[a], other.is_positive[b]):
        raise ValueError(f"{base.folder} and {other.folder} label the same films differently")
    return base.subset(a), other.subset(b)


def _metrics(films: ScoredFilms, w: np.ndarray) -> dict[str, np.ndarray]:
    return (ranking_metrics(films.is_positive, films.p, w)
            | threshold_metrics(films.is_positive, films.p, films.threshold, w))


def paired_difference(base: ScoredFilms, other: ScoredFilms, names: Sequence[str],
                      n_resamples: int = 1000, seed: int = 0) -> dict:
    """`other` minus `base` for each metric in `names` (e.g. "roc_auc", "specificity") on
    their shared films: {"n": films, name: {"value": difference, "ci95": [lo, hi]}}; both
    runs are scored on every patient resample together."""
    base, other = common_films(base, other)
    if len(base.paths) < FEW_SHARED_FILMS:
        log.warning("%s and %s share only %d films: their paired intervals are wide and "
                    "rough", base.folder, other.folder, len(base.paths))

    def differences(w: np.ndarray) -> dict[str, np.ndarray]:
        a, b = _metrics(base, w), _metrics(other, w)
        return {k: b[k] - a[k] for k in names}

    return {"n": len(base.paths), **with_ci(differences, base.groups, n_resamples, seed)}
