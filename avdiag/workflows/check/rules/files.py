"""Rules about the file itself: it could not be read, was refused, or held nothing to analyse.

They have no evaluation: the runner raises them from the error that opening a checkpoint raised
(:func:`classify`). Their severity is fixed (or follows ``on_nothing_analysed``), they take no
parameters, and they cannot be suppressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from avdiag.errors import (
    AvdiagError,
    LfsPointerError,
    NothingToAnalyseError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    UsageError,
)
from avdiag.findings import ERROR, INFO, OUTCOME_ERROR, OUTCOME_FAIL, OUTCOME_REPORT
from avdiag.workflows.check.rules.base import REGISTRY, CheckRule, Facts, Verdict, register

NOTHING_MODES = ("error", "violation", "pass")  # the policy's on_nothing_analysed


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


class FileRule(CheckRule):
    """The file could not be analysed: always an error (exit 2)."""

    kind = "load"
    severity = ERROR
    suppressible = False
    raised_by: ClassVar[type[BaseException]]

    def check_setting(self, severity: str, given: dict[str, Any], where: str) -> None:
        if severity != ERROR or given:
            raise UsageError(f"{where}: rules.{self.id} is always an error and takes no parameters")

    def message(self, error: BaseException) -> str:
        return one_line(error) or type(error).__name__

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        return Verdict()  # a file that was opened and scanned has nothing to report here

    def outcome(self, location_kind: str, on_nothing_analysed: str) -> str:
        return OUTCOME_ERROR


@register
class UnsafePickle(FileRule):
    id = "unsafe-pickle"
    description = "a pickle names globals outside torch's weights-only allow-list: refused, never loaded"
    raised_by = UnsafeCheckpointError

    def message(self, error: BaseException) -> str:
        # check has no --unsafe: point at the ways it has to admit a global
        return super().message(error).replace(
            "(allow one with --allow-global NAME, or load with --unsafe only if you trust the file)",
            "(admit one with allow_globals in the policy or --allow-global NAME, only if you trust the file)")

    def outcome(self, location_kind: str, on_nothing_analysed: str) -> str:
        # A conclusive finding (the file must not be loaded): exit 1. A refused baseline is an error.
        return OUTCOME_FAIL if location_kind == "file" else OUTCOME_ERROR


@register
class Unreadable(FileRule):
    id = "unreadable"
    description = "missing, empty, truncated or corrupt file, or not a checkpoint format avdiag reads"
    raised_by = UnreadableCheckpointError


@register
class AnalysisError(FileRule):
    id = "analysis-error"
    description = "the checkpoint loaded but could not be analysed"
    raised_by = AvdiagError


class NothingRule(FileRule):
    """Nothing was analysed: an error, a violation or a pass, as ``on_nothing_analysed`` says."""

    kind = "nothing"

    def check_setting(self, severity: str, given: dict[str, Any], where: str) -> None:
        raise UsageError(f"{where}: rules.{self.id} follows on_nothing_analysed (error, violation or pass); "
                         "set that instead")

    def outcome(self, location_kind: str, on_nothing_analysed: str) -> str:
        return {"error": OUTCOME_ERROR, "violation": OUTCOME_FAIL, "pass": OUTCOME_REPORT}[on_nothing_analysed]


@register
class LfsPointer(NothingRule):
    id = "lfs-pointer"
    description = "a Git LFS pointer file instead of the weights (run `git lfs pull`)"
    raised_by = LfsPointerError


@register
class NothingAnalysed(NothingRule):
    id = "nothing-analysed"
    description = ("nothing was analysed: a path that matches no checkpoint, a folder without checkpoints, or a "
                   "checkpoint without tensors")
    raised_by = NothingToAnalyseError


def nothing_severity(on_nothing_analysed: str) -> str:
    """The severity of the nothing-analysed rules under an ``on_nothing_analysed`` mode."""
    return INFO if on_nothing_analysed == "pass" else ERROR


def classify(error: BaseException, path: Path) -> tuple[str, str]:
    """(rule id, message) for an error raised while opening ``path``: the file rule whose error class
    is the closest ancestor of the error's, or analysis-error for an unexpected exception."""
    mro = type(error).__mro__
    matches = [r for r in REGISTRY.values() if isinstance(r, FileRule) and r.raised_by in mro]
    if not matches:
        text = one_line(error) or type(error).__name__
        return AnalysisError.id, f"{path}: internal error while analysing: {type(error).__name__}: {text[:300]}"
    rule = min(matches, key=lambda r: mro.index(r.raised_by))
    return rule.id, rule.message(error)
