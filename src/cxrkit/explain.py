"""Grad-CAM: which parts of the film drove the model's decision.

    heatmaps = gradcam(model, ["a.jpeg", "b.jpeg"])      # [N, H, W] in [0, 1]
    overlay(read_image("a.jpeg"), heatmaps[0]).save("a_cam.png")

Grad-CAM (Selvaraju et al. 2017) weights the channels of the last convolutional
activation (`model.gradcam_layer()`; an ensemble's: each member's, summed) by the gradient
of a target score, and keeps the positive part. It is through the `grad-cam` package
(pytorch_grad_cam), each map divided by its maximum alone: 0 is no evidence, not this film's
weakest (the package subtracts each map's minimum, and evidence spread over the whole film
showed as nothing). A heatmap shows where the model looked, not that it looked for the right
reason; a map that is 0 everywhere means nothing in the film raised that class's log-odds
(overlaid, the film shows bare).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageOps
from pytorch_grad_cam import GradCAM

from cxrkit.data.dataset import load_prepared
from cxrkit.data.io import Film, film_list, read_image
from cxrkit.data.transforms import eval_transform
from cxrkit.models import Classifier
from cxrkit.models.ensemble import Ensemble

if TYPE_CHECKING:
    from cxrkit.runs import Calibration

DEFAULT_BATCH = 16
CAM_COLORMAP = "inferno"  # perceptually ordered: brighter is more, unlike jet's rainbow


class LogOddsTarget:
    """Target score for class k: z_k - logsumexp(other logits), the log-odds of class k.

    Why not the raw logit z_k (pytorch_grad_cam's ClassifierOutputTarget)? With a
    softmax head only differences of logits matter: a region that raises z_0 and
    z_1 alike changes no prediction, yet its gradient on z_1 alone is large, so
    the raw logit highlights evidence for nothing. For two classes the log-odds
    is exactly z_1 - z_0, the decision itself. It has the same direction as the
    softmax probability (ClassifierOutputSoftmaxTarget) but does not saturate: once
    a confident model's probability rounds to 1.0 in float32 (a logit gap above ~17)
    its gradient is exactly zero and the map comes out blank.
    """

    def __init__(self, index: int):
        self.index = index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        others = torch.cat([logits[..., :self.index], logits[..., self.index + 1:]], dim=-1)
        return logits[..., self.index] - torch.logsumexp(others, dim=-1)


class _EvidenceCAM(GradCAM):
    """GradCAM whose maps keep their zero: each layer's positive map resized to the input,
    the layers summed (an ensemble's members, each its share of the same log-odds), then
    divided by the film's maximum. Not min-max scaled per layer as the package does."""

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets: list,
                              eigen_smooth: bool) -> list[np.ndarray]:
        width, height = self.get_target_width_height(input_tensor)
        maps = []
        for layer, activations, gradients in zip(
                self.target_layers, self.activations_and_grads.activations,
                self.activations_and_grads.gradients, strict=True):
            cam = np.maximum(self.get_cam_image(
                input_tensor, layer, targets, activations.cpu().numpy(),
                gradients.cpu().numpy(), eigen_smooth), 0)
            maps.append(torch.nn.functional.interpolate(
                torch.from_numpy(np.float32(cam))[:, None], size=(height, width),
                mode="bilinear", align_corners=False).numpy())
        return maps

    def aggregate_multi_layers(self, cam_per_target_layer: list[np.ndarray]) -> np.ndarray:
        total = np.concatenate(cam_per_target_layer, axis=1).sum(axis=1)
        peak = total.max(axis=(1, 2), keepdims=True)  # (a blank map: 0 everywhere)
        return np.divide(total, peak, out=np.zeros_like(total), where=peak > 0)


def _cam_layers(model: torch.nn.Module, target_layer: torch.nn.Module | None) -> list:
    """The activations explained: the one given, a model's own, or each ensemble member's
    (the first member's alone showed a blank map when the others carried the evidence)."""
    if target_layer is not None:
        return [target_layer]
    if isinstance(model, Ensemble):
        return [member.gradcam_layer() for member in model.members]
    return [model.gradcam_layer()]


def _as_batch(model: Classifier, images) -> torch.Tensor:
    """Films (paths, images, arrays) -> the model's own preprocessing; a tensor [C,H,W] or
    [N,C,H,W] is taken as is."""
    if isinstance(images, torch.Tensor):
        x = images[None] if images.dim() == 3 else images
        if x.dim() != 4:
            raise ValueError(f"a tensor of shape {tuple(images.shape)} is not a batch of "
                             "prepared films: give [C, H, W] or [N, C, H, W] from "
                             "eval_transform(model.spec), or the films themselves (paths, PIL "
                             "images, arrays)")
        return x
    spec, transform = model.spec, eval_transform(model.spec)
    return torch.stack([transform(load_prepared(p, spec.input_size, spec.equalize))
                        for p in film_list(images)])


def _make_autograd_ready(model: torch.nn.Module) -> None:
    """Replace parameters and buffers made inside `torch.inference_mode` (e.g. by a `.to()`
    there) with ordinary copies, in place: autograd refuses inference tensors."""
    with torch.inference_mode(False):
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), p.requires_grad)
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()


@contextmanager
def _gradients_from(layers: list[torch.nn.Module], model: torch.nn.Module) -> Iterator[None]:
    """Autograd from `layers` on only: their outputs become fresh leaves that require grad,
    and every parameter is frozen meanwhile. The backward pass then runs through the
    heads alone (no parameter gradients, nothing left in `.grad`), and it works the same
    for a frozen backbone. Registered before GradCAM's own hooks, so they see the leaves."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles = [layer.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
               for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _predicted_classes(model: Classifier, batches: Iterator[torch.Tensor],
                       calibration: Calibration | None) -> list[int]:
    """Each film's class as `predict` calls it: at a run's deployed threshold and
    calibration, or, for a model alone, the most probable."""
    with torch.no_grad():
        logits = torch.cat([model.eval()(x).float().cpu() for x in batches]).numpy()
    if calibration is None:
        return [int(c) for c in logits.argmax(1)]
    return [int(c) for c in calibration.classes(calibration.probabilities(logits),
                                                model.spec.labels,
                                                positive_label=model.spec.positive_label)]


def _class_indices(labels: list[str], class_index, n: int) -> list[int | None]:
    """One class (index or label) for all `n` images, or one per image; None: the predicted."""
    one = class_index is None or isinstance(class_index, Integral | str)  # numpy's ints too
    given = [class_index] * n if one else list(class_index)
    if len(given) != n:
        raise ValueError(f"{len(given)} classes to explain for {n} images")
    given = [int(c) if isinstance(c, Integral) else c for c in given]
    for c in given:
        if isinstance(c, str) and c not in labels:
            raise ValueError(f"no class {c!r} to explain: the model's classes are {labels}")
        if isinstance(c, int) and labels and not 0 <= c < len(labels):
            raise ValueError(f"no class index {c} to explain: the model's classes are {labels} "
                             f"(indices 0 to {len(labels) - 1})")
    return [labels.index(c) if isinstance(c, str) else c for c in given]


def gradcam(model: Classifier | str | Path, images: Film | Sequence[Film] | torch.Tensor,
            class_index: int | str | Sequence[int | str] | None = None,
            target_layer: torch.nn.Module | None = None,
            batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Grad-CAM heatmaps [N, H, W] in [0, 1] at the input size, one per image:

        maps = gradcam("runs/quick", ["a.jpeg", "b.jpeg"], class_index="PNEUMONIA")

    `model`: a loaded model or a run folder. `class_index`: the class to explain (an index
    or a label), one for all or one per image; None explains each image's predicted class
    (for a run folder, at its deployed threshold, as `predict` calls it).
    `target_layer` defaults to `model.gradcam_layer()` (an ensemble: each member's). One map
    per image given, in order: an unreadable file raises `UnreadableImageError` naming it
    (`predict` skips such files; explain the readable ones).
    """
    calibration = None
    if isinstance(model, str | Path):
        from cxrkit.runs import load_model, read_calibration

        calibration = read_calibration(model)
        model = load_model(model)
    # Films are prepared a batch at a time: memory stays that of one batch for any number.
    films = _as_batch(model, images) if isinstance(images, torch.Tensor) else film_list(images)
    n = len(films)
    device = next(model.parameters()).device

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, n, batch_size):
            yield _as_batch(model, films[start:start + batch_size]).to(device)

    classes = _class_indices(model.spec.labels if hasattr(model, "spec") else [],
                             class_index, n)
    if None in classes:
        predicted = _predicted_classes(model, batches(), calibration)
        classes = [p if c is None else c for c, p in zip(classes, predicted, strict=True)]
    layers = _cam_layers(model, target_layer)
    _make_autograd_ready(model)
    heatmaps = []
    # Grad-CAM needs gradients: leave any surrounding inference_mode/no_grad.
    with (torch.inference_mode(False), torch.enable_grad(), _gradients_from(layers, model),
          _EvidenceCAM(model, layers) as cam):
        for start, x in zip(range(0, n, batch_size), batches(), strict=True):
            targets = [LogOddsTarget(c) for c in classes[start:start + batch_size]]
            heatmaps.append(cam(x, targets))
    return np.concatenate(heatmaps).astype(np.float32)


def overlay(image: Image.Image | np.ndarray, heatmap: np.ndarray, alpha: float = 0.6,
            colormap: str = CAM_COLORMAP) -> Image.Image:
    """The heatmap, coloured, blended over the (grayscale or RGB) image at the image's size.
    Each pixel's opacity is `alpha` times its heat: where the map is 0 the film shows as it
    is, not under a tint, so the anatomy stays readable beside the evidence."""
    base = _overlay_base(image)
    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize(
        base.size, Image.Resampling.BILINEAR)
    heat = np.asarray(heat, np.float32) / 255
    colored = matplotlib.colormaps[colormap](heat)[..., :3]
    opacity = alpha * heat[..., None]
    mixed = (1 - opacity) * np.asarray(base, np.float32) / 255 + opacity * colored
    return Image.fromarray(np.uint8(np.clip(mixed, 0, 1) * 255))


def _overlay_base(image: Image.Image | np.ndarray) -> Image.Image:
    """An 8-bit image as it is (RGB keeps its colour); a deeper or float one (a DICOM's
    pixels, a 16-bit PNG) as the model read it, stretched to 8-bit gray: PIL's own
    conversion clips it, and a 16-bit film came out white, one in 0..1 black."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):  # upright, as gradcam read it (EXIF orientation)
        image = ImageOps.exif_transpose(image)
    if isinstance(image, Image.Image) and image.mode in ("1", "L", "RGB"):
        return image.convert("RGB")
    return read_image(image).convert("RGB")  # transparency on black, as the model saw it


def overlay_key(width: int = 48, height: int = 256) -> Image.Image:
    """`overlay`'s colour key: each heat (rows, 1 at the top) as it shows over films from
    dark to bright (columns); a plain colour bar would show heat 0 as black, not as the film."""
    film = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    heat = np.tile(np.linspace(1, 0, height, dtype=np.float32)[:, None], (1, width))
    return overlay(film, heat)
