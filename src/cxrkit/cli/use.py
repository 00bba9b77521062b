"""`cxr predict | export | serve`: use a trained model (thin wrappers over cxrkit.predict,
cxrkit.export and cxrkit.serve, imported inside each command: see cxrkit.cli.evaluate)."""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cxrkit.cli.app import USER_ERRORS, app, console, fail, refuse_a_file_for_a_folder
from cxrkit.data.io import LARGEST_FILM_MB

if TYPE_CHECKING:
    from cxrkit.predict import Prediction

MODEL_HELP = "A run folder (from `cxr train`), or an ONNX export folder (model.onnx + model.json)."
TABLE_ROWS = 50  # more than this on screen helps nobody: --out has them all


def threshold_note(readable: list[Prediction]) -> str | None:
    """Why a 0.38 can still be PNEUMONIA: the rule the labels follow (two classes)."""
    if not readable or readable[0].threshold is None:
        return None
    positive = readable[0].positive_label
    return f"label {positive} where P({positive}) >= {readable[0].threshold:.3f}"


# A tab, newline or carriage return in a file name, written \t, \n, \r: it would end the
# line or add a column. (A backslash stays as it is: Windows paths keep theirs.)
CONTROL_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _tsv_path(path: str) -> str:
    """A path for a tab-separated line: control characters escaped, and a name that is not
    UTF-8 (cp1252 bytes) with \udcfe escapes, which a strict stdout (en_US.UTF-8) takes."""
    return path.translate(CONTROL_ESCAPES).encode("utf-8", "backslashreplace").decode()


def predictions_tsv(readable: list[Prediction]) -> str:
    """Every readable film on a line of its own, its whole path first, tab-separated: for
    `| grep`, `| cut`, a spreadsheet."""
    labels = list(readable[0].probabilities)
    rows = [["path", "label", *[f"P({label})" for label in labels]]]
    rows += [[_tsv_path(p.path), p.label,
              *[f"{p.probabilities[k]:.6f}" for k in labels]] for p in readable]
    return "".join("\t".join(row) + "\n" for row in rows)


def predictions_table(predictions: list[Prediction]) -> Table:
    readable = [p for p in predictions if p.ok]
    labels = list(readable[0].probabilities) if readable else []
    # Files under one folder are shown relative to it: the names, not one long prefix.
    paths = [os.path.abspath(p.path) for p in readable]
    root = os.path.commonpath(paths) if len(paths) > 1 else ""
    if root == os.path.dirname(root):  # only the filesystem's root in common: full paths
        root = ""
    table = Table(title=f"Predictions, files in {escape(root)}" if root else "Predictions")
    table.add_column("file", overflow="fold")
    table.add_column("label")
    for label in labels:
        table.add_column(f"P({label})", justify="right")
    for p, path in zip(readable[:TABLE_ROWS], paths, strict=False):
        name = os.path.relpath(path, root) if root else p.path
        table.add_row(escape(name), p.label, *[f"{p.probabilities[k]:.3f}" for k in labels])
    notes = [note] if (note := threshold_note(readable)) else []
    if len(readable) > TABLE_ROWS:
        notes.append(f"first {TABLE_ROWS} of {len(readable)}; --out FILE.csv keeps them all")
    table.caption = "; ".join(notes) or None
    return table


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before the predictions, not after them."""
    if out.suffix.lower() not in (".csv", ".json"):
        fail(f"--out {out}: give a file name ending in .csv or .json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create its folder ({e})")
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        fail(f"--out {out}: cannot write there; choose a file in a folder you can write to")


@app.command("predict")
def predict_command(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) "
                                      "or globs. JPEG, PNG (8/16-bit), DICOM; also BMP, "
                                      "TIFF, WebP, GIF."),
    out: Path | None = typer.Option(None, "--out", help="Also write the predictions to a "
                                    ".csv or .json file."),
    cam: Path | None = typer.Option(None, "--cam", "--cam-dir", help="Folder for Grad-CAM "
                                    "overlays (torch backend)."),
    cam_label: str | None = typer.Option(None, "--cam-label", help="With --cam: each map of "
                                         "this class's evidence (e.g. PNEUMONIA), not of the "
                                         "label called."),
    backend: str | None = typer.Option(None, "--backend", help="torch or onnx; default: "
                                       "torch for a run folder, onnx for an export."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Films scored at once."),
    threshold: float | None = typer.Option(
        None, "--threshold", min=0.0, max=1.0,
        help="Probability of the finding (the model's positive label, e.g. PNEUMONIA) from "
             "which it is predicted; default: the threshold chosen on validation, 0.5 if "
             "none."),
) -> None:
    """Label X-ray files. Exit code 1 when some files could not be read (listed, skipped)."""
    from cxrkit.predict import predict, write_predictions

    if out is not None:
        _check_writable(out)
    start = time.perf_counter()
    try:
        predictions = predict(model, paths, backend, batch_size, threshold, cam,
                              cam_label=cam_label)
    except USER_ERRORS as e:
        fail(str(e))
    seconds = time.perf_counter() - start
    readable = [p for p in predictions if p.ok]
    if readable and sys.stdout.isatty():  # the result, on stdout: a table on a terminal,
        Console().print(predictions_table(predictions))
    elif readable:  # and whole lines in a pipe or a file (`cxr predict ... | grep VIRUS`)
        typer.echo(predictions_tsv(readable), nl=False)
        if note := threshold_note(readable):
            console.print(note)
    failed = [p for p in predictions if not p.ok]
    for p in predictions:
        if p.warning:
            console.print(f"[yellow]warning:[/] {escape(p.path)}: {escape(p.warning)}; its "
                          f"label is unreliable")
    for p in failed:
        console.print(f"[red]unreadable, skipped:[/] {escape(p.path)}: {escape(p.error)}")
    counts = Counter(p.label for p in predictions if p.ok)
    by_label = ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
    console.print(f"{len(predictions) - len(failed)} predicted in {seconds:.1f} s"
                  + (f" ({by_label})" if counts else "") + f"; {len(failed)} unreadable")
    if cam is not None:
        console.print(f"Grad-CAM overlays in {cam}")
    if out is not None:
        try:
            console.print(f"predictions written to {write_predictions(predictions, out)}")
        except OSError as e:  # the disk filled up, or the folder went, while predicting
            fail(f"--out {out}: could not write it ({e})")
    if failed:
        raise typer.Exit(1)


@app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="The run folder to export."),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    out: Path | None = typer.Option(None, "--out", help="Folder to write to; default RUN/export."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset; default: the exporter's."),
) -> None:
    """Export the model (logits out) with a JSON sidecar, usable without cxrkit."""
    from cxrkit.export import SIDECAR, export_model

    refuse_a_file_for_a_folder(out)
    try:
        path = export_model(run, format, out, opset)
    except USER_ERRORS as e:
        fail(str(e))
    console.print(f"exported {path}, with the preprocessing, labels, threshold and calibration "
                  f"in {path.parent / SIDECAR}")
    typer.echo(path)


@app.command("serve")
def serve_command(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on; 0.0.0.0 "
                             "exposes the model to the whole network."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="The port to listen on."),
    max_upload_mb: float = typer.Option(
        float(LARGEST_FILM_MB), "--max-upload-mb", min=0.1,
        help="Larger uploads get 413. The default takes the largest film read (64 megapixels, "
             "uncompressed 16-bit DICOM)."),
    backend: str | None = typer.Option(None, "--backend", help="torch or onnx; default: "
                                       "torch for a run folder, onnx for an export."),
    allowed_hosts: list[str] = typer.Option(
        [], "--allowed-host", help="A host name requests may be addressed to (repeat it): "
        "behind a reverse proxy that passes its public name on. Bound to 127.0.0.1 the "
        "server answers only requests for itself; on another interface any host name."),
    allowed_origins: list[str] = typer.Option(
        [], "--allowed-origin", help="Another site whose pages may send films (repeat it), "
        "e.g. https://xray.example.org behind a proxy that sends its own Host."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="A line on "
                                    "stderr per request (off: a container's health probes "
                                    "fill no log; errors and start-up are still said)."),
) -> None:
    """A web page to try the model, and a JSON API (POST /predict; schema at /docs)."""
    if problem := port_problem(host, port):  # before seconds of imports and model loading
        fail(problem)
    import uvicorn

    from cxrkit.serve.app import create_app, is_loopback

    hosts = served_host_names(host, allowed_hosts)
    try:
        web_app = create_app(model, backend, max_upload_mb, hosts=hosts,
                             origins=allowed_origins)
    except USER_ERRORS as e:
        fail(str(e))
    if not is_loopback(host):
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach this "
                      "machine can send images; there is no authentication.")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # "all interfaces": not a URL
    console.print(f"open http://{shown}:{port}/ (API docs at /docs); Ctrl+C stops")
    uvicorn.run(web_app, host=host, port=port, log_level="info", log_config=server_logging(),
                access_log=access_log)


def server_logging() -> dict:
    """uvicorn's logging, every line on stderr with its date and time: its access lines went
    to stdout without either, beside cxrkit's on stderr."""
    import copy

    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
        formatter["datefmt"] = "%Y-%m-%dT%H:%M:%S%z"
    return config


def served_host_names(host: str, allowed: list[str]) -> list[str] | None:
    """The host names `cxr serve --host HOST` answers requests for (`SameSiteOnly`): on a
    loopback address its loopback names and `allowed`; on another interface any (None)
    unless `allowed` names some, and then also the loopback names and HOST itself, which
    it prints (no page can rebind to them)."""
    from cxrkit.serve.app import LOOPBACK_HOSTS, is_loopback

    if not allowed and not is_loopback(host):
        return None
    names = [*LOOPBACK_HOSTS, *allowed]
    return names if host in ("0.0.0.0", "::") else [*names, host]


def port_problem(host: str, port: int) -> str | None:
    """Why `cxr serve` could not listen on host:port (None: it can), said before the page's
    address is printed: a port in use would show another server's page."""
    try:
        [(family, kind, proto, _, address), *_] = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return (f"cannot listen on {host}:{port} ({e.strerror}): another server is using "
                    f"it; choose another --port (or stop that server)")
        return (f"cannot listen on {host}:{port} ({e.strerror or e}): check --host (this "
                f"machine's address, 127.0.0.1 or 0.0.0.0)")
    return None
