"""GPU training benchmark: one short script for a short loan of a GPU machine.

(a) training images/s with bf16-mixed + channels_last against fp32 in NCHW (cuDNN's
    default TF32 convolutions), same batch (bf16 needs an Ampere or later GPU: a T4 or V100
    emulates it): on in-memory tensors (the compute limit)
    and through the real input pipeline (bench_training's `bench_pipeline`);
(b) the `default` preset for --epochs epochs (1: one epoch, as `cxr train --preset
    default --set stages.0.epochs=1` runs it; 8: the whole recipe), with its own batch
    size and precision: the whole run (split, decode cache, fit, final validation,
    figures), the stage's fit (stages.json), and each epoch's seconds and images/s
    (metrics.csv: the training loop, validation excluded).

Each part's result is printed and written to --out as soon as it is measured, so a
loan that ends early still returns what was done.

    python benchmarks/bench_gpu.py [--data DIR] [--batch-size 128] [--steps 20]
                                   [--warmup 5] [--rounds 2] [--skip-speed]
                                   [--epochs 1] [--runs-dir DIR] [--out gpu.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning
import torch
from bench_training import REAL_DATA, bench_pipeline

from cxrkit.config import TrainConfig
from cxrkit.training import train


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def default_run(data: Path, epochs: int, runs_dir: Path) -> dict:
    config = TrainConfig.preset("default", data=str(data), overrides={
        "stages.0.epochs": epochs, "runs_dir": str(runs_dir), "name": f"gpu-default-{epochs}ep",
        "trainer.progress_bar": False,
        "trainer.devices": "1"})  # several GPUs: DDP would run this script again in each
    start = time.perf_counter()
    run = train(config)
    seconds = time.perf_counter() - start
    stage = json.loads((run / "stages.json").read_text())["train"]
    metrics = json.loads((run / "val_metrics.json").read_text())
    with open(run / "metrics.csv", encoding="utf-8", newline="") as f:
        epochs_logged = [row for row in csv.DictReader(f) if row["epoch_seconds"]]
    return {"run": str(run), "run_seconds": round(seconds, 1), "fit_seconds": stage["seconds"],
            "epochs": stage["epochs"], "steps": stage["global_step"],
            "batch_size": config.data.batch_size,
            "epoch_seconds": [round(float(r["epoch_seconds"]), 1) for r in epochs_logged],
            "train_images_per_s": [round(float(r["train_images_per_s"])) for r in epochs_logged],
            "best_epoch": metrics["best_epoch"], "val_roc_auc": metrics["roc_auc"],
            "val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true", help="only part (b)")
    parser.add_argument("--epochs", type=int, default=1, help="of the default preset, part (b)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep part (b)'s run folder here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    args = parser.parse_args()
    results = {"machine": machine()}

    def record(name: str, value: dict) -> None:
        results[name] = value
        print(json.dumps({name: value}, indent=2), flush=True)
        args.out.write_text(json.dumps(results, indent=2))

    record("machine", results["machine"])
    if not args.skip_speed:
        for name, precision, channels_last in (("bf16_channels_last", "bf16-mixed", True),
                                               ("fp32_nchw", "32", False)):
            record(name, bench_pipeline(args.data, args.steps, args.warmup, args.rounds,
                                        args.batch_size, None, precision, channels_last))
        bf16, fp32 = (statistics.median(results[name]["in_memory_images_per_s"])
                      for name in ("bf16_channels_last", "fp32_nchw"))
        record("bf16_channels_last_over_fp32_in_memory", {"ratio": round(bf16 / fp32, 2)})
    with nullcontext(args.runs_dir) if args.runs_dir else tempfile.TemporaryDirectory() as runs:
        record("default_run", default_run(args.data, args.epochs, Path(runs)))


if __name__ == "__main__":
    main()
