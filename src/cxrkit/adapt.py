"""Unsupervised adaptation to a new hospital's films: re-estimate BatchNorm statistics.

A model trained on one source sees films from another scanner with other
contrast, exposure and processing; its BatchNorm layers then normalise with the
wrong statistics. Re-estimating them on the target site's *unlabelled* images
(AdaBN, Li et al. 2016) is cheap and often recovers much of the lost
specificity. No labels are read: only the image files.

The adapted model is written as a new run folder beside the source run, with
the same split, config and provenance, plus `adaptation.json` saying what was done,
so it can be evaluated and compared like any other run. Not the calibration: the
adapted model's scores moved, so its first evaluation chooses the operating point
again, the way the source run's was chosen (until then it predicts at 0.5, said).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cxrkit.data.kaggle import resolve_data
from cxrkit.data.layout import DataLayoutError, images_under, load_source
from cxrkit.provenance import PROVENANCE
from cxrkit.runs import (
    ADAPTATION,
    CONFIG,
    MODEL_WEIGHTS,
    SPLIT,
    VAL_METRICS,
    load_model,
    model_folder,
    read_calibration,
    save_model,
)

if TYPE_CHECKING:  # PyTorch is imported where films are read: reports read adaptation.json
    import torch

    from cxrkit.models import Classifier

log = logging.getLogger(__name__)

# Not calibration.json: the adapted model's logits differ, so its threshold, temperature and
# bias are chosen again by evaluating it (`cxr evaluate`); until then predict warns.
COPIED_FILES = (CONFIG, SPLIT, "labels.json", PROVENANCE)  # PROVENANCE: what trained it


def target_images(data: str | Path, split: str | None = "test") -> list[str]:
    """The image paths of `data`: one split of a dataset with splits, else every image
    under the folder (unlabelled films need no class folders). Labels are never read."""
    return _target(data, split)[0]


def _target(data: str | Path, split: str | None) -> tuple[list[str], str | None]:
    """(`target_images`, the split they are: None where `data` has no splits)."""
    try:
        source = load_source(data)
    except DataLayoutError:
        return [str(p) for p in images_under(Path(data), any_name=True)], None
    named = [name for name in source.splits if name]
    if split and named and split not in named:  # never every film, test films included
        raise ValueError(f"{data} has the splits {', '.join(named)}, no {split!r}: choose one "
                         f"of them (--split; Python: split=)")
    if split and split in named:
        return [s.path for s in source.split(split)], split
    return [s.path for s in source.samples], None


def _image_batches(model: Classifier, paths: list[str], batch_size: int,
                   device: torch.device, read: list[int], unreadable: list[str],
                   doubtful: list[str] | None = None) -> Iterator[torch.Tensor]:
    """The films of `paths` as batches; counts those read into `read` and names those not,
    and (`doubtful`) those read that are hardly chest films (`film_doubt`)."""
    import torch

    from cxrkit.data.transforms import ModelInput
    from cxrkit.inference import file_batches

    finish = ModelInput(model.spec)
    for x, _, failed, doubts in file_batches(model.spec, paths, batch_size,
                                             doubts=doubtful is not None):
        unreadable += [f"{paths[i]} ({reason})" for i, reason in failed]
        if doubtful is not None:
            doubtful += [f"{paths[i]} ({doubt})" for i, doubt in doubts]
        if x is not None:
            read[0] += len(x)
            yield finish(x.to(device)).contiguous(memory_format=torch.channels_last)


def adapt_batchnorm(model: Classifier, paths: list[str], batch_size: int = 32,
                    device: torch.device | str | None = None,
                    doubtful: list[str] | None = None) -> tuple[Classifier, int]:
    """Replace every BatchNorm's running mean/var with their average over the films of
    `paths` that can be read; returns the model and how many films that was (`doubtful`:
    a list to add those read that are hardly chest films to, with why). None readable:
    a ValueError naming one (the model given has lost its statistics by then: adapt a copy,
    as `adapt_run` does); no paths at all: a ValueError before the model is touched."""
    import torch
    from torch.optim.swa_utils import update_bn

    from cxrkit.inference import resolve_device

    if not paths:
        raise ValueError("no films to adapt on: give the new site's image files")
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # update_bn would read no film at all, and the error below would blame the films
        raise ValueError(f"{model.spec.name} has no BatchNorm layers, so no statistics to "
                         "re-estimate: `cxr adapt` and model.norm_stats: train need a model "
                         "with BatchNorm (EfficientNet-Lite, ResNet, simple_cnn)")
    device = resolve_device(device)
    model = model.to(device, memory_format=torch.channels_last)
    read, unreadable = [0], []
    # update_bn resets the statistics and averages them over all batches (momentum=None).
    update_bn(_image_batches(model, paths, batch_size, device, read, unreadable, doubtful),
              model, device=device)
    if not read[0]:
        raise ValueError(f"none of the {len(paths)} files to adapt on can be read as a film "
                         f"(e.g. {unreadable[0] if unreadable else paths[0]}): nothing to "
                         "re-estimate BatchNorm statistics on")
    return model.eval().cpu(), read[0]


def frozen_backbone_warning(run: Path) -> str | None:
    """A warning when the run's model kept ImageNet BatchNorm statistics (best from a frozen stage,
    unless `model.norm_stats: train` replaced them with training-film statistics first).

    AdaBN assumes the head was trained on features normalised with *training-film*
    statistics. A backbone frozen throughout kept ImageNet's, so swapping in any film
    statistics moves the features away from what the head learned (measured: test ROC-AUC
    0.965 -> 0.850, BENCHMARKS.md).
    """
    if (run / "members").is_dir():  # an ensemble: each member judged on its own
        members = sorted(p for p in (run / "members").iterdir() if p.is_dir())
        return next(filter(None, map(frozen_backbone_warning, members)), None)
    try:
        best = json.loads((run / VAL_METRICS).read_text(encoding="utf-8"))["best_stage"]
        config = yaml.safe_load((run / CONFIG).read_text(encoding="utf-8"))
        stages = config["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None  # not a `cxr train` run: nothing to judge by
    if config.get("model", {}).get("norm_stats") == "train":
        return None  # the frozen stage already saw film statistics (`model.norm_stats: train`)
    if any(s.get("name") == best and s.get("unfreeze") == "none" for s in stages):
        return (f"{run}'s best model comes from the frozen-backbone stage {best!r}: its BatchNorm "
                "layers hold ImageNet statistics the head was trained with, and re-estimating "
                "them on films usually hurts. Adapt a fine-tuned run instead.")
    return None


MIN_TARGET_IMAGES = 100  # below this, re-estimated statistics are mostly noise


def describe_adaptation(done: dict) -> str:
    """One sentence from an adaptation.json."""
    return (f"This model was adapted with `cxr adapt` from {done['source_run']}: BatchNorm "
            f"statistics re-estimated on {done['n_images']} unlabelled films of "
            f"{done['target_data']}"
            + (f" (split {done['target_split']})." if done.get("target_split") else "."))


def adaptation_note(run: Path, evaluated: list[str]) -> tuple[str | None, int]:
    """What `cxr adapt` did to RUN's model, for its evaluations and report (None if nothing),
    and how many of the films evaluated are among those it adapted to: a result on them is
    transductive, to report apart from one on films the model never saw."""
    file = run / ADAPTATION
    if not file.is_file():
        return None, 0
    done = json.loads(file.read_text(encoding="utf-8"))
    note = describe_adaptation(done)
    try:
        adapted_on = {str(Path(p).resolve()) for p in target_images(done["target_data"],
                                                                   done["target_split"])}
    except (DataLayoutError, OSError, ValueError):
        return note + " Those films are no longer where they were: overlap not checked.", 0
    shared = sum(str(Path(p).resolve()) in adapted_on for p in evaluated)
    if shared:
        note += (f" {shared} of the {len(evaluated)} films evaluated are among them "
                 f"(transductive: their labels were never used, but report this apart from "
                 f"results on films the model never saw).")
    return note, shared


def is_transductive(metrics: dict) -> bool:
    """Whether an evaluation (its metrics.json) scored films its model was adapted to; those
    written before the count was recorded say so in a note."""
    if "adapted_to_films" in metrics:
        return metrics["adapted_to_films"] > 0
    return any("films evaluated are among them (transductive:" in note
               for note in metrics.get("notes", []))


def source_calibration_options(run: Path) -> dict:
    """For an adapted run not evaluated yet: the options that chose its source run's
    operating point (--target-sensitivity, --framing-threshold, --calibrate-on), so that
    its first evaluation chooses again the same way, on its own logits."""
    done = run / ADAPTATION
    if not done.is_file():
        return {}
    return json.loads(done.read_text(encoding="utf-8")).get("source_chosen_with", {})


def adapt_run(run: str | Path, data: str | Path, split: str | None = "test",
              out: str | Path | None = None, batch_size: int = 32) -> Path:
    """Adapt a trained run to the unlabelled images of `data` (`split` of a dataset with
    splits; ignored for a plain folder); returns the new run folder. Evaluating it on the
    very films it adapted to is transductive, and its evaluation says so."""
    run = model_folder(run)
    data = resolve_data(data).resolve()  # "kaggle": the folder it stands for; absolute, so
    # that the transductive check finds those films from any working folder
    out = Path(out) if out else run.with_name(f"{run.name}-adapted")
    if (out / MODEL_WEIGHTS).exists() or (out / CONFIG).exists():
        raise FileExistsError(f"{out} already holds a run: adapting into it would replace its "
                              "model under its evaluations and calibration; give another --out "
                              "(Python: out=...)")
    paths, used = _target(data, split)
    if not paths:
        raise ValueError(f"no images to adapt on in {data}"
                         + (f" (split {used!r})" if used else ""))
    doubtful: list[str] = []
    model, n_read = adapt_batchnorm(load_model(run), paths, batch_size, doubtful=doubtful)
    warnings = [frozen_backbone_warning(run)]
    if n_read < MIN_TARGET_IMAGES:
        warnings.append(f"only {n_read} target film(s) read: BatchNorm statistics from fewer "
                        f"than {MIN_TARGET_IMAGES} films are noisy and can shift every "
                        "prediction; adapt on a few hundred of the new site's films")
    if n_read < len(paths):
        warnings.append(f"{len(paths) - n_read} of the {len(paths)} files could not be read "
                        "and were left out")
    if doubtful:  # their statistics are averaged in with the films'
        warnings.append(f"{len(doubtful)} of the films read are hardly chest films (e.g. "
                        f"{doubtful[0]}) and were adapted to all the same: remove them from "
                        "the target data and adapt again")
    warning = " ".join(filter(None, warnings)) or None
    if warning:
        log.warning(warning)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    for name in COPIED_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    (out / ADAPTATION).write_text(json.dumps({
        "method": "batchnorm statistics re-estimated on unlabelled target images (AdaBN)",
        "source_run": str(run),
        "target_data": str(data),
        "target_split": used,
        "n_images": n_read,
        "labels_used": False,
        "source_chosen_with": read_calibration(run).chosen_with,
        "warning": warning,
    }, indent=2), encoding="utf-8")
    return out
