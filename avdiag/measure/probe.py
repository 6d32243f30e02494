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
from avdiag.locate.resolve import ResolvedModel


@dataclass(frozen=True)
class ProbeThresholds:
    dead_rate: float = 1e-3  # measured dead: fires at <= this fraction of positions (or constant and ~0)
    rare_rate: float = 0.05  # rarely active: fires at <= this fraction (and is not dead)
    constant_std: float = 1e-3  # measured constant: BN output std below this

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


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
    """Per-layer running statistics on the device; nothing leaves it until `result()`.

    Mean and variance merge per-batch (mean, centred sum of squares) pairs with Chan et al.'s
    formula in float64, so a constant channel has variance exactly 0 whatever its value.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.fire: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.peak: torch.Tensor | None = None
        self.positions = 0

    @torch.no_grad()
    def add(self, out: torch.Tensor) -> None:
        x = out.detach()
        x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, C, positions)
        if x.dtype != torch.float32:
            x = x.float()
        n_bc = x.shape[2]
        n = x.shape[0] * n_bc
        # Per-batch reductions stay in float32 / int32 over the last axis (float64 / int64 or
        # (0, 2)-axis reductions, and var_mean, run several times slower on CPU).
        fire = x.gt(self.threshold).sum(dim=2, dtype=torch.int32).sum(dim=0)
        peak = x.amax(dim=2).amax(dim=0)
        mean, m2 = _moments(x)
        if self.fire is None:
            self.fire, self.mean, self.m2, self.peak = fire.long(), mean, m2, peak
        else:
            total = self.positions + n
            delta = mean - self.mean
            self.mean += delta * (n / total)
            self.m2 += m2 + delta.square() * (self.positions * n / total)
            self.fire += fire
            torch.maximum(self.peak, peak, out=self.peak)
        self.positions += n

    def result(self) -> ChannelActivity:
        n = max(self.positions, 1)
        std = (self.m2 / n).clamp_min(0).sqrt()
        return ChannelActivity((self.fire.double() / n).cpu().numpy(), self.mean.cpu().numpy(), std.cpu().numpy(),
                               self.peak.cpu().numpy().astype(np.float64), self.positions)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and centred sum of squares of a (B, C, P) tensor, in float64.

    Each (b, c) row is shifted by its first value before summing, so a constant channel gives
    exactly zero variance and there is no cancellation when |mean| >> std; the rows are then merged
    over the batch with Chan et al.'s formula.
    """
    p = x.shape[2]
    shift = x[:, :, :1]
    d = x - shift
    sum_d = d.sum(dim=2).double()
    sq = torch.linalg.vector_norm(d, dim=2).double().square()
    mean_bc = shift[:, :, 0].double() + sum_d / p
    m2_bc = (sq - sum_d.square() / p).clamp_min(0)
    mean = mean_bc.mean(dim=0)
    return mean, m2_bc.sum(dim=0) + p * (mean_bc - mean).square().sum(dim=0)


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
