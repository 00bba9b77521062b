"""The `cxr` command line: a thin layer over the Python API, one module per area."""

from cxrkit.cli import data, evaluate, pipeline, train, use  # noqa: F401  (each registers its commands)
from cxrkit.cli.app import app

# `cxr --help` lists the main job first (commands are listed as registered, and the module
# of `run` registers after the modules it imports).
app.registered_commands.sort(key=lambda command: command.name != "run")

__all__ = ["app"]
