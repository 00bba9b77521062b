"""Training benchmarks on the real dataset.

(a) pipeline: training images/s of the real input pipeline (XrayDataModule: decode
    cache, augmentation, DataLoader workers) against the same Lightning fit on
    tensors already in memory, which is the compute limit. Same model (the default
    recipe's last stage: Lite0 at 224, everything trainable), same Trainer,
    after warm-up steps. The phases alternate (memory, pipeline, memory, ...) and
    each is scored by its median step time, so that load from other processes on a
    shared machine moves both sides alike and spikes do not count. With --two-step,
    each round also runs the pipeline with torchvision's two-step framing (the former
    transform) in place of `RandomFraming`;
(b) quick: the wall-clock of `cxr train --preset quick` on the whole dataset, and its
    validation ROC-AUC and accuracy.

    python benchmarks/bench_training.py [--data DIR] [--steps 6] [--warmup 2] [--rounds 2]
                                        [--precision auto|32|bf16-mixed] [--no-channels-last]
                                        [--batch-size 32] [--num-workers N] [--two-step]
                                        [--skip-quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from cxrkit.config import TrainConfig
from cxrkit.data.transforms import train_transform
from cxrkit.training.callbacks import resolve_precision
from cxrkit.training.datamodule import prepare_samples, task_classes
from cxrkit.training.fit import Run, build_model, build_stage

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))


class StepTimes(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())


def images_per_second(run: Run, datamodule_of, steps: int, warmup: int) -> float:
    """Lightning fit of the recipe's last stage; images/s of its median step after warm-up."""
    seed_everything(0)
    model = build_model(run.config, run.classes)
    module, images = build_stage(run, len(run.config.stages) - 1, model)
    timer = StepTimes()
    precision = resolve_precision(run.config.trainer)
    trainer = Trainer(accelerator="auto", devices=1, precision=precision, max_steps=warmup + steps,
                      logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                      limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule_of(images))
    times = timer.times[warmup - 1:]
    step = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
    return images.batch_size / step


class InMemory(LightningDataModule):
    """Four ready batches of real, prepared films, already on the device: the compute limit."""

    def __init__(self, images):
        super().__init__()
        images.setup()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        train, size = images.datasets["train"], images.batch_size
        self.batches = [
            (torch.stack([train[i][0] for i in range(b * size, (b + 1) * size)]).to(device),
             torch.tensor([train[i][1] for i in range(b * size, (b + 1) * size)]).to(device))
            for b in range(4)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)  # each item is a whole batch


def two_step_framing(spec) -> v2.Compose:
    """The training transform as it was before `RandomFraming`: the same ranges, cropped and
    resized by torchvision, then rotated and shifted by a second resample."""
    current = train_transform(spec, finish=False)
    framing, photometric = current.transforms[0], current.transforms[1:]
    return v2.Compose([
        v2.RandomResizedCrop(framing.size, scale=framing.scale, ratio=framing.ratio,
                             antialias=True),
        v2.RandomAffine(degrees=framing.degrees, translate=(framing.translate,) * 2),
        *photometric,
    ])


def with_two_step_framing(images):
    images.setup()
    images.datasets["train"].transform = two_step_framing(images.spec)
    return images


def bench_pipeline(data: Path, steps: int, warmup: int, rounds: int, batch_size: int,
                   num_workers: int | None, precision: str = "auto",
                   channels_last: bool = True, two_step: bool = False) -> dict:
    config = TrainConfig.preset("default", data=str(data),
                                overrides={"data.batch_size": batch_size,
                                           "data.num_workers": num_workers,
                                           "trainer.precision": precision,
                                           "trainer.channels_last": channels_last})
    samples = prepare_samples(config.data, config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), config, samples, task_classes("binary", samples))
        memory, pipeline = [images_per_second(run, InMemory, steps, warmup)], []
        former = []
        for _ in range(rounds):
            pipeline.append(images_per_second(run, lambda images: images, steps, warmup))
            if two_step:
                former.append(images_per_second(run, with_two_step_framing, steps, warmup))
            memory.append(images_per_second(run, InMemory, steps, warmup))
    workers = num_workers if num_workers is not None else "auto"
    compared = ({"two_step_pipeline_images_per_s": former,
                 "two_step_ratio": statistics.median(former) / statistics.median(memory)}
                if two_step else {})
    return {"in_memory_images_per_s": memory, "pipeline_images_per_s": pipeline,
            "ratio": statistics.median(pipeline) / statistics.median(memory), **compared,
            "precision": resolve_precision(config.trainer), "channels_last": channels_last,
            "batch_size": batch_size, "num_workers": workers, "threads": torch.get_num_threads()}


def bench_quick(data: Path) -> dict:
    with tempfile.TemporaryDirectory() as runs:
        start = time.perf_counter()
        result = subprocess.run(
            [str(Path(sys.executable).with_name("cxr")), "train", "--data", str(data),
             "--preset", "quick", "--runs-dir", runs, "--set", "trainer.progress_bar=false"],
            capture_output=True, text=True,
        )
        seconds = time.perf_counter() - start
        if result.returncode:
            raise RuntimeError(result.stderr[-3000:])
        run = Path(result.stdout.strip().splitlines()[-1])
        metrics = json.loads((run / "val_metrics.json").read_text())
        stages = json.loads((run / "stages.json").read_text())
    return {"seconds": seconds, "val_roc_auc": metrics["roc_auc"],
            "val_accuracy": metrics["accuracy"], "val_images": metrics["images"],
            "epochs": {stage: record["epochs"] for stage, record in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--precision", default="auto", help="auto, 32, bf16-mixed, 16-mixed")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--two-step", action="store_true",
                        help="also the pipeline with the former two-step framing")
    parser.add_argument("--skip-quick", action="store_true")
    args = parser.parse_args()
    pipeline = bench_pipeline(args.data, args.steps, args.warmup, args.rounds, args.batch_size,
                              args.num_workers, args.precision, args.channels_last,
                              args.two_step)
    print(json.dumps({"pipeline": pipeline}, indent=2), flush=True)
    if not args.skip_quick:
        print(json.dumps({"quick": bench_quick(args.data)}, indent=2))


if __name__ == "__main__":
    main()
