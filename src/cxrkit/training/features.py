"""The frozen-backbone fast path: pooled features extracted once, then a head fit on them.

While the backbone is frozen, every epoch would push the same images through the
same network. Instead the pooled features of the train and val images are computed
once (eval transform, `torch.inference_mode`, channels_last), saved in the run folder
(so a resumed stage does not recompute them), and the head is fit on them by an
ordinary Lightning loop over a TensorDataset: seconds per epoch instead of minutes.

`views` > 1 adds that many minus one augmented passes over the train images (val stays
plain): augmentation at the cost of a few extraction passes instead of one per epoch.
It matters for what the head learns to ignore: without it, a head fit on plain films
can read how tightly a film is framed (`benchmarks/val_framing.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cxrkit.data.io import written_whole
from cxrkit.data.transforms import ModelInput
from cxrkit.training.datamodule import (
    EpochOrder,
    ResumableLoader,
    XrayDataModule,
    balanced_sampler,
    balanced_weights,
    batches_trained_this_epoch,
    one_process,
)


class SeededIndex(Dataset):
    """A dataset read by `EpochOrder`'s (index, seed) pairs; features need no augmentation
    seed, so it is dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, _ = item
        return self.dataset[index]


def extract_features(backbone: nn.Module, loader: DataLoader, model_input: ModelInput,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, F], labels [N]) for every readable image `loader` yields, each batch
    finished by `model_input` on the device."""
    was_training = backbone.training
    # Moved outside inference mode: parameters made inside it could never train again.
    backbone.eval().to(device, memory_format=torch.channels_last)
    features, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:  # every image of the batch was unreadable
                continue
            x, y = batch[0], batch[1]
            x = model_input(x.to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            features.append(backbone(x).float().cpu())
            labels.append(y)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


class FeatureDataModule(LightningDataModule):
    """Backbone features of the train and val images of `images`, as TensorDatasets."""

    def __init__(self, images: XrayDataModule, backbone: nn.Module, file: Path, batch_size: int,
                 views: int = 1):
        super().__init__()
        self.images = images
        self.backbone = backbone
        self.file = Path(file)
        self.batch_size = batch_size
        self.views = views
        self.datasets: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        if self.file.is_file():
            return
        self.images.prepare_data()
        self.images.setup()
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        model_input = ModelInput(self.images.spec)
        tensors = {}
        for split, views in (("train", self.views), ("val", 1)):
            passes = [extract_features(self.backbone, self.images.loader(
                split, shuffle=False, augment=view > 0, draw=view), model_input, device)
                for view in range(views)]
            tensors[f"{split}_x"] = torch.cat([x for x, _ in passes])
            tensors[f"{split}_y"] = torch.cat([y for _, y in passes])
        with written_whole(self.file) as partial:  # a killed extraction leaves nothing half written
            save_file(tensors, str(partial))

    def teardown(self, stage: str | None = None) -> None:
        self.images.teardown(stage)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        tensors = load_file(str(self.file))
        for split in ("train", "val"):
            self.datasets[split] = TensorDataset(tensors[f"{split}_x"], tensors[f"{split}_y"])

    def train_dataloader(self) -> DataLoader:
        """As the image stages': one process goes on part way through an interrupted epoch
        with that epoch's own order (`ResumableLoader`); several get a DistributedSampler."""
        train = self.datasets["train"]
        labels = train.tensors[1].tolist()
        balanced = self.images.data.balanced_sampler
        if one_process(self.trainer):
            weights = balanced_weights(labels) if balanced else None
            return ResumableLoader(SeededIndex(train), batch_size=self.batch_size,
                                   sampler=EpochOrder(len(train), self.images.seed, weights),
                                   position=lambda: batches_trained_this_epoch(self.trainer))
        if balanced:
            return DataLoader(train, batch_size=self.batch_size, sampler=balanced_sampler(labels))
        return DataLoader(train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=self.batch_size * 4)
