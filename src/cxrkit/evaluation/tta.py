"""Test-time augmentation views: small, label-preserving changes of a normalised batch.

Each view is a batch -> batch function for `predict_logits(..., views=...)`,
which averages the logits of the plain batch and every view. The changes are
as small as the framing differences between real films: a slight zoom and a
few percent of shift. No flips: a mirrored chest puts the heart on the wrong side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

View = Callable[[torch.Tensor], torch.Tensor]


def center_zoom(factor: float) -> View:
    """Keep the central `factor` of the image and scale it back up (0.9: zoom in by 1/0.9)."""

    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw = round(h * factor), round(w * factor)
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = x[..., top:top + ch, left:left + cw]
        return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)

    return view


def shift(dx: float, dy: float) -> View:
    """Move the image by fractions of its size; the uncovered border repeats the edge pixels."""

    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        px, py = round(abs(dx) * w), round(abs(dy) * h)
        padded = F.pad(x, (px, px, py, py), mode="replicate")
        top, left = py - round(dy * h), px - round(dx * w)
        return padded[..., top:top + h, left:left + w]

    return view


DEFAULT_VIEWS: dict[str, View] = {
    "zoom 0.9x": center_zoom(0.9),
    "shift left 4%": shift(-0.04, 0),
    "shift right 4%": shift(0.04, 0),
    "shift up 4%": shift(0, -0.04),
    "shift down 4%": shift(0, 0.04),
}
