"""Rules on the checkpoint's model run on data (``--data``): a modality's contribution, the gradient
conflict of its encoder, and (with ``--baseline``) a fall in its contribution. They read the figures
of :class:`avdiag.workflows.check.figures.DataFigures`."""

from __future__ import annotations

import math
from typing import Any

from avdiag.findings import ERROR, WARNING
from avdiag.results import finite
from avdiag.workflows.check.rules.base import (
    BASELINE_DATA,
    DATA,
    CheckRule,
    Facts,
    Found,
    Param,
    Verdict,
    cosine,
    ratio,
    ratio_or_table,
    register,
    score_ratio,
    table_of,
    value_kind,
)

NEEDS_DATA = "needs data: run check with --data"


@register
class ModalityContributionRule(CheckRule):
    id = "modality-contribution"
    kind = "data"
    severity = WARNING
    description = ("a modality contributes too little to the prediction on the data (Shapley share, uni-modal "
                   "accuracy, OGM-GE rho)")
    params = {"min_share": Param(0.2, ratio), "value": Param("accuracy", value_kind),
              "modalities": Param({}, table_of(ratio)), "min_unimodal_accuracy": Param(None, ratio_or_table),
              "max_rho": Param(None, score_ratio)}
    needs = (DATA,)
    unmet = NEEDS_DATA

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        fig = facts.figures
        verdict = Verdict()
        for m, d in fig.modalities.items():
            problems = self._share(fig, m, d, params, verdict) + self._accuracy(fig, m, d, params) \
                + self._dominated(fig, m, params)
            if problems:
                verdict.found.append(Found(f"modality:{m}", "modality",
                                           f"{m} under-contributes on {fig.data}: " + "; ".join(problems)))
        return verdict

    def _share(self, fig: Any, m: str, d: dict, params: dict[str, Any], verdict: Verdict) -> list[str]:
        kind = params["value"]
        limit = params["modalities"].get(m, params["min_share"])
        share = d[f"share_{kind}"]
        if limit is None:
            return []
        if share is None:
            verdict.skipped.append(f"{m}: no contribution share: the fused model does no better than its head's "
                                   f"biases (fused accuracy {fig.fused_accuracy:.3f}, empty coalition "
                                   f"{fig.empty_accuracy:.3f})")
            return []
        if share < limit:
            return [f"contribution share {share:.3f} < {limit:g} ({kind}-valued Shapley gain over the head's biases)"]
        return []

    def _accuracy(self, fig: Any, m: str, d: dict, params: dict[str, Any]) -> list[str]:
        wanted = params["min_unimodal_accuracy"]
        limit = wanted.get(m) if isinstance(wanted, dict) else wanted
        if limit is not None and d["unimodal_accuracy"] < limit:
            return [f"uni-modal accuracy {d['unimodal_accuracy']:.3f} < {limit:g} ({fig.unimodal_source})"]
        return []

    def _dominated(self, fig: Any, m: str, params: dict[str, Any]) -> list[str]:
        max_rho = params["max_rho"]
        other = next((o for o in fig.modalities if o != m), None)
        rho_other = fig.modalities[other]["rho"] if other else None
        if max_rho is not None and rho_other is not None and rho_other > max_rho:
            return [f"{other} dominates: OGM-GE rho = s_{other} / s_{m} = {rho_other:.3g} > {max_rho:g}"]
        return []


@register
class ModalityConflictRule(CheckRule):
    id = "modality-conflict"
    kind = "data"
    severity = WARNING
    description = ("the multimodal and uni-modal gradients of a modality's encoder conflict on the data "
                   "(MMPareto cosine)")
    params = {"min_cos_mean": Param(0.0, cosine), "max_conflict_rate": Param(0.5, ratio),
              "min_head_cos": Param(None, cosine)}
    needs = (DATA,)
    unmet = NEEDS_DATA

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        fig = facts.figures
        verdict = Verdict()
        for m, d in fig.modalities.items():
            cos, rate = d["cos_mean"], d["conflict_rate"]
            if cos is None or not math.isfinite(cos):
                verdict.skipped.append(f"{m}: no gradient cosine (zero gradients)")
                continue
            problems = []
            if params["min_cos_mean"] is not None and cos < params["min_cos_mean"]:
                problems.append(f"mean cosine {cos:+.3f} < {params['min_cos_mean']:+g}")
            if params["max_conflict_rate"] is not None and rate > params["max_conflict_rate"]:
                problems.append(f"{rate:.0%} of {fig.n_batches} batch(es) with cosine <= 0 > "
                                f"{params['max_conflict_rate']:.0%} allowed")
            if problems:
                verdict.found.append(Found(f"modality:{m}", "modality",
                                           f"{m}: the multimodal and uni-modal gradients of its encoder conflict "
                                           f"on {fig.data}: " + "; ".join(problems)))
        self._head(fig, params["min_head_cos"], verdict)
        return verdict

    def _head(self, fig: Any, limit: float | None, verdict: Verdict) -> None:
        if limit is None:
            return
        if fig.head_cos_mean is None:
            verdict.skipped.append("head: no shared head parameters both modalities reach")
        elif fig.head_cos_mean < limit:
            verdict.found.append(Found("head", "layer",
                                       f"shared head: the two uni-modal losses' gradients have mean cosine "
                                       f"{fig.head_cos_mean:+.3f} < {limit:+g} on {fig.data}"))


@register
class ModalityContributionDropRule(CheckRule):
    id = "modality-contribution-drop"
    kind = "data-drop"
    severity = ERROR
    description = "a modality's contribution fell versus the baseline on the same data"
    params = {"max_drop": Param(0.05, ratio), "value": Param("accuracy", value_kind),
              "modalities": Param({}, table_of(ratio)), "max_accuracy_drop": Param(None, ratio)}
    needs = (DATA, BASELINE_DATA)
    unmet = "needs --baseline and --data"

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        new, old = facts.figures, facts.baseline_figures
        kind = params["value"]
        verdict = Verdict()
        summary: dict[str, Any] = {}
        for m, d in new.modalities.items():
            before = old.modalities.get(m)
            if before is None:
                summary[m] = {"share_before": None, "share_after": d[f"share_{kind}"]}
                continue
            s0, s1 = before[f"share_{kind}"], d[f"share_{kind}"]
            a0, a1 = before["unimodal_accuracy"], d["unimodal_accuracy"]
            summary[m] = {"share_before": finite(s0), "share_after": finite(s1),
                          "unimodal_accuracy_before": finite(a0), "unimodal_accuracy_after": finite(a1)}
            problems = []
            limit = params["modalities"].get(m, params["max_drop"])
            if limit is not None and (s0 is None or s1 is None):
                which = "baseline" if s0 is None else "checkpoint"
                verdict.skipped.append(f"{m}: no contribution share for the {which} (it does no better than its "
                                       "head's biases)")
            elif limit is not None and s0 - s1 > limit:
                problems.append(f"contribution share {s0:.3f} -> {s1:.3f} ({s1 - s0:+.3f}, more than {limit:g})")
            acc_limit = params["max_accuracy_drop"]
            if acc_limit is not None and a0 - a1 > acc_limit:
                problems.append(f"uni-modal accuracy {a0:.3f} -> {a1:.3f} ({a1 - a0:+.3f}, more than {acc_limit:g})")
            if problems:
                verdict.found.append(Found(f"modality:{m}", "modality",
                                           f"{m}: contribution fell versus baseline {facts.baseline_path} on "
                                           f"{new.data}: " + "; ".join(problems)))
        verdict.baseline = {"contribution": summary}
        return verdict
