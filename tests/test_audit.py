"""audit_dataset and `cxr data audit` on a small dataset with every problem planted in it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

import cxrkit
from cxrkit.cli import app
from cxrkit.data.audit import (
    HASH_BITS,
    NearDuplicate,
    audit_dataset,
    audit_is_current,
    default_spec,
    inspect_image,
)
from cxrkit.data.audit_figures import NEAR_PAIRS_SHOWN, pairs_to_show
from tests.conftest import REAL_DATA, make_kaggle_tree, requires_real_data, synthetic_film

FIGURES = {"class_balance", "samples", "image_sizes", "intensity", "augmentation"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """8 train + 4 test films per class (2 per patient), then the problems an audit must find."""
    root = make_kaggle_tree(tmp_path_factory.mktemp("audit") / "data", {"train": 8, "test": 4})
    train, test = root / "train", root / "test"
    # exact duplicates: one pair inside train, one pair across train and test
    shutil.copy(train / "NORMAL" / "IM-0000-0000.jpeg", train / "NORMAL" / "IM-0000-0005.jpeg")
    shutil.copy(train / "PNEUMONIA" / "person0_bacteria_0.jpeg",
                test / "PNEUMONIA" / "person1009_bacteria_9.jpeg")
    # a near duplicate across splits: the same film, brighter, re-encoded as PNG
    film = Image.open(train / "NORMAL" / "IM-0001-0000.jpeg")
    ImageEnhance.Brightness(film).enhance(1.1).save(test / "NORMAL" / "IM-1050-0000.png")
    # a patient with images in train and in test
    synthetic_film("NORMAL", 777).save(test / "NORMAL" / "IM-0002-0009.jpeg")
    # unreadable files
    (train / "NORMAL" / "IM-0099-0000.jpeg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (test / "PNEUMONIA" / "person1099_bacteria_0.jpeg").write_bytes(b"")
    # other sizes, modes and a viral pneumonia
    synthetic_film("PNEUMONIA", 5, (120, 100)).convert("RGB").save(
        train / "PNEUMONIA" / "person60_virus_0.png")
    deep = (np.asarray(synthetic_film("NORMAL", 6, (64, 64)), np.uint16) * 257)
    Image.fromarray(deep).save(train / "NORMAL" / "IM-0070-0000.png")
    return root


@pytest.fixture(scope="module")
def audited(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_out")
    return audit_dataset(planted, out), out


def name(path: str) -> str:
    return Path(path).name


def test_counts_imbalance_and_subtypes(audited):
    r, _ = audited
    assert r.layout == "kaggle" and r.classes == ["NORMAL", "PNEUMONIA"]
    assert r.counts == {"train": {"NORMAL": 11, "PNEUMONIA": 9},
                        "test": {"NORMAL": 6, "PNEUMONIA": 6}}
    assert r.n_images == 32
    assert r.imbalance == {"train": round(11 / 9, 3), "test": 1.0}
    assert r.subtypes == {"train": {"BACTERIA": 8, "NORMAL": 11, "VIRUS": 1},
                          "test": {"BACTERIA": 6, "NORMAL": 6}}


def test_unreadable_files_are_listed_with_their_reason(audited):
    r, _ = audited
    reasons = {name(u.path): u.reason for u in r.unreadable}
    assert set(reasons) == {"IM-0099-0000.jpeg", "person1099_bacteria_0.jpeg"}
    assert "empty file" in reasons["person1099_bacteria_0.jpeg"]
    assert reasons["IM-0099-0000.jpeg"]  # whatever the decoder says, it is said
    assert all(Path(u.path).is_absolute() for u in r.unreadable)
    assert not any("none of its" in n for n in r.notes)  # every class keeps readable films


def test_a_class_none_of_whose_files_decode_is_a_note_to_fix(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"train": 2, "test": 2})
    for film in (root / "test" / "NORMAL").iterdir():
        film.write_bytes(b"")
    r = audit_dataset(root, tmp_path / "out", figures=False)
    [(level, note)] = [(lv, n) for lv, n in zip(r.note_levels, r.notes, strict=True)
                       if "none of its" in n]
    assert level == "fix" and note.startswith("test/NORMAL: none of its 2 file(s) can be read")


def test_exact_duplicates(audited):
    r, _ = audited
    groups = {frozenset(map(name, g)) for g in r.exact_duplicates}
    assert groups == {frozenset({"IM-0000-0000.jpeg", "IM-0000-0005.jpeg"}),
                      frozenset({"person0_bacteria_0.jpeg", "person1009_bacteria_9.jpeg"})}
    assert (r.duplicate_files, r.redundant_copies) == (4, 2)
    assert any("1 group(s) span splits" in n for n in r.notes)


def test_an_identical_film_under_two_labels_is_called_out(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    shutil.copy(root / "train" / "NORMAL" / "IM-0000-0000.jpeg",
                root / "test" / "PNEUMONIA" / "person1009_bacteria_9.jpeg")
    result = audit_dataset(root, tmp_path / "out", figures=False)
    [note] = [n for n in result.notes if "different labels" in n]
    assert note.startswith("1 group(s) of identical files carry different labels, e.g. ")
    assert "IM-0000-0000.jpeg (NORMAL)" in note and "bacteria_9.jpeg (PNEUMONIA)" in note
    # The notes come most severe first, each with its level, on the page too
    levels = dict(zip(result.notes, result.note_levels, strict=True))
    assert levels[note] == "fix" and levels[result.notes[-1]] == "info"
    assert result.note_levels == sorted(result.note_levels, key=["fix", "check", "info"].index)
    assert result.notes.index(note) < result.notes.index(next(
        n for n in result.notes if n.startswith("no val split")))
    page = (tmp_path / "out" / "audit.html").read_text()
    assert page.index("Fix before training:") < page.index("no val split")
    assert page.count("<table>") == page.count("<table><caption>") > 3  # each says what it is
    assert "<code>cxr data split</code>" in page and "`" not in page
    assert f"by cxrkit {cxrkit.__version__}" in page and result.audited_at[:10] in page


def test_near_duplicates_find_the_reencoded_copy_and_nothing_else(audited, planted, tmp_path):
    r, _ = audited
    assert r.hash_bits == HASH_BITS
    assert len(r.near_duplicates) == 1
    pair = r.near_duplicates[0]
    assert {name(pair.a), name(pair.b)} == {"IM-1050-0000.png", "IM-0001-0000.jpeg"}
    assert {pair.split_a, pair.split_b} == {"train", "test"}
    assert 0 < pair.distance <= r.near_threshold
    assert r.near_pairs_total == 1 and r.near_across_splits == 1
    stricter = audit_dataset(planted, tmp_path, near_threshold=pair.distance - 1, figures=False)
    assert stricter.near_duplicates == [] and stricter.near_pairs_total == 0


def test_patients(audited, planted, tmp_path):
    r, _ = audited
    assert r.shared_patients == {"train/test": ["IM-0002"]}
    # the tree's 4 + 4 train and 2 + 2 test patients, plus the files planted in each split
    assert r.patients == {"train": 8 + 3, "test": 4 + 4}
    # one patient per file name prefix: everything is shared
    coarse = audit_dataset(planted, tmp_path, patient_pattern=r"^(IM|person)", figures=False)
    assert coarse.patients == {"train": 2, "test": 2}
    assert coarse.shared_patients == {"train/test": ["IM", "person"]}


def test_sizes_modes_and_formats(audited):
    r, _ = audited
    assert r.sizes["distinct_sizes"] == 3
    assert r.sizes["width"] == {"min": 64, "median": 96.0, "max": 120}
    assert r.sizes["most_common"][0] == [96, 80, 28]
    assert r.modes == {"L": 28, "RGB": 1, "I;16": 1}
    assert r.formats == {"JPEG": 27, "PNG": 3}


def test_inspect_image_facts(planted):
    path = planted / "train" / "PNEUMONIA" / "person60_virus_0.png"
    facts = inspect_image(str(path), preview_size=32)
    assert facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (facts.file_format, facts.mode, facts.width, facts.height) == ("PNG", "RGB", 120, 100)
    assert len(facts.phash) * 8 == HASH_BITS
    assert facts.histogram.shape == (256,) and abs(float(facts.histogram.sum()) - 1) < 1e-5
    assert facts.preview.shape == (32, 32) and facts.preview.dtype == np.uint8
    assert inspect_image(str(path)).preview is None


def test_outputs_json_figures_and_one_self_contained_html(audited):
    r, out = audited
    assert json.loads((out / "audit.json").read_text()) == json.loads(json.dumps(r.to_dict()))
    assert set(r.figures) == FIGURES | {"near_duplicates"}  # the planted pair, to look at
    for path in r.figures.values():
        assert Path(path).parent == out
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(r.figures["near_duplicates"]) as pairs:  # one pair: one row of three
        assert pairs.width > 2 * pairs.height
    page = (out / "audit.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES) + 1
    assert "one film twice (a black difference) across train and test is a leak" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    for expected in ("IM-0099-0000.jpeg", "empty file", "IM-0002", "person1009_bacteria_9.jpeg",
                     "IM-1050-0000.png", "VIRUS", "I;16"):
        assert expected in page, expected
    assert "Files found, the 2 unreadable ones included" in page  # the counts say what they count


def test_data_given_relatively_is_audited_under_its_absolute_name(tmp_path, monkeypatch):
    """audit.json named the root and the duplicates as given (`data/...`), its figures and
    every run's split.csv absolutely: a join on the paths found nothing."""
    data = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    film = next((data / "train" / "NORMAL").iterdir())
    (data / "test" / "NORMAL" / film.name).write_bytes(film.read_bytes())  # a duplicate
    monkeypatch.chdir(tmp_path)
    audit_dataset("data", tmp_path / "audit", figures=False)
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["root"] == str(data)
    assert sorted(saved["exact_duplicates"][0]) == sorted(
        str(data / split / "NORMAL" / film.name) for split in ("train", "test"))
    assert audit_is_current(tmp_path / "audit", data, figures=False)  # either way of naming it
    assert audit_is_current(tmp_path / "audit", "data", figures=False)


def test_an_audit_is_current_until_the_data_or_its_pages_change(tmp_path, monkeypatch):
    """`cxr run` on a run it audited skips the audit only while it would find the same."""
    data = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    out = tmp_path / "audit"
    assert not audit_is_current(out, data)  # never audited
    audit_dataset(data, out)
    assert audit_is_current(out, data)
    assert not audit_is_current(out, data, patient_pattern=r"(IM|person)-?(\d+)")
    assert not audit_is_current(out, data, near_threshold=17)
    bigger = replace(default_spec(), input_size=256)  # previews are drawn at the input size
    assert not audit_is_current(out, data, spec=bigger)

    film = next((data / "train" / "NORMAL").iterdir())
    os.utime(film, ns=(film.stat().st_atime_ns, film.stat().st_mtime_ns + 10**9))  # rewritten
    assert not audit_is_current(out, data)
    audit_dataset(data, out)
    assert audit_is_current(out, data)
    (data / "test" / "NORMAL" / film.name).write_bytes(film.read_bytes())  # a film added
    assert not audit_is_current(out, data)
    audit_dataset(data, out)
    (out / "intensity.png").unlink()  # part of the audit gone
    assert not audit_is_current(out, data)
    audit_dataset(data, out)
    (out / "audit.html").unlink()
    assert not audit_is_current(out, data)
    audit_dataset(data, out)
    (data / "__MACOSX").mkdir()  # the zip's junk: a new audit notes it ignored it
    assert not audit_is_current(out, data)
    audit_dataset(data, out, figures=False)  # `cxr run` audits with figures
    assert not audit_is_current(out, data)
    assert audit_is_current(out, data, figures=False)  # what was asked for, though
    audit_dataset(data, out)
    monkeypatch.setenv("CXRKIT_FIGURE_FORMATS", "svg")  # figures also as vector files
    assert not audit_is_current(out, data)


def test_cli_audit_prints_a_summary(planted, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["data", "audit", str(planted), "--out", str(out),
                                      "--near-threshold", "0"])
    assert result.exit_code == 0, result.output
    text = result.stderr
    for expected in ("NORMAL", "PNEUMONIA", "unreadable files", "2 groups, 4 files, 2 redundant",
                     "0 pairs", "patients shared train/test", "audit.html"):
        assert expected in text, expected
    assert (out / "audit.html").is_file()
    assert result.stdout == f"{out.absolute()}\n"  # stdout: the folder alone, for a script


def test_audit_of_unsplit_class_folders(tmp_path):
    for label in ("NORMAL", "PNEUMONIA", "COVID"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            synthetic_film(label, i).save(tmp_path / "data" / label / f"{label}{i}.png")
    r = audit_dataset(tmp_path / "data", tmp_path / "out")
    assert r.layout == "classes"
    assert r.counts == {"": {"COVID": 3, "NORMAL": 3, "PNEUMONIA": 3}}
    assert r.shared_patients == {} and r.subtypes == {}
    assert set(r.figures) == FIGURES
    assert "(no split)" in (tmp_path / "out" / "audit.html").read_text()


def test_audit_of_only_broken_files_reports_them_without_crashing(tmp_path):
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / "x.png").write_bytes(b"nope")
    r = audit_dataset(tmp_path / "data", tmp_path / "out")
    assert len(r.unreadable) == 2 and r.sizes == {} and r.near_duplicates == []
    assert "every file decodes" not in (tmp_path / "out" / "audit.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "does not exist"),
    ([".", "--patient-pattern", "(unclosed"], "not a valid regex"),
    ([".", "--near-threshold", "300"], "near_threshold must be 0 to 64"),
])
def test_cli_audit_errors_are_messages(tmp_path, args, message, planted):
    args = [str(planted) if a == "." else a for a in args]
    result = CliRunner().invoke(app, ["data", "audit", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


@requires_real_data
def test_real_data_duplicates_match_the_published_checksums(tmp_path):
    r = audit_dataset(REAL_DATA, tmp_path, figures=False)
    by_hash = defaultdict(set)
    for line in (REAL_DATA.parent / "chest_xray.sha256").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        by_hash[digest].add(str((REAL_DATA / rel).resolve()))
    expected = {frozenset(g) for g in by_hash.values() if len(g) > 1}
    assert {frozenset(str(Path(p).resolve()) for p in g) for g in r.exact_duplicates} == expected
    assert (len(r.exact_duplicates), r.duplicate_files, r.redundant_copies) == (30, 62, 32)
    assert r.n_images == 5840 and r.unreadable == []


def test_files_that_decode_but_are_hardly_films_are_listed(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    normal = root / "train" / "NORMAL"
    synthetic_film("NORMAL", 90, (40, 40)).save(normal / "IM-0090-0000.jpeg")  # a thumbnail
    synthetic_film("NORMAL", 91, (400, 100)).save(normal / "IM-0091-0000.jpeg")  # a strip
    Image.new("L", (128, 128), 128).save(normal / "IM-0092-0000.png")  # no content
    r = audit_dataset(root, tmp_path / "out", figures=False)
    reasons = {name(u.path): u.reason for u in r.doubtful}
    assert set(reasons) == {"IM-0090-0000.jpeg", "IM-0091-0000.jpeg", "IM-0092-0000.png"}
    assert "thumbnail" in reasons["IM-0090-0000.jpeg"]
    assert "shape" in reasons["IM-0091-0000.jpeg"]
    assert "uniform" in reasons["IM-0092-0000.png"]
    assert any(n.startswith("3 file(s) decode but are hardly chest films") for n in r.notes)
    assert "train/NORMAL/IM-0092-0000.png" in (tmp_path / "out" / "audit.html").read_text()
    result = CliRunner().invoke(app, ["data", "audit", str(root), "--out", str(tmp_path / "o")])
    assert "readable, hardly films │ 3" in " ".join(result.stderr.split())


def test_near_duplicate_pairs_across_splits_are_shown_first():
    pairs = [NearDuplicate(f"a{i}", f"b{i}", d, "train", split)
             for i, (d, split) in enumerate([(1, "train"), (9, "test"), (3, "train"), (5, "val")]
                                            + [(0, "train")] * 5)]
    shown = pairs_to_show(pairs)
    assert [(p.distance, p.split_b) for p in shown[:4]] == [(5, "val"), (9, "test"),
                                                           (0, "train"), (0, "train")]
    assert len(shown) == NEAR_PAIRS_SHOWN


def test_a_near_duplicate_pair_with_two_labels_is_noted(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2})
    film = Image.open(root / "train" / "NORMAL" / "IM-0000-0000.jpeg")
    ImageEnhance.Brightness(film).enhance(1.1).save(root / "train" / "PNEUMONIA" /
                                                    "person99_bacteria_0.png")
    r = audit_dataset(root, tmp_path / "out", figures=False)
    [pair] = [p for p in r.near_duplicates if {p.label_a, p.label_b} == {"NORMAL", "PNEUMONIA"}]
    assert any(n.startswith("1 near-duplicate pair(s) carry different labels") for n in r.notes)
    page = (tmp_path / "out" / "audit.html").read_text()
    assert "label A</th>" in page and "train/PNEUMONIA/person99_bacteria_0.png" in page


def test_a_manifest_listing_one_file_twice_is_named(tiny_kaggle, tmp_path):
    """Merged manifests repeat rows: an exact repeat is read once; the same file with another
    label or split is what the audit must flag to fix, and training refuses it."""
    from cxrkit.config import DataConfig
    from cxrkit.data.layout import DataLayoutError, load_source, refuse_conflicting_rows
    from cxrkit.training.datamodule import prepare_samples

    rows = [f"{p},{label},{split}" for split in ("train", "test")
            for label in ("NORMAL", "PNEUMONIA")
            for p in sorted((tiny_kaggle / split / label).iterdir())[:4]]
    twice = rows[0].split(",")[0]
    manifest = tmp_path / "merged.csv"
    film = Path(rows[1].split(",")[0])  # listed again as another spelling of the same file
    respelt = f"{film.parent}/../{film.parent.name}/{film.name},{rows[1].split(',', 1)[1]}"
    manifest.write_text("\n".join(["path,label,split", *rows, rows[1], respelt,
                                   f"{twice},PNEUMONIA,test"]))
    other_patient = tmp_path / "patients.csv"
    other_patient.write_text(f"path,label,split,patient_id\n{twice},NORMAL,train,a\n"
                             f"{twice},NORMAL,train,b\n{rows[-1]},p9\n")
    with pytest.raises(DataLayoutError, match=rf"lists {twice} twice: as NORMAL in train of "
                                              r"patient a and as NORMAL in train of patient b"):
        refuse_conflicting_rows(load_source(other_patient))
    source = load_source(manifest)
    assert len(source.samples) == len(rows) + 1  # the repeats read once (one was read twice)
    assert ("2 row(s) repeat an earlier row (the same file, perhaps spelt otherwise): each "
            "file is read once") in source.notes
    result = audit_dataset(manifest, tmp_path / "audit", figures=False)
    levels = dict(zip(result.notes, result.note_levels, strict=True))
    [spans] = [n for n in result.notes if "span splits" in n]
    [labels] = [n for n in result.notes if "carry different labels" in n]
    assert levels[spans] == levels[labels] == "fix"
    assert f"{twice} (NORMAL), {twice} (PNEUMONIA)" in labels
    message = rf"merged.csv lists {twice} twice: as NORMAL in train and as PNEUMONIA in test"
    with pytest.raises(DataLayoutError, match=message):
        refuse_conflicting_rows(source)
    with pytest.raises(DataLayoutError, match=message):
        prepare_samples(DataConfig(path=str(manifest)))
    # `cxr data split` wrote it into a manifest, exit 0, which training then refused
    split = CliRunner().invoke(app, ["data", "split", str(manifest), "--out",
                                     str(tmp_path / "split.csv")])
    assert split.exit_code == 2 and "twice: as NORMAL in train" in " ".join(split.stderr.split())
    assert not (tmp_path / "split.csv").exists()


def test_film_names_on_the_figures_stay_whole_so_the_files_can_be_found():
    from cxrkit.data.audit_figures import _short

    assert _short("IM-0115-0001.jpeg") == "IM-0115-0001.jpeg"
    assert _short("person1000_bacteria_2931.jpeg") == "person1000_bacteria_2931\n.jpeg"
    assert _short("NORMAL2-IM-0474-0001.jpeg") == "NORMAL2-IM-0474-0001\n.jpeg"
    very_long = "x" * 30 + "_" + "y" * 30 + ".png"
    assert _short(very_long).endswith("y" * 19 + ".png") and "…" in _short(very_long)


def test_files_a_manifest_lists_but_that_do_not_exist_are_a_note_to_fix(tmp_path):
    """They were counted among the files that 'cannot be decoded' (a look, not a fix)."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 2, "test": 2})
    rows = [f"{p},{p.parent.name}" for p in sorted(root.rglob("*.jpeg"))]
    manifest = tmp_path / "films.csv"
    manifest.write_text("\n".join(["path,label", *rows, f"{root}/gone.jpeg,NORMAL"]) + "\n",
                        encoding="utf-8")
    r = audit_dataset(manifest, tmp_path / "out", figures=False)
    notes = dict(zip(r.notes, r.note_levels, strict=True))
    said = (f"1 file(s) the manifest lists do not exist (e.g. {root}/gone.jpeg): fix their "
            "paths, or delete their rows.")
    assert notes.get(said) == "fix" and not any("cannot be decoded" in n for n in notes)


def test_data_without_any_patient_id_is_said_plainly(tmp_path):
    """Films no rule names (and no manifest, no DICOM PatientID): a split by patient is by
    film then, and a patient's films in two splits cannot be seen; the audit says so."""
    data = tmp_path / "data"
    for split, label, n in (("train", "NORMAL", 2), ("train", "PNEUMONIA", 2),
                            ("test", "NORMAL", 1), ("test", "PNEUMONIA", 1)):
        (data / split / label).mkdir(parents=True)
        for i in range(n):
            seed = i + (10 if split == "test" else 0)  # no copies across splits
            synthetic_film(label, seed).save(data / split / label / f"scan{i}.png")
    result = audit_dataset(data, tmp_path / "out", figures=False)
    [(level, note)] = [(lv, n) for lv, n in zip(result.note_levels, result.notes, strict=True)
                       if "No film has a patient id" in n]
    assert level == "check" and note.startswith("No film has a patient id")
    assert "each film counts as its own patient" in note and "patient_id column" in note
    kermany = audit_dataset(make_kaggle_tree(tmp_path / "kermany", {"train": 2, "test": 2}),
                            tmp_path / "out2", figures=False)
    assert not any("No film has a patient id" in n for n in kermany.notes)
