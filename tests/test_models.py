"""create_model: offline ImageNet weights mapped correctly, every family, weights files."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file

from cxrkit.config import ConfigError, TrainConfig
from cxrkit.models import OFFLINE_MODELS, create_model, imagenet_model
from cxrkit.runs import load_model, save_model

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _imagenet_batch(picture: np.ndarray, size: int) -> torch.Tensor:
    img = Image.fromarray(picture).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]  # the Lite models' mean = std = 0.5


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_weights_map_onto_timm_by_position(name):
    """If the positional mapping were off, the network would not recognise anything."""
    model = imagenet_model(name)
    size = create_model(name, pretrained=False).spec.input_size
    with torch.inference_mode():
        cat = model(_imagenet_batch(skimage.data.chelsea(), size)).argmax().item()
        coffee = model(_imagenet_batch(skimage.data.coffee(), size)).argmax().item()
    assert cat in CATS
    assert coffee == ESPRESSO


def test_pretrained_backbone_differs_from_random_and_carries_its_preprocessing():
    pretrained = create_model("efficientnet_lite0", labels=["NORMAL", "PNEUMONIA"])
    random = create_model("efficientnet_lite0", pretrained=False)
    w = "conv_stem.weight"
    assert not torch.equal(pretrained.backbone.state_dict()[w], random.backbone.state_dict()[w])
    spec = pretrained.spec
    assert (spec.input_size, spec.in_chans, spec.mean, spec.std) == (224, 3, (0.5,) * 3, (0.5,) * 3)
    assert spec.labels == ["NORMAL", "PNEUMONIA"] and spec.num_classes == 2
    assert pretrained(torch.randn(2, 3, 224, 224)).shape == (2, 2)


def test_simple_cnn_takes_one_channel_and_has_layer_groups():
    model = create_model("simple_cnn", num_classes=3, pretrained=False)
    assert model.spec.in_chans == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    groups = model.layer_groups()
    assert len(groups) == 5
    assert sum(p.numel() for g in groups for p in g) == sum(
        p.numel() for p in model.backbone.parameters())
    three = ["NORMAL", "BACTERIA", "VIRUS"]  # the classes follow the labels given
    assert create_model("simple_cnn", pretrained=False, labels=three).spec.num_classes == 3
    with pytest.raises(ValueError, match=r"num_classes 2 but 3 labels"):  # (was 3, silently)
        create_model("simple_cnn", num_classes=2, pretrained=False, labels=three)


def test_any_timm_model_by_name():
    model = create_model("timm:resnet18", pretrained=False, labels=["a", "b"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert len(model.layer_groups()) > 2
    assert model.gradcam_layer() is model.backbone.layer4


def test_offline_hub_weights_give_an_error_naming_the_offline_choices(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as error:  # a config to change: the CLI says it in a line
        create_model("timm:resnet18", pretrained=True)
    message = str(error.value)
    assert all(name in message for name in OFFLINE_MODELS)
    assert "--weights" in message


def test_unknown_names_are_rejected_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match="timm has no model"):
        create_model("timm:not_a_model_at_all", pretrained=False)


@pytest.mark.parametrize(("name", "suggestion"), [
    ("efficientnet-lite0", r"did you mean efficientnet_lite0\?"),
    ("resnet18", "timm has it: timm:resnet18"),
    ("timm:resnet1", "did you mean timm:resnet1"),
])
def test_a_near_miss_names_the_model_meant(name, suggestion):
    with pytest.raises(ValueError, match=suggestion):
        create_model(name, pretrained=False)


def test_a_config_naming_no_model_fails_before_any_data_is_read():
    with pytest.raises(ConfigError, match=r"model.ensemble_with.0: .*efficientnet_lite2"):
        TrainConfig.preset("quick", overrides={"model.ensemble_with": ["efficientnet_lite3"]})


def test_weights_file_safetensors_and_state_dict(tmp_path):
    source = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"])
    x = torch.randn(2, 1, 48, 48)
    source.eval()
    expected = source(x)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    for file in ("w.safetensors", "w.pt"):
        loaded = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"],
                              weights=tmp_path / file).eval()
        torch.testing.assert_close(loaded(x), expected)


def test_a_bare_backbone_state_dict_loads_into_the_backbone(tmp_path):
    backbone = create_model("timm:resnet18", pretrained=False).backbone
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    model = create_model("timm:resnet18", weights=tmp_path / "backbone.pth")
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit this backbone"):
        create_model("timm:resnet18", weights=tmp_path / "other.pth")


def test_a_pickled_object_is_refused(tmp_path):
    """weights_only=True: a file holding arbitrary objects is never unpickled."""
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": object()}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"bad.pt: not weights cxrkit can load safely "
                                          r"\(UnpicklingError\): give a .safetensors file"):
        create_model("simple_cnn", weights=tmp_path / "bad.pt")


def test_weights_from_a_runs_checkpoint_and_the_wrong_ones_are_said(tmp_path):
    source = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"]).eval()
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                  "epoch": 3}  # how Lightning stores a cxrkit run's module (RUN/best.ckpt)
    torch.save(checkpoint, tmp_path / "best.ckpt")
    loaded = create_model("simple_cnn", weights=tmp_path / "best.ckpt").eval()
    x = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(loaded(x), source(x))
    with pytest.raises(ConfigError, match=r"best.ckpt does not fit timm:resnet18 with 2 "
                                          r"classes: .* \(--model must be the architecture"):
        create_model("timm:resnet18", pretrained=False, weights=tmp_path / "best.ckpt")
    with pytest.raises(ConfigError, match=r"--weights .*nothing.pt: no such file"):
        create_model("simple_cnn", weights=tmp_path / "nothing.pt")


def test_saved_run_model_reloads_with_its_spec(tmp_path):
    model = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"])
    model.spec.input_size = 96
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.spec == model.spec
    x = torch.randn(1, 1, 96, 96)
    torch.testing.assert_close(again(x), model.eval()(x))
    # readable as the run's other files are (safetensors' save_file made it 0600: a
    # colleague on a shared machine could not load the model)
    weights = tmp_path / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == (tmp_path / "model.json").stat().st_mode & 0o777
