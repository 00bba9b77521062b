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

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from cxrkit.config import AugmentConfig
from cxrkit.data.io import at_input_size
from cxrkit.models import ModelSpec


def prepare(img: Image.Image, size: int, equalize: bool = False,
            crop: float = 1.0) -> torch.Tensor:
    """Grayscale PIL image -> uint8 tensor [1, size, size] (`at_input_size`)."""
    return torch.from_numpy(at_input_size(img, size, equalize, crop))


@dataclass(frozen=True)
class Framing:
    """Where a training view comes from: a crop box of the film (in its pixels), resized to
    the output square, then turned `angle` degrees clockwise about the square's centre and
    shifted by `shift` output pixels."""

    left: float
    top: float
    width: float
    height: float
    angle: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)

    def inverse_map(self, size: int) -> tuple[float, ...]:
        """PIL's affine coefficients (a, b, c, d, e, f): output (x, y) -> film (ax + by + c,
        dx + ey + f), in continuous pixel coordinates."""
        cos, sin = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        centre, (dx, dy) = size / 2, self.shift
        # undo the shift and the rotation: a point of the resized crop
        crop_x0 = centre - cos * (centre + dx) - sin * (centre + dy)
        crop_y0 = centre + sin * (centre + dx) - cos * (centre + dy)
        # then from the resized crop back into the film
        sx, sy = self.width / size, self.height / size
        return (cos * sx, sin * sx, self.left + crop_x0 * sx,
                -sin * sy, cos * sy, self.top + crop_y0 * sy)


def frame(film: torch.Tensor, size: int, framing: Framing) -> torch.Tensor:
    """uint8 [1, H, W] -> uint8 [1, size, size], in one bilinear resample; what the map
    takes from outside the film (the corners a rotation uncovers) is black."""
    if film.dtype != torch.uint8 or film.ndim != 3 or film.shape[0] != 1:
        raise ValueError(f"frame() takes a uint8 grayscale film [1, H, W] (what `prepare` "
                         f"gives); got {film.dtype} {tuple(film.shape)}")
    image = Image.fromarray(film[0].numpy())
    framed = image.transform((size, size), Image.Transform.AFFINE, framing.inverse_map(size),
                             resample=Image.Resampling.BILINEAR, fillcolor=0)
    return torch.from_numpy(np.array(framed))[None]


class RandomFraming(torch.nn.Module):
    """RandomResizedCrop followed by RandomAffine (rotation and shift), composed into one map
    and applied in one resample of the uint8 film: two to three times cheaper than
    torchvision's two steps, whose rotation runs `grid_sample` on floats, and one
    interpolation instead of two (BENCHMARKS.md, "Tenth round")."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 degrees: float, translate: float):
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio
        self.degrees, self.translate = degrees, translate

    def sample(self, height: int, width: int) -> Framing:
        # torch's generator, so seeding and DataLoader worker seeds work as for torchvision
        u = torch.rand(7).tolist()
        area = height * width * _between(self.scale, u[0])
        aspect = math.exp(_between((math.log(self.ratio[0]), math.log(self.ratio[1])), u[1]))
        # a box wider or taller than the film is clamped to it (torchvision draws again)
        crop_w, crop_h = min(width, math.sqrt(area * aspect)), min(height, math.sqrt(area / aspect))
        shift = tuple(_between((-self.translate, self.translate), v) * self.size for v in u[5:])
        return Framing(left=(width - crop_w) * u[2], top=(height - crop_h) * u[3],
                       width=crop_w, height=crop_h,
                       angle=_between((-self.degrees, self.degrees), u[4]), shift=shift)

    def forward(self, film: torch.Tensor) -> torch.Tensor:
        return frame(film, self.size, self.sample(*film.shape[-2:]))


def _between(bounds: tuple[float, float], u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u


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
    steps = [RandomFraming(size, scale=aug.scale, ratio=(0.9, 1.1), degrees=aug.degrees,
                           translate=aug.translate)]
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
