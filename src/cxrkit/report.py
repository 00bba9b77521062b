"""`build_report(run)`: one self-contained RUN/report.html.

The report opens offline and can be mailed as one file: CSS is inline and every
figure is embedded as a base64 PNG. It gathers what the run folder holds (data
audit, training curves, every RUN/eval/<name>/ evaluation) and ends with a model
card. Missing pieces are said to be missing, never invented.
"""

from __future__ import annotations

import base64
import io
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from PIL import Image

from cxrkit.adapt import describe_adaptation, is_transductive
from cxrkit.config import changed_training_keys
from cxrkit.data.audit_report import with_code
from cxrkit.data.io import written_whole
from cxrkit.data.patients import has_parsed_patient, kermany_subtype
from cxrkit.data.split import read_manifest, shared_patients, test_patients_seen_in_training
from cxrkit.evaluation.calibration import N_BINS
from cxrkit.evaluation.metrics import (
    COLLAPSED,
)
from cxrkit.evaluation.published import (
    PUBLISHED,
    is_kermany_test,
    published_curve_rows,
    published_rows,
)
from cxrkit.evaluation.results import (
    HEADLINE,
    NAMES,
    RATES,
    as_deployed,
    at_calibration,
    ensure_evaluated,
    evaluations,
    format_metric,
    headline,
    headline_text,
    read_json,
    read_predictions,
)
from cxrkit.evaluation.thresholds import point_name
from cxrkit.labels import positive_label
from cxrkit.provenance import caveat, code_version, read_attempts
from cxrkit.runs import (
    ADAPTATION,
    SPLIT,
    TRAINED_CONFIG,
    VAL_METRICS,
    Calibration,
    load_spec,
    model_folder,
    read_calibration,
    read_run_config,
    weights_file_digest,
)

log = logging.getLogger(__name__)

REPORT = "report.html"
TEMPLATE = "report.html.j2"  # in cxrkit/templates


FIGURES = (
    ("confusion_matrix.png", "Confusion matrix at the deployed decision rule"),
    ("roc_pr.png", "ROC and precision-recall curves with the operating points"),
    ("reliability.png", "Reliability before and after calibration"),
    ("histograms.png", "Predicted probabilities by true class, with thresholds"),
    ("worst_errors.png", "The most confident mistakes of each true class (false negatives and "
                         "false positives alike)"),
    ("gradcam_errors.png", "Grad-CAM on mistakes: the regions whose features most raised "
                           "the score of the wrongly called class (a coarse map, scaled "
                           "per film; not a localisation of disease)"),
    ("gradcam_correct.png", "Grad-CAM on a random sample of correct cases"),
    ("framing.png", "The framing check: sensitivity and specificity as the same films are "
                    "framed tighter (a model reading framing loses specificity)"),
)
THRESHOLD_FREE = (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("brier", "Brier score"),
                  ("ece", f"ECE of P(positive), {N_BINS} equal-width bins (its interval "
                          "runs high)"))
# A multi-class model's threshold-free scores are other quantities than a binary one's.
MULTICLASS_NAMES = {"roc_auc": "Macro ROC-AUC (one class against the rest, averaged)",
                    "brier": "Brier score, summed over the classes (0 to 2)",
                    "ece": f"Top-label ECE (confidence of the most probable class), {N_BINS} "
                           "equal-width bins (its interval runs high)"}

KERMANY_SHIFT = (
    "Dataset shift: the Kermany/Kaggle films come from one hospital (Guangzhou Women and "
    "Children's Medical Center), of children aged one to five. Other hospitals, scanners, "
    "adults or portable films may behave very differently: validate externally before "
    "trusting any number here.")
OTHER_SHIFT = (
    "Dataset shift: the model knows the hospitals, scanners and patients of its training "
    "films only. Others may behave very differently: validate externally before trusting any "
    "number here.")
FRAMING_DROP = 0.10  # specificity lost to a tighter framing that the summary calls a shortcut
# The audit's advice to carve a validation split: a run carves its own (split.csv, below).
RUN_SPLITS_ITSELF = "no val split:"
STALE = ("evaluated with an earlier calibration ({}, temperature {:.3f}), not the deployed "
         "one: these numbers are not those of the decision rule `cxr predict` uses. Run `cxr "
         "evaluate` again to update them.")
SELECTION_SHIFT = (
    "The internal test split comes from the same source as the training data, yet it differs "
    "from the films validation was carved from (on Kermany's test folder the validation "
    "threshold and temperature shift: specificity falls); another hospital's films may differ "
    "more. Validate on the deployment site's films (`cxr evaluate RUN --data SITE`).")
NOT_EXTERNAL = ("No external validation: every evaluation here is of films from the training "
                "data's own source.")
# The shipped presets whose recipes were chosen with Kermany's test results in view
# (BENCHMARKS.md, "What the test split influenced").
CHOSEN_WITH_TEST_IN_VIEW = {"default", "quick"}
PRESET_CHOSEN_WITH_TEST = (
    "This model's recipe (the `{}` preset) was chosen over development rounds some of which "
    "looked at results on this same test split (BENCHMARKS.md, \"What the test split "
    "influenced\"): its test numbers are somewhat optimistic for a new model made this way. "
    "Its threshold and temperature were chosen on validation only.")
LIMITATIONS = [
    "Shortcut learning: a model can key on text markers, laterality letters, positioning, "
    "cropping or film borders that correlate with the label. Check the Grad-CAM figures for "
    "attention outside the lungs, and run the framing check (`cxr evaluate RUN --split val "
    "--framing`): on Kermany's films every model measured calls tightly framed NORMAL films "
    "pneumonia more often.",
    "Labels are one grading of each film, not a microbiological or CT ground truth; some are "
    "wrong, which caps measurable accuracy.",
    "Grad-CAM highlights the regions whose features raised the score of the class shown; it "
    "does not show that the model used the right findings, it is coarse (the last "
    "convolutional map), scaled per film, and not a localisation of disease.",
    "The decision threshold and the calibration were chosen on the validation split (unless "
    "`--calibrate-on` named other films); a different prevalence or population calls for "
    "re-choosing them on local labelled films: `cxr evaluate RUN --calibrate-on FILMS`.",
]


# ---- reading the run folder -----------------------------------------------------------------

def _b64_png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


# Grids of films: photographs, which PNG stores at ~600 KB each. The page embeds them as
# JPEG where that is smaller (real films: a fraction; flat drawings: not); the PNG files
# stay as they are.
FILM_GRIDS = {"worst_errors.png", "gradcam_errors.png", "gradcam_correct.png"}
GRID_JPEG_QUALITY = 85


def embedded_figure(path: Path) -> dict | None:
    """{"mime", "data"} of a figure file for an <img src="data:...">, None if missing."""
    if path.name not in FILM_GRIDS:
        data = _b64_png(path)
        return data and {"mime": "image/png", "data": data}
    if not path.is_file():
        return None
    buffer = io.BytesIO()
    with Image.open(path) as grid:
        grid.convert("RGB").save(buffer, "JPEG", quality=GRID_JPEG_QUALITY, optimize=True)
    if buffer.tell() >= path.stat().st_size:
        return {"mime": "image/png", "data": _b64_png(path)}
    return {"mime": "image/jpeg", "data": base64.b64encode(buffer.getvalue()).decode()}


def config_edited_since_training(run: Path, config: dict) -> str | None:
    """A caveat where config.yaml no longer says what trained the model (best.ckpt's config,
    kept in .trained_config.json): the report would show the edited one as the recipe."""
    trained = read_json(run / TRAINED_CONFIG)
    changed = changed_training_keys(trained, config) if trained and config else []
    if not changed:
        return None
    return (f"config.yaml was edited after training ({', '.join(sorted(changed))}): the config "
            f"shown below is not the one that trained this model, which {TRAINED_CONFIG} holds.")


def _data_path(config: dict) -> str | None:
    """The training data, wherever a config keeps it (data.path, data_path or data)."""
    data = config.get("data")
    if isinstance(data, dict):
        data = data.get("path") or data.get("root")
    return str(data or config.get("data_path") or "") or None


def _split_summary(run: Path) -> dict | None:
    """Images per split and class, patients per split, and patients shared by two splits."""
    if not (run / SPLIT).is_file():
        return None
    samples = read_manifest(run / SPLIT)
    splits = [s for s in ("train", "val", "test", "") if any(x.split == s for x in samples)]
    classes = sorted({s.label for s in samples})
    counts = {split: Counter(s.label for s in samples if s.split == split) for split in splits}
    return {
        "classes": classes,
        "rows": [{"split": split or "(none)", "counts": [counts[split][c] for c in classes],
                  "total": sum(counts[split].values()),
                  "patients": len({s.patient_id for s in samples if s.split == split})}
                 for split in splits],
        "leaks": {f"{a}/{b}": len(shared_patients(samples, a, b))
                  for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
                  if a in splits and b in splits},
        "test_leak": test_patients_seen_in_training(samples),
        # how validation was carved: by patient where train's films had patient ids
        "by_patient": any(has_parsed_patient(s) for s in samples if s.split in ("train", "val")),
    }


def _find_audit(run: Path, data_path: str | None, given: str | Path | None = None) -> dict | None:
    """The audit `given` (an audit folder or its audit.json); else the run's own (RUN/audit/,
    as `cxr run` writes it); else one beside the run folder (RUNS/audit.json, or RUNS/audit/
    as README's `cxr data audit --out runs/audit/` writes it) if it audited the run's
    training data (not whatever was audited there last)."""
    if given is not None:
        path = Path(given) / "audit.json" if Path(given).is_dir() else Path(given)
        if (audit := read_json(path)) is None:
            raise FileNotFoundError(f"{given}: no audit.json to read; give the folder "
                                    "`cxr data audit --out` wrote, or its audit.json")
        if (data_path and audit.get("root") and Path(data_path).is_absolute()
                and Path(audit["root"]).is_absolute()  # (relative: to a folder unknown here)
                and not _nested(audit["root"], data_path)):
            log.warning("%s audited %s, not %s, which %s trained on: the report shows it as "
                        "given", path, audit["root"], data_path, run.name)
        return audit
    for path in (run / "audit" / "audit.json", run / "audit.json"):
        if (audit := read_json(path)) is not None:
            return audit
    for path in (run.parent / "audit.json", run.parent / "audit" / "audit.json"):
        beside = read_json(path)
        if beside and data_path and _same_place(beside.get("root"), data_path):
            return beside
    return None


def _same_place(a: str | None, b: str) -> bool:
    return a is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _nested(a: str, b: str) -> bool:
    """`a` and `b` are one folder, or one holds the other (DATA and DATA/chest_xray)."""
    a_path, b_path = (Path(p).resolve() for p in (a, b))
    return a_path == b_path or a_path in b_path.parents or b_path in a_path.parents


# ---- turning metrics into table cells --------------------------------------------------------


def _title(m: dict) -> str:
    if m.get("external"):
        return f"external: {m['name']} ({m['split']}, n={m['n']})"
    suffix = " (selection split)" if m["split"] == "val" else ""
    return f"{m['name']}{suffix} (n={m['n']})"


def metric_rows(evals: list[dict]) -> list[dict]:
    """Rows of the metrics table: {"group", "name", "cells": one string per evaluation}."""
    rows = [{"group": "", "name": "Patients", "cells": [str(m.get("n_patients", "–"))
                                                          for m in evals]}]
    binary = all(m.get("positive_class") for m in evals)
    if binary:
        rows.append({"group": "", "name": f"{evals[0]['positive_class']} films (prevalence)",
                     "cells": [_prevalence_text(m) for m in evals]})
        for key, name in THRESHOLD_FREE:
            rows.append({"group": "threshold-free", "name": name,
                         "cells": [format_metric(key, m.get(key)) for m in evals]})
        for block, title in (("sensitivity_at_specificity", "Sensitivity at specificity {}"),
                             ("specificity_at_sensitivity", "Specificity at sensitivity {}")):
            for level in evals[0].get(block, {}):
                cells = [format_metric(block, m.get(block, {}).get(level)) for m in evals]
                rows.append({"group": "best any threshold gives on these films (an upper "
                                      "bound, not an operating point)",
                             "name": title.format(level), "cells": cells})
        points = list(dict.fromkeys(p for m in evals for p in m.get("operating_points", {})))
        # as the evaluations at today's calibration deployed it, not a stale one before them
        deployed = next((m.get("deployed_operating_point") for m in evals
                         if m.get("current", True)), None) or "validation"
        points.sort(key=lambda p: p != deployed)  # the deployed one first
        for point in points:
            ops = [m.get("operating_points", {}).get(point, {}) for m in evals]
            group = (f"at the {point_name(point)} threshold"
                     + (" (deployed)" if point == deployed else ""))
            rows.append({"group": group, "name": "Threshold",
                         "cells": [f"{o['threshold']:.4f}" if o else "–" for o in ops]})
            rows += [{"group": group, "name": NAMES[k], "cells": [format_metric(k, o.get(k))
                                                                  for o in ops]} for k in RATES]
        group = (f"PPV / NPV of the deployed rule if {evals[0]['positive_class']} were this "
                 "common among the films read (from its sensitivity and specificity, the "
                 "ranges from both intervals' ends, wider than 95% intervals; these films' own "
                 "prevalence is above)")
        rows += [{"group": group, "name": f"at {prevalence:.0%} prevalence",
                  "cells": [_predictive_values_text(m, prevalence) for m in evals]}
                 for prevalence in OTHER_PREVALENCES]
        return rows
    for key in ("accuracy", "balanced_accuracy"):
        rows.append({"group": "", "name": NAMES[key],
                     "cells": [format_metric(key, m.get(key)) for m in evals]})
    for key, name in THRESHOLD_FREE:
        if any(key in m for m in evals):  # no PR-AUC for several classes
            rows.append({"group": "", "name": MULTICLASS_NAMES.get(key, name),
                         "cells": [format_metric(key, m.get(key)) for m in evals]})
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "f1"):
        if any(COLLAPSED in m for m in evals):
            rows.append({"group": "NORMAL against the other classes (any finding)",
                         "name": NAMES[key], "cells": [
                             format_metric(key, m.get(COLLAPSED, {}).get(key)) for m in evals]})
    for label in evals[0].get("per_class", {}):
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"):
            cells = [format_metric(key, m.get("per_class", {}).get(label, {}).get(key))
                     for m in evals]
            rows.append({"group": f"class {label}", "name": NAMES[key], "cells": cells})
    return rows


OTHER_PREVALENCES = (0.05, 0.10, 0.20, 0.50)  # PPV and NPV move with it; a clinic's is lower


def positive_films(m: dict) -> tuple[int, int] | None:
    """(films of the positive class, all films) of a binary evaluation; None if unknown."""
    positive, counts = m.get("positive_class"), m.get("n_per_class")
    if counts is None and (matrix := m.get("confusion_matrix")):  # evaluated before n_per_class
        counts = {label: sum(row) for label, row in zip(matrix["labels"], matrix["counts"],
                                                         strict=True)}
    if not positive or not counts or positive not in counts:
        return None
    return counts[positive], sum(counts.values())


def _prevalence_text(m: dict) -> str:
    films = positive_films(m)
    return f"{films[0]} of {films[1]} ({films[0] / films[1]:.1%})" if films and films[1] else "–"


def predictive_values(sensitivity: float, specificity: float,
                      prevalence: float) -> tuple[float | None, float | None]:
    """PPV and NPV of a rule with this sensitivity and specificity at another prevalence
    (Bayes' rule); None where nothing would be called that way."""
    true_pos, false_pos = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    true_neg, false_neg = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return (true_pos / (true_pos + false_pos) if true_pos + false_pos else None,
            true_neg / (true_neg + false_neg) if true_neg + false_neg else None)


def _predictive_values_text(m: dict, prevalence: float) -> str:
    """'33.7% (25.0–45.1) / 99.7% (99.4–99.9)': PPV and NPV, each between its values at the
    low ends and at the high ends of the sensitivity and specificity intervals (both rise
    with either rate: a range wider than a 95% interval)."""
    at = headline(m)
    rates = [at.get(k) or {} for k in ("sensitivity", "specificity")]
    if any(rate.get("value") is None for rate in rates):
        return "–"
    values = [predictive_values(*(rate["value"] for rate in rates), prevalence)]
    if all(None not in (rate.get("ci95") or [None]) for rate in rates):
        values += [predictive_values(*(rate["ci95"][end] for rate in rates), prevalence)
                   for end in (0, 1)]
    return " / ".join(_with_range(*column) for column in zip(*values, strict=True))


def _with_range(value: float | None, low: float | None = None,
                high: float | None = None) -> str:
    if value is None:
        return "–"
    span = f" ({100 * low:.1f}–{100 * high:.1f})" if low is not None and high is not None else ""
    return f"{value:.1%}{span}"


def card_title(m: dict) -> str:
    """An evaluation's name in the headline, with what its numbers rest on: internal or
    external, films and patients, and (two classes) how common the positive class is."""
    if m.get("external"):
        name = f"external: {m['name']} ({m['split']})"
    elif m["split"] == "test":
        name = f"{m['name']}: internal, from the training data's own source"
    else:
        name = f"{m['name']}: the selection split" if m["split"] == "val" else m["name"]
    details = f"{m['n']} films" + (f" of {m['n_patients']} patients"
                                   if m.get("n_patients") else "")
    if films := positive_films(m):
        details += f", {films[0] / films[1]:.1%} {m['positive_class']}"
    return f"{name} ({details})"


KERMANY_CITATION = ("Kermany, Goldbaum et al., Cell 172(5), 2018; the Kaggle copy of its "
                    "Mendeley Data release (CC BY 4.0)")


def subtype_sensitivity(m: dict) -> list[str]:
    """'bacterial 239 of 242 (98.8%)', 'viral ...': the deployed rule's sensitivity for each
    pneumonia subtype that Kermany's file names tell (from predictions.csv)."""
    positive, rows = m.get("positive_class"), read_predictions(m["folder"])
    found: dict[str, list[bool]] = {}
    for row in rows:
        subtype = kermany_subtype(Path(row["path"]).name, row["label"])
        if row["label"] == positive and subtype != positive.upper():
            found.setdefault(subtype, []).append(row["correct"] == "1")
    return [f"{SUBTYPE_NAMES.get(name, name.lower())} {sum(hits)} of {len(hits)} "
            f"({sum(hits) / len(hits):.1%})" for name, hits in sorted(found.items())]


SUBTYPE_NAMES = {"BACTERIA": "bacterial", "VIRUS": "viral"}


def _figures(folder: Path, metrics: dict) -> list[dict]:
    return [{"caption": caption, "alt": alt_text(name, metrics), **image}
            for name, caption in FIGURES if (image := embedded_figure(folder / name))]


def alt_text(figure: str, metrics: dict) -> str | None:
    """What a figure shows, in words, where the page does not say it otherwise: the confusion
    matrix's counts (None: the caption says enough)."""
    matrix = metrics.get("confusion_matrix")
    if figure != "confusion_matrix.png" or not matrix:
        return None
    labels = matrix["labels"]
    rows = [f"true {truth}: " + ", ".join(f"{n} called {called}"
                                          for called, n in zip(labels, row, strict=True))
            for truth, row in zip(labels, matrix["counts"], strict=True)]
    threshold = matrix["threshold"]  # None: several classes, each film its most probable
    rule = ("the most probable class" if threshold is None else f"threshold {threshold:.3f}")
    return f"Confusion matrix at {rule}: {'; '.join(rows)}"


def variant_rows(m: dict, variants: list[dict]) -> list[tuple[str, ...]]:
    """Headline metrics of an evaluation (first column) beside those of its variants."""
    blocks = [headline(m), *(headline(as_deployed(v, m)) for v in variants)]
    return [(NAMES[k], *(format_metric(k, b[k]) for b in blocks))
            for k in HEADLINE if any(b[k] is not None for b in blocks)]


def variant_tables(m: dict) -> list[dict]:
    """The test-time augmentation, unseen-patient and framing-check tables of one evaluation,
    where made."""
    title = m.get("title") or _title(m)  # (a report sets it; `cxr evaluate` has metrics.json)
    tables = []
    if "tta" in m:
        tables.append({"title": f"Test-time augmentation: {title}",
                       "columns": ["plain", "with TTA"],
                       "note": f"Views: {', '.join(m['tta']['views'])}; logits averaged; "
                               "temperature and threshold chosen on the validation films "
                               "scored with the same views.",
                       "rows": variant_rows(m, [m["tta"]])})
    if "unseen_patients" in m:
        tables.append(seen_table(m))
    if "framing" in m:
        crops = m["framing"]["crops"]
        tables.append({"title": f"Framing check: {title}", "columns": ["as filmed", *crops],
                       "note": f"{m['framing']['note'].capitalize()}. A model that reads the "
                               "lungs keeps its specificity; one that learned framing as a "
                               "shortcut calls tightly framed NORMAL films pneumonia.",
                       "rows": variant_rows(m, [m["framing"][c] for c in crops])})
    return tables


def seen_table(m: dict) -> dict:
    """All test films, those of patient ids also in train or val, and the others': each
    class's rate compared across the last two (evaluations from before the seen films were
    kept have the first and the last)."""
    unseen, seen = m["unseen_patients"], m.get("seen_patients")
    parts = [("all test films", m), *([("ids also in train or val", seen)] if seen else []),
             ("ids not in train or val", unseen)]
    note = (f"{unseen['note'].capitalize()}. Compare each class's rate across the columns: "
            "sensitivity over the positive films, specificity over the others (accuracy, F1, "
            "PPV and NPV move with each column's class mix). Close rates give no sign that the "
            "shared ids raised the test numbers; a column of few films rules out little (its "
            "interval says how little).")
    if seen and (absent := [label for label, n in (seen.get("n_per_class") or {}).items()
                            if not n]):
        note += (f" No {' or '.join(absent)} film belongs to a shared id: "
                 f"{'those rates' if len(absent) > 1 else 'that rate'} can only be read in "
                 "the last column.")
    return {"title": f"Test patients not in train or val ({unseen['n']} of {m['n']} films): "
                     f"{m['name']}",
            "columns": [f"{name}\n({_class_mix(part)})" for name, part in parts],
            "note": note, "rows": variant_rows(m, [part for _, part in parts[1:]])}


def _class_mix(part: dict) -> str:
    """'304 films: 234 NORMAL, 70 PNEUMONIA' (its class counts where recorded)."""
    films = f"{part['n']} film{'s' * (part['n'] != 1)}"
    counts = part.get("n_per_class")
    return films + (": " + ", ".join(f"{n} {label}" for label, n in counts.items())
                    if counts else "")


# val_metrics.json's fields as the Training section names them (rates at P = 0.5, in %);
# bookkeeping (global step, counts of unreadable films) stays in the file.
VAL_ROWS = {"accuracy": "Accuracy at P = 0.5", "sensitivity": "Sensitivity at P = 0.5",
            "specificity": "Specificity at P = 0.5", "f1": "F1 at P = 0.5",
            "roc_auc": "ROC-AUC",
            "loss": "Loss (all films at once)",
            "images": "Validation films",
            "best_stage": "Kept: stage", "best_epoch": "Kept: epoch", "monitor": "Kept by"}
VAL_ROWS_MULTICLASS = VAL_ROWS | {
    "accuracy": "Accuracy (the most probable class)",
    "sensitivity": "Sensitivity, macro (the most probable class)",
    "specificity": "Specificity, macro (the most probable class)",
    "f1": "F1, macro (the most probable class)", "roc_auc": "Macro ROC-AUC"}
VAL_BOOKKEEPING = {"best_global_step", "unreadable", "threshold"}  # (0.5: the rows say it)


def val_rows(values: dict, binary: bool = True) -> list[tuple[str, str]]:
    """(name, text) per scalar of val_metrics.json, known fields named and formatted (a
    multi-class run's rates are macro averages of its most probable class, no threshold)."""
    names = VAL_ROWS if binary else VAL_ROWS_MULTICLASS
    rows = []
    for key, value in values.items():
        if isinstance(value, dict | list) or key in VAL_BOOKKEEPING:
            continue
        if value is None:  # undefined: validation without one of the classes
            text = "–"
        elif key in names and key in RATES and isinstance(value, float):
            text = f"{100 * value:.1f}%"
        else:
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append((names.get(key, key), text))
    return rows


def caveats(evals: list[dict], split: dict | None,
            calibration: Calibration | None = None) -> list[str]:
    """What a reader must know before trusting the headline: a framing shortcut, probabilities
    the temperature made worse, a model adapted to the films it is scored on, patient ids the
    test split shares with train or val, an operating point chosen on another site's films."""
    found = []
    if calibration and calibration.chosen_with.get("calibrate_on"):
        found.append(f"the threshold and probabilities were chosen on {calibration.chosen_on} "
                     "(`--calibrate-on`), the site this model is deployed to: every result "
                     "here, the internal test's too, is scored at that site's operating point.")
    for m in evals:
        framing = m.get("framing")
        plain = (headline(m).get("specificity") or {}).get("value")
        if framing and plain is not None:
            framed = {c: headline(as_deployed(framing[c], m)).get("specificity") or {}
                      for c in framing["crops"]}
            crop, worst = min(((c, spec.get("value")) for c, spec in framed.items()),
                              key=lambda cv: cv[1] or 0.0)
            if worst is not None and plain - worst > FRAMING_DROP:
                found.append(f"on {m['title']}, framed to {crop} the specificity falls from "
                             f"{plain:.0%} to {worst:.0%}: the model reads how a film is "
                             "framed, a shortcut (Framing check below).")
        made = m.get("calibrated") or {}
        before, after = made.get("ece_before"), made.get("ece_after")
        if before and after and after["value"] > before["value"]:
            brier = (f", Brier score {made['brier_before']['value']:.3f} → "
                     f"{made['brier_after']['value']:.3f}"
                     if made.get("brier_before") and made.get("brier_after") else "")
            found.append(f"on {m['title']}, the temperature chosen on validation made the "
                         f"probabilities less calibrated (ECE {before['value']:.3f} → "
                         f"{after['value']:.3f}{brier}): read them as ranking scores, not as "
                         "the chance of the class; a shown 1.00 is not certainty.")
    for m in evals:
        if is_transductive(m):
            found.append(f"on {m['title']}, the model was adapted (`cxr adapt`) to these very "
                         "films: a transductive result, to report apart from films it never "
                         "saw.")
    if leak := (split or {}).get("test_leak"):
        found.append(leak)
    return found


def selection_shift(test: dict) -> str | None:
    """The deployed rule on the films that chose it beside the internal test, in numbers
    (None: not recorded, or not two classes)."""
    chosen = test.get("selection_split")
    if not chosen or not test.get("positive_class"):
        return None
    on_test, on_chosen = headline(test), headline(chosen | {
        "deployed_operating_point": test.get("deployed_operating_point")})

    def rate(at: dict, key: str) -> str:
        value = (at.get(key) or {}).get("value")
        return "–" if value is None else f"{value:.1%}"

    def ece(m: dict) -> str:
        value = (m.get("ece") or {}).get("value")
        return "–" if value is None else f"{value:.3f}"

    threshold = test.get("deployed_threshold")
    own = chosen["name"] == "validation"  # else another site's films (`--calibrate-on`)
    source = ("Validation comes from the training films' source; another hospital's films may "
              "shift further." if own else "Those are another site's labelled films "
              "(`--calibrate-on`), not the ones evaluated.")
    return (f"At the deployed threshold ({threshold:.3f}), chosen on {chosen['name']} "
            f"({chosen['n']} films): sensitivity {rate(on_chosen, 'sensitivity')} there and "
            f"{rate(on_test, 'sensitivity')} on the internal test, specificity "
            f"{rate(on_chosen, 'specificity')} there and {rate(on_test, 'specificity')} on the "
            f"test, calibration error (ECE) {ece(chosen)} and {ece(test)}. {source} Validate "
            "on the deployment site's films (`cxr evaluate RUN --data SITE`).")


def limitations(evals: list[dict], test: dict | None, kermany: bool, config: dict) -> list[str]:
    """The model card's known limitations, with this run's own numbers where it has them
    (`evals`: every evaluation, those at an earlier calibration too: an external one still
    was made)."""
    found = [KERMANY_SHIFT if kermany else OTHER_SHIFT]
    if not any(m.get("external") for m in evals):
        found.append(NOT_EXTERNAL)
    found.append((test and selection_shift(test)) or SELECTION_SHIFT)
    if kermany and config.get("recipe") in CHOSEN_WITH_TEST_IN_VIEW:
        found.append(PRESET_CHOSEN_WITH_TEST.format(config["recipe"]))
    return found + LIMITATIONS


def _training_curves(run: Path) -> Path:
    """RUN/training_curves.png drawn again from metrics.csv, so that a run trained by an
    older cxrkit shows today's figure (its caption describes it); as it is without one."""
    from cxrkit.training.curves import CURVES_PNG, METRICS_CSV, plot_curves

    return plot_curves(run) if (run / METRICS_CSV).is_file() else run / CURVES_PNG


def _carved(config: dict | None) -> bool | None:
    """Whether the run carved its validation split from train by patient (None: unknown)."""
    fraction = ((config or {}).get("data") or {}).get("val_fraction")
    return None if fraction is None else fraction > 0


def stale_note(metrics: dict) -> str:
    threshold = metrics.get("deployed_threshold")  # None: several classes, argmax
    return STALE.format("argmax" if threshold is None else f"threshold {threshold:.4f}",
                        metrics.get("calibrated", {}).get("temperature", 1.0))


def build_report(run: str | Path, split: str = "test", evaluate_missing: bool = True,
                 audit: str | Path | None = None) -> Path:
    """Write RUN/report.html (evaluating RUN's `split` first if it has no evaluation yet).
    `audit`: the data audit to show (a `cxr data audit` folder or its audit.json); by
    default the run's own, or one of its training data beside the run folder."""
    run = model_folder(run).resolve()
    spec, config = load_spec(run), read_run_config(run)
    found_audit = _find_audit(run, _data_path(config), audit)  # a wrong path said before work
    if evaluate_missing:
        ensure_evaluated(run, split)
    calibration, weights = read_calibration(run), weights_file_digest(run)
    evals = evaluations(run)
    for m in evals:
        m["figures"], m["title"] = _figures(m["folder"], m), _title(m)
        m["current"] = at_calibration(m, calibration, weights)
        if not m["current"]:
            m["notes"] = [*m.get("notes", []), stale_note(m)]
    current = [m for m in evals if m["current"]]
    test = next((m for m in current if m["split"] == "test" and not m.get("external")), None)
    binary_test = test if test and test.get("positive_class") else None
    kermany = binary_test is not None and is_kermany_test(binary_test["folder"])
    card_metrics = [(card_title(m), headline_text(m)) for m in current]
    val_metrics = read_json(run / VAL_METRICS) or {}
    attempts = read_attempts(run)
    adaptation = read_json(run / ADAPTATION)
    split = _split_summary(run)
    environment = Environment(loader=PackageLoader("cxrkit"), autoescape=True)
    environment.filters["code"] = lambda text: Markup(with_code(str(text)))
    page = environment.get_template(TEMPLATE).render(
        run_name=run.name, run_path=str(run), spec=spec, version=code_version(),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        audit=found_audit, split=split,
        curves=_b64_png(_training_curves(run)),
        members=val_metrics.get("members", []),
        val_metrics=val_rows(val_metrics, binary=len(spec.labels) == 2),
        config_text=yaml.safe_dump(config, sort_keys=False) if config else "",
        evals=evals, rows=metric_rows(evals) if evals else [],
        calibration=calibration, adaptation=adaptation,
        adaptation_text=adaptation and describe_adaptation(adaptation),
        variants=[table for m in current for table in variant_tables(m)],
        published=published_rows(binary_test) if kermany else None,
        published_curve=published_curve_rows(binary_test["folder"]) if kermany else None,
        published_source=PUBLISHED["source"], test=test, test_n=test["n"] if test else 0,
        positive=positive_label(spec.labels, spec.positive_label),
        data_path=_data_path(config), card_metrics=card_metrics, kermany=kermany,
        citation=KERMANY_CITATION, subtypes=subtype_sensitivity(binary_test) if kermany else [],
        carved=_carved(config), trained_with=attempts[0] if attempts else None,
        attempts_differ=caveat(attempts),
        limitations=limitations(evals, test, kermany, config),
        RUN_SPLITS_ITSELF=RUN_SPLITS_ITSELF, weights_sha256=test and test.get("weights_sha256"),
        caveats=[*caveats(current, split, calibration),
                 *filter(None, [config_edited_since_training(run, config)])],
    )
    out = run / REPORT
    with written_whole(out) as partial:  # a full disk leaves the report there before whole
        partial.write_text(page, encoding="utf-8")
    return out
