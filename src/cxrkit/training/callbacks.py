"""Lightning callbacks and loggers of a run, and the Trainer that uses them.

    RUN/best.ckpt       best `trainer.monitor` over all stages (val ROC-AUC by default)
    RUN/last.ckpt       every `checkpoint_every_n_steps` optimiser steps, at a stage's end and
                        where Ctrl+C or SIGTERM stopped training (`StopAtBatchEnd`)
                        (with `stage.ema_decay`: the averaged weights, the raw ones beside them)
    RUN/logs/STAGE/version_N/metrics.csv   one CSVLogger per stage and attempt
    RUN/tb/STAGE/       TensorBoard
Each epoch also logs `epoch_seconds` (its training loop: steps and data waits, not
validation) and `train_images_per_s`, so a slow loader or a slow machine shows in the logs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    WeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cxrkit.config import (
    MONITORS,
    NO_SPACE_ERRNOS,
    ConfigError,
    DamagedCheckpointError,
    StageConfig,
    TrainerConfig,
    no_space,
)
from cxrkit.provenance import record_attempt
from cxrkit.training.datamodule import mixed_seed

log = logging.getLogger(__name__)


# Lines Lightning says at every Trainer start or end that a user can do nothing with (an
# advertisement of its cloud logger, "GPU available: False", ...): noise in a CLI. The
# accelerator and precision are in the run's provenance.json.
LIGHTNING_NOISE = ("litlogger", "GPU available:", "TPU available:", "HPU available:",
                   "Loading `train_dataloader` to estimate", "`Trainer.fit` stopped:")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in LIGHTNING_NOISE)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropNoise())

BEST = "best.ckpt"
LAST = "last.ckpt"


# SIGTERM outside a stage's fit (feature extraction, the decode cache, the final scoring)
# raises SIGTERMException where it lands, as Ctrl+C raises KeyboardInterrupt, so the command
# names the resume instead of dying silently; inside a fit, StopAtBatchEnd's handler takes
# over. Never inside a checkpoint write: raised in torch.save it would turn into torch's
# RuntimeError (and half a file), so it waits for the write to end.
_sigterm = {"held": 0, "pending": False}


def _raise_sigterm(signum, frame) -> None:
    if _sigterm["held"]:
        _sigterm["pending"] = True
    else:
        raise SIGTERMException


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises SIGTERMException within this block (see `_sigterm`)."""
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_sigterm)
    _sigterm["pending"] = False  # none carried over from an earlier block (a notebook's)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm["pending"] = False


@contextmanager
def sigterm_held() -> Iterator[None]:
    """A SIGTERM that arrives within this block is raised once it ends."""
    _sigterm["held"] += 1
    try:
        yield
    finally:
        _sigterm["held"] -= 1
    if not _sigterm["held"] and _sigterm["pending"]:
        _sigterm["pending"] = False
        raise SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Each checkpoint is written beside its final name, synced, then renamed over it: a crash
    or `kill -9` mid-write leaves the previous checkpoint whole. (Lightning's own writes
    through $TMPDIR; where that is another filesystem, e.g. a tmpfs /tmp or a node's local
    disk under an NFS run folder, the move copies over the old file in place.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with sigterm_held():
            try:
                with open(partial, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(partial, path)
            except Exception as e:
                full = _no_space(e)  # torch says it as "unexpected pos" over the OSError
                if full is None:
                    raise
                written = partial.stat().st_size if partial.exists() else 0
                raise no_space(full, path, f"the checkpoint {path.name}", written,
                               "free space (the checkpoints already there are whole)",
                               at_least=True) from e
            finally:
                partial.unlink(missing_ok=True)


def _no_space(error: BaseException | None) -> OSError | None:
    """The OSError of a full disk (or quota, or size limit) behind `error`, if one is."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


class RunFolderCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose saved state follows the run folder: Lightning drops the best
    score it restores when the folder's path changed (a run copied or moved before it is
    resumed), and the next epoch, however worse, would then replace best.ckpt.

    Its step checkpoints (last.ckpt) are never of an epoch's last batch: resumed from there,
    Lightning counts the epoch done and never validates it (nor logs its mean loss). The
    epoch's end is saved once it has been validated instead."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            # ModelCheckpoint's own save: it notes the step saved, so that the next epoch's
            # first batch (mid-way through an optimiser step, with accumulated gradients) is
            # not saved again as a step checkpoint
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, so that checkpoints of runs saved before this class keep
        restoring its state."""
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            def moved(path: str) -> str:
                return str(Path(self.dirpath) / Path(path).name) if path else path

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_model_path": moved(state_dict.get("best_model_path", "")),
                          "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                          "last_model_path": moved(state_dict.get("last_model_path", "")),
                          "best_k_models": {moved(k): v for k, v in
                                            state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


class StaysStopped(EarlyStopping):
    """Lightning's EarlyStopping, whose decision survives a kill: Lightning does not save
    `trainer.should_stop`, so a stage stopped early and killed before it was marked finished
    resumed into the epochs it had stopped (and replaced best.ckpt with them)."""

    stopped = False  # whether it ended its stage: saved in every checkpoint after

    @property
    def state_key(self) -> str:  # EarlyStopping's: checkpoints saved before this class
        return "EarlyStopping" + super().state_key.removeprefix(type(self).__qualname__)

    def _note(self, trainer) -> None:
        stops_here = (trainer.should_stop and not self.stopped
                      and self.wait_count >= self.patience)  # (not a Ctrl+C's stop)
        if stops_here and trainer.is_global_zero:  # said: a stage ended early unannounced
            stage = getattr(trainer.lightning_module, "stage", None)
            log.info("%sstops early after epoch %d of %d: %s has not improved for %d "
                     "epoch(s) (best %.4f); best.ckpt keeps the best epoch",
                     f"stage {stage.name} " if stage else "", trainer.current_epoch + 1,
                     trainer.max_epochs, self.monitor, self.wait_count, float(self.best_score))
        self.stopped = self.stopped or trainer.should_stop

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._note(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._note(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stopped = state_dict.get("stopped", False)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.stopped:
            trainer.should_stop = True


STOP_SIGNALS = {signal.SIGINT: "Ctrl+C", signal.SIGTERM: "SIGTERM"}


class StopAtBatchEnd(Callback):
    """Ctrl+C and SIGTERM stop training where a batch ends, and leave RUN/last.ckpt there.

    Both only set Lightning's stop flag: Lightning then stops after the batch in hand, on
    every process together (its per-batch broadcast). A KeyboardInterrupt raised wherever
    Ctrl+C lands could cut an optimiser step in half, and Lightning 2.6's own SIGTERM
    handler broadcasts from within the handler, which deadlocks every rank when it meets a
    collective in flight. A second Ctrl+C stops at once. With one process, the stop saves
    last.ckpt at that step (the step checkpoints alone lose up to checkpoint_every_n_steps);
    with several, saving there would need every rank at the same barrier, so the last step
    checkpoint stays. With gradients accumulated over several batches, the stop waits for
    the batch that ends an optimiser step: the gradients of a step part done are in no
    checkpoint, and the resumed step would be taken on part of its batches.
    `signal_name` says which signal stopped training, if one did."""

    def __init__(self, path: Path):
        self.path = path
        self.signal_name: str | None = None
        self._previous_sigint = None
        self._stop_at_step_end = False

    def _install(self, trainer) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or self._previous_sigint is not None:
            return

        def stop(signum, frame) -> None:
            if signum == signal.SIGINT and self.signal_name is not None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt  # the second Ctrl+C: now
            if self.signal_name is None and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # the processes Lightning started
            self.signal_name = self.signal_name or STOP_SIGNALS[signum]
            if trainer.training and trainer.accumulate_grad_batches > 1:
                self._stop_at_step_end = True  # see on_train_batch_end
            else:
                connector.received_sigterm = True  # Lightning's flag, whatever the signal

        self._previous_sigint = signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)  # Lightning puts its own back at teardown

    # Lightning registers its handlers before the sanity check: ours replace them from there.
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = ((batch_idx + 1) % trainer.accumulate_grad_batches == 0
                   or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if self._stop_at_step_end and stepped:  # Lightning stops once this batch ends
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Not in validation: Lightning would skip the rest of it on resume, and the epoch
        # would never be validated.
        if (isinstance(exception, SIGTERMException) and trainer.world_size == 1
                and trainer.training and not trainer.sanity_checking):
            # (weights_only here: whether to leave the optimiser out; said, Lightning logs it)
            trainer.save_checkpoint(self.path, weights_only=False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class StepSeeds(Callback):
    """Before each training step, the global RNG (dropout, mixup) seeded from (seed, step,
    rank): a resumed run draws at step k what the uninterrupted one drew, whatever ran
    before it in this process."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the batch's place within an accumulated step too (0 without accumulation)
        micro = batch_idx % trainer.accumulate_grad_batches
        torch.manual_seed(mixed_seed(self.seed, trainer.global_step, trainer.global_rank,
                                     *([micro] if micro else [])))


class RecordConfig(Callback):
    """The run's whole config in every checkpoint, under `key`: a resume compares it with
    config.yaml, which may have been edited since."""

    def __init__(self, key: str, config: dict):
        self.key, self.config = key, config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[self.key] = self.config


class RecordProvenance(Callback):
    """RUN/provenance.json gains this attempt once Lightning has set the devices up, on rank
    0: not before, since asking CUDA for the GPU's name in the launching process would break
    a notebook's forked DDP processes. `data`, the films' fingerprint, is taken before the
    processes start (reading a large dataset would keep the others waiting at a barrier)."""

    def __init__(self, folder: Path, stage: str, num_workers: int, resumed: bool):
        self.folder, self.stage, self.num_workers = folder, stage, num_workers
        self.resumed, self.data = resumed, None  # set by rank 0 before the fit

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            record_attempt(self.folder, self.stage, trainer, self.num_workers, self.resumed,
                           self.data)


class FlushLogsWithCheckpoints(Callback):
    """Every logger writes out what it holds whenever a checkpoint is saved: the CSV logger
    buffers rows, and a run killed after a checkpoint resumes after rows that were never
    written (an epoch missing from metrics.csv and the curves)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            logger.save()


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents (tensors and plain values only: `weights_only`), or a
    DamagedCheckpointError that says what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # cut short, emptied, or not a checkpoint (weights_only refuses pickles)
        then = ("delete it and resume: the run goes on from the start of the stage it was in"
                if path.name == LAST else
                f"the run cannot go on without it: train anew with `cxr train --config "
                f"{path.parent / 'config.yaml'} --name NEW`")
        reason = (str(e).splitlines() or [""])[0][:200]
        raise DamagedCheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}:"
                                     f" {reason}). If a crash cut it short, {then}") from e


def _copied(value):
    """`value` with every tensor in it (in dicts and lists too) copied into memory."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v) for v in value)
    return value


class AveragedOnTheModelsDevice(WeightAveraging):
    """Lightning's weight averaging, the average kept where the model trains: Lightning makes
    it at setup, before the model moves to the GPU, and then copied every weight to the host
    at every step."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._device is None and self._average_model is not None:
            self._average_model.to(pl_module.device)


def ema_with_warmup(decay: float):
    """Averaging with decay min(decay, (1 + n) / (10 + n)) after n updates (timm's warm-up): a
    plain EMA of decay 0.998 still holds 76% of the stage's starting weights (a new head's
    random ones) after `default`'s first epoch (139 steps), 37% after 500."""

    def average(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        rate = ((1 + n) / (10 + n)).clamp(max=decay)
        return averaged + (current - averaged) * (1 - rate)

    return average


def best_checkpoint(run: Path, trainer: TrainerConfig) -> ModelCheckpoint:
    """Keeps RUN/best.ckpt; seeded with the previous stage's best so a stage only replaces it
    when it does better."""
    callback = RunFolderCheckpoint(dirpath=run, filename=Path(BEST).stem,
                                   monitor=trainer.monitor, mode=MONITORS[trainer.monitor],
                                   save_top_k=1, auto_insert_metric_name=False,
                                   enable_version_counter=False)
    if (run / BEST).is_file():
        saved = read_checkpoint(run / BEST)["callbacks"]
        if callback.state_key in saved:
            # copies, not views into the memory-mapped file: kept for the stage, they would
            # hold best.ckpt mapped, and Windows refuses to replace a mapped file
            callback.load_state_dict(_copied(saved[callback.state_key]))
    return callback


class EpochThroughput(Callback):
    """Logs each training epoch's wall-clock seconds and images per second (this process's:
    an epoch resumed part way counts from the resume)."""

    def _restart(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def on_train_start(self, trainer, pl_module):  # a run resumed mid-epoch starts here
        self._restart()

    def on_train_epoch_start(self, trainer, pl_module):
        self._restart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch is not None:  # None: every film of the batch was unreadable
            self.images += len(batch[1])  # (images, labels)

    def on_train_epoch_end(self, trainer, pl_module):
        seconds = time.perf_counter() - self.start
        pl_module.log_dict({"epoch_seconds": seconds,
                            "train_images_per_s": self.images / max(seconds, 1e-9)})


def make_callbacks(run: Path, trainer: TrainerConfig, stage: StageConfig,
                   seed: int = 0) -> list[Callback]:
    callbacks: list[Callback] = [
        best_checkpoint(run, trainer),
        # last.ckpt every N steps, so a run killed mid-epoch resumes losing little
        RunFolderCheckpoint(dirpath=run, every_n_train_steps=trainer.checkpoint_every_n_steps,
                            save_top_k=0, save_last=True, enable_version_counter=False),
        StopAtBatchEnd(run / LAST),
        FlushLogsWithCheckpoints(),
        StepSeeds(seed),
        LearningRateMonitor(logging_interval="step"),
        EpochThroughput(),
    ]
    if trainer.early_stopping_patience is not None:
        callbacks.append(StaysStopped(monitor=trainer.monitor, mode=MONITORS[trainer.monitor],
                                       patience=trainer.early_stopping_patience))
    if stage.ema_decay is not None:
        # Lightning's own: validation and checkpoints (best.ckpt too) see the averaged weights.
        callbacks.append(AveragedOnTheModelsDevice(avg_fn=ema_with_warmup(stage.ema_decay)))
    if trainer.progress_bar:  # each epoch's validation is a log line, bar or not (run.log)
        callbacks += [ProgressBar(), ProgressLog(every=None)] if shows_a_bar() else [ProgressLog()]
    return callbacks


def shows_a_bar() -> bool:
    """Whether a progress bar can draw: on a terminal, not in a log file or a pipe, nor on a
    terminal that says it cannot move the cursor (TERM=dumb: Rich drew nothing until the
    end, a whole training without a line)."""
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


class ProgressBar(RichProgressBar):
    """Lightning's rich bar without `v_num` (our logger versions are stage names, which it
    cuts to their last four letters, "rain") or the validation loss (a log line says each
    epoch's validation), the step's loss as `loss`, so that it fits on one line of 80
    columns; epochs counted from 1 as everywhere else."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        return {"loss": metrics["train_loss_step"]} if "train_loss_step" in metrics else {}

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch + 1}/{self.trainer.max_epochs}"


class ProgressLog(Callback):
    """Progress as log lines, which run.log keeps: one with each epoch's validation, and
    where no bar can draw (a log file, CI, `make run | tee`) a line every `every` seconds of
    training (None: none, the bar shows them)."""

    def __init__(self, every: float | None = 30.0):
        self.every = every
        self.start: float | None = None  # when this process saw its first batch of the epoch
        self.first = 0  # that batch's index: a resumed epoch starts part way through
        self.last = 0.0

    def _epoch(self, trainer) -> str:
        stage = getattr(trainer.lightning_module, "stage", None)  # a run's stages have names
        return (f"{stage.name + ', ' if stage else ''}"
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = None  # (not called when a resumed run re-enters an epoch part way)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        if self.start is None:
            self.start, self.first, self.last = now, batch_idx, now
        if self.every is None or now - self.last < self.every or not trainer.is_global_zero:
            return
        self.last = now
        done, total = batch_idx + 1, trainer.num_training_batches
        loss = trainer.callback_metrics.get("train_loss_step")
        timed = batch_idx - self.first  # steps since the first one this process saw
        left = (f", {(total - done) * (now - self.start) / timed:.0f} s to the epoch's end"
                if timed else "")
        log.info("%s: step %d/%d%s%s", self._epoch(trainer), done, total,
                 "" if loss is None else f", train loss {float(loss):.4f}", left)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        scores = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith("val_")}
        spec = getattr(getattr(pl_module, "model", None), "spec", None)
        rule = ("the most probable class" if spec and spec.num_classes > 2 else "P = 0.5")
        log.info("%s: %s (rates at %s; `cxr evaluate` chooses the threshold)",
                 self._epoch(trainer), ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())),
                 rule)


def make_loggers(run: Path, stage: str, trainer: TrainerConfig) -> list[Logger]:
    loggers: list[Logger] = [
        CSVLogger(run / "logs", name=stage),  # a new version per attempt: resuming keeps history
        TensorBoardLogger(run, name="tb", version=stage, default_hp_metric=False),
    ]
    if trainer.mlflow:
        if importlib.util.find_spec("mlflow"):
            loggers.append(MLFlowLogger(experiment_name="cxrkit", run_name=f"{run.name}-{stage}"))
        else:
            log.warning("trainer.mlflow is on but mlflow is not installed (pip install mlflow)")
    return loggers


BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs that compute in bfloat16 themselves


def resolve_precision(trainer: TrainerConfig) -> str:
    """auto: bf16-mixed on GPUs with bf16 hardware (Ampere and later), 16-mixed on older GPUs
    (a T4 or V100 emulates bf16: slow, and cuDNN has no bf16 convolutions there), 32-bit on
    CPUs. (torch.cuda.is_bf16_supported() counts emulation: True on a T4.)"""
    if trainer.precision != "auto":
        return trainer.precision
    on_gpu = torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.get_device_capability() >= BF16_CAPABILITY else "16-mixed"


def make_trainer(run: Path, stage: StageConfig, trainer: TrainerConfig,
                 callbacks: list[Callback], loggers: list[Logger] | bool, **overrides) -> Trainer:
    devices = int(trainer.devices) if trainer.devices.isdigit() else trainer.devices
    options = dict(
        accelerator=trainer.accelerator, devices=devices, num_nodes=trainer.num_nodes,
        strategy=trainer.strategy, precision=resolve_precision(trainer),
        max_epochs=stage.epochs, deterministic=trainer.deterministic,
        callbacks=callbacks, logger=loggers,
        log_every_n_steps=trainer.log_every_n_steps, gradient_clip_val=trainer.gradient_clip_val,
        accumulate_grad_batches=trainer.accumulate_grad_batches, default_root_dir=run,
        enable_progress_bar=trainer.progress_bar and shows_a_bar(), enable_model_summary=False,
    )
    if "fsdp" not in str(trainer.strategy):  # FSDP writes sharded checkpoints its own way
        options["plugins"] = [AtomicCheckpointIO()]
    try:
        return Trainer(**{**options, **overrides})
    # e.g. an unknown strategy, no GPU, an accelerator whose package is missing (tpu: torch_xla)
    except (MisconfigurationException, ValueError, ImportError) as e:
        raise ConfigError(f"Lightning refuses the trainer settings (trainer.accelerator "
                          f"{trainer.accelerator}, devices {trainer.devices}, strategy "
                          f"{trainer.strategy}, precision {trainer.precision}): {e}") from e
