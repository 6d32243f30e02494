"""Running the checks: inspect each checkpoint, evaluate the policy's rules, compare with a baseline."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from avdiag import findings as F
from avdiag.check import data as data_rules
from avdiag.check.paths import _display, _expand, _path_keys, _Target
from avdiag.check.policy import Policy
from avdiag.check.results import CheckResult, FileReport, Violation, fingerprint
from avdiag.check.rules import (
    _FINDING,
    _LOAD,
    _NOTHING,
    _PROBE_ONLY,
    _RANK,
    _RATIO,
    _DATA,
    _DATA_DROP,
    _SPEC,
    ANALYSIS_ERROR,
    CONFLICT,
    CONTRIBUTION,
    CONTRIBUTION_DROP,
    DEAD_GROWTH,
    LFS_POINTER,
    NOTHING_ANALYSED,
    OUTCOME_ERROR,
    OUTCOME_FAIL,
    OUTCOME_REPORT,
    UNREADABLE,
    UNSAFE_PICKLE,
    Rule,
)
from avdiag.errors import (
    AvdiagError,
    LfsPointerError,
    NothingToAnalyseError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    UsageError,
)
from avdiag.locate.resolve import ModelError
from avdiag.measure.contribution import OGM_ALPHA


def check_paths(paths: list[str], policy: Policy | None = None, *, baseline: str | None = None,
                allow_globals: tuple[str, ...] | list[str] = (), progress: bool = False,
                inspect_kwargs: dict[str, Any] | None = None, data: Any = None,
                ogm_alpha: float = OGM_ALPHA) -> CheckResult:
    """Check every checkpoint that ``paths`` (files, folders, globs) name against ``policy``.

    ``policy`` defaults to :meth:`Policy.load` in the current directory. ``baseline``: a checkpoint
    (when one is checked) or a folder of same-named checkpoints to compare dead channels (and, with
    data, contributions) with. ``inspect_kwargs`` go to :func:`avdiag.inspect_checkpoint` over the
    policy's ``[inspect]`` table (``unsafe`` is refused). ``data``
    (:class:`avdiag.inspection.ProbeOptions`): run each checkpoint's model on it, for the probe
    findings and the data rules (contribution, conflict; ``ogm_alpha`` for OGM-GE). Problems with
    single files never raise: they become violations. Raises :class:`UsageError` for bad arguments
    (no paths, a missing baseline, data that cannot be opened...).
    """
    from avdiag.report.progress import progress_bar

    start = time.perf_counter()
    policy = policy if policy is not None else Policy.load()
    if not paths:
        raise UsageError("give at least one checkpoint, folder or glob to check")
    kwargs = {**policy.inspect_kwargs(), **(inspect_kwargs or {})}
    if kwargs.pop("unsafe", False):
        raise UsageError("check never loads with full pickle (--unsafe is not available here)")
    if data is not None:
        kwargs["probe"] = data = _open_data(data)
    allow = tuple(dict.fromkeys([*policy.allow_globals, *allow_globals]))
    items = _expand([str(p) for p in paths])
    excluded = [_display(it.path) for kind, it in items if kind == "file" and policy.is_excluded(it.path)]
    items = [(kind, it) for kind, it in items if not (kind == "file" and policy.is_excluded(it.path))]
    targets = [it for kind, it in items if kind == "file"]
    static_kwargs = {k: v for k, v in kwargs.items() if k != "probe"}
    base = _Baseline(baseline, len(targets), allow, static_kwargs) if baseline is not None else None
    run = _Run(policy, kwargs, static_kwargs, allow, base, data, ogm_alpha)

    reports: list[FileReport] = []
    unmatched: list[str] = []
    with progress_bar(len(targets), "checking", enabled=progress and bool(targets)) as advance:
        for kind, item in items:
            if kind == "file":
                reports.append(run.check(item))
                advance(1)
            else:
                pattern, reason = item
                unmatched.append(pattern)
                reports.append(_nothing_report(pattern, f"{pattern}: {reason}", policy, "pattern"))
    if not reports:
        reports.append(_nothing_report(".", f"every path given is excluded by the policy ({len(excluded)} "
                                       "checkpoint(s)): nothing was analysed", policy, "run"))
    return CheckResult(reports, unmatched, policy, excluded, _display(baseline) if baseline else None,
                       time.perf_counter() - start, data=run.data_name)


def _open_data(data: Any) -> Any:
    """``data`` with its dataset opened once for every checkpoint (a bad spec is a usage error)."""
    from avdiag.data import DataOptions, open_dataset

    if not isinstance(data.data, str):
        return data
    return replace(data, data=open_dataset(data.data, split=data.split, options=data.data_options or DataOptions()))


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
        self.figures_cache: dict[Path, Any] = {}

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

    def figures(self, path: Path, data: Any, ogm_alpha: float):
        """The data figures of ``path``, or the exception that computing them raised."""
        key = path.resolve()
        if key not in self.figures_cache:
            try:
                self.figures_cache[key] = data_rules.analyse(path, data, self.allow, ogm_alpha)
            except Exception as e:  # noqa: BLE001 - reported, never raised
                self.figures_cache[key] = e
        return self.figures_cache[key]


class _Run:
    """One `check` run: the policy, the inspect settings, the baseline and the data, applied per file."""

    def __init__(self, policy: Policy, kwargs: dict[str, Any], static_kwargs: dict[str, Any],
                 allow: tuple[str, ...], base: _Baseline | None, data: Any, ogm_alpha: float):
        self.policy, self.kwargs, self.static_kwargs, self.allow = policy, kwargs, static_kwargs, allow
        self.base, self.data, self.ogm_alpha = base, data, ogm_alpha
        self.data_name = getattr(data.data, "name", str(data.data)) if data is not None else None
        rules = [r.id for r in policy.enabled((_LOAD, _NOTHING, _FINDING, _RATIO))
                 if r.id not in _PROBE_ONLY or data is not None]
        if base is not None and policy.rules[DEAD_GROWTH].enabled:
            rules.append(DEAD_GROWTH)
        self.data_rules = policy.enabled((_DATA,))
        drop = policy.rules[CONTRIBUTION_DROP]
        self.drop = drop if drop.enabled and base is not None and data is not None else None
        # a data rule that cannot run is listed (as not evaluated) only when the policy names it
        self.needs: dict[str, str] = {}
        if data is None:
            self.needs = {r.id: "needs data: run check with --data" for r in self.data_rules if r.configured}
            self.data_rules = []
        if drop.enabled and drop.configured and self.drop is None:
            self.needs[drop.id] = "needs --baseline and --data"
        rules += [r.id for r in self.data_rules] + ([self.drop.id] if self.drop else []) + list(self.needs)
        self.rules = rules

    def check(self, target: _Target) -> FileReport:
        start = time.perf_counter()
        policy = self.policy
        shown = _display(target.path)
        report = FileReport(path=shown, status="pass", rules=list(self.rules))
        try:
            result, no_model = self._inspect(target.path)
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            rule_id, message = _classify(e, target.path)
            message = _strip_path(message, target.path, shown)
            report.violations.append(_load_violation(rule_id, shown, "", message, policy))
            report.error = message
        else:
            report.inspection = _inspection_summary(result)
            report.violations.extend(_evaluate(result, policy, shown))
            if self.base is not None:
                _compare_baseline(report, result, target, self.base, policy)
            if no_model is not None:
                report.not_evaluated += [{"rule_id": rid, "reason": no_model} for rid in self.rules
                                         if rid in _PROBE_ONLY or policy.rules[rid].kind in (_DATA, _DATA_DROP)]
            elif self.data_rules or self.drop:
                self._evaluate_data(report, target)
            report.not_evaluated += [{"rule_id": rid, "reason": why} for rid, why in self.needs.items()]
        keys = _path_keys(target.path, policy.root)
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

    def _inspect(self, path: Path):
        """(inspection, None), or (static inspection, why the model could not be run on the data)."""
        from avdiag.inspection import inspect_checkpoint

        try:
            return inspect_checkpoint(path, allow_globals=self.allow, **self.kwargs), None
        except ModelError as e:
            if self.data is None:
                raise
            reason = f"no model to run on the data: {_strip_path(' '.join(str(e).split()), path, _display(path))}"
        return inspect_checkpoint(path, allow_globals=self.allow, **self.static_kwargs), reason

    def _evaluate_data(self, report: FileReport, target: _Target) -> None:
        ids = [r.id for r in self.data_rules] + ([self.drop.id] if self.drop else [])
        missing = [m for m in ("audio", "visual") if m not in getattr(self.data.data, "modalities", ("audio", "visual"))]
        if missing:
            report.not_evaluated += [{"rule_id": rid, "reason": f"the data has no {' or '.join(missing)}: contribution "
                                      "and conflict need both modalities"} for rid in ids]
            return
        try:
            fig = data_rules.analyse(target.path, self.data, self.allow, self.ogm_alpha)
        except ModelError as e:
            reason = _strip_path(" ".join(str(e).split()), target.path, report.path)
            report.not_evaluated += [{"rule_id": rid, "reason": f"no contribution/conflict analysis: {reason}"}
                                     for rid in ids]
            return
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            _, message = _classify(e, target.path)
            report.violations.append(_load_violation(ANALYSIS_ERROR, report.path, "data", "contribution/conflict "
                                                     f"analysis on the data failed: {message}", policy=self.policy,
                                                     location_kind="data"))
            return
        report.data = fig.to_dict()
        checks = {CONTRIBUTION: data_rules.contribution_findings, CONFLICT: data_rules.conflict_findings}
        for rule in self.data_rules:
            found, skipped = checks[rule.id](rule, fig)
            for location, message in found:
                kind = "modality" if location.startswith("modality:") else "layer"
                report.violations.append(_violation(rule, report.path, location, kind, message, self.policy))
            report.not_evaluated += [{"rule_id": rule.id, "reason": why} for why in skipped]
        if self.drop:
            self._compare_contribution(report, target, fig)

    def _compare_contribution(self, report: FileReport, target: _Target, fig) -> None:
        rule = self.drop
        old_path = self.base.counterpart(target)
        if old_path is None:
            report.not_evaluated.append({"rule_id": rule.id, "reason": "no baseline: neither a same-named file nor "
                                         f"the same relative path under {_display(self.base.path)}"})
            return
        old = self.base.figures(old_path, self.data, self.ogm_alpha)
        if isinstance(old, BaseException):
            _, message = _classify(old, old_path)
            report.not_evaluated.append({"rule_id": rule.id, "reason": f"baseline {_display(old_path)} could not be "
                                         f"analysed on the data: {message}"})
            return
        found, skipped, summary = data_rules.drop_findings(rule, fig, old, _display(old_path))
        for location, message in found:
            report.violations.append(_violation(rule, report.path, location, "modality", message, self.policy))
        report.not_evaluated += [{"rule_id": rule.id, "reason": why} for why in skipped]
        report.baseline = {**(report.baseline or {"path": _display(old_path)}), "contribution": summary}


def _strip_path(message: str, path: Path, shown: str) -> str:
    for prefix in (f"{path}: ", f"{shown}: "):
        if message.startswith(prefix):  # the report names the file already
            return message[len(prefix):]
    return message


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
