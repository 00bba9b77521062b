"""A deterministic validation split carved from `train`, grouped by patient.

Each class's patients are shuffled with the seed and taken until the class has
`val_fraction` of its images in validation: the split is stratified by class and
no patient ever has images on both sides. The test split is left as it is.
"""

from __future__ import annotations

import csv
import os
import random
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from cxrkit.data.layout import Sample

MANIFEST_COLUMNS = ("path", "label", "split", "patient_id")


def _patient_label(samples: list[Sample]) -> dict[str, str]:
    """A patient's class is the majority label of their images."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        votes[s.patient_id][s.label] += 1
    return {p: c.most_common(1)[0][0] for p, c in votes.items()}


def patient_split(samples: list[Sample], val_fraction: float = 0.15, seed: int = 0,
                  rank: dict[str, float] | None = None) -> list[Sample]:
    """Return `samples` with the train ones re-labelled train/val by patient.

    Data that already has a `val` split of its own keeps it untouched only if
    `val_fraction` is 0; otherwise the given val images join train first (the
    Kaggle `val/` holds 16 images, too few to select anything with). `rank`: take each
    class's patients highest rank first instead of in the seed's random order.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(samples)
    pool = [s for s in samples if s.split in ("train", "val", "")]
    rest = [s for s in samples if s.split not in ("train", "val", "")]
    images_per_patient = Counter(s.patient_id for s in pool)
    label_of = _patient_label(pool)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in sorted(set(label_of.values())):
        patients = sorted(p for p, lab in label_of.items() if lab == label)
        rng.shuffle(patients)
        if rank is not None:
            patients.sort(key=lambda p: -rank[p])
        target = val_fraction * sum(images_per_patient[p] for p in patients)
        taken = 0
        for p in patients:
            if taken >= target:
                break
            val_patients.add(p)
            taken += images_per_patient[p]
    split_pool = [
        replace(s, split="val" if s.patient_id in val_patients else "train") for s in pool
    ]
    return split_pool + rest


def shared_patients(samples: list[Sample], a: str, b: str) -> set[str]:
    """Patients with images in both split `a` and split `b`."""
    left = {s.patient_id for s in samples if s.split == a}
    return left & {s.patient_id for s in samples if s.split == b}


def write_manifest(samples: list[Sample], path: str | Path) -> Path:
    """Relative paths are written absolute: they would be read later from the manifest's own
    folder (`load_source`) or the reader's working directory, not the writer's. Absolute ones
    are kept as they are, since the decode cache is keyed by the path strings a resumed run
    reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        for s in samples:
            file = s.path if os.path.isabs(s.path) else os.path.abspath(s.path)
            w.writerow([file, s.label, s.split, s.patient_id])
    return path


def read_manifest(path: str | Path) -> list[Sample]:
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        return [Sample(r["path"], r["label"], r["split"], r["patient_id"]) for r in rows]
