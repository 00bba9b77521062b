"""The HTML report (self-contained, every section) and the comparison of runs."""

import base64
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.compare import compare_runs, write_compare_csv
from cxrkit.data.split import read_manifest, write_manifest
from cxrkit.evaluation import evaluate_run, summary
from cxrkit.evaluation.published import at_published_point
from cxrkit.report import (
    FILM_GRIDS,
    NOT_EXTERNAL,
    alt_text,
    build_report,
    caveats,
    embedded_figure,
    limitations,
    metric_rows,
    predictive_values,
    selection_shift,
    stale_note,
    val_rows,
)
from cxrkit.runs import read_calibration
from cxrkit.training import curves
from tests.test_evaluate import make_class_folders, make_three_class_run

SECTIONS = {"data", "training", "metrics", "published", "figures", "model-card"}


class Page(HTMLParser):
    """Section ids, images, every external reference of a page, and its tables that say
    neither in a caption nor by a heading (aria-labelledby) what they hold."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.external, self.open_tags = set(), [], [], []
        self.ids, self.labelled_by, self.unnamed_tables, self.last_tag = set(), [], 0, ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        if self.last_tag == "table" and tag != "caption":
            self.unnamed_tables += 1
        self.last_tag = "" if attrs.get("aria-labelledby") else tag
        self.labelled_by += [attrs["aria-labelledby"]] if "aria-labelledby" in attrs else []
        if tag == "section":
            self.sections.add(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag in ("section", "table", "figure"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if tag in ("section", "table", "figure"):
            assert self.open_tags.pop() == tag


@pytest.fixture(scope="module")
def reported(trained_run, tmp_path_factory):
    """A run with an internal test and an external evaluation, an audit.json beside it
    and training curves; then its report."""
    root = tmp_path_factory.mktemp("report")
    run = shutil.copytree(trained_run, root / "runs" / "tiny")
    hospital = make_class_folders(root / "hospital_b", ["NORMAL", "PNEUMONIA"])
    evaluate_run(run, data=hospital, bootstrap=50, figures=False, device="cpu")
    audit = {"root": "/data/chest_xray", "layout": "kaggle", "n_images": 5856,
             "classes": ["NORMAL", "PNEUMONIA"],
             "counts": {"train": {"NORMAL": 1341, "PNEUMONIA": 3875},
                        "test": {"NORMAL": 234, "PNEUMONIA": 390}},
             "patients": {"train": 2000, "test": 400},
             "notes": ["AUDIT-NOTE-MARKER", "no val split: `cxr data split` carves one"]}
    (run.parent / "audit.json").write_text(json.dumps(audit))
    Image.new("RGB", (300, 120), "white").save(run / "training_curves.png")
    (run / "val_metrics.json").write_text(json.dumps({"val_roc_auc": 0.987654}))
    (run / "config.yaml").write_text("model:\n  name: simple_cnn\n"
                                     "data:\n  path: /data/chest_xray\n")
    return run, build_report(run)  # evaluates the internal test split first


def test_report_is_self_contained_with_every_section(reported, tmp_path):
    run, path = reported
    assert path == run / "report.html"
    text = path.read_text()
    page = Page(text)
    assert page.sections == SECTIONS
    assert page.unnamed_tables == 0 and set(page.labelled_by) <= page.ids
    assert page.external == []  # opens offline
    assert "<link" not in text and "<script" not in text
    assert len(page.images) >= 8
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
               for s in page.images)
    assert (run / "eval" / "test" / "metrics.json").is_file()  # evaluated on the way
    # film grids go in as JPEG where that is smaller than their PNG files (real films; these
    # drawn ones compress better as PNG); the charts stay PNG
    folder = run / "eval" / "test"
    for name in FILM_GRIDS:
        png = (folder / name).read_bytes()
        embedded = embedded_figure(folder / name)
        data = base64.b64decode(embedded["data"])
        assert Image.open(io.BytesIO(data)).size == Image.open(folder / name).size
        assert len(data) <= len(png)
        assert (embedded["mime"] == "image/jpeg") == (data != png)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400), np.uint8))
    noisy.save(tmp_path / "worst_errors.png")  # a film's grain: JPEG wins
    assert embedded_figure(tmp_path / "worst_errors.png")["mime"] == "image/jpeg"


def test_the_report_of_an_evaluated_run_needs_no_pytorch(reported):
    """Writing the page reads files: importing PyTorch, timm and Lightning would be most of
    `cxr report`'s time (5.9 s against 1.4 s, BENCHMARKS.md)."""
    run, _ = reported
    code = ("import sys; from cxrkit.report import build_report; "
            "from cxrkit.compare import compare_runs; "
            f"build_report({str(run)!r}); compare_runs([{str(run)!r}]); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_report_shows_internal_and_external_side_by_side(reported):
    _, path = reported
    text = path.read_text()
    table = text[text.index('<section id="metrics">'):]
    assert "test (n=16)" in table and "external: hospital_b (all, n=6)" in table
    assert table.index("test (n=16)") < table.index("external: hospital_b")
    # Figures: the internal test's open, other evaluations' folded; alt text names which
    figures = text[text.index('<section id="figures">'):]
    folded = figures[figures.index("<details>"):figures.index("</details>")]
    assert "external: hospital_b" in folded and "test (n=16)" not in folded
    assert 'alt="test (n=16): Confusion matrix' in figures
    # its counts in words, for a reader who cannot see the figure
    matrix = json.loads((path.parent / "eval" / "test" / "metrics.json").read_text())[
        "confusion_matrix"]
    (tn, fp), (fn, tp) = matrix["counts"]
    assert (f"true NORMAL: {tn} called NORMAL, {fp} called PNEUMONIA; true PNEUMONIA: {fn} "
            f"called NORMAL, {tp} called PNEUMONIA") in figures
    assert "shown on request" in folded  # (evaluated without figures)
    # When and by which cxrkit each evaluation was made
    evaluated = " ".join(text[text.index("Evaluated: "):].split("</p>")[0].split())
    assert re.fullmatch(r"Evaluated: test \(n=16\) \d{4}-\d\d-\d\dT[\d:]+\+00:00 by cxrkit "
                        r"\S+; external: hospital_b \(all, n=6\) \S+ by cxrkit \S+\.", evaluated)


def test_report_contents(reported):
    _, path = reported
    text = path.read_text()
    assert "AUDIT-NOTE-MARKER" in text and "5856" in text  # the audit beside the run
    assert "`" not in text and "<code>cxr evaluate RUN" in text  # commands set as code
    assert "no val split" not in text  # the audit's advice: the run carved its own
    # 16 test films are not Kermany's 624: no published comparison, no Guangzhou claim
    assert "no evaluation of it to compare" in text and "92.8%" not in text
    assert "Guangzhou" not in text and "training films only" in text
    assert "not for diagnosis" in text and "Shortcut learning" in text
    assert "validation loss and metrics per epoch" in text
    assert "0.9877" in text and "0.987654" not in text  # val_metrics.json, to 4 places
    assert "Trained on /data/chest_xray" in text  # the data path from config.yaml
    assert "Patients shared between splits" in text
    assert "Youden&#39;s J threshold (deployed)" in text  # the rule predict applies, marked
    card = " ".join(text[text.index('id="model-card"'):].split())
    assert "Trained with" not in card  # trained by hand: no provenance.json to tell
    assert "carved from the training images" not in card  # this config.yaml does not say
    before_after = re.search(r"test \(n=16\): ECE\s+(\d\.\d{3}) before scaling,\s+(\d\.\d{3})"
                             r" after", text)  # did the temperature help on these films?
    assert before_after, "the ECE before and after scaling"
    worse = float(before_after[2]) > float(before_after[1])
    assert ("<b>worse</b>" in text[before_after.end():before_after.end() + 40]) == worse


def test_the_model_card_says_how_validation_was_made(reported, tmp_path):
    """It said "carved from the training images by patient" of every run, also of one that
    kept the data's own val split (data.val_fraction 0)."""
    run = shutil.copytree(reported[0], tmp_path / "run")
    for fraction, said in ((0.15, "carved from the training images by patient"),
                           (0.0, "are the data's own val split, as it is")):
        (run / "config.yaml").write_text(f"data:\n  path: /data\n  val_fraction: {fraction}\n")
        card = " ".join(build_report(run).read_text().split())
        assert said in card[card.index('id="model-card"'):], fraction
    # films without patient ids were carved by film: "by patient" was said of them too
    samples = read_manifest(run / "split.csv")
    write_manifest([replace(s, patient_id=Path(s.path).stem) for s in samples],
                   run / "split.csv")
    (run / "config.yaml").write_text("data:\n  path: /data\n  val_fraction: 0.15\n")
    card = " ".join(build_report(run).read_text().split())
    card = card[card.index('id="model-card"'):]
    assert "carved from the training images by film: no film has a patient id" in card
    assert "by patient" not in card
    # patient ids on the test films alone do not make the carving of validation by patient
    write_manifest([replace(s, patient_id=Path(s.path).stem if s.split != "test" else "P1")
                    for s in samples], run / "split.csv")
    card = " ".join(build_report(run).read_text().split())
    assert "carved from the training images by film" in card[card.index('id="model-card"'):]


def test_the_kermany_test_split_is_compared_with_the_published_results(reported):
    """An evaluation of 624 Kermany-named films (the tiny run's rows, repeated and renamed)."""
    run, _ = reported
    kermany = shutil.copytree(run, run.parent / "kermany")
    folder = kermany / "eval" / "test"
    with open(folder / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(folder / "predictions.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for i in range(624):
            kind = "virus" if i % 3 == 0 else "bacteria"
            writer.writerow(rows[i % len(rows)] | {"path": f"/t/person{i}_{kind}_{i}.jpeg"})
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps(metrics | {"n": 624}))
    text = " ".join(build_report(kermany).read_text().split())
    assert "Kermany et al. 2018" in text and "92.8%" in text and "0.968" in text
    assert "(624 films)" in text and "Guangzhou" in text
    assert "Data: Kermany, Goldbaum et al., Cell 172(5), 2018" in text  # the model card cites it
    # the deployed rule's sensitivity for each subtype the file names tell, counted here
    with open(folder / "predictions.csv", encoding="utf-8", newline="") as f:
        written = [r for r in csv.DictReader(f) if r["label"] == "PNEUMONIA"]
    counts = {kind: [r["correct"] == "1" for r in written if f"_{kind}_" in r["path"]]
              for kind in ("bacteria", "virus")}
    said = ", ".join(f"{name} {sum(c)} of {len(c)} ({sum(c) / len(c):.1%})"
                     for name, c in (("bacterial", counts["bacteria"]),
                                     ("viral", counts["virus"])))
    assert f"Sensitivity by pneumonia subtype on the internal test (from Kermany's file " \
           f"names): {said}." in text
    # The model's ROC curve read where the paper operated, checked threshold by threshold
    ours = at_published_point(folder, resamples=0)
    positive = metrics["positive_class"]
    truth = [r["label"] == positive for r in rows]
    p = [float(r[f"p_{positive}"]) for r in rows]
    pairs = []  # (sensitivity, specificity) of every threshold
    for t in {*p, 1.1}:
        called = [q >= t for q in p]
        hits = sum(c and y for c, y in zip(called, truth, strict=True))
        passes = sum(not (c or y) for c, y in zip(called, truth, strict=True))
        pairs.append((hits / truth.count(True), passes / truth.count(False)))
    assert ours["sensitivity"]["value"] == pytest.approx(max(a for a, b in pairs if b >= 0.901))
    assert ours["specificity"]["value"] == pytest.approx(max(b for a, b in pairs if a >= 0.932))
    row = re.search(r"Sensitivity at specificity ≥ 90.1% \(the paper&#39;s\)</th><td>93.2%</td> ?"
                    r"<td>([\d.]+)%", text)
    assert row and float(row[1]) == pytest.approx(100 * ours["sensitivity"]["value"], abs=0.06)
    assert "Specificity at sensitivity ≥ 93.2% (the paper&#39;s)</th><td>90.1%</td>" in text


def test_an_audit_of_other_data_beside_the_run_is_not_shown(reported):
    run, _ = reported
    other = shutil.copytree(run, run.parent / "other")
    (other / "config.yaml").write_text("model:\n  name: simple_cnn\ndata:\n  path: /data/y\n")
    text = build_report(other).read_text()
    assert "AUDIT-NOTE-MARKER" not in text and "No audit.json found" in text


def test_the_audit_where_the_readme_puts_it_or_named_is_shown(reported, tmp_path, caplog):
    run, _ = reported
    runs = tmp_path / "runs"
    mine = shutil.copytree(run, runs / "mine")
    (runs / "audit").mkdir()  # `cxr data audit DATA --out runs/audit/`
    audit = {"root": "/data/chest_xray", "layout": "kaggle", "notes": ["README-AUDIT"]}
    (runs / "audit" / "audit.json").write_text(json.dumps(audit))
    assert "README-AUDIT" in build_report(mine).read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "audit.json").write_text(json.dumps(audit | {"root": "/data/another_site"}))
    build_report(mine, audit=elsewhere)  # an audit of other data: shown as asked, but said
    assert "audited /data/another_site, not /data/chest_xray, which mine trained on" in (
        caplog.text)
    (elsewhere / "audit.json").write_text(json.dumps(audit | {"notes": ["NAMED-AUDIT"]}))
    result = CliRunner().invoke(app, ["report", str(mine), "--audit", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert "NAMED-AUDIT" in (mine / "report.html").read_text()
    assert "audited" not in result.output  # the run's own data (config.yaml: /data/chest_xray)
    result = CliRunner().invoke(app, ["report", str(mine), "--audit", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no audit.json to read" in result.output
    fresh = shutil.copytree(mine, runs / "fresh")
    shutil.rmtree(fresh / "eval")
    result = CliRunner().invoke(app, ["report", str(fresh), "--audit", str(tmp_path / "none")])
    assert result.exit_code == 2 and not (fresh / "eval").exists()  # said before evaluating


def test_report_shows_tta_and_the_framing_check_beside_the_plain_result(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    evaluate_run(run, tta=True, framing=True, bootstrap=20, figures=False, device="cpu")
    evaluate_run(run, split="val", framing=True, bootstrap=0, figures=False, device="cpu")
    text = build_report(run, evaluate_missing=False).read_text()
    page = Page(text)  # still well formed, each table named
    assert page.unnamed_tables == 0 and set(page.labelled_by) <= page.ids
    # each evaluation's own check, named: the validation one showed a shortcut unseen
    text = re.sub(r'<h3 id="variant-\d+">', "<h3>", text)
    assert "<h3>Framing check: val (selection split) (n=" in text
    framing = text[text.index("<h3>Framing check: test (n=16)</h3>"):]
    table = framing[:framing.index("</table>")]
    for column in ("as filmed", "85%", "70%"):
        assert f"<th scope=\"col\">{column}</th>" in table
    assert table.count("<tr>") == 1 + 5  # header, then accuracy, ROC-AUC, sens., spec., F1
    assert "<h3>Test-time augmentation: test (n=16)</h3>" in text
    assert '<th scope="col">with TTA</th>' in text


def test_compare_runs_table_and_csv(reported, tmp_path, caplog):
    run, _ = reported
    other = shutil.copytree(run, tmp_path / "other")
    rows = compare_runs([run, other])
    assert "different films" not in caplog.text  # the same test films
    fewer = shutil.copytree(run, tmp_path / "fewer")
    predictions = fewer / "eval" / "test" / "predictions.csv"
    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:-3]))
    compare_runs([run, fewer])
    assert "evaluated on different films (16, 13)" in caplog.text
    assert [r["run"] for r in rows] == [str(run), str(other)]
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    at_val = metrics["operating_points"]["validation"]
    assert rows[0]["sensitivity"] == at_val["sensitivity"]
    assert rows[0]["roc_auc"] == metrics["roc_auc"]
    assert rows[0]["threshold"] == at_val["threshold"]
    out = write_compare_csv(rows, tmp_path / "new" / "table.csv")  # its folder made
    assert write_compare_csv(rows, tmp_path) == tmp_path / "compare.csv"  # a folder given
    with open(out, encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and table[0]["read_as"] == ""  # a two-class run, as it is
    assert float(table[0]["accuracy"]) == pytest.approx(at_val["accuracy"]["value"])
    assert float(table[0]["accuracy_ci_low"]) == pytest.approx(at_val["accuracy"]["ci95"][0])

    deep = shutil.copytree(run, tmp_path / ("a-run-name-that-goes-on-" * 6 + "end"))
    (deep / "config.yaml").write_text("recipe: quick\nstages:\n- {epochs: 1}\n- {epochs: 4}\n")
    result = CliRunner().invoke(app, ["compare", str(run), str(deep), "--out",
                                      str(tmp_path / "cli.csv")])
    assert result.exit_code == 0, result.output
    assert "Sens" in result.output and (tmp_path / "cli.csv").is_file()
    # what differs between the runs, under each one's name
    trained = sum(s.split == "train" for s in read_manifest(deep / "split.csv"))
    assert f"quick, 1+4 epoch(s), {trained} training films" in result.output
    assert result.output.count(f"{trained} training films") == 2  # the other's alone
    # Not a terminal: the table is as wide as its cells, each run's whole name on one line
    assert any(deep.name in line for line in result.output.splitlines())
    result = CliRunner().invoke(app, ["compare", str(run), "--out", f"{tmp_path / 'tables'}/"])
    assert result.exit_code == 0 and (tmp_path / "tables" / "compare.csv").is_file()


def test_cli_report(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{(run / 'report.html').absolute()}\n"  # for a script
    text = (run / "report.html").read_text()
    # a bare run folder: what is missing is said to be missing
    assert "No training_curves.png" in text and "No audit.json found" in text
    assert "No config.yaml" in text


def test_three_class_report(tiny_kaggle, tmp_path, monkeypatch):
    run = make_three_class_run(tiny_kaggle, tmp_path / "three")
    drawn = []  # its training curves: accuracy of the most probable class, no P=0.5
    monkeypatch.setattr(curves, "save_figure", lambda fig, path, dpi: drawn.append(fig) or path)
    (run / "metrics.csv").write_text("stage,epoch,step,train_loss_epoch,val_loss,val_roc_auc,"
                                     "val_accuracy\ntrain,0,3,0.9,0.8,0.7,0.6\n")
    curves.plot_curves(run)
    named = [line.get_label() for ax in drawn[0].axes for line in ax.lines]
    assert "val accuracy (most probable)" in named and not any("P=0.5" in n for n in named)
    out = evaluate_run(run, bootstrap=20, figures=False, device="cpu", tta=True)
    # summary(): NORMAL against the rest where a two-class run has its rates; TTA on request
    metrics = json.loads((out / "metrics.json").read_text())
    plain, augmented = summary(out), summary(out, tta=True)
    for key in ("sensitivity", "specificity", "f1"):
        assert plain[key] == metrics["not_normal"][key]["value"]
        assert augmented[key] == metrics["tta"]["not_normal"][key]["value"]
    assert plain["balanced_accuracy"] == metrics["balanced_accuracy"]["value"]
    assert augmented["roc_auc"] == metrics["tta"]["roc_auc"]["value"]
    with pytest.raises(ValueError, match="paired differences need two-class runs"):
        compare_runs([run, run], paired=True)
    # `cxr compare` puts it in the columns' one meaning, NORMAL against pneumonia: its macro
    # ROC-AUC of three classes sat beside two-class AUCs, its rates blank
    [row] = compare_runs([run])
    assert row["read_as"] == "NORMAL vs the rest"
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1"):
        assert row[key] == metrics["not_normal"][key], key
    assert row["specificity_at_sensitivity/0.97"] == metrics["not_normal"][
        "specificity_at_sensitivity"]["0.97"]
    shown = " ".join(CliRunner().invoke(app, ["compare", str(run)]).output.split())
    assert "simple_cnn, read as NORMAL vs the rest" in shown
    text = build_report(run).read_text()
    assert Page(text).sections == SECTIONS
    assert "Macro ROC-AUC" in text and "class VIRUS" in text and "The most probable class" in text
    assert "PR-AUC" not in text and "no evaluation of it to compare" in text
    assert "NORMAL against the other classes (any finding)" in text
    assert "Top-label ECE" in text and "P(positive)" not in text  # no positive class
    assert "summed over the classes (0 to 2)" in text
    assert val_rows({"sensitivity": 0.5}, binary=False) == [
        ("Sensitivity, macro (the most probable class)", "50.0%")]
    # its confusion matrix in words has no threshold to give (the report crashed on it)
    matrix = {"labels": ["NORMAL", "BACTERIA", "VIRUS"], "threshold": None,
              "counts": [[3, 1, 0], [0, 2, 2], [1, 0, 3]]}
    assert alt_text("confusion_matrix.png", {"confusion_matrix": matrix}).startswith(
        "Confusion matrix at the most probable class: true NORMAL: 3 called NORMAL, 1 called "
        "BACTERIA, 0 called VIRUS; true BACTERIA:")


def test_report_and_compare_follow_the_deployed_calibration(trained_run, tmp_path):
    """An evaluation made before another operating point was deployed is not shown as the
    deployed model's: compare evaluates again, the report marks the old one."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    site = make_class_folders(tmp_path / "site", ["NORMAL", "PNEUMONIA"])
    evaluate_run(run, bootstrap=20, figures=False, device="cpu")  # Youden's J
    evaluate_run(run, data=site, bootstrap=20, figures=False, device="cpu")
    evaluate_run(run, split="val", framing_threshold=True, bootstrap=20, figures=False,
                 device="cpu")  # deploys another operating point
    [row] = compare_runs([run])
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert test["deployed_operating_point"] == "validation_framing"  # evaluated again
    assert row["threshold"] == read_calibration(run).threshold == test["deployed_threshold"]
    page = " ".join(build_report(run).read_text().split())
    assert page.count("evaluated with an earlier calibration") == 1  # the site's, not test


def test_the_deployed_point_is_the_current_evaluations_not_a_stale_ones():
    """`cxr evaluate`, then `cxr evaluate --split val --target-sensitivity 0.95` (deploys
    another point), then `cxr report --split val`: the stale test evaluation comes first, and
    its deployed point was headed "(deployed)"."""
    def point(threshold):
        return {"threshold": threshold, "specificity": {"value": 0.9, "ci95": [0.8, 0.95]}}

    stale_test = {"positive_class": "PNEUMONIA", "deployed_operating_point": "validation",
                  "operating_points": {"validation": point(0.4)}, "current": False}
    current_val = {"positive_class": "PNEUMONIA", "deployed_operating_point": "target_sensitivity",
                   "operating_points": {"validation": point(0.4),
                                        "target_sensitivity": point(0.2)}, "current": True}
    groups = list(dict.fromkeys(r["group"] for r in metric_rows([stale_test, current_val])
                                if "threshold (" in r["group"] or "deployed" in r["group"]))
    assert groups[0].endswith("(deployed)") and "sensitivity" in groups[0]
    assert not any(g.endswith("(deployed)") for g in groups[1:])
    # a stale evaluation of several classes had no threshold (it said 0.0000), nor a
    # temperature if older than the calibration record (it raised)
    assert stale_note({"deployed_threshold": None, "calibrated": {"temperature": 1.5}}
                      ).startswith("evaluated with an earlier calibration (argmax, "
                                   "temperature 1.500)")
    assert "(threshold 0.2500, temperature 1.000)" in stale_note({"deployed_threshold": 0.25})


def test_the_summary_names_a_framing_shortcut_worse_calibration_and_shared_ids():
    def point(specificity):
        return {"deployed_operating_point": "validation", "operating_points": {
            "validation": {"specificity": {"value": specificity}}}}

    val = {**point(0.95), "title": "val", "framing": {
        "crops": ["85%", "70%"], "85%": point(0.86), "70%": point(0.20)},
        "calibrated": {"ece_before": {"value": 0.12}, "ece_after": {"value": 0.13}}}
    found = caveats([val], None)
    assert found[0].startswith("on val, framed to 70% the specificity falls from 95% to 20%")
    assert "less calibrated (ECE 0.120 → 0.130)" in found[1]
    steady = {**point(0.95), "title": "test", "framing": {"crops": ["85%"], "85%": point(0.9)}}
    assert caveats([steady], None) == []


def test_the_summary_names_test_patients_seen_in_train_or_val(reported):
    run, _ = reported
    leaky = shutil.copytree(run, run.parent / "leaky")
    samples = read_manifest(leaky / "split.csv")
    val_patient = next(s.patient_id for s in samples if s.split == "val")
    first_test = next(i for i, s in enumerate(samples) if s.split == "test")
    samples[first_test] = replace(samples[first_test], patient_id=val_patient)
    write_manifest(samples, leaky / "split.csv")
    brief = " ".join(build_report(leaky).read_text().split())
    brief = brief[brief.index("In brief"):brief.index("</ul>")]
    assert (f"Caveat:</strong> 1 patient id(s) of the test split also occur in train or val "
            f"(e.g. {val_patient}): a leak if they name the same people") in brief


def test_the_report_opens_with_a_summary(reported):
    _, path = reported
    text = path.read_text()
    brief = text[text.index('<div class="card" id="summary">'):text.index("<nav>")]
    assert "Decision rule: PNEUMONIA where" in brief and "not for diagnosis" in brief
    # what the headline rests on: internal or external, films, patients, how common PNEUMONIA is
    test = json.loads((path.parent / "eval" / "test" / "metrics.json").read_text())
    positives = test["n_per_class"]["PNEUMONIA"]
    assert sum(test["n_per_class"].values()) == test["n"] == 16
    assert (f"test: internal, from the training data&#39;s own source (16 films of "
            f"{test['n_patients']} patients, {positives / 16:.1%} PNEUMONIA): Accuracy") in brief
    assert "external: hospital_b (all) (6 films of 6 patients, 50.0% PNEUMONIA)" in brief


def test_ppv_and_npv_are_shown_with_their_prevalence_and_at_others(reported):
    """PPV 88% at the test split's 62.5% pneumonia reads as 'right 9 times in 10'; at a
    clinic's 10% the same rule's PPV is about 34% (a clinical reviewer's numbers)."""
    ppv, npv = predictive_values(0.9795, 0.7863, 0.10)
    assert ppv == pytest.approx(0.337, abs=5e-4) and npv == pytest.approx(0.997, abs=5e-4)
    assert predictive_values(0.0, 1.0, 0.1) == (None, pytest.approx(0.9))  # calls nothing
    _, path = reported
    metrics = json.loads((path.parent / "eval" / "test" / "metrics.json").read_text())
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["counts"]
    assert metrics["n_per_class"] == {"NORMAL": tn + fp, "PNEUMONIA": fn + tp}
    rows = {row["name"]: row["cells"] for row in metric_rows([metrics])}
    assert rows["PNEUMONIA films (prevalence)"] == [f"{fn + tp} of 16 ({(fn + tp) / 16:.1%})"]
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    deployed = metrics["operating_points"][metrics["deployed_operating_point"]]
    (sens_low, sens_high), (spec_low, spec_high) = (deployed[k]["ci95"]
                                                    for k in ("sensitivity", "specificity"))
    for prevalence in (0.05, 0.5):  # each between its values at the intervals' two ends
        point = predictive_values(sensitivity, specificity, prevalence)
        low = predictive_values(sens_low, spec_low, prevalence)
        high = predictive_values(sens_high, spec_high, prevalence)
        expected = " / ".join(f"{v:.1%} ({100 * lo:.1f}–{100 * hi:.1f})"
                              for v, lo, hi in zip(point, low, high, strict=True))
        assert rows[f"at {prevalence:.0%} prevalence"] == [expected]
        assert all(lo <= v <= hi for v, lo, hi in zip(point, low, high, strict=True))
    assert "PPV / NPV of the deployed rule if PNEUMONIA were this common" in path.read_text()


def test_the_model_card_says_what_was_not_validated_and_how_the_rule_moved(reported):
    run, path = reported
    card = " ".join(path.read_text().split())
    card = card[card.index('id="model-card"'):]
    assert "No external validation" not in card  # hospital_b is one
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    chosen = test["selection_split"]
    assert chosen["n"] == sum(chosen["n_per_class"].values()) == len(
        [s for s in read_manifest(run / "split.csv") if s.split == "val"])
    on_val = chosen["operating_points"]["validation"]
    assert (f"chosen on validation ({chosen['n']} films): sensitivity "
            f"{on_val['sensitivity']['value']:.1%} there and "
            f"{test['operating_points']['validation']['sensitivity']['value']:.1%} on the "
            "internal test") in card
    internal_only = [m for m in [test] if not m.get("external")]
    found = limitations(internal_only, test, kermany=True, config={"recipe": "quick"})
    assert found[1] == NOT_EXTERNAL and "the `quick` preset" in found[3]
    for config in ({"recipe": "scratch"}, {"name": "quick"}):  # a run folder named quick too
        assert not any("preset" in item for item in limitations(
            internal_only, test, kermany=True, config=config))
    assert not any("preset" in item for item in limitations(  # not Kermany's test split
        internal_only, test, kermany=False, config={"recipe": "quick"}))
    # a rule chosen on another site's films (--calibrate-on) is not said to be validation's,
    # and an external evaluation at an earlier rule still was one
    site = test | {"selection_split": chosen | {"name": "site_b"}}
    said = selection_shift(site)
    assert "chosen on site_b" in said and "another site's labelled films" in said
    assert "Validation comes from" not in said
    stale_external = {**test, "external": True, "current": False}
    assert NOT_EXTERNAL not in limitations([test, stale_external], site, True, {})


def test_validation_metrics_are_named_and_rates_in_percent():
    rows = val_rows({"accuracy": 0.94148, "roc_auc": 0.985176, "loss": 0.27063, "images": 786,
                     "best_global_step": 139, "unreadable": 0, "monitor": "val_roc_auc",
                     "members": [{"name": "x"}], "val_extra": 0.123456})
    assert rows == [("Accuracy at P = 0.5", "94.1%"), ("ROC-AUC", "0.9852"),
                    ("Loss (all films at once)", "0.2706"), ("Validation films", "786"),
                    ("Kept by", "val_roc_auc"), ("val_extra", "0.1235")]


def test_a_mistakes_caption_names_the_films_folder():
    from cxrkit.data.layout import Sample
    from cxrkit.evaluation.evaluate import _caption

    caption = _caption(Sample("/site/PNEUMONIA/0.png", "PNEUMONIA"), "PNEUMONIA", "NORMAL",
                       "PNEUMONIA", 0.12)
    assert caption.splitlines() == ["PNEUMONIA/0.png", "true PNEUMONIA, called NORMAL",
                                    "P(PNEUMONIA)=0.12"]


def test_an_evaluation_killed_while_drawing_leaves_no_metrics_and_is_done_again(
        trained_run, tmp_path, monkeypatch):
    """metrics.json is written last: a kill among the figures leaves none, and the report
    evaluates again rather than show half a set of figures (or fail on a cut-off PNG)."""
    import cxrkit.evaluation.evaluate as evaluate_module

    run = shutil.copytree(trained_run, tmp_path / "run")
    evaluate_run(run, bootstrap=50, device="cpu")
    test = run / "eval" / "test"
    figures = sorted(p.name for p in test.glob("*.png"))
    real_write_figures = evaluate_module.write_figures

    def killed_while_drawing(out, *args):
        (out / "worst_errors.png").write_bytes(b"")  # the figure the kill cut off
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "write_figures", killed_while_drawing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, bootstrap=50, device="cpu")
    assert not (test / "metrics.json").exists()
    monkeypatch.setattr(evaluate_module, "write_figures", real_write_figures)
    build_report(run)  # evaluates again: every figure, whole
    assert (test / "metrics.json").is_file()
    assert sorted(p.name for p in test.glob("*.png")) == figures
    assert all(Image.open(test / name).size[0] > 100 for name in figures)


def test_the_model_card_names_the_weights_and_what_it_cannot_vouch_for(reported, tmp_path):
    """The page showed an edited config.yaml as the recipe, dropped the training's
    provenance without a word when provenance.json was gone, and named no digest."""
    run = shutil.copytree(reported[0], tmp_path / "run")
    (run / ".trained_config.json").write_text(json.dumps(
        {"model": {"name": "simple_cnn"}, "data": {"path": "/elsewhere/chest_xray"},
         "stages": [{"epochs": 1, "lr": 0.002}]}))
    (run / "config.yaml").write_text("model:\n  name: simple_cnn\ndata:\n  path: /data/chest_xray"
                                     "\nstages:\n- epochs: 30\n  lr: 0.0005\n")
    page = " ".join(build_report(run).read_text().split())
    card = page[page.index('id="model-card"'):]
    assert ("config.yaml was edited after training (stages.0.epochs, stages.0.lr): the config "
            "shown below is not the one that trained this model") in page  # data.path: free
    assert "Provenance not recorded (<code>provenance.json</code> missing" in card
    digest = json.loads((run / "eval" / "test" / "metrics.json").read_text())["weights_sha256"]
    assert f"Weights sha256 <code>{digest[:16]}</code>" in card
