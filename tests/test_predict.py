"""`cxr predict` and `cxrkit.predict`: files, folders, globs, bad files, DICOM, thresholds."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.data.dataset import load_prepared
from cxrkit.data.io import STRETCH_PERCENTILES
from cxrkit.data.transforms import eval_transform
from cxrkit.export import export_model
from cxrkit.inference import predict_logits
from cxrkit.models import create_model, weights_digest
from cxrkit.predict import Prediction, Predictor, collect_images, predict, write_predictions
from cxrkit.runs import (
    Calibration,
    load_model,
    load_spec,
    read_calibration,
    save_model,
    write_calibration,
)
from tests.conftest import REAL_DATA, requires_real_data, synthetic_film
from tests.test_io import write_dicom

runner = CliRunner()


def flat(text: str) -> str:
    """Rich wraps long lines at the terminal width: compare text with single spaces."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """The tiny trained run, with a threshold of 0.4, a temperature of 1.5 and a bias of
    -0.3 on PNEUMONIA."""
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("predict") / "run")
    write_calibration(run, Calibration(threshold=0.4, temperature=1.5, chosen_on="val",
                                       bias=[0.0, -0.3]))
    return run


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """films/{a,b}/ with 3 good PNGs and a JPEG, a corrupt PNG, and a README to ignore."""
    root = tmp_path_factory.mktemp("films")
    (root / "a").mkdir()
    (root / "b" / "deeper").mkdir(parents=True)
    for i, (label, where) in enumerate([("NORMAL", "a"), ("PNEUMONIA", "a"),
                                        ("PNEUMONIA", "b"), ("NORMAL", "b/deeper")]):
        suffix = "jpg" if i == 3 else "png"
        synthetic_film(label, 10 + i).save(root / where / f"{label.lower()}_{i}.{suffix}")
    (root / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "README.txt").write_text("films for the test\n")
    return root


def reference_probabilities(run, path, temperature, bias):
    """softmax(logits / T + bias) straight from the PyTorch model, for one file."""
    model = load_model(run)
    x = eval_transform(model.spec)(load_prepared(str(path), model.spec.input_size, False))
    with torch.no_grad():
        z = model(x[None]) / temperature + (torch.tensor(bias) if bias else 0.0)
        return torch.softmax(z, dim=1)[0].numpy()


def test_folder_predictions_follow_the_calibration_and_threshold(run, films):
    # On the CPU like the reference: a GPU's TF32 convolutions differ by ~1e-4.
    predictions = predict(run, [films], device="cpu")
    assert [p.path for p in predictions] == [str(p) for p in sorted(films.rglob("*.*"))
                                             if p.suffix != ".txt"]
    good = [p for p in predictions if p.ok]
    assert len(good) == 4
    for p in good:
        expected = reference_probabilities(run, p.path, temperature=1.5, bias=[0.0, -0.3])
        np.testing.assert_allclose(list(p.probabilities.values()), expected, atol=1e-5)
        assert list(p.probabilities) == ["NORMAL", "PNEUMONIA"]
        assert p.threshold == 0.4
        assert p.label == ("PNEUMONIA" if p.probabilities["PNEUMONIA"] >= 0.4 else "NORMAL")
    [bad] = [p for p in predictions if not p.ok]
    assert bad.path.endswith("corrupt.png") and bad.label is None and bad.probabilities == {}
    # The tiny model learnt the synthetic films: the file names are its labels.
    assert [p.label for p in good] == [p.path.rsplit("/", 1)[1].split("_")[0].upper()
                                       for p in good]


def test_threshold_override_and_default(run, films, tmp_path):
    files = collect_images([films])
    p_pneumonia = [p.probabilities.get("PNEUMONIA") for p in predict(run, files)]
    cut = sorted(p for p in p_pneumonia if p is not None)[1]  # between the 2nd and 3rd
    labels = [p.label for p in predict(run, files, threshold=cut)]
    assert labels == [None if p is None else ("PNEUMONIA" if p >= cut else "NORMAL")
                      for p in p_pneumonia]
    assert labels.count("PNEUMONIA") == 3
    # Without a calibration file: threshold 0.5, temperature 1, no bias.
    bare = shutil.copytree(run, tmp_path / "bare")
    (bare / "calibration.json").unlink()
    [p] = predict(bare, [files[0]], device="cpu")
    assert p.threshold == 0.5
    np.testing.assert_allclose(list(p.probabilities.values()),
                               reference_probabilities(run, files[0], 1.0, None), atol=1e-5)


def test_cli_lists_the_corrupt_file_and_exits_1(run, films, tmp_path):
    for suffix in ("csv", "json"):
        out = tmp_path / f"preds.{suffix}"
        result = runner.invoke(app, ["predict", str(run), str(films), "--out", str(out),
                                     "--batch-size", "2"])
        assert result.exit_code == 1, result.output
        assert "corrupt.png: not an image" in flat(result.output)
        assert "4 predicted" in flat(result.output)
        if suffix == "csv":
            rows = list(csv.DictReader(out.open()))
            assert list(rows[0]) == ["path", "label", "p_NORMAL", "p_PNEUMONIA", "threshold",
                                     "error", "warning", "cam", "weights_sha256"]
        else:
            rows = json.loads(out.read_text())
        by_name = {r["path"].rsplit("/", 1)[1]: r for r in rows}
        assert len(by_name) == 5
        assert by_name["corrupt.png"]["label"] in ("", None) and by_name["corrupt.png"]["error"]
        assert by_name["pneumonia_1.png"]["label"] == "PNEUMONIA"
        assert by_name["normal_3.jpg"]["label"] == "NORMAL"
        # which model made each call (none for a film not read)
        assert by_name["normal_3.jpg"]["weights_sha256"] == weights_digest(load_model(run))
        assert by_name["corrupt.png"]["weights_sha256"] in ("", None)
    ok = runner.invoke(app, ["predict", str(run), str(films / "a"), "--threshold", "0.4"])
    assert ok.exit_code == 0, ok.output
    assert "label PNEUMONIA where P(PNEUMONIA) >= 0.400" in flat(ok.output)
    assert "normal_0.png" in ok.stdout and "normal_0.png" not in ok.stderr  # pipes see it
    # no terminal: one tab-separated line per film, its whole path first (for grep, cut)
    header, *rows = [line.split("\t") for line in ok.stdout.splitlines()]
    assert header == ["path", "label", "P(NORMAL)", "P(PNEUMONIA)"]
    assert sorted(row[0] for row in rows) == sorted(str(p) for p in (films / "a").iterdir())
    assert all(row[1] == ("PNEUMONIA" if float(row[3]) >= 0.4 else "NORMAL") for row in rows)


def test_a_file_name_with_a_tab_or_newline_keeps_to_its_own_line_on_stdout(run, films,
                                                                           tmp_path):
    """One film spilled onto two lines, another gained a column: `| cut -f2` read wrong."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("new\nline.png", "tab\tname.png"):
        shutil.copy(films / "a" / "normal_0.png", folder / name)
    result = runner.invoke(app, ["predict", str(run), str(folder)])
    assert result.exit_code == 0, result.output
    header, *rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(len(row) == len(header) == 4 for row in rows)
    assert sorted(row[0] for row in rows) == [f"{folder}/new\\nline.png",
                                              f"{folder}/tab\\tname.png"]


@pytest.mark.parametrize(("paths", "title", "shown"), [
    (["/data/a/x.png", "/data/b/y.png"], "Predictions, files in /data", ["a/x.png", "b/y.png"]),
    (["/tmp/x.png", "/work/y.png"], "Predictions", ["/tmp/x.png", "/work/y.png"]),
])
def test_the_table_shortens_paths_to_their_common_folder_only(paths, title, shown):
    """Files with only the filesystem root in common were shown without their leading /."""
    from rich.console import Console

    from cxrkit.cli.use import predictions_table

    table = predictions_table([Prediction(p, "NORMAL", {"NORMAL": 0.9, "PNEUMONIA": 0.1}, 0.5)
                               for p in paths])
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert table.title == title
    assert all(f" {name} " in text for name in shown)


def test_file_names_with_brackets_are_shown_as_they_are(run, films, tmp_path):
    """Rich reads `[left]` as markup; the names on screen must be the files' own."""
    folder = tmp_path / "[bold]films"
    folder.mkdir()
    for name in ("scan [left].png", "scan.png"):
        shutil.copy(films / "a" / "normal_0.png", folder / name)
    (folder / "bad [pa].png").write_bytes(b"not a png")
    result = runner.invoke(app, ["predict", str(run), str(folder)])
    assert result.exit_code == 1, result.output
    shown = flat(result.output)
    assert "scan [left].png" in shown and "bad [pa].png: not an image" in shown
    only_bad = runner.invoke(app, ["predict", str(run), str(folder / "bad [pa].png")])
    assert "0 predicted in" in flat(only_bad.output) and "()" not in only_bad.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "[x]run"), str(folder)])
    assert missing.exit_code == 2 and "[x]run does not exist" in flat(missing.output)


def test_globs_and_missing_files(run, films):
    predictions = predict(run, [str(films / "**" / "*.png"), films / "gone.png",
                                films / "a" / "normal_0.png"])  # already matched: once
    names = [p.path.rsplit("/", 1)[1] for p in predictions]
    assert names == ["normal_0.png", "pneumonia_1.png", "corrupt.png", "pneumonia_2.png",
                     "gone.png"]
    assert predictions[-1].error == "file not found"
    [unmatched] = predict(run, str(films / "*.dcm"))
    assert unmatched.error == "no file matches this pattern"
    # One path given as a plain str (or Path) is one path, not its characters ('.' = all).
    for one in (str(films / "a" / "normal_0.png"), films / "a" / "normal_0.png"):
        [p] = predict(run, one)
        assert p.ok and p.path.endswith("normal_0.png")


@requires_real_data
def test_dicom_monochrome1_predicts_like_the_png(run, tmp_path):
    """A real film stored as 12-bit MONOCHROME1 DICOM (bone dark, inverted) with and
    without the .dcm suffix is predicted like the same film as a PNG."""
    film = Image.open(next((REAL_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))).convert("L")
    pixels = np.asarray(film).astype(np.float64)
    lo, hi = np.percentile(pixels, STRETCH_PERCENTILES)  # the PNG as a deep film is stretched
    pixels = np.round(np.clip((pixels - lo) * 255 / (hi - lo), 0, 255))
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "film.png")
    write_dicom(tmp_path / "film.dcm", (255 - pixels) * 16, "MONOCHROME1")
    shutil.copy(tmp_path / "film.dcm", tmp_path / "film_without_suffix")
    png, dcm, bare = predict(run, [tmp_path / "film.png", tmp_path / "film.dcm",
                                   tmp_path / "film_without_suffix"])
    assert png.ok and dcm.ok and bare.ok
    for other in (dcm, bare):
        assert other.label == png.label
        np.testing.assert_allclose(list(other.probabilities.values()),
                                   list(png.probabilities.values()), atol=1e-5)
    # A folder picks up .dcm files by their suffix, and DICOM files with none by content.
    assert sorted(p.rsplit("/", 1)[1] for p in collect_images([tmp_path])) == [
        "film.dcm", "film.png", "film_without_suffix"]


def test_gradcam_overlays_written_per_readable_file(run, films, tmp_path):
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", str(run), str(films / "a"), str(films / "b"),
                                 "--cam", str(tmp_path / "cams"), "--out", str(out)])
    assert result.exit_code == 1, result.output  # corrupt.png
    rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(out.open())}
    assert rows["corrupt.png"]["cam"] == ""
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == [
        "normal_0_cam.png", "normal_3_cam.png", "pneumonia_1_cam.png", "pneumonia_2_cam.png"]
    for name in ("normal_0.png", "pneumonia_2.png"):
        cam = Image.open(rows[name]["cam"])
        # the film at its own size, top left, then a caption strip saying what the map shows
        assert cam.mode == "RGB" and cam.width == 96 and 80 < cam.height <= 125
        rgb = np.asarray(cam).astype(int)
        assert np.abs(rgb[:80, :, 0] - rgb[:80, :, 2]).max() > 30  # coloured, not the gray film
        label, p = rows[name]["label"], float(rows[name]["p_PNEUMONIA"])
        assert cam.text["Description"].startswith(f"map: Grad-CAM for {label}, the label called; ")
        assert f"P(PNEUMONIA)={p:.2f}" in cam.text["Description"]
        assert (rgb[82:, :, :] > 128).any()  # the caption is drawn, not only stored


def test_gradcam_of_a_class_asked_for_whatever_was_called(run, films, tmp_path):
    """Grad-CAM explained only the label called: a student could not see what in a NORMAL
    call's film spoke for PNEUMONIA."""
    film_path = films / "b" / "deeper" / "normal_3.jpg"  # called NORMAL (as tested above)
    [normal] = predict(run, [film_path], cam_dir=tmp_path / "called")
    assert normal.label == "NORMAL"
    asked = runner.invoke(app, ["predict", str(run), str(film_path), "--cam",
                                str(tmp_path / "asked"), "--cam-label", "PNEUMONIA"])
    assert asked.exit_code == 0, asked.output
    cam = Image.open(tmp_path / "asked" / "normal_3_cam.png")
    assert cam.text["Description"].startswith(
        "map: Grad-CAM for PNEUMONIA, as asked (called: NORMAL); ")
    film = (slice(0, 80), slice(None))  # the overlay, above the caption
    assert not np.array_equal(np.asarray(cam)[film],
                              np.asarray(Image.open(normal.cam))[film])  # another class's map
    wrong = runner.invoke(app, ["predict", str(run), str(films / "a"), "--cam",
                                str(tmp_path / "x"), "--cam-label", "VIRUS"])
    assert wrong.exit_code == 2
    assert "--cam-label VIRUS: give one of the model's labels (NORMAL, PNEUMONIA)" in flat(
        wrong.output)


def test_gradcam_of_films_of_one_name_in_two_folders_are_both_kept(run, tmp_path):
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        synthetic_film("PNEUMONIA", seed).save(tmp_path / folder / "x.png")
    first, second = predict(run, [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"],
                            cam_dir=tmp_path / "cams")
    assert [Path(first.cam).name, Path(second.cam).name] == ["x_cam.png", "x_2_cam.png"]
    assert Image.open(first.cam).tobytes() != Image.open(second.cam).tobytes()


def test_multiclass_uses_argmax_and_refuses_a_threshold(tmp_path, films):
    from cxrkit.models import create_model
    from cxrkit.runs import save_model

    torch.manual_seed(0)
    model = create_model("simple_cnn", labels=["NORMAL", "BACTERIA", "VIRUS"])
    model.spec.input_size = 64
    save_model(model, tmp_path / "run3")
    predictions = [p for p in predict(tmp_path / "run3", [films]) if p.ok]
    for p in predictions:
        assert p.threshold is None
        assert p.label == max(p.probabilities, key=p.probabilities.get)
    result = runner.invoke(app, ["predict", str(tmp_path / "run3"), str(films),
                                 "--threshold", "0.3"])
    assert result.exit_code == 2 and "two-class" in flat(result.output)


@pytest.mark.parametrize("args, message", [
    (["predict", "{tmp}/nowhere", "{films}"], "nowhere does not exist"),
    (["predict", "{tmp}", "{films}"], "neither a cxrkit run nor an ONNX export"),
    (["predict", "{run}", "{tmp}"], "no images found"),
    (["predict", "{run}", "{films}", "--out", "{tmp}/preds.txt"], ".csv or .json"),
    (["predict", "{run}", "{films}", "--out", "/proc/nowhere/p.csv"], "cannot create its folder"),
    (["predict", "{run}", "{films}", "--out", "{tmp}"], "ending in .csv or .json"),
    (["predict", "{run}", "{films}", "--backend", "onnx"], "cxr export"),
    (["predict", "{run}", "{films}", "--backend", "tensorflow"], "unknown backend"),
    (["predict", "{run}", "{films}", "--threshold", "1.5"], "'--threshold'"),
])
def test_usage_errors_exit_2(run, films, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, films=films, run=run) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in flat(result.output)


def test_predictions_file_must_be_csv_or_json(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv or a \.json"):
        write_predictions([], tmp_path / "new" / "preds.xlsx")
    assert not (tmp_path / "new").exists()  # refused before anything was made
    assert write_predictions([], tmp_path / "new" / "deeper" / "preds.json").is_file()


def test_an_image_in_memory_and_a_missing_file_of_the_same_name_each_get_their_own(run,
                                                                                   films):
    film = Image.open(films / "a" / "normal_0.png")  # shown as "<image 0>"
    readable, missing = Predictor.load(run).predict([film, "<image 0>"])
    assert readable.ok and readable.path == "<image 0>"
    assert missing.error == "file not found"


def test_predictor_is_reusable_and_keeps_order(run, films):
    predictor = Predictor.load(run)
    files = collect_images([films])
    assert predictor.backend == "torch" and predictor.labels == ["NORMAL", "PNEUMONIA"]
    forward = predictor.predict(files, batch_size=3)
    backward = predictor.predict(files[::-1], batch_size=1)
    assert [p.path for p in backward] == files[::-1]
    for a, b in zip(forward, backward[::-1], strict=True):
        assert (a.label, a.error) == (b.label, b.error)
        assert a.probabilities.keys() == b.probabilities.keys()
        np.testing.assert_allclose(list(a.probabilities.values()),
                                   list(b.probabilities.values()), atol=1e-6)


def test_images_that_are_hardly_films_are_predicted_with_a_warning(run, films, tmp_path):
    """A model calls a thumbnail or a blank image something, confidently: say it is doubtful."""
    Image.new("L", (8, 8), 128).save(tmp_path / "thumb.png")
    Image.new("L", (256, 256), 0).save(tmp_path / "black.png")
    Image.fromarray(np.tile(np.arange(600, dtype=np.uint8)[None] % 200, (100, 1))).save(
        tmp_path / "strip.png")
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    Image.fromarray(ramp // 10).save(tmp_path / "dark.png")  # a film crushed into 26 levels
    flat_noise = 1000 + np.random.default_rng(0).integers(0, 5, (256, 256), dtype=np.uint16)
    Image.fromarray(flat_noise).save(tmp_path / "flat16.png")  # stretched to 0..255: noise
    shutil.copy(films / "a" / "normal_0.png", tmp_path / "film.png")
    by_name = {p.path.rsplit("/", 1)[1]: p for p in predict(run, [tmp_path])}
    assert all(p.ok for p in by_name.values())  # still predicted
    assert by_name["film.png"].warning is None
    assert "8 x 8 px: a thumbnail" in by_name["thumb.png"].warning
    assert "almost uniform" in by_name["black.png"].warning
    assert "600 x 100 px: not a chest film's shape" in by_name["strip.png"].warning
    assert "nearly all black (median gray level 12 of 255)" in by_name["dark.png"].warning
    assert "only 5 distinct gray levels" in by_name["flat16.png"].warning
    out = write_predictions(list(by_name.values()), tmp_path / "out" / "predictions.csv")
    rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(out.open())}
    assert "thumbnail" in rows["thumb.png"]["warning"] and rows["film.png"]["warning"] == ""
    result = runner.invoke(app, ["predict", str(run), str(tmp_path / "thumb.png")])
    assert result.exit_code == 0 and "warning:" in flat(result.output)
    assert "label is unreliable" in flat(result.output)


def test_a_file_name_a_spreadsheet_would_run_is_written_as_text(run, films, tmp_path,
                                                                monkeypatch):
    """`cxr predict RUN --out p.csv -- *` writes bare names: `=...` must not be a formula."""
    names = ["=2+5+cmd.png", "@SUM(1+1).png", "+1.png", "-1.png", "plain.png"]
    for name in names:
        shutil.copy(films / "a" / "normal_0.png", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(run), "--out", str(out), "--", *names])
    assert result.exit_code == 0, result.output
    paths = [row["path"] for row in csv.DictReader(out.open())]
    assert paths == ["'=2+5+cmd.png", "'@SUM(1+1).png", "'+1.png", "'-1.png", "plain.png"]
    json_out = tmp_path / "p.json"
    runner.invoke(app, ["predict", str(run), "--out", str(json_out), "--", *names])
    assert [p["path"] for p in json.loads(json_out.read_text())] == names  # JSON: as they are


def test_films_in_memory_are_predicted_like_their_files(run, films):
    """A notebook's PIL image or array goes through the same rules as the file it came from."""
    path = films / "a" / "pneumonia_1.png"
    [from_file] = predict(run, path, device="cpu")
    image = Image.open(path)
    as_image, as_array, as_rgb = predict(run, [image, np.asarray(image.convert("L")),
                                               np.asarray(image.convert("RGB"))], device="cpu")
    for p in (as_image, as_array, as_rgb):
        assert p.label == from_file.label
        np.testing.assert_allclose(list(p.probabilities.values()),
                                   list(from_file.probabilities.values()), atol=1e-5)
    assert [as_image.path, as_array.path] == ["<image 0>", "<image 1>"]
    [one] = predict(run, np.asarray(image.convert("L")), device="cpu")  # one array: one film
    assert one.path == "<image 0>" and one.ok
    [bad] = predict(run, [np.zeros((2, 3, 4, 5))], device="cpu")
    assert not bad.ok and "is not a film" in bad.error and bad.threshold is None
    holed = np.asarray(image.convert("L"), np.float32)
    holed[10, 10] = np.nan  # a failed computation upstream: not a black film
    [nan] = predict(run, holed, device="cpu")
    assert not nan.ok and "NaN or infinite" in nan.error
    # empty images beside a good film: each an entry with its reason, the film predicted
    *empty, good = predict(run, [np.zeros((0, 5), np.float32), np.zeros((0, 0), np.uint8),
                                 Image.new("L", (0, 0)), image], device="cpu")
    assert [e.error for e in empty] == ["an empty image (a side of 0 pixels) is not a film"] * 3
    assert good.ok and good.label == from_file.label
    with pytest.raises(ValueError, match="overlays are written for files"):
        predict(run, [image], cam_dir=films / "cams")
    predictor = Predictor.load(run, device="cpu")  # the Predictor's own methods say it too
    in_memory = predictor.predict([image])  # (they opened "<image 0>" as a file: not found)
    with pytest.raises(ValueError, match=r"overlays are drawn over files, and <image 0> is "
                                         r"none \(an image given in memory"):
        predictor.write_cams(in_memory, films / "cams")


def test_what_is_not_a_film_is_refused_before_anything_is_read(run, films, tmp_path):
    """A torch tensor was read as a path named by its printout; an empty folder gave []."""
    import torch

    with pytest.raises(TypeError, match=r"tensor\.numpy\(\)"):
        predict(run, torch.rand(3, 8, 8), device="cpu")
    with pytest.raises(TypeError, match="from a int"):
        predict(run, [str(films / "a" / "pneumonia_1.png"), 3], device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found in .*empty"):
        predict(run, tmp_path / "empty", device="cpu")


def test_one_file_named_two_ways_is_predicted_once(films, monkeypatch):
    monkeypatch.chdir(films)
    assert collect_images(["a/normal_0.png", "./a/normal_0.png", str(films / "a"),
                           "a//normal_0.png"]) == ["a/normal_0.png", str(films / "a" /
                                                                       "pneumonia_1.png")]


def test_a_loaded_model_is_pointed_to_its_folder_and_the_raw_way(run, films):
    """predict(load_model(run), films) was a TypeError about os.PathLike, from deep inside."""
    model = load_model(run)
    with pytest.raises(TypeError, match="give the run folder or export folder, not a "
                                        "Classifier.*predict_logits\\(model, films\\)"):
        predict(model, films, device="cpu")
    logits, _ = predict_logits(model, [str(films / "a" / "normal_0.png")], device="cpu")
    # a Path is taken too, and a failure names it as a str (json.dumps refused a PosixPath)
    _, [failure] = predict_logits(model, [films / "gone.png"], device="cpu")
    assert json.loads(json.dumps(failure.path)) == str(films / "gone.png")
    expected = predict(run, films / "a" / "normal_0.png", device="cpu")[0]
    shown = repr(Predictor.load(run, device="cpu"))  # a notebook shows what it holds
    assert shown.startswith(f"Predictor({run}, torch on cpu, labels ") and ">= " in shown
    calibrated = read_calibration(run).probabilities(logits)[0]  # as the message says
    assert calibrated == pytest.approx([expected.probabilities[k] for k in expected.probabilities],
                                       abs=1e-5)


def test_a_device_this_machine_lacks_is_refused_with_the_choices(run, films):
    with pytest.raises(ValueError, match="device 'tpu': use cpu, cuda, cuda:N or mps"):
        predict(run, films, device="tpu")
    missing = "mps" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"device '{missing}': this machine has none; use cpu"):
        Predictor.load(run, device=missing)


def test_a_half_written_or_damaged_run_is_named_with_the_fix(trained_run, tmp_path):
    def broken(name: str, change) -> Path:
        run = shutil.copytree(trained_run, tmp_path / name)
        change(run)
        return run

    def interrupted(run: Path) -> None:  # what `cxr train` writes before the model
        (run / "config.yaml").write_text("model: {name: simple_cnn}\n")
        (run / "model.safetensors").unlink()

    unfinished = broken("unfinished", interrupted)
    with pytest.raises(FileNotFoundError, match=r"unfinished is a training run that has not "
                                                r"finished \(interrupted\?\).*--resume"):
        Predictor.load(unfinished, device="cpu")
    truncated = broken("truncated", lambda run: (run / "model.safetensors").write_bytes(
        (trained_run / "model.safetensors").read_bytes()[:100]))
    with pytest.raises(ValueError, match=r"truncated/model.safetensors is damaged"):
        Predictor.load(truncated, device="cpu")
    spec = json.loads((trained_run / "model.json").read_text())
    no_mean = broken("no_mean", lambda run: (run / "model.json").write_text(
        json.dumps({k: v for k, v in spec.items() if k != "mean"})))
    with pytest.raises(ValueError, match=r"no_mean/model.json is damaged \(KeyError"):
        Predictor.load(no_mean, device="cpu")
    huge = broken("huge", lambda run: (run / "model.json").write_text(  # someone else's run
        json.dumps(spec | {"input_size": 10**6})))  # would allocate terabytes per batch
    with pytest.raises(ValueError, match=r"huge/model.json is damaged \(ValueError: model spec "
                                         r"'simple_cnn': input_size 1000000 is not 1..4096\)"):
        Predictor.load(huge, device="cpu")
    export = tmp_path / "huge_export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")
    (export / "model.json").write_text(json.dumps(spec | {"input_size": 10**6, "threshold": 0.5,
                                                          "temperature": 1.0}))
    with pytest.raises(ValueError, match=r"huge_export/model.json is damaged .*input_size "
                                         r"1000000 .*export the run again"):
        Predictor.load(export)
    # an export's threshold, temperature and bias are checked as a run's are (a temperature
    # of 0 made every probability NaN, and every film was called NORMAL)
    for bad in ({"temperature": 0}, {"threshold": "0.3"}, {"temperature": float("nan")},
                {"bias": [1.0]}, {"threshold": None}):  # (null: more than two classes only)
        (export / "model.json").write_text(json.dumps(spec | {"threshold": 0.5,
                                                              "temperature": 1.0} | bad))
        with pytest.raises(ValueError, match=r"huge_export/model.json is damaged .*export the "
                                             r"run again"):
            Predictor.load(export)
    for name, text in (("not_json", "{threshold: "), ("text_threshold", json.dumps(
            {"threshold": "abc", "temperature": 1.0})), ("threshold_5", json.dumps(
            {"threshold": 5, "temperature": 1.0})), ("temperature_0", json.dumps(
            {"threshold": 0.5, "temperature": 0})), ("temperature_nan", json.dumps(
            {"threshold": 0.5, "temperature": float("nan")}))):
        run = broken(name, lambda run, text=text: (run / "calibration.json").write_text(text))
        with pytest.raises(ValueError, match=rf"{name}/calibration.json is damaged .* run "
                                             r"`cxr evaluate`"):
            Predictor.load(run, device="cpu")
    result = CliRunner().invoke(app, ["predict", str(unfinished), str(tmp_path)])
    assert result.exit_code == 2 and "has not finished" in result.output
    synthetic_film("NORMAL", 0).save(tmp_path / "film.png")
    with pytest.raises(ValueError, match="threshold 1.5 is not a probability"):  # the API's too
        predict(trained_run, tmp_path / "film.png", threshold=1.5)


def test_a_model_scoring_nan_is_named_not_taken_for_unreadable_films(trained_run, tmp_path):
    """Rows of NaN logits mean films that could not be read; a diverged model's NaN scores
    must not pass for that (evaluation and prediction crashed on the missing reasons)."""
    from safetensors.torch import load_file, save_file

    run = shutil.copytree(trained_run, tmp_path / "diverged")
    weights = load_file(str(run / "model.safetensors"))
    name = next(k for k, w in weights.items() if k.endswith("bias") and w.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(run / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model.safetensors holds NaN or infinite weights "
                                         rf"\({re.escape(name)}\): the training diverged"):
        Predictor.load(run, device="cpu")
    film = tmp_path / "film.png"
    synthetic_film("NORMAL", 1).save(film)
    model = load_model(trained_run)
    model.head[-1].bias.data.fill_(float("inf"))  # a model made in memory: caught scoring
    with pytest.raises(ValueError, match=rf"NaN or infinite scores for {film}: its weights"):
        predict_logits(model, [str(tmp_path / "gone.png"), str(film)], device="cpu")


def test_a_cam_folder_that_is_a_file_is_refused_before_predicting(trained_run, tmp_path):
    film = tmp_path / "film.png"
    synthetic_film("NORMAL", 1).save(film)
    (tmp_path / "cams").write_text("a file")
    with pytest.raises(ValueError, match=r"--cam .*cams is a file: Grad-CAM overlays go into a "
                                         r"folder"):
        predict(trained_run, [film], cam_dir=tmp_path / "cams", device="cpu")


def test_the_finding_is_recorded_with_the_model_and_old_runs_keep_their_rule(tmp_path):
    """A run's threshold is about the class its model recorded; one saved before the record
    (model.json without positive_label) keeps the rule it was made under (the last label)."""
    film = tmp_path / "film.png"
    synthetic_film("NORMAL", 2).save(film)
    new = save_model(create_model("simple_cnn", labels=["ABNORMAL", "NORMAL"]), tmp_path / "new")
    new = new.parent
    assert load_spec(new).positive_label == "ABNORMAL"
    old = shutil.copytree(new, tmp_path / "old")
    spec = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({k: v for k, v in spec.items()
                                                if k != "positive_label"}))
    weights = old / "model.safetensors"  # which carried no model.json then either
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)
    for run, finding in ((new, "ABNORMAL"), (old, "NORMAL")):
        [called] = predict(run, [film], threshold=0.0, device="cpu")  # all called the finding
        assert (called.label, called.positive_label) == (finding, finding)
    export_model(new)  # the export alone says it too
    assert Predictor.load(new / "export").positive_label == "ABNORMAL"


def test_files_a_folder_search_passes_over_are_said(trained_run, tmp_path, caplog):
    """A PACS file without suffix or DICOM preamble would vanish from the count silently."""
    synthetic_film("NORMAL", 3).save(tmp_path / "film.png")
    (tmp_path / "IM0007").write_bytes(b"\0" * 64 + b"no preamble, no header")
    (tmp_path / "notes.txt").write_text("a text file is no film, and says nothing")
    for quiet in (".DS_Store", "README", "LICENSE"):  # no PACS names: not worth a word
        (tmp_path / quiet).write_text("not a film")
    [prediction] = predict(trained_run, [tmp_path], device="cpu")
    assert prediction.path.endswith("film.png")
    assert (f"1 file(s) under {tmp_path} have no image suffix and no DICOM, JPEG or PNG header, "
            f"and were skipped (e.g. {tmp_path / 'IM0007'})") in caplog.text


def test_files_the_os_or_a_cd_writes_are_no_films_even_when_named(films, tmp_path, monkeypatch):
    """`cxr predict RUN folder/*` passed Thumbs.db and desktop.ini in by name: 'unreadable',
    exit 1. A PACS CD's DICOMDIR (DICOM, no pixels) was counted as an unreadable film."""
    folder = tmp_path / "copied"
    shutil.copytree(films / "a", folder)
    for junk in ("Thumbs.db", "desktop.ini", "._normal_0.png"):
        (folder / junk).write_bytes(b"\x00junk")
    write_dicom(folder / "DICOMDIR", np.zeros((4, 4), np.uint16))
    named = sorted(str(p) for p in folder.iterdir())
    assert collect_images(named) == collect_images([folder]) == [
        str(folder / "normal_0.png"), str(folder / "pneumonia_1.png")]
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/..." quoted: the shell left it
    assert collect_images(["~/copied/normal_0.png"]) == [str(folder / "normal_0.png")]


def test_long_scoring_says_its_progress(run, films, monkeypatch, caplog):
    """`cxr predict` on 624 films was silent for a minute (and the evaluation inside
    `cxr run` too): CI kills a job that prints nothing for ten."""
    import cxrkit.progress

    monkeypatch.setattr(cxrkit.progress, "EVERY_SECONDS", 0.0)  # a line after each batch
    with caplog.at_level("INFO", logger="cxrkit.progress"):
        predictions = predict(run, films, batch_size=1, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "cxrkit.progress"]
    n = len(predictions)
    assert lines and lines[0].startswith(f"scored 1/{n} films, ~") and lines[0].endswith(" s left")
    assert len(lines) == n - 1  # none once all are scored


def test_a_name_that_is_not_utf8_is_written_escaped_not_a_crash(run, films, tmp_path):
    """Given by hand, a cp1252 name was scored, then the CSV writer raised on it: a traceback,
    and a file of its header alone."""
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    shutil.copyfile(films / "a" / "normal_0.png", odd)
    predictions = predict(run, [odd, films / "a" / "normal_0.png"], device="cpu")
    rows = list(csv.DictReader(write_predictions(predictions, tmp_path / "p.csv").open()))
    assert [r["path"] for r in rows][0].endswith("caf\\udce9.png") and len(rows) == 2
    assert rows[0]["label"] == rows[1]["label"] and rows[0]["label"]
    # a folder of such names is predicted too, its lines on a strict stdout (en_US.UTF-8)
    shown = subprocess.run([str(Path(sys.executable).with_name("cxr")), "predict", str(run),
                            str(tmp_path)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{tmp_path}/caf\\udce9.png\t{rows[0]['label']}\t" in shown.stdout


def test_an_empty_folder_beside_films_is_said(films, tmp_path, caplog):
    """`cxr predict RUN site_a/ site_b/` whose site_b copy failed exited 0 without a word."""
    (tmp_path / "site_b").mkdir()
    with caplog.at_level("WARNING", logger="cxrkit.predict"):
        found = collect_images([films / "a", tmp_path / "site_b"])
    assert len(found) == 2
    assert f"no images found in {tmp_path / 'site_b'}: nothing of it was predicted" in caplog.text


def test_a_run_path_from_the_wrong_folder_or_a_runs_folder_is_named_so(trained_run, tmp_path,
                                                                      monkeypatch):
    """Both were "not a cxrkit run: expected model.safetensors and model.json": a student in
    another folder, or one giving runs/, could not tell what was wrong."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "runs/quick"])
    assert result.exit_code == 2
    assert f"runs/quick does not exist (relative to {tmp_path})" in flat(result.stderr)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert f"{tmp_path / 'nope'} does not exist: give the run folder" in flat(result.stderr)
    runs = trained_run.parent
    result = CliRunner().invoke(app, ["report", str(runs)])
    assert result.exit_code == 2
    assert f"{runs} holds runs rather than being one: give one of them, e.g. {trained_run}" \
        in flat(result.stderr)
