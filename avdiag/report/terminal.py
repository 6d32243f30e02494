"""Terminal rendering of an inspection: one table per modality, then findings and a summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from avdiag.inspection import InspectResult
from avdiag.measure.static import LayerVerdicts

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def render_inspect(result: InspectResult, console: Console, quiet: bool = False) -> None:
    if quiet:
        console.print(result.summary_line(), highlight=False)
        return
    ck = result.checkpoint
    unwrapped = " -> ".join(_unwrap_text(u) for u in ck.unwrapped) or "nothing"
    console.print(f"[bold]{ck.path}[/]  {ck.format}, {ck.n_tensors} tensors, sha256 {(ck.sha256 or 'not computed')[:12]}", highlight=False)
    console.print(f"unwrapped: {unwrapped}; layout: {result.layout.name}"
                  + (f" (fusion {result.layout.fusion})" if result.layout.fusion else ""), highlight=False)
    for name, summary in result.modalities.items():
        layers = [v for v in result.layers if v.layer.modality == name]
        console.print(_modality_table(name, summary.prefix, layers))
    for f in result.findings:
        if f.severity != "info":
            console.print(f"[{_SEVERITY_STYLE[f.severity]}]{f.severity:7}[/] {f.id:22} {f.message}", highlight=False)
    n_info = sum(f.severity == "info" for f in result.findings)
    if n_info:
        console.print(f"[dim]{n_info} informational finding(s) in --json output[/]")
    console.print(f"[bold]{result.summary_line()}[/]", highlight=False)


def _modality_table(name: str, prefix: str | None, layers: list[LayerVerdicts]) -> Table:
    title = f"{name}" + (f" ({prefix.rstrip('.')})" if prefix else "")
    table = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    for col in ("dead", "abnormal", "const", "low-gain", "collapsed", "min z"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("feeds (source)", no_wrap=True)
    for v in layers:
        c = v.layer.channels
        dead = f"{len(v.dead)}/{c}" if v.layer.feeds_activation != "unknown" else f"?{len(v.possibly_dead)}/{c}"
        style = "red" if v.dead else None
        table.add_row(
            v.layer.name.removeprefix(prefix or ""), dead, _n(v.abnormal), _n(v.constant), _n(v.low_gain),
            _n(v.collapsed), _z(v.worst_z), _feeds(v),
            style=style)
    return table


def _feeds(v: LayerVerdicts) -> str:
    source = v.layer.activation_source.split(":")[0].replace("architecture", "arch")
    return f"{v.layer.activation or '?'} ({source})"


def _n(items: list[int]) -> str:
    return str(len(items)) if items else "-"


def _z(z: float | None) -> str:
    return "-" if z is None else f"{z:.1f}"


def _unwrap_text(u: dict[str, str]) -> str:
    return {"key": f"[{u['value']!r}]", "lightning": f"Lightning [{u['value']!r}]",
            "prefix": f"prefix {u['value']!r}", "module": u["value"]}.get(u["kind"], u["value"])
