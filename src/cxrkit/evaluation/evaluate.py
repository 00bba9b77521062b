"""`evaluate_run`: a trained run's predictions, metrics with intervals, and figures.

    RUN/eval/<split or data name>/predictions.csv   one row per image
    RUN/eval/<split or data name>/metrics.json      every metric as {"value", "ci95"}
    RUN/eval/<split or data name>/*.png             curves, calibration, errors, Grad-CAM
    RUN/calibration.json                            threshold, temperature (and bias), for
                                                    `cxr predict`
    RUN/eval/logits/<key>.npz                       logits already computed (see `cached`)

Nothing is tuned on the data it is measured on:
- the temperature T is fitted on the validation split's logits;
- every probability reported (predictions.csv, metrics, figures) is calibrated,
  softmax(logits / T). For two classes T does not move the 0.5 boundary, so the
  `default_0.5` operating point is the same with or without calibration (with
  `calibrate_on`'s bias, 0.5 is the site's even-odds point instead);
- the `validation` threshold is chosen on calibrated validation P(positive)
  (Youden's J) and applied to calibrated P(positive) everywhere else;
  `target_sensitivity` reaches that sensitivity on validation calling the fewest films
  positive (midway between the lowest score it must call and the next lower one);
  `validation_framing` (opt-in) is Youden's J over the validation films as filmed and
  centre-cropped to 85%, for films framed differently from the training ones;
- `calibrate_on` (opt-in) makes the same choices on other labelled films, e.g. some of
  the deployment site's, and refuses to measure on those films. There the calibration
  also fits a bias per class, softmax(logits / T + b): the site's class mix is worth
  learning, the training site's is not (see evaluation/calibration.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxrkit.adapt import adaptation_note, source_calibration_options
from cxrkit.data.io import read_image, spreadsheet_text, written_whole
from cxrkit.data.layout import Sample, absolute_data, load_source, refuse_conflicting_rows
from cxrkit.data.patients import has_parsed_patient
from cxrkit.data.split import read_manifest, test_patients_seen_in_training
from cxrkit.evaluation import figures
from cxrkit.evaluation.calibration import (
    TEMPERATURE_RANGE,
    fit_temperature,
    fit_temperature_and_bias,
)
from cxrkit.evaluation.metrics import (
    COLLAPSED,
    confusion_matrix,
    drop_degenerate,
    multiclass_metrics,
    probability_metrics,
    proportion_counts,
    ranking_metrics,
    threshold_metrics,
    widen_to_wilson,
    with_ci,
)
from cxrkit.evaluation.scoring import (
    Scored,
    by_patients_seen,
    cached,
    run_manifest,
    score,
)
from cxrkit.evaluation.thresholds import sensitivity_threshold, youden_threshold
from cxrkit.evaluation.tta import DEFAULT_VIEWS
from cxrkit.explain import gradcam, overlay
from cxrkit.labels import positive_index
from cxrkit.models import Classifier, weights_digest
from cxrkit.onnx_backend import SIDECAR, read_sidecar
from cxrkit.plots import VECTOR_FORMATS, extra_formats
from cxrkit.provenance import (
    FILM_HASHES,
    code_version,
    data_fingerprint,
    library_versions,
    read_attempts,
)
from cxrkit.runs import (
    CALIBRATION,
    EVAL_DIR,
    METRICS,
    PREDICTIONS,
    SPLIT,
    Calibration,
    evaluation_lock,
    load_model,
    model_folder,
    read_calibration,
    softmax,
    weights_file_digest,
    write_calibration,
)

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
GRADCAM_IMAGES = 8  # errors and correct cases each
WORST_ERRORS = 12
# The framing check: only the central 85% and 70% of each film's sides, resized to the input.
FRAMING_CROPS = (0.85, 0.7)
# The framing-robust threshold: Youden's J over the validation films as filmed and cropped so.
FRAMING_THRESHOLD_CROP = 0.85
# Which operating point is deployed when several were chosen, in order of precedence.
DEPLOYED_FIRST = ("target_sensitivity", "validation_framing", "validation")


def _data_name(data: str | Path) -> str:
    """The eval folder name for external data: its folder (or CSV) name."""
    if str(data).lower() == "kaggle":
        return "kaggle"
    path = Path(data).expanduser().resolve()
    name = path.stem if path.is_file() else path.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "external"
    return f"external_{name}" if name in ("train", "val", "test") else name


def unclaimed_name(run: Path, name: str, origin: str, split: str) -> str:
    """`name`, unless RUN/eval/name holds an evaluation of other films (two sites' folders
    both named chest_xray, or another split of the same data): then name-<digest of these
    films' place>, the same folder each time they are evaluated."""
    try:
        held = json.loads((run / EVAL_DIR / name / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return name
    if held.get("data", origin) == origin and held.get("split", split) == split:
        return name
    other = f"{name}-{hashlib.sha256(f'{origin} {split}'.encode()).hexdigest()[:8]}"
    log.info("%s/%s/%s holds the evaluation of %s (%s): this one of %s (%s) goes to %s",
             run.name, EVAL_DIR, name, held.get("data"), held.get("split"), origin, split, other)
    return other


REAPPLIED_HINT = (" {} is where the deployed calibration (calibration.json) was chosen: "
                  "--reset-calibration chooses on the run's validation split instead, "
                  "--calibrate-on OTHER_FILMS on others.")


def refuse_overlap(chosen_on: Sequence[Sample], evaluated: Sequence[Sample], source: str,
                   origin: str, reapplied: bool = False) -> None:
    """Films that chose the threshold must not be among the films it is measured on, not
    even as copies (said first: the plainer mistake), nor films of the same patients;
    `reapplied`: the choice is calibration.json's, not one asked for now."""
    shared = identical_files(chosen_on, evaluated)
    if shared:
        example = min(shared)
        raise ValueError(
            f"{len(shared)} films are both in {source}, which chooses the threshold, and in "
            f"{origin}, which is evaluated (e.g. {example}, the same file or a byte-identical "
            f"copy as {shared[example].path}): choose on films you do not evaluate on (split "
            f"the site's films into two folders or manifests)."
            + (REAPPLIED_HINT.format(source) if reapplied else "")
        )
    patients = ({s.patient_id for s in chosen_on if has_parsed_patient(s)}
                & {s.patient_id for s in evaluated if has_parsed_patient(s)})
    if patients:  # re-saved or re-exported films of one patient are no new evidence either
        raise ValueError(
            f"{len(patients)} patient(s) have films both in {source}, which chooses the "
            f"threshold, and in {origin}, which is evaluated (e.g. {min(patients)}): choose on "
            f"other patients' films than those you evaluate on (split the site's films by "
            f"patient)." + (REAPPLIED_HINT.format(source) if reapplied else ""))


def _file_size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def identical_files(reference: Sequence[Sample], samples: Sequence[Sample]) -> dict[str, Sample]:
    """Each of `samples` that is a file of `reference` (the same path, or the same bytes),
    by its path, with that reference film. Only files of equal size are read and hashed."""
    by_size: dict[int, list[Sample]] = {}
    for own in reference:
        if (size := _file_size(own.path)) is not None:
            by_size.setdefault(size, []).append(own)
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return digests[path]

    found = {}
    for sample in samples:
        size = _file_size(sample.path)
        same = [own for own in by_size.get(size, []) if size is not None and (
            os.path.samefile(own.path, sample.path) or digest(own.path) == digest(sample.path))]
        if same:
            found[sample.path] = same[0]
    return found


def external_data_doubts(run_samples: Sequence[Sample], samples: Sequence[Sample]) -> list[str]:
    """Why `samples` may not be the independent data an external evaluation needs: films
    byte-identical to the run's own (train, val or test), and no patient ids (each film then
    counts as its own patient)."""
    theirs = {path: own.split for path, own in identical_files(run_samples, samples).items()}
    doubts = []
    if theirs:
        splits = Counter(theirs.values())
        doubts.append(f"{len(theirs)} of these {len(samples)} films are files of the run's own "
                      f"data ({', '.join(f'{split} {n}' for split, n in splits.items())}): "
                      "this is not independent external data.")
    if samples and not any(map(has_parsed_patient, samples)):
        doubts.append("No patient id could be read from the file names or DICOM headers: "
                      "each film counts as its own patient, so the intervals are too narrow "
                      "where a patient has several films (a CSV manifest with a patient_id "
                      "column gives them).")
    return doubts


def external_samples(data: str | Path, split: str) -> tuple[str, str, str, list[Sample]]:
    """(eval name, where it is, split used, samples) of another dataset: its `split` if it
    has splits, else all of it (a class-per-folder tree has none)."""
    source = load_source(absolute_data(data), min_classes=1)
    refuse_conflicting_rows(source)
    where = str(Path(source.root).resolve())  # one name for the films from any working folder
    if split in source.splits:
        return _data_name(data), where, split, source.split(split)
    if source.splits == [""]:
        return _data_name(data), where, "all", source.samples
    raise ValueError(f"{source.root} has no {split!r} split (it has {', '.join(source.splits)})")


def _as_stored(films: str | Path | None) -> str | None:
    """Where calibration films are: an absolute path where it is one (`kaggle` as it is)."""
    if films is None:
        return None
    return str(Path(films).resolve()) if Path(films).exists() else str(films)


def deployed_options(run: Path) -> tuple[float | None, bool, str | None]:
    """(target_sensitivity, framing_threshold, calibrate_on) that chose RUN's calibration."""
    deployed = read_calibration(run)
    if _records_its_options(run):  # {}: Youden's J on validation (as --reset-calibration)
        stored = deployed.chosen_with
    else:  # nothing deployed yet (an adapted run: its source's way), or an older cxrkit's
        stored = source_calibration_options(run) or _options_in_words(run, deployed.chosen_on)
    if stored:
        log.info("%s: re-applying what chose the deployed operating point (%s); "
                 "--reset-calibration chooses afresh", run.name,
                 ", ".join(f"{k}={v}" for k, v in stored.items()))
    calibrate_on = stored.get("calibrate_on")
    if calibrate_on and calibrate_on != "kaggle" and not Path(calibrate_on).exists():
        raise ValueError(f"{run}/calibration.json was chosen on {calibrate_on}, which is gone: "
                         "evaluate with --calibrate-on FILMS, or --reset-calibration to choose "
                         "on the run's validation split")
    return (stored.get("target_sensitivity"), bool(stored.get("framing_threshold")),
            calibrate_on)


def _records_its_options(run: Path) -> bool:
    """Whether RUN/calibration.json names the options that chose it (`chosen_with`: since
    2b77126), an empty record included."""
    try:
        return "chosen_with" in json.loads((run / CALIBRATION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _options_in_words(run: Path, chosen_on: str) -> dict:
    """The options that chose a calibration, read back from its `chosen_on` (`choose_calibration`
    words it): a cxrkit before `chosen_with` recorded only these words, and evaluating its run
    again (as `cxr report` does) swapped a sensitivity target for Youden's J unsaid."""
    source = re.split(r": | as filmed", chosen_on, maxsplit=1)[0]
    if chosen_on == Calibration().chosen_on or source in ("validation", "val"):
        options: dict = {}
        if target := re.search(r": sensitivity >= ([0-9.]+)$", chosen_on):
            options["target_sensitivity"] = float(target[1])
        if " as filmed and framed " in chosen_on:
            options["framing_threshold"] = True
        return options
    raise ValueError(f"{run}/calibration.json was chosen on {source} ({chosen_on}) by an older "
                     "cxrkit, which did not record where those films are: evaluate with "
                     "--calibrate-on FILMS to keep that operating point, or --reset-calibration "
                     "to choose one on the run's validation split")


def operating_point_change(deployed: Calibration, chosen: Calibration) -> str | None:
    """What a new choice changes in the deployed calibration (what `cxr predict` and `cxr serve`
    apply), said out loud; None when nothing was deployed yet, or the same rule chose numbers
    within the noise of scoring the same films again on another machine."""
    if deployed.chosen_on == Calibration().chosen_on:
        return None
    if (deployed.chosen_on == chosen.chosen_on
            and abs(deployed.threshold - chosen.threshold) < 1e-5
            and abs(np.log(deployed.temperature / chosen.temperature)) < 1e-3
            and np.allclose(deployed.bias or 0.0, chosen.bias or 0.0, atol=1e-3)):
        return None
    return (f"the deployed operating point changed: threshold {deployed.threshold:.4f}, "
            f"{deployed.describe()} ({deployed.chosen_on}) -> {chosen.threshold:.4f}, "
            f"{chosen.describe()} ({chosen.chosen_on}).")


def fit_probabilities(val: Scored, with_bias: bool, source: str) -> Calibration:
    """Temperature (and, `with_bias`, a bias per class) fitted on `val`; a class missing
    from its films leaves the bias out, with a warning."""
    if with_bias and len(np.unique(val.y)) == val.logits.shape[1]:
        temperature, bias = fit_temperature_and_bias(val.logits, val.y)
        return Calibration(temperature=temperature, chosen_on=source, bias=bias)
    if with_bias:
        log.warning("%s lacks films of some class: temperature only, no bias", source)
    return Calibration(temperature=fit_temperature(val.logits, val.y), chosen_on=source)


def choose_calibration(val: Scored, positive: int | None, target_sensitivity: float | None,
                       framed_val: Scored | None = None, source: str = "validation",
                       with_bias: bool = False) -> tuple[Calibration, dict[str, float]]:
    """Temperature (and, `with_bias`, a bias per class) and thresholds from the validation
    split (or the films `source` names); the deployed threshold is returned in the
    Calibration: the target-sensitivity one when asked, else the framing-robust one when
    `framed_val` (the validation films framed more tightly) is given, else Youden's J."""
    if len(val.y) == 0:
        thresholds = {} if positive is None else {"default_0.5": DEFAULT_THRESHOLD,
                                                  "validation": DEFAULT_THRESHOLD}
        return Calibration(DEFAULT_THRESHOLD, 1.0, "default (no validation images)"), thresholds
    calibration = fit_probabilities(val, with_bias, source)
    if positive is None:
        return calibration, {}
    thresholds = {"default_0.5": DEFAULT_THRESHOLD}
    p, y = calibration.probabilities(val.logits)[:, positive], val.y == positive
    thresholds["validation"] = youden_threshold(y, p)
    if framed_val is not None:  # the calibration stays the one fitted on the films as filmed
        p_framed = calibration.probabilities(framed_val.logits)[:, positive]
        thresholds["validation_framing"] = youden_threshold(
            np.r_[y, framed_val.y == positive], np.r_[p, p_framed])
    if target_sensitivity is not None:
        thresholds["target_sensitivity"] = sensitivity_threshold(y, p, target_sensitivity)
    deployed = deployed_name(thresholds)
    chosen_on = {"validation": f"{source}: Youden's J",
                 "validation_framing": f"{source} as filmed and framed "
                                       f"{FRAMING_THRESHOLD_CROP:.0%}: Youden's J",
                 "target_sensitivity": f"{source}: sensitivity >= {target_sensitivity}"}
    calibration.threshold, calibration.chosen_on = thresholds[deployed], chosen_on[deployed]
    return calibration, thresholds


def choose_tta_calibration(infer: Callable[..., Scored], val: Scored, framing: bool,
                           augmented_val: Scored | None, positive: int | None,
                           target_sensitivity: float | None, source: str,
                           with_bias: bool) -> tuple[Calibration, dict[str, float]]:
    """`choose_calibration` for test-time augmentation, a predictor of its own: on the
    validation films scored with the same views (`augmented_val` where they are already;
    framed too, `framing`, for the framing-robust threshold)."""
    if augmented_val is None:
        augmented_val = infer(val.samples, f"{source} (TTA)", views=DEFAULT_VIEWS) \
            if len(val.y) else val
    framed = None if not framing else infer(
        val.samples, f"{source} (TTA, framed {FRAMING_THRESHOLD_CROP:.0%})", views=DEFAULT_VIEWS,
        crop=FRAMING_THRESHOLD_CROP)
    return choose_calibration(augmented_val, positive, target_sensitivity, framed, source,
                              with_bias)


MIN_CHOOSING_FILMS = 50  # fewer, and the threshold and temperature are rough guesses


def calibration_doubts(val: Scored, calibration: Calibration, source: str) -> list[str]:
    """What makes a calibration chosen on `val` doubtful, said in the evaluation's notes (and
    the log): too few films, or a temperature at the end of its search range."""
    doubts = []
    if 0 < len(val.y) < MIN_CHOOSING_FILMS:
        doubts.append(f"{source} has only {len(val.y)} films: the threshold and temperature "
                      f"chosen on it are rough; use at least {MIN_CHOOSING_FILMS}.")
    at_bound = any(abs(np.log(calibration.temperature / end)) < 1e-3 for end in TEMPERATURE_RANGE)
    if len(val.y) and at_bound:
        doubts.append(f"the temperature fitted on {source} hit the end of its range "
                      f"({calibration.temperature:g}): the probabilities there are degenerate "
                      "(e.g. the classes are not separated at all, or perfectly).")
    for doubt in doubts:
        log.warning(doubt)
    return doubts


def deployed_name(thresholds: dict[str, float]) -> str | None:
    """The operating point deployed (calibration.json, `cxr predict`): the first one chosen
    of `DEPLOYED_FIRST`; None for multi-class models, which have no threshold."""
    return next((name for name in DEPLOYED_FIRST if name in thresholds), None)


# ---- metrics ---------------------------------------------------------------------------------

def _nest(flat: dict[str, dict]) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def films_per_class(scored: Scored, labels: Sequence[str]) -> dict[str, int]:
    """How many of the scored films each class has: the class mix that accuracy, F1, PPV and
    NPV depend on."""
    return {label: int((scored.y == i).sum()) for i, label in enumerate(labels)}


def compute_metrics(scored: Scored, labels: Sequence[str], positive: int | None,
                    calibration: Calibration, thresholds: dict[str, float],
                    n_resamples: int = 1000, seed: int = 0,
                    fitted_on: str = "validation") -> dict:
    """All metrics of one scored split, in the metrics.json layout (binary or multi-class);
    `fitted_on` says where the calibration was fitted."""
    y, probs = scored.y, calibration.probabilities(scored.logits)
    raw = softmax(scored.logits, 1.0)

    normal = next((i for i, name in enumerate(labels) if name.upper() == "NORMAL"), None)

    def statistics(w: np.ndarray) -> dict[str, np.ndarray]:
        out = probability_metrics(y, probs, positive, w)
        out |= {f"uncalibrated/{k}": v for k, v in probability_metrics(y, raw, positive, w).items()}
        if positive is None and normal is not None:  # e.g. BACTERIA/VIRUS: also as pneumonia
            collapsed = collapsed_metrics(y, probs, normal, w)
            out |= {f"{COLLAPSED}/{k}": v for k, v in collapsed.items()}
        if positive is None:
            return out | multiclass_metrics(y, probs, labels, w)
        is_pos, p = y == positive, probs[:, positive]
        out |= ranking_metrics(is_pos, p, w)
        for name, t in thresholds.items():
            out |= {f"operating_points/{name}/{k}": v
                    for k, v in threshold_metrics(is_pos, p, t, w).items()}
        return out

    metrics = _nest(with_ci(statistics, scored.groups, n_resamples, seed))
    before = metrics.pop("uncalibrated")
    metrics["calibrated"] = {
        "temperature": calibration.temperature, "bias": calibration.bias,
        "fitted_on": fitted_on,
        "ece_before": before["ece"], "ece_after": metrics["ece"],
        "brier_before": before["brier"], "brier_after": metrics["brier"],
    }
    if positive is not None:
        is_pos, p = y == positive, probs[:, positive]
        points = {}
        for name, t in thresholds.items():
            point = metrics["operating_points"][name]
            for rate, (k, n) in proportion_counts(is_pos, p, t).items():
                point[rate] = widen_to_wilson(point[rate], k, n)
            points[name] = {"threshold": t, **point}
        metrics["operating_points"] = points
    else:
        metrics["per_class"] = {name: metrics.pop(name) for name in labels}
        widen_multiclass_rates(metrics, y, probs, normal)
    if n_resamples and (dropped := drop_degenerate(metrics)):
        metrics["degenerate_intervals"] = dropped  # (their ci95 nulled)
    return metrics


def widen_multiclass_rates(metrics: dict, y: np.ndarray, probs: np.ndarray,
                           normal: int | None) -> None:
    """The multi-class proportions (accuracy, each class's sensitivity, specificity, PPV and
    NPV, and NORMAL against the rest) widened to their Wilson intervals, as the binary ones
    are."""
    predicted = probs.argmax(1)
    metrics["accuracy"] = widen_to_wilson(metrics["accuracy"], int((predicted == y).sum()),
                                          len(y))
    for c, entry in enumerate(metrics["per_class"].values()):
        counts = proportion_counts(y == c, (predicted == c).astype(float), 0.5)
        for rate in ("sensitivity", "specificity", "ppv", "npv"):
            entry[rate] = widen_to_wilson(entry[rate], *counts[rate])
    if normal is not None:
        collapsed = metrics[COLLAPSED]
        counts = proportion_counts(y != normal, (predicted != normal).astype(float), 0.5)
        for rate in ("accuracy", "sensitivity", "specificity"):
            collapsed[rate] = widen_to_wilson(collapsed[rate], *counts[rate])


def collapsed_metrics(y: np.ndarray, probs: np.ndarray, normal: int,
                      w: np.ndarray) -> dict[str, np.ndarray]:
    """A NORMAL/BACTERIA/VIRUS model read as NORMAL against pneumonia, so that it compares with
    two-class runs: ROC-AUC of 1 - P(NORMAL), and the rates of its own decision (the most
    probable class is not NORMAL)."""
    abnormal, p_abnormal = y != normal, 1.0 - probs[:, normal]
    called = (probs.argmax(1) != normal).astype(float)
    rates = threshold_metrics(abnormal, called, 0.5, w)
    ranking = ranking_metrics(abnormal, p_abnormal, w)  # (cxr compare's Spec@97 too)
    return {"roc_auc": ranking["roc_auc"],
            **{k: v for k, v in ranking.items() if k.startswith("specificity_at_sensitivity")},
            **{k: rates[k] for k in ("accuracy", "sensitivity", "specificity", "f1")}}


# ---- files -----------------------------------------------------------------------------------

def write_predictions(path: Path, scored: Scored, probs: np.ndarray, predicted: np.ndarray,
                      labels: Sequence[str], tta_probs: np.ndarray | None = None) -> Path:
    columns = ["path", "patient_id", "label", "predicted", "correct",
               *(f"p_{n}" for n in labels), *(f"logit_{n}" for n in labels)]
    if tta_probs is not None:
        columns += [f"tta_p_{n}" for n in labels]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, s in enumerate(scored.samples):
            row = [spreadsheet_text(s.path), spreadsheet_text(s.patient_id),
                   labels[scored.y[i]], labels[predicted[i]],
                   int(predicted[i] == scored.y[i]), *(f"{v:.9g}" for v in probs[i]),
                   *(f"{v:.9g}" for v in scored.logits[i])]
            if tta_probs is not None:
                row += [f"{v:.9g}" for v in tta_probs[i]]
            w.writerow(row)
    return path


def _caption(sample: Sample, truth: str, called: str, prob_name: str, prob: float) -> str:
    """'NORMAL/IM-0001-0001.jpeg / true NORMAL, called PNEUMONIA / P(PNEUMONIA)=0.99'."""
    path = Path(sample.path)  # its folder too: 0.png of NORMAL/ and of PNEUMONIA/ differ
    name = path.name if len(path.name) <= 30 else path.name[:13] + "..." + path.name[-14:]
    return f"{path.parent.name}/{name}\ntrue {truth}, called {called}\nP({prob_name})={prob:.2f}"


def write_figures(out: Path, model: Classifier, scored: Scored, probs: np.ndarray,
                  metrics: dict, thresholds: dict[str, float], calibration: Calibration,
                  seed: int = 0, where: str = "") -> None:
    """The evaluation's figures; `where` names the films in each title ('test, 624 films')."""
    labels, y = model.spec.labels, scored.y
    positive = positive_index(labels, model.spec.positive_label) if len(labels) == 2 else None
    predicted = calibration.classes(probs, labels, positive_label=model.spec.positive_label)
    counts = confusion_matrix(y, predicted, len(labels))
    deployed = deployed_name(thresholds)
    rule = (f"deployed threshold {calibration.threshold:.3f}" if positive is not None
            else "most probable class")
    figures.confusion_figure(counts, labels, out / "confusion_matrix.png", f"{where}, {rule}")
    figures.curves_figure(y, probs, labels, positive, metrics.get("operating_points", {}),
                          out / "roc_pr.png", deployed, where)
    def events(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted probability, whether it happened), as the ECE counts them."""
        if positive is None:
            return q.max(1), (q.argmax(1) == y).astype(float)
        return q[:, positive], (y == positive).astype(float)

    what = "confidence (top class)" if positive is None else f"P({labels[positive]})"
    figures.reliability_figure(events(softmax(scored.logits, 1.0)), events(probs),
                               calibration.describe(), what, out / "reliability.png", where)
    figures.histograms_figure(y, probs, labels, positive, thresholds, out / "histograms.png",
                              deployed, where)
    if "framing" in metrics and deployed:
        points = {"as filmed": metrics["operating_points"][deployed],
                  **{c: metrics["framing"][c]["operating_points"][deployed]
                     for c in metrics["framing"]["crops"]}}
        figures.framing_figure(points, out / "framing.png", f"{where}, {rule}")

    # Each film as the model read it (gray, equalised if it was), at its own shape, for the
    # image grids: the model's square input squashed the anatomy of every figure a paper takes.
    wrong = np.flatnonzero(predicted != y)
    confidence = probs[np.arange(len(y)), predicted]
    worst = worst_mistakes(y, predicted, confidence, WORST_ERRORS)
    rng = np.random.default_rng(seed)
    right = np.flatnonzero(predicted == y)
    correct = rng.choice(right, min(GRADCAM_IMAGES, len(right)), replace=False)
    spec = model.spec

    def film(i: int) -> Image.Image:
        return shown_film(scored.samples[i].path, spec.input_size, spec.equalize)

    def captions(indices) -> list[str]:
        """The positive class's probability where there is one (beside the threshold),
        else the called class's."""
        shown = [positive if positive is not None else predicted[i] for i in indices]
        return [_caption(scored.samples[i], labels[y[i]], labels[predicted[i]], labels[c],
                         probs[i, c]) for i, c in zip(indices, shown, strict=True)]

    if len(worst):
        figures.image_grid([film(i) for i in worst], captions(worst),
                           f"{len(worst)} of {len(wrong)} mistakes, the most confident of each "
                           f"true class in turn\n({where}, {rule})", out / "worst_errors.png")
    chosen = {"errors": f"of {len(wrong)} mistakes, the most confident of each true class",
              "correct": f"random of {len(right)} correct calls"}
    for name, indices in (("errors", worst_mistakes(y, predicted, confidence, GRADCAM_IMAGES)),
                          ("correct", correct)):
        if not len(indices):
            continue
        paths = [scored.samples[i].path for i in indices]
        heatmaps = gradcam(model, paths, class_index=[int(predicted[i]) for i in indices])
        images = [overlay(film(i), h) for i, h in zip(indices, heatmaps, strict=True)]
        # An all-zero map is an answer too: nothing in the film raised the predicted class.
        notes = [f"{c}\nmap: for {labels[predicted[i]]}" + (" (nothing raised it)" if h.max() == 0
                                                              else "")
                 for i, c, h in zip(indices, captions(indices), heatmaps, strict=True)]
        figures.image_grid(images, notes,
                           f"Grad-CAM of the called class: {len(indices)} {chosen[name]}\n"
                           f"({where}, {rule})",
                           out / f"gradcam_{name}.png",
                           colorbar="Grad-CAM weight for the called class\n"
                                    "(scaled per film: 1 = its strongest)")


def shown_film(path: str, side: int, equalize: bool) -> Image.Image:
    """A film for a figure: read as the model reads it, at its own shape, its longer side
    `side` pixels (the model's input size: the detail the model had)."""
    image = read_image(path)
    if equalize:
        image = ImageOps.equalize(image)
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR, reducing_gap=3.0)


def degenerate_note(metrics: dict) -> list[str]:
    """The note for intervals left out (`drop_degenerate`), of every block: plain, TTA,
    framing, the patients seen and unseen."""

    def found(block: dict, prefix: str = "") -> list[str]:
        names = [f"{prefix}{name}" for name in block.get("degenerate_intervals", [])]
        for key, inner in block.items():
            if isinstance(inner, dict):
                names += found(inner, f"{prefix}{key}/")
        return names

    if not (names := found(metrics)):
        return []
    return [f"No 95% interval for {', '.join(names)}: every patient resample gave the same "
            "value (perfect separation, all wrong, or very few patients), and the bootstrap "
            "shows no uncertainty there, which is not certainty."]


def worst_mistakes(y: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                   k: int) -> np.ndarray:
    """Up to `k` mistakes, the true classes taking turns, each's most confident first; then
    grouped by true class. Ranked all together, a high threshold made every false positive
    more confident than any false negative, and no false negative was ever shown."""
    wrong = np.flatnonzero(predicted != y)
    queues = [list(wrong[y[wrong] == c][np.argsort(-confidence[wrong[y[wrong] == c]],
                                                   kind="stable")])
              for c in np.unique(y[wrong])]
    taken: list[int] = []
    while len(taken) < k and any(queues):
        taken += [q.pop(0) for q in queues if q][:k - len(taken)]
    return np.array(sorted(taken, key=lambda i: (y[i], -confidence[i])), dtype=int)


# ---- the whole evaluation --------------------------------------------------------------------

def _refuse_bad_options(split: str, data: str | Path | None,
                        target_sensitivity: float | None) -> None:
    """Before any model is loaded or film read."""
    if data is None and split not in ("test", "val"):
        raise ValueError(f"split {split!r}: choose test or val (a model is never scored on its "
                         "train split)")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity {target_sensitivity}: give a fraction in (0, 1]"
                         + (f", e.g. {target_sensitivity / 100:g} for {target_sensitivity:g}%"
                            if 1 < target_sensitivity <= 100 else ""))


def _films_to_evaluate(run: Path, manifest: list[Sample], split: str, data: str | Path | None
                       ) -> tuple[str, str, str, str, list[Sample]]:
    """(evaluation name, where the films come from, their split, how logs name them, the
    films): the run's own `split`, or that of external `data`."""
    if data is not None:
        name, origin, used_split, samples = external_samples(data, split)
        return name, origin, used_split, origin, samples
    samples = [s for s in manifest if s.split == split]
    if not samples:
        present = sorted({s.split for s in manifest})
        raise ValueError(f"{run}/split.csv has no {split!r} images (it has {present}): its "
                         f"data had no {split} split. Evaluate on other labelled films, `cxr "
                         f"evaluate {run} --data OTHER_FILMS` (Python: data=...), or on "
                         "validation, --split val (optimistic: it chose the threshold)")
    origin = str(run / SPLIT)
    return split, origin, split, f"{origin} {split}", samples


def _emptied(out: Path) -> Path:
    """RUN/eval/<name>/ without the last evaluation's figures and metrics.json: kept, the
    figures would show another threshold beside these metrics (--no-figures), or mistakes
    these films no longer have. The new metrics.json is written last: an evaluation killed
    part way leaves none, and `cxr report` evaluates again rather than show half a set of
    figures."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.suffix[1:] in ("png", *VECTOR_FORMATS) or old.name == METRICS:
            old.unlink()
    return out


def _data_changed_since_training(run: Path, now: str) -> str | None:
    """Where split.csv's films, labels, splits or patients are not those the run was trained
    and tested with (provenance.json's data sha256, the last attempt's): a relabelled test
    row or a film replaced on disk changed the results unsaid."""
    trained = next((a["data"]["sha256"] for a in reversed(read_attempts(run))
                    if (a.get("data") or {}).get("sha256")), None)
    if trained is None or trained == now:
        return None
    return (f"{run / SPLIT} and its films are not those the run was trained with (data sha256 "
            f"{trained[:12]}... then, {now[:12]}... now): a label, split, patient or film "
            "changed since, and these results are of the data as it is now.")


def _export_applies_another(export: Path, calibration: Calibration) -> bool:
    """Whether RUN/export holds a calibration other than `calibration` (an export made
    since, or one damaged: said too)."""
    if not (export / SIDECAR).is_file():
        return False
    try:
        return not read_sidecar(export)[1].decides_as(calibration)
    except ValueError:
        return True


@evaluation_lock
def evaluate_run(run: str | Path, split: str = "test", data: str | Path | None = None,
                 tta: bool = False, target_sensitivity: float | None = None,
                 batch_size: int = 32, bootstrap: int = 1000, seed: int = 0,
                 num_workers: int = 0, device: str | None = None,
                 figures: bool = True, framing: bool = False,
                 framing_threshold: bool = False,
                 calibrate_on: str | Path | None = None,
                 reset_calibration: bool = False) -> Path:
    """Evaluate RUN on its own `split` (test or val), or on external `data`; returns the
    eval folder. See the module docstring for what is chosen where.

    `framing`: also score the same films framed more tightly (`FRAMING_CROPS`). Films
    from another site are often framed differently; a model that learned framing as a
    shortcut (in Kermany's train split PNEUMONIA films are framed more tightly than
    NORMAL ones) loses specificity here, which validation from the same site cannot show.
    `framing_threshold`: choose and deploy the threshold on the validation films as filmed
    and centre-cropped to `FRAMING_THRESHOLD_CROP` (Youden's J over both), an operating point
    that holds better where films are framed differently; Youden's J on the films as filmed
    is still reported beside it.
    `calibrate_on`: choose temperature and thresholds on these labelled films (their `val`
    split, or all of them when they have no splits) instead of the run's validation split,
    e.g. a few hundred films from the site the model is deployed to: validation from the
    training site cannot see how that site's films differ. They must not be the films
    evaluated; the evaluation is written to `<name>-calibrated-<their name>`, and
    calibration.json (what `cxr predict` and `cxr serve` deploy) takes their threshold.
    Called with none of these three, it re-applies the ones that chose the deployed
    calibration (its `chosen_with`), so evaluating again never quietly deploys another
    operating point; `reset_calibration`: choose afresh, Youden's J on the run's validation.
    """
    _refuse_bad_options(split, data, target_sensitivity)
    run = model_folder(run).resolve()
    reapplied = not (reset_calibration or target_sensitivity is not None or framing_threshold
                     or calibrate_on is not None)
    if reapplied:
        target_sensitivity, framing_threshold, calibrate_on = deployed_options(run)
    chosen_with = {k: v for k, v in (("target_sensitivity", target_sensitivity),
                                     ("framing_threshold", framing_threshold),
                                     ("calibrate_on", _as_stored(calibrate_on))) if v}
    model = load_model(run)
    digest = weights_digest(model)  # what metrics.json and calibration.json are of
    labels = model.spec.labels
    if len(labels) != model.spec.num_classes:
        raise ValueError(f"{run}/model.json lists labels {labels} for "
                         f"{model.spec.num_classes} classes")
    positive = positive_index(labels, model.spec.positive_label) if len(labels) == 2 else None
    if positive is None and (target_sensitivity is not None or framing_threshold):
        raise ValueError(f"{run.name} has {len(labels)} classes and predicts the most probable "
                         "one: --target-sensitivity and --framing-threshold choose a threshold, "
                         "which only two-class models have")
    manifest = run_manifest(run)
    infer = cached(run, labels, partial(score, model, batch_size=batch_size,
                                        num_workers=num_workers, device=device))
    if figures:
        extra_formats()  # a bad CXRKIT_FIGURE_FORMATS is said before the films are scored
    notes = []

    if calibrate_on is None:
        source, val_where = "validation", f"{run}/split.csv val"
        val_samples = [s for s in manifest if s.split == "val"]
    else:
        calibration_name, source, _, val_samples = external_samples(calibrate_on, "val")
        val_where = source
    name, origin, used_split, where, samples = _films_to_evaluate(run, manifest, split, data)
    if calibrate_on is not None:  # before any film is scored
        refuse_overlap(val_samples, samples, source, origin, reapplied)
    adapted, adapted_to_films = adaptation_note(run, [s.path for s in samples])
    if adapted:
        notes.append(adapted)

    val = infer(val_samples, val_where)
    reuse = data is None and split == "val" and calibrate_on is None
    scored = val if reuse else infer(samples, where)
    if reuse:
        notes.append("This is the validation split that chose the threshold and "
                     "temperature: its numbers are optimistic.")
    fingerprint = None if data is not None else data_fingerprint(manifest, run / FILM_HASHES)
    if fingerprint and (changed := _data_changed_since_training(run, fingerprint["sha256"])):
        notes.append(changed)  # `cxr evaluate` prints its notes, the report shows them
    leak = data is None and split == "test" and test_patients_seen_in_training(manifest)
    if leak:  # a note (`cxr evaluate` prints it), not said again: training said it first
        notes.append(leak)
    if data is not None:
        notes += external_data_doubts(read_manifest(run / SPLIT), scored.samples)
        missing = sorted(set(labels) - {labels[i] for i in scored.y})
        if missing:
            notes.append(f"The external data has no {', '.join(missing)} images.")
    if calibrate_on is not None:
        name = f"{name}-calibrated-{calibration_name}"
        notes.append(f"Temperature and threshold chosen on {source} ({len(val.y)} films), "
                     f"not on the run's validation split.")
    framed_val = None
    if framing_threshold and positive is not None and len(val.y):
        framed_val = infer(val.samples, f"{source} (framed {FRAMING_THRESHOLD_CROP:.0%})",
                           crop=FRAMING_THRESHOLD_CROP)
    calibration, thresholds = choose_calibration(val, positive, target_sensitivity, framed_val,
                                                 source, with_bias=calibrate_on is not None)
    calibration.chosen_with, calibration.weights_sha256 = chosen_with, digest
    notes += calibration_doubts(val, calibration, source)
    if len(val.y):
        if moved := operating_point_change(read_calibration(run), calibration):
            if _export_applies_another(run / "export", calibration):  # may be deployed
                moved += (f" {run / 'export'} still applies another one: `cxr export "
                          f"{shlex.quote(str(run))}` updates it (and export copies anew).")
            log.warning("%s: %s", run.name, moved)
            notes.append(moved)
        write_calibration(run, calibration)
    else:
        notes.append("No validation images: threshold 0.5 and temperature 1 (nothing chosen).")
    rule = f"threshold {calibration.threshold:.4f}" if positive is not None else "argmax"
    log.info("%s: %s, %s (%s)", run.name, calibration.describe(), rule, calibration.chosen_on)

    measure = partial(compute_metrics, labels=labels, positive=positive,
                      calibration=calibration, thresholds=thresholds,
                      n_resamples=bootstrap, seed=seed,
                      fitted_on=source)  # "validation", as selection_split names it
    metrics = measure(scored)
    if not reuse and len(val.y):  # the films that chose the rule, beside those it is used on
        metrics["selection_split"] = {"name": source, "n": len(val.y),
                                      "n_per_class": films_per_class(val, labels),
                                      **measure(val, n_resamples=0)}
    if leak:
        seen, unseen = by_patients_seen(scored, manifest)
        # both sides, so that each class's rate compares across them (their class mixes differ)
        for key, part, note in (
                ("seen_patients", seen, "the films of test patients whose ids are also in "
                                        "train or val: numbers a leak could have raised"),
                ("unseen_patients", unseen, "the films of test patients whose ids are not in "
                                            "train or val: numbers a leak cannot have raised")):
            if part is not None:
                metrics[key] = {"n": len(part.y), "n_per_class": films_per_class(part, labels),
                                "note": f"{note}; the same calibration and thresholds",
                                **measure(part)}
    probs = calibration.probabilities(scored.logits)
    predicted = calibration.classes(probs, labels, positive_label=model.spec.positive_label)
    tta_probs = None
    if tta:
        augmented = infer(scored.samples, f"{origin} (TTA)", views=DEFAULT_VIEWS)
        tta_calibration, tta_thresholds = choose_tta_calibration(
            infer, val, framed_val is not None, augmented if reuse else None, positive,
            target_sensitivity, source, with_bias=calibrate_on is not None)
        tta_probs = tta_calibration.probabilities(augmented.logits)
        metrics["tta"] = {
            "views": list(DEFAULT_VIEWS),
            "note": "logits averaged over the plain image and each view; temperature and "
                    "thresholds chosen as without TTA, on the validation films scored with "
                    "the same views (averaging changes the logits' scale); cxr predict and "
                    "cxr serve never apply TTA, nor this threshold",
            "temperature": tta_calibration.temperature,
            # the deployed rule's threshold for TTA's scores (not itself deployed anywhere)
            "threshold": tta_calibration.threshold if positive is not None else None,
            **measure(augmented, calibration=tta_calibration, thresholds=tta_thresholds),
        }

    if framing:
        metrics["framing"] = {
            "crops": [f"{c:.0%}" for c in FRAMING_CROPS],
            "note": "the same films centre-cropped to each fraction of their sides before "
                    "resizing; the same calibration and thresholds as the films as filmed",
            **{f"{c:.0%}": measure(infer(scored.samples, f"{origin} (framed {c:.0%})", crop=c))
               for c in FRAMING_CROPS},
        }

    report_threshold = calibration.threshold if positive is not None else None  # binary only
    report = {
        "split": used_split, "name": name, "n": len(scored.y),
        "n_per_class": films_per_class(scored, labels), "n_patients": len(set(scored.groups)),
        "positive_class": labels[positive] if positive is not None else None,
        "labels": labels, "model": model.spec.name, "weights_sha256": digest,
        "weights_file_sha256": weights_file_digest(run),
        "data": origin, "external": data is not None,
        "data_sha256": fingerprint and fingerprint["sha256"],  # split.csv's films, as trained
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": code_version(), "libraries": library_versions(),
        "probabilities": f"calibrated: softmax(logits / temperature"
                         f"{' + bias' if calibration.bias else ''}), fitted on {source}",
        "threshold_chosen_on": calibration.chosen_on,
        "deployed_threshold": report_threshold,
        "deployed_operating_point": deployed_name(thresholds),
        "adapted_to_films": adapted_to_films,  # transductive when > 0 (`cxr adapt`)
        "bootstrap": {"resamples": bootstrap, "seed": seed, "ci": "95% percentile interval; "
                      "accuracy, sensitivity, specificity, PPV and NPV widened to their Wilson "
                      "interval (on films) where that is wider, as at 0% and 100%",
                      "unit": "patient (the image where unknown)",
                      "note": "binned ECE is biased upwards in resamples (repeated films fill "
                              "bins unevenly), so its interval can lie above its value"},
        **metrics,
        "confusion_matrix": {"labels": labels, "threshold": report_threshold,
                             "counts": confusion_matrix(scored.y, predicted, len(labels)).tolist()},
        "unreadable": [{"path": f.path, "reason": f.reason} for f in scored.failures],
        "notes": notes + degenerate_note(metrics),
    }
    if data is not None:
        report["name"] = name = unclaimed_name(run, name, origin, used_split)
    out = _emptied(run / EVAL_DIR / name)
    write_predictions(out / PREDICTIONS, scored, probs, predicted, labels, tta_probs)
    if figures:
        where = f"{name}, {len(scored.y)} films"
        write_figures(out, model, scored, probs, metrics, thresholds, calibration, seed, where)
    with written_whole(out / METRICS) as whole:
        whole.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    log.info("wrote %s", out)
    return out
