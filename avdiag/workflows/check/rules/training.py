"""Rules on a training run log (`avdiag check RUN.jsonl`, the log :mod:`avdiag.monitor` writes).

They read the run's records (:class:`avdiag.measure.runlog.RunLog`), never a checkpoint; on a
checkpoint they are not evaluated (a policy that names them says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from avdiag.errors import UsageError
from avdiag.measure.runlog import RunLog, dig
from avdiag.workflows.check.rules.base import CheckRule, Facts, Found, Param, Verdict, cosine, count, ratio, \
    register, score_ratio

RUN = "run-log"  # the need of these rules: the checked path is a training run log
MODALITIES = ("audio", "visual")


@dataclass
class RunFacts(Facts):
    """The facts of a run log: no scan, the records."""

    run: RunLog | None = None


def at_least_one(value: Any, label: str) -> int:
    n = count(value, label)
    if n < 1:
        raise UsageError(f"{label} must be a whole number >= 1, got {value!r}")
    return n


class RunRule(CheckRule):
    needs = (RUN,)
    unmet = "needs a training run log (a .jsonl written by avdiag.monitor), not a checkpoint"


@register
class RunImbalance(RunRule):
    id = "run-imbalance"
    severity = "warning"
    description = "one modality's OGM-GE score stayed more than max_rho times the other's for the last epochs"
    kind = "run"
    params = {"max_rho": Param(3.0, score_ratio), "epochs": Param(3, at_least_one)}

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        epochs = [e for e in facts.run.epochs if dig(e, "means", "rho") is not None]
        k, limit = params["epochs"], params["max_rho"]
        if len(epochs) < k:
            return Verdict(skipped=[f"{len(epochs)} epoch(s) logged, the rule looks at the last {k}"])
        last = epochs[-k:]
        found = []
        for m in MODALITIES:
            values = [_num(dig(e, "means", "rho", m)) for e in last]
            if all(v > limit for v in values):
                shown = ", ".join(f"{v:.3g}" for v in values)
                found.append(Found(f"modality:{m}", "modality",
                                   f"{m} dominated the last {k} epochs: mean rho {shown} > {limit:g} (its OGM-GE "
                                   "score over the other modality's)"))
        return Verdict(found)


@register
class RunConflict(RunRule):
    id = "run-conflict"
    severity = "warning"
    description = "a modality's MMPareto cosine was below min_cos in more than max_share of the last logged steps"
    kind = "run"
    params = {"min_cos": Param(0.0, cosine), "max_share": Param(0.5, ratio), "steps": Param(20, at_least_one)}

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        steps = [s for s in facts.run.steps if isinstance(s.get("conflict"), dict)]
        if not steps:
            return Verdict(skipped=["no step logged a cosine (the monitor ran with cosine_every=0?)"])
        last = steps[-params["steps"]:]
        found = []
        for m in MODALITIES:
            values = [_num(dig(s, "conflict", m, "cos")) for s in last]
            below = sum(v < params["min_cos"] for v in values)
            if below > params["max_share"] * len(values):
                found.append(Found(f"modality:{m}", "modality",
                                   f"{m}: cosine below {params['min_cos']:g} in {below} of the last {len(values)} "
                                   f"logged steps (> {params['max_share']:.0%}); last {values[-1]:.3g}"))
        return Verdict(found)


@register
class RunDeadChannelsGrowth(RunRule):
    id = "run-dead-channels-growth"
    severity = "error"
    description = "a modality's dead BatchNorm channels grew during training by more than max_growth"
    kind = "run"
    params = {"max_growth": Param(0, count)}

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        run = facts.run
        scans = [e["dead_channels"] for e in run.epochs if isinstance(e.get("dead_channels"), dict)]
        initial = dig(run.header, "initial", "dead_channels")
        if isinstance(initial, dict):
            scans.insert(0, initial)
        if len(scans) < 2:
            return Verdict(skipped=["fewer than two dead-channel scans logged (dead_channels off, or no epoch ended)"])
        found = []
        for m in sorted(set(scans[0]) & set(scans[-1])):
            first, last = _num(dig(scans[0], m, "dead")), _num(dig(scans[-1], m, "dead"))
            if last - first > params["max_growth"]:
                found.append(Found(f"modality:{m}", "modality",
                                   f"{m}: dead channels grew from {first:g} to {last:g} during training "
                                   f"(more than {params['max_growth']})"))
        return Verdict(found)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
