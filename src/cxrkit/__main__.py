"""`python -m cxrkit ...`: the `cxr` command, where its script is not on PATH."""

from cxrkit.cli import app

app(prog_name="cxr")
