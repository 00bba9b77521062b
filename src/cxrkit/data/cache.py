"""The decode cache: every film decoded and resized once, memory-mapped, reused by runs.

One entry per (films, size, preprocessing): a `.u8` array and a `.valid.json` of which
films decoded. Each new split or input size adds one (Kermany's train split at 224 px:
212 MB), so the folder is kept under a limit, least recently used entries going first
(`CXRKIT_CACHE_MAX_GB`, default 20), and `cxr data cache` shows or clears it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrkit.data.dataset import load_prepared
from cxrkit.data.io import UnreadableImageError
from cxrkit.data.layout import Sample

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("CXRKIT_CACHE", Path.home() / ".cache" / "cxrkit"))
DECODED = "decoded"
UNFINISHED_GRACE_SECONDS = 24 * 3600  # a .tmp untouched this long is a killed build's


def cache_limit_bytes() -> int:
    value = os.environ.get("CXRKIT_CACHE_MAX_GB", "20")
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise ValueError(f"CXRKIT_CACHE_MAX_GB={value!r}: set it to a number of gigabytes "
                         "(e.g. 20), or unset it for the default of 20")
    return int(gigabytes * 2**30)


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
                 cache_dir: str | Path = DEFAULT_CACHE_DIR / DECODED, workers: int | None = None):
        self.size = size
        key = self._key(samples, size, equalize)
        cache_dir = Path(cache_dir)
        self.array_path = cache_dir / f"{key}.u8"
        self.valid_path = cache_dir / f"{key}.valid.json"
        try:
            os.utime(self.valid_path)  # used now: the last to go when the folder is pruned
        except FileNotFoundError:
            self._build(samples, equalize, workers or min(4, os.cpu_count() or 1))
            prune(cache_dir, cache_limit_bytes(), keep=key)
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


@dataclass
class CacheEntry:
    key: str
    films: int
    size: int  # pixels per side
    nbytes: int
    last_used: float  # seconds since the epoch

    def describe(self) -> str:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used))
        return (f"{self.key}: {self.films} films at {self.size} px, "
                f"{self.nbytes / 2**20:,.0f} MB, last used {used}")


def cache_entries(cache_dir: str | Path = DEFAULT_CACHE_DIR / DECODED) -> list[CacheEntry]:
    """The finished entries, least recently used first."""
    entries = []
    for valid in Path(cache_dir).glob("*.valid.json"):
        key = valid.name.removesuffix(".valid.json")
        array = valid.with_name(f"{key}.u8")
        try:
            films = len(json.loads(valid.read_text()))
            nbytes, last_used = array.stat().st_size, valid.stat().st_mtime
        except (OSError, ValueError):  # half removed, or another process is removing it
            continue
        size = math.isqrt(nbytes // max(films, 1))
        entries.append(CacheEntry(key, films, size, nbytes, last_used))
    return sorted(entries, key=lambda e: e.last_used)


def _remove(cache_dir: Path, key: str) -> None:
    for suffix in (".valid.json", ".u8"):  # the marker first: never a marker without data
        (cache_dir / f"{key}{suffix}").unlink(missing_ok=True)


def _unfinished(cache_dir: Path, older_than: float) -> list[Path]:
    """Builds that were killed part way (a build in progress keeps writing its .tmp)."""
    now = time.time()
    return [p for p in cache_dir.glob("*.tmp") if now - p.stat().st_mtime > older_than]


def prune(cache_dir: str | Path, limit: int, keep: str | None = None) -> list[CacheEntry]:
    """Remove least recently used entries until the folder holds at most `limit` bytes,
    never `keep` (the entry in use); and killed builds' leftovers. Returns what went."""
    cache_dir = Path(cache_dir)
    for leftover in _unfinished(cache_dir, UNFINISHED_GRACE_SECONDS):
        leftover.unlink(missing_ok=True)
    entries = cache_entries(cache_dir)
    total = sum(e.nbytes for e in entries)
    removed = []
    for entry in entries:
        if total <= limit:
            break
        if entry.key != keep:
            _remove(cache_dir, entry.key)
            total -= entry.nbytes
            removed.append(entry)
    if removed:
        log.info("decode cache over %.1f GB: removed %d least recently used entries (%s MB)",
                 limit / 2**30, len(removed), f"{sum(e.nbytes for e in removed) / 2**20:,.0f}")
    return removed


def clear(cache_dir: str | Path = DEFAULT_CACHE_DIR / DECODED) -> int:
    """Remove every entry and leftover; returns the bytes freed. A run that is using an
    entry keeps reading it (the open mapping outlives the file); the next run rebuilds it."""
    cache_dir = Path(cache_dir)
    freed = 0
    for entry in cache_entries(cache_dir):
        _remove(cache_dir, entry.key)
        freed += entry.nbytes
    for leftover in _unfinished(cache_dir, 0):
        freed += leftover.stat().st_size
        leftover.unlink(missing_ok=True)
    return freed
