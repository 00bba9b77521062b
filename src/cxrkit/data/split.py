"""A deterministic validation split carved from `train`, grouped by patient.

Each class's patients are shuffled with the seed and taken until the class has
`val_fraction` of its images in validation, never all of them (a class of one patient
stays in train): the split is stratified by class and no patient ever has images on both
sides. Patients whose files are byte-identical copies
of each other (one film filed under two ids) are kept together too, so that no film is
trained on and validated on. The test split is left as it is.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from cxrkit.data.layout import Sample
from cxrkit.data.patients import NO_PATIENT_IDS, has_parsed_patient
from cxrkit.labels import NEGATIVE_NAMES

MANIFEST_COLUMNS = ("path", "label", "split", "patient_id")
log = logging.getLogger(__name__)


def _group_label(samples: list[Sample], group_of: dict[str, str]) -> dict[str, str]:
    """A group's class is the majority label of its images."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        votes[group_of[s.patient_id]][s.label] += 1
    return {g: c.most_common(1)[0][0] for g, c in votes.items()}


HEAD_BYTES = 1 << 16  # compared before whole files: distinct films differ within it


def _file_digest(path: str, limit: int | None = None) -> str | None:
    """SHA-256 of the file (of its first `limit` bytes); None if it cannot be read (the
    loader reports such files, the split ignores them)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(limit) if limit else f.read()).hexdigest()
    except OSError:
        return None


def _same(paths: list[str], key) -> list[list[str]]:
    """`paths` grouped by key(path), groups of one and unreadable files dropped."""
    groups: dict[object, list[str]] = defaultdict(list)
    for path in paths:
        value = key(path)
        if value is not None:
            groups[value].append(path)
    return [g for g in groups.values() if len(g) > 1]


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def identical_file_groups(paths: list[str]) -> list[list[str]]:
    """Groups of byte-identical files, narrowed step by step: a stat per file, then the
    first 64 KiB of the files that share a size (fixed-size exports all do), then the
    whole of the files whose starts match."""
    return [group for same_size in _same(paths, _size)
            for same_start in _same(same_size, lambda p: _file_digest(p, HEAD_BYTES))
            for group in _same(same_start, _file_digest)]


def _patient_groups(samples: list[Sample]) -> dict[str, str]:
    """Patient id -> the id of its group: patients linked by identical files are one group,
    named by its first id in sorted order (a patient without copies is its own group, so
    data without such links splits exactly as by patient)."""
    group_of = {s.patient_id: s.patient_id for s in samples}

    def root(p: str) -> str:
        while group_of[p] != p:
            p = group_of[p]
        return p

    patient_of = {s.path: s.patient_id for s in samples}
    for files in identical_file_groups(sorted(patient_of)):
        roots = sorted({root(patient_of[f]) for f in files})
        for r in roots[1:]:
            group_of[r] = roots[0]
    return {p: root(p) for p in group_of}


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
    if pool and not any(map(has_parsed_patient, pool)):
        log.warning("the validation split is carved by film, not by patient: %s",
                    NO_PATIENT_IDS)
    group_of = _patient_groups(pool)
    images_per_group = Counter(group_of[s.patient_id] for s in pool)
    label_of = _group_label(pool, group_of)
    members: dict[str, list[str]] = defaultdict(list)
    for p, g in group_of.items():
        members[g].append(p)
    rng = random.Random(seed)
    val_groups: set[str] = set()
    for label in sorted(set(label_of.values())):
        groups = sorted(g for g, lab in label_of.items() if lab == label)
        rng.shuffle(groups)
        if rank is not None:
            groups.sort(key=lambda g: -max(rank[p] for p in members[g]))
        total = sum(images_per_group[g] for g in groups)
        taken = 0
        for g in groups:
            if taken >= val_fraction * total:
                break
            if taken + images_per_group[g] < total:  # train keeps some of every class
                val_groups.add(g)
                taken += images_per_group[g]
        if not taken:
            log.warning("%s: all %d films come from %d patient(s), too few to split: they "
                        "stay in train, and validation has none of them", label, total,
                        len(groups))
    split_pool = [
        replace(s, split="val" if group_of[s.patient_id] in val_groups else "train")
        for s in pool
    ]
    return split_pool + rest


def shared_patients(samples: list[Sample], a: str, b: str) -> set[str]:
    """Patients with images in both split `a` and split `b`."""
    left = {s.patient_id for s in samples if s.split == a}
    return left & {s.patient_id for s in samples if s.split == b}


def test_patients_seen_in_training(samples: list[Sample]) -> str | None:
    """A note when patient ids of the test split also occur in train or val: a leak, if the
    ids name the same people, that makes test numbers optimistic."""
    seen = {s.patient_id for s in samples if s.split in ("train", "val")}
    shared = sorted({s.patient_id for s in samples if s.split == "test"} & seen)
    if not shared:
        return None
    return (f"{len(shared)} patient id(s) of the test split also occur in train or val (e.g. "
            f"{shared[0]}): a leak if they name the same people, and the test numbers are then "
            "optimistic (Kermany's ids likely restart per folder; elsewhere keep each "
            "patient's films on one side).")


SPANNING_SHARE = 0.25


def patients_normal_and_ill(samples: list[Sample]) -> str | None:
    """A note when many patient ids (`SPANNING_SHARE` of those with normal films) have films
    of a negative class (NORMAL, HEALTHY, ...) and of another: ids that restart per class, or
    a patient rule that matches too little (`(\\d+)` taking a film number made 144 films 3
    patients, each in both classes). The split then keeps unrelated films together, whole
    "patients" on one side."""
    labels_of: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        labels_of[s.patient_id][s.label] += 1
    normal = [p for p, counts in labels_of.items()
              if any(label.upper() in NEGATIVE_NAMES for label in counts)]
    spanning = sorted(p for p in normal if len(labels_of[p]) > 1)
    # a few patients filmed again once recovered (or ill) are real; a quarter or more of
    # the normal ones is a rule or a column that does not name patients
    if not spanning or len(spanning) < SPANNING_SHARE * len(normal):
        return None
    first = ", ".join(f"{label} {n}" for label, n in sorted(labels_of[spanning[0]].items()))
    return (f"{len(spanning)} patient id(s) have films of a normal class and of another (e.g. "
            f"{spanning[0]}: {first}): ids that restart per class, or a patient rule that "
            "matches too little? Check the manifest's patient_id column or --patient-pattern "
            "(data.patient_pattern).")


def identical_films_of_two_labels(samples: list[Sample],
                                  groups: list[list[str]] | None = None) -> str | None:
    """A note when byte-identical files carry different labels: trained (or validated) under
    both, one of them wrong by construction. The audit says so, but only `cxr run` audits.
    `groups`: the samples' `identical_file_groups`, where already found."""
    label_of = {s.path: s.label for s in samples}
    for files in identical_file_groups(sorted(label_of)) if groups is None else groups:
        if len({label_of[f] for f in files}) > 1:
            a = files[0]
            b = next(f for f in files if label_of[f] != label_of[a])
            return (f"{a} ({label_of[a]}) and {b} ({label_of[b]}) are byte-identical files "
                    "of two labels, and maybe others: at most one label is right. `cxr data "
                    "audit` lists every such group: fix or remove them.")
    return None


def training_films_in_test(samples: list[Sample],
                           groups: list[list[str]] | None = None) -> str | None:
    """A note when a test film is a byte-identical copy of a train or val film (a leak the
    audit finds, but only `cxr run` audits before training). `groups`: as above."""
    split_of = {s.path: s.split for s in samples}
    for files in identical_file_groups(sorted(split_of)) if groups is None else groups:
        splits = {split_of[f] for f in files}
        if "test" in splits and splits & {"train", "val"}:
            test = next(f for f in files if split_of[f] == "test")
            seen = next(f for f in files if split_of[f] != "test")
            return (f"test film {test} is a byte-identical copy of {seen} ({split_of[seen]}), "
                    "and maybe others: the test numbers are then optimistic. `cxr data audit` "
                    "lists every copy: remove them from one side.")
    return None


def write_manifest(samples: list[Sample], path: str | Path) -> Path:
    """Relative paths are written absolute: they would be read later from the manifest's own
    folder (`load_source`) or the reader's working directory, not the writer's. Absolute ones
    are kept as they are, since the decode cache is keyed by the path strings a resumed run
    reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        for s in samples:
            file = s.path if os.path.isabs(s.path) else os.path.abspath(s.path)
            w.writerow([file, s.label, s.split, s.patient_id])
    return path


def read_manifest(path: str | Path) -> list[Sample]:
    """The samples of a manifest `write_manifest` wrote (columns path, label, split,
    patient_id); `load_source` reads any manifest, with checks and friendlier errors."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        return [Sample(r["path"], r["label"], r["split"], r["patient_id"]) for r in rows]
