"""Films to logits: each film read and scored once, the logits kept in RUN/eval/logits/.

    scored = cached(run, model.spec.labels, partial(score, model))(samples, "test")

`Scored` holds the readable films, their class indices and logits, and what could not be
read; `evaluate_run` measures them, and training scores its validation films through the
same cache so that the first evaluation reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrkit.data.io import READER_VERSION, Failure, file_stamp, written_whole
from cxrkit.data.layout import Sample
from cxrkit.data.patients import kermany_subtype
from cxrkit.data.split import read_manifest
from cxrkit.inference import predict_logits
from cxrkit.models import Classifier
from cxrkit.runs import EVAL_DIR, SPLIT, weights_file_digest

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """The readable images of one split, their class indices and logits."""

    samples: list[Sample]
    y: np.ndarray
    logits: np.ndarray
    failures: list[Failure]

    @property
    def groups(self) -> list[str]:
        """Bootstrap units: the patient, or the image itself when the patient is unknown."""
        return [s.patient_id or s.path for s in self.samples]


def by_patients_seen(scored: Scored, manifest: Sequence[Sample]
                     ) -> tuple[Scored | None, Scored | None]:
    """The scored films of patients whose ids are in the run's train or val split, and those of
    the others (None where there are none)."""
    seen_ids = {s.patient_id for s in manifest if s.split in ("train", "val")}
    seen = np.array([s.patient_id in seen_ids for s in scored.samples], dtype=bool)

    def part(keep: np.ndarray) -> Scored | None:
        index = np.flatnonzero(keep)
        if not len(index):
            return None
        return Scored([scored.samples[i] for i in index], scored.y[index],
                      scored.logits[index], [])

    return part(seen), part(~seen)


# ---- which images, which labels --------------------------------------------------------------

def label_indices(samples: Sequence[Sample], labels: Sequence[str], where: str) -> np.ndarray:
    """Each sample's class index in the model's `labels`, matched by name (any case).

    A NORMAL/BACTERIA/VIRUS model on NORMAL/PNEUMONIA data takes the subtype from
    the Kermany file name (person1_bacteria_2.jpeg).
    """
    index = {name.lower(): i for i, name in enumerate(labels)}
    found = []
    for s in samples:
        names = (s.label, kermany_subtype(Path(s.path).name, s.label))
        found.append(next((index[n.lower()] for n in names if n.lower() in index), None))
    unmatched = sorted({s.label for s, i in zip(samples, found, strict=True) if i is None})
    if unmatched:
        raise ValueError(
            f"{where}: label(s) {', '.join(unmatched)} are not among the model's labels "
            f"({', '.join(labels)}). Labels are matched by name: rename the class folders "
            f"(or the manifest's label column) to the model's label names."
        )
    return np.array(found, dtype=int)


def run_manifest(run: Path) -> list[Sample]:
    file = run / SPLIT
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: evaluation needs the train/val/test manifest `cxr train` writes. "
            f"To evaluate this model on other data, pass --data."
        )
    return read_manifest(file)


def say_skipped(where: str, failures: Sequence[Failure]) -> None:
    for f in failures:
        log.warning("%s: skipped unreadable image %s (%s)", where, f.path, f.reason)


def score(model: Classifier, samples: Sequence[Sample], where: str,
          views: Sequence[Callable] = (), **inference) -> Scored:
    """Logits for `samples`; unreadable files are logged and left out."""
    labels = model.spec.labels
    y = label_indices(samples, labels, where) if samples else np.zeros(0, int)
    logits, failures = predict_logits(model, [s.path for s in samples], views=views, **inference)
    ok = ~np.isnan(logits).any(1)
    say_skipped(where, failures)
    if samples and not ok.any():
        raise ValueError(
            f"{where}: none of the {len(samples)} images could be read, e.g. "
            f"{failures[0].path}: {failures[0].reason}. split.csv holds the paths as they were "
            f"at training time: has the data moved?"
        )
    kept = [s for s, good in zip(samples, ok, strict=True) if good]
    # float64: a confident model's float32 probabilities round to exactly 1.0 and tie.
    return Scored(kept, y[ok], logits[ok].astype(np.float64), failures)


LOGITS_CACHE = "logits"


def cached(run: Path, labels: Sequence[str],
           score_films: Callable[..., Scored]) -> Callable[..., Scored]:
    """`score_films` with its logits kept in RUN/eval/logits/, so that evaluating again (another
    split, --data, --tta, --framing) does not score the validation films again (~16 s for
    Kermany's on a laptop CPU). The key holds the weights file's SHA-256 (not its time: a run
    copied with `cp -r` keeps its scores), the crop, every film's path, size and time, and
    the names of the TTA views (`DEFAULT_VIEWS`): new weights or a changed film score
    afresh."""
    def scored(samples: Sequence[Sample], where: str, views: dict[str, Callable] | None = None,
               crop: float = 1.0) -> Scored:
        parts = (weights_file_digest(run), crop, READER_VERSION,
                 [(s.path, *file_stamp(s.path)) for s in samples])
        if views:  # appended only then: the plain scores keep the keys they always had
            parts += (tuple(views),)
        key = hashlib.sha256(repr(parts).encode()).hexdigest()[:20]
        file = run / EVAL_DIR / LOGITS_CACHE / f"{key}.npz"
        if file.is_file():
            try:
                with np.load(file) as kept:
                    index, logits = kept["index"], kept["logits"]
                failures = [Failure(p, r) for p, r in
                            json.loads(file.with_suffix(".json").read_text(encoding="utf-8"))]
                films = [samples[i] for i in index]
            except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as e:
                log.warning("%s is damaged (%s): scoring the films again", file, e)
            else:
                log.debug("%s: logits of these %d films read back from %s", where,
                         len(samples), file.relative_to(run))
                say_skipped(where, failures)  # every evaluation says what it left out
                return Scored(films, label_indices(films, labels, where), logits, failures)
        result = score_films(samples, where, views=list((views or {}).values()), crop=crop)
        file.parent.mkdir(parents=True, exist_ok=True)
        position = {s.path: i for i, s in enumerate(samples)}
        # The .npz last: it is what a reader looks for, and either file is whole or absent.
        with written_whole(file.with_suffix(".json")) as partial:
            failed = [[f.path, f.reason] for f in result.failures]
            partial.write_text(json.dumps(failed), encoding="utf-8")
        with written_whole(file) as partial, open(partial, "wb") as out:
            np.savez(out, index=np.array([position[s.path] for s in result.samples], int),
                     logits=result.logits)
        return result
    return scored
