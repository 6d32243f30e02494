"""Outputs of `avdiag check` for people and CI systems.

* :func:`render_check`: the terminal (one line per checkpoint, its violations, a summary line);
* :func:`junit_xml`: JUnit XML, one ``testsuite`` per checkpoint and one ``testcase`` per rule;
* :func:`sarif`: a SARIF 2.1.0 log (GitHub code scanning and other SARIF viewers);
* :func:`github_annotations` / :func:`job_summary`: GitHub Actions workflow-command lines and the
  Markdown summary appended to ``$GITHUB_STEP_SUMMARY`` (:func:`emit_github` does both when
  ``GITHUB_ACTIONS=true``);
* :func:`write_reports`: everything the command line asked for, in one call.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape

from avdiag._version import __version__
from avdiag.check import (
    OUTCOME_ERROR,
    OUTCOME_FAIL,
    OUTCOME_REPORT,
    CheckResult,
    Rule,
    Violation,
)
from avdiag.errors import UsageError

__all__ = ["emit_github", "github_annotations", "job_summary", "junit_xml", "render_check", "sarif",
           "write_reports", "SARIF_SCHEMA_URI", "FINGERPRINT_KEY"]

SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT_KEY = "avdiag/v1"  # the partialFingerprints entry: hash of rule id, path and location
_SUMMARY_ROWS = 300  # rows per job-summary table (GitHub caps a step summary at 1 MiB)

_STATUS_STYLE = {"pass": ("PASS", "green"), "fail": ("FAIL", "bold red"), "error": ("ERROR", "bold magenta")}
_SEVERITY_STYLE = {"error": "red", "warning": "yellow", "note": "dim"}


# ---- terminal -----------------------------------------------------------------------------------


def render_check(result: CheckResult, console: Console, quiet: bool = False) -> None:
    """One line per checkpoint (and per path that matched nothing), its violations, a summary line."""
    if not quiet:
        width = max((len(f.path) for f in result.files), default=0)
        width = min(width, 60)
        for f in result.files:
            label, style = _STATUS_STYLE[f.status]
            detail = f.error if f.error else (f.inspection or {}).get("text", "")
            console.print(f"[{style}]{label:5}[/] {escape(f.path.ljust(width))}  {escape(detail or '')}",
                          highlight=False, soft_wrap=True)
            if f.data:
                console.print(f"      [dim]{escape(_data_line(f.data))}[/]", highlight=False, soft_wrap=True)
            shown = [v for v in f.violations if not (f.error and v.message == f.error)]
            for v in shown:
                console.print("      " + _violation_markup(v), highlight=False, soft_wrap=True)
            for n in f.not_evaluated:
                console.print(f"      [dim]not evaluated[/] {escape(n['rule_id'])}: {escape(n['reason'])}",
                              highlight=False, soft_wrap=True)
        for path in result.excluded:
            console.print(f"[dim]SKIP  {escape(path)}  (excluded by the policy)[/]", highlight=False, soft_wrap=True)
        if result.policy.source:
            console.print(f"[dim]policy: {escape(result.policy.source)}[/]", highlight=False)
    style = {0: "bold green", 1: "bold red", 2: "bold magenta"}[result.exit_code]
    console.print(f"[{style}]{escape(result.summary_line())}[/]", highlight=False, soft_wrap=True)


def _data_line(d: dict) -> str:
    """The figures of the data rules in one line: per modality Shapley share, uni-modal accuracy, cosine."""
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    parts = [f"{m}: share {num(x.get('share_accuracy'), '.2f')}, uni-modal acc {num(x.get('unimodal_accuracy'), '.2f')}"
             f", cos {num(x.get('cos_mean'), '+.3f')}" for m, x in d.get("modalities", {}).items()]
    return (f"on {d.get('data')} ({d.get('n_samples')} samples, fused acc {num(d.get('fused_accuracy'), '.2f')}): "
            + "; ".join(parts))


def _violation_markup(v: Violation) -> str:
    style = _SEVERITY_STYLE.get(v.severity, "")
    shown = v.location.split(":", 1)[-1]
    where = f" {escape(v.location)}" if v.location and not v.message.startswith(shown) else ""
    tail = ""
    if v.suppressed is not None:
        tail = f" [dim](suppressed: {escape(v.suppressed)})[/]"
    elif v.outcome == OUTCOME_REPORT:
        tail = " [dim](does not fail the run)[/]"
    body = f"[{style}]{v.severity:7}[/] {escape(v.rule_id)}{where}: {escape(v.message)}{tail}"
    return f"[dim]{body}[/]" if v.suppressed is not None else body


# ---- JUnit --------------------------------------------------------------------------------------


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: a testsuite per checkpoint (or unmatched path), a testcase per rule checked.

    A testcase has a ``failure`` when the rule's violations fail the run, an ``error`` when the file
    could not be analysed, ``skipped`` when the rule was not evaluated (a data rule without data, no baseline,
    or a file that could not be loaded), and its non-failing violations (warnings below ``fail_on``,
    notes, suppressed ones) in ``system-out``.
    """
    root = ET.Element("testsuites", name="avdiag check")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for f in result.files:
        suite = ET.SubElement(root, "testsuite", name=f.path, time=f"{f.duration_s:.3f}")
        counts = dict.fromkeys(totals, 0)
        for rule_id in f.rules or sorted({v.rule_id for v in f.violations}):
            counts["tests"] += 1
            case = ET.SubElement(suite, "testcase", classname=f.path, name=rule_id, file=f.path, time="0")
            mine = [v for v in f.violations if v.rule_id == rule_id]
            errors = [v for v in mine if v.outcome == OUTCOME_ERROR]
            failing = [v for v in mine if v.outcome == OUTCOME_FAIL]
            other = [v for v in mine if v.outcome == OUTCOME_REPORT]
            skipped = next((n["reason"] for n in f.not_evaluated if n["rule_id"] == rule_id), None)
            if errors:
                counts["errors"] += 1
                el = ET.SubElement(case, "error", type=rule_id, message=_one_line(errors[0].message))
                el.text = "\n".join(_plain_violation(v) for v in errors)
            elif failing:
                counts["failures"] += 1
                el = ET.SubElement(case, "failure", type=rule_id, message=_one_line(failing[0].message))
                el.text = "\n".join(_plain_violation(v) for v in failing)
            elif skipped is not None:
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=f"not evaluated: {skipped}")
            elif not f.analysed and not mine and f.kind == "file" and f.status != "pass" and _is_content(result, rule_id):
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=f"not analysed: {_one_line(f.error or '')}")
            if other:
                ET.SubElement(case, "system-out").text = "\n".join(_plain_violation(v) for v in other)
        for key, n in counts.items():
            suite.set(key, str(n))
            totals[key] += n
        if f.inspection:
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="summary", value=f.inspection.get("text", ""))
            if f.inspection.get("sha256"):
                ET.SubElement(props, "property", name="sha256", value=f.inspection["sha256"])
    for key, n in totals.items():
        root.set(key, str(n))
    root.set("time", f"{result.duration_s:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _is_content(result: CheckResult, rule_id: str) -> bool:
    rule = result.policy.rules.get(rule_id)
    return rule is not None and rule.kind not in ("load", "nothing")


def _plain_violation(v: Violation) -> str:
    where = f" {v.location}" if v.location else ""
    tail = f" (suppressed: {v.suppressed})" if v.suppressed is not None else ""
    return f"{v.severity} {v.rule_id}{where}: {v.message}{tail}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---- SARIF --------------------------------------------------------------------------------------

_LOGICAL_KIND = {"tensor": "variable", "layer": "member", "modality": "namespace", "baseline": "resource"}
_SECURITY = {"unsafe-pickle": ("9.0", ["security", "external/cwe/cwe-502"])}


def sarif(result: CheckResult) -> dict[str, Any]:
    """A SARIF 2.1.0 log with one run: every rule of the policy, one result per violation."""
    rules = list(result.policy.rules.values())
    index = {r.id: i for i, r in enumerate(rules)}
    artifacts: list[dict[str, Any]] = []
    artifact_index: dict[str, int] = {}
    for f in result.files:
        if f.kind != "file":
            continue
        artifact_index[f.path] = len(artifacts)
        art: dict[str, Any] = {"location": _artifact_location(f.path), "roles": ["analysisTarget"]}
        if f.inspection and f.inspection.get("sha256"):
            art["hashes"] = {"sha-256": f.inspection["sha256"]}
        if f.inspection and f.inspection.get("size_bytes") is not None:
            art["length"] = int(f.inspection["size_bytes"])
        artifacts.append(art)

    results = []
    for f in result.files:
        for v in f.violations:
            results.append(_sarif_result(v, index, artifact_index.get(f.path)))

    run: dict[str, Any] = {
        "tool": {"driver": {"name": "avdiag", "version": __version__, "semanticVersion": __version__,
                            "rules": [_sarif_rule(r) for r in rules]}},
        "invocations": [_invocation(result, index)],
        "artifacts": artifacts,
        "results": results,
        "columnKind": "unicodeCodePoints",
        "properties": {"avdiag": {"command": "check", "exitCode": result.exit_code,
                                  "summary": result.summary_line(), "policy": result.policy.source,
                                  "baseline": result.baseline}},
    }
    return {"$schema": SARIF_SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def _sarif_rule(rule: Rule) -> dict[str, Any]:
    level = rule.severity if rule.enabled else "none"
    descriptor: dict[str, Any] = {
        "id": rule.id,
        "name": "".join(part.capitalize() for part in rule.id.split("-")),
        "shortDescription": {"text": rule.description},
        "fullDescription": {"text": f"{rule.description}."
                                    + (f" Parameters: {json.dumps(rule.params, sort_keys=True)}." if rule.params else "")},
        "defaultConfiguration": {"level": level, "enabled": rule.enabled},
        "help": {"text": f"avdiag rule {rule.id}: {rule.description}. See the `avdiag check` rule table."},
        "properties": {"tags": ["avdiag", rule.kind], "avdiag-kind": rule.kind,
                       "parameters": _jsonable(rule.params)},
    }
    if rule.id in _SECURITY:
        score, tags = _SECURITY[rule.id]
        descriptor["properties"]["security-severity"] = score
        descriptor["properties"]["tags"] = descriptor["properties"]["tags"] + tags
    return descriptor


def _sarif_result(v: Violation, index: dict[str, int], artifact: int | None) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": _artifact_location(v.path)}
    if artifact is not None:
        physical["artifactLocation"]["index"] = artifact
    # Checkpoints are binary: the whole file is the location. GitHub code scanning needs a start line
    # to show a result at all, so line 1 stands for "the file".
    physical["region"] = {"startLine": 1}
    location: dict[str, Any] = {"physicalLocation": physical}
    if v.location:
        name = v.location.split(":", 1)[1] if v.location_kind == "modality" else v.location
        location["logicalLocations"] = [{"name": name, "fullyQualifiedName": v.location,
                                         "kind": _LOGICAL_KIND.get(v.location_kind, "object")}]
    out: dict[str, Any] = {
        "ruleId": v.rule_id,
        "ruleIndex": index[v.rule_id],
        "level": v.severity,
        "message": {"text": v.message},
        "locations": [location],
        "partialFingerprints": {FINGERPRINT_KEY: v.fingerprint},
        "properties": {"outcome": v.outcome, "location": v.location, "locationKind": v.location_kind},
    }
    if v.suppressed is not None:
        out["suppressions"] = [{"kind": "external", "status": "accepted", "justification": v.suppressed}]
    return out


def _invocation(result: CheckResult, index: dict[str, int]) -> dict[str, Any]:
    config_notes: dict[tuple[str, str], list[str]] = {}
    for f in result.files:
        for n in f.not_evaluated:
            config_notes.setdefault((n["rule_id"], n["reason"]), []).append(f.path)
    configuration = [{
        "level": "warning",
        "message": {"text": f"{rule_id}: not evaluated on {len(paths)} checkpoint(s): {reason}"},
        "descriptor": {"id": "not-evaluated"},
        "associatedRule": {"id": rule_id, "index": index[rule_id]},
    } for (rule_id, reason), paths in config_notes.items()]
    execution = [{
        "level": "error",
        "message": {"text": f.error or f"{f.path}: could not be analysed"},
        "descriptor": {"id": "not-analysed"},
        "locations": [{"physicalLocation": {"artifactLocation": _artifact_location(f.path)}}],
    } for f in result.files if f.status == "error"]
    out: dict[str, Any] = {"executionSuccessful": result.exit_code != 2, "exitCode": result.exit_code}
    if configuration:
        out["toolConfigurationNotifications"] = configuration
    if execution:
        out["toolExecutionNotifications"] = execution
    return out


def _artifact_location(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_absolute():
        return {"uri": p.as_uri()}
    return {"uri": quote(path.replace(os.sep, "/"), safe="/"), "uriBaseId": "%SRCROOT%"}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---- GitHub Actions -----------------------------------------------------------------------------

_COMMAND = {"error": "error", "warning": "warning", "note": "notice"}


def github_annotations(result: CheckResult) -> list[str]:
    """``::error file=...,title=...::message`` lines, one per violation that is not suppressed."""
    lines = []
    for f in result.files:
        for v in f.violations:
            if v.suppressed is not None:
                continue
            props = {}
            if f.kind == "file":
                props["file"] = v.path
            props["title"] = f"avdiag {v.rule_id}" + (f" ({v.location})" if v.location else "")
            message = v.message if f.kind == "file" or v.path in v.message else f"{v.path}: {v.message}"
            prop_text = ",".join(f"{k}={_escape_property(val)}" for k, val in props.items())
            lines.append(f"::{_COMMAND[v.severity]} {prop_text}::{_escape_data(message)}")
    return lines


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def job_summary(result: CheckResult) -> str:
    """The run as Markdown, for ``$GITHUB_STEP_SUMMARY``."""
    verdict = {0: "passed", 1: "failed: policy violations", 2: "failed: errors"}[result.exit_code]
    out = [f"## avdiag check {verdict}", "", _md(result.summary_line()), ""]
    out += ["| checkpoint | result | violations | summary |", "|---|---|---|---|"]
    for f in result.files[:_SUMMARY_ROWS]:
        active = [v for v in f.violations if v.suppressed is None]
        ids = ", ".join(sorted({v.rule_id for v in active}))
        status = f.status if f.status == "pass" else f"**{f.status}**"
        detail = f.error or (f.inspection or {}).get("text", "")
        out.append(f"| {_code(f.path)} | {status} | {_md(ids)} | {_md(detail)} |")
    if len(result.files) > _SUMMARY_ROWS:
        out.append(f"| ... | | | {len(result.files) - _SUMMARY_ROWS} more in the JSON / SARIF report |")
    violations = result.violations
    if violations:
        out += ["", "### Violations", "", "| severity | rule | checkpoint | location | message |", "|---|---|---|---|---|"]
        for v in violations[:_SUMMARY_ROWS]:
            severity = v.severity if v.outcome != OUTCOME_REPORT else f"{v.severity} (not failing)"
            message = v.message + (f" (suppressed: {v.suppressed})" if v.suppressed is not None else "")
            out.append(f"| {severity} | `{v.rule_id}` | {_code(v.path)} | {_md(v.location)} | {_md(message)} |")
        if len(violations) > _SUMMARY_ROWS:
            out.append(f"| | | | | {len(violations) - _SUMMARY_ROWS} more in the JSON / SARIF report |")
    not_evaluated: dict[tuple[str, str], int] = {}
    for f in result.files:
        for n in f.not_evaluated:
            key = (n["rule_id"], n["reason"])
            not_evaluated[key] = not_evaluated.get(key, 0) + 1
    if not_evaluated:
        out += ["", "### Not evaluated", ""]
        out += [f"- `{rule_id}` on {n} checkpoint(s): {_md(reason)}" for (rule_id, reason), n in not_evaluated.items()]
    if result.excluded:
        out += ["", f"Excluded by the policy: {', '.join(_code(p) for p in result.excluded[:50])}"
                + (" ..." if len(result.excluded) > 50 else "")]
    out += ["", f"Policy: {_code(result.policy.source) if result.policy.source else 'defaults'}; "
                f"fail on `{result.policy.fail_on}`; avdiag {__version__}.", ""]
    return "\n".join(out)


def _md(text: str | None) -> str:
    return _one_line(text or "").replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    text = _one_line(text).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def emit_github(result: CheckResult, *, environ: Mapping[str, str] | None = None,
                stream: TextIO | None = None) -> bool:
    """Under GitHub Actions (``GITHUB_ACTIONS=true``): write the annotation lines to ``stream``
    (stdout) and append the job summary to ``$GITHUB_STEP_SUMMARY``. Returns whether it did."""
    env = os.environ if environ is None else environ
    if env.get("GITHUB_ACTIONS") != "true":
        return False
    out = stream if stream is not None else sys.stdout
    for line in github_annotations(result):
        out.write(line + "\n")
    out.flush()
    target = env.get("GITHUB_STEP_SUMMARY")
    if target:
        try:
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(job_summary(result) + "\n")
        except OSError as e:
            sys.stderr.write(f"avdiag: warning: cannot append the job summary to {target} ({e.strerror})\n")
    return True


# ---- all at once --------------------------------------------------------------------------------


def write_reports(result: CheckResult, *, console: Console | None = None, json_out: str | None = None,
                  junit_out: str | Path | None = None, sarif_out: str | Path | None = None, quiet: bool = False,
                  environ: Mapping[str, str] | None = None) -> None:
    """Every output the command line asked for: report files first, then the terminal (not with
    ``--json -``, whose stdout holds the JSON only), then GitHub annotations and the job summary
    when running under GitHub Actions (on stderr with ``--json -``)."""
    from avdiag.report.jsonout import write_json

    if junit_out is not None:
        _write_text(junit_out, junit_xml(result), "--junit")
    if sarif_out is not None:
        _write_text(sarif_out, json.dumps(sarif(result), indent=2, allow_nan=False) + "\n", "--sarif")
    if json_out is not None:
        write_json(result.to_dict(), json_out)
    if json_out != "-":
        render_check(result, console or Console(), quiet=quiet)
    emit_github(result, environ=environ, stream=sys.stderr if json_out == "-" else sys.stdout)


def _write_text(target: str | Path, text: str, option: str) -> None:
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"{option} {target}: is a directory")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{option} {target}: cannot write ({e.strerror})") from e
