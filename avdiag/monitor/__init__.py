"""Training-time monitoring of audio-visual models: modality imbalance (OGM-GE), gradient conflict
(MMPareto), dead BatchNorm channels, held-out contribution and learning state, as a model trains.

:class:`Monitor` attaches to a plain PyTorch loop; :mod:`avdiag.monitor.lightning` wraps it as a
Lightning callback (Lightning itself is optional). The run log it writes is read by
:func:`avdiag.measure.runlog.read_run_log`, `avdiag report RUN.jsonl` and `avdiag check RUN.jsonl`.
"""

from avdiag.measure.runlog import RunLog, read_run_log
from avdiag.monitor.core import DEFAULT_COSINE_EVERY, MODULATIONS, Monitor

__all__ = ["DEFAULT_COSINE_EVERY", "MODULATIONS", "Monitor", "RunLog", "read_run_log"]
