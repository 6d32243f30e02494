"""Terminal rendering of a diff: per-modality summary, changed BN layers, the most-changed tensors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from avdiag.report.terminal.columns import Column, count, fitted_table, number

from avdiag.measure.compare import BNLayerDiff, TensorChange

if TYPE_CHECKING:
    from avdiag.workflows.diff import DiffResult

TOP_TENSORS = 10
_PREVIEW = 8


def render_diff(result: DiffResult, console: Console, quiet: bool = False, top: int = TOP_TENSORS,
                verbose: bool = False) -> None:
    """Print ``result``; with ``quiet`` only its summary line. Without ``verbose``: the BN layers where
    channels died or revived and the ``top`` most-changed tensors; with it every changed layer and tensor."""
    if quiet:
        console.print(escape(result.summary_line()), highlight=False, soft_wrap=True)  # one line, for grep and logs
        return
    for side, ck in (("A", result.a), ("B", result.b)):
        console.print(f"[bold]{side}[/] {escape(ck.path)}  {ck.format}, {ck.n_tensors} tensors, "
                      f"sha256 {(ck.sha256 or 'not computed')[:12]}", highlight=False)
    if result.atol:
        console.print(f"values compared with atol {result.atol:g}", highlight=False)
    width = console.width
    console.print(_modality_table(result, width))
    changed = [layer for layer in result.bn_layers if layer.status != "unchanged" or layer.died or layer.revived]
    layers = changed if verbose else [layer for layer in changed if layer.died or layer.revived]
    if layers:
        console.print(_layer_table(layers, width))
    if len(layers) < len(changed):
        console.print(f"[dim]{len(changed) - len(layers)} other changed BN layer(s) (no channel died or revived): "
                      "--verbose shows them[/]")
    if result.changed:
        console.print(_tensor_table(result.changed, len(result.changed) if verbose else top, width))
    for label, names in (("added", result.added), ("removed", result.removed)):
        if names:
            console.print(escape(f"{label} ({len(names)}): {_names(names)}"), highlight=False)
    console.print(f"[bold]{escape(result.summary_line())}[/]", highlight=False)


def _modality_table(result: DiffResult, width: int):
    cols = [Column("modality", name=True), Column("dead A -> B"), Column("died"), Column("revived"),
            Column("changed tensors", 1), Column("mean rel change", 2), Column("BN channels", 3),
            Column("added", 4), Column("removed", 4)]
    by = {c.header: c for c in cols}
    styles = []
    for m in result.modalities.values():
        channels = str(m.n_bn_channels_after) if m.n_bn_channels_before == m.n_bn_channels_after \
            else f"{m.n_bn_channels_before} -> {m.n_bn_channels_after}"
        for header, cell in (("modality", m.name), ("dead A -> B", f"{m.n_dead_before} -> {m.n_dead_after}"),
                             ("died", count(m.n_died)), ("revived", count(m.n_revived)),
                             ("changed tensors", f"{m.n_changed_tensors}/{m.n_tensors}"),
                             ("mean rel change", _rel(m.mean_rel_change)), ("BN channels", channels),
                             ("added", count(m.n_added_tensors)), ("removed", count(m.n_removed_tensors))):
            by[header].cells.append(cell)
        styles.append("red" if m.n_died else ("green" if m.n_revived else None))
    return fitted_table("per modality", cols, width, styles)


def _layer_table(layers: list[BNLayerDiff], width: int):
    cols = [Column("layer", name=True), Column("died", justify="left"), Column("revived", justify="left"),
            Column("channels changed", 1), Column("status", 2, justify="left"), Column("rel gamma", 3),
            Column("rel beta", 3), Column("rel mean", 4), Column("rel var", 4)]
    by = {c.header: c for c in cols}
    styles = []
    for layer in layers:
        if layer.channels_a == layer.channels_b and layer.n_channels_changed is not None:
            channels = f"{layer.n_channels_changed}/{layer.channels_a}"
        else:
            channels = f"{_c(layer.channels_a)} -> {_c(layer.channels_b)}"
        r = layer.rel_change
        for header, cell in (("layer", layer.name), ("died", _channels(layer.died)),
                             ("revived", _channels(layer.revived)), ("channels changed", channels),
                             ("status", layer.status), ("rel gamma", _rel(r["gamma"])), ("rel beta", _rel(r["beta"])),
                             ("rel mean", _rel(r["running_mean"])), ("rel var", _rel(r["running_var"]))):
            by[header].cells.append(cell)
        styles.append("red" if layer.died else ("green" if layer.revived else None))
    return fitted_table("BatchNorm layers where channels died or revived", cols, width, styles)


def _tensor_table(changed: list[TensorChange], top: int, width: int):
    shown = sorted(changed, key=_rank)[:top]
    more = f" (top {len(shown)} of {len(changed)}; --verbose shows all)" if len(changed) > len(shown) else ""
    cols = [Column("tensor", name=True), Column("rel change"), Column("max |b-a|", 1), Column("channels", 2),
            Column("change", 3, justify="left"), Column("elements", 4), Column("shape / dtype", 5, justify="left")]
    by = {c.header: c for c in cols}
    for c in shown:
        if c.shape_a != c.shape_b:
            what = f"{_shape(c.shape_a)} -> {_shape(c.shape_b)}"
        elif c.dtype_a != c.dtype_b:
            what = f"{_shape(c.shape_a)} {c.dtype_a} -> {c.dtype_b}"
        else:
            what = f"{_shape(c.shape_a)} {c.dtype_a}"
        elements = "-" if c.n_elements is None else f"{c.n_changed_elements}/{c.n_elements}"
        channels = "-" if c.n_channels_changed is None else f"{c.n_channels_changed}/{c.channels}"
        for header, cell in (("tensor", c.name), ("rel change", _rel(c.rel_change)),
                             ("max |b-a|", _num(c.max_abs_diff)), ("channels", channels),
                             ("change", ",".join(c.reasons)), ("elements", elements), ("shape / dtype", what)):
            by[header].cells.append(cell)
    return fitted_table(f"changed tensors{more}", cols, width)


def _rank(c: TensorChange) -> tuple:
    """Shape changes first, then by relative change, largest (and NaN) first."""
    if c.rel_change is None:
        return (0, 0.0, c.name)
    rel = c.rel_change
    return (1, -math.inf if math.isnan(rel) else -rel, c.name)


def _rel(v: float | None) -> str:
    return "0" if v == 0 else number(v)


def _num(v: float | None) -> str:
    return number(v)


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
