"""Find the images of a dataset on disk, whatever of the three supported layouts it uses.

1. Kaggle layout: ``ROOT/{train,val,test}/{CLASS}/*.jpeg`` (optionally under a
   ``chest_xray/`` folder). The Kaggle zip also holds a nested duplicate
   ``chest_xray/chest_xray/`` tree and ``__MACOSX/`` junk: both are ignored.
2. A plain class-per-folder tree: ``ROOT/{CLASS}/**/*.png``; no split.
3. A CSV manifest with the columns ``path,label[,split,patient_id]``; relative
   paths are resolved against the CSV's folder.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shlex
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PureWindowsPath

from cxrkit.data.io import is_image_file
from cxrkit.data.kaggle import resolve_data
from cxrkit.data.patients import PatientIdParser, tell_films_apart

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
SPLIT_SPELLINGS = {"validation": "val", "valid": "val"}  # a manifest's, read as val
# Never films: a zip's macOS shadows, notebooks' checkpoints, and a disk's own folders
JUNK_DIRS = {"__MACOSX", ".ipynb_checkpoints"}
DISK_DIRS = {"lost+found", "System Volume Information", "$RECYCLE.BIN"}

EXPECTED_LAYOUTS = """\
cxrkit reads three layouts:
  1. Kaggle:   DATA/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg   (or DATA/chest_xray/...)
  2. classes:  DATA/{NORMAL,PNEUMONIA,...}/*.{jpeg,png,dcm}
  3. manifest: a CSV file with the columns path,label[,split,patient_id]
or pass `kaggle` to download paultimothymooney/chest-xray-pneumonia."""


class DataLayoutError(ValueError):
    """The data folder is not in a layout cxrkit understands; the message shows the fix."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: str
    split: str = ""  # "train", "val", "test", or "" when the data has no split
    patient_id: str = ""


@dataclass
class DataSource:
    root: Path
    layout: str  # "kaggle", "classes" or "manifest"
    samples: list[Sample]
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [name for name in (*SPLIT_NAMES, "") if name in present]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}} with "" for unsplit data."""
        table: dict[str, dict[str, int]] = {}
        for split in self.splits:
            c = Counter(s.label for s in self.samples if s.split == split)
            table[split] = {cls: c.get(cls, 0) for cls in self.classes}
        return table


def images_under(folder: Path, any_name: bool = False) -> list[Path]:
    """The image files below `folder`, through linked folders too (each real folder once, by
    the first path to it in name order), but not in hidden or junk folders (.git, __MACOSX,
    ...) nor macOS's `._` shadows, nor through a link back up to `folder` or above it.
    `any_name`: names that are not UTF-8 too (left out, said, where a manifest is written)."""
    files, unfollowed = _files_under(folder, any_name=any_name)
    _warn(unfollowed)
    return sorted(p for p in files if is_image_file(p))


_SAID: set[str] = set()  # each passed-over folder warned about once per process


def _warn(passed_over: list[str]) -> None:
    for note in passed_over:  # said as the films are listed (audit, train and evaluate alike)
        if note not in _SAID:
            _SAID.add(note)
            log.warning(note)


def unrecognised_under(folder: Path) -> list[Path]:
    """Files below `folder` named like PACS exports (a number in a name without a suffix, or
    with a numeric one: IM0001, 1.2.840.1) that `images_under` passes over: no DICOM,
    JPEG or PNG start (data/io.is_image_file). (.DS_Store, README, LICENSE are no such
    names.)"""
    return sorted(p for p in _files_under(folder)[0]
                  if (not p.suffix or p.suffix[1:].isdigit()) and not p.name.startswith(".")
                  and any(c.isdigit() for c in p.name) and not is_image_file(p))


def _files_under(folder: Path, labelled: Collection[Path] = (),
                 any_name: bool = False) -> tuple[list[Path], list[str]]:
    """The files below `folder`, and a note for each folder passed over: a linked folder that
    holds `folder` (a loop: `shortcut -> ..` would bring in its neighbours) or reaches into
    another of the dataset's class folders, `labelled` (their films would take this folder's
    label too); a folder inside it that cannot be listed or entered (its films left out,
    said; `folder` itself unreadable is refused: all of a class). Links anywhere else are
    followed: films kept in a pool beside the splits, or on another disk."""
    found, seen, passed_over = [], set(), []

    def unlisted(error: OSError) -> None:
        if error.filename == str(folder):  # the folder asked for: a class, all its films
            raise DataLayoutError(_unreadable_folder(folder, error))
        passed_over.append(_unreadable_note(error.filename, error))

    for top, dirs, files in os.walk(folder, followlinks=True, onerror=unlisted):
        real = os.path.realpath(top)
        if real in seen:  # a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs
                         if d not in JUNK_DIRS | DISK_DIRS and not d.startswith("."))
        for name in list(dirs):
            if why := _link_leads_back(Path(top, name), folder, labelled):
                dirs.remove(name)
                passed_over.append(why)
        named = [*map(Path(top).joinpath, files)]
        if not any_name and (odd := [p for p in named if not _utf8(p)]):
            named = [p for p in named if p not in odd]
            passed_over.append(_not_utf8_note(Path(top), odd))
        try:
            found += [p for p in named if p.is_file()]
        except OSError as e:  # listed but not entered (`chmod 644` on a folder)
            if top == str(folder):
                raise DataLayoutError(_unreadable_folder(folder, e)) from None
            passed_over.append(_unreadable_note(top, e))
    return found, passed_over


def _utf8(path: Path) -> bool:
    """Whether a path is UTF-8 text (a name from a Windows or old Mac zip or disk is often
    cp1252 bytes), which split.csv and the audit record: one odd name stopped a whole run."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _not_utf8_note(folder: Path, odd: list[Path]) -> str:
    """One note a folder: its names that are not UTF-8, and a command that renames them (on
    the nearest folder whose own path is UTF-8, as the shell needs it)."""
    fixable = next(p for p in (folder, *folder.parents) if _utf8(p))
    shown = ascii(odd[0].name)[1:-1]
    return (f"{len(odd)} file name(s) in {ascii(str(folder))[1:-1]} are not UTF-8 text (e.g. "
            f"{shown}; from a Windows or old Mac zip or disk?): left out. Rename them, e.g. "
            f"`convmv -f cp1252 -t utf8 -r --notest {shlex.quote(str(fixable))}`")


def _unreadable_folder(folder: Path, error: OSError) -> str:
    return (f"{folder} cannot be read ({error.strerror}): give yourself access (e.g. `chmod "
            f"-R u+rwX '{folder}'`, as its owner)")


def _unreadable_note(folder: str, error: OSError) -> str:
    return (f"{folder} cannot be read ({error.strerror}): its films are left out. To include "
            f"them, give yourself access (e.g. `chmod -R u+rwX '{folder}'`, as its owner).")


@contextmanager
def _access_said():
    """What the layout itself cannot read (a split folder, the manifest) as one line that
    names it and the fix, not a traceback."""
    try:
        yield
    except PermissionError as e:
        # the file or folder itself, or the folder that cannot be entered to look at it
        what = e.filename if os.path.exists(e.filename) else os.path.dirname(e.filename)
        raise DataLayoutError(_unreadable_folder(Path(what), e)) from None


def _link_leads_back(link: Path, folder: Path, labelled: Collection[Path]) -> str | None:
    """Why the linked folder `link` is not followed, if it is not."""
    if not link.is_symlink():
        return None
    target, inside = Path(os.path.realpath(link)), Path(os.path.realpath(folder))
    if inside.is_relative_to(target):
        return (f"{link} links to {target}, which holds {folder}: not followed (a loop; it "
                f"would read {folder}'s neighbours as {folder.name}). Remove the link.")
    other = next((c for c in sorted(labelled) if c != inside
                  and (target.is_relative_to(c) or c.is_relative_to(target))), None)
    if other is not None:
        return (f"{link} links to {target}, which reaches the class folder {other}: not "
                f"followed (its films would be read as {folder.name} too). Remove the link, "
                f"or move the films into {folder}.")
    return None


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_dir() and p.name not in JUNK_DIRS | DISK_DIRS and not p.name.startswith(".")
    )


def _find_kaggle_root(root: Path) -> Path | None:
    """The folder holding train/ and test/, looking into a `chest_xray/` wrapper if any."""
    for candidate in (root, root / "chest_xray"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def _class_folders(root: Path, splits: Iterable[str]) -> set[Path]:
    """The real paths of the class folders of `splits` ("": the root's own)."""
    return {Path(os.path.realpath(d)) for split in splits if (root / split).is_dir()
            for d in _subdirs(root / split)}


def _read_class_tree(folder: Path, split: str, parse: PatientIdParser, root: Path,
                     labelled: Collection[Path]) -> tuple[list[Sample], list[str]]:
    """The films under folder/<class>/, each with its patient from its path under `root`,
    and a note for each folder passed over (`labelled`: the dataset's class folders)."""
    samples, notes = [], []
    for class_dir in _subdirs(folder):
        files, unfollowed = _files_under(class_dir, labelled)
        samples += [Sample(str(path), class_dir.name, split, parse(path.relative_to(root), path))
                    for path in sorted(p for p in files if is_image_file(p))]
        notes += unfollowed
    _warn(notes)
    return samples, notes


def _check_class_names(samples: list[Sample], where: Path) -> None:
    """Every film has a class, and no two class names differ only in case (`normal/` beside
    `NORMAL/` would be two classes of one)."""
    unlabelled = [s.path for s in samples if not s.label]
    if unlabelled:
        raise DataLayoutError(f"{where}: {len(unlabelled)} films have no label, e.g. "
                              f"{unlabelled[0]}: give each one its class.")
    if spaced := sorted({s.label for s in samples if s.label != s.label.strip()}):
        raise DataLayoutError(f"{where}: class names with spaces at either end: "
                              f"{', '.join(map(repr, spaced))}. Rename their folders (or "
                              "labels) without them: the space cannot be seen, and 'PNEUMONIA "
                              "' is not the class 'PNEUMONIA' anywhere it is named.")
    by_upper: dict[str, set[str]] = {}
    for s in samples:
        by_upper.setdefault(s.label.upper(), set()).add(s.label)
    clashes = [sorted(names) for names in by_upper.values() if len(names) > 1]
    if clashes:
        raise DataLayoutError(
            f"{where}: class names that differ only in case: "
            f"{'; '.join(' and '.join(names) for names in clashes)}. Give each class one "
            f"name, spelt the same everywhere (folders and manifest labels).")


def _from_kaggle(root: Path, parse: PatientIdParser) -> DataSource:
    notes = []
    if (root / "chest_xray").is_dir():
        notes.append(f"ignored the nested duplicate tree {root / 'chest_xray'}")
    for junk in sorted(JUNK_DIRS):
        if (root / junk).exists() or (root.parent / junk).exists():
            notes.append(f"ignored {junk}/ folders")
    labelled = _class_folders(root, SPLIT_NAMES)
    samples = []
    for split in SPLIT_NAMES:
        if (root / split).is_dir():
            # Only class folders count: the nested chest_xray/ copy is not a class.
            films, unfollowed = _read_class_tree(root / split, split, parse, root, labelled)
            samples += films
            notes += unfollowed
    notes += _left_out_of_splits(root, samples)
    _check_class_names(samples, root)
    classes = sorted({s.label for s in samples})
    for split in ("train", "test"):
        missing = sorted(set(classes) - {s.label for s in samples if s.split == split})
        if missing:
            raise DataLayoutError(
                f"{root / split} has no images of class {', '.join(missing)}: every split "
                f"needs a folder per class.\n{EXPECTED_LAYOUTS}"
            )
    return DataSource(root, "kaggle", samples, classes, notes)


def _left_out_of_splits(root: Path, samples: list[Sample]) -> list[str]:
    """Images the Kaggle layout does not read, said: a `validation/` or `Val/` folder beside
    train/ (validation was then carved from train instead), films loose in a split folder;
    not those `samples` reads through a link (a pool of films beside the splits)."""
    notes, read = [], None
    for folder in _subdirs(root):
        if folder.name in (*SPLIT_NAMES, "chest_xray") or _is_split_folder(root, folder):
            continue
        try:
            films = images_under(folder)
        except DataLayoutError:  # a folder beside the splits that cannot be opened: unread
            continue
        if films:  # the films' real paths, only where a folder beside the splits holds films
            read = read if read is not None else {os.path.realpath(s.path) for s in samples}
            films = [f for f in films if os.path.realpath(f) not in read]
        if not films:
            continue
        hint = (" name it val/ to use it as the validation split"
                if folder.name.lower() in ("val", "valid", "validation")
                and not (root / "val").is_dir() else " only train/, val/ and test/ are read")
        notes.append(f"ignored {folder.name}/ ({len(films)} images):{hint}")
    for split in SPLIT_NAMES:
        loose = [p for p in (root / split).glob("*") if p.is_file() and is_image_file(p)]
        if loose:
            notes.append(f"ignored {len(loose)} images directly in {split}/, e.g. "
                         f"{loose[0].name}: move them into their class's folder")
    return notes


def _is_split_folder(root: Path, folder: Path) -> bool:
    """Train/ on a case-insensitive disk (macOS, Windows): read as train/ itself."""
    named = root / folder.name.lower()
    return folder.name.lower() in SPLIT_NAMES and named.is_dir() and named.samefile(folder)


def _from_class_folders(root: Path, parse: PatientIdParser) -> DataSource:
    samples, notes = _read_class_tree(root, "", parse, root, _class_folders(root, [""]))
    split_folders = sorted({s.label for s in samples if s.label.lower() in SPLIT_NAMES})
    if split_folders:
        if any(name != name.lower() for name in split_folders):
            renames = ", ".join(f"{name}/ to {name.lower()}/" for name in split_folders
                                if name != name.lower())
            raise DataLayoutError(f"{root}: split folders are named in lower case: rename "
                                  f"{renames}.\n{EXPECTED_LAYOUTS}")
        raise DataLayoutError(
            f"{root} holds {', '.join(f'{name}/' for name in split_folders)} but no "
            f"{'test/' if (root / 'train').is_dir() else 'train/'}: a dataset with splits needs "
            f"train/ and test/ (val/ is optional), each with a folder per class; class folders "
            f"are not named after splits.\n{EXPECTED_LAYOUTS}")
    _check_class_names(samples, root)
    classes = sorted({s.label for s in samples})
    empty = [d.name for d in _subdirs(root) if d.name not in classes]
    notes += [f"{EMPTY_FOLDERS}: {', '.join(empty)}"] if empty else []
    return DataSource(root, "classes", samples, classes, notes)


EMPTY_FOLDERS = "ignored empty folders"  # (folders without images: a class none holds)

SEMICOLONS = (" (columns separated by semicolons, as Excel saves CSV in some languages: "
              "separate them with commas)")


def _manifest_text(csv_path: Path) -> str:
    raw = csv_path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text", Notepad's "Unicode"
        raise DataLayoutError(f"{csv_path} is UTF-16 text: save it as UTF-8 (Excel: Save As, "
                              "'CSV UTF-8 (Comma delimited)'), or convert it, e.g. `iconv -f "
                              f"utf-16 -t utf-8 {csv_path.name} > utf8.csv`")
    try:
        return raw.decode("utf-8-sig")  # -sig: Excel's byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataLayoutError(
            f"{csv_path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): save it "
            "as UTF-8 (Excel: Save As, 'CSV UTF-8 (Comma delimited)'), or convert it, e.g. "
            f"`iconv -f cp1252 -t utf-8 {csv_path.name} > utf8.csv`") from None


# A manifest's columns, read whatever their case and spacing (`Split`, `PatientID`: ignored
# once, and the test rows were trained on); columns of other names are kept out of it, and
# those that look meant as one of these are said.
MANIFEST_ALIASES = {"patientid": "patient_id"}  # (not `patient`: often a patient's name)
UNREAD_LOOKALIKES = {"set", "subset", "fold", "partition", "patient", "subject", "subject_id",
                     "subjectid", "person", "study_id", "studyid", "class", "target", "file",
                     "filename", "image", "image_path"}


def _column(name: str) -> str:
    """A header cell as cxrkit reads it: `Patient ID` and `patientid` are `patient_id`."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return MANIFEST_ALIASES.get(key.replace("_", ""), key)


def _from_manifest(csv_path: Path, parse: PatientIdParser) -> DataSource:
    reader = csv.DictReader(io.StringIO(_manifest_text(csv_path), newline=""))
    raw_rows = [(reader.line_num, row) for row in reader]  # the line a row ends on
    given_names = reader.fieldnames or []
    found = [_column(name) for name in given_names]
    if twice := [name for name in dict.fromkeys(found) if found.count(name) > 1 and name]:
        cells = [repr(given) for given in given_names if _column(given) == twice[0]]
        raise DataLayoutError(f"{csv_path}: the columns {' and '.join(cells)} both read as "
                              f"{twice[0]}: keep one (or rename the other)")
    rows = [(line, {_column(k): v for k, v in row.items() if k is not None})
            for line, row in raw_rows]
    if not rows or not {"path", "label"} <= set(found):
        raise DataLayoutError(
            f"{csv_path} needs the header `path,label[,split,patient_id]`; it has "
            f"{', '.join(map(repr, given_names)) or 'no header'}"
            f"{'' if rows or not found else ' and no rows'}"
            f"{SEMICOLONS if len(found) == 1 and ';' in found[0] else ''}.\n{EXPECTED_LAYOUTS}"
        )
    samples, explicit, respellings = [], [], Counter()
    for line, row in rows:
        if row["label"] is None or not (row["path"] or "").strip():  # a short or blank row
            raise DataLayoutError(f"{csv_path}, line {line}: every row needs a path and a "
                                  f"label (this one reads {dict(row)}); fix or delete it")
        if "\0" in row["path"]:  # (os.stat's "embedded null byte", naming nothing)
            raise DataLayoutError(f"{csv_path}, line {line}: its path holds a NUL character, "
                                  "which no file name has (a damaged or binary export?); fix "
                                  "or delete the row")
        given, respelt = _as_on_disk(row["path"].strip(), csv_path.parent)
        respellings.update([respelt] if respelt else [])
        path = given if given.is_absolute() else csv_path.parent / given
        # the manifest's own patient_id first; the path, or a DICOM's header, only without it
        own = (row.get("patient_id") or "").strip()
        split = (row.get("split") or "").strip().lower()  # Train, Validation: train, val
        samples.append(Sample(str(path), row["label"].strip(), SPLIT_SPELLINGS.get(split, split),
                              own or parse(given, path)))
        explicit.append(own)
    _check_class_names(samples, csv_path)
    # merged manifests repeat rows, the same file perhaps spelt otherwise (a/../a, a linked
    # folder): each film once. A repeat has the same class, split and patient_id column; an
    # id the path gives follows its spelling (imgs/../imgs/scan1 against imgs/scan1).
    first: dict[str, tuple[Sample, str]] = {}
    unique = []
    for s, own in zip(samples, explicit, strict=True):
        seen, seen_own = first.setdefault(_same_file(s.path), (s, own))
        if seen is s or (seen.label, seen.split, seen_own) != (s.label, s.split, own):
            unique.append(s)
    notes = [f"{len(samples) - len(unique)} row(s) repeat an earlier row (the same file, "
             "perhaps spelt otherwise): each file is read once"] if len(unique) < len(
        samples) else []
    notes += [f"{n} path(s) {how}: read as the files on disk are named"
              for how, n in respellings.items()]
    if lookalikes := [name for name in given_names if _column(name) in UNREAD_LOOKALIKES]:
        notes.append(f"column(s) {', '.join(map(repr, lookalikes))} not read: cxrkit reads "
                     "path, label, split (train, val, test) and patient_id")
    samples = unique
    bad_splits = {s.split for s in samples} - {*SPLIT_NAMES, ""}
    if bad_splits:
        raise DataLayoutError(
            f"{csv_path}: unknown split value(s) {sorted(bad_splits)}; "
            "use train, val, test or leave it empty."
        )
    classes = sorted({s.label for s in samples})
    return DataSource(csv_path, "manifest", samples, classes, notes)


def _as_on_disk(written: str, folder: Path) -> tuple[Path, str | None]:
    """A manifest's path, and how it was respelt where the file exists only otherwise: with
    / for a Windows \\, or in the other Unicode form (macOS names files decomposed, NFD; a
    name typed or from Excel is composed, NFC): the same name on screen, no file on disk."""
    given = Path(written)
    if os.path.exists(folder / given):  # an absolute `given` stays itself; False if locked
        return given, None
    slashed = [("", written)] + ([("written with \\ for /", PureWindowsPath(written).as_posix())]
                                 if "\\" in written else [])
    for slash, text in slashed:
        for form in ("", "NFC", "NFD"):
            respelt = unicodedata.normalize(form, text) if form else text
            if respelt != written and os.path.exists(folder / respelt):
                how = [slash, f"in Unicode form {form} on disk" if form else ""]
                return Path(respelt), ", ".join(h for h in how if h)
    return given, None


def refuse_conflicting_rows(source: DataSource) -> None:
    """A file a manifest lists twice, with two labels, splits or patients (merged manifests):
    at most one row is right, and using the file both ways would hide which (or, under two
    patient ids, put it on both sides of the validation split)."""
    first: dict[str, Sample] = {}
    for s in source.samples:
        seen = first.setdefault(_same_file(s.path) if source.layout == "manifest" else s.path, s)
        if (seen.label, seen.split, seen.patient_id) != (s.label, s.split, s.patient_id):
            patients = seen.patient_id != s.patient_id  # named only where they differ
            spelt = f" (also spelt {seen.path})" if seen.path != s.path else ""
            raise DataLayoutError(
                f"{source.root} lists {s.path}{spelt} twice: as {_row(seen, patients)} and as "
                f"{_row(s, patients)}. A film has one label, split and patient: fix or delete "
                "one row (`cxr data audit` lists every such file)")


def _same_file(path: str) -> str:
    """One name for a file however its folder is spelt (a/../a, a linked folder): the real
    path of its folder, and its own name. Not the file's own link: content-addressed stores
    (git-annex, DVC) link byte-identical films, two files, to one object."""
    folder, name = os.path.split(path)
    return os.path.join(_real_folder(folder), name)


@cache
def _real_folder(folder: str) -> str:
    """A folder's real path, once per folder (a manifest names thousands of files in few
    folders); as it is where that cannot be had (a name the locale cannot encode)."""
    try:
        return os.path.realpath(folder)
    except (OSError, ValueError):
        return folder


def _row(s: Sample, patient: bool) -> str:
    return f"{s.label} in {s.split or 'no split'}" + (f" of patient {s.patient_id or '?'}"
                                                       if patient else "")


def absolute_data(data: str | Path) -> str | Path:
    """A data argument with its local path made absolute (`kaggle` as it is): a file written
    from it (predictions.csv, audit.json) then names each film as split.csv does, wherever
    the command ran."""
    return data if str(data).lower() == "kaggle" else Path(data).expanduser().absolute()


def load_source(path: str | Path, patient_pattern: str | None = None,
                min_classes: int = 2) -> DataSource:
    """Detect the layout of `path` ("kaggle": the Kaggle dataset, downloaded or from
    kagglehub's cache) and list its samples. Training needs two classes; an evaluation may
    take one (`min_classes=1`: a site's NORMAL films measure specificity)."""
    root = resolve_data(path)
    with _access_said():
        source = _detect_layout(root, PatientIdParser(patient_pattern))
    if len(source.classes) < min_classes:
        ignored = "".join(f" ({note}: they hold no images)" for note in source.notes
                          if note.startswith(EMPTY_FOLDERS))
        raise DataLayoutError(
            f"{root} has only the class {source.classes}{ignored}; a classifier needs at least "
            f"two class folders with images.\n{EXPECTED_LAYOUTS}"
        )
    return source


def _detect_layout(root: Path, parse: PatientIdParser) -> DataSource:
    if not root.exists():
        raise DataLayoutError(f"{root} does not exist.\n{EXPECTED_LAYOUTS}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataLayoutError(f"{root} is a file but not a CSV manifest.\n{EXPECTED_LAYOUTS}")
        source = _from_manifest(root, parse)
    elif kaggle_root := _find_kaggle_root(root):
        source = _from_kaggle(kaggle_root, parse)
    else:
        source = _from_class_folders(root, parse)
    samples, note = tell_films_apart(source.samples, parse.header_fallbacks)
    if note:
        log.warning("%s: %s", root, note)
        source.samples, source.notes = samples, [*source.notes, note]
    if not source.samples:
        loose = root.is_dir() and any(is_image_file(p) for p in root.iterdir())
        problem = (f"{root} holds images but no class folders: move each class's images "
                   "into a folder named after the class" if loose else f"no images found in {root}")
        raise DataLayoutError(f"{problem}.\n{EXPECTED_LAYOUTS}")
    return source
