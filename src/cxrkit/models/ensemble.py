"""An ensemble: classifiers that read the same films, their class probabilities averaged.

    model = Ensemble([load_model("runs/a"), load_model("runs/b")])

It is one `nn.Module` with a `spec`, like a `Classifier`, so prediction, evaluation,
calibration, export, serving and Grad-CAM take it unchanged. Films are prepared once, at
the first member's input size; `cxr train` trains every member at that size (its
`model.ensemble_with`). A member made at another size elsewhere gets the prepared films
resized inside the model (bilinear, from the first member's size: not the pixels it
learnt on). Its output is the log of the mean probability: softmax gives that mean back,
so temperatures and thresholds apply as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrkit.labels import positive_label
from cxrkit.models import Classifier, ModelSpec, model_from_spec


def _reading(spec: ModelSpec) -> tuple:
    """What must match for members to share one prepared input and one decision rule (the
    finding their threshold is about)."""
    return (spec.labels, spec.in_chans, tuple(spec.mean), tuple(spec.std), spec.equalize,
            positive_label(spec.labels, spec.positive_label))


class Ensemble(nn.Module):
    def __init__(self, members: list[Classifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        first = members[0].spec
        for member in members[1:]:
            if _reading(member.spec) != _reading(first):
                raise ValueError(
                    f"ensemble members must read films the same way (labels, channels, mean, "
                    f"std, equalisation, finding): {member.spec.name} "
                    f"{_reading(member.spec)} differs from {first.name} {_reading(first)}")
        self.members = nn.ModuleList(members)
        self.spec = ModelSpec("ensemble", first.num_classes, first.input_size, first.in_chans,
                              first.mean, first.std, 0.0, list(first.labels), first.equalize,
                              first.positive_label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [m(_resized(x, m.spec.input_size)).softmax(dim=1) for m in self.members]
        return torch.stack(probs).mean(dim=0).clamp_min(1e-12).log()

    def describe(self) -> dict:
        """model.json: the ensemble's input spec and each member's own."""
        return {**self.spec.to_dict(), "members": [m.spec.to_dict() for m in self.members]}


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def model_from_description(described: dict) -> Classifier | Ensemble:
    """An untrained model of the architecture a run's model.json describes."""
    if "members" in described:
        return Ensemble([model_from_spec(ModelSpec.from_dict(m)) for m in described["members"]])
    return model_from_spec(ModelSpec.from_dict(described))
