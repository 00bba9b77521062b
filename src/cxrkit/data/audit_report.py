"""`audit.html`: one self-contained page (figures embedded as base64 PNG, no external files)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import TYPE_CHECKING

from cxrkit.data.io import written_whole

if TYPE_CHECKING:
    from cxrkit.data.audit import AuditResult

ROWS_SHOWN = 200  # longer tables are cut here; audit.json has every row

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222;
       padding: 0 1.5rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.85rem;
        display: block; overflow-x: auto; max-width: 100%; }  /* scrolls, not the page */
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; }
caption { display: block; text-align: left; color: #555; padding-bottom: 4px; }
th[scope=row] { background: none; font-weight: normal; }
img { max-width: 100%; margin: 0.5rem 0; } .muted { color: #666; }
li.fix { color: #9b1c1c; }
"""
# The audit's notes come most severe first (cxrkit.data.audit.NOTE_LEVELS); each says which.
NOTE_WORDS = {"fix": "<b>Fix before training:</b> ", "check": "<b>Check:</b> ", "info": ""}


def _cell(value) -> str:
    css = ' class="num"' if isinstance(value, int | float) else ""
    return f"<td{css}>{html.escape(str(value))}</td>"


def _row(values: list) -> str:
    """A table row, its first cell the row's header (what a screen reader names each cell by)."""
    first, *rest = values
    return (f'<tr><th scope="row">{html.escape(str(first))}</th>'
            + "".join(_cell(v) for v in rest) + "</tr>")


def with_code(text: str) -> str:
    """`text` escaped for HTML, its `backquoted` commands set as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def table(caption: str, headers: list[str], rows: list[list], empty: str = "none") -> str:
    """An HTML table that says what it holds; `empty` is shown instead when there are no
    rows."""
    if not rows:
        return f'<p class="muted">{html.escape(empty)}</p>'
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in headers)
    body = "".join(_row(row) for row in rows[:ROWS_SHOWN])
    more = (f'<p class="muted">{len(rows) - ROWS_SHOWN} more rows in audit.json</p>'
            if len(rows) > ROWS_SHOWN else "")
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>{more}"


def embedded_png(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _counts_section(r: AuditResult) -> str:
    rows = [[split or "(no split)", *c.values(), sum(c.values()), r.patients.get(split, 0),
             r.imbalance[split] or "-"] for split, c in r.counts.items()]
    out = table("Films per class in each split, with patients and the class imbalance",
                ["split", *r.classes, "total", "patients", "imbalance"], rows)
    if r.unreadable:
        out += (f"<p>Files found, the {len(r.unreadable)} unreadable ones included (listed "
                "below; training skips them).</p>")
    if r.subtypes:
        kinds = sorted({k for c in r.subtypes.values() for k in c})
        out += "<h3>Subtypes (from file names)</h3>" + table(
            "Films per subtype in each split", ["split", *kinds],
            [[s or "(no split)", *(c.get(k, 0) for k in kinds)] for s, c in r.subtypes.items()])
    return out


def _images_section(r: AuditResult) -> str:
    sizes = r.sizes
    rows = [[axis, sizes[axis]["min"], _whole(sizes[axis]["median"]), sizes[axis]["max"]]
            for axis in ("width", "height") if axis in sizes]
    common = ", ".join(f"{w}x{h} ({n})" for w, h, n in sizes.get("most_common", []))
    return (table("Film sizes in pixels, as stored", ["side", "min", "median", "max"], rows)
            + f"<p>{_count(sizes.get('distinct_sizes', 0), 'distinct size')}; most common: "
            f"{html.escape(common)}</p>"
            + table("Pixel modes as stored", ["mode as stored", "files"],
                    [[m, n] for m, n in r.modes.items()])
            + table("File formats", ["format", "files"],
                    [[f, n] for f, n in r.formats.items()]))


def _whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # "224", not "224.0"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _relative(path: str, r: AuditResult) -> str:
    """Paths under the data folder are shown relative to it: shorter, still unambiguous."""
    base = Path(r.root).parent if r.layout == "manifest" else Path(r.root)
    return str(Path(path).relative_to(base)) if Path(path).is_relative_to(base) else path


def _duplicates_section(r: AuditResult) -> str:
    exact = table("Groups of byte-identical files", ["group", "files", "paths (split/class/file)"],
                  [[i + 1, len(g), " | ".join(_relative(p, r) for p in g)]
                   for i, g in enumerate(r.exact_duplicates)],
                  "no byte-identical files")
    near = table("Pairs of near-duplicate films, closest first",
                 ["distance", "file A", "split A", "label A", "file B", "split B", "label B"],
                 [[p.distance, _relative(p.a, r), p.split_a or "-", p.label_a,
                   _relative(p.b, r), p.split_b or "-", p.label_b] for p in r.near_duplicates],
                 f"no near duplicates within {r.near_threshold} bits (byte-identical files "
                 "are listed above, not here)")
    return (f"<h3>Exact (SHA-256): {len(r.exact_duplicates)} groups, {r.duplicate_files} files, "
            f"{r.redundant_copies} redundant copies</h3>{exact}"
            f"<h3>Near (perceptual hash within {r.near_threshold} of {r.hash_bits} bits): "
            f"{r.near_pairs_total} pairs, {r.near_across_splits} across splits</h3>{near}")


# What each figure shows and how to read it: the page's captions and the images' alt text.
FIGURE_CAPTIONS = {
    "class_balance": "Images per class in each split: the imbalance a loss or sampler must "
                     "handle, and whether the splits share it.",
    "samples": "A few films of each class, evenly spaced in file order, as the model sees "
               "them (resized square; films stored at another shape are marked squashed).",
    "image_sizes": "Width and height of the files as stored; a marker's area grows with the "
                   "number of files of that size.",
    "intensity": "Each class's average pixel histogram (log scale): a class whose films are "
                 "exposed or processed differently is a shortcut a model can learn.",
    "augmentation": "One film and random training augmentations of it, with the share of "
                    "pixels each draw saturates to white.",
    "near_duplicates": "The closest pairs of films whose perceptual hashes nearly agree, "
                       "pairs across splits first, each with the two films' pixel difference: "
                       "one film twice (a black difference) across train and test is a leak; "
                       "two films of one patient taken apart show anatomy in the difference.",
}


def _figure(name: str, path: str) -> str:
    caption = FIGURE_CAPTIONS.get(name, name.replace("_", " "))
    return (f"<figure><h3>{html.escape(name.replace('_', ' '))}</h3>"
            f"{embedded_png(path, caption)}<figcaption>{html.escape(caption)}</figcaption>"
            "</figure>")


def write_audit_html(r: AuditResult, path: str | Path) -> Path:
    figures = "".join(_figure(name, p) for name, p in r.figures.items())
    shared = [[pair, len(ids), ", ".join(ids[:50]) + (" ..." if len(ids) > 50 else "")]
              for pair, ids in r.shared_patients.items()]
    levels = r.note_levels or [""] * len(r.notes)
    notes = "".join(f'<li class="{level}">{NOTE_WORDS.get(level, "")}{with_code(n)}</li>'
                    for level, n in zip(levels, r.notes, strict=True)) or "<li>none</li>"
    unreadable = table("Files that do not decode, and why", ["path", "reason"],
                       [[_relative(u.path, r), u.reason] for u in r.unreadable],
                       "every file decodes")
    doubtful = table("Files that decode but are hardly films",
                     ["path", "why it is hardly a film"],
                     [[_relative(u.path, r), u.reason] for u in r.doubtful],
                     "every decoded file looks like a film (size, shape, contrast)")
    made = f" &middot; {html.escape(r.audited_at)} by cxrkit {html.escape(r.version)}" \
        if r.version else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>cxrkit data audit</title>
<style>{STYLE}</style></head><body><main>
<h1>Data audit</h1>
<p>{html.escape(r.root)} &middot; layout <b>{html.escape(r.layout)}</b> &middot;
{r.n_images} images &middot; audited in {r.seconds} s
{made}</p>
<h2>Notes</h2><ul>{notes}</ul>
<h2>Counts</h2>{_counts_section(r)}
<h2>Unreadable files</h2>{unreadable}
<h2>Readable, but hardly films</h2>{doubtful}
<h2>Duplicates</h2>{_duplicates_section(r)}
<h2>Patients shared between splits</h2>{table("Patient ids found in two splits",
                                          ["splits", "patients", "ids"], shared)}
<h2>Images</h2>{_images_section(r)}
<h2>Figures</h2>{figures or '<p class="muted">figures were not drawn</p>'}
</main></body></html>
"""
    path = Path(path)
    with written_whole(path) as partial:  # a full disk leaves the page there before whole
        partial.write_text(page, encoding="utf-8")
    return path
