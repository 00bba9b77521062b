"""Losses: class-weighted cross-entropy (the default) and focal loss; mixup of batches.

The Kermany training split holds ~2.9 pneumonia films per normal one; weighting
each class by N / (C * n_c) makes both count equally in the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrkit.config import LossConfig


def balanced_class_weights(counts: list[int]) -> list[float]:
    """N / (C * n_c) per class: 1.0 everywhere when the classes are balanced."""
    if any(c == 0 for c in counts):
        raise ValueError(f"a class has no training images (counts {counts}); cannot weight it")
    total, n = sum(counts), len(counts)
    return [total / (n * c) for c in counts]


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)^gamma, so easy examples count less (Lin et al. 2017).

    gamma = 0 is plain (weighted, smoothed) cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, weight=self.weight, reduction="none",
                             label_smoothing=self.label_smoothing)
        p_true = torch.softmax(logits.float(), dim=1).gather(1, target[:, None])[:, 0]
        loss = (1 - p_true) ** self.gamma * ce
        if self.weight is None:
            return loss.mean()
        return loss.sum() / self.weight[target].sum()  # as weighted cross-entropy normalises


def make_loss(config: LossConfig, class_weights: list[float] | None) -> nn.Module:
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if config.name == "focal":
        return FocalLoss(config.focal_gamma, weight, config.label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def mixup(x: torch.Tensor, y: torch.Tensor,
          alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each example blended with a partner drawn from the same batch (Zhang et al. 2018).

    Returns lam * x + (1 - lam) * x[partner], the partners' labels and lam ~ Beta(alpha,
    alpha). The loss is then blended, `lam * loss(y) + (1 - lam) * loss(partner labels)`,
    rather than the targets, so class weights and focal loss apply as they do without mixup.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[partner], y[partner], lam
