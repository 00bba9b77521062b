"""CXRKIT_FIGURE_FORMATS: each figure also as vector files beside its PNG, for a paper."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cxrkit.config import ConfigError
from cxrkit.evaluation import evaluate_run, figures
from cxrkit.training import train
from tests.test_evaluate import copy_run
from tests.test_training import tiny_config


def test_every_figure_also_comes_as_svg_and_pdf_when_asked(trained_run, tiny_kaggle,
                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("CXRKIT_FIGURE_FORMATS", "svg, .PDF")
    out = evaluate_run(copy_run(trained_run, tmp_path), bootstrap=0, device="cpu")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 5
    for png in pngs:
        svg, pdf = png.with_suffix(".svg").read_text(), png.with_suffix(".pdf").read_bytes()
        assert svg.lstrip().startswith("<?xml") and "<text" in svg  # text stays editable
        assert pdf[:5] == b"%PDF-" and b"/Type3" not in pdf  # TrueType, as journals ask
    run = train(tiny_config(tiny_kaggle, tmp_path, **{"stages.0.epochs": 1}))
    assert (run / "training_curves.svg").is_file()


def test_a_format_matplotlib_should_not_write_is_refused_before_any_work(trained_run,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("CXRKIT_FIGURE_FORMATS", "svg,jpeg")
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ConfigError, match="jpeg is not a figure format here; choose from svg"):
        evaluate_run(run, bootstrap=0, device="cpu")
    assert not (run / "eval" / "test").exists()


def test_curves_differ_by_line_style_as_well_as_colour(monkeypatch, tmp_path):
    """A colour-blind reader or a greyscale print still tells the classes apart."""
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi: drawn.append(fig) or path)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet(np.ones(3), size=len(y))
    labels = ["NORMAL", "BACTERIA", "VIRUS"]
    figures.histograms_figure(y, probs, labels, None, {}, tmp_path / "h.png")
    figures.curves_figure(y, probs, labels, None, {}, tmp_path / "c.png")
    conf, outcome = probs.max(1), (probs.argmax(1) == y).astype(float)
    figures.reliability_figure((conf, outcome), (conf ** 2, outcome), "T=2.0", "P", tmp_path / "r")
    histograms, curves, reliability = drawn
    for ax in histograms.axes:  # one panel per class, a step histogram per true class
        assert len({patch.get_linestyle() for patch in ax.patches}) == 3
    roc = curves.axes[0]
    assert len({line.get_linestyle() for line in roc.lines if "AUC" in line.get_label()}) == 3
    curve, spread = reliability.axes
    assert len({line.get_linestyle() for line in curve.lines
                if "ECE" in line.get_label()}) == 2
    assert len({patch.get_linestyle() for patch in spread.patches}) == 2


def test_drawing_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """Importing `train` switched it to Agg: a notebook's inline plots stopped showing."""
    code = ("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot\n"
            "from cxrkit.training import train\n"
            "from cxrkit.report import build_report\n"
            "import cxrkit.training.curves\n"
            "print(matplotlib.get_backend())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
