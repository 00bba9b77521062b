"""Patient ids from Kermany file names (or DICOM headers), so that splits never leak a patient.

Kermany names: ``person123_bacteria_456.jpeg``, ``person7_virus_8.jpeg`` (PNEUMONIA),
``IM-0115-0001.jpeg`` and ``NORMAL2-IM-1427-0001.jpeg`` (NORMAL). ``IM-`` and
``NORMAL2-IM-`` numbers are separate series, so the prefix is part of the id.
A DICOM file has its header's PatientID first (before these rules: OsiriX names its exports
``IM-<series>-<image>.dcm``); a --patient-pattern goes before the header.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cxrkit.data.dicom import dicom_patient
from cxrkit.data.io import DICOM_SUFFIXES, SUPPORTED_SUFFIXES

if TYPE_CHECKING:
    from cxrkit.data.layout import Sample

# Each pattern's `patient` group is the id; tried in order, first match wins.
DEFAULT_PATTERNS = (
    r"^(?P<patient>person\d+)_(?:bacteria|virus)_\d+",
    r"^(?P<patient>NORMAL2-IM-\d+)-\d+",
    r"^(?P<patient>IM-\d+)-\d+",
)

SUBTYPE_PATTERN = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)
SUBTYPES = ("NORMAL", "BACTERIA", "VIRUS")  # the 3-class task's labels, in index order


class PatientIdParser:
    """Callable: a film's path relative to its dataset -> patient id.

    Each pattern is tried on the file name, then on the relative path (so that a pattern
    can take the id from a folder: `(?P<patient>p\\d+)/`). A DICOM film has the patient of
    its header (`dicom_patient_id`) before the built-in rules, after a given pattern. Any
    other film is its own patient,
    named by its relative path: two `0001.png` in different class or split folders are two
    patients, not one.
    """

    def __init__(self, pattern: str | None = None):
        self.given = bool(pattern)  # a user's rule wins over a DICOM header
        patterns = (pattern,) if pattern else DEFAULT_PATTERNS
        try:
            self.patterns = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"patient pattern {pattern!r} is not a valid regex: {e}") from e
        for p in self.patterns:
            if "patient" not in p.groupindex and p.groups < 1:
                raise ValueError(
                    f"patient pattern {p.pattern!r} needs a group, e.g. (?P<patient>...)"
                )
        # film -> (its header's id, the id its path gives), for each film whose id came from
        # its DICOM header (`tell_films_apart` falls back where the headers do not tell apart)
        self.header_fallbacks: dict[str, tuple[str, str]] = {}

    def __call__(self, relative_path: str | Path, file: str | Path | None = None) -> str:
        """`file`: where the film is (a DICOM's header is read for its patient); None: the
        path alone decides."""
        relative = Path(relative_path)
        by_path = self._by_rule(relative)
        # A DICOM's header names its patient before Kermany's file-name rules: OsiriX and
        # Horos name exports IM-<series>-<image>.dcm, and the series number was taken for a
        # patient (32 patients became 2, on both sides of the split). After a rule given,
        # and not read for a JPEG or PNG, whose suffix says it is none.
        dicom_like = relative.suffix.lower() not in SUPPORTED_SUFFIXES - DICOM_SUFFIXES
        header_first = not self.given and dicom_like
        if file is not None and (header_first or by_path is None) and (
                from_header := dicom_patient_id(file)):
            # what the path gives, should the headers not tell films apart (a constant)
            self.header_fallbacks[str(file)] = (from_header, by_path or self._own(relative))
            return from_header
        return by_path or self._own(relative)

    def _by_rule(self, relative: Path) -> str | None:
        """The patient the first matching rule gives, None where none matches."""
        for p in self.patterns:
            m = p.search(relative.name) or p.search(relative.as_posix())
            if m:
                return m.group("patient") if "patient" in p.groupindex else m.group(1)
        return None

    @staticmethod
    def _own(relative: Path) -> str:
        """No rule matched: the film is its own patient. Only an image suffix is dropped: a
        DICOM UID (1.2.840.113619.2.55) keeps its last component."""
        image_suffix = relative.suffix.lower() in SUPPORTED_SUFFIXES
        return (relative.with_suffix("") if image_suffix else relative).as_posix()


# An anonymiser's placeholder, not a patient: never an id (every film would be one patient).
PLACEHOLDER_PATIENTS = {"", "0", "-", "NA", "N/A", "NONE", "NULL", "UNKNOWN", "ANON",
                        "ANONYMOUS", "ANONYMIZED", "ANONYMISED", "PATIENT"}
# A header id of at least HEADER_ID_MIN_FILMS films that spans classes, or holds more than
# HEADER_ID_MAX_SHARE of a dataset's DICOM films, is taken for a constant an anonymiser wrote
# (a study code in every file), not a patient, and not used.
HEADER_ID_MAX_SHARE, HEADER_ID_MIN_FILMS = 0.5, 10


def tell_films_apart(samples: list[Sample], fallbacks: dict[str, tuple[str, str]]
                     ) -> tuple[list[Sample], str | None]:
    """`samples` with the DICOM header ids that tell films apart kept; each film of an id
    that does not (`HEADER_ID_MIN_FILMS`) its own patient again, and a note saying so.
    `fallbacks`: film -> (the id its header gave, the id its path gives)."""
    def is_from_header(s: Sample) -> bool:  # (a manifest's own id for the same file is not)
        return fallbacks.get(s.path, ("",))[0] == s.patient_id

    from_header = [s for s in samples if is_from_header(s)]
    films = Counter(s.patient_id for s in from_header)
    classes: dict[str, set[str]] = {}
    for s in from_header:
        classes.setdefault(s.patient_id, set()).add(s.label)
    constants = {patient for patient, n in films.items() if n >= HEADER_ID_MIN_FILMS and (
        len(classes[patient]) > 1 or n > HEADER_ID_MAX_SHARE * len(from_header))}
    if not constants:
        return samples, None
    dropped = sum(films[patient] for patient in constants)
    note = (f"{dropped} of the {len(from_header)} DICOM films share "
            f"{'one PatientID' if len(constants) == 1 else f'{len(constants)} PatientIDs'} "
            "in their headers across classes or most of the data (an anonymiser's constant?): "
            "those ids are not used: each of these films takes the patient its name gives (a "
            "file-name rule's, else its own). Give "
            "real ids in a CSV manifest's patient_id column, or --patient-pattern.")
    return [replace(s, patient_id=fallbacks[s.path][1])
            if s.patient_id in constants and is_from_header(s) else s for s in samples], note


def dicom_patient_id(path: str | Path) -> str | None:
    """The patient of a DICOM file's header (IssuerOfPatientID and PatientID), as
    "dicom-" and 16 hex digits of its SHA-256: split.csv, predictions, audits and reports
    name patients, and a medical record number must never be written there. A hash of a
    short MRN can be found again by trying every number: these ids are pseudonyms for
    grouping films, not anonymisation; keep run folders as private as the films."""
    found = dicom_patient(path)
    if found is None or found[1].upper() in PLACEHOLDER_PATIENTS:
        return None
    issuer, patient = found
    key = f"{issuer}\\{patient}" if issuer else patient  # one MRN of two issuers: two people
    return "dicom-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# Said by the audit and the validation split when no film has a patient id of its own.
NO_PATIENT_IDS = (
    "no film has a patient id (no file-name rule or --patient-pattern matched, no manifest "
    "patient_id column, no DICOM PatientID): each film counts as its own patient, so a split "
    "by patient is a split by film, and films of one patient in two splits cannot be seen. "
    "Give a CSV manifest with a patient_id column, or --patient-pattern.")


def has_parsed_patient(sample: Sample) -> bool:
    """Whether a film's patient id was read (a manifest, a file-name rule), not the fallback
    that makes a film its own patient: its path below the dataset, whole path components
    (with or without the suffix), never part of a name (`12345` of cxr_12345.png is read)."""
    if not sample.patient_id:
        return False
    ends = ("/" + Path(sample.path).as_posix(), "/" + Path(sample.path).with_suffix("").as_posix())
    return not any(end.endswith("/" + sample.patient_id) for end in ends)


def kermany_subtype(file_name: str, label: str) -> str:
    """NORMAL / BACTERIA / VIRUS for the 3-class task: the label itself when it is one of
    them (a manifest's curated label is the truth); PNEUMONIA from the Kermany file name,
    person1_virus_2.jpeg; any other label as it is (a folder "COVID 19" of Kermany-named
    films stays COVID 19, and the task refuses it, instead of becoming VIRUS unsaid)."""
    if label.upper() in SUBTYPES:
        return label.upper()
    if label.upper() != "PNEUMONIA":
        return label
    m = SUBTYPE_PATTERN.search(file_name)
    return m.group(1).upper() if m else label.upper()


def name_disagrees(file_name: str, label: str) -> bool:
    """Whether a film labelled NORMAL, BACTERIA or VIRUS has another subtype in its name."""
    m = SUBTYPE_PATTERN.search(file_name)
    return label.upper() in SUBTYPES and m is not None and m.group(1).upper() != label.upper()
