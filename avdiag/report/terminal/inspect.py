"""Terminal rendering of an inspection: one table per modality, then findings and a summary."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from avdiag.report.terminal.columns import Column, count, fitted_table, number

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avdiag.measure.static import LayerVerdicts
    from avdiag.workflows.inspect import InspectResult

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def render_inspect(result: InspectResult, console: Console, quiet: bool = False, verbose: bool = False) -> None:
    """Print ``result``: per-modality tables, the findings (informational ones with ``verbose``), the summary."""
    if quiet:
        console.print(escape(result.summary_line()), highlight=False, soft_wrap=True)  # one line, for grep and logs
        return
    ck = result.checkpoint
    unwrapped = " -> ".join(_unwrap_text(u) for u in ck.unwrapped) or "nothing"
    sha = (ck.sha256 or "not computed")[:12]
    console.print(f"[bold]{escape(ck.path)}[/]  {ck.format}, {ck.n_tensors} tensors, sha256 {sha}", highlight=False)
    console.print(f"unwrapped: {escape(unwrapped)}; layout: {result.layout.name}"
                  + (f" (fusion {result.layout.fusion})" if result.layout.fusion else ""), highlight=False)
    hidden = 0
    for name, summary in result.modalities.items():
        layers = [v for v in result.layers if v.layer.modality == name]
        table, clean = _modality_table(name, summary.prefix, layers, result.measured if result.probe else None,
                                       console.width, verbose)
        hidden += clean
        if table is not None:
            console.print(table)
    if hidden:
        console.print(f"[dim]{hidden} layer(s) without findings not shown: --verbose shows every layer[/]")
    if getattr(result, "layernorm", None) is not None:
        _layernorm_lines(result.layernorm, console)
    if verbose:
        for f in result.findings:
            console.print(f"[{_SEVERITY_STYLE[f.severity]}]{f.severity:7}[/] {f.id:22} {escape(f.message)}",
                          highlight=False)
    else:
        _grouped_findings(result.findings, console)
    if result.probe:
        p = result.probe
        fed = f"; fed {p.fed}" if p.fed and "unused" in p.fed else ""
        console.print(escape(f"probe: {p.samples} samples in {p.batches} batches on {p.device} "
                             f"({p.model}, data {p.data}{fed})" + synthetic_note(p.data)), highlight=False)
        for name, m in result.modalities.items():
            if m.agreement is not None and m.n_bn_channels:
                console.print(f"  {name}: measured dead {m.n_measured_dead}/{m.n_bn_channels}, rarely active "
                              f"{m.n_rarely_active}; static prediction {_agreement(m.agreement)}", highlight=False)
        if getattr(result, "dormant", None) is not None:
            _dormant_lines(result.dormant, console, verbose)
    note = skipped_note(getattr(result, "data", None))
    if note:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
    for step in next_steps(result):
        console.print(f"next: {escape(step)}", highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def skipped_note(report: dict | None) -> str | None:
    """One line on the data rows left out (``DataSource.report()``): how many, why, the first; None when none."""
    skipped = (report or {}).get("skipped") or {}
    count = skipped.get("count", 0)
    if not count:
        return None
    listed = sum(split.get("listed", 0) for split in (report or {}).get("splits", {}).values())
    kinds = ", ".join(f"{n} {kind}" for kind, n in skipped.get("by_kind", {}).items())
    first = skipped.get("rows", [{}])[0]
    where = f"{first.get('split')} row {first.get('row')} {first.get('clip')}" if first else ""
    return (f"data: skipped {count} of {listed} listed rows ({kinds}); first: {where}: {first.get('reason')}; "
            "the JSON lists them (data.skipped); --strict-data makes this an error")


def synthetic_note(data_name: str) -> str:
    """A reminder on every figure measured on avdiag's synthetic data."""
    return "; synthetic data: these figures say nothing about real data" if data_name.startswith("synthetic") else ""


def _grouped_findings(findings, console: Console) -> None:
    """One line per rule: how many locations, where (the first few); --verbose gives every finding."""
    groups: dict[tuple[str, str], list] = {}
    for f in findings:
        groups.setdefault((f.severity, f.id), []).append(f)
    order = {"error": 0, "warning": 1, "info": 2}
    for (severity, rule), items in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        where = [f.location for f in items if f.location]
        if len(items) == 1:
            text = items[0].message
        else:
            head = ", ".join(where[:3]) + (f", ... ({len(where) - 3} more)" if len(where) > 3 else "")
            text = f"{len(items)} locations: {head}"
        console.print(f"[{_SEVERITY_STYLE[severity]}]{severity:7}[/] {rule:22} {escape(text)}", highlight=False)
    if len(findings) > len(groups):
        console.print("[dim]--verbose (or --json) lists every finding with its channels[/]")


def next_steps(result: InspectResult) -> list[str]:
    """What to do next, when there is something to do."""
    path = result.checkpoint.path
    steps = []
    n_flagged = sum(len(set(v.dead) | set(v.abnormal)) for v in result.layers)
    if n_flagged:
        steps.append(f"avdiag reinit {path} --out fixed.pt rewrites the {n_flagged} flagged channel(s) with ABRi "
                     "(--scope layers|all for more), then avdiag diff shows what changed")
        if result.probe is None:
            steps.append(f"avdiag inspect {path} --data SPEC confirms on real data which channels never fire")
    undecided = sum(m.n_possibly_dead for m in result.modalities.values())
    if undecided:
        steps.append(f"{undecided} channel(s) feed an unknown activation: --assume-activation relu (or --data with "
                     "the model) decides them")
    return steps


def _layernorm_lines(scan, console: Console) -> None:
    """The static LayerNorm scan: the totals, then one line per modality."""
    console.print(escape(scan.summary_text()), highlight=False)
    for name, t in scan.modalities().items():
        console.print(escape(f"  {name}: {t['n_layers']} LayerNorm layers, {t['n_features']} features, "
                             f"{t['n_constant']} constant, {t['n_low_gain']} low-gain, {t['n_nonfinite']} non-finite, "
                             f"{t['n_collapsed_rows']} collapsed rows feeding them"), highlight=False)


def _dormant_lines(dormant, console: Console, verbose: bool, shown: int = 8) -> None:
    """The ReDo dormant units: the total, per modality and layer kind, then the layers that have some."""
    console.print(escape(dormant.summary_text()), highlight=False)
    for name, m in dormant.modalities().items():
        kinds = ", ".join(f"{kind} {d}/{u}" for kind, (u, d) in m.by_kind.items())
        console.print(escape(f"  {name}: {m.n_dormant}/{m.n_units} dormant ({kinds})"), highlight=False)
    hit = [layer for layer in dormant.layers if layer.dormant]
    for layer in hit if verbose else hit[:shown]:
        units = ", ".join(map(str, layer.dormant[:8])) + (", ..." if len(layer.dormant) > 8 else "")
        console.print(escape(f"    {layer.name} ({layer.kind}): {len(layer.dormant)}/{layer.units} [{units}]"),
                      highlight=False)
    if not verbose and len(hit) > shown:
        console.print(f"[dim]    ... {len(hit) - shown} more layer(s) with dormant units: --verbose lists them[/]")


def _agreement(a) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"precision {fmt(a.precision)} / recall {fmt(a.recall)} (tp {a.true_positive}, fp {a.false_positive}, " \
           f"fn {a.false_negative})"


def _modality_table(name: str, prefix: str | None, layers: list[LayerVerdicts], measured, width: int,
                    verbose: bool):
    """The modality's BN layers, most important columns first; without ``verbose`` only the layers that
    carry a finding. Returns the table (None when no row is shown) and how many clean layers were left out."""
    shown = [v for v in layers if verbose or _has_finding(v, measured)]
    title = name + (f" ({prefix.rstrip('.')})" if prefix else "")
    if not shown:
        return None, len(layers)
    cols = [Column("layer", name=True), Column("dead"), Column("min z", 3), Column("abnormal", 2),
            Column("collapsed", 4), Column("const", 5), Column("low-gain", 6), Column("feeds", 7, justify="left")]
    by = {c.header: c for c in cols}
    if measured is not None:
        cols.insert(2, Column("measured", 1))
        cols.insert(3, Column("rare", 6))
        by.update({"measured": cols[2], "rare": cols[3]})
    styles = []
    for v in shown:
        c = v.layer.channels
        by["layer"].cells.append(v.layer.name.removeprefix(prefix or ""))
        by["dead"].cells.append(f"{len(v.dead)}/{c}" if v.layer.feeds_activation != "unknown"
                                else f"?{len(v.possibly_dead)}/{c}")
        by["min z"].cells.append(number(v.worst_z, ".1f"))
        by["abnormal"].cells.append(count(v.abnormal))
        by["collapsed"].cells.append(count(v.collapsed))
        by["const"].cells.append(count(v.constant))
        by["low-gain"].cells.append(count(v.low_gain))
        by["feeds"].cells.append(_feeds(v))
        if measured is not None:
            m = measured.get(v.layer.name)
            by["measured"].cells.append(f"{len(m.dead)}/{c}" if m else "n/a")
            by["rare"].cells.append(count(m.rarely_active) if m else "n/a")
        styles.append("red" if v.dead else None)
    return fitted_table(title, cols, width, styles), len(layers) - len(shown)


def _has_finding(v: LayerVerdicts, measured) -> bool:
    m = measured.get(v.layer.name) if measured is not None else None
    return bool(v.dead or v.abnormal or v.collapsed or v.constant or v.low_gain or v.nonfinite or v.possibly_dead
                or (m is not None and (m.dead or m.rarely_active)))


def _feeds(v: LayerVerdicts) -> str:
    source = v.layer.activation_source.split(":")[0].replace("architecture", "arch")
    return f"{v.layer.activation or '?'} ({source})"


def _unwrap_text(u: dict[str, str]) -> str:
    return {"key": f"[{u['value']!r}]", "lightning": f"Lightning [{u['value']!r}]",
            "prefix": f"prefix {u['value']!r}", "module": u["value"]}.get(u["kind"], u["value"])
