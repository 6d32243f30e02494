"""Terminal rendering of an inspection: one table per modality, then findings and a summary."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avdiag.measure.static import LayerVerdicts
    from avdiag.workflows.inspect import InspectResult

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def render_inspect(result: InspectResult, console: Console, quiet: bool = False, verbose: bool = False) -> None:
    """Print ``result``: per-modality tables, the findings (informational ones with ``verbose``), the summary."""
    if quiet:
        console.print(escape(result.summary_line()), highlight=False)
        return
    ck = result.checkpoint
    unwrapped = " -> ".join(_unwrap_text(u) for u in ck.unwrapped) or "nothing"
    console.print(f"[bold]{escape(ck.path)}[/]  {ck.format}, {ck.n_tensors} tensors, sha256 {(ck.sha256 or 'not computed')[:12]}", highlight=False)
    console.print(f"unwrapped: {escape(unwrapped)}; layout: {result.layout.name}"
                  + (f" (fusion {result.layout.fusion})" if result.layout.fusion else ""), highlight=False)
    for name, summary in result.modalities.items():
        layers = [v for v in result.layers if v.layer.modality == name]
        console.print(_modality_table(name, summary.prefix, layers, result.measured if result.probe else None))
    for f in result.findings:
        if verbose or f.severity != "info":
            console.print(f"[{_SEVERITY_STYLE[f.severity]}]{f.severity:7}[/] {f.id:22} {escape(f.message)}", highlight=False)
    if result.probe:
        p = result.probe
        console.print(escape(f"probe: {p.samples} samples in {p.batches} batches on {p.device} ({p.model}, data {p.data})"),
                      highlight=False)
        for name, m in result.modalities.items():
            if m.agreement is not None:
                console.print(f"  {name}: measured dead {m.n_measured_dead}/{m.n_bn_channels}, rarely active "
                              f"{m.n_rarely_active}; static prediction {_agreement(m.agreement)}", highlight=False)
    n_info = sum(f.severity == "info" for f in result.findings)
    if n_info and not verbose:
        console.print(f"[dim]{n_info} informational finding(s): --verbose shows them[/]")
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def _agreement(a) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"precision {fmt(a.precision)} / recall {fmt(a.recall)} (tp {a.true_positive}, fp {a.false_positive}, " \
           f"fn {a.false_negative})"


def _modality_table(name: str, prefix: str | None, layers: list[LayerVerdicts], measured=None) -> Table:
    title = escape(f"{name}" + (f" ({prefix.rstrip('.')})" if prefix else ""))
    table = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    for col in ("dead", "abnormal", "const", "low-gain", "collapsed", "min z"):
        table.add_column(col, justify="right", no_wrap=True)
    if measured is not None:
        table.add_column("measured dead", justify="right", no_wrap=True)
        table.add_column("rare", justify="right", no_wrap=True)
    table.add_column("feeds (source)", no_wrap=True)
    for v in layers:
        c = v.layer.channels
        dead = f"{len(v.dead)}/{c}" if v.layer.feeds_activation != "unknown" else f"?{len(v.possibly_dead)}/{c}"
        style = "red" if v.dead else None
        cells = [escape(v.layer.name.removeprefix(prefix or "")), dead, _n(v.abnormal), _n(v.constant), _n(v.low_gain),
                 _n(v.collapsed), _z(v.worst_z)]
        if measured is not None:
            m = measured.get(v.layer.name)
            cells += [f"{len(m.dead)}/{c}" if m else "n/a", _n(m.rarely_active) if m else "n/a"]
        table.add_row(*cells, escape(_feeds(v)), style=style)
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
