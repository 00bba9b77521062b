"""Grad-CAM: shapes for every backbone family, and maps that point at the evidence."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxrkit.data.io import read_image
from cxrkit.explain import gradcam, overlay
from cxrkit.inference import predict_logits
from cxrkit.models import ModelSpec, create_model
from cxrkit.models.ensemble import Ensemble
from cxrkit.predict import predict
from cxrkit.runs import CALIBRATION, Calibration, load_model


class BrightPatchModel(nn.Module):
    """Hand-built: one conv unit fires on bright pixels; BOTH logits rise with it, the
    second twice as fast. So a bright patch is evidence for class 1 and against class 0,
    although it raises the raw logit of class 0 too (the trap of a raw-logit target)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(-0.5)  # only pixels brighter than 0.5 count
            self.head.weight.copy_(torch.tensor([[1.0], [2.0]]))

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))

    def gradcam_layer(self):
        return self.act


def film_with_patch(top: int, left: int) -> torch.Tensor:
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.4
    x[..., top:top + 12, left:left + 12] = 1.0
    return x


@pytest.mark.parametrize("corner", [(4, 4), (40, 44)])
def test_heatmap_finds_the_planted_patch(corner):
    x = film_with_patch(*corner)
    heat = gradcam(BrightPatchModel(), x, class_index=1)
    assert heat.shape == (1, 64, 64) and heat.min() >= 0 and heat.max() == pytest.approx(1)
    mask = np.zeros((64, 64), bool)
    mask[corner[0]:corner[0] + 12, corner[1]:corner[1] + 12] = True
    assert heat[0][mask].sum() / heat[0].sum() > 0.9


def test_evidence_over_the_whole_film_is_drawn_not_blank():
    """pytorch_grad_cam subtracts each map's minimum: a film bright everywhere, every pixel
    evidence, came out blank, as if nothing raised the class."""
    heat = gradcam(BrightPatchModel(), torch.ones(1, 1, 64, 64), class_index=1)
    assert heat.min() == pytest.approx(1.0, abs=1e-3)  # the same evidence everywhere
    patch = gradcam(BrightPatchModel(), film_with_patch(4, 4), class_index=1)[0]
    assert patch[40:, 40:].max() == 0  # and no evidence is still 0


def with_spec(model: nn.Module) -> nn.Module:
    model.spec = ModelSpec("bright", 2, 64, 1, (0.0,), (1.0,), labels=["NORMAL", "PNEUMONIA"])
    return model


def test_an_ensembles_map_holds_every_members_evidence():
    """It was the first member's alone: blank when another member carried the decision."""
    blind = with_spec(BrightPatchModel())
    with torch.no_grad():
        blind.head.weight.fill_(1.0)  # the patch raises both logits alike: no evidence
    x = film_with_patch(40, 44)
    for members in ([blind, with_spec(BrightPatchModel())], [with_spec(BrightPatchModel()),
                                                            blind]):
        heat = gradcam(Ensemble(members), x, class_index=1)[0]
        assert heat.max() == pytest.approx(1.0)
        assert heat[40:52, 44:56].mean() > 0.5 and heat[:30, :30].max() == 0


def test_class_zero_map_is_empty_where_the_patch_is_evidence_against_it():
    """The log-odds target: the patch raises logit 0 but raises logit 1 more, so it argues
    against class 0; a raw-logit target would highlight it for class 0 as well."""
    heat = gradcam(BrightPatchModel(), film_with_patch(4, 4), class_index=0)
    assert heat.max() == 0


def test_a_very_confident_model_still_gets_a_map():
    """A softmax-probability target is exactly flat once P rounds to 1.0 in float32; the
    log-odds target is not."""
    model = BrightPatchModel()
    with torch.no_grad():
        model.head.weight.mul_(1500)  # logit gap ~26 on the patch
    heat = gradcam(model, film_with_patch(4, 4), class_index=1)
    assert heat.max() == pytest.approx(1) and heat[0, 4:16, 4:16].mean() > 0.9


@pytest.mark.parametrize("name", ["simple_cnn", "efficientnet_lite0", "timm:resnet18",
                                  "timm:convnext_atto"])
def test_every_backbone_family_gives_input_sized_maps(name):
    model = create_model(name, pretrained=False, labels=["NORMAL", "PNEUMONIA"])
    # The states a model is often in when someone asks for a map: frozen, channels_last,
    # inside inference_mode. Grad-CAM needs gradients all the same.
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        model = model.to(memory_format=torch.channels_last)  # now inference-tensor weights
        x = torch.randn(2, model.spec.in_chans, 96, 96)
        heat = gradcam(model, x)
    assert heat.shape == (2, 96, 96)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1 + 1e-6
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_model_used_by_predict_logits_still_explains(trained_run, tiny_kaggle):
    """predict_logits moves the model to channels_last; the model must stay usable."""
    model = load_model(trained_run)
    paths = sorted(str(p) for p in (tiny_kaggle / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]
    logits, _ = predict_logits(model, paths, device="cpu")
    heat = gradcam(model, paths, class_index=[1, 1, 0])
    assert heat.shape == (3, 64, 64)  # the run's input size
    np.testing.assert_allclose(gradcam(model, paths[0], class_index=1), heat[:1], atol=1e-5)
    # numpy's integers too, as argmax gives them (a numpy scalar was taken for a sequence)
    np.testing.assert_allclose(gradcam(model, paths, class_index=np.array([1, 1, 0])), heat,
                               atol=1e-5)
    np.testing.assert_allclose(gradcam(model, paths[0], class_index=np.int64(1)), heat[:1],
                               atol=1e-5)
    with pytest.raises(ValueError, match="2 classes to explain for 3 images"):
        gradcam(model, paths, class_index=[1, 0])
    # a run folder and label names do as well as the model and indices
    labels = model.spec.labels
    by_name = gradcam(trained_run, paths, class_index=[labels[1], labels[1], labels[0]])
    np.testing.assert_allclose(by_name, heat, atol=1e-5)
    with pytest.raises(ValueError, match="no class 'pneumonia' to explain"):
        gradcam(model, paths, class_index="pneumonia")
    for index in (2, -1):
        with pytest.raises(ValueError, match=rf"no class index {index} to explain: .* "
                                             r"\(indices 0 to 1\)"):
            gradcam(model, paths, class_index=index)
    with pytest.raises(ValueError, match=r"shape \(64, 64\) is not a batch"):
        gradcam(model, torch.rand(64, 64))
    image = overlay(np.full((80, 96), 128, np.uint8), heat[0])
    assert image.size == (96, 80) and image.mode == "RGB"


def test_overlay_leaves_the_film_as_it_is_where_there_is_no_evidence():
    """Opacity follows the heat: no tint over the anatomy the map says nothing about."""
    film = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    heat = np.zeros((48, 64), np.float32)
    heat[10:20, 30:40] = 1.0
    out = np.asarray(overlay(film, heat), np.int16)
    gray = np.repeat(film[..., None], 3, axis=2).astype(np.int16)
    assert np.abs(out[30:, :] - gray[30:, :]).max() <= 1  # far from the hot patch: untouched
    assert np.abs(out[12:18, 32:38] - gray[12:18, 32:38]).max() > 60  # the patch: coloured


def test_overlay_shows_a_deep_or_float_film_as_the_model_reads_it():
    """A 16-bit film (a DICOM's pixels, a 16-bit PNG) or one in 0..1 is stretched to 8-bit
    gray as `read_image` does: PIL's own conversion clipped it (white, or black)."""
    deep = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (48, 1))
    seen = np.asarray(read_image(deep).convert("RGB"))
    nothing = np.zeros((48, 64), np.float32)
    for film in (deep, Image.fromarray(deep), deep.astype(np.float32) / 4095):
        out = np.asarray(overlay(film, nothing), np.int16)
        assert np.abs(out - seen).max() <= 1, type(film)
    assert 100 < seen.mean() < 155  # a ramp: mid-gray on average, neither white nor black
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200  # an 8-bit colour image keeps its colour
    assert (np.asarray(overlay(rgb, nothing)) == rgb).all()


def test_overlay_turns_an_exif_rotated_film_upright_as_gradcam_reads_it(tmp_path):
    """The heat of the upright film was drawn over the stored raster: rotated and stretched,
    113 px from its evidence in a review. And transparency shows black, as the model saw it."""
    film = np.full((48, 64), 40, np.uint8)
    film[4:16, 44:56] = 255  # the evidence, top right of the upright film
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; "rotate to view"
    Image.fromarray(film).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "turned.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "turned.jpg") as stored:
        heat = gradcam(with_spec(BrightPatchModel()), [stored], class_index=1)[0]
        drawn = np.asarray(overlay(stored, heat), np.int16)
    assert drawn.shape[:2] == (48, 64)  # the upright film's size
    changed = np.abs(drawn - np.asarray(read_image(tmp_path / "turned.jpg").convert("RGB"))
                     ).sum(-1) > 60
    rows, cols = np.nonzero(changed)
    assert abs(rows.mean() - 9.5) < 3 and abs(cols.mean() - 49.5) < 3  # on the evidence
    clear = np.zeros((48, 64, 4), np.uint8)
    clear[..., :3] = 255  # white under full transparency: black to the model
    assert np.asarray(overlay(clear, np.zeros((48, 64)))).max() == 0


@pytest.mark.parametrize(("threshold", "called"), [(0.0, "PNEUMONIA"), (1.0, "NORMAL")])
def test_a_run_explains_the_class_predict_calls_at_its_threshold(trained_run, tiny_kaggle,
                                                               tmp_path, threshold, called):
    """Not the argmax: the deployed threshold decides, as `cxr predict --cam` does."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / CALIBRATION).write_text(json.dumps(Calibration(threshold=threshold).to_dict()))
    paths = sorted(str(p) for p in (tiny_kaggle / "test").glob("*/*.jpeg"))[:4]
    assert {p.label for p in predict(run, paths)} == {called}
    np.testing.assert_allclose(gradcam(run, paths), gradcam(run, paths, class_index=called),
                               atol=1e-6)


def test_the_colour_key_is_the_overlays_own_blend():
    """Heat 0 leaves the film as it is: a plain colour bar showed it black."""
    from cxrkit.explain import overlay_key

    key = np.asarray(overlay_key(width=8, height=64), int)
    ramp = np.linspace(0, 255, 8).astype(np.uint8).astype(int)
    assert (np.abs(key[-1] - ramp[:, None]) <= 1).all()  # bottom row, heat 0: the film
    assert (np.abs(key[0] - ramp[:, None]) > 20).any()  # top row, heat 1: tinted


def test_many_films_are_explained_a_batch_at_a_time(trained_run, tiny_kaggle, tmp_path,
                                                    monkeypatch):
    """A folder of thousands of films: no more than one batch of prepared films and overlays
    is held at once (all of them used to be, ~0.6 MB per film at 224 px, 3 MB per overlay)."""
    import cxrkit.explain
    import cxrkit.predict

    run = shutil.copytree(trained_run, tmp_path / "run")
    paths = sorted(str(p) for p in (tiny_kaggle / "train").glob("*/*.jpeg"))[:12]
    prepared, first_use = [], {}  # films prepared so far; how many at the first forward/save
    real_load, real_caption = cxrkit.explain.load_prepared, cxrkit.predict.with_caption

    def counted_load(*args, **kwargs):
        prepared.append(args[0])
        return real_load(*args, **kwargs)

    def noted_caption(*args, **kwargs):
        first_use.setdefault("saved", len(prepared))
        return real_caption(*args, **kwargs)

    monkeypatch.setattr(cxrkit.explain, "load_prepared", counted_load)
    monkeypatch.setattr(cxrkit.predict, "with_caption", noted_caption)
    model = load_model(run)
    model.register_forward_hook(lambda *_: first_use.setdefault("forward", len(prepared))
                                and None)  # a hook returning a value replaces the output
    maps = gradcam(model, paths, class_index=1, batch_size=4)
    assert maps.shape == (12, 64, 64) and first_use["forward"] == 4
    # every map is the one the film gets on its own
    np.testing.assert_allclose(maps[9], gradcam(model, paths[9], class_index=1)[0], atol=1e-5)

    prepared.clear()
    predictor = cxrkit.predict.Predictor.load(run)
    predictor.write_cams(predictor.predict(paths), tmp_path / "cams", batch_size=4)
    assert first_use["saved"] == 4 and len(list((tmp_path / "cams").glob("*.png"))) == 12
