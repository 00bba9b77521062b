"""Shared fixtures: small generated chest-film-like datasets, and the real data when present."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))

requires_real_data = pytest.mark.skipif(
    not (REAL_DATA / "train").is_dir(),
    reason=f"real dataset not found at {REAL_DATA} (set CXRKIT_REAL_DATA to its folder)",
)


def run_with_files_under(limit: int, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command` where no file may grow past `limit` bytes (RLIMIT_FSIZE: a write past it
    fails with EFBIG, as one on a full disk fails with ENOSPC), its output captured."""
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(command, preexec_fn=limited, capture_output=True, text=True,
                          timeout=300, **kwargs)


def synthetic_film(label: str, seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A grayscale 'film': two dark lung fields; PNEUMONIA adds bright opacities in them.

    The classes differ in a way a tiny CNN learns in a few steps, so tests can
    assert that training really learns.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("L", size, 170)
    draw = ImageDraw.Draw(img)
    for x0 in (0.12, 0.55):  # the lungs
        draw.ellipse([x0 * w, 0.15 * h, (x0 + 0.33) * w, 0.85 * h], fill=60)
    if label != "NORMAL":
        for _ in range(3):
            cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.3, 0.7) * h
            r = rng.uniform(0.08, 0.14) * w
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=230)
    noise = rng.normal(0, 8, (h, w))
    return Image.fromarray(np.clip(np.asarray(img, float) + noise, 0, 255).astype(np.uint8), "L")


def kermany_name(label: str, patient: int, image: int) -> str:
    if label == "NORMAL":
        return f"IM-{patient:04d}-{image:04d}.jpeg"
    return f"person{patient}_bacteria_{image}.jpeg"


def make_kaggle_tree(root: Path, per_class: dict[str, int], images_per_patient: int = 2,
                     size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """ROOT/{train,test}/{NORMAL,PNEUMONIA}/ with Kermany-style names; returns ROOT."""
    for split, n in per_class.items():
        for label in ("NORMAL", "PNEUMONIA"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            offset = {"test": 1000, "val": 2000}.get(split, 0)  # patients never span splits
            for i in range(n):
                patient, image = offset + i // images_per_patient, i % images_per_patient
                # zlib.crc32, not hash(): str hashes change between processes (PYTHONHASHSEED).
                seed_i = seed + zlib.crc32(f"{split}/{label}/{i}".encode()) % 100_000
                name = kermany_name(label, patient, image)
                synthetic_film(label, seed_i, size).save(folder / name)
    return root


def make_kaggle_zip_tree(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """ROOT as the Kaggle zip extracts: chest_xray/{train,test,val}/CLASS, plus the nested
    duplicate chest_xray/chest_xray/ tree, __MACOSX/ AppleDouble junk and .DS_Store files."""
    data = make_kaggle_tree(root / "chest_xray", per_class or {"train": 6, "test": 2, "val": 2})
    for split in ("train", "test", "val"):
        shutil.copytree(data / split, data / "chest_xray" / split)
    junk = data / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    junk.mkdir(parents=True)
    (junk / "._IM-0000-0000.jpeg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (data / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


@pytest.fixture(scope="session")
def tiny_kaggle(tmp_path_factory) -> Path:
    """A Kaggle-layout dataset: 24 train and 8 test images per class."""
    return make_kaggle_tree(tmp_path_factory.mktemp("data") / "chest_xray",
                            {"train": 24, "test": 8})


def train_tiny_run(data: Path, run: Path, steps: int = 8, flip_every: int = 4) -> Path:
    """A run folder (model.safetensors, model.json, split.csv) of a simple_cnn trained for a
    few plain PyTorch steps at 64 px: independent of `cxrkit.training`. Every
    `flip_every`-th val and test label is flipped so the model has mistakes to evaluate."""
    from dataclasses import replace

    import torch

    from cxrkit.data.dataset import load_prepared
    from cxrkit.data.layout import load_source
    from cxrkit.data.split import patient_split, write_manifest
    from cxrkit.data.transforms import eval_transform
    from cxrkit.models import create_model
    from cxrkit.runs import save_model

    torch.manual_seed(0)
    samples = patient_split(load_source(data).samples)
    model = create_model("simple_cnn", labels=["NORMAL", "PNEUMONIA"])
    model.spec.input_size = 64  # 5 pools: a 2x2 last feature map, fast on a CPU
    transform = eval_transform(model.spec)
    train = [s for s in samples if s.split == "train"]
    x = torch.stack([transform(load_prepared(s.path, 64, False)) for s in train])
    y = torch.tensor([s.label == "PNEUMONIA" for s in train]).long()
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(x), (12,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Re-estimate BatchNorm statistics for the final weights (a few steps leave them stale).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model(x)
    save_model(model.eval(), run)
    flipped = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}
    held_out = [i for i, s in enumerate(samples) if s.split in ("val", "test")]
    for i in held_out[::flip_every]:
        samples[i] = replace(samples[i], label=flipped[samples[i].label])
    write_manifest(samples, run / "split.csv")
    return run


@pytest.fixture(scope="session")
def trained_run(tiny_kaggle, tmp_path_factory) -> Path:
    """`train_tiny_run` on `tiny_kaggle`, once per session. Copy it before writing into it."""
    return train_tiny_run(tiny_kaggle, tmp_path_factory.mktemp("runs") / "tiny")


def pretrained_run(folder: Path, threshold: float | None = None,
                   temperature: float = 1.0, bias: list[float] | None = None) -> Path:
    """A run folder as `cxr train` leaves it, without training: ImageNet EfficientNet-Lite0
    with a fresh (seeded) two-class head, and a calibration when `threshold` is given.
    For tests of what *uses* a real-sized model: they check behaviour, not accuracy."""
    import torch

    from cxrkit.models import create_model
    from cxrkit.runs import Calibration, save_model, write_calibration

    torch.manual_seed(0)
    save_model(create_model("efficientnet_lite0", labels=["NORMAL", "PNEUMONIA"]), folder)
    if threshold is not None:
        write_calibration(folder, Calibration(threshold, temperature, "val", bias=bias or []))
    return folder


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def ctrl_c_raises():
    """Ctrl+C raises KeyboardInterrupt, as at a terminal, also where the suite started with
    SIGINT ignored (a background job of a non-interactive shell: Python then leaves it so,
    and a test's Ctrl+C did nothing)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def signal_once_checkpointed(process, run: Path, sig: int, within: float = 150) -> None:
    """Send `sig` to a training `process` once it has written RUN/last.ckpt."""
    import time

    deadline = time.monotonic() + within
    while process.poll() is None and not (run / "last.ckpt").exists():
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    process.send_signal(sig)
