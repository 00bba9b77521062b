"""Shared fixtures: small generated chest-film-like datasets, and the real data when present."""

from __future__ import annotations

import os
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
            offset = 1000 if split == "test" else 0
            for i in range(n):
                patient, image = offset + i // images_per_patient, i % images_per_patient
                seed_i = seed + hash((split, label, i)) % 100_000
                synthetic_film(label, seed_i, size).save(folder / kermany_name(label, patient, image))
    return root


@pytest.fixture(scope="session")
def tiny_kaggle(tmp_path_factory) -> Path:
    """A Kaggle-layout dataset: 24 train and 8 test images per class."""
    return make_kaggle_tree(tmp_path_factory.mktemp("data") / "chest_xray",
                            {"train": 24, "test": 8})
