"""The report section of `avdiag reinit`: the rewrite (method, source, target, parameters,
verification), dead channels before -> after per modality, the diagnosis and the rewritten tensors."""

from __future__ import annotations

import math
from typing import Any

from avdiag.report import access as acc
from avdiag.report import plots
from avdiag.report.blocks import Chart, Code, Section, Table, Text, section_builder
from avdiag.report.cells import dict_table, fmt_any, fmt_num, kv_table


@section_builder("reinit")
def reinit_section(res: dict, anchor: str) -> Section:
    section = Section(anchor, "reinit", f"reinit: {acc.checkpoint_path(res)} → {res.get('target', '?')}")
    section.add(Text(acc.summary_text(res) or str(res.get("method") or "reinit"), "summary"))
    for warning in acc.items(res.get("warnings")):
        section.add(Text(f"warning: {warning}", "warning"))
    section.add(kv_table("Rewrite", _rewrite_pairs(res)))
    before, after = res.get("dead_before"), res.get("dead_after")
    labels = [str(m) for m in dict.fromkeys([*acc.obj(before), *acc.obj(after)])]
    if labels:
        b, a = acc.dead_counts(before, labels), acc.dead_counts(after, labels)
        section.add(
            Table("Dead BN channels per modality (static scan)", ["modality", "before", "after", "change"],
                  [[m, str(x), str(y), f"{y - x:+d}"] for m, x, y in zip(labels, b, a)], "lrrr", collapsed=False),
            Chart("dead-before-after", "Dead BN channels before → after",
                  "Channels the static scan judges dead in the input checkpoint (before) and in the rewritten one "
                  "(after), per modality.",
                  lambda: plots.dead_before_after(labels, b, a, "dead BN channels per modality: before → after"),
                  lambda: [Code("", plots.before_after_text(labels, b, a))]))
    for key, title in (("revived_beyond_blend", "Revived beyond the paper's blend (a smaller alpha per channel)"),
                       ("still_dead", "Still dead after the rewrite with these options")):
        layers = acc.obj(res.get(key))
        if layers:
            section.add(Table(title, ["layer", "channels"],
                              [[name, _channel_list(v.get("channels") if isinstance(v, dict) else v)]
                               for name, v in layers.items()], "ll"))
    diagnosis = acc.obj(res.get("diagnosis"))
    if diagnosis:
        section.add(dict_table("Diagnosis", "modality", diagnosis))
    changes = acc.dicts(res.get("changes"))
    if changes:
        section.add(Table(f"Rewritten tensors ({len(changes)})",
                          ["tensor", "channels changed", "norm before", "norm after", "after / before"],
                          [_change_row(c) for c in changes], "crrrr"))
    return section


def _rewrite_pairs(res: dict) -> list[tuple[str, Any]]:
    refs = acc.checkpoint_refs(res)
    source = refs[0] if refs else {}
    pairs: list[tuple[str, Any]] = [("method", res.get("method")), ("source", source.get("path")),
                                    ("source format", source.get("format")),
                                    ("source sha256", source.get("sha256") or "not computed"),
                                    ("target", res.get("target"))]
    for key, value in acc.obj(res.get("parameters")).items():
        if key == "method":
            continue
        if key == "channels" and isinstance(value, dict):
            n = sum(acc.count(v) for v in value.values())
            pairs.append(("channels", f"{n} channel(s) in {len(value)} layer(s)"))
        elif key == "layers" and isinstance(value, list):
            shown = ", ".join(map(str, value[:6])) + (" ..." if len(value) > 6 else "")
            pairs.append(("layers", f"{len(value)}: {shown}"))
        else:
            pairs.append((str(key), value))
    verification = acc.obj(res.get("verification"))
    if verification:
        pairs.append(("verification", ", ".join(f"{k} {fmt_any(v)}" for k, v in verification.items())))
    return pairs


def _change_row(change: dict) -> list[str]:
    before, after = acc.num(change.get("norm_before")), acc.num(change.get("norm_after"))
    ratio = after / before if before and after is not None and math.isfinite(before) else None
    return [str(change.get("name")), fmt_num(change.get("channels_changed")), fmt_num(before, 4), fmt_num(after, 4),
            fmt_num(ratio)]


def _channel_list(channels: Any) -> str:
    values = acc.items(channels)
    return ", ".join(map(str, values[:16])) + (f" ... ({len(values)} in all)" if len(values) > 16 else "")
