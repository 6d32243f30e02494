"""The report section of a training run log (`avdiag report RUN.jsonl`, written by :mod:`avdiag.monitor`):
the timelines of rho and the OGM-GE coefficients and of the MMPareto cosine over steps, and of dead
channels, held-out accuracies, Shapley values and the learning-state gap over epochs."""

from __future__ import annotations

import math

import numpy as np

from avdiag.measure.runlog import RUNLOG_COMMAND, RunLog, dig
from avdiag.report import plots
from avdiag.report.blocks import Block, Chart, Section, Table, Text, section_builder
from avdiag.report.cells import fmt_num

MODALITIES = ("audio", "visual")
TEXT_ROWS = 20  # a step timeline in Markdown text: at most this many evenly spaced rows


def run_of(res: dict) -> RunLog:
    return RunLog(str(res.get("run_log", "run log")), dict(res.get("header") or {}), list(res.get("steps") or []),
                  list(res.get("epochs") or []), bool(dig(res, "summary", "truncated")))


@section_builder(RUNLOG_COMMAND)
def monitor_section(res: dict, anchor: str) -> Section:
    run = run_of(res)
    config = run.config
    section = Section(anchor, RUNLOG_COMMAND, f"training run: {run.path}")
    section.add(Text(run.summary_text(), "summary"), _config_table(run))
    if run.truncated:
        section.add(Text("The log's last line was incomplete (the run was killed while writing): it is left out.",
                         "warning"))
    section.add(
        Chart("rho", "OGM-GE rho and coefficients over steps",
              f"rho_m = s_m / s_other from the training batches' uni-modal logits (alpha {config.get('ogm_alpha')}); "
              "k_m = 1 - tanh(alpha * rho_m) for the leading modality, 1 for the other.",
              lambda: _step_png(run, [("ogm", "rho"), ("ogm", "coefficients")], ["rho", "coefficient"],
                                log_y=(True, False)),
              lambda: _step_text(run, [("ogm", "rho"), ("ogm", "coefficients")], ["rho", "k"])),
        Chart("cosine", "MMPareto cosine per modality over steps",
              "cos(g_multimodal, g_unimodal) over each encoder's parameters on the training batch (<= 0: conflict).",
              lambda: _step_png(run, [("conflict",)], ["cosine"], key="cos", zero_line=True),
              lambda: _step_text(run, [("conflict",)], ["cos"], key="cos")))
    if any("dead_channels" in e for e in run.epochs):
        section.add(Chart("dead-channels", "Dead BatchNorm channels per modality over epochs",
                          "Static scan of the live weights (z = beta / s below the dead threshold), at the start "
                          "and after each epoch.", lambda: _dead_png(run), lambda: [_dead_table(run)]))
    if any("heldout" in e for e in run.epochs):
        section.add(Chart("heldout", "Held-out accuracy and Shapley values over epochs",
                          "Fused and uni-modal accuracy, and the mean exact Shapley value (accuracy-valued, pooled "
                          "feature zeroed) of each modality.", lambda: _heldout_png(run),
                          lambda: [_heldout_table(run)]))
    if any("learning_state" in e for e in run.epochs):
        section.add(_learning_table(run))
    return section


def _config_table(run: RunLog) -> Table:
    config, model = run.config, run.header.get("model") or {}
    rows = [["model", str(model.get("class", "?"))], ["uni-modal logits", str(model.get("unimodal_source", "?"))],
            ["modulation", str(config.get("modulation") or "off")],
            ["cosine every", f"{config.get('cosine_every')} steps" if config.get("cosine_every") else "off"],
            ["logged steps / epochs", f"{len(run.steps)} / {len(run.epochs)}"]]
    return Table("Run", ["field", "value"], rows, "ll", collapsed=False)


# ---- step timelines -----------------------------------------------------------------------------


def _modality_series(run: RunLog, keys: tuple[str, ...], m: str, key: str | None):
    return run.step_series(*keys, m, *((key,) if key else ()))


def _step_png(run: RunLog, groups: list[tuple[str, ...]], ylabels: list[str], key: str | None = None,
              log_y: tuple[bool, ...] = (), zero_line: bool = False) -> bytes | None:
    series = [[_modality_series(run, keys, m, key) for m in MODALITIES] for keys in groups]
    if not any(xs for group in series for xs, _ in group):
        return None
    with plots._style():
        fig, axes, _ = plots._figure(len(groups))
        for i, (ax, group, ylabel) in enumerate(zip(axes, series, ylabels)):
            for j, (m, (xs, ys)) in enumerate(zip(MODALITIES, group)):
                ys = np.array(ys, dtype=float)
                ys[~np.isfinite(ys)] = np.nan
                ax.plot(xs, ys, label=m, color=plots.modality_color(m, j), linewidth=1.0,
                        marker="o" if len(xs) < 40 else None, markersize=2.5)
            if i < len(log_y) and log_y[i]:
                _log_scale(ax)
                ax.axhline(1.0, color="#333333", linewidth=0.8, linestyle=":")
            if zero_line:
                ax.axhline(0.0, color=plots.THRESHOLD_COLOR, linewidth=0.8, linestyle="--")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.legend(loc="best")
        return plots._png(fig)


def _log_scale(ax) -> None:
    """A log axis with plain numbers (1.5, 2) rather than powers of ten."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _step_text(run: RunLog, groups: list[tuple[str, ...]], names: list[str], key: str | None = None) -> list[Block]:
    columns = {f"{name} {m}": dict(zip(*_modality_series(run, keys, m, key)))
               for keys, name in zip(groups, names) for m in MODALITIES}
    steps = sorted({s for col in columns.values() for s in col})
    if not steps:
        return [Text("nothing logged", "note")]
    shown = [steps[int(i)] for i in np.unique(np.linspace(0, len(steps) - 1, min(TEXT_ROWS, len(steps))).round())]
    rows = [[str(s), *(fmt_num(col.get(s)) for col in columns.values())] for s in shown]
    return [Table(f"{len(shown)} of {len(steps)} logged steps", ["step", *columns], rows, "r" * (1 + len(columns)),
                  collapsed=False)]


# ---- epoch timelines ----------------------------------------------------------------------------


def _dead_points(run: RunLog) -> tuple[list[str], dict[str, list[float]]]:
    labels, counts = [], {m: [] for m in MODALITIES}
    initial = dig(run.header, "initial", "dead_channels")
    points = ([("start", initial)] if initial else []) + [(f"epoch {e['epoch']}", e.get("dead_channels"))
                                                          for e in run.epochs if "dead_channels" in e]
    for label, entry in points:
        labels.append(label)
        for m in MODALITIES:
            counts[m].append(_number(dig(entry, m, "dead")))
    return labels, counts


def _dead_png(run: RunLog) -> bytes | None:
    labels, counts = _dead_points(run)
    if not labels:
        return None
    with plots._style():
        fig, axes, _ = plots._figure(1)
        ax = axes[0]
        for j, m in enumerate(MODALITIES):
            ax.plot(range(len(labels)), counts[m], marker="o", markersize=3, label=m, color=plots.modality_color(m, j))
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 8 else 0)
        ax.set_ylabel("dead channels")
        ax.legend(loc="best")
        return plots._png(fig)


def _dead_table(run: RunLog) -> Table:
    labels, counts = _dead_points(run)
    rows = [[label, *(fmt_num(counts[m][i]) for m in MODALITIES)] for i, label in enumerate(labels)]
    return Table("Dead channels", ["when", *MODALITIES], rows, "lrr", collapsed=False)


HELDOUT_COLUMNS = [("fused accuracy", ("heldout", "fused_accuracy")),
                   *((f"{m} accuracy", ("heldout", "unimodal_accuracy", m)) for m in MODALITIES),
                   *((f"Shapley {m}", ("heldout", "shapley_accuracy", m)) for m in MODALITIES)]


def _heldout_png(run: RunLog) -> bytes | None:
    with plots._style():
        fig, axes, _ = plots._figure(2)
        for ax, selected, ylabel in ((axes[0], HELDOUT_COLUMNS[:3], "accuracy"), (axes[1], HELDOUT_COLUMNS[3:],
                                                                                  "mean Shapley value")):
            for j, (name, keys) in enumerate(selected):
                xs, ys = run.epoch_series(*keys)
                color = plots.modality_color(keys[-1], j) if keys[-1] in MODALITIES else "#55a868"
                ax.plot(xs, ys, marker="o", markersize=3, label=name, color=color)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.legend(loc="best")
        return plots._png(fig)


def _heldout_table(run: RunLog) -> Table:
    rows = [[str(e["epoch"]), *(fmt_num(dig(e, *keys)) for _, keys in HELDOUT_COLUMNS)]
            for e in run.epochs if "heldout" in e]
    return Table("Held-out", ["epoch", *(name for name, _ in HELDOUT_COLUMNS)], rows, "rrrrrr", collapsed=False)


def _learning_table(run: RunLog) -> Table:
    rows = [[str(e["epoch"]), *(fmt_num(dig(e, "learning_state", m, key)) for m in MODALITIES
                                for key in ("purity_train", "purity_heldout", "gap"))]
            for e in run.epochs if "learning_state" in e]
    headers = ["epoch", *(f"{m} {k}" for m in MODALITIES for k in ("purity train", "purity held-out", "gap"))]
    return Table("Learning state (D&R purity gap)", headers, rows, "r" * len(headers), collapsed=False)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
