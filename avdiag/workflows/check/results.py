"""What `avdiag check` found: violations, per-file reports and the run's verdict."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from avdiag.findings import OUTCOME_ERROR, OUTCOME_FAIL, OUTCOME_REPORT, SEVERITIES
from avdiag.results import CheckpointRef, envelope
from avdiag.workflows.check.policy import Policy

VIOLATION_COLUMNS = ("path", "status", "rule_id", "severity", "location", "location_kind", "message", "outcome",
                     "suppressed", "suppression_reason", "fingerprint")


@dataclass
class Violation:
    """One rule broken by one checkpoint at one location."""

    rule_id: str
    severity: str  # error / warning / info
    path: str  # the checkpoint (or the pattern that matched nothing), as reports show it
    location: str  # tensor or layer name, "modality:NAME", "baseline", "data", "head", or "" (the whole file)
    message: str
    fingerprint: str  # stable across runs: hash of rule id, path and location
    outcome: str = OUTCOME_FAIL  # error (exit 2) / fail (exit 1) / report (does not fail the run)
    location_kind: str = "file"  # file / tensor / layer / modality / baseline / data
    suppressed: str | None = None  # the suppression's reason

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "severity": self.severity, "path": self.path, "location": self.location,
                "location_kind": self.location_kind, "message": self.message, "fingerprint": self.fingerprint,
                "outcome": self.outcome, "suppressed": self.suppressed is not None,
                "suppression_reason": self.suppressed}


@dataclass
class FileReport:
    """The verdict for one checkpoint (``kind="file"``), for a path that matched nothing
    (``"pattern"``), or for a run in which everything was excluded (``"run"``)."""

    path: str
    status: str  # pass / fail / error
    violations: list[Violation] = field(default_factory=list)
    error: str | None = None  # why the file could not be analysed (or was refused)
    inspection: dict[str, Any] | None = None  # a summary of the static scan; None when not analysed
    kind: str = "file"
    rules: list[str] = field(default_factory=list)  # the rules this entry was checked against
    not_evaluated: list[dict[str, str]] = field(default_factory=list)  # [{rule_id, reason}]
    baseline: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # the figures of the data rules (contribution, conflict)
    duration_s: float = 0.0

    @property
    def analysed(self) -> bool:
        return self.inspection is not None

    def ref(self) -> CheckpointRef:
        scan = self.inspection or {}
        return CheckpointRef(self.path, scan.get("format"), scan.get("sha256"))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "status": self.status, "error": self.error,
                "duration_s": round(self.duration_s, 4), "rules": list(self.rules),
                "violations": [v.to_dict() for v in self.violations],
                "not_evaluated": [dict(n) for n in self.not_evaluated],
                "inspection": self.inspection, "baseline": self.baseline, "data": self.data}


@dataclass
class CheckResult:
    """What `avdiag check` found. ``exit_code``: 0 pass, 1 violations, 2 errors."""

    files: list[FileReport]
    unmatched: list[str]
    policy: Policy = field(default_factory=Policy)
    excluded: list[str] = field(default_factory=list)
    baseline: str | None = None
    duration_s: float = 0.0
    data: str | None = None  # the data the checkpoints ran on (None: a static check)

    @property
    def exit_code(self) -> int:
        statuses = {f.status for f in self.files}
        return 2 if "error" in statuses else 1 if "fail" in statuses else 0

    @property
    def violations(self) -> list[Violation]:
        return [v for f in self.files for v in f.violations]

    @property
    def checkpoints(self) -> list[FileReport]:
        """The entries that are checkpoints or training run logs (not patterns that matched nothing)."""
        return [f for f in self.files if f.kind in ("file", "run-log")]

    def counts(self) -> dict[str, Any]:
        files = self.checkpoints
        active = [v for v in self.violations if v.suppressed is None]
        return {"n_checkpoints": len(files), "n_analysed": sum(f.analysed for f in files),
                "n_pass": sum(f.status == "pass" for f in files), "n_fail": sum(f.status == "fail" for f in files),
                "n_error": sum(f.status == "error" for f in files),
                "n_violations": len(active),
                "by_severity": {s: sum(v.severity == s for v in active) for s in SEVERITIES},
                "n_failing": sum(v.outcome != OUTCOME_REPORT for v in active),
                "n_suppressed": sum(v.suppressed is not None for v in self.violations),
                "n_unmatched": len(self.unmatched), "n_excluded": len(self.excluded),
                "n_not_evaluated": sum(len(f.not_evaluated) for f in self.files)}

    def _analysed_noun(self) -> str:
        """"3 checkpoint(s)", "1 run log(s)", or both joined by "and"."""
        logs = sum(f.kind == "run-log" for f in self.checkpoints)
        files = len(self.checkpoints) - logs
        return " and ".join([f"{files} checkpoint(s)"] * bool(files) + [f"{logs} run log(s)"] * bool(logs))

    def summary_line(self) -> str:
        c = self.counts()
        verdict = {0: "pass", 1: "FAIL (policy violations)", 2: "ERROR"}[self.exit_code]
        if not c["n_checkpoints"]:
            found = (f"{c['n_unmatched']} path(s) matched no checkpoint" if c["n_unmatched"]
                     else "every checkpoint was excluded by the policy")
            return f"check {verdict}: nothing was analysed; {found} (exit {self.exit_code})"
        parts = [f"{self._analysed_noun()}: {c['n_pass']} passed, {c['n_fail']} failed, {c['n_error']} error(s)"]
        sev = ", ".join(f"{n} {s}" for s, n in c["by_severity"].items() if n)
        parts.append(f"{c['n_violations']} violation(s)" + (f" ({sev})" if sev else ""))
        if c["n_suppressed"]:
            parts.append(f"{c['n_suppressed']} suppressed")
        if c["n_unmatched"]:
            parts.append(f"{c['n_unmatched']} path(s) matched no checkpoint")
        if c["n_excluded"]:
            parts.append(f"{c['n_excluded']} excluded")
        if c["n_not_evaluated"]:
            parts.append(f"{c['n_not_evaluated']} rule check(s) not evaluated")
        return f"check {verdict}: " + "; ".join(parts) + f" (exit {self.exit_code})"

    def summary(self) -> dict[str, Any]:
        return {**self.counts(), "exit_code": self.exit_code, "unmatched": list(self.unmatched),
                "excluded": list(self.excluded), "duration_s": round(self.duration_s, 4), "text": self.summary_line()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: the result contract's keys, then the policy, baseline, data and files."""
        return envelope("check", [f.ref() for f in self.checkpoints], self.summary(), {
            "policy": self.policy.to_dict(), "baseline": self.baseline, "data": self.data,
            "files": [f.to_dict() for f in self.files]})

    def to_frame(self):
        """One row per violation (pandas DataFrame), with its file's status."""
        import pandas as pd

        rows = [{"path": f.path, "status": f.status, **v.to_dict()} for f in self.files for v in f.violations]
        return pd.DataFrame(rows, columns=list(VIOLATION_COLUMNS))


def fingerprint(rule_id: str, path: str, location: str) -> str:
    """Stable across runs and machines: the same rule, path (as reported) and location give the same value."""
    return hashlib.sha256(f"avdiag/v1\0{rule_id}\0{path}\0{location}".encode()).hexdigest()[:32]


def status_of(violations: list[Violation]) -> str:
    """A file's status from its violations' outcomes: error wins over fail, fail over pass."""
    outcomes = {v.outcome for v in violations}
    return "error" if OUTCOME_ERROR in outcomes else "fail" if OUTCOME_FAIL in outcomes else "pass"
