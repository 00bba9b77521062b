"""`ModelSpec`: what a model needs of its input (size, channels, mean, std, labels), saved
beside every set of weights and in every export's sidecar.

It imports nothing heavy: an ONNX export is read and run without PyTorch (`cxrkit.onnx_backend`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    # Of two labels, the finding (threshold, sensitivity, Grad-CAM), chosen when the model is
    # made (`cxrkit.labels`); None in runs saved before it was recorded.
    positive_label: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        return cls(**known)
