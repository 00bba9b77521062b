"""The LightningModule: a `cxrkit.models.Classifier`, its loss, optimiser, schedule and metrics.

One module trains one stage (`StageConfig`): which layers learn (`unfreeze`), at which
learning rates (discriminative: the head at `lr`, the backbone layer group at depth d
from the top at `lr * lr_decay**d`), on images or on pre-extracted features
(`frozen_features`). Frozen layers keep their BatchNorm statistics: their norm layers
stay in eval mode while the rest trains.

Hyperparameters are plain dicts and lists, so checkpoints load with
`torch.load(..., weights_only=True)` and `ClassifierModule.load_from_checkpoint`.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassSpecificity,
)
from torchmetrics.utilities import dim_zero_cat

from cxrkit.config import LossConfig, OptimConfig, StageConfig, build
from cxrkit.data.transforms import ModelInput
from cxrkit.models import Classifier, ModelSpec, model_from_spec
from cxrkit.training.losses import make_loss, mixup

METRIC_NAMES = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1")


class PresentClassesAUROC(MulticlassAUROC):
    """Macro one-vs-rest ROC-AUC over the classes the films have, as `cxr evaluate` averages
    it: torchmetrics counts a class with no validation film as 0 (0.63 where it is 0.94)."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes, average=None, **kwargs)

    def compute(self) -> torch.Tensor:
        per_class = super().compute()
        present = torch.bincount(dim_zero_cat(self.target).long(),
                                 minlength=self.num_classes) > 0
        return per_class[present].mean()


def make_metrics(num_classes: int, sync: bool = True) -> MetricCollection:
    """Binary: on P(positive class). More classes: macro one-vs-rest (accuracy: micro).

    `sync=False` for scores computed on one process of a distributed run.
    """
    s = {"sync_on_compute": sync}
    if num_classes == 2:
        metrics = [BinaryAccuracy(**s), BinaryAUROC(**s), BinaryRecall(**s),
                   BinarySpecificity(**s), BinaryF1Score(**s)]
    else:
        c = num_classes
        metrics = [MulticlassAccuracy(c, average="micro", **s), PresentClassesAUROC(c, **s),
                   MulticlassRecall(c, **s), MulticlassSpecificity(c, **s),
                   MulticlassF1Score(c, **s)]
    return MetricCollection(dict(zip(METRIC_NAMES, metrics, strict=True)))


def metric_inputs(logits: torch.Tensor, target: torch.Tensor,
                  positive: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, target) as `make_metrics` expects them."""
    probs = torch.softmax(logits.float(), dim=1)
    if probs.shape[1] == 2:
        return probs[:, positive], (target == positive).long()
    return probs, target


def set_trainable(model: Classifier, unfreeze: str) -> None:
    """The head always learns; the backbone: none, all, or its last K layer groups."""
    model.backbone.requires_grad_(unfreeze == "all")
    if unfreeze.isdigit() and int(unfreeze) > 0:
        for group in model.layer_groups()[-int(unfreeze):]:
            for p in group:
                p.requires_grad_(True)
    model.head.requires_grad_(True)


def keep_frozen_norms_in_eval(backbone: nn.Module, all_norms: bool = False) -> None:
    """A frozen backbone runs in eval mode; frozen norm layers in a partly frozen one too
    (or every norm layer, with `all_norms`: statistics kept, affine weights still learn).

    Otherwise BatchNorm would keep updating running statistics of layers that do not learn.
    """
    if not any(p.requires_grad for p in backbone.parameters()):
        backbone.eval()
        return
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and (all_norms or not any(
            p.requires_grad for p in m.parameters()
        )):
            m.eval()


def param_groups(model: Classifier, lr: float, lr_decay: float) -> list[dict]:
    """Head at `lr`; backbone layer group at depth d (1 = last) at lr * lr_decay**d (its
    `lr_scale`, which the learning-rate range test keeps)."""
    groups = [{"name": "head", "params": list(model.head.parameters()), "lr": lr,
               "lr_scale": 1.0}]
    layers = model.layer_groups()
    for depth, group in enumerate(reversed(layers), start=1):
        params = [p for p in group if p.requires_grad]
        if params:
            groups.append({"name": f"backbone.{len(layers) - depth}", "params": params,
                           "lr": lr * lr_decay**depth, "lr_scale": lr_decay**depth})
    grouped = {id(p) for g in groups for p in g["params"]}
    missed = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if missed:
        raise RuntimeError(f"trainable parameters outside every layer group: {missed[:3]}")
    return groups


def make_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """A per-optimiser-step schedule, or None for a constant learning rate."""
    total_steps = max(int(total_steps), 1)
    if optim.schedule == "onecycle":
        pct_start = optim.warmup_fraction
        if pct_start * total_steps < 2:  # OneCycleLR divides by zero on a one-step warm-up:
            pct_start = 0.5 / total_steps  # too few steps for one, so none (tiny datasets)
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                          total_steps=total_steps, pct_start=pct_start)
    if optim.schedule == "cosine":
        warmup = int(optim.warmup_fraction * total_steps)
        cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
        if warmup == 0:
            return cosine
        ramp = LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    return None


class ClassifierModule(LightningModule):
    """Trains `model` (or, when loading a checkpoint, a fresh one built from `spec`)."""

    def __init__(self, spec: dict, stage: dict, optim: dict, loss: dict,
                 class_weights: list[float] | None, positive_index: int,
                 channels_last: bool = True, compile: bool = False,
                 model: Classifier | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else model_from_spec(ModelSpec.from_dict(spec))
        self.stage: StageConfig = build(StageConfig, stage, "stage")
        self.optim: OptimConfig = build(OptimConfig, optim, "optim")
        loss_config = build(LossConfig, loss, "loss")
        self.criterion = make_loss(loss_config, class_weights)
        self.mixup = loss_config.mixup if self.stage.augment else 0.0
        self.positive = positive_index
        self.model_input = ModelInput(self.model.spec)
        self._compiled = False
        self.val_metrics = make_metrics(self.model.spec.num_classes).clone(prefix="val_")
        set_trainable(self.model, self.stage.unfreeze)
        self.epoch_loss_sum: torch.Tensor | float = 0.0  # a tensor: no device sync per step
        self.epoch_images = 0

    @property
    def on_features(self) -> bool:
        """Batches hold backbone features (the frozen-feature fast path), not images."""
        return self.stage.frozen_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x) if self.on_features else self.model(x)

    def train(self, mode: bool = True) -> ClassifierModule:
        super().train(mode)
        if mode:
            keep_frozen_norms_in_eval(self.model.backbone, self.stage.freeze_norm_stats)
        return self

    def configure_model(self) -> None:
        """Before DDP wraps the model, so its gradient buckets match the memory layout."""
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self.on_features and not self._compiled:
            self.model.compile()  # in place: state_dict keys stay as they are
            self._compiled = True

    def on_fit_start(self) -> None:
        self.train()  # Lightning keeps the modes it finds: set them, frozen norms in eval

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # An epoch's first batch starts its sums. A run resumed part way through an epoch
        # starts at a later batch and has its sums from the checkpoint, so the epoch's mean
        # loss covers all of its steps (Lightning's own epoch means are not checkpointed and
        # would cover only the rest). (Not on_train_epoch_start: Lightning skips it on some
        # resumes.)
        if batch_idx == 0:
            self.epoch_loss_sum, self.epoch_images = 0.0, 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_epoch_loss"] = [float(self.epoch_loss_sum), self.epoch_images]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_loss_sum, self.epoch_images = checkpoint.get("train_epoch_loss", [0.0, 0])

    def on_train_epoch_end(self) -> None:
        if self.epoch_images:  # this process's films, as for every training number
            self.log("train_loss_epoch", self.epoch_loss_sum / self.epoch_images, prog_bar=True)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Image batches arrive grayscale and unnormalised (`XrayDataModule`): finish them here,
        on the device, where it costs the workers nothing."""
        if batch is None or self.on_features:
            return batch
        # In the weights' dtype: float32 under the mixed precisions (autocast casts inside),
        # the weights' own under 16-true, bf16-true and 64-true.
        x = self.model_input(batch[0]).to(self.dtype)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return [x, *batch[1:]]

    def training_step(self, batch, batch_idx: int):
        x, y = batch[0], batch[1]
        if self.mixup > 0:
            x, partner, lam = mixup(x, y, self.mixup)
            logits = self(x)
            loss = lam * self.criterion(logits, y) + (1 - lam) * self.criterion(logits, partner)
        else:
            loss = self.criterion(self(x), y)
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=len(y))  # this process's: no all-reduce on every step
        self.epoch_loss_sum = self.epoch_loss_sum + loss.detach() * len(y)
        self.epoch_images += len(y)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch is None:  # every image of the batch was unreadable
            return
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", self.criterion(logits, y), on_epoch=True, prog_bar=True,
                 batch_size=len(y), sync_dist=True)
        if self._trainer is not None and self.trainer.sanity_checking:
            return  # its two batches are often of one class: ranking metrics would only warn
        self.val_metrics.update(*metric_inputs(logits, y, self.positive))
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=False)

    def configure_optimizers(self):
        groups = param_groups(self.model, self.stage.lr, self.stage.lr_decay)
        if self.optim.optimizer == "sgd":
            # Nesterov's momentum needs one: momentum 0 (which the config allows) is plain SGD
            optimizer = torch.optim.SGD(groups, lr=self.stage.lr, momentum=self.optim.momentum,
                                        weight_decay=self.optim.weight_decay,
                                        nesterov=self.optim.momentum > 0)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.stage.lr,
                                          weight_decay=self.optim.weight_decay)
        schedule = make_schedule(optimizer, self.optim, self.trainer.estimated_stepping_batches)
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
