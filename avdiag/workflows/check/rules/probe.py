"""Rules on what the activation probe of `inspect --data` found (only when the model ran on the data)."""

from __future__ import annotations

from avdiag import findings
from avdiag.findings import ERROR, OFF, WARNING
from avdiag.workflows.check.rules.base import PROBE, register
from avdiag.workflows.check.rules.static import FindingRule


class ProbeFindingRule(FindingRule):
    needs = (PROBE,)


@register
class PredictionMismatch(ProbeFindingRule):
    id = findings.PREDICTION_MISMATCH
    severity = OFF
    description = findings.RULES[findings.PREDICTION_MISMATCH][1]


@register
class MeasuredDeadChannels(ProbeFindingRule):
    id = findings.MEASURED_DEAD
    severity = WARNING
    description = findings.RULES[findings.MEASURED_DEAD][1]


@register
class MeasuredNonfiniteOutputs(ProbeFindingRule):
    id = findings.MEASURED_NONFINITE
    severity = ERROR
    description = findings.RULES[findings.MEASURED_NONFINITE][1]


@register
class LayerNotProbed(ProbeFindingRule):
    id = findings.NOT_PROBED
    severity = WARNING
    description = findings.RULES[findings.NOT_PROBED][1]
