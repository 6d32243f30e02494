"""Terminal rendering of a diff: per-modality summary, changed BN layers, the most-changed tensors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from avdiag.measure.compare import BNLayerDiff, TensorChange

if TYPE_CHECKING:
    from avdiag.workflows.diff import DiffResult

TOP_TENSORS = 20
_PREVIEW = 8


def render_diff(result: DiffResult, console: Console, quiet: bool = False, top: int = TOP_TENSORS) -> None:
    """Print ``result``; with ``quiet`` only its summary line."""
    if quiet:
        console.print(escape(result.summary_line()), highlight=False)
        return
    for side, ck in (("A", result.a), ("B", result.b)):
        console.print(f"[bold]{side}[/] {escape(ck.path)}  {ck.format}, {ck.n_tensors} tensors, "
                      f"sha256 {(ck.sha256 or 'not computed')[:12]}", highlight=False)
    if result.atol:
        console.print(f"values compared with atol {result.atol:g}", highlight=False)
    console.print(_modality_table(result))
    layers = [layer for layer in result.bn_layers if layer.status != "unchanged" or layer.died or layer.revived]
    if layers:
        console.print(_layer_table(layers))
    if result.changed:
        console.print(_tensor_table(result.changed, top))
    for label, names in (("added", result.added), ("removed", result.removed)):
        if names:
            console.print(escape(f"{label} ({len(names)}): {_names(names)}"), highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def _modality_table(result: DiffResult) -> Table:
    table = Table(title="per modality", title_justify="left", pad_edge=False)
    table.add_column("modality", no_wrap=True)
    for col in ("BN channels", "dead A -> B", "died", "revived", "changed tensors", "added", "removed",
                "mean rel change"):
        table.add_column(col, justify="right", no_wrap=True)
    for m in result.modalities.values():
        channels = str(m.n_bn_channels_after) if m.n_bn_channels_before == m.n_bn_channels_after \
            else f"{m.n_bn_channels_before} -> {m.n_bn_channels_after}"
        style = "red" if m.n_died else ("green" if m.n_revived else None)
        table.add_row(m.name, channels, f"{m.n_dead_before} -> {m.n_dead_after}", _n(m.n_died), _n(m.n_revived),
                      f"{m.n_changed_tensors}/{m.n_tensors}", _n(m.n_added_tensors), _n(m.n_removed_tensors),
                      _rel(m.mean_rel_change), style=style)
    return table


def _layer_table(layers: list[BNLayerDiff]) -> Table:
    table = Table(title="BatchNorm layers that changed", title_justify="left", pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("channels changed", "rel gamma", "rel beta", "rel mean", "rel var"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("died")
    table.add_column("revived")
    for layer in layers:
        if layer.channels_a == layer.channels_b and layer.n_channels_changed is not None:
            channels = f"{layer.n_channels_changed}/{layer.channels_a}"
        else:
            channels = f"{_c(layer.channels_a)} -> {_c(layer.channels_b)}"
        r = layer.rel_change
        style = "red" if layer.died else ("green" if layer.revived else None)
        table.add_row(escape(layer.name), layer.status, channels, _rel(r["gamma"]), _rel(r["beta"]),
                      _rel(r["running_mean"]), _rel(r["running_var"]), _channels(layer.died),
                      _channels(layer.revived), style=style)
    return table


def _tensor_table(changed: list[TensorChange], top: int) -> Table:
    ranked = sorted(changed, key=_rank)
    shown = ranked[:top]
    more = f" (top {len(shown)} of {len(changed)})" if len(changed) > len(shown) else ""
    table = Table(title=f"changed tensors{more}", title_justify="left", pad_edge=False)
    table.add_column("tensor", no_wrap=True)
    table.add_column("change", no_wrap=True)
    table.add_column("shape / dtype", no_wrap=True)
    for col in ("max |b-a|", "rel change", "elements", "channels"):
        table.add_column(col, justify="right", no_wrap=True)
    for c in shown:
        if c.shape_a != c.shape_b:
            what = f"{_shape(c.shape_a)} -> {_shape(c.shape_b)}"
        elif c.dtype_a != c.dtype_b:
            what = f"{_shape(c.shape_a)} {c.dtype_a} -> {c.dtype_b}"
        else:
            what = f"{_shape(c.shape_a)} {c.dtype_a}"
        elements = "-" if c.n_elements is None else f"{c.n_changed_elements}/{c.n_elements}"
        channels = "-" if c.n_channels_changed is None else f"{c.n_channels_changed}/{c.channels}"
        table.add_row(escape(c.name), ",".join(c.reasons), what, _num(c.max_abs_diff), _rel(c.rel_change), elements,
                      channels)
    return table


def _rank(c: TensorChange) -> tuple:
    """Shape changes first, then by relative change, largest (and NaN) first."""
    if c.rel_change is None:
        return (0, 0.0, c.name)
    rel = c.rel_change
    return (1, -math.inf if math.isnan(rel) else -rel, c.name)


def _rel(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return "0" if v == 0 else f"{v:.3g}"


def _num(v: float | None) -> str:
    return "-" if v is None else (str(v) if not math.isfinite(v) else f"{v:.3g}")


def _n(v: int) -> str:
    return str(v) if v else "-"


def _c(v: int | None) -> str:
    return "-" if v is None else str(v)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _channels(items: list[int]) -> str:
    if not items:
        return "-"
    head = ", ".join(map(str, items[:_PREVIEW]))
    return f"{len(items)} [{head}{', ...' if len(items) > _PREVIEW else ''}]"


def _names(names: list[str]) -> str:
    head = ", ".join(names[:_PREVIEW])
    return head + (f", ... ({len(names) - _PREVIEW} more)" if len(names) > _PREVIEW else "")
