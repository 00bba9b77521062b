"""The published result on the same 624 test films, beside this model's.

Kermany et al. 2018 report one operating point; `at_published_point` reads this model's ROC
curve there (an upper bound for the model: the threshold is chosen on the test films).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cxrkit.data.patients import DEFAULT_PATTERNS
from cxrkit.evaluation.metrics import (
    rates,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    with_ci,
)
from cxrkit.evaluation.paired import read_scored
from cxrkit.evaluation.results import NAMES, format_metric, headline, read_predictions

# Kermany et al. 2018, Cell 172(5):1122-1131, on the same 624-image test split.
PUBLISHED = {"source": "Kermany et al. 2018 (Cell), Inception V3 transfer learning",
             "accuracy": 0.928, "sensitivity": 0.932, "specificity": 0.901, "roc_auc": 0.968}
KERMANY_TEST_FILMS = 624


def is_kermany_test(folder: Path) -> bool:
    """Whether an evaluation scored the Kermany test split: 624 films, all Kermany-named."""
    names = [Path(row["path"]).name for row in read_predictions(folder)]
    return len(names) == KERMANY_TEST_FILMS and all(
        any(re.match(pattern, name) for pattern in DEFAULT_PATTERNS) for name in names)


def published_rows(test: dict) -> list[dict]:
    """The paper's numbers beside this model's at its deployed threshold."""
    ours = headline(test)
    return [{"name": NAMES[k], "published": format_metric(k, {"value": PUBLISHED[k]}),
             "ours": format_metric(k, ours[k])}
            for k in ("accuracy", "sensitivity", "specificity", "roc_auc")]


def at_published_point(folder: Path, resamples: int = 1000) -> dict[str, dict]:
    """This model's ROC curve read at the paper's operating point, on the films of `folder`:
    its best sensitivity where specificity is at least the paper's, and its best specificity
    where sensitivity is at least the paper's, with patient-bootstrap intervals. A threshold
    is picked per resample on these very films, so each is an upper bound for this model and
    compares ranking with ranking, not one decision rule with another."""
    films = read_scored(folder)

    def statistics(w: np.ndarray) -> dict[str, np.ndarray]:
        tpr, fpr, _ = rates(films.is_positive, films.p, w)
        return {"sensitivity": sensitivity_at_specificity(tpr, fpr, PUBLISHED["specificity"]),
                "specificity": specificity_at_sensitivity(tpr, fpr, PUBLISHED["sensitivity"])}

    return with_ci(statistics, films.groups, resamples)


def published_curve_rows(folder: Path) -> list[dict]:
    """Rows of the published table for `at_published_point`."""
    ours = at_published_point(folder)
    return [{"name": f"Sensitivity at specificity ≥ {PUBLISHED['specificity']:.1%} (the "
                     "paper's)", "published": format_metric("sensitivity",
                                                            {"value": PUBLISHED["sensitivity"]}),
             "ours": format_metric("sensitivity", ours["sensitivity"])},
            {"name": f"Specificity at sensitivity ≥ {PUBLISHED['sensitivity']:.1%} (the "
                     "paper's)", "published": format_metric("specificity",
                                                            {"value": PUBLISHED["specificity"]}),
             "ours": format_metric("specificity", ours["specificity"])}]
