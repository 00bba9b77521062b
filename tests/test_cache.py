"""The decode cache folder: kept under its limit, least recently used first; shown and
cleared by `cxr data cache`."""

from __future__ import annotations

import os
import time

import pytest
from typer.testing import CliRunner

from cxrkit.cli import app
from cxrkit.data.cache import DecodeCache, cache_entries, cache_limit_bytes, prune
from cxrkit.data.layout import load_source
from tests.conftest import make_kaggle_tree

FILMS = 12  # 6 per class


@pytest.fixture
def films(tmp_path):
    return load_source(make_kaggle_tree(tmp_path / "data", {"train": 6, "test": 1})).split("train")


def build(films, size, folder) -> DecodeCache:
    cache = DecodeCache(films, size, cache_dir=folder, workers=1)
    time.sleep(0.05)  # the next use is later by more than the filesystem's clock resolution
    return cache


def test_a_full_cache_drops_its_least_recently_used_entry(films, tmp_path, monkeypatch):
    folder = tmp_path / "decoded"
    small, medium = build(films, 32, folder), build(films, 40, folder)
    build(films, 32, folder)  # used again: now more recent than the 40 px entry
    # room for the 32 and 48 px entries, not for the 40 px one beside them
    limit = FILMS * (32 * 32 + 48 * 48) + 100
    monkeypatch.setenv("CXRKIT_CACHE_MAX_GB", str(limit / 2**30))
    large = build(films, 48, folder)
    assert [e.size for e in cache_entries(folder)] == [32, 48]  # least recently used first
    assert not medium.array_path.exists() and not medium.valid_path.exists()
    assert small.array_path.exists() and large.array_path.exists()
    assert [e.films for e in cache_entries(folder)] == [FILMS, FILMS]
    # an entry in use is never removed, even alone over the limit
    assert prune(folder, 0, keep=large.array_path.stem) and cache_entries(folder)[0].size == 48


def test_a_killed_builds_leftover_goes_after_a_day(films, tmp_path):
    folder = tmp_path / "decoded"
    build(films, 32, folder)
    old, fresh = folder / "killed.tmp", folder / "building.tmp"
    old.write_bytes(b"\0" * 100)
    fresh.write_bytes(b"\0" * 100)
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    prune(folder, 2**40)
    assert not old.exists() and fresh.exists()
    assert len(cache_entries(folder)) == 1  # under the limit: every entry stays


def test_a_limit_that_is_not_a_number_says_how_to_set_it(monkeypatch):
    monkeypatch.setenv("CXRKIT_CACHE_MAX_GB", "20GB")
    with pytest.raises(ValueError, match=r"CXRKIT_CACHE_MAX_GB='20GB'.*number of gigabytes"):
        cache_limit_bytes()


def test_cli_shows_and_clears_the_cache(films, tmp_path):
    folder = tmp_path / "decoded"
    build(films, 32, folder)
    build(films, 40, folder)
    shown = CliRunner().invoke(app, ["data", "cache", "--dir", str(folder)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert f"{FILMS} films at 40 px" in lines[0] and f"{FILMS} films at 32 px" in lines[1]
    assert f"{folder}: 2 entries" in shown.output and "of at most 20 GB" in shown.output
    cleared = CliRunner().invoke(app, ["data", "cache", "--dir", str(folder), "--clear"])
    assert cleared.exit_code == 0 and f"in {folder}" in cleared.output
    assert list(folder.iterdir()) == []
    assert "0 entries" in CliRunner().invoke(app, ["data", "cache", "--dir", str(folder)]).output
