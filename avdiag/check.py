"""`avdiag check`: a CI gate over many checkpoints, driven by a policy.

The section below is written to be pasted into the README as it is.

## `avdiag check`: a policy gate for CI

```bash
avdiag check models/                                   # every checkpoint under models/ (recursively)
avdiag check 'runs/*/best.pt' extra.safetensors        # globs (quoted: avdiag expands them), files, folders
avdiag check models/ --sarif avdiag.sarif --junit avdiag.xml --json report.json
avdiag check model.pt --baseline old/model.pt          # fail when dead channels grew versus OLD
avdiag check models/ --baseline old_models/            # OLD: a folder holding same-named checkpoints
avdiag check models/ --policy ci/avdiag.toml
```

Options: `--policy PATH`, `--baseline OLD`, `--json PATH` (`-`: stdout), `--junit PATH`,
`--sarif PATH`, `--fail-on error|warning` and `--on-nothing-analysed error|violation|pass` (override
the policy), `--allow-global pkg.Class` (repeatable), `-q/--quiet` (the summary line only), `--debug`.
A pre-commit hook (`avdiag-check`, in `.pre-commit-hooks.yaml`) and a GitHub Actions workflow
(`examples/ci/github-actions.yml`: CPU torch, SARIF upload to code scanning) are included.

Every checkpoint is analysed in one process (the static scan of `inspect`, without the file's
SHA-256 unless the policy says `hash = true`), with a progress bar on stderr. A file that cannot be
analysed never stops the run: it becomes a violation of its rule in that file's report.

Folders are searched recursively (hidden folders skipped) for files named `*.pt *.pth *.bin *.ckpt
*.safetensors *.pt2 *.pth.tar` and for other files whose first bytes are a torch zip, a legacy torch
pickle, a safetensors header or the pre-1.0 torch tar format (which avdiag refuses: `unreadable`); a folder holding a `*.index.json` is one sharded checkpoint. A file
named on the command line is always checked, whatever its name. Each file is checked once.

### Exit codes

| code | meaning |
|---|---|
| 0 | every checkpoint passed the policy |
| 1 | policy violations: a violation at or above `fail_on` (including `unsafe-pickle`), or a path that analysed nothing with `on_nothing_analysed = "violation"` |
| 2 | errors: a checkpoint that could not be analysed (`unreadable`, `analysis-error`, a baseline that could not be read), a path that analysed nothing (`lfs-pointer`, `nothing-analysed`, with the default `on_nothing_analysed = "error"`), or a usage error (bad option or policy: one line on stderr) |

2 wins over 1. An unsafe pickle is a **finding**, not an error: avdiag read the pickle's opcodes,
found globals outside torch's weights-only allow-list and refused to load it, so the file's verdict
is conclusive (it must not be loaded). This follows the convention of model-file scanners, which
exit 1 when they find a dangerous file and 2 when they could not scan one. A truncated or corrupt
file, by contrast, could not be analysed at all: exit 2.

A path that matches no checkpoint, a folder without checkpoints, a Git LFS pointer (the weights
were never fetched) or a checkpoint without tensors is never a silent pass: `on_nothing_analysed`
decides whether it is an error (default, exit 2), a violation (exit 1) or a pass (still reported,
as a note).

### Rules

Rule ids are stable (never renamed or reused). Content rules share their ids with the findings of
`avdiag inspect`. Severities: `error`, `warning`, `note`, or `off` (not evaluated). A violation
fails the run when its severity is at least `fail_on` (default `error`) and it is not suppressed.

| id | default | what fails | parameters [defaults] |
|---|---|---|---|
| `unsafe-pickle` | error (fixed) | a pickle names globals outside torch's weights-only allow-list (a torch checkpoint, a plain pickle, a shard of a sharded folder); the file is refused, nothing in it runs | - |
| `unreadable` | error (fixed, exit 2) | missing, empty, truncated or corrupt file, or not a format avdiag reads | - |
| `analysis-error` | error (fixed, exit 2) | the file loaded but could not be analysed (e.g. a policy `modality` prefix that matches no tensor of it) | - |
| `lfs-pointer` | `on_nothing_analysed` | a Git LFS pointer file instead of the weights (`git lfs pull`) | - |
| `nothing-analysed` | `on_nothing_analysed` | a path or glob that matches no checkpoint, a folder without checkpoints, a checkpoint without tensors, or a run in which every path was excluded | - |
| `nonfinite-tensor` | error | a tensor holds NaN or Inf (one violation per tensor) | - |
| `dead-channels` | error | the dead BatchNorm channel ratio of a modality, or of a layer matched by a glob, is above its threshold | `max_ratio` [0.05] per modality; `modalities` {name = ratio} overrides it for one modality; `layers` {glob = ratio} adds per-layer checks (first matching glob wins) |
| `abnormal-affine` | warning | the ratio of abnormal affine pairs (\\|gamma\\| and \\|beta\\| < threshold) is above its threshold | as `dead-channels`; `max_ratio` [0.0: any abnormal pair] |
| `collapsed-filters` | warning | conv filters feeding a BN are ~0 (one violation per layer) | - |
| `no-batchnorm` | warning | no BatchNorm layer: the dead-channel scan had nothing to look at | - |
| `dead-channels-growth` | error | with `--baseline`: a modality has more dead channels than in OLD | `max_growth` [0] channels; `modalities` {name = channels}; `max_ratio_growth` [unset]: also fail when the dead ratio grew by more |
| `constant-channels`, `low-gain-channels`, `possibly-dead-channels`, `prediction-mismatch` | off | the informational findings of `inspect` (any occurrence) | - |
| `measured-dead-channels`, `layer-not-probed` | warning | findings of a probe on data (only when the checkpoint was run on data) | - |
| `modality-contribution` | off | reserved: a modality's contribution to the prediction below a threshold (needs data) | any; **not implemented yet**: when enabled, every checkpoint reports it as *not evaluated* |
| `modality-conflict` | off | reserved: gradient conflict between modalities above a threshold (needs data) | any; **not implemented yet**: reported as *not evaluated* |

Violations are located: `location` is a tensor name (`nonfinite-tensor`), a BN layer name, or
`modality:NAME`; empty for file-level rules.

### Policy

`avdiag.toml` (table `[check]`) in the current folder, else `[tool.avdiag.check]` in
`pyproject.toml` there, else the defaults above; `--policy PATH` names either kind of file.
Unknown keys, rule ids or parameters are errors, not ignored.

```toml
[tool.avdiag.check]            # in avdiag.toml: [check]
fail_on = "error"              # "error" or "warning": the lowest severity that fails the run
on_nothing_analysed = "error"  # "error" | "violation" | "pass"
exclude = ["models/archive/*"] # globs of paths not to check (relative to the policy file's folder)
allow_globals = []             # pickle globals admitted as inert placeholders (as --allow-global)
hash = false                   # compute each file's SHA-256 (reported in the JSON and SARIF)

[tool.avdiag.check.inspect]    # the static scan's settings, as inspect's options
dead_z = -3.0
abnormal_threshold = 1e-10
modality = ["audio=enc_a", "visual=enc_v"]
assume_activation = "relu"

[tool.avdiag.check.rules]
nonfinite-tensor = "error"                                   # a string sets the severity
dead-channels = { max_ratio = 0.05, modalities = { audio = 0.10 }, layers = { "visual_net.layer4.*" = 0.25 } }
abnormal-affine = { severity = "error", max_ratio = 0.01 }
dead-channels-growth = { max_growth = 2 }
possibly-dead-channels = "note"
modality-contribution = { severity = "error", min_share = 0.2 }   # reserved: reported "not evaluated"

[[tool.avdiag.check.suppress]]
path = "models/legacy/*.pt"         # glob on the path relative to the policy file's folder ('*' crosses '/')
rules = ["dead-channels"]           # default: every suppressible rule
locations = ["modality:audio"]      # optional globs on the location
reason = "audio encoder initialised from ImageNet; tracked in #12"   # required
```

`[inspect]` keys: `dead_z`, `abnormal_threshold`, `constant_scale`, `low_gain`, `collapsed_filter`,
`bn_eps`, `assume_activation`, `modality`. Suppressed violations stay in every report (SARIF
`suppressions`, JSON `suppressed`), but never fail the run. `unsafe-pickle`, `unreadable`,
`analysis-error`, `lfs-pointer` and `nothing-analysed` cannot be suppressed: skip a path with
`exclude`, or set `on_nothing_analysed`. `check` never loads with full pickle.

`--baseline OLD`: OLD is one checkpoint (when one checkpoint is checked) or a folder; for each
checked file, `OLD/<path relative to the folder given>` and then `OLD/<file name>` are tried. A file
without a counterpart reports `dead-channels-growth` as *not evaluated*; a baseline that cannot be
read is an error (exit 2), reported under `unreadable` / `unsafe-pickle` with location `baseline`.

### Reports

All at once: the terminal (one line per checkpoint, its violations, a summary line), `--json PATH`
(`-`: stdout, nothing else there; schema 1.0, `tool.command = "check"`), `--junit PATH` (one
`testsuite` per checkpoint, one `testcase` per enabled rule: `failure` for violations that fail the
run, `error` for files that could not be analysed, `skipped` for rules not evaluated), `--sarif PATH`
(SARIF 2.1.0, validated against the OASIS schema in the tests: rules with their configured level,
one result per violation with the checkpoint's path, the tensor / layer / modality as a logical
location, and `partialFingerprints["avdiag/v1"]` = a hash of rule id, path and location, stable
across runs). Under GitHub Actions (`GITHUB_ACTIONS=true`) each unsuppressed violation is also an
annotation line (`::error file=...,title=...::message`) on stdout (on stderr with `--json -`), and a
Markdown summary is appended to `$GITHUB_STEP_SUMMARY`.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import math
import os
import re
import tarfile
import time
import tomllib
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from avdiag import __version__
from avdiag import findings as F
from avdiag.errors import (
    AvdiagError,
    NothingToAnalyseError,
    LfsPointerError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    UsageError,
)
from avdiag.load import detect

__all__ = ["CheckResult", "FileReport", "Policy", "Rule", "Suppression", "Violation", "RULE_IDS",
           "check_paths", "expand_paths", "looks_like_checkpoint"]

SCHEMA_VERSION = "1.0"

ERROR, WARNING, NOTE, OFF = "error", "warning", "note", "off"
SEVERITIES = (ERROR, WARNING, NOTE)
_RANK = {NOTE: 0, WARNING: 1, ERROR: 2}
NOTHING_MODES = ("error", "violation", "pass")
FAIL_ON = (ERROR, WARNING)

# Outcomes of a violation: what it does to the run.
OUTCOME_ERROR = "error"  # the file could not be analysed: exit 2
OUTCOME_FAIL = "fail"  # a policy violation: exit 1
OUTCOME_REPORT = "report"  # shown, does not fail the run (below fail_on, a note, or suppressed)

# Rule ids of their own (the content rules reuse avdiag.findings ids).
UNSAFE_PICKLE = "unsafe-pickle"
UNREADABLE = "unreadable"
ANALYSIS_ERROR = "analysis-error"
LFS_POINTER = "lfs-pointer"
NOTHING_ANALYSED = "nothing-analysed"
DEAD_GROWTH = "dead-channels-growth"
CONTRIBUTION = "modality-contribution"
CONFLICT = "modality-conflict"

# Kinds of rule: how they are evaluated and what a policy may change.
_LOAD, _NOTHING, _RATIO, _FINDING, _GROWTH, _RESERVED = "load", "nothing", "ratio", "finding", "growth", "reserved"


@dataclass(frozen=True)
class _Spec:
    id: str
    kind: str
    severity: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)


_SPECS: tuple[_Spec, ...] = (
    _Spec(UNSAFE_PICKLE, _LOAD, ERROR, "a pickle names globals outside torch's weights-only allow-list: refused, "
                                        "never loaded"),
    _Spec(UNREADABLE, _LOAD, ERROR, "missing, empty, truncated or corrupt file, or not a checkpoint format avdiag "
                                    "reads"),
    _Spec(ANALYSIS_ERROR, _LOAD, ERROR, "the checkpoint loaded but could not be analysed"),
    _Spec(LFS_POINTER, _NOTHING, ERROR, "a Git LFS pointer file instead of the weights (run `git lfs pull`)"),
    _Spec(NOTHING_ANALYSED, _NOTHING, ERROR, "nothing was analysed: a path that matches no checkpoint, a folder "
                                             "without checkpoints, or a checkpoint without tensors"),
    _Spec(F.NONFINITE, _FINDING, ERROR, "a tensor holds NaN or Inf values"),
    _Spec(F.DEAD, _RATIO, ERROR, "dead BatchNorm channel ratio above its threshold (per modality or layer glob)",
          {"max_ratio": 0.05, "modalities": {}, "layers": {}}),
    _Spec(F.ABNORMAL, _RATIO, WARNING, "ratio of abnormal BN affine pairs (|gamma| and |beta| tiny) above its "
                                       "threshold", {"max_ratio": 0.0, "modalities": {}, "layers": {}}),
    _Spec(F.COLLAPSED, _FINDING, WARNING, F.RULES[F.COLLAPSED][1]),
    _Spec(F.NO_BATCHNORM, _FINDING, WARNING, F.RULES[F.NO_BATCHNORM][1]),
    _Spec(DEAD_GROWTH, _GROWTH, ERROR, "dead BatchNorm channels grew versus the baseline (per modality)",
          {"max_growth": 0, "modalities": {}}),
    _Spec(F.CONSTANT, _FINDING, OFF, F.RULES[F.CONSTANT][1]),
    _Spec(F.LOW_GAIN, _FINDING, OFF, F.RULES[F.LOW_GAIN][1]),
    _Spec(F.POSSIBLY_DEAD, _FINDING, OFF, F.RULES[F.POSSIBLY_DEAD][1]),
    _Spec(F.PREDICTION_MISMATCH, _FINDING, OFF, F.RULES[F.PREDICTION_MISMATCH][1]),
    _Spec(F.MEASURED_DEAD, _FINDING, WARNING, F.RULES[F.MEASURED_DEAD][1]),
    _Spec(F.NOT_PROBED, _FINDING, WARNING, F.RULES[F.NOT_PROBED][1]),
    _Spec(CONTRIBUTION, _RESERVED, OFF, "reserved: a modality's contribution to the prediction below a threshold "
                                        "(not implemented yet: reported as not evaluated)"),
    _Spec(CONFLICT, _RESERVED, OFF, "reserved: gradient conflict between modalities above a threshold "
                                    "(not implemented yet: reported as not evaluated)"),
)
_SPEC = {s.id: s for s in _SPECS}
RULE_IDS: tuple[str, ...] = tuple(s.id for s in _SPECS)
# Rules that a suppression may silence: what a checkpoint holds, not whether it could be read.
SUPPRESSIBLE = frozenset(s.id for s in _SPECS if s.kind in (_RATIO, _FINDING, _GROWTH, _RESERVED))

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".pth.tar")
_GLOB_CHARS = re.compile(r"[*?\[]")
_POLICY_KEYS = {"fail_on", "on_nothing_analysed", "rules", "suppress", "exclude", "allow_globals", "hash", "inspect"}
_INSPECT_KEYS = {"dead_z", "abnormal_threshold", "constant_scale", "low_gain", "collapsed_filter", "bn_eps",
                 "assume_activation", "modality"}
_PROBE_ONLY = frozenset({F.MEASURED_DEAD, F.NOT_PROBED, F.PREDICTION_MISMATCH})  # need inspect's probe (data)
_NOT_IMPLEMENTED = f"not implemented in avdiag {__version__} (reserved rule id)"


# ---- policy -------------------------------------------------------------------------------------


@dataclass
class Rule:
    """One rule as the policy configures it. ``severity`` is error / warning / note / off."""

    id: str
    severity: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.severity != OFF

    @property
    def kind(self) -> str:
        return _SPEC[self.id].kind

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "description": self.description,
                "params": _plain(self.params)}


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


def _default_rules() -> dict[str, Rule]:
    return {s.id: Rule(s.id, s.severity, s.description, _copy_params(s.params)) for s in _SPECS}


def _copy_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}


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
    if spec.kind == _RESERVED:
        merged.update(params)  # reserved: any parameter is accepted and kept
    else:
        for key, v in params.items():
            if key not in spec.params and not (spec.kind == _GROWTH and key == "max_ratio_growth"):
                known = sorted(spec.params) + (["max_ratio_growth"] if spec.kind == _GROWTH else [])
                raise UsageError(f"{where}: rules.{rid}: unknown parameter {key!r}"
                                 + (f" (known: {', '.join(known)})" if known else " (it takes none)"))
            merged[key] = _validate_param(rid, spec.kind, key, v, where)
    return Rule(rid, severity, spec.description, merged)


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

    if key in ("max_ratio", "max_ratio_growth"):
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


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ---- path expansion -----------------------------------------------------------------------------


@dataclass
class _Target:
    path: Path
    root: Path | None  # the folder given on the command line that led here (None: a file or a glob)


def looks_like_checkpoint(path: Path) -> bool:
    """A checkpoint's name (``CHECKPOINT_SUFFIXES``) or first bytes (torch zip, legacy torch, safetensors)."""
    if path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if head.startswith(detect.LEGACY_MAGIC):
        return True
    if head.startswith(detect.ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
        return any(n == "data.pkl" or n.endswith(("/data.pkl", "/constants.pkl", "/models/model.json"))
                   for n in names)
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        return header_len <= size - 8
    return _is_torch_tar(path)


def _is_torch_tar(path: Path) -> bool:
    """The pre-1.0 ``torch.save`` tar format (members sys_info, storages, tensors, pickle)."""
    try:
        with open(path, "rb") as f:
            f.seek(257)
            if f.read(5) != b"ustar":
                return False
        with tarfile.open(path, mode="r:") as tar:
            return {"sys_info", "pickle"} <= set(tar.getnames())
    except (OSError, tarfile.TarError):
        return False


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        here = Path(dirpath)
        if any(name.endswith(".index.json") for name in filenames):
            out.append(here)  # a sharded checkpoint: the folder is one checkpoint; its files are shards
            continue
        out.extend(p for p in (here / name for name in sorted(filenames)) if p.is_file() and looks_like_checkpoint(p))
    return out


def _expand(paths: list[str]) -> list[tuple[str, Any]]:
    """In argument order: ("file", _Target) or ("unmatched", (pattern, reason))."""
    items: list[tuple[str, Any]] = []
    seen: set[Path] = set()

    def add(p: Path, root: Path | None) -> bool:
        key = p.resolve()
        if key in seen:
            return False
        seen.add(key)
        items.append(("file", _Target(p, root)))
        return True

    for raw in paths:
        text = str(raw)
        p = Path(text)
        if p.is_dir():
            found = _walk(p)
            if not found:
                items.append(("unmatched", (text, "a folder without any checkpoint")))
            for f in found:
                add(f, p)
        elif p.exists():
            add(p, None)
        elif _GLOB_CHARS.search(text):
            matches = sorted(globlib.glob(text, recursive=True))
            found = []
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    found.extend((f, mp) for f in _walk(mp))
                elif mp.name.endswith(".index.json") or looks_like_checkpoint(mp):
                    found.append((mp, None))
            if not found:
                reason = (f"matches {len(matches)} path(s), none of them a checkpoint" if matches
                          else "matches no file")
                items.append(("unmatched", (text, reason)))
            for f, root in found:
                add(f, root)
        else:
            items.append(("unmatched", (text, "no such file or directory")))
    return items


def expand_paths(paths: list[str]) -> tuple[list[Path], list[str]]:
    """The checkpoints that ``paths`` (files, folders, globs) name, and the patterns that matched none.

    Folders are searched recursively (hidden folders skipped) for checkpoint-looking files (by name or
    first bytes); a folder holding a ``*.index.json`` is one sharded checkpoint. A file named
    explicitly is always returned. Each checkpoint appears once, in argument order.
    """
    items = _expand(paths)
    return ([it.path for kind, it in items if kind == "file"], [it[0] for kind, it in items if kind == "unmatched"])


def _display(path: Path | str) -> str:
    """The path as reports show it: relative to the cwd when inside it, posix separators."""
    p = Path(path)
    try:
        absolute = p.resolve() if p.is_absolute() else None
        if absolute is not None:
            p = absolute.relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        pass
    text = os.path.normpath(str(p)).replace(os.sep, "/")
    return text


def _path_keys(path: Path, root: Path | None) -> list[str]:
    keys = [_display(path)]
    try:
        absolute = path.resolve()
        keys.append(absolute.as_posix())
        keys.append(absolute.relative_to((root or Path.cwd()).resolve()).as_posix())
    except (ValueError, OSError):
        pass
    return keys


def _path_glob(key: str, pattern: str) -> bool:
    pattern = pattern.replace(os.sep, "/")
    if pattern.endswith("/"):
        pattern += "*"
    if pattern.startswith("./"):
        pattern = pattern[2:]
    return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, pattern.replace("**/", ""))


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Violation:
    """One rule broken by one checkpoint at one location."""

    rule_id: str
    severity: str  # error / warning / note
    path: str  # the checkpoint (or the pattern that matched nothing), as reports show it
    location: str  # tensor or layer name, "modality:NAME", "baseline", or "" (the whole file)
    message: str
    fingerprint: str  # stable across runs: hash of rule id, path and location
    outcome: str = OUTCOME_FAIL  # error (exit 2) / fail (exit 1) / report (does not fail the run)
    location_kind: str = "file"  # file / tensor / layer / modality / baseline
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
    inspection: dict[str, Any] | None = None  # a summary of the inspection; None when not analysed
    kind: str = "file"
    rules: list[str] = field(default_factory=list)  # the rules this entry was checked against
    not_evaluated: list[dict[str, str]] = field(default_factory=list)  # [{rule_id, reason}]
    baseline: dict[str, Any] | None = None
    duration_s: float = 0.0

    @property
    def analysed(self) -> bool:
        return self.inspection is not None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "status": self.status, "error": self.error,
                "duration_s": round(self.duration_s, 4), "rules": list(self.rules),
                "violations": [v.to_dict() for v in self.violations],
                "not_evaluated": [dict(n) for n in self.not_evaluated],
                "inspection": self.inspection, "baseline": self.baseline}


@dataclass
class CheckResult:
    """What `avdiag check` found. ``exit_code``: 0 pass, 1 violations, 2 errors."""

    files: list[FileReport]
    unmatched: list[str]
    policy: Policy = field(default_factory=Policy)
    excluded: list[str] = field(default_factory=list)
    baseline: str | None = None
    duration_s: float = 0.0

    @property
    def exit_code(self) -> int:
        statuses = {f.status for f in self.files}
        return 2 if "error" in statuses else 1 if "fail" in statuses else 0

    @property
    def violations(self) -> list[Violation]:
        return [v for f in self.files for v in f.violations]

    @property
    def checkpoints(self) -> list[FileReport]:
        return [f for f in self.files if f.kind == "file"]

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

    def summary_line(self) -> str:
        c = self.counts()
        verdict = {0: "pass", 1: "FAIL (policy violations)", 2: "ERROR"}[self.exit_code]
        parts = [f"{c['n_checkpoints']} checkpoint(s): {c['n_pass']} passed, {c['n_fail']} failed, "
                 f"{c['n_error']} error(s)"]
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "avdiag", "version": __version__, "command": "check"},
            "policy": self.policy.to_dict(),
            "baseline": self.baseline,
            "summary": {**self.counts(), "exit_code": self.exit_code, "unmatched": list(self.unmatched),
                        "excluded": list(self.excluded), "duration_s": round(self.duration_s, 4),
                        "text": self.summary_line()},
            "files": [f.to_dict() for f in self.files],
        }


def fingerprint(rule_id: str, path: str, location: str) -> str:
    """Stable across runs and machines: the same rule, path (as reported) and location give the same value."""
    return hashlib.sha256(f"avdiag/v1\0{rule_id}\0{path}\0{location}".encode()).hexdigest()[:32]


# ---- running the checks -------------------------------------------------------------------------


def check_paths(paths: list[str], policy: Policy | None = None, *, baseline: str | None = None,
                allow_globals: tuple[str, ...] | list[str] = (), progress: bool = False,
                inspect_kwargs: dict[str, Any] | None = None) -> CheckResult:
    """Check every checkpoint that ``paths`` (files, folders, globs) name against ``policy``.

    ``policy`` defaults to :meth:`Policy.load` in the current directory. ``baseline``: a checkpoint
    (when one is checked) or a folder of same-named checkpoints to compare dead channels with.
    ``inspect_kwargs`` go to :func:`avdiag.inspect_checkpoint` over the policy's ``[inspect]`` table
    (``unsafe`` is refused). Problems with single files never raise: they become violations. Raises
    :class:`UsageError` for bad arguments (no paths, a missing baseline, ...).
    """
    from avdiag.report.progress import progress_bar

    start = time.perf_counter()
    policy = policy if policy is not None else Policy.load()
    if not paths:
        raise UsageError("give at least one checkpoint, folder or glob to check")
    kwargs = {**policy.inspect_kwargs(), **(inspect_kwargs or {})}
    if kwargs.pop("unsafe", False):
        raise UsageError("check never loads with full pickle (--unsafe is not available here)")
    allow = tuple(dict.fromkeys([*policy.allow_globals, *allow_globals]))
    items = _expand([str(p) for p in paths])
    excluded = [_display(it.path) for kind, it in items if kind == "file" and policy.is_excluded(it.path)]
    items = [(kind, it) for kind, it in items if not (kind == "file" and policy.is_excluded(it.path))]
    targets = [it for kind, it in items if kind == "file"]
    base = _Baseline(baseline, len(targets), allow, kwargs) if baseline is not None else None

    rules = [r.id for r in policy.enabled((_LOAD, _NOTHING, _FINDING, _RATIO))
             if r.id not in _PROBE_ONLY or kwargs.get("probe") is not None]
    if base is not None and policy.rules[DEAD_GROWTH].enabled:
        rules.append(DEAD_GROWTH)
    rules += [r.id for r in policy.enabled((_RESERVED,))]

    reports: list[FileReport] = []
    unmatched: list[str] = []
    with progress_bar(len(targets), "checking", enabled=progress and bool(targets)) as advance:
        for kind, item in items:
            if kind == "file":
                reports.append(_check_one(item, policy, kwargs, allow, base, rules))
                advance(1)
            else:
                pattern, reason = item
                unmatched.append(pattern)
                reports.append(_nothing_report(pattern, f"{pattern}: {reason}", policy, "pattern"))
    if not reports:
        reports.append(_nothing_report(".", f"every path given is excluded by the policy ({len(excluded)} "
                                       "checkpoint(s)): nothing was analysed", policy, "run"))
    return CheckResult(reports, unmatched, policy, excluded, _display(baseline) if baseline else None,
                       time.perf_counter() - start)


class _Baseline:
    """Where each checked file's baseline is, and the baseline inspections (each read once)."""

    def __init__(self, baseline: str, n_targets: int, allow: tuple[str, ...], kwargs: dict[str, Any]):
        self.path = Path(baseline)
        if not self.path.exists():
            raise UsageError(f"--baseline {baseline}: no such file or folder")
        self.single = self.path.is_file() or any(self.path.glob("*.index.json"))
        if self.single and n_targets > 1:
            raise UsageError(f"--baseline {baseline} is one checkpoint, but {n_targets} are checked: give a folder "
                             "holding same-named checkpoints")
        self.allow, self.kwargs = allow, kwargs
        self.cache: dict[Path, Any] = {}

    def counterpart(self, target: _Target) -> Path | None:
        if self.single:
            return self.path
        candidates = []
        if target.root is not None:
            try:
                candidates.append(self.path / target.path.relative_to(target.root))
            except ValueError:
                pass
        candidates.append(self.path / target.path.name)
        return next((c for c in candidates if c.exists()), None)

    def inspect(self, path: Path):
        """The inspection of ``path``, or the AvdiagError / Exception that reading it raised."""
        from avdiag.inspection import inspect_checkpoint

        key = path.resolve()
        if key not in self.cache:
            try:
                self.cache[key] = inspect_checkpoint(path, allow_globals=self.allow, **self.kwargs)
            except Exception as e:  # noqa: BLE001 - reported as a violation, never raised
                self.cache[key] = e
        return self.cache[key]


def _check_one(target: _Target, policy: Policy, kwargs: dict[str, Any], allow: tuple[str, ...],
               base: _Baseline | None, rules: list[str]) -> FileReport:
    from avdiag.inspection import inspect_checkpoint

    start = time.perf_counter()
    shown = _display(target.path)
    keys = _path_keys(target.path, policy.root)
    report = FileReport(path=shown, status="pass", rules=list(rules))
    try:
        result = inspect_checkpoint(target.path, allow_globals=allow, **kwargs)
    except Exception as e:  # noqa: BLE001 - one bad file never stops the run
        rule_id, message = _classify(e, target.path)
        for prefix in (f"{target.path}: ", f"{shown}: "):
            if message.startswith(prefix):  # the report names the file already
                message = message[len(prefix):]
                break
        report.violations.append(_load_violation(rule_id, shown, "", message, policy))
        report.error = message
    else:
        report.inspection = _inspection_summary(result)
        report.violations.extend(_evaluate(result, policy, shown))
        if base is not None:
            _compare_baseline(report, result, target, base, policy)
        for rule in policy.enabled((_RESERVED,)):
            report.not_evaluated.append({"rule_id": rule.id, "reason": _NOT_IMPLEMENTED})
    for v in report.violations:
        if v.outcome == OUTCOME_ERROR or v.suppressed is not None:
            continue
        for s in policy.suppressions:
            if s.matches(v.rule_id, keys, v.location):
                v.suppressed, v.outcome = s.reason, OUTCOME_REPORT
                break
    report.status = _status(report.violations)
    report.duration_s = time.perf_counter() - start
    return report


def _status(violations: list[Violation]) -> str:
    outcomes = {v.outcome for v in violations}
    return "error" if OUTCOME_ERROR in outcomes else "fail" if OUTCOME_FAIL in outcomes else "pass"


def _classify(e: BaseException, path: Path) -> tuple[str, str]:
    """(rule id, message) for an exception raised while reading ``path``."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, UnsafeCheckpointError):
        # check has no --unsafe: point at the ways it has to admit a global
        return UNSAFE_PICKLE, text.replace("(allow one with --allow-global NAME, or load with --unsafe only if you "
                                           "trust the file)", "(admit one with allow_globals in the policy or "
                                           "--allow-global NAME, only if you trust the file)")
    if isinstance(e, LfsPointerError):
        return LFS_POINTER, text
    if isinstance(e, UnreadableCheckpointError):
        return UNREADABLE, text
    if isinstance(e, NothingToAnalyseError):
        return NOTHING_ANALYSED, text
    if isinstance(e, AvdiagError):
        return ANALYSIS_ERROR, text
    return ANALYSIS_ERROR, f"{path}: internal error while analysing: {type(e).__name__}: {text[:300]}"


def _load_violation(rule_id: str, path: str, location: str, message: str, policy: Policy,
                    location_kind: str = "file") -> Violation:
    spec = _SPEC[rule_id]
    if spec.kind == _NOTHING:
        outcome = {"error": OUTCOME_ERROR, "violation": OUTCOME_FAIL, "pass": OUTCOME_REPORT}[policy.on_nothing_analysed]
    elif rule_id == UNSAFE_PICKLE and location_kind == "file":
        outcome = OUTCOME_FAIL  # a conclusive finding: exit 1 (see the module documentation)
    else:
        outcome = OUTCOME_ERROR
    return Violation(rule_id, policy.rules[rule_id].severity, path, location, message,
                     fingerprint(rule_id, path, location), outcome, location_kind)


def _nothing_report(path: str, message: str, policy: Policy, kind: str) -> FileReport:
    v = _load_violation(NOTHING_ANALYSED, path, "", message, policy)
    return FileReport(path=path, status=_status([v]), violations=[v], error=message, kind=kind,
                      rules=[NOTHING_ANALYSED])


def _violation(rule: Rule, path: str, location: str, location_kind: str, message: str, policy: Policy) -> Violation:
    outcome = OUTCOME_FAIL if _RANK[rule.severity] >= _RANK[policy.fail_on] else OUTCOME_REPORT
    return Violation(rule.id, rule.severity, path, location, message, fingerprint(rule.id, path, location),
                     outcome, location_kind)


def _evaluate(result, policy: Policy, path: str) -> list[Violation]:
    out: list[Violation] = []
    for rule in policy.enabled((_FINDING, _RATIO)):
        if rule.kind == _FINDING:
            for f in result.findings:
                if f.id == rule.id:
                    kind = "tensor" if f.id == F.NONFINITE else "file" if not f.location else "layer"
                    out.append(_violation(rule, path, f.location, kind, f.message, policy))
        else:
            out.extend(_ratio_violations(rule, result, policy, path))
    return out


def _ratio_violations(rule: Rule, result, policy: Policy, path: str) -> list[Violation]:
    dead = rule.id == F.DEAD
    what = "dead" if dead else "with an abnormal affine pair"
    out = []
    default = rule.params.get("max_ratio", 0.0)
    per_modality = rule.params.get("modalities", {})
    for name, m in result.modalities.items():
        if not m.n_bn_channels:
            continue
        n = m.n_dead if dead else m.n_abnormal
        ratio = n / m.n_bn_channels
        limit = per_modality.get(name, default)
        if ratio > limit:
            worst = f"; worst layer {m.worst_layer} (z = {m.worst_z:.3g})" if dead and m.worst_layer else ""
            out.append(_violation(rule, path, f"modality:{name}", "modality",
                                  f"{name}: {n}/{m.n_bn_channels} BatchNorm channels {what} ({_pct(ratio)}) > "
                                  f"{_pct(limit)} allowed{worst}", policy))
    globs = rule.params.get("layers", {})
    if globs:
        for v in result.layers:
            pattern = next((g for g in globs if fnmatch.fnmatchcase(v.layer.name, g)), None)
            if pattern is None or not v.layer.channels:
                continue
            channels = v.dead if dead else v.abnormal
            ratio = len(channels) / v.layer.channels
            if ratio > globs[pattern]:
                out.append(_violation(rule, path, v.layer.name, "layer",
                                      f"{v.layer.name}: {len(channels)}/{v.layer.channels} channels {what} "
                                      f"({_pct(ratio)}) > {_pct(globs[pattern])} allowed for layers "
                                      f"'{pattern}' {_preview(channels)}", policy))
    return out


def _compare_baseline(report: FileReport, result, target: _Target, base: _Baseline, policy: Policy) -> None:
    rule = policy.rules[DEAD_GROWTH]
    if not rule.enabled:
        return
    old_path = base.counterpart(target)
    if old_path is None:
        report.not_evaluated.append({"rule_id": DEAD_GROWTH,
                                     "reason": f"no baseline: neither a same-named file nor the same relative "
                                               f"path under {_display(base.path)}"})
        return
    old = base.inspect(old_path)
    if isinstance(old, BaseException):
        rule_id, message = _classify(old, old_path)
        rule_id = rule_id if rule_id in (UNSAFE_PICKLE, UNREADABLE, LFS_POINTER) else UNREADABLE
        report.violations.append(_load_violation(rule_id, report.path, "baseline",
                                                 f"baseline {_display(old_path)}: {message}", policy, "baseline"))
        report.violations[-1].outcome = OUTCOME_ERROR  # the comparison asked for could not be made
        return
    per_modality = rule.params.get("modalities", {})
    max_ratio_growth = rule.params.get("max_ratio_growth")
    old_layers = {v.layer.name: v for v in old.layers}
    summary = {}
    for name, m in result.modalities.items():
        before = old.modalities.get(name)
        if before is None:
            summary[name] = {"n_dead_before": None, "n_dead_after": m.n_dead, "growth": None}
            continue
        growth = m.n_dead - before.n_dead
        ratio_growth = m.dead_ratio - before.dead_ratio
        summary[name] = {"n_dead_before": before.n_dead, "n_dead_after": m.n_dead, "growth": growth,
                         "dead_ratio_before": before.dead_ratio, "dead_ratio_after": m.dead_ratio}
        limit = per_modality.get(name, rule.params.get("max_growth", 0))
        too_many = growth > limit
        too_much = max_ratio_growth is not None and ratio_growth > max_ratio_growth
        if not (too_many or too_much):
            continue
        died = []
        for v in result.layers:
            if v.layer.modality != name:
                continue
            was = old_layers.get(v.layer.name)
            new = sorted(set(v.dead) - set(was.dead)) if was is not None and was.layer.channels == v.layer.channels \
                else list(v.dead)
            if new:
                died.append(f"{v.layer.name} (+{len(new)})")
        limits = f"max_growth {limit}" + (f", max_ratio_growth {_pct(max_ratio_growth)}"
                                          if max_ratio_growth is not None else "")
        where = ("; new dead channels in " + ", ".join(died[:5]) + (", ..." if len(died) > 5 else "")) if died else ""
        report.violations.append(_violation(
            rule, report.path, f"modality:{name}", "modality",
            f"{name}: dead BatchNorm channels {before.n_dead} -> {m.n_dead} ({growth:+d}; "
            f"{_pct(before.dead_ratio)} -> {_pct(m.dead_ratio)}) versus baseline {_display(old_path)}, "
            f"beyond {limits}{where}", policy))
    report.baseline = {"path": _display(old_path), "modalities": summary}


def _inspection_summary(result) -> dict[str, Any]:
    ck = result.checkpoint
    return {
        "format": ck.format, "sha256": ck.sha256, "size_bytes": ck.size_bytes, "n_tensors": ck.n_tensors,
        "layout": result.layout.name, "n_bn_layers": len(result.layers), "n_bn_channels": result.n_channels,
        "n_dead": result.n_dead, "n_findings": len(result.findings),
        "nonfinite_tensors": len(result.nonfinite_tensors),
        "modalities": {name: {"n_bn_channels": m.n_bn_channels, "n_dead": m.n_dead, "dead_ratio": m.dead_ratio,
                              "n_abnormal": m.n_abnormal} for name, m in result.modalities.items()},
        "text": result.summary_line(),
    }


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.3g}%"


def _preview(channels: list[int], n: int = 8) -> str:
    head = ", ".join(map(str, channels[:n]))
    return f"[{head}{', ...' if len(channels) > n else ''}]"
