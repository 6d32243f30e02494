"""Activation probe: run the model on real data and measure how often each BN channel fires.

Statistics accumulate on the model's device with no per-batch host synchronisation and no
activation kept: per channel, the count of positions where the BN output exceeds the activation's
threshold (0 for ReLU-like activations, -3 for hardswish), and the mean, variance and max of the
BN output. Eval mode throughout; optional autocast on GPU.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from avdiag.locate import BNLayer
from avdiag.measure.moments import RunningMoments
from avdiag.measure.thresholds import ProbeThresholds
from avdiag.locate.resolve import ResolvedModel


@dataclass
class ChannelActivity:
    fire_rate: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    positions: int  # positions per channel seen (batch x spatial)


@dataclass
class ProbeRun:
    activity: dict[str, ChannelActivity]  # BN layer name -> measurements
    samples: int
    batches: int
    device: str
    model_source: str
    amp: bool
    missing_layers: list[str] = field(default_factory=list)  # BN layers the model never ran


class _Accumulator:
    """Per-layer running statistics on the device; nothing leaves it until `result()`."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.moments = RunningMoments()
        self.fire: torch.Tensor | None = None
        self.peak: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, out: torch.Tensor) -> None:
        x = out.detach()
        x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, C, positions)
        if x.dtype != torch.float32:
            x = x.float()
        # int32 counts and last-axis-first reductions: int64 / (0, 2)-axis ones run slower on CPU.
        fire = x.gt(self.threshold).sum(dim=2, dtype=torch.int32).sum(dim=0)
        peak = x.amax(dim=2).amax(dim=0)
        if self.fire is None:
            self.fire, self.peak = fire.long(), peak
        else:
            self.fire += fire
            torch.maximum(self.peak, peak, out=self.peak)
        self.moments.add(x)

    @property
    def positions(self) -> int:
        return self.moments.n

    def result(self) -> ChannelActivity:
        n = max(self.positions, 1)
        std = self.moments.variance.clamp_min(0).sqrt()
        return ChannelActivity((self.fire.double() / n).cpu().numpy(), self.moments.mean.cpu().numpy(),
                               std.cpu().numpy(), self.peak.cpu().numpy().astype(np.float64), self.positions)


def activation_threshold(layer: BNLayer) -> float:
    return -3.0 if layer.activation == "hardswish" else 0.0


def probe(resolved: ResolvedModel, layers: list[BNLayer], batches: Iterable[dict[str, torch.Tensor]],
          device: torch.device, amp: bool = False, progress: Callable[[int], None] | None = None) -> ProbeRun:
    """Run ``resolved`` over ``batches`` and measure every BN layer in ``layers``."""
    accumulators = {layer.name: _Accumulator(activation_threshold(layer)) for layer in layers}
    model = resolved.module.to(device)
    if not isinstance(model, torch.fx.GraphModule):  # exported programs are traced in eval mode already
        model.eval()
    samples = n_batches = 0
    autocast = torch.autocast(device.type) if amp and device.type == "cuda" else nullcontext()
    with ExitStack() as stack, torch.inference_mode():
        found = _instrument(model, resolved.name_prefix, accumulators, stack)
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with autocast:
                resolved(inputs)
            samples += len(batch["label"])
            n_batches += 1
            if progress:
                progress(len(batch["label"]))
    activity = {name: acc.result() for name, acc in accumulators.items() if acc.positions}
    missing = sorted(set(accumulators) - set(activity))
    if found == 0:
        missing = sorted(accumulators)
    return ProbeRun(activity, samples, n_batches, str(device), resolved.source, amp and device.type == "cuda",
                    missing)


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
