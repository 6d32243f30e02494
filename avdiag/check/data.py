"""The rules that need data: a modality's contribution, gradient conflict, and (with a baseline) a
fall in a modality's contribution. Their figures come from :func:`avdiag.imbalance.analyse_imbalance`
(the measures of `avdiag conflict`, per-batch gradients only, no held-out learning state)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from avdiag.check.rules import Rule

# A finding of a data rule before it becomes a Violation: (location, message).
Finding = tuple[str, str]


@dataclass
class DataFigures:
    """What the data rules read for one checkpoint (the ``data`` entry of a file in the JSON).

    ``modalities[m]``: ``share_accuracy`` / ``share_probability`` (the contribution share, below),
    ``shapley_accuracy`` / ``shapley_probability`` (the paper's dataset means, as `avdiag conflict`
    reports them), ``unimodal_accuracy``, ``ogm_score``, ``rho`` (OGM-GE: this modality's score over
    the other's), ``cos_mean`` and ``conflict_rate`` (MMPareto cosine of encoder m over the batches).

    The contribution share is the modality's exact two-player Shapley value in the GAIN game
    ``g(S) = 1[correct_S] - 1[correct_empty]`` (probability-valued: ``p_S[y] - p_empty[y]``), over
    the sum of both, ``acc_fused - acc_empty``: a modality the fused head ignores gets 0, two that
    contribute alike 0.5 each. (In the paper's game ``v(S) = |S| * 1[correct_S]`` an ignored
    modality still gets about a quarter of the value, which makes a poor threshold.) It follows
    exactly from the paper's values: ``phi'_a = ((phi_a - phi_v) + acc_fused - acc_empty) / 2``.
    None when ``acc_fused <= acc_empty`` (the model does no better than its head's biases)."""

    data: str
    model: str
    n_samples: int
    n_batches: int
    fused_accuracy: float
    empty_accuracy: float
    unimodal_source: str
    head_cos_mean: float | None
    modalities: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @classmethod
    def from_imbalance(cls, result) -> "DataFigures":
        contribution, conflict = result.contribution, result.conflict
        phi = {kind: {m: getattr(c, f"shapley_mean_{kind}") for m, c in contribution.modalities.items()}
               for kind in ("accuracy", "probability")}
        fused_probability = float(contribution.samples["fused_probability"].mean())
        gain = {"accuracy": contribution.fused_accuracy - contribution.empty_accuracy,
                "probability": fused_probability - contribution.empty_probability}
        modalities = {}
        for m, c in contribution.modalities.items():
            s = conflict.summaries.get(m)
            modalities[m] = {
                "share_accuracy": _share(phi["accuracy"], gain["accuracy"], m),
                "share_probability": _share(phi["probability"], gain["probability"], m),
                "shapley_accuracy": c.shapley_mean_accuracy, "shapley_probability": c.shapley_mean_probability,
                "unimodal_accuracy": c.unimodal_accuracy, "ogm_score": c.ogm_score,
                "rho": contribution.ogm.rho.get(m),
                "cos_mean": s.cos_mean if s else None, "conflict_rate": s.conflict_rate if s else None}
        return cls(result.data, result.model, contribution.n_samples, contribution.n_batches,
                   contribution.fused_accuracy, contribution.empty_accuracy, contribution.unimodal_source,
                   conflict.head_cos_mean, modalities)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "model": self.model, "n_samples": self.n_samples, "n_batches": self.n_batches,
                "fused_accuracy": _finite(self.fused_accuracy), "empty_accuracy": _finite(self.empty_accuracy),
                "unimodal_source": self.unimodal_source, "head_cos_mean": _finite(self.head_cos_mean),
                "share": "Shapley value in the gain game 1[correct_S] - 1[correct_empty], over the sum of both",
                "modalities": {m: {k: _finite(v) for k, v in d.items()} for m, d in self.modalities.items()}}


def _share(phi: dict[str, float], gain: float, m: str) -> float | None:
    """The gain-game share of ``m`` from the paper's Shapley means (two modalities)."""
    if len(phi) != 2 or not gain > 0 or not math.isfinite(gain):
        return None
    other = next(o for o in phi if o != m)
    return ((phi[m] - phi[other]) + gain) / 2 / gain


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def analyse(path: Path, data, allow_globals: tuple[str, ...], ogm_alpha: float) -> DataFigures:
    """The data figures of one checkpoint. ``data``: :class:`avdiag.inspection.ProbeOptions`."""
    from avdiag.imbalance import ImbalanceOptions, analyse_imbalance

    options = ImbalanceOptions(replace(data, progress=False), ogm_alpha=ogm_alpha, per_sample=False,
                               heldout_split=None)
    return DataFigures.from_imbalance(analyse_imbalance(path, options, allow_globals=allow_globals))


# ---- the rules ----------------------------------------------------------------------------------


def contribution_findings(rule: Rule, fig: DataFigures) -> tuple[list[Finding], list[str]]:
    """``modality-contribution``: (findings, reasons a check could not be made)."""
    p = rule.params
    kind = p.get("value", "accuracy")
    per_modality = p.get("modalities", {})
    min_acc = p.get("min_unimodal_accuracy")
    max_rho = p.get("max_rho")
    found, skipped = [], []
    for m, d in fig.modalities.items():
        problems = []
        share, limit = d[f"share_{kind}"], per_modality.get(m, p.get("min_share"))
        if limit is not None:
            if share is None:
                skipped.append(f"{m}: no contribution share: the fused model does no better than its head's "
                               f"biases (fused accuracy {fig.fused_accuracy:.3f}, empty coalition "
                               f"{fig.empty_accuracy:.3f})")
            elif share < limit:
                problems.append(f"contribution share {share:.3f} < {limit:g} ({kind}-valued Shapley gain over "
                                f"the head's biases)")
        acc_limit = min_acc.get(m) if isinstance(min_acc, dict) else min_acc
        if acc_limit is not None and d["unimodal_accuracy"] < acc_limit:
            problems.append(f"uni-modal accuracy {d['unimodal_accuracy']:.3f} < {acc_limit:g} "
                            f"({fig.unimodal_source})")
        other = next((o for o in fig.modalities if o != m), None)
        rho_other = fig.modalities[other]["rho"] if other else None
        if max_rho is not None and rho_other is not None and rho_other > max_rho:
            problems.append(f"{other} dominates: OGM-GE rho = s_{other} / s_{m} = {rho_other:.3g} > {max_rho:g}")
        if problems:
            found.append((f"modality:{m}", f"{m} under-contributes on {fig.data}: " + "; ".join(problems)))
    return found, skipped


def conflict_findings(rule: Rule, fig: DataFigures) -> tuple[list[Finding], list[str]]:
    """``modality-conflict``: (findings, reasons a check could not be made)."""
    p = rule.params
    found, skipped = [], []
    for m, d in fig.modalities.items():
        cos, rate = d["cos_mean"], d["conflict_rate"]
        if cos is None or not math.isfinite(cos):
            skipped.append(f"{m}: no gradient cosine (zero gradients)")
            continue
        problems = []
        if p.get("min_cos_mean") is not None and cos < p["min_cos_mean"]:
            problems.append(f"mean cosine {cos:+.3f} < {p['min_cos_mean']:+g}")
        if p.get("max_conflict_rate") is not None and rate > p["max_conflict_rate"]:
            problems.append(f"{rate:.0%} of {fig.n_batches} batch(es) with cosine <= 0 > "
                            f"{p['max_conflict_rate']:.0%} allowed")
        if problems:
            found.append((f"modality:{m}", f"{m}: the multimodal and uni-modal gradients of its encoder conflict "
                                           f"on {fig.data}: " + "; ".join(problems)))
    head_limit = p.get("min_head_cos")
    if head_limit is not None:
        if fig.head_cos_mean is None:
            skipped.append("head: no shared head parameters both modalities reach")
        elif fig.head_cos_mean < head_limit:
            found.append(("head", f"shared head: the two uni-modal losses' gradients have mean cosine "
                                  f"{fig.head_cos_mean:+.3f} < {head_limit:+g} on {fig.data}"))
    return found, skipped


def drop_findings(rule: Rule, new: DataFigures, old: DataFigures, old_name: str
                  ) -> tuple[list[Finding], list[str], dict[str, Any]]:
    """``modality-contribution-drop``: a modality's contribution share (or uni-modal accuracy) fell
    versus the baseline checkpoint on the same data: (findings, reasons a check could not be made,
    the per-modality before/after summary)."""
    p = rule.params
    kind = p.get("value", "accuracy")
    per_modality = p.get("modalities", {})
    found, skipped, summary = [], [], {}
    for m, d in new.modalities.items():
        before = old.modalities.get(m)
        if before is None:
            summary[m] = {"share_before": None, "share_after": d[f"share_{kind}"]}
            continue
        s0, s1 = before[f"share_{kind}"], d[f"share_{kind}"]
        a0, a1 = before["unimodal_accuracy"], d["unimodal_accuracy"]
        summary[m] = {"share_before": _finite(s0), "share_after": _finite(s1),
                      "unimodal_accuracy_before": _finite(a0), "unimodal_accuracy_after": _finite(a1)}
        problems = []
        limit = per_modality.get(m, p.get("max_drop"))
        if limit is not None and (s0 is None or s1 is None):
            which = "baseline" if s0 is None else "checkpoint"
            skipped.append(f"{m}: no contribution share for the {which} (it does no better than its head's biases)")
        elif limit is not None and s0 - s1 > limit:
            problems.append(f"contribution share {s0:.3f} -> {s1:.3f} ({s1 - s0:+.3f}, more than {limit:g})")
        acc_limit = p.get("max_accuracy_drop")
        if acc_limit is not None and a0 - a1 > acc_limit:
            problems.append(f"uni-modal accuracy {a0:.3f} -> {a1:.3f} ({a1 - a0:+.3f}, more than {acc_limit:g})")
        if problems:
            found.append((f"modality:{m}", f"{m}: contribution fell versus baseline {old_name} on {new.data}: "
                                           + "; ".join(problems)))
    return found, skipped, summary
