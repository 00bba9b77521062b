"""`train(config) -> run folder`: a whole training run, stage by stage, resumable.

    from cxrkit.config import TrainConfig
    from cxrkit.training import train
    run = train(TrainConfig.preset("quick", data="path/to/chest_xray"))

A run (see `cxrkit.runs`) goes:
1. the data's train split is split train/val by patient (`RUN/split.csv`), the
   resolved config is saved (`RUN/config.yaml`);
2. each stage of `config.stages` is one Lightning `Trainer.fit`; a stage starts from
   the best weights so far (`RUN/best.ckpt`) and is recorded in `RUN/stages.json`
   when it finishes;
3. the best checkpoint becomes `RUN/model.safetensors` (+ model.json, labels.json),
   scored on the validation images (`RUN/val_metrics.json`), with `RUN/metrics.csv`
   and `RUN/training_curves.png`.

`train(resume=RUN)` continues a killed run: finished stages are skipped and the
interrupted one continues from `RUN/last.ckpt` (written every few optimiser steps)
with the run's own config and split. Multi-GPU and multi-node runs are Lightning's
(`trainer.devices`, `num_nodes`, `strategy`); processes that Lightning launches
find the run folder through the environment, and for several nodes give
`config.name` so every node uses the same folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cxrkit.adapt import adapt_batchnorm
from cxrkit.config import (
    ConfigError,
    NoSpaceError,
    OutOfMemoryError,
    StageConfig,
    TrainConfig,
    changed_training_keys,
    differing_keys,
    out_of_memory,
    to_dict,
)
from cxrkit.data.dataset import films_by_split
from cxrkit.data.io import written_whole
from cxrkit.data.layout import DataLayoutError, Sample
from cxrkit.data.split import (
    identical_file_groups,
    identical_films_of_two_labels,
    patients_normal_and_ill,
    read_manifest,
    test_patients_seen_in_training,
    training_films_in_test,
    write_manifest,
)
from cxrkit.evaluation.scoring import cached, run_manifest, score
from cxrkit.labels import positive_index, positive_is_guessed
from cxrkit.models import Classifier, create_model
from cxrkit.models.ensemble import Ensemble
from cxrkit.plots import extra_formats, save_figure
from cxrkit.provenance import FILM_HASHES, data_fingerprint, gather_members
from cxrkit.runs import (
    CONFIG,
    MODEL_WEIGHTS,
    RUN_LOG,
    SKIPPED,
    SPLIT,
    TRAINED_CONFIG,
    TRAINING_LOCK,
    VAL_METRICS,
    load_model,
    logged_to,
    save_model,
    training_lock,
)
from cxrkit.training.callbacks import (
    BEST,
    LAST,
    RecordConfig,
    RecordProvenance,
    StopAtBatchEnd,
    make_callbacks,
    make_loggers,
    make_trainer,
    read_checkpoint,
    sigterm_raises,
)
from cxrkit.training.curves import collect_metrics, plot_curves
from cxrkit.training.datamodule import (
    XrayDataModule,
    class_counts,
    prepare_samples,
    processes_here,
    task_classes,
)
from cxrkit.training.features import FeatureDataModule
from cxrkit.training.losses import balanced_class_weights, make_loss
from cxrkit.training.module import ClassifierModule, make_metrics, metric_inputs

log = logging.getLogger(__name__)

PROGRESS = "stages.json"
RUN_DIR_ENV = "CXRKIT_RUN_DIR"  # hands the run folder to processes Lightning launches
# What training sets in the environment: the run folder, Lightning's seeds for its workers
SET_FOR_LAUNCHES = (RUN_DIR_ENV, "PL_GLOBAL_SEED", "PL_SEED_WORKERS")

# Lightning warnings that are expected here: the run folder already holds config.yaml,
# the module (not the DataModule) converts batches to channels_last, a frozen backbone
# trains in eval mode, weight averaging (configure_model only sets the memory layout).
EXPECTED_WARNINGS = (r"Checkpoint directory .* exists and is not empty",
                     r"You have overridden `on_after_batch_transfer`",
                     r"Found \d+ module\(s\) in eval mode",
                     r".*isinstance\(treespec, LeafSpec\)",
                     r"You're using the WeightAveraging callback with a model that overrides",
                     # DDP: each process's epoch means, logged by rank 0 (its own films;
                     # a resumed run gives every rank rank 0's sums, which only it logs)
                     r"It is recommended to use `self.log\('(train_loss_epoch|epoch_seconds|"
                     r"train_images_per_s)', \.\.\., sync_dist=True\)`")


@dataclass
class Run:
    folder: Path
    config: TrainConfig
    samples: list[Sample]  # train, val and test rows, as in split.csv
    classes: list[str]


def build_model(config: TrainConfig, classes: list[str]) -> Classifier:
    m = config.model
    model = create_model(m.name, len(classes), m.pretrained, m.weights, classes, m.dropout)
    if m.input_size:
        model.spec.input_size = m.input_size
    model.spec.equalize = config.data.equalize
    return model


def loss_class_weights(config: TrainConfig, counts: list[int]) -> list[float] | None:
    mode = config.loss.class_weights
    if mode == "auto":  # a balanced sampler already evens the classes out
        mode = "none" if config.data.balanced_sampler else "balanced"
    return balanced_class_weights(counts) if mode == "balanced" else None


def build_stage(run: Run, index: int, model: Classifier, processes: int | None = None
                ) -> tuple[ClassifierModule, LightningDataModule]:
    """The LightningModule and DataModule of stage `index`; `processes`: how many train on
    this machine (default: as the config's trainer asks), sharing its loader workers."""
    config, stage = run.config, run.config.stages[index]
    module = ClassifierModule(
        spec=to_dict(model.spec), stage=to_dict(stage), optim=to_dict(config.optim),
        loss=to_dict(config.loss),
        class_weights=loss_class_weights(config, class_counts(run.samples, run.classes)),
        positive_index=positive_index(run.classes, model.spec.positive_label),
        channels_last=config.trainer.channels_last,
        compile=config.trainer.compile, model=model,
    )
    batch_size = stage_batch_size(config, index)
    images = XrayDataModule(run.samples, run.classes, model.spec, config.data, batch_size,
                            augment=stage.augment, seed=config.seed,
                            unreadable_file=stage_unreadable(run.folder, stage.name),
                            processes=processes or processes_here(config.trainer))
    if stage.frozen_features:
        file = stage_features(run.folder, stage.name)
        return module, FeatureDataModule(images, model.backbone, file, batch_size,
                                         stage.feature_views)
    return module, images


# --- the run folder ------------------------------------------------------------------------

def _file_safe(model_name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", model_name.removeprefix("timm:"))


def _launched_outside() -> int:
    """How many processes a launcher started beside this one, each running this command
    (torchrun: its own variables; srun: a job step's), not ones Lightning will start itself;
    0 otherwise. (Lightning's own launch leaves WORLD_SIZE set in the first process.)"""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        processes = os.environ.get("WORLD_SIZE", "1")
    elif "SLURM_STEP_ID" in os.environ:  # inside srun, not merely in an allocation
        processes = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "1")
    else:
        return 0
    count = int(processes) if processes.isdigit() else 1
    return count if count > 1 and RUN_DIR_ENV not in os.environ else 0


def _job_name(config: TrainConfig) -> str:
    """The run folder's name that every process of an outside-launched job derives alike:
    the SLURM job and step (each srun of a job its own), or torchrun's rendezvous id."""
    model = _file_safe(config.model.name)
    if (run_id := os.environ.get("TORCHELASTIC_RUN_ID", "none")) != "none":  # its default
        return f"torchelastic-{run_id}-{model}"  # (each torchrun of a SLURM job its own)
    if (job := os.environ.get("SLURM_JOB_ID")) and "SLURM_STEP_ID" in os.environ:
        return f"slurm-{job}.{os.environ['SLURM_STEP_ID']}-{model}"
    raise ConfigError(f"started by a launcher as one of {_launched_outside()} processes and no "
                      "run name: each process would make its own folder. Give every process "
                      "the same --name (overrides={'name': ...}), or torchrun a --rdzv-id.")


def _run_folder(config: TrainConfig) -> Path:
    inherited = os.environ.get(RUN_DIR_ENV)
    if rank_zero_only.rank > 0 and inherited:  # a process Lightning launched for DDP
        return Path(inherited)
    runs = Path(config.runs_dir)
    name = config.name or (_job_name(config) if _launched_outside() else None)
    if name:
        folder = runs / name
        if rank_zero_only.rank == 0 and (folder / CONFIG).exists():
            raise FileExistsError(f"{folder} already holds a run: continue it with "
                                  f"`cxr train --resume {folder}` (`cxr run --resume` also "
                                  f"evaluates and reports it; Python: train(resume=...)), or "
                                  f"choose another --name (overrides={{'name': ...}})")
    else:
        stem = f"{datetime.now():%Y%m%d-%H%M%S}-{_file_safe(config.model.name)}"
        folder, n = runs / stem, 2
        while folder.exists():
            folder, n = runs / f"{stem}-{n}", n + 1
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(folder)
    return folder


def _absolute_data(config: TrainConfig) -> TrainConfig:
    """Its data folder or manifest named absolutely, so that `--config RUN/config.yaml`
    reproduces the run from any folder ("kaggle" and paths not there as they are)."""
    local = Path(config.data.path).expanduser()
    if config.data.path.lower() != "kaggle" and local.exists():
        return config.updated({"data.path": str(local.resolve())})
    return config


def existing_run(config: TrainConfig) -> Path | None:
    """The run folder `config` names (runs_dir/name) where it already holds a run of this
    config, else None (a new run starts there): a retried job continues its run. Refused
    where the folder holds a run of another config or data, which it would replace."""
    if not config.name:
        raise ConfigError("--resume-if-exists needs --name (overrides={'name': ...}): a run "
                          "folder named by the time it starts never exists before")
    folder = Path(config.runs_dir) / config.name
    if not (folder / CONFIG).is_file():
        return None
    saved, config = TrainConfig.load(folder / CONFIG), _absolute_data(config)
    changed = _changed_keys(to_dict(saved), config)
    if saved.data.path != config.data.path:  # free on --resume (the data moved), not here
        changed.append("data.path")
    if changed:
        verb = "differs" if len(changed) == 1 else "differ"
        raise ConfigError(
            f"{folder} holds a run of another config ({', '.join(sorted(changed))} {verb} "
            f"from its config.yaml): choose another --name for this one, or continue that "
            f"run as it is with `cxr train --resume {folder}`")
    return folder


def new_run(config: TrainConfig) -> Run:
    config.validate()
    config = _absolute_data(config)
    samples = prepare_samples(config.data, config.seed)
    classes = task_classes(config.data.task, samples)
    if positive_is_guessed(classes):
        log.warning("labels %s and %s: sensitivity, specificity and the threshold will be about "
                    "%s (the last label), the finding to detect. If the finding is %s, name "
                    "the other class NORMAL (its folder or the manifest's label)", *classes,
                    classes[1], classes[0])
    copies = identical_file_groups(sorted({s.path for s in samples}))  # read once, for both
    for doubt in (test_patients_seen_in_training(samples),
                  training_films_in_test(samples, copies), patients_normal_and_ill(samples),
                  identical_films_of_two_labels(samples, copies)):
        if doubt:
            log.warning("%s", doubt)
    folder = _run_folder(config)
    if rank_zero_only.rank == 0:
        config.save(folder / CONFIG)
        write_manifest(samples, folder / SPLIT)
        log.info("run folder: %s", folder)  # said now: a closed terminal must not lose it
    return Run(folder, config, samples, classes)


def open_run(folder: str | Path) -> Run:
    folder = Path(folder).absolute()
    missing = [name for name in (CONFIG, SPLIT) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a run to resume ({', '.join(missing)} missing);"
                                " pass the run folder a training printed")
    config = TrainConfig.load(folder / CONFIG)
    samples = read_manifest(folder / SPLIT)
    _check_films_still_there(folder, samples)
    return Run(folder, config, samples, task_classes(config.data.task, samples))


def _check_films_still_there(folder: Path, samples: list[Sample]) -> None:
    """Before a resume: split.csv names each film by the absolute path it had when the run
    started. All gone means the data moved; some gone, that it changed. Said once, here,
    rather than as one warning per film while the caches are built."""
    used = [s.path for s in samples if s.split in ("train", "val")]
    gone = [p for p in used if not os.path.exists(p)]
    if not gone:
        return
    where = os.path.commonpath(gone) if len(gone) > 1 else gone[0]
    if len(gone) == len(used):
        raise DataLayoutError(
            f"none of the {len(used)} train/val films {folder / SPLIT} lists exists any more "
            f"(they were under {where}): the data moved since this run started. Put it back "
            f"there, or rewrite the path column of {folder / SPLIT} to where it is now")
    log.warning("%d of the %d train/val films %s lists are gone since the run started (e.g. "
                "%s): the resumed run trains and validates without them", len(gone), len(used),
                folder / SPLIT, gone[0])


def finished_stages(folder: Path) -> dict[str, dict]:
    file = folder / PROGRESS
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def _write_json(path: Path, values: dict) -> None:
    """Whole or not at all (a crash mid-write would leave stages.json cut short, and the run
    unable to resume)."""
    with written_whole(path) as whole:
        whole.write_text(json.dumps(values, indent=2), encoding="utf-8")


def _mark_finished(folder: Path, stage: str, record: dict) -> None:
    done = finished_stages(folder)
    done[stage] = record
    _write_json(folder / PROGRESS, done)


# Lightning's warning for a loader it cannot resume part way through an epoch; the image
# loader (ResumableLoader) goes on from the batch count Lightning restores itself.
RESUMABLE_LOADER_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"

# In every checkpoint (`RecordConfig`): a resumed stage must train with the config it
# started with. These keys only say where things are or how progress shows: free to change.
CONFIG_KEY = "cxrkit_config"


def resume_point(folder: Path, config: TrainConfig, index: int) -> Path | None:
    """RUN/last.ckpt if stage `index` wrote it (the stage was interrupted part way). Refused
    when config.yaml changed since: the restored optimiser and schedule would not fit it."""
    last = folder / LAST
    if not last.is_file():
        return None
    checkpoint = read_checkpoint(last)
    stage = config.stages[index]
    if checkpoint["hyper_parameters"]["stage"]["name"] != stage.name:
        return None
    if changed := config_changes(checkpoint, config, stage):
        raise _edited(folder, f"{LAST} was written", changed,
                      "a stage resumes with the config it started with")
    if CONFIG_KEY not in checkpoint:
        log.warning("%s was written by an older cxrkit: stage %s goes on with this version's "
                    "training, whose batches and augmentations may be drawn otherwise (a "
                    "model close to, not equal to, the one the older version would finish)",
                    last, stage.name)
    log.info("stage %s resumes from %s, after its step %d", stage.name, LAST,
             checkpoint["global_step"])
    return last


def _edited(folder: Path, since: str, changed: list[str], why: str) -> ConfigError:
    return ConfigError(
        f"{folder / CONFIG} changed since {since} ({', '.join(sorted(changed))}): {why}. Put "
        f"it back, or train anew with `cxr train --config {folder / CONFIG} --name NEW`")


def _changed_keys(saved: dict, config: TrainConfig) -> list[str]:
    return changed_training_keys(saved, to_dict(config))


def config_changes(checkpoint: dict, config: TrainConfig, stage: StageConfig) -> list[str]:
    """The keys of `config` that differ from those `checkpoint` was trained with."""
    if CONFIG_KEY in checkpoint:  # the whole config
        return _changed_keys(checkpoint[CONFIG_KEY], config)
    saved = checkpoint["hyper_parameters"]  # a checkpoint of an older cxrkit: its module's
    return differing_keys({k: saved[k] for k in ("stage", "optim", "loss") if k in saved},
                        {"stage": to_dict(stage), "optim": to_dict(config.optim),
                         "loss": to_dict(config.loss)})


def refuse_edited_finished_run(run: Run) -> None:
    """A finished run resumed: nothing to train. Its config.yaml must still be the one that
    trained it (a report or a reproduction reads it), which best.ckpt recorded (a checkpoint
    of an older cxrkit recorded only its stage, optimiser and loss: those are compared)."""
    best = run.folder / BEST
    if best.is_file():
        checkpoint = read_checkpoint(best)
        stage = next((s for s in run.config.stages
                      if s.name == checkpoint["hyper_parameters"]["stage"]["name"]), None)
        changed = config_changes(checkpoint, run.config, stage) if stage else ["stages"]
        if changed:
            raise _edited(run.folder, "the run was trained", changed,
                          "it no longer describes this run's model")
    elif not (run.folder / MODEL_WEIGHTS).is_file():
        raise FileNotFoundError(f"{run.folder} has finished training but holds neither {BEST} "
                                f"nor {MODEL_WEIGHTS}: nothing to evaluate; train it anew from "
                                f"its config.yaml (--config ... --name NEW)")
    else:  # its checkpoints deleted to save space: the model is all the rest needs
        trained = run.folder / TRAINED_CONFIG  # best.ckpt's config, kept by `finish`
        if trained.is_file():
            changed = _changed_keys(json.loads(trained.read_text(encoding="utf-8")), run.config)
            if changed:
                raise _edited(run.folder, "the run was trained", changed,
                              "it no longer describes this run's model")
        log.info("%s has finished training; its checkpoints are gone, its %s and metrics "
                 "stay as they are", run.folder, MODEL_WEIGHTS)
        return
    log.info("%s has finished training: nothing to resume (its model and metrics are "
             "written again from %s)", run.folder, BEST)


def load_weights(model: Classifier, checkpoint: Path) -> None:
    state = read_checkpoint(checkpoint)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()
                           if k.startswith("model.")})


# --- training ------------------------------------------------------------------------------

def estimate_train_norm_stats(run: Run, model: Classifier) -> None:
    """`model.norm_stats: train`: BatchNorm statistics averaged over the training films.

    Deterministic (every train image, no augmentation, no labels), so a run killed in
    its first stage and resumed from a checkpoint is unaffected.
    """
    paths = [s.path for s in run.samples if s.split == "train"]
    adapt_batchnorm(model, paths, run.config.data.batch_size)  # on `default_device()`


def say_the_global_batch(processes: int, stage: str, batch: int, lr: float) -> None:
    """Several processes each take a batch: the recipe's learning rate, tuned for one device,
    then steps with a batch that many times larger, and that many times fewer steps."""
    if processes > 1:
        log.warning("stage %s: %d processes of batch %d, a global batch of %d: the learning "
                    "rate (%g) was tuned for one device, and fewer, larger steps train "
                    "otherwise (scale the stage's lr, or divide data.batch_size by %d)", stage,
                    processes, batch, processes * batch, lr, processes)


def fit_stage(run: Run, index: int, model: Classifier, resume_from: Path | None) -> None:
    stage = run.config.stages[index]
    seed_everything(run.config.seed, workers=True, verbose=False)  # (in config.yaml)
    if resume_from is None and index > 0:
        keep_stage_start(run.folder, stage.name)
        load_weights(model, run.folder / BEST)  # start from the best of the stages before
    module, datamodule = build_stage(run, index, model)
    callbacks = [*make_callbacks(run.folder, run.config.trainer, stage, run.config.seed),
                 RecordConfig(CONFIG_KEY, to_dict(run.config)),
                 provenance := RecordProvenance(run.folder, stage.name,
                                                images_of(datamodule).num_workers,
                                                resumed=resume_from is not None)]
    trainer = make_trainer(run.folder, stage, run.config.trainer, callbacks=callbacks,
                           loggers=make_loggers(run.folder, stage.name, run.config.trainer))
    if rank_zero_only.rank == 0:  # once the settings are accepted; before DDP starts others
        provenance.data = data_fingerprint(run.samples, run.folder / FILM_HASHES)
        say_the_global_batch(trainer.world_size, stage.name,
                             stage.batch_size or run.config.data.batch_size, stage.lr)
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        # their one-device loaders resume part way (ResumableLoader)
        if (isinstance(datamodule, XrayDataModule | FeatureDataModule)
                and isinstance(trainer.strategy, SingleDeviceStrategy)):
            warnings.filterwarnings("ignore", message=RESUMABLE_LOADER_WARNING)
        start = time.perf_counter()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        except SIGTERMException as e:  # Lightning's stop flag, set by Ctrl+C or SIGTERM
            stop = next(c for c in callbacks if isinstance(c, StopAtBatchEnd))
            raise _Stopped(stop.signal_name or "SIGTERM") from e
        finally:  # the cache entries' locks, now: Lightning skips it on an error, whose
            images_of(datamodule).teardown("fit")  # traceback then kept them open
        seconds = time.perf_counter() - start  # of this process's fit: a resumed stage's remainder
    trainer.save_checkpoint(run.folder / LAST, weights_only=False)
    if trainer.is_global_zero:
        _write_skipped(run.folder, images_of(datamodule).unreadable())
        _mark_finished(run.folder, stage.name, {"global_step": trainer.global_step,
                                                "epochs": trainer.current_epoch,
                                                "seconds": round(seconds, 1)})
        remove_stage_files(run.folder, stage.name)


def images_of(datamodule: XrayDataModule | FeatureDataModule) -> XrayDataModule:
    return datamodule.images if isinstance(datamodule, FeatureDataModule) else datamodule


def stage_start(folder: Path, stage: str) -> Path:
    return folder / f"start-{stage}.ckpt"


def stage_unreadable(folder: Path, stage: str) -> Path:
    return folder / f".unreadable-{stage}.csv"


def stage_features(folder: Path, stage: str) -> Path:
    return folder / f"features-{stage}.safetensors"


def remove_stage_files(folder: Path, stage: str) -> None:
    """What a stage keeps only while it trains: its extracted features, its starting point,
    the films it found unreadable without a decode cache (then in skipped_files.csv)."""
    stage_features(folder, stage).unlink(missing_ok=True)
    stage_start(folder, stage).unlink(missing_ok=True)
    stage_unreadable(folder, stage).unlink(missing_ok=True)


def keep_stage_start(folder: Path, stage: str) -> None:
    """best.ckpt as stage `stage` (not the first) found it, the best of the stages before,
    kept in RUN/start-STAGE.ckpt until the stage ends. A stage killed before it wrote a
    last.ckpt of its own starts again from its beginning, while best.ckpt may by then hold
    the killed attempt's weights: best.ckpt is put back first, so the stage trains what it
    would have trained without the kill."""
    if rank_zero_only.rank != 0:  # the processes Lightning starts later read what rank 0 left
        return
    kept = stage_start(folder, stage)
    source, target = (kept, folder / BEST) if kept.is_file() else (folder / BEST, kept)
    with written_whole(target) as whole:
        shutil.copyfile(source, whole)


def _write_skipped(folder: Path, unreadable: dict[str, list[str]]) -> None:
    """RUN/skipped_files.csv: the train and val films training could not read; none, no file
    (one left by an earlier attempt, before the films were fixed, goes)."""
    (folder / SKIPPED).unlink(missing_ok=True)
    if unreadable:
        with open(folder / SKIPPED, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "path"])
            writer.writerows([split, path] for split, paths in unreadable.items()
                             for path in paths)


def _skipped_by_any(runs: list[Path]) -> dict[str, list[str]]:
    """Per split, the films any of `runs` (an ensemble's members) listed as skipped."""
    rows = []
    for folder in runs:
        if (folder / SKIPPED).is_file():
            with open(folder / SKIPPED, encoding="utf-8", newline="") as f:
                rows += [(row["split"], row["path"]) for row in csv.DictReader(f)]
    return films_by_split(rows)


def validation_metrics(model: Classifier | Ensemble, criterion: torch.nn.Module,
                       run: Run) -> dict:
    """The final model scored on the validation images, read from disk as `cxr predict` does,
    through the evaluation's logits cache: `cxr evaluate` then reads these scores back."""
    val = [s for s in run_manifest(run.folder) if s.split == "val"]  # as evaluate_run reads it
    score_val = cached(run.folder, model.spec.labels,
                       partial(score, model, batch_size=run.config.data.batch_size))
    scored = score_val(val, f"{run.folder}/split.csv val")
    target = torch.from_numpy(scored.y).long()  # indices into the model's labels (run.classes)
    logits = torch.from_numpy(scored.logits.astype(np.float32))
    metrics = make_metrics(len(run.classes), sync=False)  # rank 0 alone scores
    positive = positive_index(run.classes, model.spec.positive_label)
    metrics.update(*metric_inputs(logits, target, positive))
    values: dict = {name: float(v) for name, v in metrics.compute().items()}
    if len(run.classes) == 2:  # rates at P = 0.5, uncalibrated: `cxr evaluate` chooses one
        values["threshold"] = 0.5
        has = {c: bool((target == c).any()) for c in (positive, 1 - positive)}
        # torchmetrics gives 0.0 for what one class alone leaves undefined: null, as
        # metrics.json has it, not the worst possible score
        for name, needs in (("roc_auc", has[positive] and has[1 - positive]),
                            ("sensitivity", has[positive]), ("specificity", has[1 - positive])):
            values[name] = values[name] if needs else None
    values["loss"] = float(criterion(logits, target))
    values.update(images=len(scored.samples), unreadable=len(scored.failures))
    return values


def finish(run: Run) -> dict:
    """best.ckpt -> model.safetensors, val_metrics.json, metrics.csv, training_curves.png."""
    best = run.folder / BEST
    module = ClassifierModule.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    save_model(module.model.eval(), run.folder)
    meta = read_checkpoint(best)
    metrics = validation_metrics(module.model, module.criterion, run)
    # best_epoch counts from 1 within its stage, as the progress bar, CLI and report show it
    metrics.update(best_stage=module.stage.name, best_epoch=meta["epoch"] + 1,
                   best_global_step=meta["global_step"], monitor=run.config.trainer.monitor)
    _write_json(run.folder / VAL_METRICS, metrics)
    if CONFIG_KEY in meta:  # (a checkpoint of an older cxrkit has none)
        _write_json(run.folder / TRAINED_CONFIG, meta[CONFIG_KEY])
    collect_metrics(run.folder, [s.name for s in run.config.stages])
    plot_curves(run.folder)
    return metrics


# --- ensembles -----------------------------------------------------------------------------

MEMBERS = "members"


def member_config(config: TrainConfig, index: int, name: str, folder: Path,
                  started: TrainConfig | None = None) -> TrainConfig:
    """Member `index` of an ensemble: the run's recipe, its own model and seed, at the
    ensemble's input size. Films are prepared once, at the first member's size; a member of
    another size trained at its own was then given a second, plainer resample of them inside
    the ensemble (up to 36 gray levels from what it learnt on, in a review). Not a model made
    for one size only (a ViT), nor a member `started` at its own size before this rule: those
    keep theirs, and the ensemble resizes their input."""
    devices = "1" if config.trainer.devices == "auto" else config.trainer.devices
    overrides = {
        "model.name": name, "model.ensemble_with": [], "seed": config.seed + index,
        "name": folder.name, "runs_dir": str(folder.parent), "trainer.devices": devices}
    (own, any_size), (shared, _) = _input_of(name), _input_of(config.model.name)
    if config.model.input_size is None and own != shared and any_size:
        overrides["model.input_size"] = shared
    if started is not None and config.model.input_size is None:
        overrides["model.input_size"] = started.model.input_size
    return config.updated(overrides)


@cache
def _input_of(name: str) -> tuple[int, bool]:
    """(the input size a registered model was made for, whether it takes others)."""
    model = create_model(name, pretrained=False)
    timm_cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    return model.spec.input_size, not timm_cfg.get("fixed_input_size", False)


def member_run(run: Run, index: int, name: str, folder: Path) -> Run:
    """Member `index` of an ensemble, with the run's split."""
    config = member_config(run.config, index, name, folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / CONFIG)
    write_manifest(run.samples, folder / SPLIT)  # the run's split, whatever the member's seed
    return Run(folder, config, run.samples, run.classes)


def refuse_edited_member(run: Run, folder: Path, expected: TrainConfig) -> None:
    if changed := _changed_keys(to_dict(TrainConfig.load(folder / CONFIG)), expected):
        raise _edited(run.folder, f"its member {folder.name} started", changed,
                      "a resumed ensemble keeps the config it started with")


def train_ensemble(run: Run) -> Path:
    """Each member trained with the run's recipe (RUN/members/<i>-<model>), one after another;
    the run's model is their mean. A resumed run skips finished members."""
    names = [run.config.model.name, *run.config.model.ensemble_with]
    try:  # before hours of training: can these members share one input at all?
        Ensemble([create_model(n, len(run.classes), pretrained=False, labels=run.classes)
                  for n in names])
    except ValueError as e:
        raise ConfigError(f"{e}. Choose members that can, or `--set model.ensemble_with=[]` "
                         "for a single model") from e
    members = []
    for index, name in enumerate(names):
        folder = run.folder / MEMBERS / f"{index}-{_file_safe(name)}"
        started = (folder / CONFIG).is_file()
        if started:  # the run's config.yaml must still give this member the config it has
            refuse_edited_member(run, folder, member_config(
                run.config, index, name, folder, TrainConfig.load(folder / CONFIG)))
        if not (folder / MODEL_WEIGHTS).is_file():
            train_run(open_run(folder) if started else member_run(run, index, name, folder),
                      resumed=started)
        members.append(folder)
    _write_skipped(run.folder, _skipped_by_any(members))
    gather_members(run.folder, members)
    model = Ensemble([load_model(m) for m in members]).eval()
    save_model(model, run.folder)
    counts = class_counts(run.samples, run.classes)
    criterion = make_loss(run.config.loss, loss_class_weights(run.config, counts))
    metrics = validation_metrics(model, criterion, run)
    metrics.update(best_stage=None, members=[str(m.relative_to(run.folder)) for m in members],
                   monitor=run.config.trainer.monitor)
    _write_json(run.folder / VAL_METRICS, metrics)
    return run.folder


# What a new run holds when it fails before training begins: `new_run`'s files, the stage's
# empty logs, the films' hashes, run.log's first lines. Not provenance.json: it is written as
# training begins, so a run that crashed in its first epoch keeps its logs (and resumes).
UNSTARTED = {CONFIG, SPLIT, TRAINING_LOCK, FILM_HASHES, RUN_LOG, "logs", "tb"}


def _with_the_way_on(error: Exception, run: Run) -> Exception | None:
    """A full disk (NoSpaceError) or memory run out, said with what to do next for this run:
    resume it, or train again where it was removed (nothing to resume); None for any other
    error, raised as it is."""
    kept = run.folder.is_dir()
    again = (f"then resume it (`--resume {run.folder}`)" if kept else
             "then train again (the run held nothing to resume and was removed)")
    if isinstance(error, NoSpaceError):
        return NoSpaceError(f"{error}, {again}")
    if not out_of_memory(error):
        return None
    batch, workers = run.config.data.batch_size, run.config.data.num_workers
    lower = [f"--set data.batch_size={max(1, batch // 2)} (and a stage's own "
             "stages.N.batch_size if set)"]
    if workers != 0:
        lower.append("--set data.num_workers=0")
    where = (f"from its config: `--config {run.folder / CONFIG} --name NEW` with those (a "
             "resume keeps a run's settings)" if kept else "(the run held nothing to resume "
             "and was removed)")
    return OutOfMemoryError(f"out of memory training {run.folder.name} at batch {batch}: train "
                            f"again with {' and '.join(lower)} {where}")


def _remove_if_unstarted(folder: Path) -> None:
    """A new run that failed before its first checkpoint (a model that cannot be built, a
    class none of whose films can be read) holds only what `new_run` and the trainer's set-up
    wrote: remove it, so that its --name is free for the retry."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= UNSTARTED:
        shutil.rmtree(folder)


class _Stopped(BaseException):
    """A stage stopped by a signal; `train` names the run to resume (an ensemble's, not its
    member's)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class TrainingInterrupted(Exception):
    """Training (or `during` another step of the job) stopped by Ctrl+C or SIGTERM (a
    scheduler's time limit, `kill`): `folder` continues from its last checkpoint with
    `train(resume=folder)` (`run_pipeline(resume=folder)` after training)."""

    def __init__(self, folder: Path, signal_name: str, during: str = "training"):
        self.folder, self.signal_name, self.during = folder, signal_name, during
        how = (f"`cxr train --resume {folder}` (Python: train(resume=...))" if
               during == "training" else
               f"`cxr run --resume {folder}` (Python: run_pipeline(resume=...))")
        super().__init__(f"{during} interrupted ({signal_name}); continue it with {how}")


@contextmanager
def callers_state_kept() -> Iterator[None]:
    """The caller's random generators and environment as they were: training seeds Python's,
    NumPy's and torch's generators and sets environment variables for the processes DDP
    launches, and a notebook's next cell drew seed 0's numbers. (CUDA's generators are left
    alone: reading them would start CUDA before a forked DDP launch.) So are PyTorch's global
    settings training changes: TF32 matmuls, and Lightning's deterministic algorithms."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    environment = {name: os.environ.get(name) for name in (*SET_FOR_LAUNCHES,
                                                           "CUBLAS_WORKSPACE_CONFIG")}
    settings = (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        torch.set_float32_matmul_precision(settings[0])
        torch.use_deterministic_algorithms(settings[1], warn_only=settings[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = settings[3:]
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@callers_state_kept()
def train(config: TrainConfig | None = None, resume: str | Path | None = None,
          resume_if_exists: bool = False) -> Path:
    """Train `config` (default: the `default` preset, as `cxr train`), or continue the run
    folder `resume`:

        run = train(TrainConfig.preset("quick", data="chest_xray"))
        run = train(resume="runs/quick")   # after a crash or Ctrl+C: loses nothing

    `resume_if_exists`: continue the run `config` names (its `name`) where one of the same
    config is there, else start it: a command safe to repeat (`existing_run`).
    Returns the run folder; `cxrkit.runs.load_model(folder)` loads the trained model.
    Raises `TrainingInterrupted` on Ctrl+C or SIGTERM.
    """
    extra_formats()  # a bad CXRKIT_FIGURE_FORMATS is said now, not after the training
    if config is not None and resume is not None:
        raise ConfigError("give a config or a run folder to resume, not both: a resumed run "
                          "keeps its own config (to change it, train anew from its "
                          "config.yaml under another name)")
    if resume_if_exists and resume is None:
        config = config or TrainConfig.preset("default")
        if (resume := existing_run(config)) is not None:
            config = None
            log.info("%s holds this run already: continuing it", resume)
    run = (open_run(resume) if resume is not None
           else new_run(config or TrainConfig.preset("default")))
    try:
        with training_lock(run.folder, rank_zero_only.rank == 0), sigterm_raises(), \
                logged_to(run.folder) if rank_zero_only.rank == 0 else nullcontext():
            try:
                return train_run(run, resumed=resume is not None)
            except STOPS as e:  # run.log keeps how the run ended, not only the terminal
                log.info("training stopped by %s; a resume continues it from its last "
                         "checkpoint (a stage with none yet from its beginning)", _stopped_by(e))
                raise
            except Exception as e:
                if resume is None:  # inside the lock: never a folder another process trains
                    _remove_if_unstarted(run.folder)
                said = _with_the_way_on(e, run)
                if said is None:
                    raise
                raise said from e
    except STOPS as e:
        raise TrainingInterrupted(run.folder, _stopped_by(e)) from e


# A stage stopped by a signal; SIGTERM outside a stage's fit (a SystemExit: it would exit 0);
# Ctrl+C, which Lightning turns into exit(1).
STOPS = (_Stopped, SIGTERMException, KeyboardInterrupt, SystemExit)


def _stopped_by(stop: BaseException) -> str:
    if isinstance(stop, _Stopped):
        return stop.signal_name
    return "SIGTERM" if isinstance(stop, SIGTERMException) else "Ctrl+C"


def train_run(run: Run, resumed: bool = False) -> Path:
    if run.config.model.ensemble_with:
        return train_ensemble(run)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 where fp32 remains (feature extraction)
    seed_everything(run.config.seed, workers=True, verbose=False)  # the new head's weights too
    model = build_model(run.config, run.classes)
    done = finished_stages(run.folder)
    if rank_zero_only.rank == 0:  # a kill just after a stage was marked finished left them
        for name in done:
            remove_stage_files(run.folder, name)
    pending = [i for i, stage in enumerate(run.config.stages) if stage.name not in done]
    if pending:  # decided once, before any process writes another checkpoint
        first = resume_point(run.folder, run.config, pending[0])
        if resumed and first is None:
            log.info("stage %s starts from its beginning: no checkpoint of it%s",
                     run.config.stages[pending[0]].name,
                     f" (stages done: {', '.join(done)})" if done else "")
        if run.config.model.norm_stats == "train" and not done and first is None:
            estimate_train_norm_stats(run, model)
        for i in pending:
            fit_stage(run, i, model, first if i == pending[0] else None)
    else:
        refuse_edited_finished_run(run)
    if rank_zero_only.rank == 0 and (pending or (run.folder / BEST).is_file()):
        finish(run)
    return run.folder


LR_RANGE = (1e-6, 1.0)  # the learning-rate range test's sweep
LR_FIND_MIN_STEPS = 20  # Lightning's suggestion leaves out the first 10 steps and the last


@contextmanager
def layer_rates_kept() -> Iterator[None]:
    """Lightning's range test sweeps every parameter group at one rate; before each step each
    group is put back at its share of the head's (`lr_scale`: lr_decay**depth), so that the
    sweep tries the recipe it tunes, not one with the stem at the head's rate."""

    def keep_shares(optimizer, args, kwargs) -> None:
        head = optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            group["lr"] = head * group.get("lr_scale", 1.0)

    hook = register_optimizer_step_pre_hook(keep_shares)
    try:
        yield
    finally:
        hook.remove()


def stage_batch_size(config: TrainConfig, stage: int) -> int:
    """The batch size stage `stage` trains with (its own, else the data's)."""
    return config.stages[stage].batch_size or config.data.batch_size


@callers_state_kept()
def find_lr(config: TrainConfig, stage: int = 0, out: str | Path | None = None,
            num_training: int = 100) -> float | None:
    """Lightning's learning-rate range test on stage `stage`: the suggested rate (None when
    the loss did not fall). The plot is drawn (a notebook shows it), and saved to `out` if
    given (`cxr lr-find`: lr_find.png)."""
    config.validate()
    if not 0 <= stage < len(config.stages):
        raise ConfigError(f"stage {stage}: this config has stages 0..{len(config.stages) - 1}")
    if num_training < LR_FIND_MIN_STEPS:
        raise ConfigError(f"--num-training (num_training=) {num_training}: the range test needs "
                          f"at least {LR_FIND_MIN_STEPS} steps (its suggestion leaves out the "
                          "first 10)")
    samples = prepare_samples(config.data, config.seed)
    seed_everything(config.seed, workers=True, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), config, samples, task_classes(config.data.task, samples))
        model = build_model(config, run.classes)
        module, datamodule = build_stage(run, stage, model, processes=1)  # one process
        trainer = make_trainer(run.folder, config.stages[stage], config.trainer, callbacks=[],
                               loggers=False, devices=1, num_nodes=1, strategy="auto",
                               enable_checkpointing=False,
                               max_epochs=num_training)  # every step, however short an epoch
        with layer_rates_kept():
            result = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=LR_RANGE[0],
                                            max_lr=LR_RANGE[1], num_training=num_training,
                                            update_attr=False)
    suggestion = result.suggestion()
    figure = result.plot(suggest=suggestion is not None)  # (else Lightning logs its error again)
    ax = figure.axes[0]
    ax.set_title(f"Learning-rate range test: stage {config.stages[stage].name}, "
                 f"{num_training} steps, batch {stage_batch_size(config, stage)}",
                 fontsize=10)
    ax.set_ylabel("training loss (smoothed)")
    if suggestion is not None:
        ax.annotate(f"suggested {suggestion:.2g}", (suggestion, ax.get_lines()[-1].get_ydata()[0]),
                    textcoords="offset points", xytext=(8, 8), color="red", fontsize=9)
    figure.tight_layout()
    if out is not None:
        save_figure(figure, out, 110)
    if suggestion is not None and suggestion < 10 * LR_RANGE[0]:
        log.warning("the suggested rate %.3g lies in the first decade of the sweep, where the "
                    "loss mostly shows noise: read the plot%s for where it falls fastest, or "
                    "try more steps (--num-training; Python: num_training=)", suggestion,
                    f" ({out})" if out is not None else "")
    return suggestion
