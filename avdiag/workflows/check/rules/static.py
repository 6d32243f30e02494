"""Rules on what the static scan of `inspect` found: its findings (one violation per finding, the rule
id is the finding id) and the ratio of dead or abnormal BatchNorm channels per modality or layer."""

from __future__ import annotations

import fnmatch
from typing import Any

from avdiag import findings
from avdiag.findings import ERROR, OFF, WARNING
from avdiag.workflows.check.rules.base import CheckRule, Facts, Found, Param, Verdict, ratio, register, table_of


class FindingRule(CheckRule):
    """Each finding of the scan whose id is this rule's id is a violation, located where it was found."""

    kind = "finding"

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        return Verdict([Found(f.location, self.location_kind(f.location), f.message)
                        for f in facts.scan.findings if f.id == self.id])

    def location_kind(self, location: str) -> str:
        return "layer" if location else "file"


@register
class NonfiniteTensor(FindingRule):
    id = findings.NONFINITE
    severity = ERROR
    description = findings.RULES[findings.NONFINITE][1]

    def location_kind(self, location: str) -> str:
        return "tensor"


class RatioRule(CheckRule):
    """The share of a modality's (or a layer's) BN channels with a defect is above its threshold."""

    kind = "ratio"
    what: str  # how the message names the defect

    def defective(self, verdict: Any) -> list[int]:
        """The channels of one layer's verdicts that have the defect."""
        raise NotImplementedError

    def n_defective(self, modality: Any) -> int:
        raise NotImplementedError

    def evaluate(self, facts: Facts, params: dict[str, Any]) -> Verdict:
        return Verdict(self._per_modality(facts.scan, params) + self._per_layer(facts.scan, params))

    def _per_modality(self, scan: Any, params: dict[str, Any]) -> list[Found]:
        out = []
        for name, m in scan.modalities.items():
            if not m.n_bn_channels:
                continue
            n = self.n_defective(m)
            share = n / m.n_bn_channels
            limit = params["modalities"].get(name, params["max_ratio"])
            if share > limit:
                out.append(Found(f"modality:{name}", "modality",
                                 f"{name}: {n}/{m.n_bn_channels} BatchNorm channels {self.what} ({pct(share)}) > "
                                 f"{pct(limit)} allowed{self.worst(m)}"))
        return out

    def _per_layer(self, scan: Any, params: dict[str, Any]) -> list[Found]:
        globs = params["layers"]
        out = []
        for v in scan.layers:
            pattern = next((g for g in globs if fnmatch.fnmatchcase(v.layer.name, g)), None)
            if pattern is None or not v.layer.channels:
                continue
            channels = self.defective(v)
            share = len(channels) / v.layer.channels
            if share > globs[pattern]:
                out.append(Found(v.layer.name, "layer",
                                 f"{v.layer.name}: {len(channels)}/{v.layer.channels} channels {self.what} "
                                 f"({pct(share)}) > {pct(globs[pattern])} allowed for layers '{pattern}' "
                                 f"{preview(channels)}"))
        return out

    def worst(self, modality: Any) -> str:
        return ""


def _ratio_params(max_ratio: float) -> dict[str, Param]:
    return {"max_ratio": Param(max_ratio, ratio), "modalities": Param({}, table_of(ratio)),
            "layers": Param({}, table_of(ratio))}


@register
class DeadChannels(RatioRule):
    id = findings.DEAD
    severity = ERROR
    description = "dead BatchNorm channel ratio above its threshold (per modality or layer glob)"
    params = _ratio_params(0.05)
    what = "dead"

    def defective(self, verdict: Any) -> list[int]:
        return verdict.dead

    def n_defective(self, modality: Any) -> int:
        return modality.n_dead

    def worst(self, modality: Any) -> str:
        if not modality.worst_layer:
            return ""
        return f"; worst layer {modality.worst_layer} (z = {modality.worst_z:.3g})"


@register
class AbnormalAffine(RatioRule):
    id = findings.ABNORMAL
    severity = WARNING
    description = "ratio of abnormal BN affine pairs (|gamma| and |beta| tiny) above its threshold"
    params = _ratio_params(0.0)
    what = "with an abnormal affine pair"

    def defective(self, verdict: Any) -> list[int]:
        return verdict.abnormal

    def n_defective(self, modality: Any) -> int:
        return modality.n_abnormal


@register
class CollapsedFilters(FindingRule):
    id = findings.COLLAPSED
    severity = WARNING
    description = findings.RULES[findings.COLLAPSED][1]


@register
class NoBatchNorm(FindingRule):
    id = findings.NO_BATCHNORM
    severity = WARNING
    description = findings.RULES[findings.NO_BATCHNORM][1]


@register
class ConstantChannels(FindingRule):
    id = findings.CONSTANT
    severity = OFF
    description = findings.RULES[findings.CONSTANT][1]


@register
class LowGainChannels(FindingRule):
    id = findings.LOW_GAIN
    severity = OFF
    description = findings.RULES[findings.LOW_GAIN][1]


@register
class PossiblyDeadChannels(FindingRule):
    id = findings.POSSIBLY_DEAD
    severity = OFF
    description = findings.RULES[findings.POSSIBLY_DEAD][1]


def pct(share: float) -> str:
    return f"{100 * share:.3g}%"


def preview(channels: list[int], n: int = 8) -> str:
    head = ", ".join(map(str, channels[:n]))
    return f"[{head}{', ...' if len(channels) > n else ''}]"
