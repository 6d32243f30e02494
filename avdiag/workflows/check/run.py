"""Running the checks: open each checkpoint once, scan it, give each rule what it needs, apply the policy.

Each checkpoint is one :class:`~avdiag.workflows.subject.Subject`: the static scan, the probe and the
analysis on the data all use it (the file is read and its model resolved once). The data is one
:class:`~avdiag.workflows.datasource.DataSource` with ``cache=True``: its batches are decoded on the
first pass and reused for every other checkpoint and the baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from avdiag.errors import ModelError, UsageError
from avdiag.findings import OUTCOME_ERROR, OUTCOME_FAIL, OUTCOME_REPORT, SEVERITY_RANK
from avdiag.progress import ProgressFactory, no_progress
from avdiag.workflows.check.figures import measure_on_data
from avdiag.workflows.check.paths import Target, display_path, expand, path_keys
from avdiag.workflows.check.policy import Policy, Rule
from avdiag.workflows.check.results import CheckResult, FileReport, Violation, fingerprint, status_of
from avdiag.workflows.check.rules import REGISTRY
from avdiag.workflows.check.rules.base import BASELINE, BASELINE_DATA, DATA, PROBE, Facts, Found
from avdiag.workflows.check.rules.files import (
    AnalysisError,
    LfsPointer,
    NothingAnalysed,
    Unreadable,
    UnsafePickle,
    classify,
    one_line,
)
from avdiag.workflows.check.rules.training import RUN
from avdiag.workflows.check.runlogs import check_run_log, split_run_logs
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.subject import LoadOptions, Subject

_OPTION_KEYS = {"thresholds", "probe_thresholds", "hash_file", "bn_eps", "assume_activation", "modality", "unsafe"}


def check(paths: list[str], policy: Policy | None = None, *, baseline: str | None = None,
          allow_globals: tuple[str, ...] | list[str] = (), data: DataSource | None = None, ogm_alpha: float = 0.8,
          inspect_options: dict[str, Any] | None = None, progress: ProgressFactory = no_progress) -> CheckResult:
    """Check every checkpoint that ``paths`` (files, folders, globs) name against ``policy``.

    ``policy`` defaults to :meth:`Policy.load` in the current directory. ``baseline``: a checkpoint
    (when one is checked) or a folder of same-named checkpoints to compare dead channels (and, with
    data, contributions) with. ``inspect_options`` override the policy's ``[inspect]`` table:
    ``thresholds``, ``probe_thresholds``, ``hash_file``, ``bn_eps``, ``assume_activation``, ``modality``
    (``unsafe`` is refused). ``data``: run each checkpoint's model on it, for the probe findings and the
    data rules (contribution, conflict; ``ogm_alpha`` for OGM-GE); it is decoded once for every
    checkpoint. A path ending in ``.jsonl`` is a training run log of :mod:`avdiag.monitor`, checked
    against the run rules (:mod:`avdiag.workflows.check.runlogs`). Problems with single files never
    raise: they become violations. Raises
    :class:`UsageError` for bad arguments (no paths, a missing baseline...) and
    :class:`avdiag.errors.DataError` for data that cannot be opened.
    """
    start = time.perf_counter()
    policy = policy if policy is not None else Policy.load()
    if not paths:
        raise UsageError("give at least one checkpoint, folder or glob to check")
    settings = _ScanSettings.of(policy, allow_globals, inspect_options or {})
    data = _decoded_once(data)
    checkpoints, run_logs = split_run_logs([str(p) for p in paths])
    items = expand(checkpoints)
    excluded = [display_path(it.path) for kind, it in items if kind == "file" and policy.is_excluded(it.path)]
    items = [(kind, it) for kind, it in items if not (kind == "file" and policy.is_excluded(it.path))]
    n_targets = sum(kind == "file" for kind, _ in items)
    base = _Baseline(baseline, n_targets, settings) if baseline is not None else None
    run = _Run(policy, settings, base, data, ogm_alpha)
    reports: list[FileReport] = []
    unmatched: list[str] = []
    with (progress(n_targets, "checking") if n_targets else no_progress(0, "")) as advance:
        for kind, item in items:
            if kind == "file":
                reports.append(run.check(item))
                advance(1)
            else:
                pattern, reason = item
                unmatched.append(pattern)
                reports.append(run.nothing_report(pattern, f"{pattern}: {reason}", "pattern"))
    reports += [check_run_log(run, p) for p in run_logs]
    if not reports:
        reports.append(run.nothing_report(".", f"every path given is excluded by the policy ({len(excluded)} "
                                          "checkpoint(s)): nothing was analysed", "run"))
    return CheckResult(reports, unmatched, policy, excluded, display_path(baseline) if baseline else None,
                       time.perf_counter() - start, data=data.name if data is not None else None)


def _decoded_once(data: DataSource | None) -> DataSource | None:
    """``data`` caching its decoded batches, its dataset opened now (a bad spec fails before any file)."""
    if data is None:
        return None
    if not isinstance(data, DataSource):
        raise UsageError(f"data must be an avdiag.DataSource, got {type(data).__name__}")
    data = data if data.cache else replace(data, cache=True)
    data.dataset()
    return data


@dataclass
class _ScanSettings:
    """How each checkpoint is opened and scanned: the policy's ``[inspect]`` and ``hash``, then the caller's."""

    load: LoadOptions
    thresholds: Any  # avdiag.measure.thresholds.Thresholds
    probe_thresholds: Any  # avdiag.measure.probe.ProbeThresholds or None (the defaults)
    hash_file: bool

    @classmethod
    def of(cls, policy: Policy, allow_globals: tuple[str, ...] | list[str], options: dict[str, Any]) -> "_ScanSettings":
        from avdiag.measure.thresholds import Thresholds

        unknown = sorted(set(options) - _OPTION_KEYS)
        if unknown:
            raise UsageError(f"check: unknown inspect option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(_OPTION_KEYS - {'unsafe'}))})")
        if options.get("unsafe"):
            raise UsageError("check never loads with full pickle (--unsafe is not available here)")
        merged = {**policy.inspect_options(), **options}
        allow = tuple(dict.fromkeys([*policy.allow_globals, *allow_globals]))
        load = LoadOptions(allow_globals=allow, modality=merged.get("modality"), bn_eps=merged.get("bn_eps"),
                           assume_activation=merged.get("assume_activation"))
        return cls(load, merged.get("thresholds") or Thresholds(), merged.get("probe_thresholds"),
                   bool(merged.get("hash_file", False)))


class _Baseline:
    """Where each checked file's baseline is; each baseline is opened, scanned and run on the data once."""

    def __init__(self, baseline: str, n_targets: int, settings: _ScanSettings):
        self.path = Path(baseline)
        if not self.path.exists():
            raise UsageError(f"--baseline {baseline}: no such file or folder")
        self.single = self.path.is_file() or any(self.path.glob("*.index.json"))
        if self.single and n_targets > 1:
            raise UsageError(f"--baseline {baseline} is one checkpoint, but {n_targets} are checked: give a folder "
                             "holding same-named checkpoints")
        self.settings = settings
        self._subjects: dict[Path, Any] = {}  # open while one target is checked (see release)
        self._scans: dict[Path, Any] = {}  # a scan, or the exception that opening or scanning raised
        self._figures: dict[Path, Any] = {}

    def counterpart(self, target: Target) -> Path | None:
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

    def scan(self, path: Path):
        """The static scan of ``path`` (raises what opening or scanning it raised, every time)."""
        from avdiag.workflows.inspect import scan

        return self._cached(self._scans, path, lambda: scan(self._subject(path), self.settings.thresholds,
                                                            hash_file=self.settings.hash_file))

    def figures(self, path: Path, data: DataSource, ogm_alpha: float):
        """The data figures of ``path`` (raises what computing them raised, every time)."""
        return self._cached(self._figures, path, lambda: measure_on_data(self._subject(path), data, ogm_alpha))

    def release(self) -> None:
        """Close the baselines opened for the last target (their scans and figures stay cached)."""
        self._subjects.clear()

    def _subject(self, path: Path) -> Subject:
        key = path.resolve()
        if key not in self._subjects:
            self._subjects[key] = Subject.open(path, self.settings.load)
        return self._subjects[key]

    @staticmethod
    def _cached(cache: dict[Path, Any], path: Path, compute) -> Any:
        key = path.resolve()
        if key not in cache:
            try:
                cache[key] = compute()
            except Exception as e:  # noqa: BLE001 - reported by the rule that needed it, never raised
                cache[key] = e
        if isinstance(cache[key], BaseException):
            raise cache[key]
        return cache[key]


@dataclass(frozen=True)
class _Lack:
    """Why a rule's need cannot be met for one checkpoint; ``reason`` None: a violation already says so."""

    reason: str | None


class _Run:
    """One `check` run: the policy, the scan settings, the baseline and the data, applied per file."""

    def __init__(self, policy: Policy, settings: _ScanSettings, base: _Baseline | None, data: DataSource | None,
                 ogm_alpha: float):
        self.policy, self.settings, self.base, self.data, self.ogm_alpha = policy, settings, base, data, ogm_alpha
        can = {PROBE: data is not None, DATA: data is not None, BASELINE: base is not None,
               BASELINE_DATA: base is not None and data is not None, RUN: False}  # run logs: runlogs.py
        self.active: list[Rule] = []  # enabled rules whose needs the run can meet
        self.announced: list[dict[str, str]] = []  # rules the policy names but the run cannot check
        self.rule_ids: list[str] = []
        for rule in policy.enabled():
            unit = REGISTRY[rule.id]
            if all(can[need] for need in unit.needs):
                self.active.append(rule)
            elif rule.configured and unit.unmet:
                self.announced.append({"rule_id": rule.id, "reason": unit.unmet})
            else:
                continue
            self.rule_ids.append(rule.id)
        self.wants = {need for rule in self.active for need in REGISTRY[rule.id].needs}

    def check(self, target: Target) -> FileReport:
        start = time.perf_counter()
        one = _Checkpoint(self, target)
        try:
            one.open()
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            rule_id, message = classify(e, target.path)
            message = one.strip(message)
            one.report.violations.append(self.file_violation(rule_id, one.shown, "", message))
            one.report.error = message
        else:
            self._evaluate(one)
            one.report.not_evaluated += [dict(n) for n in self.announced]
        self._suppress(one.report, target.path)
        one.report.status = status_of(one.report.violations)
        one.report.duration_s = time.perf_counter() - start
        if self.base is not None:
            self.base.release()
        return one.report

    def _evaluate(self, one: "_Checkpoint") -> None:
        report = one.report
        for rule in self.active:
            unit = REGISTRY[rule.id]
            lack = next((lack for lack in map(one.provide, unit.needs) if lack is not None), None)
            if lack is not None:
                if lack.reason is not None:
                    report.not_evaluated.append({"rule_id": rule.id, "reason": lack.reason})
                continue
            verdict = unit.evaluate(one.facts, rule.params)
            report.violations += [self.violation(rule, one.shown, found) for found in verdict.found]
            report.not_evaluated += [{"rule_id": rule.id, "reason": why} for why in verdict.skipped]
            if verdict.baseline:
                report.baseline = {**(report.baseline or {"path": one.facts.baseline_path}), **verdict.baseline}

    def _suppress(self, report: FileReport, path: Path) -> None:
        keys = path_keys(path, self.policy.root)
        for v in report.violations:
            if v.outcome == OUTCOME_ERROR or v.suppressed is not None:
                continue
            match = next((s for s in self.policy.suppressions if s.matches(v.rule_id, keys, v.location)), None)
            if match is not None:
                v.suppressed, v.outcome = match.reason, OUTCOME_REPORT

    def violation(self, rule: Rule, path: str, found: Found) -> Violation:
        fails = SEVERITY_RANK[rule.severity] >= SEVERITY_RANK[self.policy.fail_on]
        return Violation(rule.id, rule.severity, path, found.location, found.message,
                         fingerprint(rule.id, path, found.location), OUTCOME_FAIL if fails else OUTCOME_REPORT,
                         found.location_kind)

    def file_violation(self, rule_id: str, path: str, location: str, message: str,
                       location_kind: str = "file") -> Violation:
        """A violation of a file rule (the file, its baseline or its data could not be analysed)."""
        outcome = REGISTRY[rule_id].outcome(location_kind, self.policy.on_nothing_analysed)
        return Violation(rule_id, self.policy.rules[rule_id].severity, path, location, message,
                         fingerprint(rule_id, path, location), outcome, location_kind)

    def nothing_report(self, path: str, message: str, kind: str) -> FileReport:
        v = self.file_violation(NothingAnalysed.id, path, "", message)
        return FileReport(path=path, status=status_of([v]), violations=[v], error=message, kind=kind,
                          rules=[NothingAnalysed.id])


class _Checkpoint:
    """One checkpoint being checked: its Subject, its scan, and each need of its rules met once."""

    def __init__(self, run: _Run, target: Target):
        self.run, self.target = run, target
        self.shown = display_path(target.path)
        self.report = FileReport(path=self.shown, status="pass", rules=list(run.rule_ids))
        self.subject: Subject | None = None
        self.facts: Facts | None = None
        self._model_problem: str | None = None
        self._model_checked = False
        self._provided: dict[str, _Lack | None] = {}

    def strip(self, message: str) -> str:
        """``message`` without a leading path (the report names the file already), on one line."""
        message = one_line(message)
        for prefix in (f"{self.target.path}: ", f"{self.shown}: "):
            if message.startswith(prefix):
                return message[len(prefix):]
        return message

    def open(self) -> None:
        """Open and scan the checkpoint (with the probe when a rule needs it and the model runs)."""
        self.subject = Subject.open(self.target.path, self.run.settings.load)
        self.facts = Facts(self.shown, self._scan())
        self.report.inspection = scan_summary(self.facts.scan)

    def _scan(self):
        from avdiag.workflows.inspect import inspect, scan

        s, data = self.run.settings, self.run.data
        if PROBE in self.run.wants and self.model_problem() is None:
            try:
                return inspect(self.subject, thresholds=s.thresholds, data=data, probe_thresholds=s.probe_thresholds,
                               hash_file=s.hash_file)
            except ModelError as e:
                self._model_problem = self._no_model(e)
        return scan(self.subject, s.thresholds, hash_file=s.hash_file)

    def model_problem(self) -> str | None:
        """Why the checkpoint's model cannot run on the data, or None (resolved once, on the Subject)."""
        if not self._model_checked:
            self._model_checked = True
            try:
                self.subject.model_for(self.run.data)
            except ModelError as e:
                self._model_problem = self._no_model(e)
        return self._model_problem

    def _no_model(self, error: ModelError) -> str:
        return f"no model to run on the data: {self.strip(str(error))}"

    def provide(self, need: str) -> _Lack | None:
        """Meet ``need`` (once per checkpoint): None when its facts are in place, else why not."""
        if need not in self._provided:
            self._provided[need] = {PROBE: self._probe, DATA: self._data, BASELINE: self._baseline,
                                    BASELINE_DATA: self._baseline_data}[need]()
        return self._provided[need]

    def _probe(self) -> _Lack | None:
        problem = self.model_problem()
        return _Lack(problem) if problem else None

    def _data(self) -> _Lack | None:
        run = self.run
        problem = self.model_problem()
        if problem:
            return _Lack(problem)
        missing = [m for m in ("audio", "visual") if m not in run.data.modalities]
        if missing:
            return _Lack(f"the data has no {' or '.join(missing)}: contribution and conflict need both modalities")
        try:
            self.facts.figures = measure_on_data(self.subject, run.data, run.ogm_alpha)
        except ModelError as e:
            return _Lack(f"no contribution/conflict analysis: {self.strip(str(e))}")
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            _, message = classify(e, self.target.path)
            self.report.violations.append(run.file_violation(
                AnalysisError.id, self.shown, "data", f"contribution/conflict analysis on the data failed: {message}",
                "data"))
            return _Lack(None)
        self.report.data = self.facts.figures.to_dict()
        return None

    def _counterpart(self) -> Path | None:
        old = self.run.base.counterpart(self.target)
        if old is not None:
            self.facts.baseline_path = display_path(old)
        return old

    def _no_counterpart(self) -> _Lack:
        return _Lack("no baseline: neither a same-named file nor the same relative path under "
                     f"{display_path(self.run.base.path)}")

    def _baseline(self) -> _Lack | None:
        old = self._counterpart()
        if old is None:
            return self._no_counterpart()
        try:
            self.facts.baseline_scan = self.run.base.scan(old)
        except Exception as e:  # noqa: BLE001 - reported as a violation
            rule_id, message = classify(e, old)
            if rule_id not in (UnsafePickle.id, Unreadable.id, LfsPointer.id):
                rule_id = Unreadable.id
            v = self.run.file_violation(rule_id, self.shown, "baseline", f"baseline {display_path(old)}: {message}",
                                        "baseline")
            v.outcome = OUTCOME_ERROR  # the comparison asked for could not be made
            self.report.violations.append(v)
            return _Lack(None)
        return None

    def _baseline_data(self) -> _Lack | None:
        old = self._counterpart()
        if old is None:
            return self._no_counterpart()
        try:
            self.facts.baseline_figures = self.run.base.figures(old, self.run.data, self.run.ogm_alpha)
        except Exception as e:  # noqa: BLE001 - reported as not evaluated
            _, message = classify(e, old)
            return _Lack(f"baseline {display_path(old)} could not be analysed on the data: {message}")
        return None


def scan_summary(result) -> dict[str, Any]:
    """What a file's report says about its scan (the ``inspection`` entry of the JSON)."""
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
