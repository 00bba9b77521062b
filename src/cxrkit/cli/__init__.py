"""The `cxr` command line: a thin layer over the Python API, one module per area."""

from cxrkit.cli import data, evaluate, pipeline, train, use  # noqa: F401  (each registers its commands)
from cxrkit.cli.app import app

__all__ = ["app"]
