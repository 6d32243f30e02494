"""What each BatchNorm feeds, read from the model itself (a built-in architecture or ``--model``).

First torch.fx: the model is traced symbolically and the users of every BN call are read from the
graph. A model that does not trace (data-dependent control flow) is run once on a small synthetic
batch instead, recording every torch call (a ``TorchFunctionMode``) and every BN output (forward
hooks): the calls that take a BN's output are what it feeds. Pass-through steps that keep a
channel's sign (dropout, identity, pooling) are followed to the next real consumer, so a BN ->
max-pool -> ReLU counts as feeding the ReLU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from avdiag.locate.graph import GraphFact, normalise_op
from avdiag.locate.resolve import ResolvedModel

_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Threshold, "threshold"), (nn.LeakyReLU, "leaky_relu"), (nn.PReLU, "prelu"), (nn.RReLU, "rrelu"),
    (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Mish, "mish"), (nn.ELU, "elu"), (nn.SELU, "selu"),
    (nn.CELU, "celu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Softplus, "softplus"),
    (nn.modules.conv._ConvNd, "conv"), (nn.Linear, "linear"), (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.Identity, "identity"), (nn.modules.dropout._DropoutNd, "dropout"), (nn.Flatten, "flatten"),
)
_PASS_THROUGH = {"identity", "dropout", "contiguous", "clone", "pool"}
_METADATA = {"get", "size", "dim", "numel", "shape", "is_floating_point", "device", "dtype", "requires_grad",
             "is_contiguous", "data_ptr", "stride", "element_size", "storage_offset", "len"}
_FOLLOW_DEPTH = 4
_SIZES = (32, 64, 128, 224)


def model_facts(resolved: ResolvedModel) -> tuple[dict[str, GraphFact], str]:
    """Checkpoint BN layer name -> what it feeds in ``resolved``'s module, and how that was read: "fx",
    "hooks" (a synthetic run), or "none" when neither worked."""
    module = resolved.module
    facts, how = _fx_facts(module), "fx"
    if facts is None:
        batches = synthetic_batches(module, single_input=len(resolved.inputs) == 1)
        facts, how = hook_facts(module, resolved, batches), "hooks"
    if not facts:
        return {}, "none"
    return {resolved.name_prefix + name: fact for name, fact in facts.items()}, how


def hook_facts(module: nn.Module, run: Any, batches: list[Any]) -> dict[str, GraphFact]:
    """What each BN feeds, from one call ``run(batch)`` that succeeds on the first workable ``batch``."""
    names = {id(m): n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for batch in batches:
        recorder = _Recorder()
        outputs: dict[int, tuple[str, int, torch.Tensor]] = {}  # id -> (BN name, calls made so far, output)

        def keep(bn: nn.Module, _inputs: Any, out: Any) -> None:  # returns None: the output stays as it is
            outputs.setdefault(id(out), (names[id(bn)], len(recorder.calls), out))

        handles = [m.register_forward_hook(keep) for m in module.modules() if id(m) in names]
        modes = [(m, m.training) for m in module.modules()]
        module.eval()  # a BN in training mode would move its running statistics
        try:
            with torch.no_grad(), recorder:
                run(batch)
        except Exception:
            continue  # the model does not take this synthetic batch: try the next size
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return _facts_from_calls(module, recorder.calls, outputs)
    return {}


def synthetic_batches(module: nn.Module, single_input: bool) -> list[dict[str, torch.Tensor]]:
    """Small random batches of a few spatial sizes, shaped as avdiag's data would be for this model, on the
    model's device."""
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if (first is not None and single_input) else 3
    device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batches = [{"visual": torch.randn(2, channels, 1, s, s, generator=g), "audio": torch.randn(2, s, s, generator=g),
                "label": torch.zeros(2, dtype=torch.long)} for s in _SIZES]
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


# ---- torch.fx ------------------------------------------------------------------------------------

def _fx_facts(module: nn.Module) -> dict[str, GraphFact] | None:
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception:
        return None  # does not trace symbolically: the synthetic run decides
    modules = dict(traced.named_modules())
    kinds: dict[str, set[str]] = {}
    convs: dict[str, str | None] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            kinds.setdefault(node.target, set()).update(_fx_consumers(node, modules, _FOLLOW_DEPTH))
            source = node.args[0] if node.args else None
            convs[node.target] = _fx_conv(source, modules)
    return {name: GraphFact(_one(k), modules[name].eps, convs[name]) for name, k in kinds.items()}


def _fx_consumers(node: Any, modules: dict[str, nn.Module], depth: int) -> set[str]:
    if not node.users:
        return {"none"}
    out: set[str] = set()
    for user in node.users:
        kind = _fx_kind(user, modules)
        if kind in _PASS_THROUGH and depth > 0:
            out |= _fx_consumers(user, modules, depth - 1)
        else:
            out.add(kind)
    return out


def _fx_kind(node: Any, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return module_kind(modules[node.target])
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if _op_name(name) == "hardtanh":
            return _hardtanh_of(node.args[1:], node.kwargs)
        return _op_name(name)
    return "none" if node.op == "output" else node.op


def _fx_conv(node: Any, modules: dict[str, nn.Module]) -> str | None:
    if getattr(node, "op", None) == "call_module" and isinstance(modules.get(node.target), nn.modules.conv._ConvNd):
        return node.target
    return None


# ---- a synthetic run -----------------------------------------------------------------------------

class _Recorder(TorchFunctionMode):
    """Every torch call of a forward pass: (op name, ids of its tensor inputs, its output). Outputs are
    kept alive for the run, so no tensor id is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[int], Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(getattr(func, "__name__", str(func)))
        if name == "hardtanh":
            name = _hardtanh_of(args[1:], kwargs)
        self.calls.append((name, {id(t) for t in tensors_in((args, kwargs))}, out))
        return out


def _facts_from_calls(module: nn.Module, calls: list[tuple[str, set[int], Any]],
                      outputs: dict[int, tuple[str, int, torch.Tensor]]) -> dict[str, GraphFact]:
    bns = {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    kinds: dict[str, set[str]] = {}
    for tensor_id, (name, start, _) in outputs.items():
        kinds.setdefault(name, set()).update(_call_consumers(tensor_id, calls, start, _FOLLOW_DEPTH))
    return {name: GraphFact(_one(k), bns[name].eps, None) for name, k in kinds.items()}


def _call_consumers(tensor_id: int, calls: list[tuple[str, set[int], Any]], start: int, depth: int) -> set[str]:
    """The ops that read tensor ``tensor_id`` among ``calls[start:]``. An in-place op (it returns the tensor
    itself) is the last reader: after it the tensor holds that op's output, not the value it was."""
    out: set[str] = set()
    for position in range(start, len(calls)):
        name, inputs, result = calls[position]
        if tensor_id not in inputs or name in _METADATA:
            continue
        in_place = isinstance(result, torch.Tensor) and id(result) == tensor_id
        if name in _PASS_THROUGH:
            if not in_place and isinstance(result, torch.Tensor) and depth > 0:
                out |= _call_consumers(id(result), calls, position + 1, depth - 1)
            continue
        out.add(name)
        if in_place:
            break
    return out or {"none"}


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, through nested lists, tuples and dict values (a model's outputs)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


# ---- names -----------------------------------------------------------------------------------------

def module_kind(module: nn.Module) -> str:
    """The normalised op name of what a module does ("relu", "conv", "pool", ...)."""
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return _hardtanh_kind(module.min_val, module.max_val)
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    name = type(module).__name__.lower()
    return "pool" if "pool" in name else name


def _op_name(name: str) -> str:
    """'relu_' / '__iadd__' / 'max_pool2d' -> 'relu' / 'add' / 'pool'."""
    op = normalise_op(name.strip("_"))
    if op.startswith("i") and op[1:] in ("add", "sub", "mul"):
        op = op[1:]  # in-place operators: __iadd__
    if "pool" in op:
        return "pool"
    return "dropout" if "dropout" in op else op


def _hardtanh_of(args: Any, kwargs: dict) -> str:
    values = list(args) + [None, None]
    low = kwargs.get("min_val", values[0] if values[0] is not None else -1.0)
    high = kwargs.get("max_val", values[1] if values[1] is not None else 1.0)
    return _hardtanh_kind(low, high)


def _hardtanh_kind(low: float, high: float) -> str:
    if low < 0:
        return "hardtanh_signed"  # not zeroing: negative inputs survive
    return "relu6" if high == 6.0 else "hardtanh"


def _one(kinds: set[str]) -> str:
    return next(iter(kinds)) if len(kinds) == 1 else "mixed"


# ---- applying them ---------------------------------------------------------------------------------

_WEAK_SOURCES = ("none", "assumed", "heuristic:", "sequential-numbering")


def needs_model(layers: list[Any]) -> bool:
    """Whether some layer's activation rests on names alone (or on nothing): a model would tell."""
    return any(_weak(layer.activation_source) for layer in layers)


def apply_model_facts(layers: list[Any], facts: dict[str, GraphFact], source: str, *, explicit: bool) -> int:
    """Put what the model says each BN feeds into ``layers`` (avdiag.locate.BNLayer), in place; returns
    how many layers changed. A graph the file carries wins over any model; architecture knowledge wins
    over a built-in model and yields to a model the user named (``explicit``)."""
    changed = 0
    for layer in layers:
        fact = facts.get(layer.name)
        if fact is None or fact.consumer == "mixed" or layer.activation_source.startswith("graph:"):
            continue
        if not explicit and not _weak(layer.activation_source):
            continue
        layer.feeds_activation = fact.feeds_activation
        layer.activation = "output" if fact.consumer == "none" else fact.consumer
        layer.activation_source = f"model:{source}"
        if layer.eps_source == "default" and fact.eps is not None:
            layer.eps, layer.eps_source = fact.eps, "model"
        changed += 1
    return changed


def _weak(source: str) -> bool:
    return any(source == s or (s.endswith(":") and source.startswith(s)) for s in _WEAK_SOURCES)
