"""Preprocessing and augmentation with torchvision transforms v2.

Every image goes through the same two steps:
1. `prepare`: canonical 8-bit grayscale -> optional histogram equalisation ->
   resize to the model's square input -> uint8 tensor [1, S, S]. This result is
   what the decode-once cache stores.
2. a tensor pipeline: augmentation (train only) -> `ModelInput`: float, the channels
   the model expects (grayscale repeated to RGB), normalised with the model's mean/std.

Training leaves `ModelInput` to the device (`finish=False`): its loader workers hand
over one grayscale channel (uint8 for validation) instead of three float ones, so there
is a third to a twelfth of the data to copy between processes and onto the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from cxrkit.models import ModelSpec


@dataclass
class AugmentConfig:
    """Augmentation suited to chest films. No horizontal flip by default: it moves the heart."""

    scale: tuple[float, float] = (0.75, 1.0)
    degrees: float = 7.0
    translate: float = 0.05
    brightness: float = 0.25
    contrast: float = 0.25
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_p: float = 0.2
    noise_std: float = 0.02
    hflip: bool = False


def prepare(img: Image.Image, size: int, equalize: bool = False,
            crop: float = 1.0) -> torch.Tensor:
    """Grayscale PIL image -> uint8 tensor [1, size, size].

    `crop` < 1 keeps only the central fraction of each side, resized in the same single
    step: the film as it would have been prepared had it been framed that much tighter.
    """
    if equalize:
        img = ImageOps.equalize(img)
    w, h = img.size
    cw, ch = w * crop, h * crop
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return v2.functional.pil_to_tensor(img)


class RandomGamma(torch.nn.Module):
    def __init__(self, gamma: tuple[float, float]):
        super().__init__()
        self.low, self.high = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = float(torch.empty(1).uniform_(self.low, self.high))
        return x.clamp(0, 1) ** g


class GaussianNoise(torch.nn.Module):
    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + torch.randn_like(x) * self.std).clamp(0, 1) if self.std > 0 else x


class ModelInput(torch.nn.Module):
    """Grayscale [..., 1, S, S], uint8 or float in [0, 1] -> what the network takes: float,
    repeated to the model's channels, normalised. One image or a whole batch, on any device."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.channels, self.mean, self.std = spec.in_chans, list(spec.mean), list(spec.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        if x.shape[-3] != self.channels:
            x = x.expand(*x.shape[:-3], self.channels, *x.shape[-2:])
        return v2.functional.normalize(x, self.mean, self.std)


def train_transform(spec: ModelSpec, aug: AugmentConfig | None = None,
                    finish: bool = True) -> v2.Compose:
    """uint8 [1, S, S] -> augmented, normalised float [C, S, S]; with `finish=False` the
    augmented grayscale float [1, S, S] in [0, 1], for `ModelInput` to finish later."""
    aug = aug or AugmentConfig()
    size = spec.input_size
    steps = [
        v2.RandomResizedCrop(size, scale=aug.scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomAffine(degrees=aug.degrees, translate=(aug.translate, aug.translate)),
    ]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
        RandomGamma(aug.gamma),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=aug.blur_p),
        GaussianNoise(aug.noise_std),
    ]
    return v2.Compose(steps + [ModelInput(spec)] if finish else steps)


def eval_transform(spec: ModelSpec, finish: bool = True) -> v2.Compose:
    """uint8 [1, S, S] (already at the input size) -> normalised float [C, S, S]; with
    `finish=False` the uint8 image as it is, for `ModelInput` to finish later."""
    return v2.Compose([ModelInput(spec) if finish else v2.Identity()])
