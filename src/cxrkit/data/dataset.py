"""A torch Dataset over samples, with an optional decode-once cache.

A file that cannot be read yields `None`; `collate_skip_bad` drops it from the
batch and the file is logged once, so one bad image never kills a long run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from cxrkit.data.io import UnreadableImageError, read_image
from cxrkit.data.layout import Sample
from cxrkit.data.transforms import prepare

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("CXRKIT_CACHE", Path.home() / ".cache" / "cxrkit"))


def load_prepared(path: str, size: int, equalize: bool, crop: float = 1.0) -> torch.Tensor:
    return prepare(read_image(path), size, equalize, crop)


def _prepare_or_none(args: tuple[str, int, bool]) -> np.ndarray | None:
    try:
        return load_prepared(*args)[0].numpy()
    except UnreadableImageError as e:
        log.warning("skipping unreadable image %s", e)
        return None


class DecodeCache:
    """Every sample decoded and resized once into a memory-mapped uint8 array.

    The file name hashes the paths, sizes, modification times and preprocessing,
    so a changed dataset or input size builds a new cache instead of reusing a stale one.
    """

    def __init__(self, samples: Sequence[Sample], size: int, equalize: bool = False,
                 cache_dir: str | Path = DEFAULT_CACHE_DIR / "decoded", workers: int | None = None):
        self.size = size
        key = self._key(samples, size, equalize)
        cache_dir = Path(cache_dir)
        self.array_path = cache_dir / f"{key}.u8"
        self.valid_path = cache_dir / f"{key}.valid.json"
        if not self.valid_path.exists():
            self._build(samples, equalize, workers or min(4, os.cpu_count() or 1))
        self.valid = json.loads(self.valid_path.read_text())
        self.array = np.memmap(self.array_path, dtype=np.uint8, mode="r",
                               shape=(len(samples), size, size))

    @staticmethod
    def _key(samples: Sequence[Sample], size: int, equalize: bool) -> str:
        h = hashlib.sha256(f"{size}:{equalize}".encode())
        for s in samples:
            st = os.stat(s.path) if os.path.exists(s.path) else None
            h.update(f"{s.path}:{st and st.st_size}:{st and st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]

    def _build(self, samples: Sequence[Sample], equalize: bool, workers: int) -> None:
        self.array_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.array_path.with_suffix(".tmp")
        array = np.memmap(tmp, dtype=np.uint8, mode="w+",
                          shape=(max(len(samples), 1), self.size, self.size))
        valid = []
        jobs = [(s.path, self.size, equalize) for s in samples]
        with ProcessPoolExecutor(workers) as pool:
            for i, pixels in enumerate(pool.map(_prepare_or_none, jobs, chunksize=32)):
                valid.append(pixels is not None)
                if pixels is not None:
                    array[i] = pixels
        array.flush()
        del array
        os.replace(tmp, self.array_path)  # atomic: a killed build leaves no half cache
        self.valid_path.write_text(json.dumps(valid))

    def __getitem__(self, i: int) -> torch.Tensor | None:
        if not self.valid[i]:
            return None
        return torch.from_numpy(np.array(self.array[i]))[None]


class XrayDataset(Dataset):
    """(image tensor, class index, sample index); `None` for an unreadable file."""

    def __init__(self, samples: Sequence[Sample], class_to_idx: dict[str, int], size: int,
                 transform: Callable, equalize: bool = False, cache: DecodeCache | None = None):
        self.samples = list(samples)
        self.class_to_idx = class_to_idx
        self.size = size
        self.equalize = equalize
        self.transform = transform
        self.cache = cache
        self.reported: set[int] = set()  # unreadable films already warned about

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor | None:
        if self.cache is not None:
            return self.cache[i]
        try:
            return load_prepared(self.samples[i].path, self.size, self.equalize)
        except UnreadableImageError as e:
            if i not in self.reported:  # once per process, not once per epoch
                self.reported.add(i)
                log.warning("skipping unreadable image %s", e)
            return None

    def __getitem__(self, key: int | tuple[int, int]):
        """`key`: an index, or (index, seed): the transform's randomness then comes from that
        seed alone, whatever the process, the worker or the films before it."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        pixels = self.load(i)
        if pixels is None:
            return None
        if seed is None:
            image = self.transform(pixels)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(pixels)
        return image, self.class_to_idx[self.samples[i].label], i


def collate_skip_bad(batch: list):
    """default_collate without the unreadable samples (None)."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    return default_collate(good)
