"""The monitor as a Lightning callback (``pip install avdiag[lightning]``; avdiag never requires it).

::

    from avdiag.monitor.lightning import MonitorCallback
    trainer = lightning.Trainer(callbacks=[MonitorCallback("run.jsonl", model_attr="model")])

The LightningModule's ``training_step`` runs the audio-visual model on a dict batch (``audio``,
``visual``, ``label``); the callback builds a :class:`~avdiag.monitor.Monitor` on that model when
fitting starts (``model_attr`` names the attribute that holds it; None: the LightningModule itself),
records each step in ``on_before_optimizer_step`` (after backward, where OGM-GE's modulation must act)
and closes the epoch in ``on_train_epoch_end``. Keyword options go to :class:`Monitor`.

``lightning`` (or the older ``pytorch_lightning``) is imported when :func:`MonitorCallback` is
called, never when this module is imported.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from avdiag.errors import UsageError
from avdiag.monitor.core import Monitor


def lightning_callback_base() -> type:
    """Lightning's ``Callback`` class, or UsageError when Lightning is not installed."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).Callback
        except ImportError:
            continue
    raise UsageError("the Lightning callback needs Lightning: pip install 'avdiag[lightning]'")


def MonitorCallback(log: str | Path | None = None, *, model_attr: str | None = "model", **options: Any):  # noqa: N802
    """A Lightning ``Callback`` that runs a :class:`Monitor` (see the module docstring)."""
    base = lightning_callback_base()

    class _MonitorCallback(base):
        def __init__(self) -> None:
            super().__init__()
            self.monitor: Monitor | None = None
            self._batch: Any = None

        def on_fit_start(self, trainer, pl_module) -> None:
            if model_attr and not hasattr(pl_module, model_attr):
                raise UsageError(f"MonitorCallback: the LightningModule has no attribute {model_attr!r} "
                                 "(model_attr names the audio-visual model; None: the module itself)")
            model = getattr(pl_module, model_attr) if model_attr else pl_module
            self.monitor = Monitor(model, log, **options)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._batch = batch

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if self.monitor is not None and self._batch is not None:
                self.monitor.step(self._batch)
                self._batch = None

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.monitor is not None:
                self.monitor.end_epoch()

        def on_fit_end(self, trainer, pl_module) -> None:
            if self.monitor is not None:
                self.monitor.close()

    return _MonitorCallback()
