"""Training data: the patient-grouped split and a LightningDataModule over it.

`prepare_samples` turns a data folder into train/val/test samples (train -> train/val
by patient, `cxrkit.data.split.patient_split`); `XrayDataModule` serves the train
and val images. The test split is carried along only to be written to split.csv for
evaluation: nothing in training ever reads a test image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from cxrkit.config import DataConfig, TrainerConfig
from cxrkit.data.cache import DECODED, DEFAULT_CACHE_DIR, DecodeCache
from cxrkit.data.dataset import UnreadableLog, XrayDataset, collate_skip_bad
from cxrkit.data.io import UnreadableImageError, read_image
from cxrkit.data.kaggle import resolve_data
from cxrkit.data.layout import DataLayoutError, Sample, load_source, refuse_conflicting_rows
from cxrkit.data.patients import SUBTYPES, kermany_subtype, name_disagrees
from cxrkit.data.split import patient_split, shared_patients
from cxrkit.data.transforms import eval_transform, train_transform
from cxrkit.models import ModelSpec

log = logging.getLogger(__name__)

def _subsample(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    if limit is None or len(samples) <= limit:
        return samples
    keep = set(random.Random(seed).sample(range(len(samples)), limit))
    return [s for i, s in enumerate(samples) if i in keep]


def say_what_becomes_of_its_val(samples: list[Sample], data: DataConfig) -> None:
    """The data's own val split joins train unless data.val_fraction is 0 (Kaggle's holds 16
    films): said, since a curated one went unused without a word. Kept, it must share no
    patient with train, as test must not."""
    given = [s for s in samples if s.split == "val"]
    if given and data.val_fraction > 0:
        log.info("%s: its own val split (%d films) joins train, and validation is carved from "
                 "train by patient (data.val_fraction %s); to validate on it as given: --set "
                 "data.val_fraction=0", data.path, len(given), data.val_fraction)
    elif given and (shared := sorted(shared_patients(samples, "train", "val"))):
        log.warning("%s: %d patient id(s) have films in both its train and val splits (e.g. "
                    "%s): validation then scores films of patients it trained on", data.path,
                    len(shared), shared[0])


def prepare_samples(data: DataConfig, seed: int = 0) -> list[Sample]:
    """Train, val and test samples of `data.path`, labelled for `data.task`."""
    source = load_source(resolve_data(data.path).absolute(), data.patient_pattern)
    refuse_conflicting_rows(source)
    for note in source.notes:  # folders ignored, columns not read, rows repeated: the audit
        log.info("%s: %s", data.path, note)  # lists them, and training says them too
    # a manifest's rows in their file's order: a query without ORDER BY would train another
    # model on the same films (the subsample and each epoch's order are drawn by position)
    samples = (sorted(source.samples, key=lambda s: s.path) if source.layout == "manifest"
               else source.samples)
    if data.task == "3class":
        disagree = [s for s in samples if name_disagrees(Path(s.path).name, s.label)]
        if disagree:
            log.warning("%d film(s) are labelled otherwise than their file names say, e.g. %s "
                        "labelled %s: the label is kept", len(disagree), disagree[0].path,
                        disagree[0].label)
        samples = [replace(s, label=kermany_subtype(Path(s.path).name, s.label)) for s in samples]
    say_what_becomes_of_its_val(samples, data)
    samples = patient_split(samples, data.val_fraction, seed)
    train = _subsample([s for s in samples if s.split == "train"], data.max_train_images, seed)
    val = _subsample([s for s in samples if s.split == "val"], data.max_val_images, seed)
    if not train or not val:
        raise DataLayoutError(
            f"{data.path} gives {len(train)} training and {len(val)} validation images; both are "
            "needed. Give a train split (or class folders) and data.val_fraction > 0."
        )
    return train + val + [s for s in samples if s.split == "test"]


def _near_names(counts: Counter) -> list[tuple[str, str]]:
    """(the smaller, the larger) of class names one slip apart (PNEUMOINA beside PNEUMONIA):
    a misspelt folder, not a class."""
    names = sorted(counts, key=lambda name: -counts[name])
    return [(small, large) for i, large in enumerate(names) for small in names[i + 1:]
            if _one_slip(small.upper(), large.upper())]


def _one_slip(a: str, b: str) -> bool:
    """Whether `a` is `b` with one letter changed, dropped, added, or two neighbours swapped
    (NORMAL and ABNORMAL are two apart: two classes). Short names (A, B) are never slips."""
    if min(len(a), len(b)) < 4:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return len(long) == len(short) + 1 and any(long[:i] + long[i + 1:] == short
                                               for i in range(len(long)))


def task_classes(task: str, samples: list[Sample]) -> list[str]:
    """Class names in index order: sorted for binary and multiclass; NORMAL, BACTERIA, VIRUS
    for 3class."""
    counts = Counter(s.label for s in samples if s.split in ("train", "val"))
    labels = set(counts)
    if task == "binary" and len(labels) != 2:
        other = "3class" if labels == set(SUBTYPES) else "multiclass"
        typos = [f"{a} ({counts[a]} films) looks like {b}: merge them"
                 for a, b in _near_names(counts)]
        raise DataLayoutError(
            f"--task binary needs two classes; the training films have {len(labels)}: "
            f"{', '.join(f'{label!r} ({counts[label]})' for label in sorted(labels))}. "
            + (f"{'; '.join(typos)}." if typos else
               "Fix the folder names (or the manifest's label column) so that there are "
               "exactly two"
               + (f", or train them all: --task {other} (cxr run: --set data.task={other}; "
                  f"Python: overrides={{'data.task': '{other}'}})." if len(labels) > 2 else ".")))
    if task == "multiclass" and len(labels) < 3:
        raise DataLayoutError(
            f"--task multiclass is for three or more classes; the training films have "
            f"{len(labels)}: {', '.join(repr(label) for label in sorted(labels))}. Two are "
            "--task binary (its threshold, sensitivity and specificity).")
    if untrained := sorted(labels - {s.label for s in samples if s.split == "train"}):
        raise DataLayoutError(
            f"no training film is labelled {', '.join(untrained)}: only validation has them. "
            "Every class needs training films: move some of them to train (or keep the data's "
            "val split with train, data.val_fraction > 0, so validation is carved by patient), "
            "or raise data.max_train_images if it left them out")
    if task != "3class":
        return sorted(labels)
    if labels != set(SUBTYPES):
        raise DataLayoutError(
            f"--task 3class needs NORMAL, BACTERIA and VIRUS images (PNEUMONIA split by "
            f"Kermany file names like person1_virus_2.jpeg); found {sorted(labels)}. Use "
            f"--task binary."
        )
    return list(SUBTYPES)


def class_counts(samples: list[Sample], classes: list[str]) -> list[int]:
    counts = Counter(s.label for s in samples if s.split == "train")
    return [counts.get(c, 0) for c in classes]


def default_num_workers(processes: int = 1) -> int:
    """Loader processes of each of this machine's `processes` training processes: on a GPU
    every core but one, shared among them (augmentation is the bottleneck there; 8 GPUs of a
    64-core node had 16 each, 128 for 64 cores); on a CPU leave most cores to the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = (cores or 1) // max(1, processes)
    if torch.cuda.is_available():
        return min(16, max(1, cores - 1))
    return min(4, cores // 2)


def processes_here(trainer: TrainerConfig) -> int:
    """How many training processes this machine runs: the devices asked for ("2", "0,1"),
    or with "auto" every GPU there is."""
    devices = trainer.devices.strip()
    if devices.isdigit():
        return max(1, int(devices))
    if "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    on_gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return max(1, torch.cuda.device_count()) if on_gpu else 1


def balanced_weights(labels: list[int]) -> torch.Tensor:
    """Per film, 1 / its class's count: drawn by these, every class comes equally often."""
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)


def balanced_sampler(labels: list[int]) -> WeightedRandomSampler:
    """Draws every class equally often (with replacement), one epoch = len(labels) draws."""
    return WeightedRandomSampler(balanced_weights(labels), num_samples=len(labels),
                                 replacement=True)


def mixed_seed(*numbers: int) -> int:
    """One 63-bit seed from several integers (run seed, epoch, step, ...)."""
    digest = hashlib.sha256(":".join(map(str, numbers)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochOrder(Sampler):
    """Epoch e's training order, drawn from (seed, e) alone, and with each film an
    augmentation seed of its own (the dataset takes `(index, seed)`): so an epoch can be
    played again, or continued from its `start`-th film, exactly as it went."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None):
        self.n, self.seed, self.weights = n, seed, weights
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        order = (torch.randperm(self.n, generator=g) if self.weights is None
                 else torch.multinomial(self.weights, self.n, replacement=True, generator=g))
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        for position in range(self.start, self.n):
            yield int(order[position]), int(seeds[position])


class FilmSeeds(Sampler):
    """Every film in order, each with an augmentation seed drawn from `seed` alone: an
    augmented pass (feature extraction's views) that is the same with any number of
    workers, on any machine."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed)
        yield from enumerate(torch.randint(0, 2**62, (self.n,), generator=g).tolist())


def one_process(trainer) -> bool:
    """Whether Lightning keeps a training loader as it is: one device and no distributed
    strategy (which, even on one device, rebuilds it with a DistributedSampler)."""
    return trainer is None or isinstance(trainer.strategy, SingleDeviceStrategy)


def batches_trained_this_epoch(trainer) -> int:
    """Lightning's count (restored from a checkpoint on resume, reset at each epoch)."""
    if trainer is None:
        return 0
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


class ResumableLoader(DataLoader):
    """The training loader of one process: an epoch interrupted part way goes on with its own
    remaining films. `position()` says how many of the epoch's batches were trained (Lightning
    restores that count from the checkpoint; 0 at an epoch's start); the `EpochOrder`
    sampler starts after them. (A plain loader starts that epoch over in a fresh order and
    stops after the remaining number of batches: some films twice, others not at all.)"""

    def __init__(self, *args, position: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def __iter__(self):
        order: EpochOrder = self.sampler
        order.start = self.position() * self.batch_size  # read at the first batch, not before
        yield from super().__iter__()


def _not_empty(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _decodes(path: str) -> bool:
    try:
        read_image(path)
    except UnreadableImageError:
        return False
    return True


def _require_every_class_readable(samples: list[Sample], readable: Callable[[int], bool]) -> None:
    """A class whose training films all fail to read (emptied or cut short by an interrupted
    copy, cloud placeholders): trained on without it, the model could never call it, and
    said nothing. `readable(i)` is asked film by film, until one of each class reads."""
    for label in sorted({s.label for s in samples}):
        indices = [i for i, s in enumerate(samples) if s.label == label]
        if any(readable(i) for i in indices):
            continue
        films = [samples[i].path for i in indices]
        raise DataLayoutError(
            f"none of the {len(films)} {label} training films can be read, e.g. {films[0]}: "
            f"a model trained without them could never call {label}. `cxr data audit` says "
            "why each cannot be read: replace them.")


class XrayDataModule(LightningDataModule):
    """Train (augmented unless `augment=False`) and val images of `samples`.

    Batches hold grayscale images [N, 1, S, S] as the workers leave them (float in [0, 1]
    when augmented, else uint8): whoever feeds them to the network applies
    `cxrkit.data.transforms.ModelInput` on the device (`ClassifierModule` does).
    """

    def __init__(self, samples: list[Sample], classes: list[str], spec: ModelSpec,
                 data: DataConfig, batch_size: int, augment: bool = True, seed: int = 0,
                 unreadable_file: Path | None = None, processes: int = 1):
        super().__init__()
        self.seed = seed
        self.unreadable_file = unreadable_file  # where uncached films found unreadable go
        self.samples = {split: [s for s in samples if s.split == split]
                        for split in ("train", "val")}
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.spec = spec
        self.data = data
        self.batch_size = batch_size
        self.augment = augment
        self.num_workers = (default_num_workers(processes) if data.num_workers is None
                            else data.num_workers)
        self.datasets: dict[str, XrayDataset] = {}
        self.caches: dict[str, DecodeCache] = {}

    def _cache(self, split: str) -> DecodeCache | None:
        """`split`'s decode cache, opened once: each DecodeCache holds its entry's lock."""
        if not self.data.cache:
            return None
        if split not in self.caches:
            cache_dir = Path(self.data.cache_dir) if self.data.cache_dir else DEFAULT_CACHE_DIR
            self.caches[split] = DecodeCache(self.samples[split], self.spec.input_size,
                                             self.data.equalize, cache_dir / DECODED,
                                             workers=self.data.num_workers)  # 0: no process
        return self.caches[split]

    def prepare_data(self) -> None:
        for split in self.samples:  # decode once, on one process per node
            self._cache(split)

    def _dataset(self, split: str, augment: bool) -> XrayDataset:
        # Unfinished grayscale images: `ModelInput` finishes whole batches on the device.
        transform = (train_transform(self.spec, self.data.augment, finish=False) if augment
                     else eval_transform(self.spec, finish=False))
        log_to = (UnreadableLog(self.unreadable_file, split)
                  if self.unreadable_file is not None and not self.data.cache else None)
        return XrayDataset(self.samples[split], self.class_to_idx, self.spec.input_size,
                           transform, self.data.equalize, self._cache(split), log_to)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split in self.samples:
            self.datasets[split] = self._dataset(split, split == "train" and self.augment)
            self._require_readable(split)
        for split, paths in self.unreadable().items():  # every run, not only the cache's first
            log.warning("%d of the %d %s films cannot be read and are skipped, e.g. %s; "
                        "`cxr data audit` (Python: audit_dataset) lists each with its reason: "
                        "delete or re-export them",
                        len(paths), len(self.samples[split]), split, paths[0])

    def teardown(self, stage: str | None = None) -> None:
        for cache in self.caches.values():  # the entries' locks, now rather than at GC
            cache.close()

    def unreadable(self) -> dict[str, list[str]]:
        """Per split, the films the decode cache could not read; without a cache, those found
        unreadable as they were loaded (known after the films were read: at a stage's end)."""
        if not self.data.cache:
            return UnreadableLog.read(self.unreadable_file) if self.unreadable_file else {}
        found = {}
        for split, dataset in self.datasets.items():
            if dataset.cache is not None:
                paths = [s.path for s, ok in zip(dataset.samples, dataset.cache.valid,
                                                 strict=True) if not ok]
                if paths:
                    found[split] = paths
        return found

    def _require_readable(self, split: str) -> None:
        """Fail before training when not one of a split's images can be read: the usual
        cause is wrong paths, and Lightning would otherwise stop later with an obscure
        message about a missing metric."""
        dataset = self.datasets[split]
        readable = (dataset.cache.valid if dataset.cache is not None
                    else [_not_empty(s.path) for s in dataset.samples])  # not decoded yet
        if dataset.samples and not any(readable):
            raise DataLayoutError(
                f"none of the {len(dataset.samples)} {split} images can be read, e.g. "
                f"{dataset.samples[0].path}. Check that the files exist; relative paths in a "
                f"CSV manifest are read from the manifest's own folder."
            )
        if split == "train":  # without a cache, decoded until one film of each class reads
            _require_every_class_readable(
                dataset.samples, (lambda i: readable[i]) if dataset.cache is not None
                else (lambda i: readable[i] and _decodes(dataset.samples[i].path)))

    def labels(self, split: str) -> list[int]:
        return [self.class_to_idx[s.label] for s in self.samples[split]]

    def loader(self, split: str, shuffle: bool, augment: bool | None = None,
               draw: int = 0) -> DataLoader:
        """`split`'s images; `augment` None: as set up (train augmented unless augment=False).
        Shuffled in one process: a `ResumableLoader`. With several, Lightning puts in a
        DistributedSampler (its order is (seed, epoch)'s too), which cannot start part way.
        In order and augmented: the films' augmentations are those of (seed, `draw`)."""
        dataset = (self.datasets[split] if augment is None
                   else self._dataset(split, augment))
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                       pin_memory=torch.cuda.is_available(),
                       persistent_workers=self.num_workers > 0, collate_fn=collate_skip_bad)
        balanced = shuffle and self.data.balanced_sampler
        if shuffle and one_process(self.trainer):
            weights = balanced_weights(self.labels(split)) if balanced else None
            return ResumableLoader(dataset, sampler=EpochOrder(len(dataset), self.seed, weights),
                                   position=lambda: batches_trained_this_epoch(self.trainer),
                                   **options)
        if augment and not shuffle:
            return DataLoader(dataset, sampler=FilmSeeds(len(dataset), mixed_seed(self.seed, draw)),
                              **options)
        sampler = balanced_sampler(self.labels(split)) if balanced else None
        return DataLoader(dataset, shuffle=shuffle and not balanced, sampler=sampler, **options)


    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)
