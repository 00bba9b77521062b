"""The audit's PNG figures, drawn with matplotlib's object API (no pyplot, no global state)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure

from cxrkit.config import AugmentConfig
from cxrkit.data.layout import Sample
from cxrkit.data.transforms import train_transform
from cxrkit.models import ModelSpec
from cxrkit.plots import line_style, save_figure

if TYPE_CHECKING:
    from cxrkit.data.audit import ImageFacts, NearDuplicate

AUGMENTATIONS_SHOWN = 7
NEAR_PAIRS_SHOWN = 6
DPI = 100


def _save(fig: Figure, path: Path) -> str:
    if fig.get_layout_engine() is None:  # (film grids lay themselves out, titles and all)
        fig.tight_layout()
    return str(save_figure(fig, path, DPI))


def plot_class_balance(samples: list[Sample], path: Path) -> str:
    """Bars of images per class, one group per split."""
    counts = Counter((s.split or "all", s.label) for s in samples)
    splits = sorted({sp for sp, _ in counts}, key=["train", "val", "test", "all"].index)
    classes = sorted({c for _, c in counts})
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(classes)
    x = np.arange(len(splits))
    for k, label in enumerate(classes):
        heights = [counts[(sp, label)] for sp in splits]
        bars = ax.bar(x + k * width - 0.4 + width / 2, heights, width, label=label)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.set_title("Images per class and split")
    ax.legend()
    return _save(fig, path)


def plot_sample_grid(samples: list[Sample], facts: list[ImageFacts], path: Path) -> str:
    """A row of films per class, as the model sees them (resized to its input size)."""
    label_of = {s.path: s.label for s in samples}
    rows: dict[str, list[ImageFacts]] = defaultdict(list)
    for f in facts:
        if f.preview is not None:
            rows[label_of[f.path]].append(f)
    classes = sorted(rows)
    cols = max((len(r) for r in rows.values()), default=1)
    fig = Figure(figsize=(2.2 * cols, 2.7 * max(len(classes), 1)), layout="constrained")
    axes = np.array(fig.subplots(max(len(classes), 1), cols, squeeze=False))
    for ax in axes.ravel():
        ax.axis("off")
    for i, label in enumerate(classes):
        for j, f in enumerate(rows[label]):
            axes[i, j].imshow(f.preview, cmap="gray", vmin=0, vmax=255)
            # the model sees every film square: say when that squashed this one
            squashed = "" if f.width == f.height else f"\n{f.width}x{f.height}, squashed"
            axes[i, j].set_title(_short(Path(f.path).name) + squashed, fontsize=8)
        axes[i, 0].text(-0.1, 0.5, label, transform=axes[i, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=11)
    fig.suptitle("Films evenly spaced in file order, resized to the model's input", fontsize=10)
    return _save(fig, path)


def _short(name: str, width: int = 24) -> str:
    """A file name on at most two lines of `width`, whole where it fits (so that the file can
    be found again); a longer one keeps its start and its end (number and suffix)."""
    if len(name) <= width:
        return name
    # break after a _ or -, or before the suffix's dot, where one is in the line's second half
    cuts = [i + 1 for i, c in enumerate(name) if c in "_-"] + [i for i, c in enumerate(name)
                                                              if c == "."]
    cut = max((c for c in cuts if width // 2 <= c <= width), default=width)
    rest = name[cut:]
    return f"{name[:cut]}\n{rest if len(rest) <= width else '…' + rest[-(width - 1):]}"


def plot_image_sizes(facts: list[ImageFacts], path: Path) -> str:
    """Width against height of every readable file, as stored: one marker per distinct size,
    its area growing with the number of files of that size."""
    sizes = Counter((f.width, f.height) for f in facts if not f.error)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    if sizes:
        counts = np.array(list(sizes.values()))
        ax.scatter([w for w, _ in sizes], [h for _, h in sizes],
                   s=12 + 300 * np.sqrt(counts / counts.max()), alpha=0.5)
        for (w, h), n in sizes.most_common(5):
            ax.annotate(f"{n}", (w, h), fontsize=8, ha="center", va="center")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Stored image sizes: {len(sizes)} distinct, {sum(sizes.values())} files "
                 "(largest groups counted)", fontsize=9)
    return _save(fig, path)


def plot_intensity_histograms(samples: list[Sample], facts: list[ImageFacts], path: Path) -> str:
    """Each class's average per-film pixel histogram (8-bit): exposure or source differences.
    Log scale, so that the black borders' spike at 0 does not flatten the rest."""
    label_of = {s.path: s.label for s in samples}
    by_class: dict[str, list[np.ndarray]] = defaultdict(list)
    for f in facts:
        if f.histogram is not None:
            by_class[label_of[f.path]].append(f.histogram)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for i, label in enumerate(sorted(by_class)):
        ax.plot(np.arange(256), np.mean(by_class[label], axis=0), ls=line_style(i),
                label=f"{label} ({len(by_class[label])} films)")
    ax.set_xlabel("pixel intensity (0-255)")
    ax.set_ylabel("fraction of pixels (log scale)")
    ax.set_yscale("log")
    ax.set_title("Average pixel histogram of a film, by class")
    if by_class:
        ax.legend()
    return _save(fig, path)


def plot_augmentation_preview(film: np.ndarray, spec: ModelSpec, path: Path) -> str:
    """One film and what the training augmentation makes of it (before normalisation)."""
    transform = train_transform(spec, finish=False)
    pixels = torch.from_numpy(film)[None]
    with torch.random.fork_rng():  # a fixed preview that leaves the caller's RNG alone
        torch.manual_seed(0)
        views = [transform(pixels)[0].numpy() for _ in range(AUGMENTATIONS_SHOWN)]
    columns = -(-(AUGMENTATIONS_SHOWN + 1) // 2)  # two rows: legible at a page's width
    fig = Figure(figsize=(2.0 * columns, 5.0), layout="constrained")
    axes = fig.subplots(2, columns).ravel()
    axes[0].imshow(film, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("original", fontsize=9)
    for k, (ax, view) in enumerate(zip(axes[1:], views, strict=True), start=1):
        ax.imshow(view, cmap="gray", vmin=0, vmax=1)
        # saturated regions are a fact of this augmentation worth seeing, not hiding
        ax.set_title(f"draw {k}: {np.mean(view >= 0.99):.0%} clipped white", fontsize=9)
    for ax in axes:
        ax.axis("off")
    aug = AugmentConfig()
    fig.suptitle(f"Random training augmentations of one film (the defaults: rotation "
                 f"±{aug.degrees:g}°, shift ±{aug.translate:.0%}, scale "
                 f"{aug.scale[0]:g}-{aug.scale[1]:g},\nbrightness ±{aug.brightness:g}, contrast "
                 f"±{aug.contrast:g}, gamma {aug.gamma[0]:g}-{aug.gamma[1]:g}, blur "
                 f"{aug.blur_p:.0%} of draws, noise σ {aug.noise_std:g})", fontsize=10)
    return _save(fig, path)


def pairs_to_show(pairs: list[NearDuplicate]) -> list[NearDuplicate]:
    """The pairs worth a look first: across splits (a possible leak), then the closest."""
    return sorted(pairs, key=lambda p: (p.split_a == p.split_b, p.distance))[:NEAR_PAIRS_SHOWN]


def plot_near_duplicates(pairs: list[NearDuplicate], path: Path, size: int = 224) -> str:
    """The closest near-duplicate pairs side by side with their difference, pairs across
    splits first: whether two films are one film (a leak between splits) or two films of
    one patient taken apart is a judgement a look settles, a hash distance does not."""
    from cxrkit.data.dataset import load_prepared

    shown = pairs_to_show(pairs)
    fig = Figure(figsize=(6.6, 2.5 * len(shown)))
    axes = np.array(fig.subplots(len(shown), 3, squeeze=False))
    for row, pair in zip(axes, shown, strict=True):
        films = [load_prepared(f, size, equalize=False)[0].numpy() for f in (pair.a, pair.b)]
        difference = np.abs(films[0].astype(np.int16) - films[1]).astype(np.uint8)
        for ax, film, file, split in ((row[0], films[0], pair.a, pair.split_a),
                                      (row[1], films[1], pair.b, pair.split_b)):
            ax.imshow(film, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{_short(Path(file).name)} ({split or 'no split'})", fontsize=8)
        row[2].imshow(difference, cmap="gray", vmin=0, vmax=255)
        row[2].set_title(f"|difference|: mean {difference.mean():.1f} of 255\n"
                         f"hash distance {pair.distance}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.suptitle(f"The {len(shown)} closest near-duplicate pairs, those across splits first",
                 fontsize=10)
    return _save(fig, path)


def write_audit_figures(samples: list[Sample], facts: list[ImageFacts], spec: ModelSpec,
                        out_dir: Path, near: list[NearDuplicate] = ()) -> dict[str, str]:
    """All figures into out_dir; returns {name: path}."""
    figures = {
        "class_balance": plot_class_balance(samples, out_dir / "class_balance.png"),
        "samples": plot_sample_grid(samples, facts, out_dir / "samples.png"),
        "image_sizes": plot_image_sizes(facts, out_dir / "image_sizes.png"),
        "intensity": plot_intensity_histograms(samples, facts, out_dir / "intensity.png"),
    }
    previews = [f.preview for f in facts if f.preview is not None]
    if previews:
        figures["augmentation"] = plot_augmentation_preview(previews[0], spec,
                                                            out_dir / "augmentation.png")
    if near:
        figures["near_duplicates"] = plot_near_duplicates(near, out_dir / "near_duplicates.png",
                                                          spec.input_size)
    return figures
