"""What a check rule is: one class with its id, default severity, parameter schema, the inputs it
needs, and its evaluation, registered by id with :func:`register`.

The runner gives a rule the :class:`Facts` of one checkpoint (its static scan, and what the rule
needs besides: the probe, the figures on the data, the baseline's scan or figures) and the
parameters the policy set; the rule returns a :class:`Verdict`. A rule never reads a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from avdiag.errors import UsageError
from avdiag.findings import OFF, SEVERITIES, severity_named

# What a rule may need besides the static scan. The runner provides each, or says why it cannot.
PROBE = "probe"  # the scan ran the model on the data (inspect's probe findings)
DATA = "data"  # the checkpoint's contribution and conflict figures on the data
BASELINE = "baseline"  # the baseline checkpoint's static scan
BASELINE_DATA = "baseline-data"  # the baseline checkpoint's figures on the same data


# ---- parameter schema -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a rule: its default (None: unset) and how a policy value is checked."""

    default: Any
    parse: Callable[[Any, str], Any]  # (value, label for messages) -> the value, or UsageError


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def ratio(value: Any, label: str) -> float:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise UsageError(f"{label} must be a ratio between 0 and 1, got {value!r}")
    return float(value)


def count(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{label} must be a whole number >= 0, got {value!r}")
    return value


def cosine(value: Any, label: str) -> float:
    if not _is_number(value) or not -1.0 <= float(value) <= 1.0:
        raise UsageError(f"{label} must be a cosine between -1 and 1, got {value!r}")
    return float(value)


def score_ratio(value: Any, label: str) -> float:
    if not _is_number(value) or not float(value) >= 1.0:
        raise UsageError(f"{label} must be a number >= 1 (a ratio of OGM-GE scores), got {value!r}")
    return float(value)


def value_kind(value: Any, label: str) -> str:
    if value not in ("accuracy", "probability"):
        raise UsageError(f"{label} must be 'accuracy' or 'probability', got {value!r}")
    return value


def table_of(parse: Callable[[Any, str], Any]) -> Callable[[Any, str], dict[str, Any]]:
    """A ``{name = threshold}`` table whose values ``parse`` checks."""

    def parse_table(value: Any, label: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise UsageError(f"{label} must be a table of name = threshold")
        return {str(k): parse(v, f"{label}.{k}") for k, v in value.items()}

    return parse_table


def ratio_or_table(value: Any, label: str) -> float | dict[str, float]:
    """One ratio for every modality, or a ``{name = ratio}`` table."""
    return table_of(ratio)(value, label) if isinstance(value, dict) else ratio(value, label)


# ---- what a rule reads and returns --------------------------------------------------------------


@dataclass
class Facts:
    """What is known about one checkpoint when its rules are evaluated (None: not needed or not known)."""

    path: str  # as reports show it
    scan: Any  # avdiag.workflows.inspect.InspectResult (with the probe when the rule needs it)
    figures: Any = None  # avdiag.workflows.check.figures.DataFigures
    baseline_path: str | None = None
    baseline_scan: Any = None
    baseline_figures: Any = None


@dataclass
class Found:
    """One violation before the policy gives it a severity and an outcome."""

    location: str  # tensor or layer name, "modality:NAME", "head", or "" (the whole file)
    location_kind: str  # file / tensor / layer / modality
    message: str


@dataclass
class Verdict:
    """A rule's answer for one checkpoint."""

    found: list[Found] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why part of the rule could not be checked
    baseline: dict[str, Any] = field(default_factory=dict)  # before/after figures for the report


# ---- the rule -----------------------------------------------------------------------------------


class CheckRule:
    """Base class of every rule. Subclasses set the class attributes and override :meth:`evaluate`."""

    id: ClassVar[str]
    severity: ClassVar[str]  # the default: error / warning / info / off
    description: ClassVar[str]
    kind: ClassVar[str]  # the family, shown in SARIF: load, nothing, finding, ratio, growth, data, data-drop
    params: ClassVar[dict[str, Param]] = {}
    needs: ClassVar[tuple[str, ...]] = ()  # besides the static scan, in the order they are provided
    unmet: ClassVar[str | None] = None  # listed as "not evaluated" when a policy names it but the run lacks needs
    suppressible: ClassVar[bool] = True

    def default_params(self) -> dict[str, Any]:
        return {k: dict(p.default) if isinstance(p.default, dict) else p.default for k, p in self.params.items()}

    def configure(self, value: Any, where: str) -> tuple[str, dict[str, Any]]:
        """(severity, parameters) from a policy's ``rules.<id>`` entry: a severity or a table."""
        if isinstance(value, str):
            severity, given = value, {}
        elif isinstance(value, dict):
            severity = value.get("severity", self.severity)
            given = {k: v for k, v in value.items() if k != "severity"}
        else:
            raise UsageError(f"{where}: rules.{self.id} must be a severity string or a table")
        named = severity_named(severity)
        if named is None:
            raise UsageError(f"{where}: rules.{self.id}: severity must be error, warning, info (or note) or off, "
                             f"got {severity!r}")
        self.check_setting(named, given, where)
        params = self.default_params()
        for key, v in given.items():
            if key not in self.params:
                known = f" (known: {', '.join(self.params)})" if self.params else " (it takes none)"
                raise UsageError(f"{where}: rules.{self.id}: unknown parameter {key!r}{known}")
            params[key] = self.params[key].parse(v, f"{where}: rules.{self.id}.{key}")
        return named, params

    def check_setting(self, severity: str, given: dict[str, Any], where: str) -> None:
        """Refuse settings this rule cannot take (file-level rules override it)."""

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        raise NotImplementedError(f"rule {self.id} has no evaluation")


REGISTRY: dict[str, CheckRule] = {}


def register(cls: type[CheckRule]) -> type[CheckRule]:
    """Class decorator: make ``cls`` a rule of every policy, under its id."""
    if cls.id in REGISTRY:
        raise ValueError(f"check rule {cls.id!r} is registered twice")
    if cls.severity not in SEVERITIES + (OFF,):
        raise ValueError(f"check rule {cls.id!r}: unknown default severity {cls.severity!r}")
    REGISTRY[cls.id] = cls()
    return cls
