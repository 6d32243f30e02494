"""Outputs of `avdiag check` for CI systems, built from the check result's JSON document.

* :func:`junit_xml`: JUnit XML, one ``testsuite`` per checkpoint and one ``testcase`` per rule;
* :func:`sarif` / :func:`sarif_json`: a SARIF 2.1.0 log (GitHub code scanning and other viewers);
* :func:`github_annotations` / :func:`job_summary`: GitHub Actions workflow-command lines and the
  Markdown of ``$GITHUB_STEP_SUMMARY``; :func:`github_outputs` says what to emit under GitHub Actions.

Every function takes a check result (anything with ``to_dict()``) or its dict, and returns text or
dicts: none of them writes a file or a stream (the command line's output path does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from avdiag.findings import OUTCOME_ERROR, OUTCOME_FAIL, OUTCOME_REPORT

__all__ = ["github_annotations", "github_outputs", "job_summary", "junit_xml", "sarif", "sarif_json",
           "GithubOutputs", "SARIF_SCHEMA_URI", "FINGERPRINT_KEY"]

SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT_KEY = "avdiag/v1"  # the partialFingerprints entry: hash of rule id, path and location
_SUMMARY_ROWS = 300  # rows per job-summary table (GitHub caps a step summary at 1 MiB)
# "note" reads documents written before severities were unified (schema 1.0)
_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note", "note": "note", "off": "none"}
_GITHUB_COMMAND = {"error": "error", "warning": "warning", "info": "notice", "note": "notice"}


def _document(result: Any) -> Mapping[str, Any]:
    """The check result's JSON document (``result`` itself when it is one already)."""
    return result if isinstance(result, Mapping) else result.to_dict()


def _violations(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [v for f in doc["files"] for v in f["violations"]]


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _plain_violation(v: Mapping[str, Any]) -> str:
    where = f" {v['location']}" if v["location"] else ""
    tail = f" (suppressed: {v['suppression_reason']})" if v["suppressed"] else ""
    return f"{v['severity']} {v['rule_id']}{where}: {v['message']}{tail}"


# ---- JUnit --------------------------------------------------------------------------------------


def junit_xml(result: Any) -> str:
    """JUnit XML: a testsuite per checkpoint (or unmatched path), a testcase per rule checked.

    A testcase has a ``failure`` when the rule's violations fail the run, an ``error`` when the file
    could not be analysed, ``skipped`` when the rule was not evaluated (a data rule without data, no
    baseline, or a file that could not be loaded), and its non-failing violations (warnings below
    ``fail_on``, info, suppressed ones) in ``system-out``.
    """
    import xml.etree.ElementTree as ET

    doc = _document(result)
    kinds = {rid: rule.get("kind") for rid, rule in doc["policy"]["rules"].items()}
    root = ET.Element("testsuites", name="avdiag check")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for f in doc["files"]:
        suite = ET.SubElement(root, "testsuite", name=f["path"], time=f"{f['duration_s']:.3f}")
        counts = dict.fromkeys(totals, 0)
        for rule_id in f["rules"] or sorted({v["rule_id"] for v in f["violations"]}):
            counts["tests"] += 1
            outcome = _junit_case(ET.SubElement(suite, "testcase", classname=f["path"], name=rule_id, file=f["path"],
                                                time="0"), f, rule_id, kinds.get(rule_id))
            if outcome:
                counts[outcome] += 1
        for key, n in counts.items():
            suite.set(key, str(n))
            totals[key] += n
        _junit_properties(suite, f.get("inspection"))
    for key, n in totals.items():
        root.set(key, str(n))
    root.set("time", f"{doc['summary']['duration_s']:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _junit_case(case: Any, f: Mapping[str, Any], rule_id: str, kind: str | None) -> str | None:
    """Fill one testcase; returns the counter it adds to (failures / errors / skipped) or None (a pass)."""
    import xml.etree.ElementTree as ET

    mine = [v for v in f["violations"] if v["rule_id"] == rule_id]
    errors = [v for v in mine if v["outcome"] == OUTCOME_ERROR]
    failing = [v for v in mine if v["outcome"] == OUTCOME_FAIL]
    other = [v for v in mine if v["outcome"] == OUTCOME_REPORT]
    skipped = next((n["reason"] for n in f["not_evaluated"] if n["rule_id"] == rule_id), None)
    not_analysed = (f.get("inspection") is None and not mine and f["kind"] == "file" and f["status"] != "pass"
                    and kind not in (None, "load", "nothing"))
    counter = None
    if errors or failing:
        shown = errors or failing
        counter, tag = ("errors", "error") if errors else ("failures", "failure")
        el = ET.SubElement(case, tag, type=rule_id, message=_one_line(shown[0]["message"]))
        el.text = "\n".join(_plain_violation(v) for v in shown)
    elif skipped is not None:
        counter = "skipped"
        ET.SubElement(case, "skipped", message=f"not evaluated: {skipped}")
    elif not_analysed:
        counter = "skipped"
        ET.SubElement(case, "skipped", message=f"not analysed: {_one_line(f.get('error') or '')}")
    if other:
        ET.SubElement(case, "system-out").text = "\n".join(_plain_violation(v) for v in other)
    return counter


def _junit_properties(suite: Any, inspection: Mapping[str, Any] | None) -> None:
    import xml.etree.ElementTree as ET

    if not inspection:
        return
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="summary", value=inspection.get("text", ""))
    if inspection.get("sha256"):
        ET.SubElement(props, "property", name="sha256", value=inspection["sha256"])


# ---- SARIF --------------------------------------------------------------------------------------

_LOGICAL_KIND = {"tensor": "variable", "layer": "member", "modality": "namespace", "baseline": "resource"}
_SECURITY = {"unsafe-pickle": ("9.0", ["security", "external/cwe/cwe-502"])}


def sarif(result: Any) -> dict[str, Any]:
    """A SARIF 2.1.0 log with one run: every rule of the policy, one result per violation."""
    doc = _document(result)
    rules = list(doc["policy"]["rules"].values())
    index = {r["id"]: i for i, r in enumerate(rules)}
    artifacts: list[dict[str, Any]] = []
    artifact_index: dict[str, int] = {}
    for f in doc["files"]:
        if f["kind"] == "file":
            artifact_index[f["path"]] = len(artifacts)
            artifacts.append(_artifact(f))
    results = [_sarif_result(v, index, artifact_index.get(f["path"])) for f in doc["files"] for v in f["violations"]]
    summary = doc["summary"]
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "avdiag", "version": doc["tool"]["version"],
                            "semanticVersion": doc["tool"]["version"], "rules": [_sarif_rule(r) for r in rules]}},
        "invocations": [_invocation(doc, index)],
        "artifacts": artifacts,
        "results": results,
        "columnKind": "unicodeCodePoints",
        "properties": {"avdiag": {"command": "check", "exitCode": summary["exit_code"], "summary": summary["text"],
                                  "policy": doc["policy"]["source"], "baseline": doc["baseline"]}},
    }
    return {"$schema": SARIF_SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def sarif_json(result: Any) -> str:
    """:func:`sarif` as the text of a ``.sarif`` file."""
    return json.dumps(sarif(result), indent=2, allow_nan=False) + "\n"


def _artifact(f: Mapping[str, Any]) -> dict[str, Any]:
    art: dict[str, Any] = {"location": _artifact_location(f["path"]), "roles": ["analysisTarget"]}
    inspection = f.get("inspection") or {}
    if inspection.get("sha256"):
        art["hashes"] = {"sha-256": inspection["sha256"]}
    if inspection.get("size_bytes") is not None:
        art["length"] = int(inspection["size_bytes"])
    return art


def _sarif_rule(rule: Mapping[str, Any]) -> dict[str, Any]:
    enabled = rule["severity"] != "off"
    params = rule.get("params") or {}
    descriptor: dict[str, Any] = {
        "id": rule["id"],
        "name": "".join(part.capitalize() for part in rule["id"].split("-")),
        "shortDescription": {"text": rule["description"]},
        "fullDescription": {"text": f"{rule['description']}."
                                    + (f" Parameters: {json.dumps(params, sort_keys=True)}." if params else "")},
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule["severity"]], "enabled": enabled},
        "help": {"text": f"avdiag rule {rule['id']}: {rule['description']}. See the `avdiag check` rule table."},
        "properties": {"tags": ["avdiag", rule["kind"]], "avdiag-kind": rule["kind"], "parameters": params},
    }
    if rule["id"] in _SECURITY:
        score, tags = _SECURITY[rule["id"]]
        descriptor["properties"]["security-severity"] = score
        descriptor["properties"]["tags"] = descriptor["properties"]["tags"] + tags
    return descriptor


def _sarif_result(v: Mapping[str, Any], index: dict[str, int], artifact: int | None) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": _artifact_location(v["path"])}
    if artifact is not None:
        physical["artifactLocation"]["index"] = artifact
    # Checkpoints are binary: the whole file is the location. GitHub code scanning needs a start line
    # to show a result at all, so line 1 stands for "the file".
    physical["region"] = {"startLine": 1}
    location: dict[str, Any] = {"physicalLocation": physical}
    if v["location"]:
        name = v["location"].split(":", 1)[1] if v["location_kind"] == "modality" else v["location"]
        location["logicalLocations"] = [{"name": name, "fullyQualifiedName": v["location"],
                                         "kind": _LOGICAL_KIND.get(v["location_kind"], "object")}]
    out: dict[str, Any] = {
        "ruleId": v["rule_id"],
        "ruleIndex": index[v["rule_id"]],
        "level": _SARIF_LEVEL[v["severity"]],
        "message": {"text": v["message"]},
        "locations": [location],
        "partialFingerprints": {FINGERPRINT_KEY: v["fingerprint"]},
        "properties": {"outcome": v["outcome"], "location": v["location"], "locationKind": v["location_kind"]},
    }
    if v["suppressed"]:
        out["suppressions"] = [{"kind": "external", "status": "accepted", "justification": v["suppression_reason"]}]
    return out


def _invocation(doc: Mapping[str, Any], index: dict[str, int]) -> dict[str, Any]:
    config_notes: dict[tuple[str, str], list[str]] = {}
    for f in doc["files"]:
        for n in f["not_evaluated"]:
            config_notes.setdefault((n["rule_id"], n["reason"]), []).append(f["path"])
    configuration = [{
        "level": "warning",
        "message": {"text": f"{rule_id}: not evaluated on {len(paths)} checkpoint(s): {reason}"},
        "descriptor": {"id": "not-evaluated"},
        "associatedRule": {"id": rule_id, "index": index[rule_id]},
    } for (rule_id, reason), paths in config_notes.items()]
    execution = [{
        "level": "error",
        "message": {"text": f["error"] or f"{f['path']}: could not be analysed"},
        "descriptor": {"id": "not-analysed"},
        "locations": [{"physicalLocation": {"artifactLocation": _artifact_location(f["path"])}}],
    } for f in doc["files"] if f["status"] == "error"]
    exit_code = doc["summary"]["exit_code"]
    out: dict[str, Any] = {"executionSuccessful": exit_code != 2, "exitCode": exit_code}
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


# ---- GitHub Actions -----------------------------------------------------------------------------


def github_annotations(result: Any) -> list[str]:
    """``::error file=...,title=...::message`` lines, one per violation that is not suppressed."""
    lines = []
    for f in _document(result)["files"]:
        for v in f["violations"]:
            if v["suppressed"]:
                continue
            props = {}
            if f["kind"] == "file":
                props["file"] = v["path"]
            props["title"] = f"avdiag {v['rule_id']}" + (f" ({v['location']})" if v["location"] else "")
            named = f["kind"] == "file" or v["path"] in v["message"]
            message = v["message"] if named else f"{v['path']}: {v['message']}"
            prop_text = ",".join(f"{k}={_escape_property(val)}" for k, val in props.items())
            lines.append(f"::{_GITHUB_COMMAND[v['severity']]} {prop_text}::{_escape_data(message)}")
    return lines


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def job_summary(result: Any) -> str:
    """The run as Markdown, for ``$GITHUB_STEP_SUMMARY``."""
    doc = _document(result)
    summary = doc["summary"]
    verdict = {0: "passed", 1: "failed: policy violations", 2: "failed: errors"}[summary["exit_code"]]
    out = [f"## avdiag check {verdict}", "", _md(summary["text"]), ""]
    out += _files_table(doc["files"]) + _violations_table(_violations(doc)) + _not_evaluated_list(doc["files"])
    excluded = summary["excluded"]
    if excluded:
        out += ["", f"Excluded by the policy: {', '.join(_code(p) for p in excluded[:50])}"
                + (" ..." if len(excluded) > 50 else "")]
    policy = doc["policy"]
    out += ["", f"Policy: {_code(policy['source']) if policy['source'] else 'defaults'}; "
                f"fail on `{policy['fail_on']}`; avdiag {doc['tool']['version']}.", ""]
    return "\n".join(out)


def _files_table(files: list[Mapping[str, Any]]) -> list[str]:
    out = ["| checkpoint | result | violations | summary |", "|---|---|---|---|"]
    for f in files[:_SUMMARY_ROWS]:
        ids = ", ".join(sorted({v["rule_id"] for v in f["violations"] if not v["suppressed"]}))
        status = f["status"] if f["status"] == "pass" else f"**{f['status']}**"
        detail = f["error"] or (f.get("inspection") or {}).get("text", "")
        out.append(f"| {_code(f['path'])} | {status} | {_md(ids)} | {_md(detail)} |")
    if len(files) > _SUMMARY_ROWS:
        out.append(f"| ... | | | {len(files) - _SUMMARY_ROWS} more in the JSON / SARIF report |")
    return out


def _violations_table(violations: list[Mapping[str, Any]]) -> list[str]:
    if not violations:
        return []
    out = ["", "### Violations", "", "| severity | rule | checkpoint | location | message |", "|---|---|---|---|---|"]
    for v in violations[:_SUMMARY_ROWS]:
        severity = v["severity"] if v["outcome"] != OUTCOME_REPORT else f"{v['severity']} (not failing)"
        message = v["message"] + (f" (suppressed: {v['suppression_reason']})" if v["suppressed"] else "")
        out.append(f"| {severity} | `{v['rule_id']}` | {_code(v['path'])} | {_md(v['location'])} | {_md(message)} |")
    if len(violations) > _SUMMARY_ROWS:
        out.append(f"| | | | | {len(violations) - _SUMMARY_ROWS} more in the JSON / SARIF report |")
    return out


def _not_evaluated_list(files: list[Mapping[str, Any]]) -> list[str]:
    counts: dict[tuple[str, str], int] = {}
    for f in files:
        for n in f["not_evaluated"]:
            key = (n["rule_id"], n["reason"])
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    return ["", "### Not evaluated", ""] + [f"- `{rule_id}` on {n} checkpoint(s): {_md(reason)}"
                                            for (rule_id, reason), n in counts.items()]


def _md(text: str | None) -> str:
    return _one_line(text or "").replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    text = _one_line(text).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


@dataclass(frozen=True)
class GithubOutputs:
    """What to emit under GitHub Actions: annotation lines (for stdout, or stderr when stdout holds the
    JSON) and the Markdown to append to ``summary_path`` (None: ``$GITHUB_STEP_SUMMARY`` is not set)."""

    annotations: list[str]
    summary_path: str | None
    summary: str


def github_outputs(result: Any, environ: Mapping[str, str] | None = None) -> GithubOutputs | None:
    """The GitHub Actions outputs of ``result`` when running there (``GITHUB_ACTIONS=true``), else None."""
    env = os.environ if environ is None else environ
    if env.get("GITHUB_ACTIONS") != "true":
        return None
    doc = _document(result)
    return GithubOutputs(github_annotations(doc), env.get("GITHUB_STEP_SUMMARY") or None, job_summary(doc))
