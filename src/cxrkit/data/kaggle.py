"""The Kaggle dataset `paultimothymooney/chest-xray-pneumonia`, through kagglehub.

kagglehub does the credential handling (KAGGLE_USERNAME/KAGGLE_KEY,
~/.kaggle/kaggle.json, KAGGLE_API_TOKEN) and caching (KAGGLEHUB_CACHE). The
handle is pinned to a version: that makes runs reproducible, and a pinned handle
resolves from kagglehub's cache with no network at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
KAGGLE_VERSION = 2


class KaggleDownloadError(RuntimeError):
    """The dataset could not be fetched; the message says what to set or do instead."""


def kaggle_handle(version: int | None = KAGGLE_VERSION) -> str:
    return f"{KAGGLE_DATASET}/versions/{version}" if version else KAGGLE_DATASET


def download_kaggle(dest: str | Path | None = None, version: int | None = KAGGLE_VERSION,
                    force: bool = False) -> Path:
    """Fetch (or find in kagglehub's cache) the dataset and return its folder."""
    import kagglehub

    handle = kaggle_handle(version)
    try:
        path = kagglehub.dataset_download(
            handle, force_download=force, output_dir=str(dest) if dest else None
        )
    except Exception as e:  # kagglehub raises many types: auth, HTTP, connection, ...
        raise KaggleDownloadError(
            f"could not download {handle} from Kaggle ({type(e).__name__}: {e}).\n"
            "Set Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN, or "
            "~/.kaggle/kaggle.json from kaggle.com > Settings > API) and check the network; "
            "or download the data yourself and pass its local folder instead of `kaggle`, "
            "e.g. `cxr data audit path/to/chest_xray`."
        ) from e
    return Path(path)


def resolve_data(data: str | Path) -> Path:
    """A data argument: `kaggle` (download or cache) or a local path (folder or CSV)."""
    if str(data).lower() == "kaggle":
        folder = download_kaggle()
        # said: a notebook that left out data= gets Kaggle's dataset, downloaded if need be
        log.info("data: Kaggle's %s (kagglehub: downloaded on first use, then from its "
                 "cache), %s", kaggle_handle(), folder)
        return folder
    return Path(data).expanduser()
