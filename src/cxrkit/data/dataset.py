"""A torch Dataset over samples, reading films through an optional decode-once cache.

A file that cannot be read yields `None`; `collate_skip_bad` drops it from the
batch and the file is logged once, so one bad image never kills a long run.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, default_collate

from cxrkit.data.io import UnreadableImageError, read_image
from cxrkit.data.layout import Sample
from cxrkit.data.transforms import prepare

if TYPE_CHECKING:
    from cxrkit.data.cache import DecodeCache

log = logging.getLogger(__name__)


def load_prepared(path: str, size: int, equalize: bool, crop: float = 1.0) -> torch.Tensor:
    return prepare(read_image(path), size, equalize, crop)


@dataclass(frozen=True)
class UnreadableLog:
    """`split,path` lines, appended to one file as films are found unreadable. Without the
    decode cache no one process reads every film (loader workers, DDP ranks), so each
    appends what it finds, a line at a time, and the run reads the file back."""

    file: Path
    split: str

    def add(self, path: str) -> None:
        with open(self.file, "a", encoding="utf-8", newline="") as f:
            csv.writer(f).writerow([self.split, path])

    @staticmethod
    def read(file: Path) -> dict[str, list[str]]:
        if not file.is_file():
            return {}
        with open(file, encoding="utf-8", newline="") as f:
            # a line cut by a full disk, or two appends interleaved on NFS: passed over
            return films_by_split(row for row in csv.reader(f) if len(row) == 2)


def films_by_split(rows: Iterable[Sequence[str]]) -> dict[str, list[str]]:
    """(split, path) rows -> per split, each path once, in the order first found."""
    found: dict[str, dict[str, None]] = {}
    for split, path in rows:
        found.setdefault(split, {})[path] = None
    return {split: list(paths) for split, paths in found.items()}


class XrayDataset(Dataset):
    """(image tensor, class index, sample index); `None` for an unreadable file."""

    def __init__(self, samples: Sequence[Sample], class_to_idx: dict[str, int], size: int,
                 transform: Callable, equalize: bool = False, cache: DecodeCache | None = None,
                 unreadable_log: UnreadableLog | None = None):
        self.samples = list(samples)
        self.class_to_idx = class_to_idx
        self.size = size
        self.equalize = equalize
        self.transform = transform
        self.cache = cache
        self.unreadable_log = unreadable_log
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
                if self.unreadable_log is not None:
                    self.unreadable_log.add(self.samples[i].path)
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
