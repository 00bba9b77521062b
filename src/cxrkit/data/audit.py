"""Audit a dataset before training on it: counts, sizes, unreadable files, duplicates, patients.

One pass over the files, in a process pool, decodes each image once and takes
everything from that decode: the SHA-256 of the bytes (exact duplicates), a
perceptual hash (near duplicates), an intensity histogram, and, for the few
images the figures show, the film as the model will see it. The rest is
bookkeeping on those facts. `audit_dataset` writes `audit.json`, PNG figures and
one self-contained `audit.html` into the output folder.

Only the previews and figures need PyTorch; they import it where they draw, so that
`cxr --help` and the CLI's other commands start without loading it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import imagehash
import numpy as np
from PIL import Image

from cxrkit.data.audit_report import write_audit_html
from cxrkit.data.io import (
    FILE_NOT_FOUND,
    PIL_FORMATS,
    UnreadableImageError,
    film_doubt,
    read_image,
    written_whole,
)
from cxrkit.data.layout import DataSource, Sample, absolute_data, load_source
from cxrkit.data.patients import (
    NO_PATIENT_IDS,
    SUBTYPE_PATTERN,
    has_parsed_patient,
    kermany_subtype,
)
from cxrkit.data.pool import worker_pool
from cxrkit.data.split import patients_normal_and_ill, shared_patients
from cxrkit.plots import extra_formats
from cxrkit.provenance import code_version

if TYPE_CHECKING:
    from cxrkit.models import ModelSpec

# A 256-bit perceptual hash: at 64 bits, films of different patients often differ in 2-4 bits
# only. At 256 bits a re-encoded, resized or brightened copy differs in <= 10 bits and no two
# different films of the real data come closer than 38 (see BENCHMARKS.md), hence 16.
PHASH_SIZE = 16
HASH_BITS = PHASH_SIZE**2
DEFAULT_NEAR_THRESHOLD = 16
MAX_NEAR_THRESHOLD = HASH_BITS // 4  # beyond this, films are merely alike, not duplicates
PREVIEWS_PER_CLASS = 8
MAX_NEAR_PAIRS = 5000  # a loose threshold on similar-looking films can match millions of pairs
SERIAL_BELOW = 256  # fewer files than this: a process pool costs more than it saves


@dataclass
class ImageFacts:
    """What the single pass learns about one file."""

    path: str
    error: str = ""  # why the file cannot be decoded; empty when it can
    doubt: str = ""  # why a decoded image is hardly a chest film (`film_doubt`); empty if none
    sha256: str = ""
    file_format: str = ""  # JPEG, PNG, DICOM, ...
    mode: str = ""  # as stored: L, RGB, I;16, MONOCHROME1, ...
    width: int = 0
    height: int = 0
    phash: bytes = b""  # HASH_BITS bits, packed
    histogram: np.ndarray | None = None  # fraction of pixels at each 8-bit intensity
    preview: np.ndarray | None = None  # the film at the model's input size, for the figures


@dataclass
class Unreadable:
    path: str
    reason: str


@dataclass
class NearDuplicate:
    a: str
    b: str
    distance: int  # Hamming distance of the perceptual hashes
    split_a: str
    split_b: str
    label_a: str = ""
    label_b: str = ""


@dataclass
class AuditResult:
    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # {split: {class: n}}
    imbalance: dict[str, float | None]  # {split: largest class / smallest class}
    subtypes: dict[str, dict[str, int]]  # {split: {NORMAL/BACTERIA/VIRUS: n}}, when names say
    sizes: dict  # width/height min, median, max and the most common sizes
    modes: dict[str, int]
    formats: dict[str, int]
    patients: dict[str, int]  # {split: distinct patients}
    shared_patients: dict[str, list[str]]  # {"train/test": [patient, ...]}
    unreadable: list[Unreadable]
    doubtful: list[Unreadable]  # decoded, but thumbnails, strips or blank: trained on as films
    exact_duplicates: list[list[str]]  # groups of byte-identical files
    near_duplicates: list[NearDuplicate]  # closest first, at most MAX_NEAR_PAIRS
    near_pairs_total: int
    near_threshold: int
    notes: list[str]  # most severe first
    hash_bits: int = HASH_BITS  # size of the perceptual hash near_threshold counts bits of
    figures: dict[str, str] = field(default_factory=dict)  # name -> PNG path
    seconds: float = 0.0
    note_levels: list[str] = field(default_factory=list)  # NOTE_LEVELS, one per note
    audited_at: str = ""  # UTC, ISO 8601
    version: str = ""  # of cxrkit
    fingerprint: str = ""  # `audit_fingerprint` of what was audited

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    @property
    def duplicate_files(self) -> int:
        return sum(len(g) for g in self.exact_duplicates)

    @property
    def redundant_copies(self) -> int:
        """Files that could be deleted without losing an image: all but one per group."""
        return self.duplicate_files - len(self.exact_duplicates)

    @property
    def near_across_splits(self) -> int:
        return sum(p.split_a != p.split_b for p in self.near_duplicates)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_images"] = self.n_images
        d["exact_duplicate_summary"] = {
            "groups": len(self.exact_duplicates),
            "files": self.duplicate_files,
            "redundant_copies": self.redundant_copies,
        }
        return d


# --- the single pass -------------------------------------------------------------------------


def _stored_format(data: bytes) -> tuple[str, str]:
    """(format, mode) from the header only, without decoding the pixels again."""
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            return img.format or "?", img.mode
    except Exception:  # a file read_image decoded but PIL cannot open is a DICOM
        return "DICOM", _dicom_photometric(data)


def _dicom_photometric(data: bytes) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # the header is a detail: never fail the audit over it
        return "?"
    return str(ds.get("PhotometricInterpretation", "?"))


def inspect_image(path: str, preview_size: int = 0) -> ImageFacts:
    """Decode one file and take every fact the audit needs from that one decode."""
    facts = ImageFacts(path)
    try:
        img = read_image(path)
    except UnreadableImageError as e:
        facts.error = e.reason
        return facts
    data = Path(path).read_bytes()
    facts.sha256 = hashlib.sha256(data).hexdigest()
    facts.file_format, facts.mode = _stored_format(data)
    facts.width, facts.height = img.size
    facts.doubt = film_doubt(img) or ""
    facts.phash = np.packbits(imagehash.phash(img, hash_size=PHASH_SIZE).hash).tobytes()
    counts = np.bincount(np.asarray(img).ravel(), minlength=256)
    facts.histogram = (counts / counts.sum()).astype(np.float32)
    if preview_size:
        from cxrkit.data.transforms import prepare

        facts.preview = prepare(img, preview_size)[0].numpy()
    return facts


def _inspect_job(job: tuple[str, int]) -> ImageFacts:
    return inspect_image(*job)


def scan_images(paths: list[str], preview: Collection[str] = (), preview_size: int = 224,
                workers: int | None = None) -> list[ImageFacts]:
    """inspect_image over all paths, in order, in a process pool for large datasets."""
    preview = set(preview)
    jobs = [(p, preview_size if p in preview else 0) for p in paths]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < SERIAL_BELOW:
        return [_inspect_job(j) for j in jobs]
    with worker_pool(workers) as pool:
        return list(pool.map(_inspect_job, jobs, chunksize=64))


def audit_fingerprint(source: DataSource, spec: ModelSpec, near_threshold: int,
                      figures: bool = True) -> str:
    """What an audit's findings depend on: each film's path, split, label, patient, size and
    modification time (not its bytes: a film rewritten within the same size and time looks
    the same, as to the logits cache), the data's own notes (folders ignored, rows
    repeated), the model's input (the previews), the threshold, the figures and their
    formats, and cxrkit's version."""
    digest = hashlib.sha256(json.dumps([
        code_version(), spec.to_dict(), near_threshold, str(source.root), source.layout,
        source.notes, figures, extra_formats() if figures else []]).encode())
    for s in source.samples:
        try:
            stat = os.stat(s.path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # a manifest's missing file: the audit reports it
            size, mtime = -1, -1
        digest.update(f"{s.path}\0{s.split}\0{s.label}\0{s.patient_id}\0{size}\0{mtime}\n"
                      .encode())
    return digest.hexdigest()


def audit_is_current(out_dir: str | Path, data_path: str | Path,
                     patient_pattern: str | None = None, spec: ModelSpec | None = None,
                     near_threshold: int = DEFAULT_NEAR_THRESHOLD, figures: bool = True) -> bool:
    """Whether `out_dir` holds a whole audit of the data as it is now (`audit_dataset` with
    these arguments would find the same): `cxr run` on a run it audited skips the audit."""
    out_dir = Path(out_dir)
    try:
        saved = json.loads((out_dir / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    source = load_source(absolute_data(data_path), patient_pattern)
    whole = (out_dir / "audit.html").is_file() and all(  # by name: the folder may have moved
        (out_dir / Path(png).name).is_file() for png in saved.get("figures", {}).values())
    return whole and saved.get("fingerprint") == audit_fingerprint(
        source, spec or default_spec(), near_threshold, figures)


# --- bookkeeping on the facts ----------------------------------------------------------------


def exact_duplicates(facts: list[ImageFacts]) -> list[list[str]]:
    """Groups of files with identical bytes, each sorted, largest group first."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        if f.sha256:
            by_hash[f.sha256].append(f.path)
    groups = [sorted(g) for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def near_duplicates(facts: list[ImageFacts], samples: dict[str, Sample],
                    threshold: int) -> tuple[list[NearDuplicate], int]:
    """Pairs of different files whose perceptual hashes differ in <= threshold bits.

    Byte-identical pairs are left out: exact duplicates are reported on their own.
    Returns the closest MAX_NEAR_PAIRS pairs and the total number found.
    """
    ok = [f for f in facts if not f.error]
    hashes = np.frombuffer(b"".join(f.phash for f in ok), dtype=np.uint64)
    hashes = hashes.reshape(len(ok), HASH_BITS // 64)
    pairs = []
    for i in range(len(ok) - 1):
        distances = np.bitwise_count(hashes[i] ^ hashes[i + 1:]).sum(axis=1)
        for j in np.flatnonzero(distances <= threshold):
            a, b = ok[i], ok[i + 1 + j]
            if a.sha256 != b.sha256:
                sa, sb = samples[a.path], samples[b.path]
                pairs.append(NearDuplicate(a.path, b.path, int(distances[j]), sa.split,
                                           sb.split, sa.label, sb.label))
    pairs.sort(key=lambda p: (p.distance, p.a, p.b))
    return pairs[:MAX_NEAR_PAIRS], len(pairs)


def _imbalance(counts: dict[str, int]) -> float | None:
    smallest = min(counts.values(), default=0)
    return round(max(counts.values()) / smallest, 3) if smallest else None


def _subtypes(source: DataSource) -> dict[str, dict[str, int]]:
    """NORMAL / BACTERIA / VIRUS per split, only when the file names carry the subtype."""
    if not any(SUBTYPE_PATTERN.search(Path(s.path).name) for s in source.samples):
        return {}
    return {split: dict(sorted(Counter(kermany_subtype(Path(s.path).name, s.label)
                                       for s in source.split(split)).items()))
            for split in source.splits}


def _size_summary(facts: list[ImageFacts]) -> dict:
    ok = [f for f in facts if not f.error]
    if not ok:
        return {}
    widths, heights = np.array([f.width for f in ok]), np.array([f.height for f in ok])
    common = Counter((f.width, f.height) for f in ok).most_common(5)
    return {
        "width": {"min": int(widths.min()), "median": float(np.median(widths)),
                  "max": int(widths.max())},
        "height": {"min": int(heights.min()), "median": float(np.median(heights)),
                   "max": int(heights.max())},
        "distinct_sizes": len({(f.width, f.height) for f in ok}),
        "most_common": [[w, h, n] for (w, h), n in common],
    }


def _shared_patients(samples: list[Sample], splits: list[str]) -> dict[str, list[str]]:
    return {f"{a}/{b}": sorted(shared_patients(samples, a, b))
            for a, b in combinations([s for s in splits if s], 2)}


# How much a note matters, most first: the audit page and audit.json list notes in this order.
NOTE_LEVELS = ("fix", "check", "info")


def _classes_unread(source: DataSource, result: AuditResult) -> list[str]:
    """A split's class none of whose files can be decoded: training refuses it (train), or
    measures nothing of it."""
    bad = {u.path for u in result.unreadable}
    by_group: dict[tuple[str, str], list[str]] = {}
    for s in source.samples:
        by_group.setdefault((s.split, s.label), []).append(s.path)
    return [f"{split or 'the data'}/{label}: none of its {len(paths)} file(s) can be read "
            f"(e.g. {paths[0]}): replace them, or fix the paths that lead to them"
            for (split, label), paths in by_group.items() if all(p in bad for p in paths)]


def _notes(source: DataSource, result: AuditResult) -> list[tuple[str, str]]:
    """(level, note) pairs, most severe first: what a user must fix before training (one image
    with two labels, or in two splits), what to look at, and what is worth knowing."""
    notes = [("info", note) for note in source.notes]
    missing = [u.path for u in result.unreadable if u.reason == FILE_NOT_FOUND]
    if missing:  # only a manifest lists files that are not there
        notes.append(("fix", f"{len(missing)} file(s) the manifest lists do not exist (e.g. "
                      f"{missing[0]}): fix their paths, or delete their rows."))
    if undecodable := len(result.unreadable) - len(missing):
        notes.append(("check", f"{undecodable} file(s) cannot be decoded: training skips "
                      "them."))
    notes += [("fix", note) for note in _classes_unread(source, result)]
    if result.doubtful:
        notes.append(("check", f"{len(result.doubtful)} file(s) decode but are hardly chest "
                      f"films (e.g. {result.doubtful[0].path}: {result.doubtful[0].reason}): "
                      "training would use them as films; look at them and remove those that "
                      "are not."))
    if result.exact_duplicates:
        rows = defaultdict(list)  # a manifest may list one file twice, in two ways
        for s in source.samples:
            rows[s.path].append(s)

        def values(group: list[str], field: str) -> set[str]:
            return {getattr(s, field) for p in group for s in rows[p]}

        across = [g for g in result.exact_duplicates if len(values(g, "split")) > 1]
        notes.append((
            "fix" if across else "info",
            f"{len(result.exact_duplicates)} groups of byte-identical files "
            f"({result.duplicate_files} files, {result.redundant_copies} redundant copies); "
            + (f"{len(across)} group(s) span splits: the same image is in two splits."
               if across else "each group lies within one split.")))
        # cxrkit's train/val split keeps these together; other tools' patient splits may not.
        mixed = [g for g in result.exact_duplicates if len(values(g, "patient_id")) > 1]
        if mixed:
            notes.append(("check", f"{len(mixed)} group(s) of identical files carry different "
                          "patient ids (cxrkit's validation split keeps them on one side; a "
                          "split by patient id alone may not)."))
        conflicting = [g for g in result.exact_duplicates if len(values(g, "label")) > 1]
        if conflicting:
            example = ", ".join(f"{s.path} ({s.label})" for p in dict.fromkeys(conflicting[0])
                                for s in rows[p])
            notes.append(("fix", f"{len(conflicting)} group(s) of identical files carry "
                          f"different labels, e.g. {example}: at most one label is right; fix "
                          "or remove them before training."))
    relabelled = [p for p in result.near_duplicates if p.label_a != p.label_b]
    if relabelled:
        p = relabelled[0]
        notes.append(("check", f"{len(relabelled)} near-duplicate pair(s) carry different "
                      f"labels, e.g. {p.a} ({p.label_a}) and {p.b} ({p.label_b}): if they are "
                      "one film, at most one label is right."))
    if result.near_across_splits:
        notes.append(("check", f"{result.near_across_splits} near-duplicate pair(s) span "
                      f"splits (perceptual hashes within {result.near_threshold} of "
                      f"{HASH_BITS} bits): check them for leakage."))
    if source.samples and not any(map(has_parsed_patient, source.samples)):
        notes.append(("check", NO_PATIENT_IDS[0].upper() + NO_PATIENT_IDS[1:]))
    if spanning := patients_normal_and_ill(source.samples):
        notes.append(("check", spanning[0].upper() + spanning[1:]))
    for pair, patients in result.shared_patients.items():
        if patients:
            a, b = pair.split("/")
            notes.append(("check", f"{len(patients)} patient id(s) have images in both {a} "
                          f"and {b}."))
    train_imbalance = result.imbalance.get("train") or result.imbalance.get("")
    if train_imbalance and train_imbalance >= 1.5:
        notes.append(("info", f"the training data is imbalanced {train_imbalance:.2f}:1: "
                      "use class weights or a balanced sampler."))
    if "val" not in source.splits and source.split("train"):
        notes.append(("info", "no val split: `cxr data split` carves one out of train, "
                              "grouped by patient."))
    return sorted(notes, key=lambda note: NOTE_LEVELS.index(note[0]))  # stable within a level


def _preview_paths(source: DataSource) -> set[str]:
    """A few files per class, spread evenly over the (training) files, for the sample grid."""
    pool = source.split("train") or source.samples
    chosen = set()
    for label in source.classes:
        paths = sorted(s.path for s in pool if s.label == label)
        step = max(1, len(paths) // PREVIEWS_PER_CLASS)
        chosen.update(paths[::step][:PREVIEWS_PER_CLASS])
    return chosen


# --- the audit -------------------------------------------------------------------------------


def default_spec() -> ModelSpec:
    """The input spec of the default model, for the augmentation preview."""
    from cxrkit.models import create_model

    return create_model(pretrained=False).spec


def audit_dataset(data_path: str | Path, out_dir: str | Path, patient_pattern: str | None = None,
                  near_threshold: int = DEFAULT_NEAR_THRESHOLD, workers: int | None = None,
                  spec: ModelSpec | None = None, figures: bool = True) -> AuditResult:
    """Audit the dataset at `data_path`; write audit.json, figures and audit.html to `out_dir`."""
    start = time.perf_counter()
    if not 0 <= near_threshold <= MAX_NEAR_THRESHOLD:
        raise ValueError(f"near_threshold must be 0 to {MAX_NEAR_THRESHOLD} (bits of "
                         f"{HASH_BITS}), got {near_threshold}")
    source = load_source(absolute_data(data_path), patient_pattern)
    spec = spec or default_spec()
    samples = source.samples
    fingerprint = audit_fingerprint(source, spec, near_threshold, figures)
    facts = scan_images([s.path for s in samples], _preview_paths(source), spec.input_size,
                        workers)
    ok = [f for f in facts if not f.error]
    near, near_total = near_duplicates(facts, {s.path: s for s in samples}, near_threshold)
    result = AuditResult(
        root=str(source.root),
        layout=source.layout,
        classes=source.classes,
        counts=source.counts(),
        imbalance={split: _imbalance(c) for split, c in source.counts().items()},
        subtypes=_subtypes(source),
        sizes=_size_summary(facts),
        modes=dict(Counter(f.mode for f in ok).most_common()),
        formats=dict(Counter(f.file_format for f in ok).most_common()),
        patients={split: len({s.patient_id for s in source.split(split)})
                  for split in source.splits},
        shared_patients=_shared_patients(samples, source.splits),
        unreadable=[Unreadable(f.path, f.error) for f in facts if f.error],
        doubtful=[Unreadable(f.path, f.doubt) for f in facts if f.doubt],
        exact_duplicates=exact_duplicates(facts),
        near_duplicates=near,
        near_pairs_total=near_total,
        near_threshold=near_threshold,
        notes=[],
        audited_at=datetime.now(UTC).isoformat(timespec="seconds"),
        version=code_version(),
        fingerprint=fingerprint,
    )
    notes = _notes(source, result)
    result.note_levels, result.notes = [lv for lv, _ in notes], [text for _, text in notes]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        from cxrkit.data.audit_figures import write_audit_figures

        result.figures = write_audit_figures(samples, facts, spec, out_dir, near)
    result.seconds = round(time.perf_counter() - start, 2)
    write_audit_html(result, out_dir / "audit.html")
    # last: an audit.json with its fingerprint says the whole audit was written
    with written_whole(out_dir / "audit.json") as partial:
        partial.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result
