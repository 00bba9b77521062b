"""The Typer application every `cxrkit.cli.*` module adds its commands to."""

import logging
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from cxrkit.config import NoSpaceError
from cxrkit.data.kaggle import KaggleDownloadError

app = typer.Typer(
    name="cxr",
    help="cxrkit: chest X-ray classification from data to a deployable model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Click's plain help: Rich's boxed tables cut long option names (--framing-thresho…) at
    # 80 columns, and an option you cannot read you cannot copy.
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Download, audit and split datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# soft_wrap: the terminal wraps long lines, Rich never cuts a path or command in two (copyable)
console = Console(stderr=True, soft_wrap=True)


def show_table(table: Table) -> None:
    """A table keeps Rich's layout: title centred, cells wrapped to the terminal. A log file
    or a pipe has no width (Rich would assume 80 columns and cut run names and paths): there
    the table is laid out as wide as its cells need."""
    if console.is_terminal:
        console.print(table, soft_wrap=False)
        return
    unbounded = console.options.update(max_width=100_000)
    width = max(Measurement.get(console, unbounded, table).maximum, console.width)
    Console(file=console.file, width=width).print(table, soft_wrap=False)

# The API's errors for a user's mistake, each saying the fix: printed as one line, no traceback.
# (KaggleDownloadError is a RuntimeError; DataLayoutError, ConfigError and UnreadableImageError
# are ValueErrors.)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KaggleDownloadError,
               NoSpaceError)

DATA_HELP = "`kaggle` (download or kagglehub cache), a dataset folder or a CSV manifest."


def _print_version(asked: bool) -> None:
    if asked:
        from cxrkit import __version__

        typer.echo(f"cxrkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
         version: bool = typer.Option(False, "--version", callback=_print_version,
                                      is_eager=True, help="Print the version and exit.")
         ) -> None:
    # force: each invocation writes to the stderr it has (tests run several in one process)
    logging.basicConfig(level=logging.INFO, handlers=[log_handler(console)], force=True)
    # -v: cxrkit's and Lightning's debug lines, not matplotlib's font search or PIL's chunks
    if verbose:  # Lightning sets its loggers' level as it is imported: imported first here
        import lightning.pytorch  # noqa: F401
    for package in VERBOSE_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.NOTSET)


VERBOSE_PACKAGES = ("cxrkit", "lightning", "lightning.pytorch", "lightning.fabric")  # each its own
LOG_FORMAT = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%H:%M:%S")
LEVEL_STYLES = {"DEBUG": "dim", "INFO": "blue", "WARNING": "yellow", "ERROR": "bold red",
                "CRITICAL": "bold red"}


class TerminalLogHandler(logging.Handler):
    """One line per record, its level coloured. Rich's own handler lays records out in
    columns and folds a long path inside its message column; here the terminal wraps the
    line, so a path or command copied from it comes whole."""

    def __init__(self, terminal: Console):
        super().__init__()
        self.terminal = terminal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = Text(self.format(record))
            line.highlight_words([record.levelname], LEVEL_STYLES.get(record.levelname, ""))
            if isinstance(sys.stderr, FileProxy):  # a live progress bar holds the terminal:
                with self.terminal.capture() as captured:  # through it, so the line goes
                    self.terminal.print(line, soft_wrap=True)  # above the bar, not into it
                sys.stderr.write(captured.get())
            else:
                self.terminal.print(line, soft_wrap=True)
        except Exception:  # logging must never raise into the program
            self.handleError(record)


class StderrHandler(logging.StreamHandler):
    """Plain lines to the standard error of the moment: a handler holding the stream it was
    made with wrote, once a test runner had swapped stderr back, into a closed file (each
    later log line a "Logging error" whose traceback kept objects alive)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # (StreamHandler sets it; the property above decides)


def log_handler(terminal: Console) -> logging.Handler:
    """Coloured lines on a terminal; plain lines in a log file or a pipe."""
    handler = TerminalLogHandler(terminal) if terminal.is_terminal else StderrHandler()
    handler.setFormatter(LOG_FORMAT)
    return handler


def route_lightning_logs() -> None:
    """Lightning's package adds a console handler of its own when imported; the root logger's
    (Rich, set up above) already shows its messages, which would otherwise print twice."""
    import lightning  # noqa: F401  (the import adds the handler taken off here)

    logger = logging.getLogger("lightning")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an actionable error (no traceback) and exit. The message is shown as written:
    a path like `scan [left].png` is not Rich markup."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def refuse_a_file_for_a_folder(out: Path | None) -> None:
    """`--out` names a folder to write into: a file there failed after the work with a bare
    `[Errno 17] File exists`."""
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give a folder (one that does not exist yet is made)")
