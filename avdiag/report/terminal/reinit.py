"""Terminal rendering of a rewrite: what changed, dead channels before -> after, verification."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avdiag.workflows.reinit import ReinitResult


def render_reinit(result: ReinitResult, console: Console, quiet: bool = False) -> None:
    if quiet:
        console.print(escape(result.summary_line()), highlight=False)
        return
    console.print(f"[bold]{escape(result.source.path)}[/] -> [bold]{escape(result.target)}[/] ({result.method}, "
                  + ", ".join(f"{k}={v}" for k, v in result.parameters.items()
                              if k not in ("method", "layers", "channels") and v is not None) + ")", highlight=False)
    for modality, state in result.diagnosis.items():
        console.print(f"  {modality}: purity train {state['purity_train']:.3f}, held-out {state['purity_heldout']:.3f},"
                      f" gap {state['gap']:.3f} -> alpha {state['alpha']:.3f}", highlight=False)
    table = Table(title="rewritten tensors", title_justify="left")
    for col in ("tensor", "channels changed", "norm before", "norm after"):
        table.add_column(col, justify="left" if col == "tensor" else "right", no_wrap=True)
    for c in result.changes:
        table.add_row(escape(c.name), str(c.channels_changed), "-" if c.norm_before is None else f"{c.norm_before:.4g}",
                      f"{c.norm_after:.4g}")
    console.print(table)
    for modality in result.dead_before:
        console.print(f"  {modality}: dead channels {result.dead_before[modality]} -> "
                      f"{result.dead_after.get(modality, 0)}", highlight=False)
    v = result.verification
    console.print(f"verified: reloaded, {v['identical']} tensors bit-identical, {v['rewritten']} as intended; "
                  f"forward pass: {v['forward']}", highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)
