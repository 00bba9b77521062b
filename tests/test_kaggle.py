"""The Kaggle dataset through kagglehub's real cache, offline.

The cache is seeded the way kagglehub 1.x stores a downloaded dataset (see
kagglehub/cache.py): the files under
``$KAGGLEHUB_CACHE/datasets/<owner>/<dataset>/versions/<N>/`` and the completion
marker ``$KAGGLEHUB_CACHE/datasets/<owner>/<dataset>/<N>.complete``. Every test
runs with no credentials and an HTTP(S) proxy on a closed local port, so any
attempt to reach Kaggle fails at once instead of downloading 2 GB.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrkit.adapt import target_images
from cxrkit.cli import app
from cxrkit.data.kaggle import (
    KAGGLE_DATASET,
    KAGGLE_VERSION,
    KaggleDownloadError,
    download_kaggle,
    resolve_data,
)
from cxrkit.data.layout import load_source
from tests.conftest import make_kaggle_zip_tree

CREDENTIAL_VARS = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN",
                   "KAGGLE_KERNEL_RUN_TYPE", "NO_PROXY", "no_proxy")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch) -> Path:
    """An empty kagglehub cache, no credentials anywhere, and no way out to the network."""
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kaggle/access_token
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "home" / ".kaggle"))
    cache = tmp_path / "kagglehub"
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    proxy = f"http://127.0.0.1:{closed_port()}"
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    return cache


def seed_cache(cache: Path, version: int = KAGGLE_VERSION, complete: bool = True) -> Path:
    """The extracted Kaggle zip in kagglehub's cache; returns the version folder."""
    dataset = cache / "datasets" / KAGGLE_DATASET
    folder = make_kaggle_zip_tree(dataset / "versions" / str(version))
    if complete:
        (dataset / f"{version}.complete").touch()
    return folder


def test_pinned_version_resolves_from_the_cache_offline(kaggle_cache, caplog):
    folder = seed_cache(kaggle_cache)
    assert download_kaggle() == folder
    with caplog.at_level("INFO", logger="cxrkit"):
        assert resolve_data("kaggle") == folder
    # said, for a notebook that left out data= and gets Kaggle's dataset
    assert (f"data: Kaggle's paultimothymooney/chest-xray-pneumonia/versions/2 (kagglehub: "
            f"downloaded on first use, then from its cache), {folder}") in caplog.text
    assert resolve_data("Kaggle") == folder


def test_kaggle_is_a_data_source_everywhere_in_the_api(kaggle_cache):
    """The README: everywhere a data argument is taken, `kaggle` works (not only in the CLI)."""
    folder = seed_cache(kaggle_cache)
    source = load_source("kaggle")
    assert source.layout == "kaggle" and all(s.path.startswith(str(folder))
                                             for s in source.samples)
    assert target_images("kaggle") == [s.path for s in source.split("test")]


def test_local_paths_pass_through(tmp_path):
    assert resolve_data(tmp_path / "data") == tmp_path / "data"
    assert resolve_data("~/x") == Path.home() / "x"


def assert_actionable(message: str) -> None:
    for hint in ("KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "local folder"):
        assert hint in message


@pytest.mark.timeout(60)  # a retry loop against the network would hang here
@pytest.mark.parametrize("version", [None, 3], ids=["latest", "uncached-version"])
def test_no_network_and_no_cache_fails_fast_and_says_what_to_do(kaggle_cache, version):
    seed_cache(kaggle_cache)  # version 2 is there, but it is not what is asked for
    with pytest.raises(KaggleDownloadError) as error:
        download_kaggle(version=version)
    assert_actionable(str(error.value))


def test_an_incomplete_download_is_not_used(kaggle_cache):
    seed_cache(kaggle_cache, complete=False)  # files without kagglehub's completion marker
    with pytest.raises(KaggleDownloadError):
        download_kaggle()


def test_cli_download_prints_the_folder_last(kaggle_cache):
    folder = seed_cache(kaggle_cache)
    result = CliRunner().invoke(app, ["data", "download"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(folder)


def test_cli_download_error_is_a_message_not_a_traceback(kaggle_cache):
    result = CliRunner().invoke(app, ["data", "download", "--version", "0"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "error:" in result.stderr
    assert_actionable(" ".join(result.stderr.split()))  # Rich wraps long lines


def test_cli_audit_kaggle_works_from_the_cache(kaggle_cache, tmp_path):
    seed_cache(kaggle_cache)
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["data", "audit", "kaggle", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    assert report["counts"] == {split: {"NORMAL": n, "PNEUMONIA": n}
                                for split, n in (("train", 6), ("val", 2), ("test", 2))}
    # the nested copy would have made every file a byte-identical duplicate
    assert report["exact_duplicates"] == []
    assert any("nested duplicate" in n for n in report["notes"])
    assert any("__MACOSX" in n for n in report["notes"])
