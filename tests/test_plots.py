"""CXRKIT_FIGURE_FORMATS: each figure also as vector files beside its PNG, for a paper."""

from __future__ import annotations

import pytest

from cxrkit.config import ConfigError
from cxrkit.evaluation import evaluate_run
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
        assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    run = train(tiny_config(tiny_kaggle, tmp_path, **{"stages.0.epochs": 1}))
    assert (run / "training_curves.svg").is_file()


def test_a_format_matplotlib_should_not_write_is_refused_before_any_work(trained_run,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("CXRKIT_FIGURE_FORMATS", "svg,jpeg")
    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ConfigError, match="jpeg is not a figure format here; choose from svg"):
        evaluate_run(run, bootstrap=0, device="cpu")
    assert not (run / "eval" / "test").exists()
