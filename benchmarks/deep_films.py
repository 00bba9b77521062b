"""Deep films: how the 16-bit stretch changes predictions, with and without a marker.

    python benchmarks/deep_films.py runs/exp-e2e-8ep [--per-class 50] [--out /tmp/deep]

Takes the first --per-class test films of each class (8-bit JPEGs), stores each as a 16-bit
PNG holding 12-bit data (value x 16), and again with a 4 x 4 patch at 65535 in a corner (a
burned-in marker or hot pixels). Predicts all with the run and compares each with its
JPEG: the largest and median change of P(PNEUMONIA), and how many labels change at the
run's threshold, for cxrkit's stretch (percentiles, `cxrkit.data.io.STRETCH_PERCENTILES`)
and for the former min..max stretch (applied here by hand, saved as 8-bit PNGs).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxrkit.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))


def deep(pixels: np.ndarray, marked: bool) -> np.ndarray:
    stored = pixels.astype(np.uint16) * 16
    if marked:
        stored[:4, :4] = 65535
    return stored


def min_max_8bit(stored: np.ndarray) -> np.ndarray:
    """The former rule: the file's min..max to 0..255."""
    x = stored.astype(np.float64)
    return np.round((x - x.min()) * 255 / (x.max() - x.min())).astype(np.uint8)


def write_versions(films: list[Path], out: Path) -> dict[str, list[Path]]:
    versions: dict[str, list[Path]] = {}
    for film in films:
        pixels = np.asarray(Image.open(film).convert("L"))
        for marked in (False, True):
            stored = deep(pixels, marked)
            tag = "marked" if marked else "clean"
            for rule, image in (("percentiles", Image.fromarray(stored)),
                                ("min..max", Image.fromarray(min_max_8bit(stored)))):
                path = out / f"{rule}-{tag}" / f"{film.stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                versions.setdefault(f"{rule}, {tag}", []).append(path)
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cxrkit-deep-films"))
    args = parser.parse_args()
    films = [f for label in ("NORMAL", "PNEUMONIA")
             for f in sorted((REAL_DATA / "test" / label).glob("*.jpeg"))[:args.per_class]]
    predictor = Predictor.load(args.run)
    positive = predictor.positive_label

    def p_positive(paths: list[Path]) -> np.ndarray:
        return np.array([p.probabilities[positive] for p in predictor.predict(paths)])

    reference = p_positive(films)
    threshold = predictor.threshold()
    print(f"{len(films)} test films, threshold {threshold:.3f}")
    print("| stored as 16-bit, read with | max change of P | median change | labels changed |")
    print("|---|---|---|---|")
    for name, paths in write_versions(films, args.out).items():
        p = p_positive(paths)
        change = np.abs(p - reference)
        flipped = int(((p >= threshold) != (reference >= threshold)).sum())
        print(f"| {name} | {change.max():.3f} | {np.median(change):.4f} | {flipped} |")


if __name__ == "__main__":
    main()
