"""Rule ids, their kinds and default severities, and a rule as a policy configures it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from avdiag import findings as F


SCHEMA_VERSION = "1.0"

ERROR, WARNING, NOTE, OFF = "error", "warning", "note", "off"
SEVERITIES = (ERROR, WARNING, NOTE)
_RANK = {NOTE: 0, WARNING: 1, ERROR: 2}
NOTHING_MODES = ("error", "violation", "pass")
FAIL_ON = (ERROR, WARNING)

# Outcomes of a violation: what it does to the run.
OUTCOME_ERROR = "error"  # the file could not be analysed: exit 2
OUTCOME_FAIL = "fail"  # a policy violation: exit 1
OUTCOME_REPORT = "report"  # shown, does not fail the run (below fail_on, a note, or suppressed)

# Rule ids of their own (the content rules reuse avdiag.findings ids).
UNSAFE_PICKLE = "unsafe-pickle"
UNREADABLE = "unreadable"
ANALYSIS_ERROR = "analysis-error"
LFS_POINTER = "lfs-pointer"
NOTHING_ANALYSED = "nothing-analysed"
DEAD_GROWTH = "dead-channels-growth"
CONTRIBUTION = "modality-contribution"
CONFLICT = "modality-conflict"
CONTRIBUTION_DROP = "modality-contribution-drop"

# Kinds of rule: how they are evaluated and what a policy may change.
_LOAD, _NOTHING, _RATIO, _FINDING, _GROWTH = "load", "nothing", "ratio", "finding", "growth"
_DATA, _DATA_DROP = "data", "data-drop"  # need --data (and, for _DATA_DROP, --baseline)


@dataclass(frozen=True)
class _Spec:
    id: str
    kind: str
    severity: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)


_SPECS: tuple[_Spec, ...] = (
    _Spec(UNSAFE_PICKLE, _LOAD, ERROR, "a pickle names globals outside torch's weights-only allow-list: refused, "
                                        "never loaded"),
    _Spec(UNREADABLE, _LOAD, ERROR, "missing, empty, truncated or corrupt file, or not a checkpoint format avdiag "
                                    "reads"),
    _Spec(ANALYSIS_ERROR, _LOAD, ERROR, "the checkpoint loaded but could not be analysed"),
    _Spec(LFS_POINTER, _NOTHING, ERROR, "a Git LFS pointer file instead of the weights (run `git lfs pull`)"),
    _Spec(NOTHING_ANALYSED, _NOTHING, ERROR, "nothing was analysed: a path that matches no checkpoint, a folder "
                                             "without checkpoints, or a checkpoint without tensors"),
    _Spec(F.NONFINITE, _FINDING, ERROR, "a tensor holds NaN or Inf values"),
    _Spec(F.DEAD, _RATIO, ERROR, "dead BatchNorm channel ratio above its threshold (per modality or layer glob)",
          {"max_ratio": 0.05, "modalities": {}, "layers": {}}),
    _Spec(F.ABNORMAL, _RATIO, WARNING, "ratio of abnormal BN affine pairs (|gamma| and |beta| tiny) above its "
                                       "threshold", {"max_ratio": 0.0, "modalities": {}, "layers": {}}),
    _Spec(F.COLLAPSED, _FINDING, WARNING, F.RULES[F.COLLAPSED][1]),
    _Spec(F.NO_BATCHNORM, _FINDING, WARNING, F.RULES[F.NO_BATCHNORM][1]),
    _Spec(DEAD_GROWTH, _GROWTH, ERROR, "dead BatchNorm channels grew versus the baseline (per modality)",
          {"max_growth": 0, "modalities": {}}),
    _Spec(F.CONSTANT, _FINDING, OFF, F.RULES[F.CONSTANT][1]),
    _Spec(F.LOW_GAIN, _FINDING, OFF, F.RULES[F.LOW_GAIN][1]),
    _Spec(F.POSSIBLY_DEAD, _FINDING, OFF, F.RULES[F.POSSIBLY_DEAD][1]),
    _Spec(F.PREDICTION_MISMATCH, _FINDING, OFF, F.RULES[F.PREDICTION_MISMATCH][1]),
    _Spec(F.MEASURED_DEAD, _FINDING, WARNING, F.RULES[F.MEASURED_DEAD][1]),
    _Spec(F.NOT_PROBED, _FINDING, WARNING, F.RULES[F.NOT_PROBED][1]),
    _Spec(CONTRIBUTION, _DATA, WARNING, "a modality contributes too little to the prediction on the data "
                                        "(Shapley share, uni-modal accuracy, OGM-GE rho)",
          {"min_share": 0.2, "value": "accuracy", "modalities": {}, "min_unimodal_accuracy": None,
           "max_rho": None}),
    _Spec(CONFLICT, _DATA, WARNING, "the multimodal and uni-modal gradients of a modality's encoder conflict on "
                                    "the data (MMPareto cosine)",
          {"min_cos_mean": 0.0, "max_conflict_rate": 0.5, "min_head_cos": None}),
    _Spec(CONTRIBUTION_DROP, _DATA_DROP, ERROR, "a modality's contribution fell versus the baseline on the same "
                                                "data", {"max_drop": 0.05, "value": "accuracy", "modalities": {},
                                                         "max_accuracy_drop": None}),
)
_SPEC = {s.id: s for s in _SPECS}
RULE_IDS: tuple[str, ...] = tuple(s.id for s in _SPECS)
# Rules that a suppression may silence: what a checkpoint holds, not whether it could be read.
SUPPRESSIBLE = frozenset(s.id for s in _SPECS if s.kind in (_RATIO, _FINDING, _GROWTH, _DATA, _DATA_DROP))


_PROBE_ONLY = frozenset({F.MEASURED_DEAD, F.NOT_PROBED, F.PREDICTION_MISMATCH})  # need inspect's probe (data)


@dataclass
class Rule:
    """One rule as the policy configures it. ``severity`` is error / warning / note / off."""

    id: str
    severity: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    configured: bool = False  # named in the policy file (not just a default)

    @property
    def enabled(self) -> bool:
        return self.severity != OFF

    @property
    def kind(self) -> str:
        return _SPEC[self.id].kind

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "description": self.description,
                "params": _plain(self.params)}


def _default_rules() -> dict[str, Rule]:
    return {s.id: Rule(s.id, s.severity, s.description, _copy_params(s.params)) for s in _SPECS}


def _copy_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
