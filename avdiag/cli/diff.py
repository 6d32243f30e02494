"""`avdiag diff A B`: tensors added, removed or changed; BatchNorm channels that died or revived."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avdiag.cli.app import command
from avdiag.cli.options import AllowGlobalOpt, JsonOpt, QuietOpt, ReportOpt, UnsafeOpt, VerboseOpt
from avdiag.cli.output import Outputs, warn_unsafe


@command()
def diff(
    a: Annotated[Path, typer.Argument(help="The checkpoint before.")],
    b: Annotated[Path, typer.Argument(help="The checkpoint after.")],
    json_out: JsonOpt = None, report: ReportOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = False,
    atol: Annotated[float, typer.Option("--atol", help="Values within this absolute difference count as "
                    "unchanged [default: 0, bitwise].")] = 0.0,
    allow_global: AllowGlobalOpt = [], unsafe: UnsafeOpt = False,
) -> int:
    """Compare two checkpoints: tensors added/removed/changed, channels that died or revived."""
    from avdiag.report.terminal.diff import render_diff
    from avdiag.workflows.diff import diff as run_diff
    from avdiag.workflows.subject import LoadOptions

    out = Outputs([a, b], json_out, report, quiet)
    warn_unsafe(unsafe)
    result = run_diff(a, b, atol=atol, load=LoadOptions(tuple(allow_global), unsafe))
    out.emit(result.to_dict(), lambda console: render_diff(result, console, quiet=quiet, verbose=verbose))
    return 0
