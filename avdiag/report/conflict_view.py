"""Terminal rendering and PNG plots of `avdiag conflict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from avdiag.imbalance import ImbalanceResult


def render_imbalance(result: ImbalanceResult, console: Console, quiet: bool = False) -> None:
    if quiet:
        console.print(escape(result.summary_line()), highlight=False)
        return
    console.print(escape(f"{result.checkpoint['path']}: {result.model} on {result.data} ({result.device}, "
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


def write_plots(result: ImbalanceResult, folder: Path) -> list[Path]:
    """per-sample cosine and Shapley histograms, per-layer conflict bars: one PNG each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    frame = result.samples_frame()
    written = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        path = folder / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)

    summaries = result.conflict.summaries
    fig = Figure(figsize=(7, 3))
    for i, m in enumerate(summaries):
        ax = fig.add_subplot(1, len(summaries), i + 1)
        col = f"cos_{m}"
        if col in frame:
            ax.hist(frame[col].dropna(), bins=30, color="tab:blue")
        ax.axvline(0, color="red", linestyle="--", linewidth=1)
        ax.set_title(f"{m}: per-sample cos(g_mm, g_uni)", fontsize=9)
    save(fig, "per_sample_cosine.png")

    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot(1, 1, 1)
    for m in summaries:
        col = f"phi_{m}_probability"
        if col in frame:
            ax.hist(frame[col].dropna(), bins=30, alpha=0.6, label=m)
    ax.set_title("per-sample Shapley value (probability-valued)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "shapley.png")

    fig = Figure(figsize=(7, 3 * len(summaries)))
    for i, (m, s) in enumerate(summaries.items()):
        ax = fig.add_subplot(len(summaries), 1, i + 1)
        names = list(s.per_layer)
        values = np.array([s.per_layer[n] for n in names], dtype=float)
        ax.bar(range(len(names)), values, color=["tab:red" if v <= 0 else "tab:blue" for v in values])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.split(".", 1)[-1] for n in names], rotation=90, fontsize=5)
        ax.set_title(f"{m}: mean cosine per layer", fontsize=9)
    save(fig, "per_layer_conflict.png")
    return written
