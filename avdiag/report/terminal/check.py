"""Terminal rendering of `avdiag check`: one line per checkpoint, its violations, a summary line.

It reads the check result's JSON document (a result with ``to_dict()``, or the dict itself)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape

from avdiag.findings import OUTCOME_REPORT

_STATUS_STYLE = {"pass": ("PASS", "green"), "fail": ("FAIL", "bold red"), "error": ("ERROR", "bold magenta")}
_SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "dim"}
_EXIT_STYLE = {0: "bold green", 1: "bold red", 2: "bold magenta"}


def render_check(result: Any, console: Console, quiet: bool = False) -> None:
    """One line per checkpoint (and per path that matched nothing), its violations, a summary line."""
    doc = result if isinstance(result, Mapping) else result.to_dict()
    summary = doc["summary"]
    if not quiet:
        _files(doc["files"], console)
        for path in summary["excluded"]:
            _line(console, f"[dim]SKIP  {escape(path)}  (excluded by the policy)[/]")
        if doc["policy"]["source"]:
            _line(console, f"[dim]policy: {escape(doc['policy']['source'])}[/]")
    _line(console, f"[{_EXIT_STYLE[summary['exit_code']]}]{escape(summary['text'])}[/]")


def _files(files: list[Mapping[str, Any]], console: Console) -> None:
    width = min(max((len(f["path"]) for f in files), default=0), 60)
    for f in files:
        label, style = _STATUS_STYLE[f["status"]]
        detail = (f["error"] or (f.get("inspection") or {}).get("text", "") or "").removeprefix(f"{f['path']}: ")
        _line(console, f"[{style}]{label:5}[/] {escape(f['path'].ljust(width))}  {escape(detail or '')}")
        if f.get("data"):
            _line(console, f"      [dim]{escape(data_line(f['data']))}[/]")
        for v in f["violations"]:
            if not (f["error"] and v["message"] == f["error"]):  # the file line says it already
                _line(console, "      " + _violation_markup(v))
        for n in f["not_evaluated"]:
            _line(console, f"      [dim]not evaluated[/] {escape(n['rule_id'])}: {escape(n['reason'])}")


def _line(console: Console, markup: str) -> None:
    console.print(markup, highlight=False, soft_wrap=True)


def data_line(d: Mapping[str, Any]) -> str:
    """The figures of the data rules in one line: per modality Shapley share, uni-modal accuracy, cosine."""
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    parts = [f"{m}: share {num(x.get('share_accuracy'), '.2f')}, uni-modal acc {num(x.get('unimodal_accuracy'), '.2f')}"
             f", cos {num(x.get('cos_mean'), '+.3f')}" for m, x in d.get("modalities", {}).items()]
    return (f"on {d.get('data')} ({d.get('n_samples')} samples, fused acc {num(d.get('fused_accuracy'), '.2f')}): "
            + "; ".join(parts))


def _violation_markup(v: Mapping[str, Any]) -> str:
    style = _SEVERITY_STYLE.get(v["severity"], "")
    shown = v["location"].split(":", 1)[-1]
    where = f" {escape(v['location'])}" if v["location"] and not v["message"].startswith(shown) else ""
    tail = ""
    if v["suppressed"]:
        tail = f" [dim](suppressed: {escape(v['suppression_reason'])})[/]"
    elif v["outcome"] == OUTCOME_REPORT:
        tail = " [dim](does not fail the run)[/]"
    body = f"[{style}]{v['severity']:7}[/] {escape(v['rule_id'])}{where}: {escape(v['message'])}{tail}"
    return f"[dim]{body}[/]" if v["suppressed"] else body
