"""`avdiag report RESULTS... -o OUT`: one HTML or Markdown report from the JSON of other commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from avdiag.cli.app import command


@command("report")
def report_command(
    results: Annotated[list[Path], typer.Argument(help="JSON results of avdiag commands (--json output), or "
                                                  "training run logs (.jsonl) written by avdiag.monitor.")],
    output: Annotated[Path, typer.Option("--out", "--output", "-o", help="report.html (self-contained, plots embedded) "
                      "or report.md (for pull-request comments).")],
    title: Annotated[Optional[str], typer.Option("--title")] = None,
    images: Annotated[bool, typer.Option("--images", help="Markdown: write the plots as PNGs beside the report.")]
        = False,
) -> int:
    """Render one HTML or Markdown report from the JSON results of other commands."""
    from avdiag.workflows.report import load_results, report

    written = report(load_results(results), output, title=title, images=images, protect=tuple(results))
    print(f"wrote {written}")
    return 0
