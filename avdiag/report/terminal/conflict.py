"""Terminal rendering of `avdiag conflict`: per-modality conflict and contribution, OGM-GE, the worst samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from avdiag.report.terminal.inspect import skipped_note, synthetic_note

if TYPE_CHECKING:
    from avdiag.workflows.conflict import ConflictResult


def render_conflict(result: "ConflictResult", console: Console, quiet: bool = False) -> None:
    if quiet:
        console.print(escape(result.summary_line()), highlight=False, soft_wrap=True)  # one line, for grep and logs
        return
    console.print(escape(f"{result.checkpoint.path}: {result.model} on {result.data} ({result.device}, "
                         f"{result.world_size} process(es)); uni-modal logits from "
                         f"{result.contribution.unimodal_source}" + synthetic_note(result.data)), highlight=False)
    note = skipped_note(result.data_report)
    if note:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
    console.print(_conflict_table(result))
    console.print(_contribution_table(result))
    ogm = result.contribution.ogm
    console.print(escape(f"OGM-GE (alpha {ogm.alpha:g}): rho {_fmt(ogm.rho)}, coefficients {_fmt(ogm.coefficients)}; "
                         f"OPM drop probability {_fmt(result.contribution.opm.drop_probability)}; fused accuracy "
                         f"{result.contribution.fused_accuracy:.3f}"), highlight=False)
    for m, s in result.conflict.summaries.items():
        worst = ", ".join(_sample(result, r["index"], r["cos"]) for r in s.most_conflicting[:5])
        if worst:
            console.print(escape(f"{m}: most conflicting samples {worst}"), highlight=False)
    for step in next_steps(result):
        console.print(f"next: {escape(step)}", highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def _sample(result: "ConflictResult", index: int, cos: float) -> str:
    """A most-conflicting sample by its clip name when the data names its items: ``vidA_0 (#3, -0.52)``."""
    clip = result.clip(index)
    return f"{clip} (#{index}, {cos:+.2f})" if clip else f"#{index} ({cos:+.2f})"


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, (int, float)))


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """Short headers, numbers never truncated: both tables fit 80 columns."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col == "modality" else "right", no_wrap=True, overflow="fold")
    return table


def _conflict_table(result: "ConflictResult") -> Table:
    table = _table("gradient conflict (MMPareto)", ("modality", "cos mean", "cos std", "conflict", "|g_uni|/|g_mm|",
                                                     "per sample"))
    for m, s in result.conflict.summaries.items():
        table.add_row(m, _signed(s.cos_mean), f"{s.cos_std:.4f}", f"{s.conflict_rate:.0%}",
                      f"{s.magnitude_ratio_mean:.3f}", f"{s.sample_conflict_rate:.0%}")
    return table


def _contribution_table(result: "ConflictResult") -> Table:
    table = _table("contribution", ("modality", "Shapley acc", "Shapley prob", "uni-modal acc", "OGM score"))
    for m in result.conflict.summaries:
        c = result.contribution.modalities.get(m)
        if c is None:
            table.add_row(m, "-", "-", "-", "-")
            continue
        table.add_row(m, f"{c.shapley_mean_accuracy:.3f}", f"{c.shapley_mean_probability:.3f}",
                      f"{c.unimodal_accuracy:.3f}", f"{c.ogm_score:.2f}")
    return table


def _signed(value: float) -> str:
    text = f"{value:+.4f}"
    return "+0.0000" if text == "-0.0000" else text


DOMINANCE_RHO = 1.5  # below this the OGM-GE score ratio is too close to 1 to call for a remedy


def next_steps(result: "ConflictResult") -> list[str]:
    """What the numbers mean and the remedies the methods offer, when one modality dominates or conflicts."""
    ogm = result.contribution.ogm
    steps = []
    rho = ogm.rho.get(ogm.dominant) if ogm.dominant else None
    if rho is not None and rho >= DOMINANCE_RHO:
        weak = next((m for m in ogm.rho if m != ogm.dominant), None)
        ratio = f" (rho {rho:.2f}: its OGM-GE score over {weak}'s)" if weak else ""
        steps.append(f"{ogm.dominant} dominates{ratio}; remedies: OGM-GE gradient modulation in training (alpha "
                     f"{ogm.alpha:g} here), or re-learning the under-learned encoder: avdiag reinit "
                     f"{result.checkpoint.path} --method relearn --data SPEC --out relearned.pt")
    conflicting = [m for m, s in result.conflict.summaries.items() if s.conflict_rate > 0]
    for m in conflicting:
        s = result.conflict.summaries[m]
        steps.append(f"{m}: the multimodal and uni-modal gradients conflict (cosine <= 0) on {s.conflict_rate:.0%} of "
                     "batches; MMPareto's gradient combination (weights in the JSON, conflict.mmpareto) is the remedy")
    return steps
