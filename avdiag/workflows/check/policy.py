"""The check policy: ``avdiag.toml`` / ``[tool.avdiag.check]``, rule settings and suppressions."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from avdiag.errors import UsageError
from avdiag.findings import ERROR, OFF, WARNING
from avdiag.workflows.check.paths import path_glob, path_keys
from avdiag.workflows.check.rules import REGISTRY
from avdiag.workflows.check.rules.files import NOTHING_MODES, LfsPointer, NothingAnalysed, nothing_severity

FAIL_ON = (ERROR, WARNING)
_POLICY_KEYS = {"fail_on", "on_nothing_analysed", "rules", "suppress", "exclude", "allow_globals", "hash", "inspect"}
# [inspect] key -> Thresholds field
_THRESHOLD_KEYS = {"dead_z": "dead_z", "abnormal_threshold": "abnormal", "constant_scale": "constant_scale",
                   "low_gain": "low_gain", "collapsed_filter": "collapsed_filter"}
_INSPECT_KEYS = {*_THRESHOLD_KEYS, "bn_eps", "assume_activation", "modality"}


@dataclass
class Rule:
    """One rule as the policy configures it. ``severity`` is error / warning / info / off."""

    id: str
    severity: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    configured: bool = False  # named in the policy file (not just a default)

    @property
    def enabled(self) -> bool:
        return self.severity != OFF

    @property
    def kind(self) -> str:
        return REGISTRY[self.id].kind

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "kind": self.kind, "description": self.description,
                "params": _copy(self.params)}


def default_rules() -> dict[str, Rule]:
    """Every registered rule at its default severity and parameters."""
    return {rid: Rule(rid, r.severity, r.description, r.default_params()) for rid, r in REGISTRY.items()}


@dataclass
class Suppression:
    """Silences matching violations of ``rules`` in files matching ``path`` (they stay in the reports)."""

    path: str
    reason: str
    rules: list[str] = field(default_factory=lambda: ["*"])
    locations: list[str] = field(default_factory=lambda: ["*"])

    def matches(self, rule_id: str, keys: list[str], location: str) -> bool:
        rule = REGISTRY.get(rule_id)
        if rule is None or not rule.suppressible:
            return False
        if "*" not in self.rules and rule_id not in self.rules:
            return False
        if not any(path_glob(key, self.path) for key in keys):
            return False
        return any(fnmatch.fnmatchcase(location, pattern) for pattern in self.locations)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rules": list(self.rules), "locations": list(self.locations),
                "reason": self.reason}


@dataclass
class Policy:
    """What `avdiag check` enforces. ``Policy.load()`` finds it; ``Policy()`` is the defaults."""

    rules: dict[str, Rule] = field(default_factory=default_rules)
    suppressions: list[Suppression] = field(default_factory=list)
    on_nothing_analysed: str = "error"
    fail_on: str = ERROR
    exclude: list[str] = field(default_factory=list)
    allow_globals: list[str] = field(default_factory=list)
    hash: bool = False
    inspect: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file it came from; None for the defaults
    root: Path | None = None  # relative globs (suppress, exclude) are relative to this; None: the cwd

    def __post_init__(self) -> None:
        if self.fail_on not in FAIL_ON:
            raise UsageError(f"policy: fail_on must be one of {', '.join(FAIL_ON)}, got {self.fail_on!r}")
        if self.on_nothing_analysed not in NOTHING_MODES:
            raise UsageError(f"policy: on_nothing_analysed must be one of {', '.join(NOTHING_MODES)}, "
                             f"got {self.on_nothing_analysed!r}")
        unknown = [rid for rid in self.rules if rid not in REGISTRY]
        if unknown:
            raise UsageError(f"policy: unknown rule id {unknown[0]!r} (known: {', '.join(REGISTRY)})")
        defaults = default_rules()
        self.rules = {rid: self.rules.get(rid, defaults[rid]) for rid in REGISTRY}  # every rule, in registry order
        for rid in (LfsPointer.id, NothingAnalysed.id):
            self.rules[rid].severity = nothing_severity(self.on_nothing_analysed)

    @classmethod
    def load(cls, path: str | Path | None = None, cwd: str | Path | None = None) -> "Policy":
        """``path`` (an avdiag.toml or a pyproject.toml), else ``cwd``'s avdiag.toml, else its
        pyproject.toml's ``[tool.avdiag.check]``, else the defaults. ``cwd`` defaults to the current
        directory."""
        if path is not None:
            return cls._load_file(Path(path))
        folder = Path.cwd() if cwd is None else Path(cwd)
        own = folder / "avdiag.toml"
        if own.is_file():
            return cls.from_mapping(_check_table(_read_toml(own), own), source=str(own), root=folder.resolve())
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            table = _pyproject_table(_read_toml(pyproject))
            if table is not None:
                return cls.from_mapping(table, source=str(pyproject), root=folder.resolve())
        return cls(root=folder.resolve())

    @classmethod
    def _load_file(cls, path: Path) -> "Policy":
        if not path.is_file():
            raise UsageError(f"--policy {path}: no such file")
        data = _read_toml(path)
        if path.name == "pyproject.toml":
            table = _pyproject_table(data)
            if table is None:
                raise UsageError(f"{path}: no [tool.avdiag.check] table")
        else:
            table = _check_table(data, path)
        return cls.from_mapping(table, source=str(path), root=path.resolve().parent)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str | None = None, root: Path | None = None) -> "Policy":
        """A policy from the keys of a ``[check]`` table (see the package documentation)."""
        where = source or "policy"
        if not isinstance(data, dict):
            raise UsageError(f"{where}: the check policy must be a table")
        unknown = sorted(set(data) - _POLICY_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_POLICY_KEYS))})")
        hash_file = data.get("hash", False)
        if not isinstance(hash_file, bool):
            raise UsageError(f"{where}: hash must be true or false")
        policy = cls(rules=_parse_rules(data.get("rules", {}), where),
                     suppressions=[_parse_suppression(i, s, where)
                                   for i, s in enumerate(_list(data, "suppress", where, dict))],
                     on_nothing_analysed=_string(data, "on_nothing_analysed", "error", where),
                     fail_on=_string(data, "fail_on", ERROR, where),
                     exclude=_list(data, "exclude", where, str), allow_globals=_list(data, "allow_globals", where, str),
                     hash=hash_file, inspect=_inspect_table(data.get("inspect", {}), where), source=source, root=root)
        policy.inspect_options()  # validate the inspect table now, not at the first file
        return policy

    def with_overrides(self, *, fail_on: str | None = None, on_nothing_analysed: str | None = None) -> "Policy":
        """A copy with command-line overrides applied (None: keep the policy's)."""
        rules = {rid: replace(rule, params=_copy(rule.params)) for rid, rule in self.rules.items()}
        return replace(self, rules=rules, fail_on=fail_on or self.fail_on,
                       on_nothing_analysed=on_nothing_analysed or self.on_nothing_analysed)

    def enabled(self) -> list[Rule]:
        """The rules not set to ``off``, in registry order."""
        return [r for r in self.rules.values() if r.enabled]

    def is_excluded(self, path: Path) -> bool:
        keys = path_keys(path, self.root)
        return any(path_glob(key, pattern) for pattern in self.exclude for key in keys)

    def inspect_options(self) -> dict[str, Any]:
        """The static scan's settings from the ``[inspect]`` table and ``hash``: ``hash_file``, and when
        set ``thresholds`` (:class:`avdiag.measure.thresholds.Thresholds`), ``bn_eps``,
        ``assume_activation``, ``modality`` (a list of 'NAME=PREFIX')."""
        from avdiag.measure.thresholds import Thresholds

        t, where = self.inspect, self.source or "policy"
        out: dict[str, Any] = {"hash_file": self.hash}
        values = {attr: _number(t[key], f"inspect.{key}", where) for key, attr in _THRESHOLD_KEYS.items() if key in t}
        if values:
            out["thresholds"] = Thresholds(**values)
        if "bn_eps" in t:
            out["bn_eps"] = _number(t["bn_eps"], "inspect.bn_eps", where)
        if "assume_activation" in t:
            if not isinstance(t["assume_activation"], str):
                raise UsageError(f"{where}: inspect.assume_activation must be a string")
            out["assume_activation"] = t["assume_activation"]
        if "modality" in t:
            out["modality"] = _modality_list(t["modality"], where)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "fail_on": self.fail_on, "on_nothing_analysed": self.on_nothing_analysed,
                "exclude": list(self.exclude), "allow_globals": list(self.allow_globals), "hash": self.hash,
                "inspect": _copy(self.inspect), "rules": {rid: r.to_dict() for rid, r in self.rules.items()},
                "suppressions": [s.to_dict() for s in self.suppressions]}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from e
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from e


def _check_table(data: dict[str, Any], path: Path) -> dict[str, Any]:
    table = data.get("check")
    if not isinstance(table, dict):
        raise UsageError(f"{path}: no [check] table (the policy goes under [check], as [tool.avdiag.check] "
                         "in pyproject.toml)")
    return table


def _pyproject_table(data: dict[str, Any]) -> dict[str, Any] | None:
    return data.get("tool", {}).get("avdiag", {}).get("check")


def _parse_rules(raw: Any, where: str) -> dict[str, Rule]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: rules must be a table of rule id = severity or {{severity, params}}")
    rules = default_rules()
    for rid, value in raw.items():
        unit = REGISTRY.get(rid)
        if unit is None:
            raise UsageError(f"{where}: unknown rule id {rid!r} (known: {', '.join(REGISTRY)})")
        severity, params = unit.configure(value, where)
        rules[rid] = Rule(rid, severity, unit.description, params, configured=True)
    return rules


def _parse_suppression(i: int, s: dict[str, Any], where: str) -> Suppression:
    label = f"{where}: suppress[{i}]"
    unknown = sorted(set(s) - {"path", "rules", "locations", "reason"})
    if unknown:
        raise UsageError(f"{label}: unknown key(s) {', '.join(unknown)} (known: path, rules, locations, reason)")
    path, reason = s.get("path"), s.get("reason")
    if not isinstance(path, str) or not path:
        raise UsageError(f"{label}: path (a glob) is required")
    if not isinstance(reason, str) or not reason.strip():
        raise UsageError(f"{label}: reason is required (it is shown wherever the violation is reported)")
    rules = s.get("rules", ["*"])
    locations = s.get("locations", ["*"])
    for name, value in (("rules", rules), ("locations", locations)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value) or not value:
            raise UsageError(f"{label}: {name} must be a non-empty list of strings")
    for rid in rules:
        if rid == "*":
            continue
        if rid not in REGISTRY:
            raise UsageError(f"{label}: unknown rule id {rid!r}")
        if not REGISTRY[rid].suppressible:
            raise UsageError(f"{label}: {rid} cannot be suppressed (exclude the path, or set on_nothing_analysed)")
    return Suppression(path=path, reason=reason.strip(), rules=list(rules), locations=list(locations))


def _inspect_table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: inspect must be a table")
    bad = sorted(set(value) - _INSPECT_KEYS)
    if bad:
        known = ", ".join(sorted(_INSPECT_KEYS))
        raise UsageError(f"{where}: unknown inspect key(s) {', '.join(bad)} (known: {known})")
    return dict(value)


def _modality_list(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(m, str) and "=" in m for m in value):
        raise UsageError(f"{where}: inspect.modality must be a list of 'NAME=PREFIX'")
    return list(value)


def _list(data: dict[str, Any], key: str, where: str, item_type: type) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, item_type) for x in value):
        kind = "tables" if item_type is dict else "strings"
        raise UsageError(f"{where}: {key} must be a list of {kind}")
    return list(value)


def _string(data: dict[str, Any], key: str, default: str, where: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise UsageError(f"{where}: {key} must be a string")
    return value


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _copy(value: Any) -> Any:
    """A deep copy of nested dicts and lists (parameters, the inspect table)."""
    if isinstance(value, dict):
        return {str(k): _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
