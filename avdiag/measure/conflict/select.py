"""Which method each layer uses (:mod:`avdiag.measure.conflict.layers`), chosen by timing them.

Per layer, the candidates are the exact methods that apply to the module (the generic ``vmap`` and
``loop`` only where no specialised one does), less those whose estimated multiply-adds exceed
:data:`PRUNE_FACTOR` times the cheapest estimate. On the first chunk of a run each remaining
candidate runs once on its first :data:`TRIAL_SAMPLES` samples (on a GPU, the whole chunk) and the
fastest runs the rest; every candidate gives the same products, so the trial costs time but no
accuracy. For a convolution the candidates include ``direct``, the per-sample
weight-gradient kernel a loop of batch-size-1 backward passes runs, so the chosen method is never
slower than the loop's on that layer (as timed on that chunk). The choice is remembered for the
module and its input shape for the rest of the process (a later call skips the trial), the way
``cudnn.benchmark`` remembers convolution algorithms.

A forced ``layer_method`` is used on every layer it applies to (``vmap`` and ``loop`` apply to
every module).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Hashable

import torch
from torch import nn

from avdiag.measure.conflict.layers import EXACT_METHODS, METHODS, Call, Env

PRUNE_FACTOR = 4.0
TRIAL_SAMPLES = 8  # samples a candidate is timed on (CPU; on a GPU the whole first chunk)
GENERIC = ("vmap", "loop")
_CHOICES: "weakref.WeakKeyDictionary[nn.Module, dict[Hashable, str]]" = weakref.WeakKeyDictionary()


def forget_choices() -> None:
    """Drop every remembered choice (the next run times its layers again)."""
    _CHOICES.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Selector:
    """Runs each layer's products with its chosen method; keeps what was chosen and the trial times.

    ``forced``: a method name used wherever it applies (tests, benchmarks); ``sketch``: a
    :class:`~avdiag.measure.conflict.sketch.Sketch`, used on every layer it applies to."""

    def __init__(self, forced: str | None = None, sketch=None):
        if forced is not None and forced not in EXACT_METHODS:
            raise ValueError(f"layer_method must be one of {', '.join(EXACT_METHODS)}; got {forced!r}")
        self.forced = forced
        self.sketch = sketch
        self.choices: dict[str, str] = {}  # layer -> method
        self.trials: dict[str, dict[str, float]] = {}  # layer -> method -> seconds per sample

    def candidates(self, call: Call, n: int, want_grads: bool, exact: bool = False) -> list[str]:
        """Applicable methods, cheapest estimate first, hopeless ones dropped."""
        if self.sketch is not None and not exact and METHODS["sketch"].applies(call):
            return ["sketch"]
        applicable = [m for m in EXACT_METHODS if METHODS[m].applies(call)]
        if self.forced in applicable and not exact:
            return [self.forced]
        names = [m for m in applicable if m not in GENERIC] or applicable
        if not names:
            raise ValueError(f"no per-sample method applies to {type(call.module).__name__}")
        costs = {m: METHODS[m].cost(call, n, want_grads) for m in names}
        best = min(costs.values())
        return sorted((m for m in names if costs[m] <= PRUNE_FACTOR * best), key=lambda m: (costs[m], m))

    def products(self, layer: str, call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
        """(n, 3) products of ``layer`` (with the batch gradients into ``env.grads`` when set)."""
        names = self.candidates(call, n, env.grads is not None)
        key = (tuple(call.x.shape[1:]), call.x.shape[0] // n, str(call.x.device), call.x.dtype,
               env.grads is not None, tuple(names))
        remembered = _CHOICES.setdefault(call.module, {})
        chosen = remembered.get(key) or (names[0] if len(names) == 1 else None)
        if chosen is not None:
            self.choices[layer] = chosen
            return METHODS[chosen].run(call, d1, d2, n, env)
        chosen, result = self._trial(layer, names, call, d1, d2, n, env)
        remembered[key] = chosen
        self.choices[layer] = chosen
        return result

    def _trial(self, layer: str, names: list[str], call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int,
               env: Env) -> tuple[str, torch.Tensor]:
        """Time every candidate on the chunk's first samples (the whole chunk on a GPU), keep the
        fastest one's result and run it on the rest."""
        device = call.output.device
        k = n if device.type == "cuda" else min(n, TRIAL_SAMPLES)
        r = call.output.shape[0] // n
        head = call.part(0, k, n)
        best = None
        times = {}
        for name in names:
            sink = env.grads.fork(0, k) if env.grads is not None else None
            _sync(device)
            start = time.perf_counter()
            result = METHODS[name].run(head, d1[:k * r], d2[:k * r], k, Env(env.budget, sink, env.sketch, env.layer))
            _sync(device)
            times[name] = (time.perf_counter() - start) / k
            if best is None or times[name] < times[best[0]]:
                best = (name, result, sink)
        self.trials[layer] = times
        name, results = best[0], [best[1]]
        if env.grads is not None:
            env.grads.merge(best[2])
        if k < n:
            sink = env.grads.fork(k, n) if env.grads is not None else None
            results.append(METHODS[name].run(call.part(k, n, n), d1[k * r:], d2[k * r:], n - k,
                                             Env(env.budget, sink, env.sketch, env.layer)))
            if sink is not None:
                env.grads.merge(sink)
        return name, torch.cat(results)

    def exact(self, layer: str, call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, budget: int) -> torch.Tensor:
        """Exact products by the cheapest estimate (to check the sketch against), no batch gradients."""
        name = self.candidates(call, n, False, exact=True)[0]
        return METHODS[name].run(call, d1, d2, n, Env(budget, None, None, layer))
