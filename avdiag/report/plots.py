"""The figures of a report, drawn from the JSON result dicts: PNG images and Unicode text charts.

Every function takes the plain JSON dict of a result (a command's ``to_dict()``, or the same read back
from a ``--json`` file of any 1.x schema), never avdiag objects, so a report can be rebuilt later from
saved files. Values are read through :mod:`avdiag.report.access`, which also turns the nulls of
schema 1.1 and the ``"nan"``/``"inf"`` strings of schema 1.0 into floats.

matplotlib is imported inside the drawing functions, never when avdiag is imported. Figures are
``matplotlib.figure.Figure`` objects drawn on an explicit Agg canvas (``FigureCanvasAgg``): pyplot is
not used, no global backend is switched and nothing is registered with pyplot's figure manager, so a
user's interactive backend is left alone and no figure outlives the call (each is cleared after
saving). Style settings are applied with ``rc_context`` and restored afterwards. Images are small
(7 inches wide, ~3 high per row of panels, 100 dpi: 700 px wide PNGs of 20-60 kB).

PNG functions return ``None`` when the result holds nothing to draw (no BN layers, no per-channel
arrays, no probe). :func:`write_conflict_plots` writes the PNG files of ``avdiag conflict --plots``.
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from avdiag.errors import UsageError
from avdiag.report import access as acc

DPI = 100
WIDTH_IN = 7.0
ROW_HEIGHT_IN = 3.0
NAMED_ROW_HEIGHT_IN = 3.5  # figures with layer names under the x axis
Z_CLIP = 25.0  # finite z beyond +-Z_CLIP is drawn in the edge bins (and counted in the panel's note)

_MODALITY_COLORS = {"audio": "#4c72b0", "visual": "#dd8452"}
_OTHER_COLORS = ("#55a868", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
BEFORE_COLOR, AFTER_COLOR = "#e8a5a7", "#c44e52"  # dead before (light red) / after (red)
PREDICTED_COLOR, MEASURED_COLOR = "#4c72b0", "#dd8452"
THRESHOLD_COLOR = "#c44e52"
_EIGHTHS = " ▏▎▍▌▋▊▉"


def modality_color(name: str, index: int) -> str:
    return _MODALITY_COLORS.get(name.lower(), _OTHER_COLORS[index % len(_OTHER_COLORS)])


def z_buckets(dead_z: float) -> list[tuple[str, float, float]]:
    """The z ranges of the Markdown z table: (label, low, high), low inclusive; dead_z is an edge."""
    edges = sorted({-10.0, float(dead_z), -1.0, 0.0, 1.0, 3.0})
    out = [("-inf", -math.inf, -math.inf), (f"< {edges[0]:g}", -math.inf, edges[0])]
    out += [(f"[{lo:g}, {hi:g})", lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    out += [(f">= {edges[-1]:g}", edges[-1], math.inf), ("+inf", math.inf, math.inf), ("nan", math.nan, math.nan)]
    return out


def z_bucket_counts(values: np.ndarray, dead_z: float) -> list[int]:
    """How many of ``values`` fall in each range of ``z_buckets(dead_z)``."""
    finite = values[np.isfinite(values)]
    counts = []
    for label, lo, hi in z_buckets(dead_z):
        if label == "nan":
            counts.append(int(np.count_nonzero(np.isnan(values))))
        elif lo == hi:  # an infinity
            counts.append(int(np.count_nonzero(values == lo)))
        else:
            counts.append(int(np.count_nonzero((finite >= lo) & (finite < hi))))
    return counts


# ---- drawing -----------------------------------------------------------------------------------


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    rc = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
          "legend.fontsize": 7, "legend.frameon": True, "legend.framealpha": 0.85,
          "legend.edgecolor": "#cccccc", "legend.fancybox": False, "axes.spines.top": False, "axes.spines.right": False,
          "axes.grid": True, "axes.grid.axis": "y", "grid.color": "#e3e3e3", "grid.linewidth": 0.6,
          "axes.axisbelow": True, "figure.dpi": DPI, "savefig.dpi": DPI, "figure.facecolor": "white",
          "axes.facecolor": "white", "savefig.facecolor": "white", "text.color": "#222222",
          "axes.labelcolor": "#222222", "xtick.color": "#333333", "ytick.color": "#333333",
          "axes.edgecolor": "#555555", "hatch.linewidth": 0.6}
    with matplotlib.rc_context(rc):
        yield


def _figure(n_panels: int, row_height: float = ROW_HEIGHT_IN, sharey: bool = False):
    """A figure with one axes per panel (two per row when there are several), and the axes list."""
    from matplotlib.figure import Figure

    ncols = 1 if n_panels <= 1 else 2
    nrows = max(1, math.ceil(n_panels / ncols))
    height = row_height if nrows == 1 else 0.85 * row_height * nrows
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, axes[:n_panels], ncols


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


def _layer_ticks(ax, names: list[str], ncols: int) -> None:
    n = len(names)
    if n <= 56 // ncols:
        labels = [name if len(name) <= 22 else "…" + name[-21:] for name in names]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7 if n <= 16 else 6 if n <= 28 else 5)
        ax.tick_params(axis="x", length=2, pad=1)
    else:
        step = max(1, math.ceil(n / 14))
        ax.set_xticks(range(0, n, step))
        ax.set_xlabel("BN layer (network order, index)")
    ax.set_xlim(-0.7, n - 0.3)


def _count_panel(ax, i: int, ncols: int, names: list[str], ylabel: str, legend_loc: str) -> None:
    """Layer ticks, integer y axis, the y label on the first column and the legend on the first panel."""
    _layer_ticks(ax, names, ncols)
    if i % ncols == 0:
        ax.set_ylabel(ylabel)
    ax.yaxis.get_major_locator().set_params(integer=True)
    if i == 0:
        ax.legend(loc=legend_loc)


def _note(ax, text: str) -> None:
    ax.text(0.99, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=7, color="#444444",
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9})


def dead_ratio_by_layer(result: dict) -> bytes | None:
    """Dead-channel ratio per BN layer, one panel per modality (x: layer in network order), as in the
    ABRi paper's Figure 2a. Channels that would be dead if an activation followed (``possibly dead``)
    are stacked on top, hatched."""
    from matplotlib.ticker import PercentFormatter

    rows = acc.dead_ratio_rows(result)
    if not rows:
        return None
    with _style():
        fig, axes, ncols = _figure(len(rows), NAMED_ROW_HEIGHT_IN, sharey=True)
        top = 0.0
        for i, (ax, (m, layers)) in enumerate(zip(axes, rows.items())):
            channels = np.array([c for _, c, _, _ in layers], dtype=np.float64)
            dead = np.array([d for _, _, d, _ in layers], dtype=np.float64)
            possibly = np.array([p for _, _, _, p in layers], dtype=np.float64)
            safe = np.where(channels > 0, channels, 1.0)
            ratio, pratio = dead / safe, possibly / safe
            x = np.arange(len(layers))
            color = modality_color(m, i)
            ax.bar(x, ratio, width=0.8, color=color, label="dead")
            if possibly.any():
                ax.bar(x, pratio, bottom=ratio, width=0.8, color=color, alpha=0.35, hatch="///",
                       label="possibly dead")
                ax.legend(loc="upper left")
            top = max(top, float((ratio + pratio).max(initial=0.0)))
            total = channels.sum()
            share = dead.sum() / total if total else 0.0
            ax.set_title(f"{m}: {int(dead.sum())}/{int(total)} dead ({100 * share:.1f}%)")
            _layer_ticks(ax, [name for name, _, _, _ in layers], ncols)
            if i % ncols == 0:
                ax.set_ylabel("dead ratio")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        axes[0].set_ylim(0, max(0.05, top * 1.15))
        return _png(fig)


def z_histogram(result: dict) -> bytes | None:
    """Histogram of the static z = beta / s per modality (log counts), channels of layers that feed
    a zeroing activation stacked under the others, the dead threshold ``dead_z`` marked. Needs the
    per-channel arrays (``inspect --per-channel``); ``None`` without them."""
    values = acc.per_channel_values(result, "z")
    if not values:
        return None
    dead_z = acc.dead_threshold(result)
    with _style():
        fig, axes, ncols = _figure(len(values))
        for i, (ax, (m, (feeding, other))) in enumerate(zip(axes, values.items())):
            both = np.concatenate([feeding, other])
            finite = both[np.isfinite(both)]
            lo = min(float(finite.min()) if finite.size else dead_z, dead_z - 1.0)
            hi = max(float(finite.max()) if finite.size else 1.0, 1.0)
            lo, hi = max(lo, -Z_CLIP), min(hi, Z_CLIP)
            pad = 0.02 * (hi - lo)
            bins = np.linspace(lo - pad, hi + pad, 49)
            clipped = int(np.count_nonzero((finite < lo) | (finite > hi)))

            def shown(v: np.ndarray) -> np.ndarray:
                return np.clip(v[np.isfinite(v)], lo, hi)

            color = modality_color(m, i)
            data, labels, colors = [], [], []
            for part, label, alpha in ((feeding, "feeds ReLU-like act.", 1.0), (other, "other layers", 0.4)):
                if part.size:
                    data.append(shown(part))
                    labels.append(label)
                    colors.append(_with_alpha(color, alpha))
            if sum(d.size for d in data):
                ax.hist(data, bins=bins, stacked=True, color=colors, label=labels)
                ax.set_yscale("log")
                ax.set_ylim(bottom=0.7)
            else:
                ax.text(0.5, 0.5, "no finite z", transform=ax.transAxes, ha="center", va="center")
            ax.axvline(dead_z, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.0, label=f"dead_z = {dead_z:g}")
            below = int(np.count_nonzero(feeding < dead_z))
            ax.set_title(f"{m}: {below} of {both.size} channels below dead_z")
            ax.set_xlabel("z = beta / s")
            if i % ncols == 0:
                ax.set_ylabel("channels (log)")
            notes = []
            n_neg, n_pos = int(np.count_nonzero(both == -math.inf)), int(np.count_nonzero(both == math.inf))
            n_nan = int(np.count_nonzero(np.isnan(both)))
            if n_neg or n_pos:
                notes.append(f"not drawn: {n_neg} at -inf, {n_pos} at +inf (s = 0)")
            if n_nan:
                notes.append(f"not drawn: {n_nan} NaN")
            if clipped:
                notes.append(f"{clipped} beyond ±{Z_CLIP:g} drawn at the edge")
            if notes:
                _note(ax, "\n".join(notes))
            ax.legend(loc="upper left")
        return _png(fig)


def _with_alpha(color: str, alpha: float) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    return to_rgba(color, alpha)


def fire_rate_histogram(result: dict) -> bytes | None:
    """Histogram of the measured firing rate per channel (``inspect --data``), one panel per modality:
    channels that fire at no more than ``dead_rate`` get their own red bar on the left; the rest are
    binned over (dead_rate, 1], ``rare_rate`` marked."""
    values = acc.per_channel_values(result, "fire_rate", measured=True)
    if not values:
        return None
    dead_rate, rare_rate = acc.probe_thresholds(result)
    with _style():
        fig, axes, ncols = _figure(len(values))
        for i, (ax, (m, (feeding, other))) in enumerate(zip(axes, values.items())):
            feeding, other = feeding[np.isfinite(feeding)], other[np.isfinite(other)]
            color = modality_color(m, i)
            bins = np.linspace(0.0, 1.0, 41)
            data, labels, colors = [], [], []
            for part, label, alpha in ((feeding, "feeds ReLU-like act.", 1.0), (other, "other layers", 0.4)):
                if part.size:
                    data.append(part[part > dead_rate])
                    labels.append(label)
                    colors.append(_with_alpha(color, alpha))
            if sum(d.size for d in data):
                ax.hist(data, bins=bins, stacked=True, color=colors, label=labels)
            n_dead_feeding = int(np.count_nonzero(feeding <= dead_rate))
            n_dead_other = int(np.count_nonzero(other <= dead_rate))
            if n_dead_feeding:
                ax.bar([-0.045], [n_dead_feeding], width=0.04, color=THRESHOLD_COLOR, label=f"fires <= {dead_rate:g}")
            if n_dead_other:
                ax.bar([-0.045], [n_dead_other], bottom=[n_dead_feeding], width=0.04,
                       color=_with_alpha(THRESHOLD_COLOR, 0.4))
            ax.axvline(rare_rate, color="#555555", linestyle=":", linewidth=1.0, label=f"rare_rate = {rare_rate:g}")
            if feeding.size + other.size:
                ax.set_yscale("log")
                ax.set_ylim(bottom=0.7)
            ax.set_xlim(-0.075, 1.01)
            ax.set_xticks([-0.045, 0.25, 0.5, 0.75, 1.0], [f"≤{dead_rate:g}", "0.25", "0.5", "0.75", "1"])
            n_rare = int(np.count_nonzero((feeding > dead_rate) & (feeding <= rare_rate)))
            ax.set_title(f"{m}: {n_dead_feeding} never fire, {n_rare} rarely")
            ax.set_xlabel("fraction of positions where the BN output fires")
            if i % ncols == 0:
                ax.set_ylabel("channels (log)")
            ax.legend(loc="upper center")
        return _png(fig)


def measured_vs_predicted(result: dict) -> bytes | None:
    """Dead channels per BN layer, static prediction next to the measurement on data, one panel per
    modality (layers the probe measured only)."""
    prefixes = acc.modality_prefixes(result)
    groups = {m: [layer for layer in layers if isinstance(layer.get("measured_dead_channels"), list)]
              for m, layers in acc.group_layers(result).items()}
    groups = {m: g for m, g in groups.items() if g}
    if not groups:
        return None
    with _style():
        fig, axes, ncols = _figure(len(groups), NAMED_ROW_HEIGHT_IN, sharey=True)
        for i, (ax, (m, layers)) in enumerate(zip(axes, groups.items())):
            x = np.arange(len(layers))
            predicted = np.array([acc.count(layer.get("dead_channels")) for layer in layers])
            measured = np.array([acc.count(layer.get("measured_dead_channels")) for layer in layers])
            ax.bar(x - 0.2, predicted, width=0.4, color=PREDICTED_COLOR, label="predicted (static)")
            ax.bar(x + 0.2, measured, width=0.4, color=MEASURED_COLOR, label="measured on data")
            agree = acc.agreement(result, m)
            scores = ""
            if agree:
                p, r = acc.num(agree.get("precision")), acc.num(agree.get("recall"))
                scores = f" (P {_two(p)}, R {_two(r)})"
            ax.set_title(f"{m}: predicted {int(predicted.sum())}, measured {int(measured.sum())}{scores}")
            _count_panel(ax, i, ncols, [acc.short_name(layer.get("name"), prefixes.get(m)) for layer in layers],
                         "dead channels", "upper left")
        return _png(fig)


def _two(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.2f}"


def dead_before_after(labels: list[str], before: list[int], after: list[int], title: str) -> bytes | None:
    """Dead channels per group (modality) before and after a rewrite, side by side, counts on top."""
    if not labels:
        return None
    with _style():
        fig, ax = _single_axes()
        x = np.arange(len(labels))
        width = 0.35 if len(labels) > 1 else 0.25
        bars_b = ax.bar(x - width / 2, before, width=width, color=BEFORE_COLOR, label="before")
        bars_a = ax.bar(x + width / 2, after, width=width, color=AFTER_COLOR, label="after")
        ax.bar_label(bars_b, fontsize=7, padding=1)
        ax.bar_label(bars_a, fontsize=7, padding=1)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("dead BN channels")
        ax.set_ylim(0, max(1, max(before, default=0), max(after, default=0)) * 1.2)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        ax.legend(loc="upper right")
        return _png(fig)


def diff_layers(result: dict) -> bytes | None:
    """Per BN layer of a diff (network order), dead channels in A and in B, and how many channels were
    changed (x markers), one panel per modality."""
    prefixes = acc.modality_prefixes(result)
    groups = acc.group_layers(result, "bn_layers")
    if not groups:
        return None
    with _style():
        fig, axes, ncols = _figure(len(groups), NAMED_ROW_HEIGHT_IN, sharey=True)
        for i, (ax, (m, layers)) in enumerate(zip(axes, groups.items())):
            x = np.arange(len(layers))
            before = np.array([acc.integer(layer.get("n_dead_before")) for layer in layers])
            after = np.array([acc.integer(layer.get("n_dead_after")) for layer in layers])
            changed = np.array([acc.integer(layer.get("n_channels_changed")) for layer in layers])
            died = sum(acc.count(layer.get("died")) for layer in layers)
            revived = sum(acc.count(layer.get("revived")) for layer in layers)
            ax.bar(x - 0.2, before, width=0.4, color=BEFORE_COLOR, label="dead in A")
            ax.bar(x + 0.2, after, width=0.4, color=AFTER_COLOR, label="dead in B")
            hit = changed > 0
            if hit.any():
                ax.plot(x[hit], changed[hit], linestyle="none", marker="x", markersize=4, color="#222222",
                        label="channels changed")
            ax.set_title(f"{m}: dead {int(before.sum())} → {int(after.sum())}, {died} died, {revived} revived")
            _count_panel(ax, i, ncols, [acc.short_name(layer.get("name"), prefixes.get(m)) for layer in layers],
                         "channels", "upper right")
        axes[0].set_ylim(bottom=0)
        return _png(fig)


# ---- Unicode text charts (Markdown) ------------------------------------------------------------


def unicode_bar(value: float, full: float, width: int = 20) -> str:
    """A bar of ``width`` cells for ``value`` out of ``full`` in eighth blocks (nonzero values are
    always visible), padded with spaces to ``width``."""
    if not full or not math.isfinite(value) or value <= 0:
        return " " * width
    cells = min(1.0, value / full) * width
    whole = int(cells)
    eighths = int(round((cells - whole) * 8))
    if eighths == 8:
        whole, eighths = whole + 1, 0
    bar = "█" * whole + (_EIGHTHS[eighths] if eighths else "")
    return (bar or "▏").ljust(width)


def dead_ratio_text(result: dict, max_layers: int = 24) -> str:
    """The dead-ratio-per-layer chart as Unicode bars, one block per modality."""
    rows = acc.dead_ratio_rows(result)
    ratios = [d / c for layers in rows.values() for _, c, d, _ in layers if c]
    full = max(ratios, default=0.0)
    lines = [f"dead channels per BN layer, network order (full bar = {100 * full:.1f}%)" if full
             else "dead channels per BN layer, network order (none dead)"]
    for m, layers in rows.items():
        dead, total = sum(d for _, _, d, _ in layers), sum(c for _, c, _, _ in layers)
        lines.append(f"{m}: {dead}/{total} dead")
        shown = layers if len(layers) <= max_layers else [row for row in layers if row[2] or row[3]]
        width = min(32, max((len(name) for name, _, _, _ in shown), default=4))
        for name, c, d, p in shown:
            label = name if len(name) <= width else "…" + name[-(width - 1):]
            extra = f"  (+{p} possibly)" if p else ""
            lines.append(f"  {label:<{width}} {unicode_bar(d / c if c else 0.0, full)} {d:>4}/{c:<5} "
                         f"{100 * d / c if c else 0.0:5.1f}%{extra}")
        if len(shown) < len(layers):
            lines.append(f"  ({len(layers) - len(shown)} layers without dead channels not listed)")
    return "\n".join(lines)


def before_after_text(labels: list[str], before: list[int], after: list[int]) -> str:
    """Dead channels per group before -> after as Unicode bars."""
    full = max([*before, *after, 0])
    width = max((len(label) for label in labels), default=4)
    lines = [f"dead BN channels before -> after (full bar = {full})"]
    for label, b, a in zip(labels, before, after):
        lines.append(f"  {label:<{width}} before {unicode_bar(b, full, 16)} {b:>5}")
        lines.append(f"  {'':<{width}} after  {unicode_bar(a, full, 16)} {a:>5}")
    return "\n".join(lines)


def diff_layers_text(result: dict) -> str:
    """Per changed BN layer of a diff: dead in A -> dead in B as Unicode bars."""
    prefixes = acc.modality_prefixes(result)
    groups = acc.group_layers(result, "bn_layers")
    rows = []
    for m, layers in groups.items():
        for layer in layers:
            b = acc.integer(layer.get("n_dead_before"))
            a = acc.integer(layer.get("n_dead_after"))
            if layer.get("status") != "unchanged" or b or a:
                rows.append((m, acc.short_name(layer.get("name"), prefixes.get(m)), b, a,
                             acc.count(layer.get("died")), acc.count(layer.get("revived"))))
    if not rows:
        return "no BN layer changed, and none has dead channels"
    full = max(max(b, a) for _, _, b, a, _, _ in rows) or 1
    width = min(32, max(len(name) for _, name, _, _, _, _ in rows))
    lines = [f"dead channels per BN layer, A -> B (changed layers and layers with dead channels; full bar = {full})"]
    current = None
    for m, name, b, a, died, revived in rows:
        if m != current:
            lines.append(f"{m}:")
            current = m
        label = name if len(name) <= width else "…" + name[-(width - 1):]
        lines.append(f"  {label:<{width}} A {unicode_bar(b, full, 10)} {b:>3} -> B {unicode_bar(a, full, 10)} "
                     f"{a:>3}  (died {died}, revived {revived})")
    return "\n".join(lines)


def conflict_per_layer(result: dict) -> bytes | None:
    """`avdiag conflict`: mean cosine of the multimodal and uni-modal gradients per layer, one panel
    per modality; bars at or below 0 (conflict) in red, layers without a finite cosine left empty."""
    groups = acc.conflict_per_layer(result)
    if not groups:
        return None
    with _style():
        fig, axes, ncols = _figure(len(groups), NAMED_ROW_HEIGHT_IN, sharey=True)
        for ax, (m, layers) in zip(axes, groups.items()):
            names = list(layers)
            values = np.nan_to_num(np.array([layers[n] for n in names]), nan=0.0, posinf=0.0, neginf=0.0)
            ax.bar(np.arange(len(names)), values, color=["#c44e52" if v <= 0 else "#4c72b0" for v in values])
            ax.axhline(0, color="#333333", linewidth=0.8)
            _layer_ticks(ax, [acc.short_name(n, f"{m}_net.") for n in names], ncols)
            ax.set_ylim(min(-0.05, float(values.min(initial=0.0)) * 1.1), 1.05)
            ax.set_title(f"{m}: cos(g_multimodal, g_unimodal) per layer")
        return _png(fig)


def contribution_bars(result: dict) -> bytes | None:
    """`avdiag conflict`: Shapley value (accuracy- and probability-valued) and uni-modal accuracy per
    modality, side by side (a value that is not finite: no bar, labelled n/a)."""
    labels, series = acc.contribution_series(result)
    if not labels:
        return None
    with _style():
        fig, ax = _single_axes()
        x = np.arange(len(labels))
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            shown = [v if math.isfinite(v) else 0.0 for v in values]
            bars = ax.bar(x + (i - 1) * width, shown, width=width, label=name)
            ax.bar_label(bars, labels=[f"{v:.2f}" if math.isfinite(v) else "n/a" for v in values], fontsize=7,
                         padding=1)
        ax.set_xticks(x, labels)
        ax.set_title("contribution per modality")
        ax.legend(loc="upper right")
        return _png(fig)


def check_shares(result: dict) -> bytes | None:
    """`avdiag check --data`: the contribution share of each modality, one group of bars per
    checkpoint, with the policy's ``min_share`` as a dashed line."""
    paths, shares = acc.check_shares(result)
    if not paths:
        return None
    limit = acc.check_min_share(result)
    with _style():
        fig, ax = _single_axes()
        x = np.arange(len(paths))
        width = 0.8 / max(1, len(shares))
        for i, (m, values) in enumerate(shares.items()):
            bars = ax.bar(x + (i - (len(shares) - 1) / 2) * width, [v if v is not None else 0.0 for v in values],
                          width=width, label=m, color=modality_color(m, i))
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=7, padding=1)
        if limit is not None:
            ax.axhline(limit, color="#c44e52", linestyle="--", linewidth=1, label=f"min_share {limit:g}")
        ax.axhline(0, color="#333333", linewidth=0.8)
        ax.set_ylim(top=1.3)  # room for the legend above the bars (shares are at most 1 unless one modality hurts)
        names = [p.rsplit("/", 1)[-1] for p in paths]
        ax.set_xticks(x, names if len(set(names)) == len(names) else paths, rotation=15 if len(paths) > 3 else 0,
                      ha="right" if len(paths) > 3 else "center")
        ax.set_title("contribution share per checkpoint")
        ax.legend(loc="upper center", ncol=len(shares) + 1)
        return _png(fig)


def _single_axes():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, 0.85 * ROW_HEIGHT_IN), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


# ---- avdiag conflict --plots ---------------------------------------------------------------------


def sample_cosine_histogram(result: dict) -> bytes | None:
    """`avdiag conflict`: histogram of the per-sample cosine of the multimodal and uni-modal
    gradients, one panel per modality, 0 (the conflict boundary) dashed."""
    cosines = acc.sample_cosines(result)
    if not cosines:
        return None
    with _style():
        fig, axes, ncols = _figure(len(cosines))
        for i, (ax, (m, values)) in enumerate(zip(axes, cosines.items())):
            shown = values[np.isfinite(values)]
            if shown.size:
                ax.hist(shown, bins=np.linspace(-1.0, 1.0, 41), color=modality_color(m, i))
            ax.axvline(0, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.0)
            ax.set_xlim(-1.02, 1.02)
            conflicting = int(np.count_nonzero(shown <= 0))
            ax.set_title(f"{m}: {conflicting} of {shown.size} samples conflict (cos <= 0)")
            ax.set_xlabel("per-sample cos(g_multimodal, g_unimodal)")
            if i % ncols == 0:
                ax.set_ylabel("samples")
        return _png(fig)


def sample_shapley_histogram(result: dict) -> bytes | None:
    """`avdiag conflict`: histogram of the per-sample (probability-valued) Shapley value of each
    modality, overlaid. Needs the per-sample table in the document."""
    values = acc.sample_shapley(result)
    if not values:
        return None
    with _style():
        fig, ax = _single_axes()
        for i, (m, phi) in enumerate(values.items()):
            shown = phi[np.isfinite(phi)]
            if shown.size:
                ax.hist(shown, bins=30, alpha=0.6, label=m, color=modality_color(m, i))
        ax.set_title("per-sample Shapley value (probability-valued)")
        ax.set_xlabel("Shapley value")
        ax.set_ylabel("samples")
        ax.legend(loc="upper right")
        return _png(fig)


CONFLICT_PLOTS = {"per_sample_cosine.png": sample_cosine_histogram, "shapley.png": sample_shapley_histogram,
                  "per_layer_conflict.png": conflict_per_layer}


def write_conflict_plots(doc: dict, directory: Path) -> list[Path]:
    """Write the PNGs of `avdiag conflict --plots DIR` from a conflict result's dict: per-sample
    cosines, per-sample Shapley values and per-layer conflict, one file each. A figure whose data the
    document lacks is not written (per-sample values need ``per_sample``; the Shapley histogram needs
    the per-sample table, ``to_dict(samples=True)``). Returns the files written, in that order."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--plots {directory}: cannot create the folder ({e.strerror or e})") from e
    written = []
    for name, draw in CONFLICT_PLOTS.items():
        png = draw(doc)
        if png is None:
            continue
        target = directory / name
        try:
            target.write_bytes(png)
        except OSError as e:
            raise UsageError(f"--plots {target}: cannot write ({e.strerror or e})") from e
        written.append(target)
    return written
