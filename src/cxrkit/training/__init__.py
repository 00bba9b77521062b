"""Training with PyTorch Lightning: from a data folder to a fine-tuned model in three lines.

    from cxrkit.config import TrainConfig
    from cxrkit.training import train
    run = train(TrainConfig.preset("quick", data="path/to/chest_xray"))  # or data="kaggle"

`run` is the run folder (`cxrkit.runs`): `cxrkit.runs.load_model(run)` gives the
trained classifier. Change anything with dotted keys, e.g.
`TrainConfig.preset("finetune", data=..., overrides={"stages.1.epochs": 3})`;
continue a killed run with `train(resume=run)` (or repeat `train(config, resume_if_exists=True)`
with `config.name` set: it continues that run where it exists); find a learning rate with
`find_lr(config, out="lr_find.png")`.

Pieces, each usable alone: `datamodule` (split + LightningDataModule), `features`
(frozen-backbone fast path), `module` (LightningModule, metrics, param groups),
`losses`, `callbacks` (checkpoints, loggers, Trainer), `curves`, `fit` (the run).
The names from `fit` (PyTorch, Lightning) load on first use: `curves` alone, which the
report draws with, needs neither.
"""

from typing import TYPE_CHECKING

from cxrkit.config import TrainConfig

__all__ = ["TrainConfig", "TrainingInterrupted", "find_lr", "train"]

if TYPE_CHECKING:  # for type checkers and editors; at run time, on first use below
    from cxrkit.training.fit import TrainingInterrupted, find_lr, train


def __getattr__(name: str):
    if name in ("TrainingInterrupted", "find_lr", "train"):
        from cxrkit.training import fit

        return getattr(fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
