"""Which of a binary model's two labels is the finding: the class its threshold, sensitivity,
specificity and Grad-CAM are about.

A new model chooses it once (`choose_positive`) and records it in its ModelSpec
(model.json's `positive_label`); everything after reads the record, so a rule changed later
never turns a stored threshold onto the other class. Runs saved before the record existed
keep the rule they were made under: PNEUMONIA, else the last label.
"""

from __future__ import annotations

POSITIVE_CLASS = "PNEUMONIA"
# Names of a binary task's negative class: the other label is then the finding.
NEGATIVE_NAMES = ("NORMAL", "HEALTHY", "NEGATIVE", "NO_FINDING", "NO FINDING", "NO-FINDING",
                  "CONTROL")


def choose_positive(labels: list[str]) -> str | None:
    """For a new model of two labels: PNEUMONIA (in any case) where present; else the label
    beside one named as a negative (NORMAL/ABNORMAL: ABNORMAL); else the last label. None with
    more than two, where the most probable class is predicted."""
    if len(labels) != 2:
        return None
    upper = [label.upper() for label in labels]
    if POSITIVE_CLASS in upper:
        return labels[upper.index(POSITIVE_CLASS)]
    negatives = [i for i, label in enumerate(upper) if label in NEGATIVE_NAMES]
    return labels[1 - negatives[0]] if len(negatives) == 1 else labels[-1]


def positive_is_guessed(labels: list[str]) -> bool:
    """Whether `choose_positive` fell back to the last of two labels, neither naming it."""
    upper = [label.upper() for label in labels]
    return (len(labels) == 2 and POSITIVE_CLASS not in upper
            and sum(label in NEGATIVE_NAMES for label in upper) != 1)


def positive_index(labels: list[str], recorded: str | None = None) -> int:
    """The index of the finding: the model's `recorded` choice (its ModelSpec's
    positive_label); for a model saved before choices were recorded, PNEUMONIA (in any case)
    where present, else the last label, the rule it was made under."""
    if recorded in labels:
        return labels.index(recorded)
    upper = [label.upper() for label in labels]
    return upper.index(POSITIVE_CLASS) if POSITIVE_CLASS in upper else len(labels) - 1


def positive_label(labels: list[str], recorded: str | None = None) -> str | None:
    """The label a threshold is about, by `positive_index`; None with more than two classes."""
    return labels[positive_index(labels, recorded)] if len(labels) == 2 else None
