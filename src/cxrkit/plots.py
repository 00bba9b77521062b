"""Saving a figure: the PNG the reports embed and, for a paper, the same figure in each
vector format `CXRKIT_FIGURE_FORMATS` names (e.g. `svg,pdf`), beside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cxrkit.config import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

VECTOR_FORMATS = ("svg", "pdf", "eps")
# One per curve of a figure, beside its colour: curves stay apart for a colour-blind reader
# and on a greyscale print. Dotted (":") is kept for reference lines (thresholds, chance).
LINE_STYLES = ("-", "--", "-.", (0, (6, 2, 1, 2, 1, 2)))


def line_style(i: int) -> str | tuple:
    return LINE_STYLES[i % len(LINE_STYLES)]


def extra_formats() -> list[str]:
    """The formats CXRKIT_FIGURE_FORMATS asks for besides PNG (none by default)."""
    value = os.environ.get("CXRKIT_FIGURE_FORMATS", "")
    formats = [f.strip().lower().lstrip(".") for f in value.split(",") if f.strip()]
    unknown = sorted(set(formats) - {*VECTOR_FORMATS, "png"})
    if unknown:
        raise ConfigError(f"CXRKIT_FIGURE_FORMATS={value!r}: {', '.join(unknown)} is not a "
                          f"figure format here; choose from {', '.join(VECTOR_FORMATS)}")
    return [f for f in dict.fromkeys(formats) if f != "png"]


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """`fig` as PNG at `path`, and in every extra format beside it (same name)."""
    import matplotlib

    path = Path(path)
    fig.savefig(path, dpi=dpi)
    # Text as text: TrueType fonts in PDF/EPS (journals refuse Type 3), editable SVG text.
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}):
        for suffix in extra_formats():
            fig.savefig(path.with_suffix(f".{suffix}"))
    return path
