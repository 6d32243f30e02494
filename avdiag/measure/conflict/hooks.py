"""The module-products engine ("hooks"): exact per-sample gradient products without per-sample
gradients of the whole encoder.

One batched forward of a chunk of samples with forward hooks on every module that owns encoder
parameters, two backward passes from the pooled feature to those modules' outputs (cotangents:
the per-sample loss gradients at the pooled features), then per module the per-sample products
``<G1_i, G2_i>``, ``|G1_i|^2``, ``|G2_i|^2`` of its own parameters by the method chosen for that
layer (:mod:`~avdiag.measure.conflict.layers`, :mod:`~avdiag.measure.conflict.select`), summed over
the modules. The visual encoder sees the ``T`` frames of a clip folded into its batch
(:func:`avdiag.models.av.visual_features`): a sample's gradient is the sum over its frames, which
every method accounts for (rows per sample).

The batch gradients of the encoder parameters come out of the same products
(:class:`~avdiag.measure.conflict.layers.BatchGrads`), so a batch measured with per-sample cosines
costs no extra backward pass.

Applies to an encoder whose parameters each belong to one module, where every module that owns
parameters runs exactly once per forward and returns a tensor; otherwise
:class:`EngineUnsupported` sends the encoder to the whole-encoder ``vmap`` engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from avdiag.measure.conflict.gradients import Encoder
from avdiag.measure.conflict.layers import BatchGrads, Call, Env
from avdiag.measure.conflict.products import F64
from avdiag.measure.conflict.select import Selector


class EngineUnsupported(Exception):
    """The hooks engine cannot handle this encoder / call pattern: use the vmap engine."""


def hooks_apply(enc: Encoder) -> bool:
    return not enc.shares_parameters


def _detached(values: Iterable[Any]) -> list[Any]:
    return [v.detach() if isinstance(v, torch.Tensor) else v for v in values]


class Capture:
    """Forward hooks recording every parameterised module's inputs and output. The hook returns a
    clone of the output, so in-place ops downstream (``ReLU(inplace=True)``) leave the recorded
    output, the tensor differentiated against, intact. While :meth:`paused` the hooks record
    nothing (a method re-running a module)."""

    def __init__(self, enc: Encoder, stack: ExitStack):
        self.enc = enc
        self.own = [[p for p, owner in zip(enc.params, enc.owners) if owner == i] for i in range(len(enc.layers))]
        self.calls: list[list[Call]] = [[] for _ in enc.modules]
        self.problem: str | None = None
        self._paused = False
        for i, mod in enumerate(enc.modules):
            handle = mod.register_forward_hook(self._hook(i), with_kwargs=True)
            stack.callback(handle.remove)

    def _hook(self, i: int) -> Callable:
        def hook(mod, args, kwargs, output):
            if self._paused:
                return None
            if not isinstance(output, torch.Tensor):
                self.problem = f"{self.enc.layers[i]} returns a {type(output).__name__}"
                return None
            args = tuple(_detached(args))
            kwargs = dict(zip(kwargs, _detached(kwargs.values())))
            self.calls[i].append(Call(mod, self.own[i], args, kwargs, output))
            return output.clone()

        return hook

    def layer_calls(self) -> list[Call]:
        """The one call of every module; EngineUnsupported when a module ran more or less than once."""
        if self.problem:
            raise EngineUnsupported(self.problem)
        for name, calls in zip(self.enc.layers, self.calls):
            if len(calls) != 1:
                raise EngineUnsupported(f"{name} ran {len(calls)} times in one forward")
        return [c[0] for c in self.calls]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every recorded tensor (for the memory count)."""
        for calls in self.calls:
            for call in calls:
                yield call.output
                yield from (a for a in call.args if isinstance(a, torch.Tensor))

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def capture(encs: dict[str, Encoder], stack: ExitStack) -> dict[str, Capture]:
    """Hooks on every parameterised module of each encoder, removed when ``stack`` closes."""
    return {m: Capture(e, stack) for m, e in encs.items()}


def module_products(enc: Encoder, cap: Capture, feature: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                    selector: Selector, budget: int, grads: BatchGrads | None,
                    check: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, 3) float64 per-sample ``<g1_i, g2_i>``, ``|g1_i|^2``, ``|g2_i|^2`` over encoder ``enc`` for
    the (unit-scaled) cotangents ``c1``, ``c2`` at its pooled ``feature``; with ``grads``, the batch
    gradients of its parameters go there; with ``check``, also the exact products (when the selector
    sketches). Frees ``feature``'s graph."""
    calls = cap.layer_calls()
    outs = [c.output for c in calls]
    n = int(c1.shape[0])
    d1 = list(torch.autograd.grad(feature, outs, c1, retain_graph=True, allow_unused=True))
    d2 = list(torch.autograd.grad(feature, outs, c2, allow_unused=True))
    del outs
    total = torch.zeros(n, 3, dtype=F64, device=c1.device)
    exact = torch.zeros_like(total) if check else None
    with cap.paused():
        for i, (layer, call) in enumerate(zip(enc.layers, calls)):
            a = torch.zeros_like(call.output) if d1[i] is None else d1[i]
            b = torch.zeros_like(call.output) if d2[i] is None else d2[i]
            d1[i] = d2[i] = None  # each layer's output gradients are freed once used
            total += selector.products(layer, call, a, b, n, Env(budget, grads, selector.sketch, layer))
            if exact is not None:
                exact += selector.exact(layer, call, a, b, n, budget)
    return total, exact
