"""The training-time monitor: modality imbalance, gradient conflict and dead channels as a model trains."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avdiag.errors import ModelError, UsageError
from avdiag.measure.conflict import MMPARETO_GAMMA
from avdiag.measure.contribution import OGM_ALPHA, ogm_coefficients
from avdiag.measure.contribution.unimodal import true_class
from avdiag.measure.runlog import RunLogWriter
from avdiag.measure.thresholds import Thresholds
from avdiag.models.parts import AVParts, av_parts
from avdiag.monitor.epoch import heldout_metrics, learning_state_metrics
from avdiag.monitor.features import FeatureTap
from avdiag.monitor.interventions import EncoderGradients, MMParetoCombination, OGMGEModulation, measure_cosines
from avdiag.monitor.static import DeadChannelScan
from avdiag.monitor.tensorboard import open_tensorboard

MODALITIES = ("audio", "visual")
MODULATIONS = ("ogm-ge", "mmpareto")
DEFAULT_COSINE_EVERY = 100


class Monitor:
    """Watches an audio-visual model while a plain PyTorch loop trains it.

    ::

        monitor = Monitor(model, "run.jsonl", heldout=val_loader)
        for epoch in range(epochs):
            for batch in loader:                       # dicts with audio, visual, label
                a, v, logits = model(batch["audio"], batch["visual"])
                loss = F.cross_entropy(logits, batch["label"])
                optimizer.zero_grad()
                loss.backward()
                monitor.step(batch, logits, loss)      # after backward, before optimizer.step()
                optimizer.step()
            monitor.end_epoch()
        monitor.close()

    Every step, from the pooled features of the loop's own forward (caught by hooks on the encoders,
    no extra forward) and the head: OGM-GE scores, rho and coefficients (Peng, Wei et al., CVPR 2022,
    with ``ogm_alpha``), and the training-batch accuracy of the fused and uni-modal logits. Every
    ``cosine_every`` steps (0: never): the MMPareto cosine per encoder (Wei & Hu, ICML 2024) on the
    current batch, what :func:`avdiag.measure.conflict.measure_conflict` gives for that batch
    (one extra forward and two backward passes, BatchNorm as the model is set, running statistics
    restored, ``.grad`` untouched; :class:`~avdiag.monitor.interventions.EncoderGradients`). Every epoch
    (:meth:`end_epoch`): the static dead-channel scan of `avdiag inspect` (``dead_channels``), and
    with ``heldout`` (a small loader) fused / uni-modal accuracy and exact Shapley values, with
    ``learning_state`` (a small training-subset loader, needs ``heldout``) the D&R purity gap.

    ``modulation`` (off by default, logged when on): ``"ogm-ge"`` scales each encoder's conv-weight
    gradients by its coefficient, with generalisation-enhancement noise unless ``ge=False``;
    ``"mmpareto"`` replaces the encoders' gradients by MMPareto's combination (the loop's loss must
    then be the fused cross-entropy; the cosine is logged every step). See
    :mod:`avdiag.monitor.interventions`. ``modulation_epochs=(start, end)``: the epochs it acts in,
    from ``start`` up to, not including, ``end`` (None: to the end; OGM-GE's code modulates epochs 0-50).

    ``log``: the JSON Lines run log (:mod:`avdiag.measure.runlog`), one flushed line per logged step
    (every ``every`` steps, and every step with a cosine) and per epoch; None keeps records in
    :attr:`records` only (``keep_records``: also with a log; by default only without one, so that a
    long logged run does not hold every record in memory). ``tensorboard``: a log folder for
    TensorBoard scalars, written when ``torch.utils.tensorboard`` is importable (a warning otherwise).
    ``parts``: the model's :class:`~avdiag.models.parts.AVParts` for a custom model (built-in
    classifiers need none).

    The extra passes run at the loop's own precision settings (on CUDA, cuDNN's TF32 default), where
    the offline `avdiag conflict` forces full float32: on an H200 the cosines of the two agreed to
    about 1e-5; on the CPU to 1e-8.
    """

    def __init__(self, model: nn.Module, log: str | Path | None = None, *, parts: AVParts | None = None,
                 every: int = 1, cosine_every: int = DEFAULT_COSINE_EVERY, dead_channels: bool = True,
                 heldout: Iterable[dict] | None = None, learning_state: Iterable[dict] | None = None,
                 ogm_alpha: float = OGM_ALPHA, modulation: str | None = None, ge: bool = True,
                 mmpareto_gamma: float = MMPARETO_GAMMA, thresholds: Thresholds | None = None,
                 tensorboard: str | Path | None = None, seed: int = 0, keep_records: bool | None = None,
                 modulation_epochs: tuple[int, int | None] = (0, None)):
        _check_options(every, cosine_every, modulation, learning_state, heldout)
        self.modulation_epochs = _epoch_window(modulation_epochs)
        self.parts = parts if parts is not None else _parts_of(model)
        self.model = self.parts.model
        self.every, self.cosine_every, self.ogm_alpha = int(every), int(cosine_every), float(ogm_alpha)
        self.heldout, self.learning_state, self.seed = heldout, learning_state, seed
        self.modulation = modulation
        self.scan = DeadChannelScan(self.parts, thresholds) if dead_channels else None
        self._ogm_ge = OGMGEModulation(self.parts, ge, seed) if modulation == "ogm-ge" else None
        self._gradients = EncoderGradients(self.parts)
        self._mmpareto = MMParetoCombination(self._gradients, mmpareto_gamma) if modulation == "mmpareto" else None
        self.step_count, self.epoch = 0, 0
        self.records: list[dict[str, Any]] = []
        self.keep_records = log is None if keep_records is None else keep_records
        self._epoch_steps: list[dict[str, Any]] = []
        self._start = time.perf_counter()
        config = {"every": self.every, "cosine_every": self.cosine_every, "dead_channels": dead_channels,
                  "heldout": heldout is not None, "learning_state": learning_state is not None,
                  "ogm_alpha": self.ogm_alpha, "modulation": modulation, "ge": ge if modulation == "ogm-ge" else None,
                  "mmpareto_gamma": mmpareto_gamma if modulation == "mmpareto" else None, "seed": seed,
                  "modulation_epochs": list(self.modulation_epochs) if modulation else None,
                  "dead_z": (thresholds or Thresholds()).dead_z}
        self.header = {"config": config, "model": self._model_info(),
                       "initial": {"dead_channels": self.scan.counts()} if self.scan else {}}
        self._writer = RunLogWriter(log, config, self.header["model"], self.header["initial"]) if log else None
        self._tb = open_tensorboard(tensorboard) if tensorboard is not None else None
        self.tap = FeatureTap(self.parts)  # last: a failed construction leaves no hooks behind

    # ---- per step -------------------------------------------------------------------------------

    def step(self, batch: dict[str, Any], outputs: Any = None, loss: Any = None) -> dict[str, Any] | None:
        """Record one training step; call it after ``loss.backward()`` and before ``optimizer.step()``.

        ``batch``: the dict the model ran on (``audio``, ``visual``, ``label``). ``outputs``: the
        fused logits the loop computed (a ``(B, classes)`` tensor; anything else and they are
        recomputed from the caught features by the head alone). ``loss``: logged when given.
        Returns the step record when this step is logged, else None.
        """
        feats = self.tap.take(_batch_size(batch))
        self.step_count += 1
        label = torch.as_tensor(batch["label"]).to(feats["audio"].device).long()
        record: dict[str, Any] = {"kind": "step", "step": self.step_count, "epoch": self.epoch,
                                  "batch_size": int(label.shape[0]), "time_s": time.perf_counter() - self._start}
        if loss is not None:
            record["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        record.update(self._cheap_metrics(feats, label, outputs))
        if self.cosine_every and self.step_count % self.cosine_every == 0 and self._mmpareto is None:
            record["conflict"] = self._cosines(batch, label)
        record.update(self._intervene(batch, label, record["ogm"]["coefficients"]))
        self._epoch_steps.append(record)
        if self.step_count % self.every == 0 or "conflict" in record:
            self._emit(record)
            return record
        return None

    def _cheap_metrics(self, feats: dict[str, torch.Tensor], label: torch.Tensor, outputs: Any) -> dict[str, Any]:
        with torch.no_grad():
            uni = self.parts.unimodal(feats["audio"], feats["visual"])
            fused = _fused_logits(outputs, label.shape[0], uni["audio"].shape[-1])
            if fused is None:
                fused = self.parts.fuse(feats["audio"], feats["visual"])
            sums = []
            for m in MODALITIES:
                ok, prob = true_class(uni[m], label)
                sums += [prob.double().sum(), ok.double().sum()]
            sums.append(true_class(fused.detach(), label)[0].double().sum())
            s_a, ok_a, s_v, ok_v, ok_f = torch.stack(sums).tolist()  # one device sync per step
        n = int(label.shape[0])
        ogm = ogm_coefficients(s_a, s_v, self.ogm_alpha)
        return {"ogm": {"scores": {"audio": s_a, "visual": s_v}, **ogm},
                "train_accuracy": {"fused": ok_f / n, "audio": ok_a / n, "visual": ok_v / n}}

    def _cosines(self, batch: dict[str, Any], label: torch.Tensor) -> dict[str, Any]:
        self.tap.enabled = False
        try:
            figures = measure_cosines(self._gradients, _inputs(batch, label.device), label)
        finally:
            self.tap.enabled = True
        return {m: {k: f[k] for k in ("cos", "magnitude_ratio", "conflict")} for m, f in figures.items()}

    def _modulating(self) -> bool:
        start, end = self.modulation_epochs
        return start <= self.epoch and (end is None or self.epoch < end)

    def _intervene(self, batch: dict[str, Any], label: torch.Tensor, coefficients: dict[str, float]) -> dict:
        if not self._modulating():
            return {}
        if self._ogm_ge is not None:
            return {"interventions": [self._ogm_ge.apply(coefficients)]}
        if self._mmpareto is not None:
            self.tap.enabled = False
            try:
                done = self._mmpareto.apply(_inputs(batch, label.device), label)
            finally:
                self.tap.enabled = True
            conflict = {m: {k: f[k] for k in ("cos", "magnitude_ratio", "conflict")}
                        for m, f in done["modalities"].items()}
            return {"interventions": [done], "conflict": conflict}
        return {}

    # ---- per epoch ------------------------------------------------------------------------------

    def end_epoch(self) -> dict[str, Any]:
        """Close the epoch: its record (step means, dead channels, held-out metrics), logged and returned."""
        record: dict[str, Any] = {"kind": "epoch", "epoch": self.epoch, "step": self.step_count,
                                  "steps": len(self._epoch_steps), "time_s": time.perf_counter() - self._start,
                                  "means": _means(self._epoch_steps)}
        if self.scan is not None:
            record["dead_channels"] = self.scan.counts()
        self.tap.enabled = False
        try:
            if self.heldout is not None:
                record["heldout"] = heldout_metrics(self.parts, self.heldout, self._device(), self.ogm_alpha)
            if self.learning_state is not None:
                record["learning_state"] = learning_state_metrics(self.parts, self.learning_state, self.heldout,
                                                                  self._device(), self.seed)
        finally:
            self.tap.enabled = True
        self._emit(record)
        self.epoch += 1
        self._epoch_steps = []
        return record

    # ---- output ---------------------------------------------------------------------------------

    def _emit(self, record: dict[str, Any]) -> None:
        if self.keep_records:
            self.records.append(record)
        if self._writer is not None:
            self._writer.write(record)
        if self._tb is not None:
            self._tb.write(record)

    def close(self) -> None:
        """Remove the hooks and close the run log and TensorBoard writer (records stay in :attr:`records`)."""
        self.tap.remove()
        if self._writer is not None:
            self._writer.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _model_info(self) -> dict[str, Any]:
        return {"class": type(self.model).__name__, "unimodal_source": self.parts.unimodal_source,
                "feature_order": list(self.parts.feature_order),
                "encoder_parameters": {m: sum(p.numel() for p in enc.parameters())
                                       for m, enc in self.parts.encoders.items()}}


def _epoch_window(window: Any) -> tuple[int, int | None]:
    """``(start, end)``: modulate from epoch ``start`` up to, not including, ``end`` (None: to the end),
    as OGM-GE's ``modulation_starts`` / ``modulation_ends``."""
    try:
        start, end = window
        start, end = int(start), None if end is None else int(end)
    except (TypeError, ValueError) as e:
        raise UsageError(f"monitor: modulation_epochs must be (start, end) epochs, got {window!r}") from e
    if start < 0 or (end is not None and end <= start):
        raise UsageError(f"monitor: modulation_epochs must have 0 <= start < end, got {window!r}")
    return start, end


def _check_options(every: int, cosine_every: int, modulation: str | None, learning_state: Any, heldout: Any) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"monitor: every must be a whole number >= 1, got {every!r}")
    if isinstance(cosine_every, bool) or not isinstance(cosine_every, int) or cosine_every < 0:
        raise UsageError(f"monitor: cosine_every must be a whole number >= 0 (0: off), got {cosine_every!r}")
    if modulation is not None and modulation not in MODULATIONS:
        raise UsageError(f"monitor: modulation must be None, {' or '.join(map(repr, MODULATIONS))}; "
                         f"got {modulation!r}")
    if learning_state is not None and heldout is None:
        raise UsageError("monitor: learning_state compares a training subset with held-out data: give heldout too")


def _parts_of(model: nn.Module) -> AVParts:
    try:
        return av_parts(model)
    except TypeError as e:
        raise ModelError(f"monitor: {e}; pass parts=avdiag.models.parts.AVParts(...) for a custom model") from None


def _batch_size(batch: Any) -> int:
    if not isinstance(batch, dict) or "label" not in batch:
        raise UsageError("monitor.step: the batch must be a dict with audio, visual and label")
    return len(batch["label"])


def _inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {m: torch.as_tensor(batch[m]).to(device) for m in MODALITIES}


def _fused_logits(outputs: Any, n: int, n_classes: int) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor) and tuple(outputs.shape) == (n, n_classes):
        return outputs
    return None


def _means(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the epoch's steps of rho, the coefficients, the accuracies, the loss and the cosines."""
    def mean(values: list[float]) -> float:
        values = [v for v in values if v is not None and not math.isnan(v)]
        return math.fsum(values) / len(values) if values else math.nan

    out: dict[str, Any] = {
        "rho": {m: mean([s["ogm"]["rho"][m] for s in steps]) for m in MODALITIES},
        "coefficients": {m: mean([s["ogm"]["coefficients"][m] for s in steps]) for m in MODALITIES},
        "train_accuracy": {k: mean([s["train_accuracy"][k] for s in steps]) for k in ("fused", *MODALITIES)},
        "loss": mean([s["loss"] for s in steps if "loss" in s])}
    with_cos = [s for s in steps if "conflict" in s]
    if with_cos:
        out["cos"] = {m: mean([s["conflict"][m]["cos"] for s in with_cos]) for m in MODALITIES}
    return out
