"""load_source: the three layouts, the Kaggle zip's junk, and errors that show the fix."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from cxrkit.data.layout import EXPECTED_LAYOUTS, DataLayoutError, load_source
from tests.conftest import make_kaggle_tree, make_kaggle_zip_tree, synthetic_film
from tests.test_io import dicom_ramp, write_dicom


def test_kaggle_layout(tiny_kaggle):
    source = load_source(tiny_kaggle)
    assert source.layout == "kaggle"
    assert source.root == tiny_kaggle
    assert source.classes == ["NORMAL", "PNEUMONIA"]
    assert source.splits == ["train", "test"]
    assert source.counts() == {"train": {"NORMAL": 24, "PNEUMONIA": 24},
                               "test": {"NORMAL": 8, "PNEUMONIA": 8}}
    first = source.split("train")[0]
    assert Path(first.path).parent.name == first.label
    assert first.patient_id == "IM-0000"  # IM-0000-0000.jpeg


def test_kaggle_zip_ignores_the_nested_copy_and_macosx_junk(tmp_path):
    root = make_kaggle_zip_tree(tmp_path / "download")
    source = load_source(root)  # the folder kagglehub returns: it holds chest_xray/
    assert source.root == root / "chest_xray"
    assert source.counts() == {split: {"NORMAL": n, "PNEUMONIA": n}
                               for split, n in (("train", 6), ("val", 2), ("test", 2))}
    paths = [s.path for s in source.samples]
    assert len(paths) == len(set(paths)) == 20
    assert not any("chest_xray/chest_xray" in p or "__MACOSX" in p for p in paths)
    assert any("nested duplicate" in n for n in source.notes)
    assert any("__MACOSX" in n for n in source.notes)


def test_wrapper_folder_holding_chest_xray(tmp_path, tiny_kaggle):
    shutil.copytree(tiny_kaggle, tmp_path / "wrapper" / "chest_xray")
    source = load_source(tmp_path / "wrapper")
    assert source.layout == "kaggle"
    assert source.root == tmp_path / "wrapper" / "chest_xray"
    assert len(source.samples) == 64


def make_class_folders(root: Path) -> Path:
    for label, n in (("COVID", 2), ("NORMAL", 3), ("PNEUMONIA", 4)):
        for i in range(n):
            sub = root / label / ("site_b" if i % 2 else "")  # nested folders are fine
            sub.mkdir(parents=True, exist_ok=True)
            synthetic_film(label, i).save(sub / f"{label.lower()}_{i}.png")
    (root / "EMPTY").mkdir()
    (root / "NORMAL" / "readme.txt").write_text("not an image")
    return root


def test_class_per_folder(tmp_path):
    source = load_source(make_class_folders(tmp_path / "data"))
    assert source.layout == "classes"
    assert source.classes == ["COVID", "NORMAL", "PNEUMONIA"]
    assert source.splits == [""]
    assert source.counts() == {"": {"COVID": 2, "NORMAL": 3, "PNEUMONIA": 4}}
    assert source.notes == ["ignored empty folders: EMPTY"]


def test_csv_manifest_with_relative_paths(tmp_path, tiny_kaggle):
    shutil.copytree(tiny_kaggle / "train", tmp_path / "images")
    rows = [("images/NORMAL/IM-0000-0000.jpeg", "NORMAL", "train", ""),
            ("images/NORMAL/IM-0000-0001.jpeg", "NORMAL", "val", "p7"),
            ("images/PNEUMONIA/person0_bacteria_0.jpeg", "PNEUMONIA", "test", "")]
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split", "patient_id"), *rows])
    source = load_source(manifest)
    assert source.layout == "manifest"
    assert [s.path for s in source.samples] == [str(tmp_path / r[0]) for r in rows]
    assert all(Path(s.path).is_file() for s in source.samples)
    assert [s.split for s in source.samples] == ["train", "val", "test"]
    # an empty patient_id falls back to the file name pattern; a given one is kept
    assert [s.patient_id for s in source.samples] == ["IM-0000", "p7", "person0"]


def test_custom_patient_pattern(tiny_kaggle):
    source = load_source(tiny_kaggle, patient_pattern=r"^(?P<patient>IM|person)")
    assert {s.patient_id for s in source.samples} == {"IM", "person"}
    with pytest.raises(ValueError, match="not a valid regex"):
        load_source(tiny_kaggle, patient_pattern="(unclosed")


def assert_shows_layouts(error: pytest.ExceptionInfo) -> None:
    assert EXPECTED_LAYOUTS in str(error.value)


def test_missing_class_in_a_split(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"train": 2, "test": 2})
    shutil.rmtree(root / "test" / "PNEUMONIA")
    with pytest.raises(DataLayoutError, match=r"test has no images of class PNEUMONIA") as error:
        load_source(root)
    assert_shows_layouts(error)


def test_single_class_is_refused(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    synthetic_film("NORMAL", 0).save(tmp_path / "NORMAL" / "a.png")
    with pytest.raises(DataLayoutError, match="at least two") as error:
        load_source(tmp_path)
    assert_shows_layouts(error)


def test_no_images(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "notes.txt").write_text("x")
    with pytest.raises(DataLayoutError, match="no images found") as error:
        load_source(tmp_path)
    assert_shows_layouts(error)


def test_unknown_layout_images_without_class_folders(tmp_path):
    for i in range(3):
        synthetic_film("NORMAL", i).save(tmp_path / f"{i}.png")
    with pytest.raises(DataLayoutError, match="no class folders") as error:
        load_source(tmp_path)
    assert_shows_layouts(error)


@pytest.mark.parametrize("name", ["missing", "file.txt"])
def test_missing_path_or_not_a_csv(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("path,label\n")
    with pytest.raises(DataLayoutError, match=str(path)) as error:
        load_source(path)
    assert_shows_layouts(error)


def test_bad_csv_header(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,class\na.png,NORMAL\n")
    with pytest.raises(DataLayoutError, match="path,label") as error:
        load_source(manifest)
    assert_shows_layouts(error)


def test_bad_split_value_in_csv(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,split\na.png,NORMAL,training\nb.png,PNEUMONIA,test\n")
    with pytest.raises(DataLayoutError, match="training"):
        load_source(manifest)


def numbered_films(folders: list[Path], n: int = 2) -> None:
    """0000.png, 0001.png, ... in each folder: names that carry no patient id."""
    for folder in folders:
        folder.mkdir(parents=True)
        for i in range(n):
            synthetic_film(folder.name.upper(), i, (32, 32)).save(folder / f"{i:04d}.png")


def test_a_film_without_a_patient_id_in_its_name_is_its_own_patient(tmp_path):
    """Named by its path under the dataset: NORMAL/0000 and PNEUMONIA/0000, or train/ and
    test/'s 0000, are different people."""
    numbered_films([tmp_path / s / c for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")])
    source = load_source(tmp_path)
    ids = [s.patient_id for s in source.samples]
    assert len(set(ids)) == len(ids) == 8
    assert "train/NORMAL/0000" in ids and "test/PNEUMONIA/0001" in ids


def test_films_named_by_dicom_uids_are_each_their_own_patient(tmp_path):
    """1.2.840.0001 and 1.2.840.0002: the last component is part of the name, not a suffix."""
    for i, label in enumerate(["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"]):
        (tmp_path / label).mkdir(exist_ok=True)
        write_dicom(tmp_path / label / f"1.2.840.113619.{i + 1:04d}", dicom_ramp())
    ids = [s.patient_id for s in load_source(tmp_path).samples]
    assert len(set(ids)) == 4 and "NORMAL/1.2.840.113619.0001" in ids


def test_a_patient_pattern_can_take_the_id_from_a_folder(tmp_path):
    numbered_films([tmp_path / c / "siteA" / p for c in ("NORMAL", "PNEUMONIA")
                    for p in ("p1", "p2")], n=3)
    source = load_source(tmp_path, patient_pattern=r"/(?P<patient>p\d+)/")
    assert sorted({s.patient_id for s in source.samples}) == ["p1", "p2"]


def test_split_folders_without_test_are_not_taken_for_classes(tmp_path):
    numbered_films([tmp_path / s / c for s in ("train", "val") for c in ("NORMAL", "PNEUMONIA")])
    with pytest.raises(DataLayoutError, match=r"holds train/, val/ but no test/") as error:
        load_source(tmp_path)
    assert_shows_layouts(error)


def test_split_folders_in_capitals_are_named_with_the_rename(tmp_path):
    numbered_films([tmp_path / s / c for s in ("Train", "test") for c in ("NORMAL", "PNEUMONIA")])
    with pytest.raises(DataLayoutError, match=r"split folders are named in lower case: rename "
                                              r"Train/ to train/\.\n"):
        load_source(tmp_path)


def test_a_class_folder_with_a_trailing_space_is_named_visibly(tmp_path):
    """It blamed train/ for lacking class 'PNEUMONIA ', the space unseen."""
    numbered_films([tmp_path / s / c for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")])
    (tmp_path / "test" / "PNEUMONIA").rename(tmp_path / "test" / "PNEUMONIA ")
    with pytest.raises(DataLayoutError, match=r"spaces at either end: 'PNEUMONIA '\. Rename"):
        load_source(tmp_path)


def test_images_the_kaggle_layout_does_not_read_are_said(tmp_path):
    """A validation/ folder beside train/ (validation was carved from train instead) and
    films loose in train/ were left out without a word."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 2, "test": 2})
    shutil.copytree(root / "test", root / "validation")
    shutil.copy(root / "test" / "NORMAL" / "IM-1000-0000.jpeg", root / "train" / "loose.jpeg")
    (root / "notes").mkdir()  # no images: nothing to say
    source = load_source(root)
    assert source.splits == ["train", "test"]
    assert "ignored validation/ (4 images): name it val/ to use it as the validation split" \
        in source.notes
    assert "ignored 1 images directly in train/, e.g. loose.jpeg: move them into their " \
        "class's folder" in source.notes
    assert not any("notes/" in n for n in source.notes)
    (root / "val").mkdir()  # beside a val/ of its own: renaming is not the fix
    shutil.copytree(root / "test" / "NORMAL", root / "val" / "NORMAL")
    shutil.copytree(root / "test" / "PNEUMONIA", root / "val" / "PNEUMONIA")
    assert "ignored validation/ (4 images): only train/, val/ and test/ are read" \
        in load_source(root).notes


def test_class_names_that_differ_only_in_case_are_refused(tmp_path):
    numbered_films([tmp_path / "train" / "NORMAL", tmp_path / "train" / "PNEUMONIA",
                    tmp_path / "test" / "normal", tmp_path / "test" / "PNEUMONIA"])
    with pytest.raises(DataLayoutError, match="differ only in case: NORMAL and normal"):
        load_source(tmp_path)


def test_a_manifest_row_without_a_label_is_refused(tmp_path, tiny_kaggle):
    films = sorted((tiny_kaggle / "train" / "NORMAL").glob("*.jpeg"))[:2]
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label\n{films[0]},NORMAL\n{films[1]},\n")
    with pytest.raises(DataLayoutError, match=r"1 films have no label, e\.g\. .*jpeg"):
        load_source(manifest)
    manifest.write_text(f"path,label,split\n{films[0]},NORMAL,train\n\n{films[1]}\n")  # short
    with pytest.raises(DataLayoutError, match=r"list.csv, line 4: every row needs a path and a "
                                              r"label \(this one reads .*\); fix or delete it"):
        load_source(manifest)
    manifest.write_text(f"path,label\n{films[0]},NORMAL\n{films[1]}\0x,NORMAL\n")
    with pytest.raises(DataLayoutError, match=r"list.csv, line 3: its path holds a NUL "
                                              r"character"):  # (was: "embedded null byte")
        load_source(manifest)


def test_a_manifest_saved_by_excel_is_read_and_a_wrong_header_is_named(tmp_path, tiny_kaggle):
    films = sorted((tiny_kaggle / "train" / "NORMAL").glob("*.jpeg"))[:1] + sorted(
        (tiny_kaggle / "train" / "PNEUMONIA").glob("*.jpeg"))[:1]
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbfpath,label\r\n" + f"{films[0]},NORMAL\r\n{films[1]},"
                      f"PNEUMONIA\r\n".encode())
    assert load_source(excel).classes == ["NORMAL", "PNEUMONIA"]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"file,class\n{films[0]},NORMAL\n")
    with pytest.raises(DataLayoutError, match="needs the header `path,label.*; it has 'file', "
                                              "'class'"):
        load_source(wrong)
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text(f"path;label\n{films[0]};NORMAL\n")
    with pytest.raises(DataLayoutError, match="it has 'path;label' .columns separated by "
                                              "semicolons.*separate them with commas"):
        load_source(semicolons)
    windows = tmp_path / "windows.csv"  # Excel's plain "CSV (Comma delimited)" on Windows
    windows.write_bytes(f"path,label\n{films[0]},NORMAL\n".encode() + b"R\xf6ntgen.png,NORMAL\n")
    with pytest.raises(DataLayoutError, match=r"windows.csv is not UTF-8 text \(byte 0xf6 on "
                                              r"line 3\): save it as UTF-8 \(Excel: Save As"):
        load_source(windows)
    utf16 = tmp_path / "utf16.csv"  # Excel's "Unicode Text", Notepad's "Unicode"
    utf16.write_text(f"path,label\n{films[0]},NORMAL\n", encoding="utf-16")
    with pytest.raises(DataLayoutError, match=r"utf16.csv is UTF-16 text: save it as UTF-8.*"
                                              r"iconv -f utf-16 -t utf-8"):
        load_source(utf16)


def test_a_manifests_columns_are_read_in_any_case_and_lookalikes_are_said(tmp_path,
                                                                          tiny_kaggle):
    """`Split` and `PatientID` were ignored as extra columns: the test rows were trained on,
    each patient's films split by film, and nothing said why."""
    films = sorted((tiny_kaggle / "train" / "NORMAL").glob("*.jpeg"))[:2] + sorted(
        (tiny_kaggle / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    spelt = tmp_path / "spelt.csv"
    rows = [f"{film},{film.parent.name},{split},P{i},A" for i, (film, split) in enumerate(
        zip(films, ["train", "test", "train", "test"], strict=True))]
    spelt.write_text("\n".join(["Path,Label,Split,PatientID,Set", *rows]) + "\n")
    source = load_source(spelt)
    assert [(s.split, s.patient_id) for s in source.samples] == [
        ("train", "P0"), ("test", "P1"), ("train", "P2"), ("test", "P3")]
    assert source.notes == ["column(s) 'Set' not read: cxrkit reads path, label, split "
                            "(train, val, test) and patient_id"]
    # two cells read as one column: refused, never the last one silently (patient ids lost)
    both = tmp_path / "both.csv"
    both.write_text("\n".join(["path,label,patient_id,PatientID",
                               *(f"{film},{film.parent.name},P{i}," for i, film in
                                 enumerate(films))]) + "\n")
    with pytest.raises(DataLayoutError, match=r"the columns 'patient_id' and 'PatientID' both "
                                              r"read as patient_id: keep one"):
        load_source(both)
    # `Patient` (often a name) is no patient_id; a split's values are read in any case
    named = tmp_path / "named.csv"
    named.write_text("\n".join(["path,label,Split,Patient", *(
        f"{film},{film.parent.name},{split},Doe^John{i}" for i, (film, split) in enumerate(
            zip(films, ["Train", "Validation", "TRAIN", "Test"], strict=True)))]) + "\n")
    source = load_source(named)
    assert [s.split for s in source.samples] == ["train", "val", "train", "test"]
    assert not any("Doe" in s.patient_id for s in source.samples)
    assert "column(s) 'Patient' not read" in source.notes[0]


def test_one_file_spelt_two_ways_is_read_once_and_linked_copies_stay_two(tmp_path):
    """imgs/../imgs/scan1.png is imgs/scan1.png (its path-given patient id follows the
    spelling, and the rows were refused as conflicting); two files linked to one stored object
    (git-annex, DVC) are two films, not one listed twice."""
    from cxrkit.data.layout import refuse_conflicting_rows

    imgs, store = tmp_path / "imgs", tmp_path / ".store"
    imgs.mkdir()
    store.mkdir()
    for i, label in enumerate(["NORMAL", "PNEUMONIA", "NORMAL"]):
        synthetic_film(label, i).save(imgs / f"scan{i}.png")
    synthetic_film("PNEUMONIA", 9).save(store / "object", format="PNG")
    (imgs / "annex_a.png").symlink_to(store / "object")
    (imgs / "annex_b.png").symlink_to(store / "object")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/scan0.png,NORMAL\nimgs/scan1.png,PNEUMONIA\n"
                        "imgs/../imgs/scan0.png,NORMAL\nimgs/scan2.png,NORMAL\n"
                        "imgs/annex_a.png,PNEUMONIA\nimgs/annex_b.png,PNEUMONIA\n")
    source = load_source(manifest)
    refuse_conflicting_rows(source)  # nothing listed twice with two meanings
    assert [Path(s.path).name for s in source.samples] == [
        "scan0.png", "scan1.png", "scan2.png", "annex_a.png", "annex_b.png"]
    assert source.notes[0].startswith("1 row(s) repeat an earlier row (the same file, "
                                      "perhaps spelt otherwise)")


def test_links_back_into_the_dataset_never_relabel_its_films(tmp_path, caplog):
    """`shortcut -> ..` in train/NORMAL read train/PNEUMONIA's films as NORMAL, silently;
    a link to another class folder did the same. A link out of the dataset is followed."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    normal = root / "train" / "NORMAL"
    (normal / "shortcut").symlink_to("..")
    (normal / "more").symlink_to(root / "train" / "PNEUMONIA")
    (normal / "upper").symlink_to(tmp_path)  # above the dataset: holds it all
    outside = tmp_path / "second-disk"
    outside.mkdir()
    synthetic_film("NORMAL", 7).save(outside / "kept.png")
    (normal / "external").symlink_to(outside)
    source = load_source(root)
    assert source.counts()["train"] == {"NORMAL": 5, "PNEUMONIA": 4}  # + kept.png
    assert str(normal / "external" / "kept.png") in {s.path for s in source.samples}
    pool = root / "pool"  # films kept beside the splits, linked into a class: followed
    pool.mkdir()
    synthetic_film("NORMAL", 8).save(pool / "pooled.png")
    (normal / "from-pool").symlink_to(pool)
    pooled = load_source(root)
    assert str(normal / "from-pool" / "pooled.png") in {s.path for s in pooled.samples}
    assert not any("pool/" in n for n in pooled.notes)  # read through the link: not "ignored"
    for link in ("shortcut", "more", "upper"):
        assert sum(f"{normal / link} links to" in n and "not followed" in n
                   for n in source.notes) == 1, link
        assert f"{normal / link} links to" in caplog.text  # `cxr train` says it too


def as_a_plain_user(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` run where file modes apply: root reads any folder, so as root without the
    capabilities that let it (setpriv, util-linux)."""
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root, needs setpriv (util-linux) to drop the override of file modes")
        command = ["setpriv", "--inh-caps=-all",
                   "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, encoding="utf-8")


@pytest.mark.parametrize("mode", [0o644, 0o000])
def test_a_folder_that_cannot_be_read_is_said_and_stops_nothing(tmp_path, mode):
    """644 (listable, not enterable): a PermissionError traceback; 000: its films left out
    of the counts, silently. Now said, with the fix, and the rest is read (a root-owned
    lost+found/ must not stop a dataset)."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    locked = root / "train" / "NORMAL" / "batch2"
    locked.mkdir()
    synthetic_film("NORMAL", 9).save(locked / "IM-0900-0000.jpeg")
    (root / "lost+found").mkdir(mode=0o700)
    (root / "lost+found").chmod(mode)
    locked.chmod(mode)
    try:
        done = as_a_plain_user(
            "import logging\n"
            "logging.basicConfig(format='%(levelname)s %(message)s')\n"
            "from pathlib import Path\n"
            "from cxrkit.data.layout import images_under, load_source\n"
            "source = load_source('data')\n"
            "print(source.counts()['train'])\n"
            "print('\\n'.join(source.notes))\n"
            "print(len(images_under(Path('data/train/NORMAL'))))\n", cwd=tmp_path)
    finally:
        locked.chmod(0o755)
        (root / "lost+found").chmod(0o755)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "{'NORMAL': 4, 'PNEUMONIA': 4}" and out[-1] == "4"
    said = (f"{Path('data/train/NORMAL/batch2')} cannot be read (Permission denied): its films "
            "are left out. To include them, give yourself access (e.g. `chmod -R u+rwX "
            "'data/train/NORMAL/batch2'`, as its owner).")
    assert said in out and f"WARNING {said}" in done.stderr.splitlines()
    assert not any("lost+found" in line and "cannot be read" in line  # a disk's own folder
                   for line in [*out, *done.stderr.splitlines()])
    virus = root / "train" / "PNEUMONIA"  # a whole class folder: all of a class, refused
    virus.chmod(mode)
    try:
        done = as_a_plain_user("from cxrkit.data.layout import load_source\n"
                               "try:\n    load_source('data')\n"
                               "except ValueError as e:\n    print(e)\n", cwd=tmp_path)
    finally:
        virus.chmod(0o755)
    assert done.stdout.startswith(f"{Path('data/train/PNEUMONIA')} cannot be read (Permission "
                                  "denied): give yourself access"), done.stdout + done.stderr


def test_a_manifest_written_on_windows_or_typed_over_a_mac_name_finds_its_files(tmp_path):
    """Backslashes, or a name composed (NFC) where the disk holds it decomposed (NFD): the same
    name on screen, 'file not found' for every such film."""
    decomposed = unicodedata.normalize("NFD", "Müller 0.png")
    for label, name in (("NORMAL", "b0.png"), ("PNEUMONIA", decomposed)):
        (tmp_path / label).mkdir()
        synthetic_film(label, 3).save(tmp_path / label / name)
    manifest = tmp_path / "films.csv"
    manifest.write_text("path,label\nNORMAL\\b0.png,NORMAL\n"
                        f"PNEUMONIA/{unicodedata.normalize('NFC', 'Müller 0.png')},PNEUMONIA\n",
                        encoding="utf-8")
    source = load_source(manifest)
    assert [s.path for s in source.samples] == [str(tmp_path / "NORMAL" / "b0.png"),
                                                str(tmp_path / "PNEUMONIA" / decomposed)]
    assert "1 path(s) written with \\ for /: read as the files on disk are named" in source.notes
    assert "1 path(s) in Unicode form NFD on disk: read as the files on disk are named" \
        in source.notes
    both = tmp_path / "both.csv"  # Windows' backslash and a composed name in one row
    both.write_text(f"path,label\nPNEUMONIA\\{unicodedata.normalize('NFC', 'Müller 0.png')},"
                    "PNEUMONIA\nNORMAL/b0.png,NORMAL\n", encoding="utf-8")
    assert load_source(both).samples[0].path == str(tmp_path / "PNEUMONIA" / decomposed)


def test_a_disks_own_folders_are_never_classes(tmp_path):
    """A USB disk's System Volume Information or a mount's lost+found (often unreadable to
    its user) beside the class folders: refused as an unreadable class, or taken for one."""
    numbered_films([tmp_path / "NORMAL", tmp_path / "PNEUMONIA"])
    for name in ("System Volume Information", "lost+found", "$RECYCLE.BIN"):
        (tmp_path / name).mkdir()
        synthetic_film("NORMAL", 1).save(tmp_path / name / "IndexerVolumeGuid.png")
    source = load_source(tmp_path)
    assert source.classes == ["NORMAL", "PNEUMONIA"] and not source.notes


def pacs_export(root: Path, films: dict[str, tuple[str, str, str]]) -> Path:
    """A Kaggle-layout dataset of DICOMs named as PACS exports name them (by UID): each file
    `split/CLASS/uid` with its header's PatientID and IssuerOfPatientID ("" for none)."""
    import numpy as np

    film = np.asarray(synthetic_film("NORMAL", 0), np.uint16) * 16
    for relative, (patient, issuer, _) in films.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        write_dicom(root / relative, film, PatientID=patient,
                    **({"IssuerOfPatientID": issuer} if issuer else {}))
    return root


def test_a_dicom_no_rule_matches_is_its_headers_patient_written_only_as_a_hash(tmp_path):
    """PACS exports are named by UID: the patient is in the header. Its MRN never reaches
    a sample (and so split.csv, predictions, audits), only a hash of it."""
    from cxrkit.data.split import patient_split, write_manifest

    films = {  # path: (PatientID, IssuerOfPatientID, who)
        "train/NORMAL/1.2.840.113619.2.55.3.1": ("MRN1000005", "", "a"),
        "train/NORMAL/1.2.840.113619.2.55.3.2.dcm": ("MRN1000005", "", "a"),
        "test/NORMAL/1.2.840.113619.2.55.3.3.dcm": ("MRN1000005", "", "a"),
        "train/PNEUMONIA/1.2.840.113619.2.55.3.4.dcm": ("MRN1000005", "OTHER-HOSPITAL", "b"),
        "train/PNEUMONIA/1.2.840.113619.2.55.3.5.dcm": ("MRN2000007", "", "c"),
        # a file-name rule matches, but a DICOM's header comes first: OsiriX and Horos name
        # exports IM-<series>-<image>.dcm, and the series was taken for a patient
        "test/PNEUMONIA/person7_virus_8.dcm": ("MRN1000005", "", "a"),
        "train/NORMAL/IM-0001-0001.dcm": ("MRN3000001", "", "d"),
        "train/NORMAL/IM-0001-0002.dcm": ("MRN3000002", "", "e"),
    }
    root = pacs_export(tmp_path / "data", films)
    source = load_source(root)
    patient = {Path(s.path).relative_to(root).as_posix(): s.patient_id for s in source.samples}
    by_who: dict[str, set[str]] = {}
    for relative, (_, _, who) in films.items():
        by_who.setdefault(who, set()).add(patient[relative])
    assert all(len(ids) == 1 for ids in by_who.values())  # one id per person
    assert len({next(iter(ids)) for ids in by_who.values()}) == 5  # and five people
    assert all(p.startswith("dicom-") and len(p) == 6 + 16 for ids in by_who.values()
               for p in ids)
    # a --patient-pattern given goes before the header
    given = load_source(root, r"(?P<patient>IM-\d+)-")
    assert {s.patient_id for s in given.samples if "IM-" in s.path} == {"IM-0001"}
    text = write_manifest(patient_split(source.samples, 0.5, seed=0),
                          tmp_path / "split.csv").read_text()
    assert "MRN" not in text and "OTHER-HOSPITAL" not in text
    # the manifest's own patient_id comes first, then the header
    manifest = tmp_path / "films.csv"
    manifest.write_text("path,label,split,patient_id\n"
                        f"{root}/train/NORMAL/1.2.840.113619.2.55.3.1,NORMAL,train,P1\n"
                        f"{root}/train/PNEUMONIA/1.2.840.113619.2.55.3.5.dcm,PNEUMONIA,train,\n")
    listed = [s.patient_id for s in load_source(manifest).samples]
    assert listed == ["P1", patient["train/PNEUMONIA/1.2.840.113619.2.55.3.5.dcm"]]


def test_kermany_named_dicoms_of_an_anonymisers_constant_keep_the_names_patients(tmp_path):
    """The header comes first, but where it holds a constant (not used), the film went back
    to being its own patient instead of its file-name rule's (person0)."""
    study = {f"{label}/{name}.dcm": ("STUDY01", "", "") for label, name in [
        *(("PNEUMONIA", f"person{p}_bacteria_{k}") for p in range(4) for k in range(3)),
        *(("NORMAL", f"IM-{p:04d}-{k:04d}") for p in range(4) for k in range(3))]}
    source = load_source(pacs_export(tmp_path / "study", study))
    assert sorted({s.patient_id for s in source.samples}) == [
        "IM-0000", "IM-0001", "IM-0002", "IM-0003", "person0", "person1", "person2", "person3"]


def test_only_dicom_headers_are_read_for_patients(tmp_path):
    """A JPEG or PNG is never read as a DICOM (whatever bytes it holds), and a DICOM without
    a PatientID is its own patient, as before."""
    from cxrkit.data.patients import PatientIdParser, dicom_patient_id

    write_dicom(tmp_path / "no_id.dcm", dicom_ramp())
    synthetic_film("NORMAL", 0).save(tmp_path / "film.png")
    (tmp_path / "png_named.dcm").write_bytes((tmp_path / "film.png").read_bytes())
    for name in ("no_id.dcm", "film.png", "png_named.dcm"):
        assert dicom_patient_id(tmp_path / name) is None
    assert PatientIdParser()("NORMAL/no_id.dcm", tmp_path / "no_id.dcm") == "NORMAL/no_id"


def test_an_anonymisers_constant_patient_id_is_not_one_patient(tmp_path, caplog):
    """De-identified exports often write one PatientID (ANONYMOUS, or a study code) into
    every file: all films became one patient, validation came out empty and training was
    refused, blaming a class."""
    from cxrkit.data.patients import dicom_patient_id
    from cxrkit.data.split import patient_split

    study = {f"{split}/{label}/1.2.3.{split}.{label}.{i}.dcm": ("STUDY-7", "", "")
             for split, n in (("train", 8), ("test", 2)) for label in ("NORMAL", "PNEUMONIA")
             for i in range(n)}
    source = load_source(pacs_export(tmp_path / "study", study))
    assert len({s.patient_id for s in source.samples}) == len(study)  # each film its own
    said = "20 of the 20 DICOM films share one PatientID in their headers"
    assert any(note.startswith(said) for note in source.notes) and said in caplog.text
    carved = patient_split(source.samples, 0.25, seed=0)
    assert {s.split for s in carved} == {"train", "val", "test"}
    # a placeholder is no id, however few films carry it
    write_dicom(tmp_path / "anon.dcm", dicom_ramp(), PatientID="Anonymous")
    assert dicom_patient_id(tmp_path / "anon.dcm") is None
    # ids that tell films apart stay, a patient with several films among them
    real = {f"{label}/1.2.4.{label}.{i}.dcm": (f"MRN-{label}-{i // 2}", "", "")
            for label in ("NORMAL", "PNEUMONIA") for i in range(6)}
    kept = load_source(pacs_export(tmp_path / "real", real))
    assert len({s.patient_id for s in kept.samples}) == 6 and not kept.notes
    # two real patients, one with most of a small dataset's films, stay two
    two = {f"NORMAL/1.2.5.{i}.dcm": ("MRN-A" if i < 7 else "MRN-B", "", "") for i in range(12)}
    two |= {"PNEUMONIA/1.2.5.99.dcm": ("MRN-C", "", "")}
    assert len({s.patient_id for s in load_source(pacs_export(tmp_path / "two", two)).samples}) == 3
    # a study code in half the films, across classes, beside real ids: only the code goes
    mixed = {f"{label}/1.2.6.{label}.{i}.dcm": ("STUDY-7" if i % 2 else f"MRN-{label}{i}", "", "")
             for label in ("NORMAL", "PNEUMONIA") for i in range(20)}
    ids = [s.patient_id for s in load_source(pacs_export(tmp_path / "mixed", mixed)).samples]
    assert len(set(ids)) == 40  # 20 real patients and 20 films that are each their own
    # a manifest's own patient_id stays, even beside another row of the same file without one
    listed = tmp_path / "films.csv"
    first = sorted((tmp_path / "study" / "train" / "NORMAL").iterdir())[0]
    listed.write_text("path,label,split,patient_id\n" + f"{first},NORMAL,train,REAL-1\n" + "".join(
        f"{path},{path.parent.name},train,\n"
        for path in sorted((tmp_path / "study" / "train").glob("*/*.dcm"))))
    own = [s.patient_id for s in load_source(listed).samples if s.path == str(first)]
    assert "REAL-1" in own


def test_a_file_name_that_is_not_utf8_is_left_out_with_the_fix(tmp_path, caplog):
    """A cp1252 name (a Windows zip) stopped training with a traceback in split.csv's writer,
    leaving half a manifest that a resume then trusted; the audit and `evaluate --data` ended
    on a bare encoding error."""
    from cxrkit.data.audit import audit_dataset
    from cxrkit.data.split import patient_split, read_manifest, write_manifest

    root = make_kaggle_tree(tmp_path / "data", {"train": 6, "test": 2})
    odd = os.path.join(os.fsencode(root / "train" / "NORMAL"), b"caf\xe9.jpeg")
    shutil.copyfile(next((root / "train" / "NORMAL").iterdir()), odd)
    with caplog.at_level("WARNING"):
        source = load_source(root)
    assert len(source.samples) == 16 and not any("caf" in str(s.path) for s in source.samples)
    said = " ".join(caplog.text.split())
    assert (f"1 file name(s) in {root / 'train' / 'NORMAL'} are not UTF-8 text (e.g. "
            "caf\\udce9.jpeg;") in said
    assert f"convmv -f cp1252 -t utf8 -r --notest {root / 'train' / 'NORMAL'}`" in said
    write_manifest(patient_split(source.samples, 0.2, 0), tmp_path / "split.csv")
    assert len(read_manifest(tmp_path / "split.csv")) == 16
    assert audit_dataset(root, tmp_path / "audit", workers=1).n_images == 16
