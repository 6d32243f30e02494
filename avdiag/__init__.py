"""avdiag: diagnostics for pre-trained audio-visual checkpoints.

One call per capability, each returning a typed result with ``to_dict()`` (the ``--json`` document)
and ``to_frame()``::

    import avdiag
    result = avdiag.inspect("ckpt.pt")                       # dead / abnormal BatchNorm channels
    result = avdiag.inspect("ckpt.pt", data=avdiag.DataSource("cremad:/data/CREMA-D"))
    changes = avdiag.diff("before.pt", "after.pt")
    rewrite = avdiag.reinit("ckpt.pt", "patched.pt", avdiag.ReinitOptions("abri", avdiag.AbriOptions(scope="layers")))
    conflict = avdiag.conflict("ckpt.pt", avdiag.DataSource("synthetic"))
    gate = avdiag.check(["models/"])
    monitor = avdiag.Monitor(model, "run.jsonl")                # while training: monitor.step(batch, logits)

Pipeline: ``load`` (safe checkpoint I/O) -> ``locate`` (layers, modalities, model resolution) ->
``measure`` -> ``rewrite`` -> ``report``; ``workflows`` composes them per command, ``cli`` is the
command line. Names are imported lazily, so ``import avdiag`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from avdiag._version import __version__

_EXPORTS = {
    "inspect": "avdiag.workflows.inspect",
    "InspectResult": "avdiag.workflows.inspect",
    "diff": "avdiag.workflows.diff",
    "DiffResult": "avdiag.workflows.diff",
    "reinit": "avdiag.workflows.reinit",
    "ReinitOptions": "avdiag.workflows.reinit",
    "ReinitResult": "avdiag.workflows.reinit",
    "AbriOptions": "avdiag.workflows.reinit",
    "ResetOptions": "avdiag.workflows.reinit",
    "RelearnOptions": "avdiag.workflows.reinit",
    "RecalibrateOptions": "avdiag.workflows.reinit",
    "conflict": "avdiag.workflows.conflict",
    "ConflictResult": "avdiag.workflows.conflict",
    "check": "avdiag.workflows.check",
    "CheckResult": "avdiag.workflows.check",
    "Policy": "avdiag.workflows.check",
    "Subject": "avdiag.workflows.subject",
    "LoadOptions": "avdiag.workflows.subject",
    "DataSource": "avdiag.workflows.datasource",
    "Monitor": "avdiag.monitor",
    "load_checkpoint": "avdiag.load",
    "Checkpoint": "avdiag.load",
    "Thresholds": "avdiag.measure.thresholds",
    "ABNORMAL_PRESETS": "avdiag.measure.thresholds",
    "ProbeThresholds": "avdiag.measure.thresholds",
    "SCHEMA_VERSION": "avdiag.results",
    "AvdiagError": "avdiag.errors",
    "UsageError": "avdiag.errors",
    "UnreadableCheckpointError": "avdiag.errors",
    "LfsPointerError": "avdiag.errors",
    "UnsafeCheckpointError": "avdiag.errors",
    "NothingToAnalyseError": "avdiag.errors",
    "DataError": "avdiag.errors",
    "ModelError": "avdiag.errors",
    "VerificationError": "avdiag.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'avdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
