"""`cxr data download | audit | split | cache`: thin wrappers over cxrkit.data."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cxrkit.cli.app import (
    DATA_HELP,
    USER_ERRORS,
    console,
    data_app,
    fail,
    refuse_a_file_for_a_folder,
    show_table,
)
from cxrkit.data.audit import DEFAULT_NEAR_THRESHOLD, AuditResult, audit_dataset
from cxrkit.data.kaggle import KAGGLE_VERSION, KaggleDownloadError, download_kaggle
from cxrkit.data.layout import DataSource, load_source, refuse_conflicting_rows
from cxrkit.data.split import patient_split, shared_patients, write_manifest

PATTERN_HELP = ("Regex whose `patient` group (or first group) is the patient id in a file name, "
                "else in its path below the dataset (e.g. '(?P<patient>p\\d+)/'); default: the "
                "Kermany names.")


def counts_table(title: str, classes: list[str], counts: dict[str, dict[str, int]],
                 patients: dict[str, int]) -> Table:
    """Images per split and class, with the number of patients."""
    table = Table(title=title)
    for column in ("split", *classes, "total", "patients"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, per_class in counts.items():
        table.add_row(split or "(no split)", *map(str, per_class.values()),
                      str(sum(per_class.values())), str(patients[split]))
    return table


def checks_table(r: AuditResult) -> Table:
    table = Table(title="Checks", show_header=False)
    table.add_column("check")
    table.add_column("result")
    sizes = r.sizes
    table.add_row("unreadable files", str(len(r.unreadable)))
    table.add_row("readable, hardly films", str(len(r.doubtful)))
    table.add_row("exact duplicates", f"{len(r.exact_duplicates)} groups, "
                  f"{r.duplicate_files} files, {r.redundant_copies} redundant copies")
    table.add_row(f"near duplicates (<= {r.near_threshold}/{r.hash_bits} bits)",
                  f"{r.near_pairs_total} pairs, {r.near_across_splits} across splits")
    for pair, ids in r.shared_patients.items():
        table.add_row(f"patients shared {pair}", str(len(ids)))
    if r.subtypes:
        table.add_row("subtypes", "; ".join(
            (f"{split}: " if split else "") + ", ".join(f"{k} {n}" for k, n in c.items())
            for split, c in r.subtypes.items()))
    if sizes:
        table.add_row("image sizes", f"{sizes['width']['min']}-{sizes['width']['max']} x "
                                     f"{sizes['height']['min']}-{sizes['height']['max']} px, "
                                     f"{sizes['distinct_sizes']} distinct")
    table.add_row("modes", ", ".join(f"{m} {n}" for m, n in r.modes.items()))
    return table


@data_app.command()
def download(
    dest: Path | None = typer.Option(None, "--dest", help="Folder to put the data in; "
                                     "default: kagglehub's cache (KAGGLEHUB_CACHE)."),
    version: int = typer.Option(KAGGLE_VERSION, "--version",
                                help="Dataset version; 0 = the latest (always asks Kaggle)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
) -> None:
    """Download paultimothymooney/chest-xray-pneumonia; the last line printed is its folder."""
    try:
        path = download_kaggle(dest, version or None, force)
    except KaggleDownloadError as e:
        fail(str(e))
    console.print(f"dataset ready: {path}")
    typer.echo(path)


@data_app.command()
def audit(
    data: str = typer.Argument(..., help=DATA_HELP),
    out: Path = typer.Option(Path("audit"), "--out", help="Folder for audit.html, audit.json, "
                             "figures."),
    patient_pattern: str | None = typer.Option(None, "--patient-pattern", help=PATTERN_HELP),
    near_threshold: int = typer.Option(
        DEFAULT_NEAR_THRESHOLD, "--near-threshold",
        help="Near duplicates: at most this many of the 256 perceptual-hash bits differ."),
    workers: int | None = typer.Option(None, "--workers", help="Processes; default: all cores."),
) -> None:
    """Counts, sizes, unreadable files, duplicates and patients, with an HTML report and
    figures (class balance, sample films, sizes, intensity histograms, augmentations)."""
    refuse_a_file_for_a_folder(out)
    try:
        result = audit_dataset(data, out, patient_pattern, near_threshold, workers)
    except USER_ERRORS as e:
        fail(str(e))
    show_table(counts_table(f"{result.root} ({result.layout} layout)", result.classes,
                               result.counts, result.patients))
    show_table(checks_table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"audited {result.n_images} images in {result.seconds} s; "
                  f"report: {out / 'audit.html'}")
    typer.echo(out.absolute())  # stdout: the result's folder alone, for a script


@data_app.command()
def split(
    data: str = typer.Argument(..., help=DATA_HELP),
    out: Path = typer.Option(Path("split.csv"), "--out", help="Manifest CSV to write."),
    val_fraction: float = typer.Option(0.15, "--val-fraction",
                                       help="Share of each class's train images moved to val."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patients' shuffle."),
    patient_pattern: str | None = typer.Option(None, "--patient-pattern", help=PATTERN_HELP),
) -> None:
    """Carve a validation split out of train, grouped by patient; write a manifest CSV."""
    if out.is_dir():  # (a traceback once the films were listed)
        fail(f"--out {out} is a folder: give a file name ending in .csv, e.g. "
             f"{out / 'split.csv'}")
    try:
        source = load_source(data, patient_pattern)
        refuse_conflicting_rows(source)  # training would refuse the manifest written
        samples = patient_split(source.samples, val_fraction, seed)
    except USER_ERRORS as e:
        fail(str(e))
    write_manifest(samples, out)
    split_source = DataSource(source.root, source.layout, samples, source.classes)
    patients = {name: len({s.patient_id for s in split_source.split(name)})
                for name in split_source.splits}
    show_table(counts_table(f"{out} (val fraction {val_fraction}, seed {seed})",
                               source.classes, split_source.counts(), patients))
    leaked = shared_patients(samples, "train", "val")
    console.print(f"{len(leaked)} patients shared between train and val")
    typer.echo(out)


@data_app.command()
def cache(
    folder: Path | None = typer.Option(None, "--dir", help="The decode cache: "
                                       "`data.cache_dir`/decoded; default: "
                                       "$CXRKIT_CACHE/decoded, else ~/.cache/cxrkit/decoded."),
    clear_all: bool = typer.Option(False, "--clear", help="Remove every entry; the next run "
                                   "decodes its films again (entries in use stay)."),
) -> None:
    """Show the decode cache (films decoded and resized once, reused by later runs), or clear
    it. It stays under CXRKIT_CACHE_MAX_GB (GiB, default 20; inf: no limit), least recently
    used entries first."""
    from cxrkit.data import cache as decoded  # torch: imported when needed

    folder = folder or decoded.DEFAULT_CACHE_DIR / decoded.DECODED
    try:
        limit = decoded.cache_limit_bytes()
    except USER_ERRORS as e:
        fail(str(e))
    if clear_all:
        freed = decoded.clear(folder)
        kept = decoded.cache_entries(folder)
        console.print(f"freed {freed / 2**20:,.0f} MiB in {escape(str(folder))}"
                      + (f"; {len(kept)} entries in use stay" if kept else ""))
        return
    entries = decoded.cache_entries(folder)
    for entry in reversed(entries):  # the most recently opened first
        console.print(entry.describe())
    total = sum(e.nbytes for e in entries)
    bound = "no limit" if limit == sys.maxsize else f"at most {limit / 2**30:g} GiB"
    console.print(f"{escape(str(folder))}: {len(entries)} entries, {total / 2**20:,.0f} MiB "
                  f"({bound}); `cxr data cache --clear` frees it")
