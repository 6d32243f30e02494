"""`avdiag check PATHS...`: the CI gate. Exit 0 pass, 1 policy violations, 2 errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from avdiag.cli.app import command
from avdiag.cli.options import AllowGlobalOpt, JsonOpt, QuietOpt, ReportOpt, takes_data
from avdiag.cli.output import Outputs
from avdiag.errors import UsageError


@command()
@takes_data
def check(
    paths: Annotated[list[str], typer.Argument(help="Checkpoints, folders (searched recursively) or globs; a "
                     "RUN.jsonl is a training run log of avdiag.monitor, checked against the run-* rules.")],
    policy: Annotated[Optional[Path], typer.Option("--policy", metavar="PATH", help="avdiag.toml ([check]) or "
                      "pyproject.toml ([tool.avdiag.check]) [default: found in the current folder].")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", metavar="OLD", help="Fail when dead channels "
                        "grew (with --data: a modality's contribution fell) versus OLD (a checkpoint, or a folder of "
                        "same-named ones).")] = None,
    json_out: JsonOpt = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", metavar="PATH", help="JUnit XML: one testcase per "
                     "file and rule.")] = None,
    sarif: Annotated[Optional[Path], typer.Option("--sarif", metavar="PATH", help="SARIF 2.1.0 log.")] = None,
    report: ReportOpt = None,
    fail_on: Annotated[Optional[str], typer.Option("--fail-on", metavar="error|warning", help="The least severity "
                       "that fails the run [default: the policy's, else error].")] = None,
    on_nothing_analysed: Annotated[Optional[str], typer.Option(
        "--on-nothing-analysed", metavar="error|violation|pass",
        help="What a path that holds no checkpoint is [default: the policy's, else error].")] = None,
    ogm_alpha: Annotated[float, typer.Option("--ogm-alpha", help="OGM-GE alpha of the contribution rule.")] = 0.8,
    quiet: QuietOpt = False, allow_global: AllowGlobalOpt = [],
    data=None,
) -> int:
    """Check checkpoints against a policy (CI gate). Exit 0 pass, 1 policy violations, 2 errors.

    With --data, each checkpoint's model also runs on the data: probe findings, and the contribution
    and conflict rules (and, with --baseline, a fall in a modality's contribution)."""
    from avdiag.report.ci import github_outputs, junit_xml, sarif_json
    from avdiag.report.progress import progress_for
    from avdiag.report.terminal.check import render_check
    from avdiag.workflows.check import Policy
    from avdiag.workflows.check import check as run_check

    inputs = [Path(p) for p in paths if Path(p).exists()] + ([Path(baseline)] if baseline else [])
    out = Outputs(inputs, json_out, report, quiet, files={"--junit": junit, "--sarif": sarif})
    rules = Policy.load(policy).with_overrides(fail_on=fail_on, on_nothing_analysed=on_nothing_analysed)
    result = run_check(paths, rules, baseline=baseline, allow_globals=tuple(allow_global), data=data,
                       ogm_alpha=ogm_alpha, progress=progress_for(quiet or not out.terminal))
    extra = {}
    if junit is not None:
        extra["--junit"] = junit_xml(result)
    if sarif is not None:
        extra["--sarif"] = sarif_json(result)
    out.emit(result.to_dict(), lambda console: render_check(result, console, quiet=quiet), extra=extra)
    _github(github_outputs(result), sys.stdout if out.terminal else sys.stderr)
    return result.exit_code


def _github(outputs, stream) -> None:
    """Annotation lines on ``stream`` and the job summary appended to $GITHUB_STEP_SUMMARY (under GitHub Actions)."""
    if outputs is None:
        return
    stream.write("".join(line + "\n" for line in outputs.annotations))
    stream.flush()
    if outputs.summary_path:
        try:
            with open(outputs.summary_path, "a", encoding="utf-8") as fh:
                fh.write(outputs.summary + "\n")
        except OSError as e:
            raise UsageError(f"$GITHUB_STEP_SUMMARY {outputs.summary_path}: cannot append ({e.strerror})") from e
