"""Section builders, one module per command; importing this package registers them all (see
:mod:`avdiag.report.blocks`). A new command's view is one new module here plus its import below."""

from avdiag.report.sections import check, conflict, diff, generic, inspect, monitor, reinit

__all__ = ["check", "conflict", "diff", "generic", "inspect", "monitor", "reinit"]
