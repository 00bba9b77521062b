"""Inference speed on this machine's CPU: PyTorch eager against ONNX Runtime, and `cxr predict`.

(a) EfficientNet-Lite0 at 224 px: batch-1 latency (median) and batch-32 throughput of
    PyTorch eager (channels_last, inference_mode) and of ONNX Runtime (CPU provider) on
    the model `cxr export` writes, with one thread each and with one thread per core,
    in the same run so that their ratio holds on a shared machine;
(b) one image through `cxr predict`: the wall-clock of the whole command (process
    start, imports, model load included), and the in-process time of `predict()`
    (model load + one image) and of `Predictor.predict` on a loaded model.

    python benchmarks/bench_inference.py [--runs 30] [--image FILE] [--also RUN ...]

The model is ImageNet Lite0 with a fresh two-class head (speed does not depend on
the weights); `--also` adds trained runs (e.g. the `default` ensemble) to table (a), in
the same run. The image is a real test film when the dataset is there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from cxrkit.export import export_model
from cxrkit.models import create_model
from cxrkit.predict import Predictor, predict
from cxrkit.runs import save_model

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))


def median_seconds(step: Callable[[], object], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_backends(label: str, run: Path, onnx_path: Path, runs: int, threads: int) -> None:
    """One table row per batch size; PyTorch timed before the ONNX session exists, since two
    thread pools spinning on the same two cores slow each other down."""
    torch.set_num_threads(threads)
    model = Predictor.load(run).model.eval().to(memory_format=torch.channels_last)
    size = model.spec.input_size
    shapes = ((1, runs), (32, max(3, runs // 10)))
    batches = {b: torch.randn(b, 3, size, size).contiguous(memory_format=torch.channels_last)
               for b, _ in shapes}
    with torch.inference_mode():
        eager = {b: median_seconds(lambda x=batches[b]: model(x), n) for b, n in shapes}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    onnx = {b: median_seconds(lambda x=batches[b].contiguous().numpy():
                              session.run(None, {"image": x}), n) for b, n in shapes}
    for b, _ in shapes:
        if b == 1:
            cells = f"{eager[b] * 1e3:.1f} ms | {onnx[b] * 1e3:.1f} ms"
        else:
            cells = f"{b / eager[b]:.1f} images/s | {b / onnx[b]:.1f} images/s"
        print(f"| {label} | {threads} | {b} | {cells} | {eager[b] / onnx[b]:.2f}x |")


def bench_predict(run: Path, image: Path, runs: int) -> None:
    command = [str(Path(sys.executable).parent / "cxr"), "predict", str(run), str(image)]
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    in_process = median_seconds(lambda: predict(run, [image]), 3, warmup=1)
    predictor = Predictor.load(run)
    loaded = median_seconds(lambda: predictor.predict([image]), runs)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cxrkit.cli"], check=True)
    imports = time.perf_counter() - start
    print(f"`cxr predict RUN one.jpeg` wall-clock (process start included): "
          f"{statistics.median(walls):.2f} s (median of 3); of which `import cxrkit.cli` "
          f"alone: {imports:.2f} s")
    print(f"in-process `predict(run, [image])` (model load + one image): {in_process:.3f} s")
    print(f"`Predictor.predict([image])` on a loaded model: {loaded * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed repeats at batch 1")
    parser.add_argument("--image", type=Path, default=None, help="default: a real test film")
    parser.add_argument("--also", type=Path, nargs="*", default=[],
                        help="trained run folders to time beside Lite0")
    args = parser.parse_args()
    films = sorted((REAL_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))
    image = args.image or (films[0] if films else None)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        torch.manual_seed(0)
        save_model(create_model("efficientnet_lite0", labels=["NORMAL", "PNEUMONIA"]), run)
        models = [("Lite0", run), *[(r.name, r) for r in args.also]]
        exports = {}
        for label, folder in models:
            start = time.perf_counter()
            exports[label] = export_model(folder, out=Path(tmp) / "export" / label)
            print(f"ONNX export of {label} (dynamo exporter + onnx.checker): "
                  f"{time.perf_counter() - start:.1f} s")
        print(f"{os.cpu_count()} CPUs; median times; throughput = batch / median batch time")
        print("| model | threads | batch | PyTorch eager | ONNX Runtime | ONNX / PyTorch |")
        print("|---|---|---|---|---|---|")
        for threads in (1, os.cpu_count() or 1):
            for label, folder in models:
                bench_backends(label, folder, exports[label], args.runs, threads)
        if image is None:
            print(f"no real film at {REAL_DATA}: pass --image FILE for the `cxr predict` timing")
            return
        print(f"image: {image}")
        bench_predict(run, image, args.runs)


if __name__ == "__main__":
    main()
