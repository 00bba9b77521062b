"""Data benchmarks on the real dataset.

(a) wall-clock of a full `audit_dataset` (decode, hashes, figures, HTML);
(b) training-loader throughput, XrayDataset + DataLoader + the train transform of
    the default model, decoding every file each epoch vs reading a built DecodeCache,
    and from the cache with the workers handing over grayscale films (as training
    does) instead of finished three-channel ones, and that with torchvision's two-step
    framing (RandomResizedCrop, then RandomAffine: the former transform) instead of
    `RandomFraming`, measured in the same run so the ratios hold on a shared machine;
(c) with --near-study, the evidence for the audit's near-duplicate threshold: how
    close the perceptual hashes of different films come, against those of edited
    copies (re-encoded, resized, brightened), at 64 and at 256 bits;
(d) with --checks, what the checks every run makes cost: listing the films (a folder, and
    the same films as a manifest, whose every row is looked up on disk), the films'
    fingerprint in provenance.json, the search for test films copied from training, and
    hashing the weights for the logits cache (--weights, a model.safetensors).

    python benchmarks/bench_data.py [--data DIR] [--images N] [--rounds R] [--workers W]
                                     [--upscale PX] [--skip-audit] [--near-study]
                                     [--checks [--weights FILE]]

The shared copy of the data is 224 px; the Kaggle originals are grayscale JPEGs
of about 1000-2900 px, where decoding costs far more: `--upscale 1600` measures
the loader on such copies (written to a temporary folder) instead.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from itertools import repeat
from pathlib import Path

import imagehash
import numpy as np
import torch
from bench_training import two_step_framing
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader

from cxrkit.data.audit import PHASH_SIZE, audit_dataset
from cxrkit.data.cache import DecodeCache
from cxrkit.data.dataset import XrayDataset, collate_skip_bad
from cxrkit.data.io import read_image
from cxrkit.data.layout import Sample, load_source
from cxrkit.data.split import training_films_in_test, write_manifest
from cxrkit.data.transforms import ModelInput, train_transform
from cxrkit.models import create_model
from cxrkit.provenance import data_fingerprint

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CXRKIT_REAL_DATA", REPO.parent / "shared" / "data" / "chest_xray"))


def bench_audit(data: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = audit_dataset(data, out)
        seconds = time.perf_counter() - start
    print(f"audit: {result.n_images} images in {seconds:.1f} s "
          f"({result.n_images / seconds:.0f} images/s); "
          f"{len(result.exact_duplicates)} duplicate groups, {result.near_pairs_total} near pairs")
    return seconds


def upscaled_copies(samples: list[Sample], width: int, folder: Path) -> list[Sample]:
    """Grayscale JPEG copies `width` px wide, like the Kaggle originals."""
    copies = []
    for s in samples:
        path = folder / s.label / Path(s.path).name
        path.parent.mkdir(parents=True, exist_ok=True)
        film = read_image(s.path).resize((width, int(width * 0.8)), Image.Resampling.BICUBIC)
        film.save(path, quality=95)
        copies.append(replace(s, path=str(path)))
    return copies


def images_per_second(dataset: XrayDataset, batch_size: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_skip_bad)
    start = time.perf_counter()
    seen = sum(len(batch[1]) for batch in loader)
    return seen / (time.perf_counter() - start)


def finish_seconds(spec, batch_size: int, repeats: int = 20) -> float:
    """What `ModelInput` costs on this CPU for one batch of grayscale films (median)."""
    batch = torch.rand(batch_size, 1, spec.input_size, spec.input_size)
    finish, times = ModelInput(spec), []
    for _ in range(repeats):
        start = time.perf_counter()
        finish(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_loader(samples: list[Sample], batch_size: int, workers: int, rounds: int) -> None:
    """Epochs of the variants alternate; the best of each is kept, because other work on a
    shared machine only ever slows an epoch down. The workers either finish every image
    (`ModelInput`: three normalised float channels) or hand over the augmented grayscale
    film, as training does, leaving `ModelInput` to the device."""
    spec = create_model(pretrained=False).spec
    classes = {c: i for i, c in enumerate(sorted({s.label for s in samples}))}
    transform = train_transform(spec)
    size = spec.input_size
    direct = XrayDataset(samples, classes, size, transform)
    images_per_second(direct, batch_size, workers)  # warm the page cache for a fair comparison
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = DecodeCache(samples, size, cache_dir=cache_dir, workers=max(workers, 1))
        build = time.perf_counter() - start
        cached = XrayDataset(samples, classes, size, transform, cache=cache)
        grey = XrayDataset(samples, classes, size, train_transform(spec, finish=False),
                           cache=cache)
        two_step = XrayDataset(samples, classes, size, two_step_framing(spec), cache=cache)
        rates = [(images_per_second(direct, batch_size, workers),
                  images_per_second(cached, batch_size, workers),
                  images_per_second(grey, batch_size, workers),
                  images_per_second(two_step, batch_size, workers)) for _ in range(rounds)]
    decode_rate, cache_rate, grey_rate, two_step_rate = (max(r) for r in zip(*rates, strict=True))
    width = read_image(samples[0].path).width
    finish = finish_seconds(spec, batch_size)
    print(f"loader ({len(samples)} train images of {width} px -> {size} px, batch {batch_size},"
          f" {workers} workers, train transform, best of {rounds} epochs each):")
    print(f"  decode every epoch: {decode_rate:7.0f} images/s")
    print(f"  DecodeCache:        {cache_rate:7.0f} images/s  ({cache_rate / decode_rate:.2f}x; "
          f"built once in {build:.1f} s)")
    print(f"  DecodeCache, grayscale handed over (as training): {grey_rate:7.0f} images/s "
          f"({grey_rate / cache_rate:.2f}x the finished images; {cached[0][0].nbytes} -> "
          f"{grey[0][0].nbytes} bytes an image); ModelInput on the batch here "
          f"{1000 * finish:.1f} ms, {batch_size / finish:.0f} images/s")
    print(f"  ... with torchvision's two-step framing (the former transform): "
          f"{two_step_rate:7.0f} images/s; RandomFraming {grey_rate / two_step_rate:.2f}x")


def phash_bits(path: str, hash_size: int) -> np.ndarray:
    return np.packbits(imagehash.phash(read_image(path), hash_size=hash_size).hash)


def edited_copies(img: Image.Image) -> list[Image.Image]:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=60)
    return [Image.open(buffer).convert("L"),
            img.resize((img.width // 2, img.height // 2)).resize(img.size),
            ImageEnhance.Brightness(img).enhance(1.15)]


def bench_near_threshold(data: Path, workers: int, n_edited: int = 100) -> None:
    """Nearest different film vs edited copies, per hash size."""
    by_digest = {hashlib.sha256(Path(s.path).read_bytes()).digest(): s.path
                 for s in load_source(data).samples}
    paths = sorted(by_digest.values())  # one file per group of byte-identical copies
    for hash_size in (8, PHASH_SIZE):
        with ProcessPoolExecutor(workers) as pool:
            hashes = np.stack(list(pool.map(phash_bits, paths, repeat(hash_size), chunksize=64)))
        nearest = np.array([np.delete(np.bitwise_count(hashes[i] ^ hashes).sum(1), i).min()
                            for i in range(len(hashes))])
        edited = []
        for path in paths[:: len(paths) // n_edited][:n_edited]:
            img = read_image(path)
            base = imagehash.phash(img, hash_size=hash_size)
            edited += [imagehash.phash(c, hash_size=hash_size) - base for c in edited_copies(img)]
        print(f"near duplicates, {hash_size**2}-bit phash: different films at least "
              f"{nearest.min()} bits apart (1st percentile {np.percentile(nearest, 1):.0f}, "
              f"median {np.median(nearest):.0f}); edited copies at most {max(edited)} bits "
              f"from their original ({len(edited)} copies)")


def best_of(f, repeats: int = 3) -> float:
    """The fastest of `repeats` calls, in seconds: the least disturbed on a shared box."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_checks(data: Path, weights: Path | None) -> None:
    films = load_source(data).samples
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_manifest(films, Path(folder) / "films.csv")
        print(f"{len(films)} films: load_source {best_of(lambda: load_source(data)):.3f} s "
              f"(folder), {best_of(lambda: load_source(manifest)):.3f} s (manifest)")
        known = Path(folder) / "hashes.json"
        data_fingerprint(films, known)  # a run's first attempt fills it; later ones read it
        print(f"data_fingerprint {best_of(lambda: data_fingerprint(films)):.3f} s (every film "
              f"read), {best_of(lambda: data_fingerprint(films, known)):.3f} s (known hashes)")
    print(f"training_films_in_test {best_of(lambda: training_films_in_test(films)):.3f} s")
    if weights is not None:
        seconds = best_of(lambda: hashlib.sha256(weights.read_bytes()).hexdigest())
        print(f"weights sha256 {seconds:.3f} s ({weights.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--images", type=int, default=1024, help="train images for the loader")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per loader variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--upscale", type=int, default=0, metavar="PX",
                        help="loader on grayscale copies PX wide (the originals' size)")
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--near-study", action="store_true", help="also run (c)")
    parser.add_argument("--checks", action="store_true", help="only run (d)")
    parser.add_argument("--weights", type=Path, help="(d): a model.safetensors to hash")
    args = parser.parse_args()
    if args.checks:
        bench_checks(args.data, args.weights)
        return
    print(f"{os.cpu_count()} CPU cores; data: {args.data}")
    if not args.skip_audit:
        bench_audit(args.data)
    samples = load_source(args.data).split("train")[:args.images]
    with tempfile.TemporaryDirectory() as folder:
        if args.upscale:
            samples = upscaled_copies(samples, args.upscale, Path(folder))
        bench_loader(samples, args.batch_size, args.workers, args.rounds)
    if args.near_study:
        bench_near_threshold(args.data, max(args.workers, 1))


if __name__ == "__main__":
    main()
