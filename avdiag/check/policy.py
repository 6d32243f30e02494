"""The check policy: ``avdiag.toml`` / ``[tool.avdiag.check]``, rule settings and suppressions."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from avdiag.check.paths import _path_glob, _path_keys
from avdiag.check.rules import (
    _GROWTH,
    _LOAD,
    _NOTHING,
    _SPEC,
    ERROR,
    FAIL_ON,
    NOTE,
    NOTHING_MODES,
    OFF,
    RULE_IDS,
    SEVERITIES,
    SUPPRESSIBLE,
    LFS_POINTER,
    NOTHING_ANALYSED,
    Rule,
    _copy_params,
    _default_rules,
    _plain,
)
from avdiag.errors import UsageError


_POLICY_KEYS = {"fail_on", "on_nothing_analysed", "rules", "suppress", "exclude", "allow_globals", "hash", "inspect"}
_INSPECT_KEYS = {"dead_z", "abnormal_threshold", "constant_scale", "low_gain", "collapsed_filter", "bn_eps",
                 "assume_activation", "modality"}


@dataclass
class Suppression:
    """Silences matching violations of ``rules`` in files matching ``path`` (they stay in the reports)."""

    path: str
    reason: str
    rules: list[str] = field(default_factory=lambda: ["*"])
    locations: list[str] = field(default_factory=lambda: ["*"])

    def matches(self, rule_id: str, path_keys: list[str], location: str) -> bool:
        if rule_id not in SUPPRESSIBLE:
            return False
        if "*" not in self.rules and rule_id not in self.rules:
            return False
        if not any(_path_glob(key, self.path) for key in path_keys):
            return False
        return any(fnmatch.fnmatchcase(location, pattern) for pattern in self.locations)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rules": list(self.rules), "locations": list(self.locations),
                "reason": self.reason}


@dataclass
class Policy:
    """What `avdiag check` enforces. ``Policy.load()`` finds it; ``Policy()`` is the defaults."""

    rules: dict[str, Rule] = field(default_factory=lambda: _default_rules())
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
        missing = [rid for rid in RULE_IDS if rid not in self.rules]
        for rid in missing:
            self.rules[rid] = _default_rules()[rid]
        for rid in self.rules:
            if rid not in _SPEC:
                raise UsageError(f"policy: unknown rule id {rid!r} (known: {', '.join(RULE_IDS)})")
        _nothing_severity = {"error": ERROR, "violation": ERROR, "pass": NOTE}[self.on_nothing_analysed]
        for rid in (LFS_POINTER, NOTHING_ANALYSED):
            self.rules[rid].severity = _nothing_severity

    @classmethod
    def load(cls, path: str | Path | None = None, cwd: str | Path | None = None) -> "Policy":
        """``path`` (an avdiag.toml or a pyproject.toml), else ``cwd``'s avdiag.toml, else its
        pyproject.toml's ``[tool.avdiag.check]``, else the defaults. ``cwd`` defaults to the current
        directory."""
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise UsageError(f"--policy {path}: no such file")
            data = _read_toml(path)
            if path.name == "pyproject.toml":
                table = data.get("tool", {}).get("avdiag", {}).get("check")
                if table is None:
                    raise UsageError(f"{path}: no [tool.avdiag.check] table")
            else:
                table = _check_table(data, path)
            return cls.from_mapping(table, source=str(path), root=path.resolve().parent)
        folder = Path.cwd() if cwd is None else Path(cwd)
        own = folder / "avdiag.toml"
        if own.is_file():
            return cls.from_mapping(_check_table(_read_toml(own), own), source=str(own), root=folder.resolve())
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            table = _read_toml(pyproject).get("tool", {}).get("avdiag", {}).get("check")
            if table is not None:
                return cls.from_mapping(table, source=str(pyproject), root=folder.resolve())
        return cls(root=folder.resolve())

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str | None = None, root: Path | None = None) -> "Policy":
        """A policy from the keys of a ``[check]`` table (see the module documentation)."""
        where = source or "policy"
        if not isinstance(data, dict):
            raise UsageError(f"{where}: the check policy must be a table")
        unknown = sorted(set(data) - _POLICY_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_POLICY_KEYS))})")
        rules = _default_rules()
        raw_rules = data.get("rules", {})
        if not isinstance(raw_rules, dict):
            raise UsageError(f"{where}: rules must be a table of rule id = severity or {{severity, params}}")
        for rid, value in raw_rules.items():
            rules[rid] = _parse_rule(rid, value, where)
        suppressions = [_parse_suppression(i, s, where) for i, s in enumerate(_list(data, "suppress", where, dict))]
        inspect = data.get("inspect", {})
        if not isinstance(inspect, dict):
            raise UsageError(f"{where}: inspect must be a table")
        bad = sorted(set(inspect) - _INSPECT_KEYS)
        if bad:
            raise UsageError(f"{where}: unknown inspect key(s) {', '.join(bad)} (known: {', '.join(sorted(_INSPECT_KEYS))})")
        hash_file = data.get("hash", False)
        if not isinstance(hash_file, bool):
            raise UsageError(f"{where}: hash must be true or false")
        policy = cls(rules=rules, suppressions=suppressions,
                     on_nothing_analysed=_string(data, "on_nothing_analysed", "error", where),
                     fail_on=_string(data, "fail_on", ERROR, where),
                     exclude=_list(data, "exclude", where, str), allow_globals=_list(data, "allow_globals", where, str),
                     hash=hash_file, inspect=dict(inspect), source=source, root=root)
        policy.inspect_kwargs()  # validate the inspect table now, not at the first file
        return policy

    def with_overrides(self, *, fail_on: str | None = None, on_nothing_analysed: str | None = None) -> "Policy":
        """A copy with command-line overrides applied (None: keep the policy's)."""
        rules = {rid: replace(rule, params=dict(rule.params)) for rid, rule in self.rules.items()}
        return replace(self, rules=rules, fail_on=fail_on or self.fail_on,
                       on_nothing_analysed=on_nothing_analysed or self.on_nothing_analysed)

    def enabled(self, kinds: tuple[str, ...] | None = None) -> list[Rule]:
        return [r for r in self.rules.values() if r.enabled and (kinds is None or r.kind in kinds)]

    def is_excluded(self, path: Path) -> bool:
        keys = _path_keys(path, self.root)
        return any(_path_glob(key, pattern) for pattern in self.exclude for key in keys)

    def inspect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of inspect_checkpoint from the ``[inspect]`` table and ``hash``."""
        from avdiag.measure.thresholds import Thresholds

        t = self.inspect
        names = {"dead_z": "dead_z", "abnormal_threshold": "abnormal", "constant_scale": "constant_scale",
                 "low_gain": "low_gain", "collapsed_filter": "collapsed_filter"}
        values = {}
        for key, attr in names.items():
            if key in t:
                values[attr] = _number(t[key], f"inspect.{key}", self.source)
        out: dict[str, Any] = {"hash_file": self.hash}
        if values:
            out["thresholds"] = Thresholds(**values)
        if "bn_eps" in t:
            out["bn_eps"] = _number(t["bn_eps"], "inspect.bn_eps", self.source)
        if "assume_activation" in t:
            if not isinstance(t["assume_activation"], str):
                raise UsageError(f"{self.source or 'policy'}: inspect.assume_activation must be a string")
            out["assume_activation"] = t["assume_activation"]
        if "modality" in t:
            mod = t["modality"]
            if isinstance(mod, dict):
                mod = [f"{k}={v}" for k, v in mod.items()]
            if not isinstance(mod, list) or not all(isinstance(m, str) and "=" in m for m in mod):
                raise UsageError(f"{self.source or 'policy'}: inspect.modality must be a list of 'NAME=PREFIX'")
            out["modality"] = list(mod)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "fail_on": self.fail_on, "on_nothing_analysed": self.on_nothing_analysed,
                "exclude": list(self.exclude), "allow_globals": list(self.allow_globals), "hash": self.hash,
                "inspect": _plain(self.inspect), "rules": {rid: r.to_dict() for rid, r in self.rules.items()},
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


def _parse_rule(rid: str, value: Any, where: str) -> Rule:
    spec = _SPEC.get(rid)
    if spec is None:
        raise UsageError(f"{where}: unknown rule id {rid!r} (known: {', '.join(RULE_IDS)})")
    if isinstance(value, str):
        severity, params = value, {}
    elif isinstance(value, dict):
        params = {k: v for k, v in value.items() if k != "severity"}
        severity = value.get("severity", spec.severity)
    else:
        raise UsageError(f"{where}: rules.{rid} must be a severity string or a table")
    if severity not in SEVERITIES + (OFF,):
        raise UsageError(f"{where}: rules.{rid}: severity must be error, warning, note or off, got {severity!r}")
    if spec.kind == _LOAD:
        if severity != ERROR or params:
            raise UsageError(f"{where}: rules.{rid} is always an error and takes no parameters")
    elif spec.kind == _NOTHING:
        raise UsageError(f"{where}: rules.{rid} follows on_nothing_analysed (error, violation or pass); "
                         "set that instead")
    merged = _copy_params(spec.params)
    for key, v in params.items():
        if key not in spec.params and not (spec.kind == _GROWTH and key == "max_ratio_growth"):
            known = sorted(spec.params) + (["max_ratio_growth"] if spec.kind == _GROWTH else [])
            raise UsageError(f"{where}: rules.{rid}: unknown parameter {key!r}"
                             + (f" (known: {', '.join(known)})" if known else " (it takes none)"))
        merged[key] = _validate_param(rid, spec.kind, key, v, where)
    return Rule(rid, severity, spec.description, merged, configured=True)


def _validate_param(rid: str, kind: str, key: str, value: Any, where: str) -> Any:
    label = f"{where}: rules.{rid}.{key}"

    def ratio(v: Any, what: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise UsageError(f"{what} must be a ratio between 0 and 1, got {v!r}")
        return float(v)

    def count(v: Any, what: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(f"{what} must be a whole number >= 0, got {v!r}")
        return v

    def cosine(v: Any, what: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= float(v) <= 1.0:
            raise UsageError(f"{what} must be a cosine between -1 and 1, got {v!r}")
        return float(v)

    if key in ("max_ratio", "max_ratio_growth", "min_share", "max_conflict_rate", "max_drop", "max_accuracy_drop"):
        return ratio(value, label)
    if key in ("min_cos_mean", "min_head_cos"):
        return cosine(value, label)
    if key == "value":
        if value not in ("accuracy", "probability"):
            raise UsageError(f"{label} must be 'accuracy' or 'probability', got {value!r}")
        return value
    if key == "max_rho":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 1.0:
            raise UsageError(f"{label} must be a number >= 1 (a ratio of OGM-GE scores), got {value!r}")
        return float(value)
    if key == "min_unimodal_accuracy":
        if isinstance(value, dict):
            return {str(k): ratio(v, f"{label}.{k}") for k, v in value.items()}
        return ratio(value, label)
    if key == "max_growth":
        return count(value, label)
    if key in ("modalities", "layers"):
        if not isinstance(value, dict):
            raise UsageError(f"{label} must be a table of name = threshold")
        check = count if kind == _GROWTH else ratio
        return {str(k): check(v, f"{label}.{k}") for k, v in value.items()}
    return value


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
        if rid not in _SPEC:
            raise UsageError(f"{label}: unknown rule id {rid!r}")
        if rid not in SUPPRESSIBLE:
            raise UsageError(f"{label}: {rid} cannot be suppressed (exclude the path, or set on_nothing_analysed)")
    return Suppression(path=path, reason=reason.strip(), rules=list(rules), locations=list(locations))


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


def _number(value: Any, key: str, source: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{source or 'policy'}: {key} must be a number, got {value!r}")
    return float(value)
