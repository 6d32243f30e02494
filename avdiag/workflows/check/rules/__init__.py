"""Every rule of `avdiag check`, one class each, registered by id (see :mod:`.base`).

A new rule is one class in the module of its family (or a new module imported here): its id, default
severity, description, parameter schema, needs, and ``evaluate``. The policy, the runner and every
report pick it up from :data:`REGISTRY`. The order of the imports below is the order of the rules in
every report.
"""

from avdiag.workflows.check.rules import (  # noqa: F401  (importing registers the rules)
    files, static, baseline, probe, dormant, data, training,
)
from avdiag.workflows.check.rules.base import REGISTRY, CheckRule

RULE_IDS: tuple[str, ...] = tuple(REGISTRY)  # the built-in rules, registered by the imports above
# Rules that a suppression may silence: what a checkpoint holds, not whether it could be read.
SUPPRESSIBLE = frozenset(rid for rid, rule in REGISTRY.items() if rule.suppressible)

__all__ = ["REGISTRY", "RULE_IDS", "SUPPRESSIBLE", "CheckRule"]
