"""Batched inference over image files with a PyTorch model.

Evaluation (metrics on a split), predict and the web server (with a run folder) turn
files into logits here; an ONNX export goes through `cxrkit.onnx_backend` instead, without
PyTorch. Both read and resize films with `cxrkit.data.io.read_for_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxrkit.data.io import Failure, Film, film_name, read_for_model
from cxrkit.data.transforms import ModelInput
from cxrkit.models import Classifier, ModelSpec
from cxrkit.progress import ScoringProgress
from cxrkit.runs import finite_logits


class _Files(Dataset):
    def __init__(self, paths: Sequence[str | Film], size: int, equalize: bool, crop: float,
                 doubts: bool):
        self.paths, self.size, self.equalize, self.crop = list(paths), size, equalize, crop
        self.doubts = doubts

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        pixels, reason, doubt = read_for_model(self.paths[i], self.size, self.equalize,
                                               self.crop, self.doubts)
        if pixels is None:
            return torch.zeros(0), i, reason, ""
        return torch.from_numpy(pixels), i, "", doubt


def _collate(batch):
    good = [(x, i) for x, i, reason, _ in batch if not reason]
    bad = [(i, reason) for _, i, reason, _ in batch if reason]
    doubts = [(i, doubt) for _, i, _, doubt in batch if doubt]
    x = torch.stack([x for x, _ in good]) if good else None
    return x, [i for _, i in good], bad, doubts


def file_batches(spec: ModelSpec, paths: Sequence[str | Film], batch_size: int = 32,
                 num_workers: int = 0, crop: float = 1.0, doubts: bool = False) -> DataLoader:
    """Batches (x uint8 [B,1,S,S] as read, or None; indices into `paths`; [(index, reason)]
    unreadable; [(index, doubt)] readable but hardly films: `doubts` asks for them, see
    `film_doubt`); `crop` < 1: each image's central fraction of its sides only (see
    `prepare`). `ModelInput` finishes a batch on its device, a whole batch at once: a GPU
    is sent uint8, a quarter of the bytes (on a 2-core CPU, idle, Lite0 scores 60-63 images/s
    either way)."""
    files = _Files(paths, spec.input_size, spec.equalize, crop, doubts)
    return DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as asked (None: the best there is), refused with the choices when this
    machine has no such device."""
    if device is None:
        return default_device()
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: use cpu, cuda, cuda:N or mps") from None
    present = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": torch.backends.mps.is_available()}
    if not present.get(chosen.type, False):
        raise ValueError(f"device {device!r}: this machine has none; use "
                         + ", ".join(kind for kind, there in present.items() if there))
    return chosen


def predict_logits(
    model: Classifier,
    paths: Sequence[str | Film],
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    views: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    crop: float = 1.0,
    doubts: dict[int, str] | None = None,
) -> tuple[np.ndarray, list[Failure]]:
    """Logits [N, C] for `paths` (NaN rows for unreadable files) and the failures.

    `views` are extra batch -> batch transforms (test-time augmentation); when
    given, the logits are averaged over the plain batch and every view. `crop` < 1
    scores the films framed more tightly (the central fraction of each side). `doubts`, when
    given, is filled with {index: why that readable image is hardly a chest film}.
    """
    device = resolve_device(device)
    # Outside inference_mode: `.to()` replaces the parameters in place, and parameters made
    # inside it are inference tensors that autograd refuses later (Grad-CAM, fine-tuning).
    model = model.eval().to(device, memory_format=torch.channels_last)
    finish = ModelInput(model.spec)
    logits = np.full((len(paths), model.spec.num_classes), np.nan, dtype=np.float32)
    failures: list[Failure] = []
    progress = ScoringProgress(len(paths))
    with torch.inference_mode():
        for x, indices, bad, doubtful in file_batches(model.spec, paths, batch_size,
                                                      num_workers, crop, doubts is not None):
            progress.done(len(indices) + len(bad))
            failures += [Failure(film_name(paths[i], i), reason) for i, reason in bad]
            if doubts is not None:
                doubts.update(doubtful)
            if x is None:
                continue
            x = finish(x.to(device)).contiguous(memory_format=torch.channels_last)
            out = torch.stack([model(v(x)) for v in (lambda t: t, *views)]).mean(0)
            logits[indices] = finite_logits(out.float().cpu().numpy(), indices, paths)
    return logits, failures
