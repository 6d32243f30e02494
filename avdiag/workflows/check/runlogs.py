"""`avdiag check RUN.jsonl`: a training run log checked against the run rules of the policy
(:mod:`avdiag.workflows.check.rules.training`), reported like a checkpoint (``kind = "run-log"``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from avdiag.errors import AvdiagError
from avdiag.measure.runlog import is_run_log_path, read_run_log
from avdiag.workflows.check.paths import display_path
from avdiag.workflows.check.results import FileReport, status_of
from avdiag.workflows.check.rules import REGISTRY
from avdiag.workflows.check.rules.files import Unreadable
from avdiag.workflows.check.rules.training import RUN, RunFacts

RUN_LOG_KIND = "run-log"


def split_run_logs(paths: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoint paths, run-log paths): a path named ``*.jsonl`` is a run log."""
    return [p for p in paths if not is_run_log_path(p)], [p for p in paths if is_run_log_path(p)]


def check_run_log(run: Any, path: str) -> FileReport:
    """The report of one run log; ``run`` is the checker's ``_Run`` (policy and violation makers)."""
    start = time.perf_counter()
    shown = display_path(Path(path))
    rules = [r for r in run.policy.enabled() if RUN in REGISTRY[r.id].needs]
    report = FileReport(path=shown, status="pass", kind=RUN_LOG_KIND, rules=[r.id for r in rules])
    try:
        log = read_run_log(path)
    except AvdiagError as e:
        message = str(e).removeprefix(f"{path}: ")
        report.violations.append(run.file_violation(Unreadable.id, shown, "", message))
        report.rules.insert(0, Unreadable.id)
        report.error = message
    else:
        report.inspection = {"format": RUN_LOG_KIND, "n_steps": len(log.steps), "n_epochs": len(log.epochs),
                             "truncated": log.truncated, "text": log.summary_text()}
        facts = RunFacts(shown, None, run=log)
        for rule in rules:
            verdict = REGISTRY[rule.id].evaluate(facts, rule.params)
            report.violations += [run.violation(rule, shown, found) for found in verdict.found]
            report.not_evaluated += [{"rule_id": rule.id, "reason": why} for why in verdict.skipped]
    run._suppress(report, Path(path))
    report.status = status_of(report.violations)
    report.duration_s = time.perf_counter() - start
    return report
