"""patient_split: deterministic, stratified, never a patient on both sides; manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.data.layout import Sample, load_source
from cxrkit.data.patients import PatientIdParser
from cxrkit.data.split import (
    identical_films_of_two_labels,
    patient_split,
    patients_normal_and_ill,
    read_manifest,
    shared_patients,
    training_films_in_test,
    write_manifest,
)
from tests.conftest import REAL_DATA, make_kaggle_tree, requires_real_data


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """100 train images per class, 1 to 3 images per patient (uneven, like the real data)."""
    root = make_kaggle_tree(tmp_path_factory.mktemp("split") / "data", {"train": 100, "test": 10},
                            images_per_patient=3, size=(16, 16))
    for i, path in enumerate(sorted((root / "train" / "PNEUMONIA").iterdir())):
        if i % 3 == 0:  # rename a third of the files to single-image patients
            path.rename(path.with_name(f"person{5000 + i}_virus_{i}.jpeg"))
    return load_source(root)


def val_fraction_per_class(samples) -> dict[str, float]:
    pool = Counter(s.label for s in samples if s.split in ("train", "val"))
    val = Counter(s.label for s in samples if s.split == "val")
    return {label: val[label] / n for label, n in pool.items()}


def test_split_is_deterministic_and_seeded(source):
    first = patient_split(source.samples, 0.15, seed=0)
    assert first == patient_split(source.samples, 0.15, seed=0)
    assert first != patient_split(source.samples, 0.15, seed=1)


def test_split_is_stratified_and_grouped_by_patient(source):
    samples = patient_split(source.samples, 0.15, seed=0)
    for label, fraction in val_fraction_per_class(samples).items():
        assert 0.15 <= fraction <= 0.15 + 3 / 100, label  # at most one patient over the target
    assert shared_patients(samples, "train", "val") == set()
    val_patients = {s.patient_id for s in samples if s.split == "val"}
    assert len(val_patients) > 5


def test_a_class_of_few_patients_is_never_taken_whole_into_validation(caplog):
    """The first patient used to be taken whatever its size: a class of one patient went
    to validation whole, and training never saw it."""
    samples = ([Sample(f"/n/{i}.png", "NORMAL", "train", f"n{i}") for i in range(40)]
               + [Sample(f"/v/{i}.png", "VIRUS", "train", "v0") for i in range(5)]
               + [Sample(f"/b/{i}.png", "BACTERIA", "train", f"b{i // 4}") for i in range(8)])
    split = patient_split(samples, 0.15, seed=0)
    in_train = Counter(s.label for s in split if s.split == "train")
    assert in_train == {"NORMAL": 34, "VIRUS": 5, "BACTERIA": 4}  # of two patients, one
    assert "VIRUS: all 5 films come from 1 patient(s), too few to split" in caplog.text
    assert "BACTERIA" not in caplog.text


def test_split_only_touches_train(source):
    samples = patient_split(source.samples, 0.2, seed=3)
    assert [s for s in samples if s.split == "test"] == source.split("test")
    assert {s.path for s in samples if s.split in ("train", "val")} == {
        s.path for s in source.split("train")}


def test_zero_fraction_and_bad_fraction(source):
    assert patient_split(source.samples, 0.0) == source.samples
    with pytest.raises(ValueError, match="val_fraction"):
        patient_split(source.samples, 1.0)


def test_manifest_round_trip(source, tmp_path):
    samples = patient_split(source.samples, 0.15, seed=0)
    path = write_manifest(samples, tmp_path / "runs" / "split.csv")
    assert read_manifest(path) == samples
    again = load_source(path)  # a manifest is also a data source
    assert again.layout == "manifest" and again.samples == samples


def test_rank_takes_each_class_s_highest_ranked_patients(source):
    patients = sorted({s.patient_id for s in source.samples if s.split == "train"})
    rank = {p: i for i, p in enumerate(patients)}  # the last patients in name order first
    samples = patient_split(source.samples, 0.15, rank=rank)
    assert shared_patients(samples, "train", "val") == set()
    for label in ("NORMAL", "PNEUMONIA"):
        val = {s.patient_id for s in samples if s.split == "val" and s.label == label}
        train = {s.patient_id for s in samples if s.split == "train" and s.label == label}
        assert min(rank[p] for p in val) > max(rank[p] for p in train), label
    for fraction in val_fraction_per_class(samples).values():  # the random split's quota
        assert 0.15 <= fraction < 0.2


def test_a_manifest_written_from_relative_paths_is_read_anywhere(source, tmp_path, monkeypatch):
    """`cxr data split ../data --out /elsewhere/split.csv`, then training from another folder."""
    monkeypatch.chdir(source.root.parent)
    relative = load_source(source.root.name).samples
    assert not Path(relative[0].path).is_absolute()
    manifest = write_manifest(relative, tmp_path / "elsewhere" / "split.csv")
    monkeypatch.chdir(tmp_path)
    for sample in (*read_manifest(manifest), *load_source(manifest).samples):
        assert Path(sample.path).is_file(), sample.path


@requires_real_data
def test_real_data_split_shares_no_patient():
    samples = patient_split(load_source(REAL_DATA).samples, 0.15, seed=0)
    assert shared_patients(samples, "train", "val") == set()
    for label, fraction in val_fraction_per_class(samples).items():
        assert 0.15 <= fraction < 0.16, label


def test_cli_split_writes_the_manifest_and_reports_no_shared_patient(source, tmp_path):
    out = tmp_path / "split.csv"
    result = CliRunner().invoke(app, ["data", "split", str(source.root), "--out", str(out),
                                      "--val-fraction", "0.2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert read_manifest(out) == patient_split(source.samples, 0.2, seed=4)
    assert "0 patients shared between train and val" in result.stderr
    assert "val" in result.stderr


def test_cli_split_bad_fraction_is_a_message(source, tmp_path):
    result = CliRunner().invoke(app, ["data", "split", str(source.root), "--out",
                                      str(tmp_path / "s.csv"), "--val-fraction", "1.5"])
    assert result.exit_code == 2 and "val_fraction" in result.stderr
    assert not (tmp_path / "s.csv").exists()


def test_an_out_of_the_wrong_kind_is_refused_before_the_work(source, tmp_path):
    """A folder for split's CSV gave a traceback, a file for the audit's folder a bare
    `[Errno 17] File exists` once the films were read."""
    (tmp_path / "taken.txt").write_text("a file")
    for args, said in ((["data", "split", str(source.root), "--out", str(tmp_path)],
                        f"--out {tmp_path} is a folder: give a file name ending in .csv, e.g. "
                        f"{tmp_path / 'split.csv'}"),
                       (["data", "audit", str(source.root), "--out", str(tmp_path / "taken.txt")],
                        f"--out {tmp_path / 'taken.txt'} is a file: give a folder"),
                       (["export", str(source.root), "--out", str(tmp_path / "taken.txt")],
                        f"--out {tmp_path / 'taken.txt'} is a file: give a folder"),
                       (["adapt", str(source.root), "--data", str(source.root), "--out",
                         str(tmp_path / "taken.txt")],
                        f"--out {tmp_path / 'taken.txt'} is a file: give a folder")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and said in " ".join(result.stderr.split()), result.output
    assert list(tmp_path.iterdir()) == [tmp_path / "taken.txt"]


def test_identical_files_under_two_patient_ids_stay_on_one_side(tmp_path):
    """One film filed under two patient ids (a re-export, a second accession) must not be
    trained on and validated on: the split keeps the two ids together at every seed."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 40, "test": 4}, size=(16, 16))
    pneumonia = sorted((root / "train" / "PNEUMONIA").iterdir())
    copy = pneumonia[0].with_name("person9999_virus_1.jpeg")
    copy.write_bytes(pneumonia[0].read_bytes())
    source = load_source(root)
    first = next(s.patient_id for s in source.samples if s.path == str(pneumonia[0]))
    linked = {first, "person9999"}
    sides = set()
    for seed in range(12):
        samples = patient_split(source.samples, 0.3, seed=seed)
        side = {s.split for s in samples if s.patient_id in linked}
        assert len(side) == 1, (seed, side)
        sides |= side
    assert sides == {"train", "val"}  # the pair is split as one group, not pinned to train


def test_kermany_normal2_names_are_their_own_series():
    """744 of Kermany's 1,341 NORMAL training films are NORMAL2-IM-*: without this rule each
    would be a patient of its own, and a patient's films could land in train and val."""
    parse = PatientIdParser()
    assert parse("NORMAL/NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert parse("NORMAL/NORMAL2-IM-1427-0002.jpeg") == "NORMAL2-IM-1427"
    assert parse("NORMAL/IM-1427-0001.jpeg") == "IM-1427"


def test_the_datas_own_val_films_are_split_by_patient_with_train():
    """Kaggle's own val/ folder (16 films) is pooled and split again by patient."""
    samples = [Sample(f"/t/{i}.png", lab, "train", f"{lab}{i // 2}") for lab in ("N", "P")
               for i in range(40)]
    samples += [Sample(f"/v/{lab}.png", lab, "val", f"{lab}0") for lab in ("N", "P")]
    split = patient_split(samples, 0.2, seed=0)
    assert shared_patients(split, "train", "val") == set()


def test_manifests_are_utf8_whatever_the_locale(tmp_path):
    """Where the locale's encoding is not UTF-8 (Windows' code pages; here ASCII), split.csv
    could not hold a film named in German or Chinese; predictions.csv neither."""
    script = tmp_path / "names.py"
    script.write_text(
        "from cxrkit.data.layout import Sample, load_source\n"
        "from cxrkit.data.split import read_manifest, write_manifest\n"
        "from cxrkit.predict import Prediction, write_predictions\n"
        "name = 'R\\u00f6ntgen \\u80f8\\u90e8.png'\n"
        "films = [Sample(f'/films/{c}/{name}', c, 'train', 'p1') for c in ('A', 'B')]\n"
        "path = write_manifest(films, 'split.csv')\n"
        "assert read_manifest(path) == films and load_source(path).samples == films\n"
        "write_predictions([Prediction(name, 'A', {'A': 1.0, 'B': 0.0})], 'p.csv')\n"
        "assert name in open('p.csv', encoding='utf-8').read()\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr


def test_a_test_film_copied_from_training_is_said(tmp_path):
    """Only the audit found it, and only `cxr run` audits before training."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2}, size=(16, 16))
    samples = load_source(root).samples
    assert training_films_in_test(samples) is None
    source, copy = root / "train" / "NORMAL" / "IM-0001-0000.jpeg", root / "test" / "NORMAL"
    (copy / "scan_0042.jpeg").write_bytes(source.read_bytes())
    said = training_films_in_test(load_source(root).samples)
    assert said.startswith(f"test film {copy / 'scan_0042.jpeg'} is a byte-identical copy of "
                           f"{source} (train)")


def test_training_says_what_only_the_audit_found_about_patients_and_copies(tmp_path, caplog):
    """A patient rule taking a film number made 144 films 3 patients, each normal and ill;
    byte-identical files under two labels were trained on as both: only the audit said so."""
    from cxrkit.data.audit import audit_dataset
    from cxrkit.training.fit import new_run
    from tests.test_training import tiny_config

    root = make_kaggle_tree(tmp_path / "data", {"train": 4, "test": 2}, size=(16, 16))
    assert patients_normal_and_ill(load_source(root).samples) is None  # Kermany's rules
    last_digit = r"(?P<patient>\d)\.jpeg$"  # a rule that takes a film number
    said = patients_normal_and_ill(load_source(root, last_digit).samples)
    assert said.startswith("2 patient id(s) have films of a normal class and of another (e.g. "
                           "0: NORMAL 3, PNEUMONIA 3): ids that restart per class, or a "
                           "patient rule that matches too little?")
    # a patient or two filmed again once recovered is real, not a rule gone wrong
    followed = [Sample(f"/f/{i}.png", "PNEUMONIA" if i % 2 else "NORMAL", "train", f"MRN{i // 2}")
                for i in range(2)] + [Sample(f"/f/n{i}.png", "NORMAL", "train", f"MRN{i + 1}")
                                      for i in range(8)]
    assert patients_normal_and_ill(followed) is None  # 1 of 9 normal patients
    film = root / "train" / "NORMAL" / "IM-0001-0000.jpeg"
    copy = root / "train" / "PNEUMONIA" / "person900_bacteria_1.jpeg"
    copy.write_bytes(film.read_bytes())
    said = identical_films_of_two_labels(load_source(root).samples)
    assert said.startswith(f"{film} (NORMAL) and {copy} (PNEUMONIA) are byte-identical files "
                           "of two labels")
    with caplog.at_level("WARNING"):
        new_run(tiny_config(root, tmp_path))
    assert "are byte-identical files of two labels" in caplog.text
    audit = audit_dataset(root, tmp_path / "audit", patient_pattern=last_digit, figures=False)
    assert any("have films of a normal class and of another" in note
               for note in audit.notes)  # the audit says it too


def test_carving_validation_without_patient_ids_warns_it_is_by_film(caplog):
    films = [Sample(f"/data/train/{label}/scan{i}.png", label, "train",
                    f"train/{label}/scan{i}") for label in ("NORMAL", "PNEUMONIA")
             for i in range(4)]
    with caplog.at_level("WARNING"):
        patient_split(films, 0.25)
    assert "carved by film, not by patient" in caplog.text
    assert "each film counts as its own patient" in caplog.text
    caplog.clear()
    named = [Sample(s.path, s.label, s.split, f"p{i}") for i, s in enumerate(films)]
    with caplog.at_level("WARNING"):
        patient_split(named, 0.25)
    assert "carved by film" not in caplog.text
