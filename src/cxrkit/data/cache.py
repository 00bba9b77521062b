"""The decode cache: every film decoded and resized once, memory-mapped, reused by runs.

One entry per (films, size, preprocessing, reader version): a `.u8` array and a
`.valid.json` saying which films decoded and from where, in `data.cache_dir`/decoded
(default `$CXRKIT_CACHE/decoded`, else `~/.cache/cxrkit/decoded`). Each new split or input
size adds one (Kermany's train split at 224 px: 212 MiB), so before a new entry is built
the least recently opened ones go until it fits under `CXRKIT_CACHE_MAX_GB` (default 20
GiB). An entry some process has open (a shared lock on its `.valid.json`) and a build under
way (a lock on its `.tmp`) are never removed, so the limit can be exceeded while they run.
`cxr data cache` shows or clears it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from cxrkit.config import NO_SPACE_ERRNOS, ConfigError, no_space
from cxrkit.data.dataset import load_prepared
from cxrkit.data.io import READER_VERSION, UnreadableImageError
from cxrkit.data.layout import Sample
from cxrkit.data.pool import worker_pool

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, but an open file cannot be removed there
    fcntl = None

log = logging.getLogger(__name__)

# CXRKIT_CACHE, else the XDG cache folder (XDG_CACHE_HOME), else ~/.cache
DEFAULT_CACHE_DIR = Path(os.environ.get("CXRKIT_CACHE") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrkit")
DECODED = "decoded"


def cache_limit_bytes() -> int:
    """CXRKIT_CACHE_MAX_GB in bytes (default 20 GiB; `inf`: no limit)."""
    value = os.environ.get("CXRKIT_CACHE_MAX_GB", "20")
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise ConfigError(f"CXRKIT_CACHE_MAX_GB={value!r}: set it to a number of gigabytes "
                          "(e.g. 20; inf for no limit), or unset it for the default of 20")
    return sys.maxsize if math.isinf(gigabytes) else int(gigabytes * 2**30)


def _lock(path: Path, exclusive: bool = False, create: bool = False) -> IO[bytes]:
    """Open `path` (a new empty file with `create`) and lock it, shared for an entry in use,
    exclusive for a build, for as long as the returned file stays open. Without locks
    (Windows) the open file alone keeps it from being removed."""
    handle = open(path, "wb" if create else "rb")  # noqa: SIM115 (held: the lock lasts with it)
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    return handle


def _in_use(path: Path) -> bool:
    """Whether some process holds a lock on `path` (this one too, through another handle)."""
    if fcntl is None:
        return False
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
    except BlockingIOError:
        return True
    except FileNotFoundError:  # removed meanwhile: nobody's
        return False
    return False


def _prepare_or_none(args: tuple[str, int, bool]) -> np.ndarray | None:
    try:
        return load_prepared(*args)[0].numpy()
    except UnreadableImageError as e:
        log.warning("skipping unreadable image %s", e)
        return None


def _reserve(file: IO[bytes], path: Path, nbytes: int) -> None:
    """The entry's space taken on disk before any film is written into its mapping: a full
    disk is an error now, not a SIGBUS that kills the process without a word when a page of
    the mapped file finds no room (with no posix_fallocate: free space checked, file sparse)."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(file.fileno(), 0, nbytes)
        else:
            if shutil.disk_usage(path.parent).free < nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            file.truncate(nbytes)
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        file.close()
        path.unlink(missing_ok=True)
        raise no_space(e, path, "the decode cache", nbytes,
                       "free space, or put the cache on another disk (CXRKIT_CACHE=DIR, or "
                       "--set data.cache_dir=DIR), or train without it (--set data.cache=false)"
                       ) from e


def _prepared(jobs: list[tuple[str, int, bool]], workers: int) -> Iterator[np.ndarray | None]:
    """Each film decoded and resized, in order: by `workers` processes, or in this one (0:
    no process started, so a script on macOS or Windows needs no __main__ guard for it)."""
    if not workers:
        yield from map(_prepare_or_none, jobs)
        return
    with worker_pool(workers) as pool:
        yield from pool.map(_prepare_or_none, jobs, chunksize=32)


class DecodeCache:
    """Every sample decoded and resized once into a memory-mapped uint8 array.

    The file name hashes the paths, sizes, modification times and preprocessing,
    so a changed dataset or input size builds a new cache instead of reusing a stale one.
    While this object lives, its entry is locked against pruning.
    """

    def __init__(self, samples: Sequence[Sample], size: int, equalize: bool = False,
                 cache_dir: str | Path = DEFAULT_CACHE_DIR / DECODED, workers: int | None = None):
        self.size = size
        key = self._key(samples, size, equalize)
        cache_dir = Path(cache_dir)
        self.array_path = cache_dir / f"{key}.u8"
        self.valid_path = cache_dir / f"{key}.valid.json"
        try:
            self._held = _lock(self.valid_path)
        except (FileNotFoundError, NotADirectoryError):  # (no such entry, or no such folder)
            self._build(samples, equalize,
                        min(4, os.cpu_count() or 1) if workers is None else workers)
            self._held = _lock(self.valid_path)
        with contextlib.suppress(OSError):  # another user's cache, or a read-only one
            os.utime(self.valid_path)  # opened now: the last to go when the folder is pruned
        self.valid = _read_marker(self.valid_path)["valid"]  # one flag per film
        self.array = self._mapped()

    def _mapped(self) -> np.memmap:
        """The entry's films, read from its file as they are used."""
        return np.memmap(self.array_path, dtype=np.uint8, mode="r",
                         shape=(len(self.valid), self.size, self.size))

    def close(self) -> None:
        """Release the entry's lock now (else when this object is collected)."""
        if getattr(self, "_held", None) is not None:
            self._held.close()
            self._held = None

    def __getstate__(self) -> dict:
        """For DataLoader workers started by spawn (macOS, Windows, Python 3.14's forkserver):
        the lock stays with this process, and the array goes as its file's name (pickling a
        memmap copies its data: the whole cache into every worker)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_held", "array")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = self._mapped()

    @staticmethod
    def _key(samples: Sequence[Sample], size: int, equalize: bool) -> str:
        h = hashlib.sha256(f"{size}:{equalize}:{READER_VERSION}".encode())
        for s in samples:
            st = os.stat(s.path) if os.path.exists(s.path) else None
            h.update(f"{s.path}:{st and st.st_size}:{st and st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]

    def _build(self, samples: Sequence[Sample], equalize: bool, workers: int) -> None:
        cache_dir = self.array_path.parent
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a container's HOME that does not exist, or is read-only
            raise OSError(e.errno, f"the decode cache cannot be made in {cache_dir} "
                          f"({e.strerror}): set CXRKIT_CACHE to a writable folder, or "
                          "--set data.cache_dir=DIR, or train with --no-cache") from e
        prune(cache_dir, cache_limit_bytes() - len(samples) * self.size ** 2)  # room first
        tmp = self.array_path.with_name(f"{self.array_path.stem}.{os.getpid()}.tmp")  # its own
        building = _lock(tmp, exclusive=True, create=True)  # `clear` and `prune` leave it
        shape = (max(len(samples), 1), self.size, self.size)
        _reserve(building, tmp, math.prod(shape))
        log.info("decoding %d films at %d px into %s (%.0f MiB, kept for later runs; `cxr data "
                 "cache --clear` frees it)", len(samples), self.size, cache_dir,
                 math.prod(shape) / 2**20)
        array = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
        valid = []
        jobs = [(s.path, self.size, equalize) for s in samples]
        for i, pixels in enumerate(_prepared(jobs, workers)):
            valid.append(pixels is not None)
            if pixels is not None:
                array[i] = pixels
        array.flush()
        del array
        if fcntl is None:
            building.close()  # Windows renames no open file
        os.replace(tmp, self.array_path)  # atomic: a killed build leaves no half cache
        building.close()
        marker = tmp.with_suffix(".part")  # not a .tmp: nothing prunes it in between
        source = os.path.commonpath([s.path for s in samples]) if samples else ""
        marker.write_text(json.dumps({"valid": valid, "source": source}), encoding="utf-8")
        os.replace(marker, self.valid_path)  # last: an entry with a marker is whole

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
    source: str  # the folder the films share (a split's, typically)

    def describe(self) -> str:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used))
        return (f"{self.key}: {self.films} films at {self.size} px from {self.source or '?'}, "
                f"{self.nbytes / 2**20:,.0f} MiB, last opened {used}")


def _read_marker(path: Path) -> dict:
    """{"valid": [one bool per film], "source": their common folder}; entries built before
    the folder was recorded hold the list alone."""
    marker = json.loads(path.read_text(encoding="utf-8"))
    return marker if isinstance(marker, dict) else {"valid": marker, "source": ""}


def cache_entries(cache_dir: str | Path = DEFAULT_CACHE_DIR / DECODED) -> list[CacheEntry]:
    """The finished entries, least recently used first."""
    entries = []
    for valid in Path(cache_dir).glob("*.valid.json"):
        key = valid.name.removesuffix(".valid.json")
        array = valid.with_name(f"{key}.u8")
        try:
            marker = _read_marker(valid)
            nbytes, last_used = array.stat().st_size, valid.stat().st_mtime
        except (OSError, ValueError):  # half removed, or another process is removing it
            continue
        films = len(marker["valid"])
        size = math.isqrt(nbytes // max(films, 1))
        entries.append(CacheEntry(key, films, size, nbytes, last_used, marker["source"]))
    return sorted(entries, key=lambda e: e.last_used)


def _remove(cache_dir: Path, key: str) -> bool:
    """Remove an entry no process has open; whether it went."""
    valid = cache_dir / f"{key}.valid.json"
    if _in_use(valid):
        return False
    for path in (valid, cache_dir / f"{key}.u8"):  # the marker first: never one without data
        try:
            path.unlink(missing_ok=True)
        except OSError:  # Windows: open elsewhere
            return False
    return True


def _remove_killed_builds(cache_dir: Path) -> int:
    """Remove the .tmp files no build holds (a build killed part way); bytes freed."""
    freed = 0
    for leftover in cache_dir.glob("*.tmp"):
        try:
            size = leftover.stat().st_size
            if not _in_use(leftover):
                leftover.unlink()
                freed += size
        except OSError:  # its build finished meanwhile (or, on Windows, holds it open)
            pass
    return freed


def prune(cache_dir: str | Path, limit: int) -> list[CacheEntry]:
    """Remove the least recently opened entries no process has open until the folder holds
    at most `limit` bytes, and killed builds' leftovers. Returns the entries removed."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    _remove_killed_builds(cache_dir)
    entries = cache_entries(cache_dir)
    total = sum(e.nbytes for e in entries)
    removed = []
    for entry in entries:
        if total <= limit:
            break
        if _remove(cache_dir, entry.key):
            total -= entry.nbytes
            removed.append(entry)
    if removed:
        log.info("decode cache: removed %d least recently opened entries (%s MiB) to stay "
                 "under CXRKIT_CACHE_MAX_GB", len(removed),
                 f"{sum(e.nbytes for e in removed) / 2**20:,.0f}")
    return removed


def clear(cache_dir: str | Path = DEFAULT_CACHE_DIR / DECODED) -> int:
    """Remove every entry no process has open, and killed builds' leftovers; returns the
    bytes freed. Entries in use and builds under way stay (`cache_entries` lists them)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    freed = _remove_killed_builds(cache_dir)
    for entry in cache_entries(cache_dir):
        if _remove(cache_dir, entry.key):
            freed += entry.nbytes
    return freed
