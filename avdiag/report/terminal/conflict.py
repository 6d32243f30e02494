"""Terminal rendering of `avdiag conflict`: per-modality conflict and contribution, OGM-GE, the worst samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from avdiag.workflows.conflict import ConflictResult


def render_conflict(result: "ConflictResult", console: Console, quiet: bool = False) -> None:
    if quiet:
        console.print(escape(result.summary_line()), highlight=False)
        return
    console.print(escape(f"{result.checkpoint.path}: {result.model} on {result.data} ({result.device}, "
                         f"{result.world_size} process(es)); uni-modal logits from "
                         f"{result.contribution.unimodal_source}"), highlight=False)
    table = Table(title="per modality", title_justify="left")
    for col in ("modality", "cos mean", "cos std", "conflict rate", "|g_uni|/|g_mm|", "sample conflict",
                "shapley (acc)", "shapley (prob)", "uni-modal acc", "OGM score"):
        table.add_column(col, justify="left" if col == "modality" else "right", no_wrap=True)
    for m, s in result.conflict.summaries.items():
        c = result.contribution.modalities.get(m)
        table.add_row(m, f"{s.cos_mean:+.4f}", f"{s.cos_std:.4f}", f"{s.conflict_rate:.0%}",
                      f"{s.magnitude_ratio_mean:.3f}", f"{s.sample_conflict_rate:.0%}",
                      f"{c.shapley_mean_accuracy:.3f}" if c else "-", f"{c.shapley_mean_probability:.3f}" if c else "-",
                      f"{c.unimodal_accuracy:.3f}" if c else "-", f"{c.ogm_score:.2f}" if c else "-")
    console.print(table)
    ogm = result.contribution.ogm
    console.print(escape(f"OGM-GE (alpha {ogm.alpha:g}): rho {_fmt(ogm.rho)}, coefficients {_fmt(ogm.coefficients)}; "
                         f"OPM drop probability {_fmt(result.contribution.opm.drop_probability)}; fused accuracy "
                         f"{result.contribution.fused_accuracy:.3f}"), highlight=False)
    for m, s in result.conflict.summaries.items():
        worst = ", ".join(f"#{r['index']} ({r['cos']:+.2f})" for r in s.most_conflicting[:5])
        if worst:
            console.print(escape(f"{m}: most conflicting samples {worst}"), highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, (int, float)))
