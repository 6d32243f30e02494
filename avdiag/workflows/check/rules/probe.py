"""Rules on what the activation probe of `inspect --data` found (only when the model ran on the data)."""

from __future__ import annotations

from avdiag import findings as F
from avdiag.findings import OFF, WARNING
from avdiag.workflows.check.rules.base import PROBE, register
from avdiag.workflows.check.rules.static import FindingRule


class ProbeFindingRule(FindingRule):
    needs = (PROBE,)


@register
class PredictionMismatch(ProbeFindingRule):
    id = F.PREDICTION_MISMATCH
    severity = OFF
    description = F.RULES[F.PREDICTION_MISMATCH][1]


@register
class MeasuredDeadChannels(ProbeFindingRule):
    id = F.MEASURED_DEAD
    severity = WARNING
    description = F.RULES[F.MEASURED_DEAD][1]


@register
class LayerNotProbed(ProbeFindingRule):
    id = F.NOT_PROBED
    severity = WARNING
    description = F.RULES[F.NOT_PROBED][1]
