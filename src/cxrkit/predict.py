"""Label X-ray files with a trained model: the API behind `cxr predict` and `cxr serve`.

    from cxrkit.predict import predict
    for p in predict("runs/lite0", ["films/", "new.dcm"]):
        print(p.path, p.label, p.probabilities, p.error)
    predict("runs/lite0", pil_image_or_array)  # films already in memory, as `<image 0>`

The model is a run folder (PyTorch, `cxrkit.inference.predict_logits`) or an ONNX export
folder (model.onnx + model.json, run by ONNX Runtime without importing PyTorch,
`cxrkit.onnx_backend`); both read and resize films with the same code. Probabilities use
the calibration chosen on validation; with two classes the prediction is the finding
(the model's recorded `positive_label`: PNEUMONIA where present, see `cxrkit.labels`)
when its probability reaches the run's validation-chosen threshold (0.5 if none), with
more classes the most probable label. A file that cannot be read gets a `Prediction`
with `error` set; it never stops the others.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import shlex
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from cxrkit.data.io import (
    SUPPORTED_SUFFIXES,
    Film,
    file_stamp,
    film_list,
    film_name,
    is_not_a_film,
    read_image,
    spreadsheet_text,
)
from cxrkit.data.layout import images_under, unrecognised_under
from cxrkit.labels import positive_label
from cxrkit.onnx_backend import FILE_NAMES, is_onnx_export, load_onnx, onnx_logits
from cxrkit.runs import (
    CALIBRATION,
    MODEL_WEIGHTS,
    Calibration,
    deployed_calibration,
    load_model,
    model_folder,
    read_calibration,
    refuse_unfinished,
)

# An overlay's PNG at zlib level 1: 4x faster to write than Pillow's default 6 (a 1024 x 870
# overlay: 0.042 s against 0.18 s, best of 5, idle), 8% larger; writing it was most of a
# Grad-CAM request's time.
CAM_PNG_COMPRESSION = 1

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
CAM_MAX_SIDE = 1024  # overlays of 3000-pixel films are shown and stored smaller


@dataclass
class Prediction:
    """One film's result: `label` (None if it could not be read, then `error` says why), the
    calibrated `probabilities` by label, the `threshold` on P(`positive_label`) that called
    it (None with more than two classes: the most probable), a `warning` when it is hardly a
    chest film, and `cam`, the Grad-CAM overlay written for it (`write_cams`)."""

    path: str
    label: str | None = None  # None when the file could not be read
    probabilities: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None  # on P(positive label); None with more than two classes
    positive_label: str | None = None  # the label the threshold is about (two classes)
    error: str | None = None  # why the file could not be read
    cam: str | None = None  # the Grad-CAM overlay written for this file
    warning: str | None = None  # readable, but hardly a chest film (`film_doubt`)
    weights_sha256: str | None = None  # the model's (`cxrkit.models.weights_digest`)

    @property
    def ok(self) -> bool:
        return self.error is None


def collect_images(paths: Film | Iterable[Film]) -> list[str | Film]:
    """Files as given, folders searched recursively for image files, globs expanded; images
    already in memory (PIL images, arrays) as they are.

    A file is taken whatever its suffix (DICOM is recognised by content); a
    missing path is kept so that it is reported as such. Order kept, no repeated path.
    """
    found: list[str | Film] = []
    empty: list[str] = []  # folders given that hold no image
    for arg in film_list(paths):
        if not isinstance(arg, str):
            found.append(arg)
            continue
        if arg.startswith("~"):  # quoted, or after --opt=, the shell left it
            arg = os.path.expanduser(arg)
        path = Path(arg)
        if is_not_a_film(path):  # named by a shell glob: folder/*
            log.info("passed over %s: the operating system's or a CD's file, not a film", arg)
        elif path.is_dir():
            # any name: predictions write one that is not UTF-8 escaped
            images = [str(p) for p in images_under(path, any_name=True)]
            empty += [] if images else [arg]
            found += images
            if skipped := unrecognised_under(path):
                log.warning("%d file(s) under %s have no image suffix and no DICOM, JPEG or PNG "
                            "header, and were skipped (e.g. %s); a DICOM file that starts in an "
                            "unusual way is read when named .dcm", len(skipped), path,
                            skipped[0])
        elif not path.exists() and any(c in arg for c in "*?["):
            found += collect_images(sorted(glob.glob(arg, recursive=True))) or [arg]
        else:
            found.append(arg)
    unique, seen = [], set()
    for film in found:
        if isinstance(film, str):  # an image in memory is never a repeat
            where = os.path.abspath(film)  # ./a.png and a.png are one file
            if where in seen:
                continue
            seen.add(where)
        unique.append(film)
    if unique and empty:  # beside other films (alone, `predict` refuses): a failed copy
        log.warning("no images found in %s: nothing of it was predicted", ", ".join(empty))
    return unique


def _warn_if_the_run_moved_on(export: Path, exported: Calibration) -> None:
    """An export folder inside a run (RUN/export) whose run has deployed another calibration
    since: the export alone still applies its own, which is said."""
    run = export.resolve().parent
    if not (run / MODEL_WEIGHTS).is_file() or not (run / CALIBRATION).is_file():
        return
    deployed = read_calibration(run)
    if not exported.decides_as(deployed):
        log.warning("%s holds an earlier calibration (threshold %.4f, %s) than its run's "
                    "deployed one (threshold %.4f, %s): `cxr export %s` updates it, or predict "
                    "with the run folder", export, exported.threshold, exported.describe(),
                    deployed.threshold, deployed.describe(), shlex.quote(str(run)))


def _torch_device(device: str | None):
    from cxrkit.inference import resolve_device  # PyTorch: not imported for an ONNX export

    return resolve_device(device)


class Predictor:
    """A model loaded once and ready to label files; one inference at a time (thread-safe).

    The lock matters for the server: Grad-CAM registers hooks on the model, and
    concurrent forward passes would see each other's hooks.
    """

    def __init__(self, model, calibration: Calibration, backend: str,
                 device: str | None = None, run: Path | None = None):
        self.model, self.calibration, self.backend = model, calibration, backend
        # A run's calibration.json can be re-chosen while a server runs: followed when it does.
        self.run = run
        self.folder = run  # what it was loaded from (an export has no run to follow)
        self.weights_sha256: str | None = None  # its weights' digest, where known
        self._calibration_stamp = file_stamp(run / CALIBRATION) if run else None
        self._calibration_lock = threading.Lock()
        self.spec = model.spec
        self.labels = self.spec.labels or [f"class_{i}" for i in range(self.spec.num_classes)]
        # ONNX Runtime runs on the CPU here; for PyTorch None means the best device there is.
        self.device = "cpu" if backend == "onnx" else _torch_device(device)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        rule = (f"P({self.positive_label}) >= {self.calibration.threshold:.3f}"
                if self.positive_label else "the most probable label")
        return (f"Predictor({self.folder or 'a model'}, {self.backend} on {self.device}, labels "
                f"{', '.join(self.labels)}, {rule})")

    @classmethod
    def load(cls, model_path: str | Path, backend: str | None = None,
             device: str | None = None) -> Predictor:
        """A run folder or an ONNX export folder; `backend` None picks what the folder holds."""
        if not isinstance(model_path, str | Path):  # a model already loaded, say
            raise TypeError(
                f"give the run folder or export folder, not a {type(model_path).__name__}: the "
                "folder holds the calibration (temperature, threshold) predictions apply. For a "
                "loaded model's raw logits: cxrkit.inference.predict_logits(model, films), then "
                "cxrkit.runs.read_calibration(run).probabilities(logits)")
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: give a run folder from `cxr train` "
                                    f"or an export folder from `cxr export`")
        folder = path.parent if path.is_file() else path
        is_run, is_export = (folder / MODEL_WEIGHTS).is_file(), is_onnx_export(folder)
        if not is_run and not is_export:
            refuse_unfinished(folder)
            raise FileNotFoundError(
                f"{path} is neither a cxrkit run nor an ONNX export: expected {MODEL_WEIGHTS} "
                f"(a run from `cxr train`) or {FILE_NAMES['onnx']} + model.json (from "
                f"`cxr export`) in it")
        backend = backend or ("torch" if is_run else "onnx")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "torch":
            if not is_run:
                raise ValueError(f"{path} is an ONNX export: use --backend onnx, or pass the run "
                                 f"folder it was exported from for --backend torch")
            from cxrkit.models import weights_digest

            model = load_model(path)
            digest = weights_digest(model)
            predictor = cls(model, deployed_calibration(path, digest), "torch", device,
                            run=model_folder(path))
            predictor.weights_sha256 = digest
            return predictor
        if not is_run:
            model, exported = load_onnx(folder)
            _warn_if_the_run_moved_on(folder, exported)
            predictor = cls(model, exported, "onnx")
            predictor.folder, predictor.weights_sha256 = folder, exported.weights_sha256
            return predictor
        export = model_folder(folder) / "export"  # the run's own export
        if not is_onnx_export(export):
            raise FileNotFoundError(f"no ONNX export in {export}: run `cxr export "
                                    f"{shlex.quote(str(path))}` "
                                    f"first, or use --backend torch")
        model, exported = load_onnx(export)
        deployed = deployed_calibration(path)  # the run's: a later evaluation may move it
        deployed.refuse_other_weights(
            exported.weights_sha256, export / FILE_NAMES["onnx"], "it is an export of other "
            f"weights than the run's; `cxr export {shlex.quote(str(path))}` exports them anew")
        if not exported.decides_as(deployed):
            log.warning("%s holds an earlier calibration (threshold %.4f, %s); using the "
                        "run's calibration.json (threshold %.4f, %s). `cxr export %s` updates "
                        "the export.", export, exported.threshold, exported.describe(),
                        deployed.threshold, deployed.describe(), shlex.quote(str(path)))
        predictor = cls(model, deployed, "onnx", run=model_folder(path))
        predictor.weights_sha256 = exported.weights_sha256
        return predictor

    def follow_calibration(self) -> None:
        """Take up a calibration the run deployed since this predictor was loaded (`cxr
        evaluate` while `cxr serve` runs), saying so."""
        if self.run is None:
            return
        with self._calibration_lock:  # one refresh at a time; readers take self.calibration whole
            stamp = file_stamp(self.run / CALIBRATION)
            if stamp == self._calibration_stamp:
                return
            deployed = read_calibration(self.run)  # only then is the new stamp kept
            self._calibration_stamp = stamp
            try:  # chosen for a model that replaced the one loaded here: not for this one
                deployed.refuse_other_weights(
                    self.weights_sha256, f"the model this server loaded from {self.run}",
                    "keeping the calibration of the model served")
            except ValueError as e:
                log.error("%s: %s; restart the server to serve the new model", self.run, e)
                return
            self.calibration = deployed
        log.info("%s: now using its newly deployed calibration (threshold %.4f, %s; %s)",
                 self.run, self.calibration.threshold, self.calibration.describe(),
                 self.calibration.chosen_on)

    def require_torch(self, what: str) -> None:
        if self.backend != "torch":
            raise ValueError(f"{what} needs the PyTorch model: use the run folder "
                             f"(--backend torch), not an ONNX export")

    @property
    def positive_label(self) -> str | None:
        """The label the threshold is about (two classes); None with more."""
        return positive_label(self.labels, self.spec.positive_label)

    def threshold(self, override: float | None = None,
                  calibration: Calibration | None = None) -> float | None:
        """The threshold on P(positive label) in use: `override`, else `calibration`'s (this
        predictor's); None (argmax) with more than two classes."""
        if len(self.labels) != 2:
            if override is not None:
                raise ValueError("a threshold applies to two-class models only; "
                                 f"this one has {len(self.labels)} classes (argmax is used)")
            return None
        if override is not None and not 0.0 <= override <= 1.0:
            raise ValueError(f"threshold {override} is not a probability: use a value in [0, 1]")
        return (calibration or self.calibration).threshold if override is None else override

    def predict(self, paths: Film | Sequence[Film], batch_size: int = 32,
                threshold: float | None = None, num_workers: int = 0) -> list[Prediction]:
        """One Prediction per path, in order; unreadable files carry their `error`, doubtful
        ones (thumbnails, strips, blank images) a `warning`."""
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size {batch_size}, num_workers {num_workers}: a batch "
                             "holds 1 film or more, and 0 workers read on this thread")
        paths = film_list(paths)
        names = [film_name(film, i) for i, film in enumerate(paths)]
        self.follow_calibration()
        calibration = self.calibration  # one for the whole request, whatever a refresh does
        threshold = self.threshold(threshold, calibration)
        doubts: dict[int, str] = {}
        with self._lock:
            if self.backend == "onnx":
                logits, failures = onnx_logits(self.model, paths, batch_size, num_workers,
                                               doubts=doubts)
            else:
                from cxrkit.inference import predict_logits

                logits, failures = predict_logits(self.model, paths, batch_size, num_workers,
                                                  self.device, doubts=doubts)
        reasons = {f.path: f.reason for f in failures}
        predictions = []
        for i, (name, row) in enumerate(zip(names, logits, strict=True)):
            if np.isnan(row).any():  # unreadable (by its row: two films may share a name)
                predictions.append(Prediction(name, error=reasons[name]))  # no threshold
                continue
            probs = calibration.probabilities(row[None])[0]
            index = int(calibration.classes(probs[None], self.labels, threshold,
                                            self.positive_label)[0])
            by_label = {k: float(p) for k, p in zip(self.labels, probs, strict=True)}
            predictions.append(Prediction(name, self.labels[index], by_label, threshold,
                                          self.positive_label, warning=doubts.get(i),
                                          weights_sha256=self.weights_sha256))
        return predictions

    def cam_overlays(self, predictions: Sequence[Prediction], batch_size: int = 32,
                     cam_label: str | None = None) -> list[Image.Image]:
        """Grad-CAM of each (readable) prediction's label (or of `cam_label`, the evidence
        for that class whatever was called), over its film (at most 1024 px)."""
        from cxrkit.explain import gradcam, overlay  # Grad-CAM pulls matplotlib: load on use

        self.require_torch("Grad-CAM")
        readable = [p for p in predictions if p.ok]
        if gone := [p.path for p in readable if not Path(p.path).is_file()]:
            raise ValueError(f"Grad-CAM overlays are drawn over files, and {gone[0]} is none "
                             "(an image given in memory, or a file removed since): save the "
                             "images first, or call `cxrkit.explain.gradcam` on them")
        with self._lock:
            heatmaps = gradcam(self.model, [p.path for p in readable],
                               [self.labels.index(cam_label or p.label) for p in readable],
                               batch_size=batch_size)
        overlays = []
        for p, heatmap in zip(readable, heatmaps, strict=True):
            film = read_image(p.path)
            film.thumbnail((CAM_MAX_SIDE, CAM_MAX_SIDE))
            overlays.append(overlay(film, heatmap))
        return overlays

    def write_cams(self, predictions: Sequence[Prediction], folder: str | Path,
                   batch_size: int = 32, cam_label: str | None = None) -> None:
        """Save FOLDER/<name>_cam.png for each readable prediction and note it in `.cam`
        (`cam_label`: the map of that class, not of the label called)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        readable = [p for p in predictions if p.ok]
        taken: set[str] = set()
        for p, image in self._overlays_by_batch(readable, batch_size, cam_label):
            stem = Path(p.path).stem if Path(p.path).suffix.lower() in SUPPORTED_SUFFIXES \
                else Path(p.path).name  # a DICOM UID keeps its last component
            name, n = f"{stem}_cam.png", 1
            while name in taken:  # the same file name in two folders
                n += 1
                name = f"{stem}_{n}_cam.png"
            taken.add(name)
            lines = self.cam_caption(p, cam_label)
            info = PngInfo()
            info.add_text("Description", "; ".join(lines))
            with_caption(image, lines, key=True).save(folder / name, pnginfo=info,
                                                      compress_level=CAM_PNG_COMPRESSION)
            p.cam = str(folder / name)

    def _overlays_by_batch(self, readable: Sequence[Prediction], batch_size: int,
                           cam_label: str | None) -> Iterator[tuple[Prediction, Image.Image]]:
        """(prediction, overlay) a batch at a time: a folder of thousands of films never
        holds more than one batch of overlays (each up to 1024 px RGB) in memory."""
        for start in range(0, len(readable), batch_size):
            chunk = readable[start:start + batch_size]
            yield from zip(chunk, self.cam_overlays(chunk, batch_size, cam_label), strict=True)

    def cam_caption(self, p: Prediction, cam_label: str | None = None) -> list[str]:
        """['map: Grad-CAM for PNEUMONIA, the label called', 'P(PNEUMONIA)=0.99, threshold
        0.156']: what a saved overlay shows, once it is apart from its CSV row."""
        shown = self.positive_label or p.label
        rule = f", threshold {p.threshold:.3f}" if p.threshold is not None else ""
        which = ("the label called" if cam_label in (None, p.label) else
                 f"as asked (called: {p.label})")
        return [f"map: Grad-CAM for {cam_label or p.label}, {which}",
                f"P({shown})={p.probabilities[shown]:.2f}{rule}"]


def with_caption(image: Image.Image, lines: list[str], key: bool = False) -> Image.Image:
    """`image` with a strip of text lines below it (`key`: and the overlay's colour key);
    the film keeps its pixels and its place (the top-left `image.size`), so the overlay
    stays registered to it."""
    from cxrkit.explain import overlay_key

    ends = ("Grad-CAM 0", "1 (this film's strongest)")
    size = max(10, image.height // 28)
    font = ImageFont.load_default(size=size)
    while max(font.getlength(t) for t in lines) > image.width - 8 and size > 8:  # narrow films
        size -= 1
        font = ImageFont.load_default(size=size)
    line_height = size + size // 3
    rows = len(lines) + key
    out = Image.new("RGB", (image.width, image.height + line_height * rows + 4), "black")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((4, image.height + 2 + i * line_height), text, fill="white", font=font)
    if key:  # heat 0 to 1 left to right, over film dark (top) to bright (bottom)
        top, left = image.height + 2 + len(lines) * line_height, 4 + font.getlength(ends[0]) + 4
        width = max(16, int(image.width - left - font.getlength(ends[1]) - 12))
        draw.text((4, top), ends[0], fill="white", font=font)
        out.paste(overlay_key().rotate(-90, expand=True).resize((width, size)),
                  (int(left), top + 1))
        draw.text((left + width + 4, top), ends[1], fill="white", font=font)
    return out


def predict(model_path: str | Path, paths: Film | Iterable[Film],
            backend: str | None = None,
            batch_size: int = 32, threshold: float | None = None,
            cam_dir: str | Path | None = None, num_workers: int = 0,
            device: str | None = None, cam_label: str | None = None) -> list[Prediction]:
    """Predict every image among `paths` (files, folders, globs, or images in memory: PIL
    images and arrays, named `<image i>`), in order:

        for p in predict("runs/quick", "films/"):
            print(p.path, p.label, p.probabilities, p.error or p.warning or "")

    `model_path`: a run folder or an ONNX export folder. An unreadable file is an entry with
    `.error`, never an exception. `cam_label`: the Grad-CAM maps (`cam_dir`) of that class,
    not of each label called. See the module docstring for the rest."""
    predictor = Predictor.load(model_path, backend, device)
    given = film_list(paths)  # once: `paths` may be a generator
    films = collect_images(given)
    if not films:
        raise FileNotFoundError(f"no images found in {' '.join(map(str, given)) or 'nothing'} "
                                "(JPEG, PNG or DICOM files, or folders holding them)")
    if cam_dir is not None:  # checked before the predictions, not after them
        predictor.require_torch("Grad-CAM")
        if any(not isinstance(film, str) for film in films):
            raise ValueError("Grad-CAM overlays are written for files: save the images first, "
                             "or call `cxrkit.explain.gradcam` on them")
        if Path(cam_dir).exists() and not Path(cam_dir).is_dir():
            raise ValueError(f"--cam {cam_dir} is a file: Grad-CAM overlays go into a folder; "
                             "give a folder's name (Python: cam_dir=...)")
    if cam_label is not None and (cam_dir is None or cam_label not in predictor.labels):
        raise ValueError(f"--cam-label {cam_label}: give one of the model's labels "
                         f"({', '.join(predictor.labels)}) with --cam DIR")
    predictions = predictor.predict(films, batch_size, threshold, num_workers)
    if cam_dir is not None:
        predictor.write_cams(predictions, cam_dir, batch_size, cam_label)
    return predictions


def write_predictions(predictions: Sequence[Prediction], path: str | Path) -> Path:
    """CSV (one column per class probability) or JSON, by the file's suffix."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"{path}: write predictions to a .csv or a .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([asdict(p) for p in predictions], indent=2), encoding="utf-8")
        return path
    labels = list(dict.fromkeys(k for p in predictions for k in p.probabilities))
    # a name that is not UTF-8 (a cp1252 name from a Windows zip) written with \udcfe escapes
    with open(path, "w", encoding="utf-8", errors="backslashreplace", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *[f"p_{k}" for k in labels], "threshold", "error",
                         "warning", "cam", "weights_sha256"])
        for p in predictions:
            probs = [f"{p.probabilities[k]:.6f}" if k in p.probabilities else "" for k in labels]
            writer.writerow([spreadsheet_text(p.path), spreadsheet_text(p.label or ""), *probs,
                             "" if p.threshold is None else p.threshold,
                             *map(spreadsheet_text, (p.error or "", p.warning or "", p.cam or "")),
                             p.weights_sha256 or ""])
    return path
