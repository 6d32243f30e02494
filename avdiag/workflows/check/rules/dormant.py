"""The `dormant-units` rule: the share of a modality's tau-dormant units (ReDo, measured by `inspect --data`
on activation, MLP, conv and attention layers) is above its threshold."""

from __future__ import annotations

from typing import Any

from avdiag.measure.dormant import DORMANT_UNITS, DORMANT_UNITS_DESCRIPTION, DORMANT_UNITS_SEVERITY
from avdiag.workflows.check.rules.base import PROBE, CheckRule, Facts, Found, Param, Verdict, ratio, register, table_of
from avdiag.workflows.check.rules.static import pct, preview


@register
class DormantUnits(CheckRule):
    id = DORMANT_UNITS
    severity = DORMANT_UNITS_SEVERITY
    description = DORMANT_UNITS_DESCRIPTION
    kind = "ratio"
    needs = (PROBE,)
    params = {"max_ratio": Param(0.05, ratio), "modalities": Param({}, table_of(ratio))}

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        dormant = getattr(facts.scan, "dormant", None)
        if dormant is None:
            return Verdict(skipped=["no dormant-unit measurement in this scan (it needs the probe on data)"])
        out = []
        limits = params["modalities"]
        for name, m in dormant.modalities().items():
            limit = limits.get(name, params["max_ratio"])
            if m.n_units and m.ratio > limit:
                worst = max((layer for layer in dormant.layers if layer.modality == name),
                            key=lambda layer: len(layer.dormant))
                out.append(Found(f"modality:{name}", "modality",
                                 f"{name}: {m.n_dormant}/{m.n_units} units dormant at tau {dormant.tau:g} "
                                 f"({pct(m.ratio)}) > {pct(limit)} allowed; most in {worst.name} "
                                 f"{preview(worst.dormant)}"))
        return Verdict(out)
