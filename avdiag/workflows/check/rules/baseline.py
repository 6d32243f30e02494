"""Rules that compare a checkpoint's static scan with its baseline's (``--baseline OLD``)."""

from __future__ import annotations

from typing import Any

from avdiag.findings import ERROR
from avdiag.workflows.check.rules.base import (
    BASELINE,
    CheckRule,
    Facts,
    Found,
    Param,
    Verdict,
    count,
    ratio,
    register,
    table_of,
)
from avdiag.workflows.check.rules.static import pct


@register
class DeadChannelsGrowth(CheckRule):
    id = "dead-channels-growth"
    kind = "growth"
    severity = ERROR
    description = "dead BatchNorm channels grew versus the baseline (per modality)"
    params = {"max_growth": Param(0, count), "modalities": Param({}, table_of(count)),
              "max_ratio_growth": Param(None, ratio)}
    needs = (BASELINE,)

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        new, old = facts.scan, facts.baseline_scan
        verdict = Verdict()
        summary: dict[str, Any] = {}
        for name, m in new.modalities.items():
            before = old.modalities.get(name)
            if before is None:
                summary[name] = {"n_dead_before": None, "n_dead_after": m.n_dead, "growth": None}
                continue
            growth = m.n_dead - before.n_dead
            summary[name] = {"n_dead_before": before.n_dead, "n_dead_after": m.n_dead, "growth": growth,
                             "dead_ratio_before": before.dead_ratio, "dead_ratio_after": m.dead_ratio}
            limit = params["modalities"].get(name, params["max_growth"])
            max_ratio_growth = params["max_ratio_growth"]
            too_many = growth > limit
            too_much = max_ratio_growth is not None and m.dead_ratio - before.dead_ratio > max_ratio_growth
            if too_many or too_much:
                limits = f"max_growth {limit}" + (f", max_ratio_growth {pct(max_ratio_growth)}"
                                                  if max_ratio_growth is not None else "")
                verdict.found.append(Found(
                    f"modality:{name}", "modality",
                    f"{name}: dead BatchNorm channels {before.n_dead} -> {m.n_dead} ({growth:+d}; "
                    f"{pct(before.dead_ratio)} -> {pct(m.dead_ratio)}) versus baseline {facts.baseline_path}, "
                    f"beyond {limits}{_where_they_died(new, old, name)}"))
        verdict.baseline = {"modalities": summary}
        return verdict


def _where_they_died(new: Any, old: Any, modality: str) -> str:
    """'; new dead channels in LAYER (+n), ...' for the layers of ``modality`` with newly dead channels."""
    old_layers = {v.layer.name: v for v in old.layers}
    died = []
    for v in new.layers:
        if v.layer.modality != modality:
            continue
        was = old_layers.get(v.layer.name)
        same_shape = was is not None and was.layer.channels == v.layer.channels
        new_dead = sorted(set(v.dead) - set(was.dead)) if same_shape else list(v.dead)
        if new_dead:
            died.append(f"{v.layer.name} (+{len(new_dead)})")
    if not died:
        return ""
    return "; new dead channels in " + ", ".join(died[:5]) + (", ..." if len(died) > 5 else "")
