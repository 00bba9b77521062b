"""Run an ONNX export (`cxr export`) with ONNX Runtime, without PyTorch.

    EXPORT/model.onnx   float32 "image" [N, C, S, S] -> float32 "logits" [N, K]
    EXPORT/model.json   the sidecar: `ModelSpec` fields, threshold, temperature, bias

`cxr predict EXPORT` and `cxr serve EXPORT` come here: nothing on this path imports
PyTorch, torchvision or timm, whose imports take seconds (most of a one-film prediction's
time). Films are read and resized by the code every model uses
(`cxrkit.data.io.read_for_model`); scaling and normalising are `ModelInput`'s, in NumPy
(a test holds the two to the same numbers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from cxrkit.data.io import Failure, Film, film_name, read_for_model
from cxrkit.progress import ScoringProgress
from cxrkit.runs import Calibration, finite_logits
from cxrkit.spec import ModelSpec

log = logging.getLogger(__name__)

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
SIDECAR = "model.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def is_onnx_export(path: str | Path) -> bool:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    return (folder / FILE_NAMES["onnx"]).is_file() and (folder / SIDECAR).is_file()


def read_sidecar(path: str | Path) -> tuple[ModelSpec, Calibration]:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    try:
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
        spec = ModelSpec.from_dict(meta)
        bias = meta.get("bias", [])  # exports before the bias had none
        threshold = meta["threshold"]  # null with more than two classes: 0.5, never applied
        threshold = 0.5 if threshold is None and spec.num_classes > 2 else threshold
        calibration = Calibration(threshold, meta["temperature"],
                                  meta.get("threshold_chosen_on", "default"),
                                  bias=bias if any(bias) else [],  # zeros: no bias, as in the run
                                  weights_sha256=meta.get("weights_sha256"))  # the export's
        if len(calibration.check().bias) not in (0, spec.num_classes):
            raise ValueError(f"a bias of {len(calibration.bias)} numbers for "
                             f"{spec.num_classes} classes")
        return spec, calibration
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / SIDECAR} is damaged ({type(e).__name__}: {e}): export the "
                         "run again (`cxr export RUN`)") from None


def model_input(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 [N, 1, S, S] -> float32 [N, C, S, S] as the network takes it: scaled to [0, 1],
    the gray channel repeated, normalised per channel; `ModelInput`'s operations in its order."""
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    x = np.repeat(x, spec.in_chans, axis=1) if x.shape[1] != spec.in_chans else x
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std)


class OnnxClassifier:
    """An exported model on ONNX Runtime (CPU): normalised float32 batches -> logits."""

    def __init__(self, path: str | Path, spec: ModelSpec):
        import onnxruntime as ort  # imported here: only this backend needs it

        self.spec = spec
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: image})[0]


def load_onnx(path: str | Path) -> tuple[OnnxClassifier, Calibration]:
    """An export folder (model.onnx + model.json) -> the runnable model and its calibration."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    spec, calibration = read_sidecar(folder)
    model = OnnxClassifier(folder / FILE_NAMES["onnx"], spec)
    _refuse_another_exports_sidecar(folder, model.session.get_modelmeta().custom_metadata_map)
    return model, calibration


# What a recalibration changes: between 0f9a7de and 9f0551e, `cxr export --format
# torchscript` after one updated model.json but not model.onnx's copy of these.
CALIBRATION_KEYS = {"threshold", "temperature", "bias", "threshold_chosen_on"}


def _refuse_another_exports_sidecar(folder: Path, embedded: dict[str, str]) -> None:
    """model.onnx carries the sidecar it was exported with (`cxr export`): a model.json of
    another export, or edited by hand, would apply its labels, preprocessing or weights'
    name to these weights unnoticed (refused); a calibration other than the embedded one is
    said and model.json's applied. Nothing to compare in a file without our sidecar."""
    inside = {}
    for key, value in embedded.items():
        try:
            inside[key] = json.loads(value)
        except ValueError:  # another tool's entry
            continue
    beside = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    differ = sorted(key for key in inside.keys() & beside.keys() if inside[key] != beside[key])
    if not differ:
        return
    first = differ[0]
    said = (f"{folder / SIDECAR} and {folder / FILE_NAMES['onnx']} disagree on "
            f"{', '.join(differ)} (e.g. {first}: {beside[first]!r} beside, {inside[first]!r} "
            "inside the model)")
    if set(differ) <= CALIBRATION_KEYS:
        log.warning("%s: using model.json's. It was edited, or the export was updated after a "
                    "recalibration by a cxrkit that left model.onnx's copy behind; `cxr export "
                    "RUN` makes them one again", said)
        return
    raise ValueError(f"{said}: model.json was edited, or comes from another export. Export "
                     "the run again (`cxr export RUN`) rather than edit either")


def onnx_logits(model: OnnxClassifier, paths: Sequence[Film], batch_size: int = 32,
                num_workers: int = 0,
                doubts: dict[int, str] | None = None) -> tuple[np.ndarray, list[Failure]]:
    """Logits [N, C] for `paths` (NaN rows for unreadable files) and the failures; films read
    on this thread, or by `num_workers` threads (decoders release the GIL) when it is 2 or
    more; `doubts`, when given, is filled as `cxrkit.inference.predict_logits` fills it."""
    spec = model.spec
    read = partial(read_for_model, size=spec.input_size, equalize=spec.equalize,
                   doubts=doubts is not None)
    for film in paths:  # a lazy PIL image, loaded by two threads at once, fails in one
        if isinstance(film, Image.Image):
            film.load()
    logits = np.full((len(paths), spec.num_classes), np.nan, dtype=np.float32)
    failures: list[Failure] = []
    progress = ScoringProgress(len(paths))
    with ThreadPoolExecutor(num_workers) if num_workers > 1 else nullcontext() as pool:
        for start in range(0, len(paths), batch_size):  # a batch read at a time: bounded memory
            indices = range(start, min(start + batch_size, len(paths)))
            progress.done(len(indices))
            batch_films = [paths[i] for i in indices]
            films = pool.map(read, batch_films) if pool else map(read, batch_films)
            readable, batch = [], []
            for i, (pixels, reason, doubt) in zip(indices, films, strict=True):
                if pixels is None:
                    failures.append(Failure(film_name(paths[i], i), reason))
                    continue
                if doubt and doubts is not None:
                    doubts[i] = doubt
                readable.append(i)
                batch.append(pixels)
            if batch:
                logits[readable] = finite_logits(model(model_input(np.stack(batch), spec)),
                                                 readable, paths)
    return logits, failures
