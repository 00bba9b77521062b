"""The run folder: one place for everything a training run produced.

    RUN/config.yaml          resolved training config
    RUN/split.csv            the exact train/val/test manifest used
    RUN/labels.json          class names in index order
    RUN/best.ckpt, last.ckpt Lightning checkpoints (last.ckpt resumes a run)
    RUN/model.safetensors    best weights, loadable without Lightning
    RUN/model.json           ModelSpec: architecture, input size, mean, std, labels
                             (an ensemble's also lists its members' specs)
    RUN/calibration.json     threshold, temperature (and bias) chosen by `cxr evaluate`
    RUN/metrics.csv, tb/, training_curves.png, eval/<split>/, report.html

Reading a run's spec and calibration imports no PyTorch (an ONNX export is used without it);
saving and loading weights import it when called.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from cxrkit.data.io import film_name, written_whole
from cxrkit.labels import positive_index
from cxrkit.spec import ModelSpec

if TYPE_CHECKING:
    from cxrkit.models import Classifier
    from cxrkit.models.ensemble import Ensemble

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"
TRAINING_LOCK = ".training.lock"  # held by the process training the run
EVALUATION_LOCK = ".evaluation.lock"  # held by the process evaluating it
MODEL_SPEC = "model.json"
SPEC_KEY = "cxrkit_model"  # model.json again, in the safetensors file's metadata
CALIBRATION = "calibration.json"
LABELS = "labels.json"
EVAL_DIR = "eval"  # RUN/eval/<split>/: metrics.json, predictions.csv, figures
ADAPTATION = "adaptation.json"  # what `cxr adapt` did to a run's model
SKIPPED = "skipped_files.csv"  # the films training could not read
CONFIG = "config.yaml"  # the resolved training config
SPLIT = "split.csv"  # every film of the run: path, label, split, patient
VAL_METRICS = "val_metrics.json"  # the kept model scored on validation
METRICS = "metrics.json"  # an evaluation's numbers: RUN/eval/<name>/metrics.json
PREDICTIONS = "predictions.csv"  # an evaluation's films, one row each
TRAINED_CONFIG = ".trained_config.json"  # best.ckpt's config, for when the checkpoints go
RUN_LOG = "run.log"  # the log lines of each training, resume and `cxr run` of the run


def softmax(logits: np.ndarray, temperature: float = 1.0,
            bias: Sequence[float] | None = None) -> np.ndarray:
    """softmax(logits / temperature + bias) per row; no bias: zero."""
    z = logits / temperature + (np.asarray(bias) if bias else 0.0)
    z = z - np.nanmax(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def finite_logits(rows: np.ndarray, indices: Sequence[int], films: Sequence) -> np.ndarray:
    """`rows`, the logits of films[indices], refused if any is NaN or infinite: NaN rows mean
    unreadable films, and a model that gives them has damaged weights."""
    if not np.isfinite(rows).all():
        first = indices[int(np.flatnonzero(~np.isfinite(rows).all(1))[0])]
        raise ValueError(f"the model gives NaN or infinite scores for "
                         f"{film_name(films[first], first)}: its weights are damaged or its "
                         "training diverged")
    return rows


@dataclass
class Calibration:
    """Decision threshold on P(positive class), and how logits become probabilities:
    softmax(logits / temperature + bias), chosen on validation (or the deployment site's
    labelled films)."""

    threshold: float = 0.5
    temperature: float = 1.0
    chosen_on: str = "default"
    # The `evaluate_run` options that made this choice (target_sensitivity, framing_threshold,
    # calibrate_on), so that a later evaluation without them re-applies them instead of
    # quietly deploying a different operating point. Empty: Youden's J on validation.
    chosen_with: dict = field(default_factory=dict)
    # One number per class, added after the temperature; empty: none. Fitted only on the
    # deployment site's films (`--calibrate-on`), whose class mix it learns.
    bias: list[float] = field(default_factory=list)
    # The weights it was chosen for (`cxrkit.models.weights_digest`); None: written by an
    # older cxrkit. Applied to other weights, its numbers mean nothing (`refuse_other_weights`).
    weights_sha256: str | None = None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """[N, classes] logits -> calibrated probabilities."""
        return softmax(logits, self.temperature, self.bias)

    def classes(self, probs: np.ndarray, labels: list[str], threshold: float | None = None,
                positive_label: str | None = None) -> np.ndarray:
        """Each row's class as deployed: of two, the finding (`positive_index`, given the
        model's recorded `positive_label`) where its probability reaches `threshold` (default:
        this calibration's); else the most probable."""
        threshold = self.threshold if threshold is None else threshold
        if len(labels) != 2 or threshold is None:
            return probs.argmax(1)
        positive = positive_index(labels, positive_label)
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)

    def decides_as(self, other: Calibration) -> bool:
        """Whether `other` turns logits into the same probabilities and labels."""
        return ((self.threshold, self.temperature, list(self.bias))
                == (other.threshold, other.temperature, list(other.bias)))

    def check(self) -> Calibration:
        """Itself, once its numbers are usable: a threshold in 0..1, a temperature above 0,
        finite numbers (a temperature of 0 or NaN made every probability NaN, every film
        then called the negative class). TypeError or ValueError otherwise."""
        numbers = [self.threshold, self.temperature, *self.bias]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in numbers):
            raise TypeError("threshold, temperature and bias must be numbers")
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError("threshold, temperature and bias must be finite")
        if not 0 <= self.threshold <= 1 or self.temperature <= 0:
            raise ValueError("a threshold in 0..1 and a temperature above 0 are needed")
        return self

    def describe(self) -> str:
        """'temperature 1.23', or with a bias 'temperature 1.23, bias (+0.00, +0.84)' (one
        number per class)."""
        text = f"temperature {self.temperature:.2f}"
        if not self.bias:
            return text
        return f"{text}, bias ({', '.join(f'{b:+.2f}' for b in self.bias)})"

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "temperature": self.temperature,
                "bias": self.bias, "chosen_on": self.chosen_on, "chosen_with": self.chosen_with,
                "weights_sha256": self.weights_sha256}

    def refuse_other_weights(self, digest: str | None, weights: str | Path, fix: str) -> None:
        """ValueError where this calibration was chosen for weights other than `digest`
        (those in `weights`): a model replaced since its evaluation (a file copied over,
        another run's export) would apply another model's threshold and temperature."""
        if self.weights_sha256 and digest and self.weights_sha256 != digest:
            raise ValueError(
                f"the deployed calibration was chosen for other weights than {weights} holds "
                f"(sha256 {self.weights_sha256[:12]}... against {digest[:12]}...): {fix}")


def read_run_config(folder: Path) -> dict:
    """RUN/config.yaml as the plain mapping it holds ({} where there is none, or it is not
    one): for what only reads or shows it, not to train with (`TrainConfig.load`)."""
    try:
        config = yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def weights_file_digest(folder: Path) -> str:
    """SHA-256 of RUN/model.safetensors' bytes, read without PyTorch: which weights file an
    evaluation scored (metrics.json's `weights_file_sha256`) and the logits cache keys on."""
    with open(folder / MODEL_WEIGHTS, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_model(model: Classifier | Ensemble, folder: str | Path) -> Path:
    """Weights (safetensors), model.json and labels.json into `folder`; `load_model` reads
    them back."""
    from safetensors.torch import save

    from cxrkit.models.ensemble import Ensemble

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    described = model.describe() if isinstance(model, Ensemble) else model.spec.to_dict()
    # model.json inside the weights file too: `load_model` refuses a model.json that is not
    # theirs (edited labels called every NORMAL film PNEUMONIA).
    weights, data = folder / MODEL_WEIGHTS, save(state, {SPEC_KEY: json.dumps(described)})
    # The same weights again (a finished run resumed) keep the file and its time, which the
    # evaluation's logits cache keys on: re-running a finished run scores no film again.
    if not (weights.is_file() and weights.read_bytes() == data):
        with written_whole(weights) as partial:
            partial.write_bytes(data)
    (folder / MODEL_SPEC).write_text(json.dumps(described, indent=2), encoding="utf-8")
    (folder / LABELS).write_text(json.dumps(model.spec.labels, indent=2), encoding="utf-8")
    return folder / MODEL_WEIGHTS


def model_folder(path: str | Path) -> Path:
    """A run folder, or a model.safetensors file, -> the folder holding model.json."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / MODEL_WEIGHTS).is_file() or not (folder / MODEL_SPEC).is_file():
        refuse_unfinished(folder)
        raise FileNotFoundError(
            f"{path} is not a cxrkit run: expected {MODEL_WEIGHTS} and {MODEL_SPEC} in "
            f"{folder}. Train one with `cxr train`, or pass the folder `cxr train` printed."
        )
    return folder


@contextmanager
def logged_to(folder: Path) -> Iterator[None]:
    """The log lines said meanwhile also appended to RUN/run.log: a closed terminal or a lost
    scroll-back keeps no record of the warnings, the resumes and the results. Once, however
    nested (`cxr run` trains, then evaluates)."""
    path = os.path.abspath(folder / RUN_LOG)  # as FileHandler names it (no "..")
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextmanager
def training_lock(folder: Path, held_here: bool = True) -> Iterator[None]:
    """One process trains a run folder at a time (of a distributed job, rank 0 holds it:
    `held_here` is False on the others): two would write the same checkpoints and logs over
    each other. The lock goes with the process, however it ends."""
    if not held_here:
        yield
        return
    with _held(folder / TRAINING_LOCK, "training", f"{folder} is being trained by another "
               f"process now: wait for it to end (or stop it); if it was interrupted, `cxr "
               f"train --resume {folder}` continues it"):
        yield


def evaluation_lock(evaluate: Callable) -> Callable:
    """`evaluate(run, ...)` by one process at a time: two chose and wrote calibration.json
    and eval/ over each other (a race left one's deployed threshold beside the other's
    metrics, and `cxr serve` follows calibration.json as it changes)."""
    @functools.wraps(evaluate)
    def one_at_a_time(run, *args, **kwargs):
        folder = model_folder(run)
        with _held(folder / EVALUATION_LOCK, "evaluating", f"{folder} is being evaluated by "
                   "another process now: wait for it to end, then evaluate again"):
            return evaluate(run, *args, **kwargs)
    return one_at_a_time


@contextmanager
def _held(lock: Path, doing: str, busy: str) -> Iterator[None]:
    """`lock` held exclusively for as long as the block runs (it goes with the process,
    however that ends); FileExistsError(`busy`) where another process holds it. Where no lock
    can be had (Windows; a file system without flock; a run folder one may only read), said
    once and gone on without."""
    if fcntl is None:  # (Windows: no advisory locks)
        yield
        return
    try:
        handle = open(lock, "a", encoding="utf-8")  # noqa: SIM115 (held for the block)
    except OSError as e:
        log.warning("%s: no lock (%s): nothing stops a second process %s it at the same time",
                    lock.parent, e, doing)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(busy) from None
        except OSError as e:  # a file system without flock (some NFS, Lustre, FUSE mounts)
            log.warning("%s: no lock on this file system (%s): nothing stops a second process "
                        "%s it at the same time", lock.parent, e, doing)
        yield


def being_trained(folder: Path) -> bool:
    """Whether a process holds the run's `training_lock` now."""
    if fcntl is None or not (folder / TRAINING_LOCK).is_file():
        return False
    with open(folder / TRAINING_LOCK, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as it closes
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to tell
            return False
    return False


def refuse_unfinished(folder: Path) -> None:
    """A training run without its model yet (interrupted, or still training) is said to be
    one, with the way to finish it; a folder that is not there, or that holds runs rather
    than being one, is said to be so (a command run from another folder, a runs folder)."""
    if not folder.exists():
        where = "" if folder.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"{folder} does not exist{where}: give the run folder `cxr "
                                "train` printed, e.g. runs/NAME")
    if runs := sorted(p.name for p in folder.iterdir()
                      if (p / MODEL_WEIGHTS).is_file() or (p / CONFIG).is_file())[:5]:
        raise FileNotFoundError(f"{folder} holds runs rather than being one: give one of them, "
                                f"e.g. {', '.join(str(folder / name) for name in runs)}")
    if being_trained(folder):
        raise FileNotFoundError(f"{folder} is being trained now: it has no {MODEL_WEIGHTS} "
                                "yet; use it once its training ends")
    if (folder / CONFIG).is_file() and (folder / SPLIT).is_file():
        raise FileNotFoundError(
            f"{folder} is a training run that has not finished (interrupted?): it has no "
            f"{MODEL_WEIGHTS} yet. Continue it with `cxr train --resume {folder}` (Python: "
            f"train(resume=...)); `cxr run --resume` also evaluates and reports it.")


def _damaged(file: Path, error: Exception) -> ValueError:
    return ValueError(f"{file} is damaged ({type(error).__name__}: {error}): restore it from a "
                      "copy, or train the run again")


def _model_description(folder: Path) -> dict:
    file = folder / MODEL_SPEC
    try:
        described = json.loads(file.read_text(encoding="utf-8"))
        ModelSpec.from_dict(described)  # every field a model needs is there
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(file, e) from None
    return described


def load_spec(path: str | Path) -> ModelSpec:
    """A run's ModelSpec (input size, mean, std, labels, ...) without loading its weights."""
    return ModelSpec.from_dict(_model_description(model_folder(path)))


def load_model(path: str | Path) -> Classifier | Ensemble:
    """The trained classifier of a run (safetensors: no pickle is ever loaded), in eval mode.

    It gives raw logits for batches prepared as `cxrkit.inference.predict_logits` prepares
    them (which also reads films); the run's calibration turns them into what `predict`
    returns: `read_calibration(run).probabilities(logits)`, then its threshold."""
    from safetensors import safe_open

    from cxrkit.models.ensemble import model_from_description

    folder = model_folder(path)
    described = _model_description(folder)
    model = model_from_description(described)
    try:
        with safe_open(str(folder / MODEL_WEIGHTS), framework="pt") as file:
            weights = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
            saved_with = (file.metadata() or {}).get(SPEC_KEY)
    except Exception as e:  # safetensors raises its own error type for a truncated file
        raise _damaged(folder / MODEL_WEIGHTS, e) from None
    if saved_with is not None and json.loads(saved_with) != described:
        raise ValueError(f"{folder / MODEL_SPEC} is not the one {folder / MODEL_WEIGHTS} was "
                         "saved with (edited, or copied from another run): its labels, input "
                         "size or normalisation would be applied to weights trained otherwise. "
                         "Put the run's own model.json back, or train the run again")
    if broken := next((name for name, w in weights.items()
                       if w.is_floating_point() and not w.isfinite().all()), None):
        raise ValueError(f"{folder / MODEL_WEIGHTS} holds NaN or infinite weights ({broken}): "
                         "the training diverged or the file was damaged. Restore it from a "
                         "copy, or train the run again (a lower learning rate)")
    model.load_state_dict(weights)
    return model.eval()


def read_calibration(path: str | Path) -> Calibration:
    """The deployed threshold and calibration of a run (calibration.json, written by
    `evaluate_run`); a threshold of 0.5 and no calibration when it has none yet."""
    file = model_folder(path) / CALIBRATION
    if not file.is_file():
        return Calibration()
    try:
        calibration = Calibration(**json.loads(file.read_text(encoding="utf-8"))).check()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file} is damaged ({type(e).__name__}: {e}): delete it and run "
                         f"`cxr evaluate` (Python: evaluate_run) to choose them again") from None
    return calibration


def deployed_calibration(path: str | Path, weights_sha256: str | None = None) -> Calibration:
    """`read_calibration` for a model about to predict or be exported (`weights_sha256`: its
    weights, which the calibration must have been chosen for): a run never evaluated
    would ship threshold 0.5 and temperature 1 unnoticed, so that is said."""
    folder = model_folder(path)
    if not (folder / CALIBRATION).is_file():
        log.warning("%s has no %s (it was never evaluated): using threshold 0.5 and "
                    "temperature 1, chosen on no films. `cxr evaluate RUN` (Python: "
                    "evaluate_run(RUN)) chooses them on validation first", folder, CALIBRATION)
    calibration = read_calibration(path)
    calibration.refuse_other_weights(
        weights_sha256, folder / MODEL_WEIGHTS, f"the model was replaced since it was "
        f"evaluated; `cxr evaluate {shlex.quote(str(folder))}` chooses them for these weights")
    return calibration


def write_calibration(path: str | Path, calibration: Calibration) -> Path:
    """Deploy `calibration`: `predict`, `serve` and `export` apply it from then on."""
    file = model_folder(path) / CALIBRATION
    with written_whole(file) as partial:  # a server reading it never sees it half written
        partial.write_text(json.dumps(calibration.to_dict(), indent=2), encoding="utf-8")
    return file


