"""Read, from a model graph (torch.export program or TorchScript), what each BatchNorm feeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Activations that output exactly 0 below a threshold: a channel below it there is dead.
ZEROING_ACTIVATIONS = {"relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "threshold"}
SMOOTH_ACTIVATIONS = {"silu", "gelu", "mish", "elu", "selu", "celu", "leaky_relu", "prelu", "rrelu",
                      "sigmoid", "tanh", "softplus", "swish"}
RESIDUAL_OPS = {"add", "sub", "cat"}


@dataclass(frozen=True)
class GraphFact:
    """What the graph says about one BatchNorm layer."""

    consumer: str  # normalised op name of what reads the BN output ("relu", "add", ...)
    eps: float | None
    conv: str | None  # module name of the conv that feeds it, if a conv does

    @property
    def feeds_activation(self) -> str:
        if self.consumer in ZEROING_ACTIVATIONS or self.consumer in SMOOTH_ACTIVATIONS:
            return "yes"
        return "no"


def normalise_op(target: str) -> str:
    """'torch.ops.aten.relu_.default' / 'aten::relu_' -> 'relu'."""
    if target in ("prim::Return", "output"):
        return "none"  # the BN output leaves the graph
    name = target.replace("aten::", "").replace("torch.ops.aten.", "")
    name = name.split(".")[0].strip("_")
    return "conv" if "convolution" in name or name.startswith("conv") else name


def graph_facts(kind: str, graph: Any) -> dict[str, GraphFact]:
    """BN module name -> GraphFact, for a torch-export program dict or a TorchScript module."""
    if kind == "torch-export":
        try:
            return _export_facts(graph)
        except (AttributeError, TypeError, KeyError, ValueError):
            return {}  # a malformed graph tells nothing: the architecture rules take over
    if kind == "torchscript":
        return _torchscript_facts(graph)
    return {}


def _hardtanh_kind(min_val: float | None, max_val: float | None) -> str:
    if min_val is not None and min_val < 0:
        return "hardtanh_signed"  # not zeroing: negative inputs survive
    return "relu6" if max_val == 6.0 else "hardtanh"


# ---- torch.export --------------------------------------------------------------------------

def _export_facts(program: dict) -> dict[str, GraphFact]:
    try:
        graph = program["graph_module"]["graph"]
        names = _export_input_names(program["graph_module"]["signature"])
        nodes = graph["nodes"]
    except (KeyError, TypeError):
        return {}
    producers: dict[str, dict] = {}
    consumers: dict[str, list[dict]] = {}
    for node in nodes:
        for out in _export_outputs(node):
            producers[out] = node
        for arg in node.get("inputs", []):
            tensor = _export_tensor_arg(arg)
            if tensor:
                consumers.setdefault(tensor, []).append(node)
    facts = {}
    for node in nodes:
        if "batch_norm" not in str(node.get("target", "")):
            continue
        args = {a.get("name"): a for a in node.get("inputs", [])}
        param = names.get(_export_tensor_arg(args.get("weight", {})) or "") or names.get(
            _export_tensor_arg(args.get("running_mean", {})) or "")
        outs = _export_outputs(node)
        if not param or not outs:
            continue
        module = param.rsplit(".", 1)[0]
        conv = _export_conv_of(producers.get(_export_tensor_arg(args.get("input", {})) or ""), names)
        eps = args.get("eps", {}).get("arg", {}).get("as_float")
        facts[module] = GraphFact(_export_consumer(consumers.get(outs[0], [])), eps, conv)
    return facts


def _export_input_names(signature: dict) -> dict[str, str]:
    out = {}
    for spec in signature.get("input_specs", []):
        for kind, key in (("parameter", "parameter_name"), ("buffer", "buffer_name")):
            if kind in spec:
                out[spec[kind]["arg"]["name"]] = spec[kind][key]
    return out


def _export_tensor_arg(arg: dict) -> str | None:
    value = arg.get("arg", {}) if isinstance(arg, dict) else {}
    tensor = value.get("as_tensor")
    return tensor.get("name") if isinstance(tensor, dict) else None


def _export_outputs(node: dict) -> list[str]:
    names = []
    for out in node.get("outputs", []):
        if "as_tensor" in out:
            names.append(out["as_tensor"]["name"])
        for t in out.get("as_tensors", []) or []:
            names.append(t["name"])
    return names


def _export_conv_of(node: dict | None, names: dict[str, str]) -> str | None:
    if not node or "conv" not in str(node.get("target", "")):
        return None
    args = {a.get("name"): a for a in node.get("inputs", [])}
    weight = names.get(_export_tensor_arg(args.get("weight", {})) or "")
    return weight.rsplit(".", 1)[0] if weight else None


def _export_consumer(nodes: list[dict]) -> str:
    kinds = set()
    for node in nodes:
        op = normalise_op(str(node.get("target", "")))
        if op == "hardtanh":
            args = {a.get("name"): a.get("arg", {}) for a in node.get("inputs", [])}
            op = _hardtanh_kind(args.get("min_val", {}).get("as_float"), args.get("max_val", {}).get("as_float"))
        kinds.add(op)
    return kinds.pop() if len(kinds) == 1 else ("none" if not kinds else "mixed")


# ---- TorchScript ---------------------------------------------------------------------------

def _torchscript_facts(module: Any) -> dict[str, GraphFact]:
    try:
        graph = module.inlined_graph
    except Exception:
        return {}
    paths: dict[int, str] = {}
    self_value = next(iter(graph.inputs()))
    paths[self_value.unique()] = ""
    facts: dict[str, GraphFact] = {}
    _walk_ts_block(graph.nodes(), paths, facts)
    return facts


def _walk_ts_block(nodes: Any, paths: dict[int, str], facts: dict[str, GraphFact]) -> None:
    for node in nodes:
        kind = node.kind()
        if kind == "prim::GetAttr":
            parent = paths.get(node.input().unique())
            if parent is not None:
                paths[node.output().unique()] = f"{parent}.{node.s('name')}".lstrip(".")
        elif kind == "aten::batch_norm":
            inputs = list(node.inputs())
            param = paths.get(inputs[1].unique()) or paths.get(inputs[3].unique())
            if param:
                facts[param.rsplit(".", 1)[0]] = GraphFact(
                    _ts_consumer(node.output()), _ts_constant(inputs[7]), _ts_conv(inputs[0], paths))
        for block in node.blocks():
            _walk_ts_block(block.nodes(), paths, facts)


def _ts_constant(value: Any) -> float | None:
    try:
        v = value.toIValue()
        return float(v) if v is not None else None
    except Exception:
        return None


def _ts_conv(value: Any, paths: dict[int, str]) -> str | None:
    node = value.node()
    if "conv" not in node.kind():
        return None
    weight = paths.get(list(node.inputs())[1].unique())
    return weight.rsplit(".", 1)[0] if weight else None


def _ts_consumer(value: Any) -> str:
    kinds = set()
    for use in value.uses():
        user = use.user
        op = normalise_op(user.kind())
        if op == "hardtanh":
            ins = list(user.inputs())
            op = _hardtanh_kind(_ts_constant(ins[1]), _ts_constant(ins[2]))
        kinds.add(op)
    return kinds.pop() if len(kinds) == 1 else ("none" if not kinds else "mixed")
