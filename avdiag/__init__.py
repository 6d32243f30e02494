"""avdiag: diagnostics for pre-trained audio-visual checkpoints.

Pipeline: ``avdiag.load`` (safe checkpoint I/O) -> ``avdiag.locate`` (layers, modalities) ->
``avdiag.measure`` (static scan, activation probe, diff) -> ``avdiag.rewrite`` (ABRi, resets,
re-learning, recalibration) -> ``avdiag.report`` (terminal, JSON).
"""

__version__ = "0.1.0"

from avdiag.errors import AvdiagError  # noqa: E402
from avdiag.inspection import InspectResult, ProbeOptions, inspect_checkpoint  # noqa: E402
from avdiag.measure.probe import ProbeThresholds  # noqa: E402
from avdiag.load import Checkpoint, load_checkpoint  # noqa: E402
from avdiag.measure.diff import DiffResult, diff_checkpoints  # noqa: E402
from avdiag.measure.thresholds import ABNORMAL_PRESETS, Thresholds  # noqa: E402
from avdiag.rewrite.reinit import RewriteOptions, RewriteResult, reinit_checkpoint  # noqa: E402

__all__ = ["AvdiagError", "Checkpoint", "InspectResult", "ProbeOptions", "ProbeThresholds", "Thresholds",
           "ABNORMAL_PRESETS",
           "inspect_checkpoint", "load_checkpoint", "DiffResult", "diff_checkpoints", "RewriteOptions",
           "RewriteResult", "reinit_checkpoint", "__version__"]
