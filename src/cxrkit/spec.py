"""`ModelSpec`: what a model needs of its input (size, channels, mean, std, labels), saved
beside every set of weights and in every export's sidecar.

It imports nothing heavy: an ONNX export is read and run without PyTorch (`cxrkit.onnx_backend`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# What a model cxrkit trained is for, said where its outputs go without the run's report
# (an export's model.json, the server's /model and API description).
INTENDED_USE = ("Research and education. Not a medical device: not for diagnosis or any "
                "decision about a patient. Validate on the deployment site's own films.")

# A film's side in pixels, at most: a model.json from elsewhere (a run or an export someone
# sent) asking for more would allocate GBs per film before anything else went wrong.
MAX_INPUT_SIZE = 4096


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

    def __post_init__(self) -> None:
        problems = [
            *([f"input_size {self.input_size} is not 1..{MAX_INPUT_SIZE}"]
              if not 1 <= self.input_size <= MAX_INPUT_SIZE else []),
            *([f"num_classes {self.num_classes} is below 2"] if self.num_classes < 2 else []),
            *([f"mean and std need {self.in_chans} values each (in_chans)"]
              if not len(self.mean) == len(self.std) == self.in_chans else []),
            *(["std must be above 0"] if any(s <= 0 for s in self.std) else []),
            *([f"{len(self.labels)} labels for {self.num_classes} classes"]
              if self.labels and len(self.labels) != self.num_classes else []),
        ]
        if problems:
            raise ValueError(f"model spec {self.name!r}: {'; '.join(problems)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        return cls(**known)
