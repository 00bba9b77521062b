"""The decode cache folder: kept under its limit, least recently opened entries first, never
one in use or a build under way; shown and cleared by `cxr data cache`."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cxrkit.data.cache
from cxrkit.cli import app
from cxrkit.config import ConfigError
from cxrkit.data.cache import (
    DecodeCache,
    _lock,
    cache_entries,
    cache_limit_bytes,
    clear,
    prune,
)
from cxrkit.data.layout import load_source
from tests.conftest import make_kaggle_tree

FILMS = 12  # 6 per class


@pytest.fixture
def films(tmp_path, monkeypatch):
    monkeypatch.delenv("CXRKIT_CACHE_MAX_GB", raising=False)
    return load_source(make_kaggle_tree(tmp_path / "data", {"train": 6, "test": 1})).split("train")


def opened_at(cache: DecodeCache, seconds_ago: float) -> None:
    """Say when the entry was last opened (the filesystem's clock is too coarse to wait for)."""
    then = time.time() - seconds_ago
    os.utime(cache.valid_path, (then, then))


def test_a_new_entry_makes_room_by_removing_the_least_recently_opened(films, tmp_path,
                                                                      monkeypatch):
    folder = tmp_path / "decoded"
    opened_at(DecodeCache(films, 32, cache_dir=folder, workers=1), 200)
    medium = DecodeCache(films, 40, cache_dir=folder, workers=1)
    opened_at(medium, 100)
    DecodeCache(films, 32, cache_dir=folder, workers=1)  # opened again: now the most recent
    del medium  # closed: nothing holds these entries any more
    # room for the 32 and 48 px entries, not for the 40 px one beside them
    monkeypatch.setenv("CXRKIT_CACHE_MAX_GB", str((FILMS * (32**2 + 48**2) + 100) / 2**30))
    DecodeCache(films, 48, cache_dir=folder, workers=1)
    assert sorted(e.size for e in cache_entries(folder)) == [32, 48]
    assert [e.films for e in cache_entries(folder)] == [FILMS, FILMS]
    assert list(folder.glob("*.tmp")) == [] and list(folder.glob("*.part")) == []


def test_entries_in_use_stay_even_over_the_limit_and_are_not_rebuilt(films, tmp_path,
                                                                     monkeypatch):
    """A run's train and val entries, both open, over a limit of 0: neither removes the
    other (before, each build pruned the other, and every stage decoded both again)."""
    folder = tmp_path / "decoded"
    monkeypatch.setenv("CXRKIT_CACHE_MAX_GB", "0")
    train, val = DecodeCache(films[:8], 32, cache_dir=folder), DecodeCache(films[8:], 32,
                                                                           cache_dir=folder)
    built = {train.array_path.stat().st_ino, val.array_path.stat().st_ino}
    again = DecodeCache(films[:8], 32, cache_dir=folder), DecodeCache(films[8:], 32,
                                                                      cache_dir=folder)
    assert {c.array_path.stat().st_ino for c in again} == built  # reused, not rebuilt
    assert prune(folder, 0) == [] and clear(folder) == 0
    del train, val, again
    assert len(prune(folder, 0)) == 2 and cache_entries(folder) == []


def test_an_entry_another_process_has_open_is_not_removed(films, tmp_path):
    folder = tmp_path / "decoded"
    entry = DecodeCache(films, 32, cache_dir=folder)
    holder = subprocess.Popen(  # another run reading the same entry
        [sys.executable, "-c", "import sys, fcntl; h = open(sys.argv[1], 'rb'); "
         "fcntl.flock(h, fcntl.LOCK_SH); print('open', flush=True); sys.stdin.read()",
         str(entry.valid_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        del entry
        assert clear(folder) == 0 and len(cache_entries(folder)) == 1
    finally:
        holder.communicate("")
    assert clear(folder) == FILMS * 32**2 and cache_entries(folder) == []


def test_a_killed_builds_leftover_goes_and_a_build_under_way_stays(films, tmp_path):
    folder = tmp_path / "decoded"
    folder.mkdir()
    killed, building = folder / "a.111.tmp", folder / "b.222.tmp"
    killed.write_bytes(b"\0" * 100)
    held = _lock(building, exclusive=True, create=True)  # as a build holds its file
    prune(folder, 2**40)
    assert not killed.exists() and building.exists()
    assert clear(folder) == 0 and building.exists()
    held.close()
    assert clear(folder) == 0 and not building.exists()  # empty: 0 bytes freed


def test_the_limit_must_be_a_number_and_may_be_none(monkeypatch):
    monkeypatch.setenv("CXRKIT_CACHE_MAX_GB", "20GB")
    with pytest.raises(ConfigError, match=r"CXRKIT_CACHE_MAX_GB='20GB'.*number of gigabytes"):
        cache_limit_bytes()
    result = CliRunner().invoke(app, ["data", "cache"])
    assert result.exit_code == 2 and "CXRKIT_CACHE_MAX_GB='20GB'" in result.output
    monkeypatch.setenv("CXRKIT_CACHE_MAX_GB", "inf")
    assert cache_limit_bytes() == sys.maxsize


def test_cli_shows_and_clears_the_cache(films, tmp_path):
    folder = tmp_path / "decoded"
    opened_at(DecodeCache(films, 32, cache_dir=folder, workers=1), 100)
    DecodeCache(films, 40, cache_dir=folder, workers=1)
    shown = CliRunner().invoke(app, ["data", "cache", "--dir", str(folder)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()  # the most recently opened first
    assert f"{FILMS} films at 40 px from {films[0].path.rsplit('/train/', 1)[0]}/train," \
        in lines[0] and f"{FILMS} films at 32 px" in lines[1]
    assert f"{folder}: 2 entries" in shown.output and "(at most 20 GiB)" in shown.output
    cleared = CliRunner().invoke(app, ["data", "cache", "--dir", str(folder), "--clear"])
    assert cleared.exit_code == 0 and f"in {folder}" in cleared.output
    assert list(folder.iterdir()) == []
    assert "0 entries" in CliRunner().invoke(app, ["data", "cache", "--dir", str(folder)]).output


def test_films_are_decoded_again_when_the_reader_changes(films, tmp_path, monkeypatch):
    """A reader that decodes some files otherwise (e.g. deep films stretched anew) must not
    reuse images the earlier one cached."""
    import cxrkit.data.cache as cache

    folder = tmp_path / "decoded"
    first = DecodeCache(films, 32, cache_dir=folder, workers=1)
    assert DecodeCache(films, 32, cache_dir=folder, workers=1).array_path == first.array_path
    monkeypatch.setattr(cache, "READER_VERSION", cache.READER_VERSION + 1)
    again = DecodeCache(films, 32, cache_dir=folder, workers=1)
    assert again.array_path != first.array_path and len(cache_entries(folder)) == 2


def test_a_cache_sent_to_a_spawned_worker_reads_its_file_not_a_copy(films, tmp_path):
    """macOS and Windows start loader workers by spawn, pickling the dataset: a memmap
    pickles its data, so every worker got the whole cache in memory."""
    cache = DecodeCache(films, 32, cache_dir=tmp_path / "decoded", workers=1)
    sent = pickle.dumps(cache)
    assert len(sent) < cache.array.nbytes  # the file's name went, not its pixels
    received = pickle.loads(sent)
    assert received.array.filename == cache.array.filename
    assert np.array_equal(received.array, cache.array)
    assert getattr(received, "_held", None) is None  # the lock stays with this process


def test_a_cache_built_with_no_workers_starts_no_process(films, tmp_path, monkeypatch):
    """data.num_workers 0 still built the cache in a pool of processes: a script on macOS
    without a __main__ guard then failed however few workers it asked for."""
    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(cxrkit.data.cache, "worker_pool", no_pool)
    cache = DecodeCache(films, 32, cache_dir=tmp_path / "decoded", workers=0)
    assert all(cache.valid) and cache.array.shape == (FILMS, 32, 32) and cache.array.any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_pools_workers_die_with_their_parent(tmp_path):
    """A cache build or an audit killed outright (the OOM killer, kill -9) left its workers
    running for good, holding the run's training lock: the resume was then refused."""
    script = tmp_path / "parent.py"
    script.write_text("""
import os, time
from cxrkit.data.pool import worker_pool
pool = worker_pool(1)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 60)
time.sleep(60)
""", encoding="utf-8")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists()  # (an orphan is init's to reap, at once)


@pytest.mark.parametrize("start", ["fork", "forkserver", "spawn"])
def test_a_pool_works_however_its_workers_start(tmp_path, start):
    """Under forkserver (Python 3.14's default on Linux) each worker's parent is the server,
    not the pool's process: a check of the parent's id made every worker exit at once."""
    result = subprocess.run([sys.executable, "-c", f"""
import multiprocessing
from cxrkit.data.pool import worker_pool
if __name__ == "__main__":
    multiprocessing.set_start_method({start!r})
    with worker_pool(2) as pool:
        print(list(pool.map(abs, [-1, -2, -3])))
"""], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "[1, 2, 3]", result.stderr[-2000:]


def test_the_cache_follows_xdg_and_an_unwritable_place_says_the_ways_out(films, tmp_path):
    """XDG_CACHE_HOME was ignored; a container's missing HOME gave a bare `[Errno 2] No such
    file or directory: '/nonexistent'`."""
    where = subprocess.run(
        [sys.executable, "-c", "from cxrkit.data.cache import DEFAULT_CACHE_DIR as d; print(d)"],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "CXRKIT_CACHE": ""},
        capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(tmp_path / "xdg" / "cxrkit")
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder would go")
    with pytest.raises(OSError, match=r"the decode cache cannot be made in .*file.* set "
                                      r"CXRKIT_CACHE to a writable folder, or --set "
                                      r"data.cache_dir=DIR, or train with --no-cache"):
        DecodeCache(films, 32, cache_dir=blocked / "cache", workers=1)
