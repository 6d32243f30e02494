"""Findings: one problem, one stable rule id, one location. Shared by every command.

The severity vocabulary is shared too: a finding of `inspect` and a violation of `check` are each
``error``, ``warning`` or ``info``; a check rule may also be ``off`` (not evaluated). Policy files
may write ``note`` for ``info`` (SARIF's word for it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ERROR, WARNING, INFO, OFF = "error", "warning", "info", "off"
SEVERITIES = (ERROR, WARNING, INFO)  # what a finding or a violation can be
SEVERITY_RANK = {INFO: 0, WARNING: 1, ERROR: 2}
SEVERITY_ALIASES = {"note": INFO}

# What a check violation does to the run (the "outcome" of a violation in the check JSON).
OUTCOME_ERROR = "error"  # the file could not be analysed: exit 2
OUTCOME_FAIL = "fail"  # a policy violation: exit 1
OUTCOME_REPORT = "report"  # shown, does not fail the run (below fail_on, info, or suppressed)

# Stable rule ids (documented in the README). Never renumber or reuse.
NONFINITE = "nonfinite-tensor"
DEAD = "dead-channels"
ABNORMAL = "abnormal-affine"
CONSTANT = "constant-channels"
LOW_GAIN = "low-gain-channels"
COLLAPSED = "collapsed-filters"
POSSIBLY_DEAD = "possibly-dead-channels"
NO_BATCHNORM = "no-batchnorm"
MEASURED_DEAD = "measured-dead-channels"
PREDICTION_MISMATCH = "prediction-mismatch"
NOT_PROBED = "layer-not-probed"
MEASURED_NONFINITE = "measured-nonfinite-outputs"

RULES = {
    NONFINITE: (ERROR, "a tensor holds NaN or Inf values"),
    DEAD: (ERROR, "BN channels feeding an activation that (almost) never fire: z < dead_z"),
    ABNORMAL: (WARNING, "BN channels whose |gamma| and |beta| are both below the abnormal threshold"),
    CONSTANT: (INFO, "BN channels with effective scale s below constant_scale: output ~ beta"),
    LOW_GAIN: (INFO, "BN channels with |gamma| below low_gain"),
    COLLAPSED: (WARNING, "conv filters feeding a BN that are ~0 (norm below collapsed_filter x median)"),
    POSSIBLY_DEAD: (INFO, "channels that would be dead if an activation follows; the activation is unknown"),
    NO_BATCHNORM: (WARNING, "no BatchNorm layer found: the dead-channel scan had nothing to look at"),
    MEASURED_DEAD: (WARNING, "BN channels that never fire on the probed data (fire rate <= dead_rate)"),
    PREDICTION_MISMATCH: (INFO, "channels where the static prediction and the measurement disagree"),
    NOT_PROBED: (WARNING, "a BN layer of the checkpoint that the model never ran on the data"),
    MEASURED_NONFINITE: (ERROR, "BN channels whose outputs were NaN or infinite on the data (their other "
                                "measured verdicts are withheld)"),
}


def severity_named(name: object) -> str | None:
    """``name`` as one of error / warning / info / off (``note`` read as ``info``); None if it is none."""
    if not isinstance(name, str):
        return None
    name = SEVERITY_ALIASES.get(name, name)
    return name if name in SEVERITIES or name == OFF else None


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str
    location: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def finding(rule_id: str, location: str, message: str) -> Finding:
    return Finding(rule_id, RULES[rule_id][0], location, message)
