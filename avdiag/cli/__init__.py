"""The `avdiag` command line: one module per command, each parsing options, calling one workflow and
rendering its result through the one output path (:mod:`avdiag.cli.output`)."""

from avdiag.cli import check, conflict, data, diff, inspect, reinit, report  # noqa: F401 - importing registers them
from avdiag.cli.app import app, main

__all__ = ["app", "main"]
