"""Activation probe: run the model on real data and measure how often each BN channel fires.

Statistics accumulate on the model's device with no per-batch host synchronisation and no
activation kept: per channel, the count of positions where the BN output exceeds the activation's
threshold (0 for ReLU-like activations, -3 for hardswish), the count of inf/NaN outputs, and the
mean, variance and max of the BN output. Per batch only a few large reductions run over the last
axis of each BN output; their (batch, channel) results are merged once, at the end (or when
enough are pending), in float64. Eval mode throughout, TF32 off unless asked for, optional autocast
on GPU (bfloat16 where supported, else float16).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from avdiag.locate import BNLayer
from avdiag.locate.resolve import ResolvedModel, out_of_memory_as_error
from avdiag.measure.moments import PendingRows, RunningMoments, Scratch, row_sums, shifted_var_mean
from avdiag.measure.precision import amp_active, amp_dtype_name, autocast, f32, full_fp32
from avdiag.measure.thresholds import ProbeThresholds  # noqa: F401  (re-exported: probe thresholds live here too)

# Verdicts that rest on the output's standard deviation: under autocast the BN outputs are rounded
# to 8 (bfloat16) or 11 (float16) significant bits, so a std near the 1e-3 threshold is approximate.
STD_VERDICTS = ("measured_constant_channels",)


@dataclass
class ChannelActivity:
    fire_rate: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    positions: int  # positions per channel seen (batch x spatial)
    nonfinite: np.ndarray | None = None  # per channel, how many outputs were inf or NaN

    @property
    def nonfinite_count(self) -> np.ndarray:
        return self.nonfinite if self.nonfinite is not None else np.zeros(len(self.fire_rate), dtype=np.int64)

    @property
    def nonfinite_rate(self) -> np.ndarray:
        return self.nonfinite_count / max(self.positions, 1)


@dataclass
class ProbeRun:
    activity: dict[str, ChannelActivity]  # BN layer name -> measurements
    samples: int
    batches: int
    device: str
    model_source: str
    amp: bool
    missing_layers: list[str] = field(default_factory=list)  # BN layers the model never ran
    amp_dtype: str | None = None  # "bfloat16" / "float16" when autocast ran
    tf32: bool = False  # TF32 matmuls / convolutions were allowed (the user opted in)

    def precision_dict(self) -> dict:
        """How precisely the run measured: ``amp`` (autocast ran), ``amp_dtype``, ``tf32``."""
        return {"amp": self.amp, "amp_dtype": self.amp_dtype, "tf32": self.tf32}


class _Accumulator:
    """Per-layer statistics on the device; nothing leaves it until `result()`.

    Per batch: the fire count, max and finite count of every (batch, channel) row and its moments,
    all kept as (B, C) tensors and merged later. On a GPU the moments come from
    :func:`avdiag.measure.moments.shifted_var_mean` (eight kernels a layer and batch in all, where they
    were ten: a small model's pass is launch-bound); on the CPU from
    :func:`avdiag.measure.moments.row_sums` in the shared scratch buffer (measured faster there, with
    flat memory).
    """

    def __init__(self, threshold: float, scratch: Scratch | None = None):
        self.threshold = threshold
        self.scratch = scratch  # the CPU's shared temporaries (None: fresh ones, as on a GPU)
        self.moments = RunningMoments()
        self._rows = PendingRows(("fire", "peak", "finite"))
        self.fire: torch.Tensor | None = None
        self.peak: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, out: torch.Tensor) -> None:
        x = out.detach()
        x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, C, positions)
        if not x.is_floating_point():
            x = x.float()
        p = x.shape[2]
        if x.shape[0] * p == 0:
            return
        if self.scratch is None:
            self._add_few_kernels(x, p)
        else:
            self._add_in_scratch(x, p, self.scratch)
        if self._rows.full:
            self._fold()

    def _add_few_kernels(self, x: torch.Tensor, p: int) -> None:
        self.moments.add_mean_var(p, *shifted_var_mean(x))
        self._rows.add(p, fire=x.gt(self.threshold).sum(dim=2, dtype=torch.int32), peak=x.amax(dim=2),
                       finite=x.isfinite().sum(dim=2, dtype=torch.int32))

    def _add_in_scratch(self, x: torch.Tensor, p: int, scratch: Scratch) -> None:
        shift, total, norm = row_sums(x, scratch)
        # int32 counts over the last axis: int64 / (0, 2)-axis ones run slower on CPU.
        above = torch.gt(x, self.threshold, out=scratch.get(x.shape, torch.bool, x.device))
        fire = above.sum(dim=2, dtype=torch.int32)
        self._rows.add(p, fire=fire, peak=x.amax(dim=2), finite=p - _count_nonfinite(x, total))
        self.moments.add_rows(p, shift, total, norm)

    def _fold(self) -> None:
        for p, rows in self._rows.take().items():
            fire = rows["fire"].sum(dim=0, dtype=torch.int64)
            nonfinite = p * rows["finite"].shape[0] - rows["finite"].sum(dim=0, dtype=torch.int64)
            peak = f32(rows["peak"].amax(dim=0))
            if self.fire is None:
                self.fire, self.peak, self.nonfinite = fire, peak, nonfinite
            else:  # not in place: the totals may be inference tensors, read outside inference mode
                self.fire = self.fire + fire
                self.nonfinite = self.nonfinite + nonfinite
                self.peak = torch.maximum(self.peak, peak)  # NaN propagates, as it should

    @property
    def positions(self) -> int:
        return self.moments.n

    def result(self) -> ChannelActivity:
        self._fold()
        n = max(self.positions, 1)
        std = self.moments.variance.clamp_min(0).sqrt()
        return ChannelActivity((self.fire.double() / n).cpu().numpy(), self.moments.mean.cpu().numpy(),
                               std.cpu().numpy(), self.peak.cpu().numpy().astype(np.float64), self.positions,
                               self.nonfinite.cpu().numpy())


def _count_nonfinite(x: torch.Tensor, row_total: torch.Tensor) -> torch.Tensor:
    """Per (b, c) row, how many values are inf or NaN (int32), counted only for a batch whose row sums
    show a non-finite value: a row holding one always sums to inf or NaN (and one whose finite sums
    overflow is counted too, finding none). On the CPU, where looking costs nothing, most batches are
    then never scanned a second time."""
    if math.isfinite(float(row_total.sum())):
        return torch.zeros(row_total.shape, dtype=torch.int32, device=row_total.device)
    return x.isfinite().logical_not().sum(dim=2, dtype=torch.int32)


def activation_threshold(layer: BNLayer) -> float:
    return -3.0 if layer.activation == "hardswish" else 0.0


def probe(resolved: ResolvedModel, layers: list[BNLayer], batches: Iterable[dict[str, torch.Tensor]],
          device: torch.device, amp: bool = False, progress: Callable[[int], None] | None = None, *,
          tf32: bool = False, collectors: Sequence[Any] = ()) -> ProbeRun:
    """Run ``resolved`` over ``batches`` and measure every BN layer in ``layers``.

    ``amp``: autocast on CUDA (bfloat16 where the GPU supports it, else float16); the std-based
    verdicts are then approximate (:func:`avdiag.measure.activity.approximate_verdicts`).
    ``tf32``: allow TF32 matmuls and convolutions (off by default: the measurement runs in full
    float32). Running out of memory is a one-line ModelError saying what to reduce.
    ``collectors``: more measurements that share the forward pass, each with
    ``attach(model, name_prefix, stack)`` (e.g. :class:`avdiag.measure.dormant.DormantCollector`).
    """
    device = torch.device(device)
    scratch = Scratch() if device.type == "cpu" else None  # the CUDA caching allocator reuses blocks itself
    accumulators = {layer.name: _Accumulator(activation_threshold(layer), scratch) for layer in layers}
    samples = n_batches = 0
    with ExitStack() as stack:
        stack.enter_context(out_of_memory_as_error())
        model = resolved.to(device)
        if not isinstance(model, torch.fx.GraphModule):  # exported programs are traced in eval mode already
            model.eval()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(full_fp32(device, enabled=not tf32))
        found = _instrument(model, resolved.name_prefix, accumulators, stack)
        for collector in collectors:
            collector.attach(model, resolved.name_prefix, stack)
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with autocast(device, amp):
                resolved(inputs)
            samples += len(batch["label"])
            n_batches += 1
            if progress:
                progress(len(batch["label"]))
        activity = {name: acc.result() for name, acc in accumulators.items() if acc.positions}
    missing = sorted(set(accumulators) - set(activity))
    if found == 0:
        missing = sorted(accumulators)
    return ProbeRun(activity, samples, n_batches, str(device), resolved.source, amp_active(device, amp),
                    missing, amp_dtype_name(device, amp), tf32)


def _instrument(model: nn.Module, prefix: str, accumulators: dict[str, _Accumulator], stack: ExitStack) -> int:
    """Attach the accumulators: forward hooks on BN modules, or taps in a torch.fx graph."""
    if isinstance(model, torch.fx.GraphModule) and not _bn_modules(model, prefix, accumulators):
        return _tap_fx_graph(model, accumulators, stack)
    count = 0
    for name, module in _bn_modules(model, prefix, accumulators):
        handle = module.register_forward_hook(lambda _m, _i, out, acc=accumulators[name]: acc.add(out))
        stack.callback(handle.remove)
        count += 1
    return count


def _bn_modules(model: nn.Module, prefix: str, accumulators: dict[str, _Accumulator]):
    return [(prefix + n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and prefix + n in accumulators]


def _tap_fx_graph(gm: torch.fx.GraphModule, accumulators: dict[str, _Accumulator], stack: ExitStack) -> int:
    """Insert a recording call after every batch_norm op of an exported program's graph."""
    graph = gm.graph
    original = list(graph.nodes)
    taps = []
    for node in original:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if getattr(weight, "op", None) != "get_attr":
            continue
        name = str(weight.target).rsplit(".", 1)[0]
        if name not in accumulators:
            continue
        out = node
        if "legit" in str(node.target) or "native" in str(node.target):  # tuple output: take item 0
            out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
            if out is None:
                continue
        with graph.inserting_after(out):
            taps.append(graph.call_function(_make_tap(accumulators[name]), (out,)))
    gm.recompile()

    def undo() -> None:
        for tap in taps:
            graph.erase_node(tap)
        gm.recompile()

    stack.callback(undo)
    return len(taps)


def _make_tap(acc: _Accumulator) -> Callable[[torch.Tensor], None]:
    def avdiag_probe_tap(x: torch.Tensor) -> None:
        acc.add(x)

    return avdiag_probe_tap
