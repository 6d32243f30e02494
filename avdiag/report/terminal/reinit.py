"""Terminal rendering of a rewrite: what changed, dead channels before -> after, verification."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from avdiag.report.terminal.columns import Column, fitted_table, number
from avdiag.report.terminal.inspect import skipped_note

if TYPE_CHECKING:
    from avdiag.workflows.reinit import ReinitResult


MAX_ROWS = 12


def render_reinit(result: ReinitResult, console: Console, quiet: bool = False, verbose: bool = False) -> None:
    """Print ``result``: what was rewritten per module (per tensor with ``verbose``), dead channels before ->
    after, what the verification proved, the summary."""
    if quiet or result.target is None:
        console.print(escape(result.summary_line()), highlight=False, soft_wrap=True)  # one line, for grep and logs
        return
    console.print(f"[bold]{escape(result.source.path)}[/] -> [bold]{escape(result.target)}[/] ({result.method}, "
                  + escape(", ".join(f"{k}={v}" for k, v in result.parameters.items()
                                     if k not in ("method", "layers", "channels", "per_modality") and v is not None))
                  + ")", highlight=False)
    for modality, state in (result.parameters.get("per_modality") or {}).items():
        console.print(f"  {escape(modality)}: {escape(state)}", highlight=False)
    for modality, state in result.diagnosis.items():
        console.print(f"  {modality}: purity train {state['purity_train']:.3f}, held-out {state['purity_heldout']:.3f},"
                      f" gap {state['gap']:.3f} -> alpha {state['alpha']:.3f}", highlight=False)
    console.print(_tensor_table(result, console.width) if verbose else _module_table(result, console.width))
    for modality in result.dead_before:
        console.print(f"  {modality}: dead channels {result.dead_before[modality]} -> "
                      f"{result.dead_after.get(modality, 0)}", highlight=False)
    _print_channels(console, "revived beyond the paper's blend (a smaller alpha: z reaches the revive margin)",
                    {name: r["channels"] for name, r in result.revived_beyond_blend.items()}, "green")
    _print_channels(console, "still dead after the rewrite with these options", result.still_dead or {}, "red")
    v = result.verification
    console.print(f"verified: the written file reloads with {v['identical']} tensors bit-identical to the input and "
                  f"{v['rewritten']} exactly as intended; forward pass: {v['forward']}", highlight=False)
    change = v.get("output_change")
    if change:
        console.print(f"outputs moved: max |change| {change['max_abs']:.3g} of the logits (largest |logit| "
                      f"{change['max_abs_before']:.3g}) on {change['samples']} {change['batch']} sample(s)",
                      highlight=False)
    note = skipped_note(result.data)
    if note:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def _print_channels(console: Console, title: str, channels: dict[str, list[int]], style: str) -> None:
    """``title`` with the channel count, then one line per layer (at most MAX_ROWS) with its first channels."""
    if not channels:
        return
    total = sum(len(c) for c in channels.values())
    console.print(f"[{style}]{total} channel(s) {escape(title)}:[/]", highlight=False)
    for name, idx in list(channels.items())[:MAX_ROWS]:
        head = ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
        console.print(f"  {escape(name)}: {len(idx)} [{head}]", highlight=False)
    if len(channels) > MAX_ROWS:
        console.print(f"  ... {len(channels) - MAX_ROWS} more layers (--json lists them all)", highlight=False)


def _module_table(result: ReinitResult, width: int):
    """One row per rewritten module (a BN layer, a conv): its tensors and the most channels any of them changed."""
    modules: dict[str, list] = {}
    for c in result.changes:
        modules.setdefault(c.name.rpartition(".")[0] or c.name, []).append(c)
    rows = list(modules.items())
    shown = rows[:MAX_ROWS]
    cols = [Column("module", name=True), Column("channels changed"), Column("tensors", 1, justify="left")]
    for name, changes in shown:
        cols[0].cells.append(name)
        cols[1].cells.append(str(max(c.channels_changed for c in changes)))
        cols[2].cells.append(", ".join(c.name.rpartition(".")[2] for c in changes))
    more = f" (first {len(shown)} of {len(rows)}; --verbose lists every tensor)" if len(rows) > len(shown) else \
        " (--verbose lists every tensor with its norms)"
    return fitted_table(f"rewritten modules{more}", cols, width)


def _tensor_table(result: ReinitResult, width: int):
    cols = [Column("tensor", name=True), Column("channels changed"), Column("norm before", 1), Column("norm after", 1)]
    for c in result.changes:
        cols[0].cells.append(c.name)
        cols[1].cells.append(str(c.channels_changed))
        cols[2].cells.append(number(c.norm_before, ".4g"))
        cols[3].cells.append(number(c.norm_after, ".4g"))
    return fitted_table("rewritten tensors", cols, width)
