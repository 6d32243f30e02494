"""The static measurement on hand-made arrays: s, z and Phi(z); the verdicts and their thresholds;
what each BN feeds; and where each layer's eps comes from.

Expected values are computed here with numpy/scipy, never with avdiag's own helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from avdiag import LoadOptions, inspect
from avdiag.load import Checkpoint
from avdiag.load.store import TensorStore
from avdiag.locate import DEFAULT_BN_EPS, BNLayer, locate
from avdiag.measure.static import channel_stats, judge
from avdiag.measure.thresholds import ABNORMAL_PRESETS, Thresholds

T = Thresholds()


def bn(channels: int, *, feeds: str = "yes", activation: str | None = "relu", eps: float = 1e-5,
       affine: bool = True, name: str = "enc.bn") -> BNLayer:
    roles = (("weight", "bias") if affine else ()) + ("running_mean", "running_var")
    return BNLayer(name, channels, {r: f"{name}.{r}" for r in roles}, "model", feeds, activation, "test",
                   None, "none", eps, "test")


def arrays(layer: BNLayer, gamma=None, beta=None, rv=None, rm=None) -> dict[str, np.ndarray]:
    c = layer.channels
    out = {f"{layer.name}.running_mean": np.zeros(c) if rm is None else np.asarray(rm, dtype=np.float64),
           f"{layer.name}.running_var": np.ones(c) if rv is None else np.asarray(rv, dtype=np.float64)}
    if "weight" in layer.params:
        out[f"{layer.name}.weight"] = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
        out[f"{layer.name}.bias"] = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    return out


def verdicts(layer: BNLayer, t: Thresholds = T, filter_norm=None, **values):
    stats = channel_stats(layer, arrays(layer, **values), None if filter_norm is None else np.asarray(filter_norm))
    return judge(layer, stats, t)


def save(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(tensors, path)
    return path


def bn_tensors(prefix: str, gamma, beta, rv, rm=None) -> dict[str, torch.Tensor]:
    g = torch.as_tensor(gamma, dtype=torch.float64)
    return {f"{prefix}.weight": g, f"{prefix}.bias": torch.as_tensor(beta, dtype=torch.float64),
            f"{prefix}.running_mean": torch.zeros_like(g) if rm is None else torch.as_tensor(rm, dtype=torch.float64),
            f"{prefix}.running_var": torch.as_tensor(rv, dtype=torch.float64),
            f"{prefix}.num_batches_tracked": torch.tensor(100)}


def inspect_json(cli, path: Path, *options: str) -> dict:
    """``avdiag inspect PATH OPTIONS --json -``: exit 0 and the JSON report."""
    return cli("inspect", path, *options, "--json", "-").json()


def layer_json(report: dict, name: str) -> dict:
    return next(layer for layer in report["layers"] if layer["name"] == name)


# ---- s, z, Phi(z) ------------------------------------------------------------------------------


def test_scale_z_and_fire_prob_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    c = 64
    gamma = rng.normal(0, 1, c)  # negative gammas too: s uses |gamma|
    beta = rng.normal(0, 2, c)
    rv = rng.uniform(1e-4, 10, c)
    rm = rng.normal(0, 1, c)
    eps = 1e-3
    layer = bn(c, eps=eps)
    stats = channel_stats(layer, arrays(layer, gamma, beta, rv, rm), None)
    s = np.abs(gamma) * np.sqrt(rv / (rv + eps))
    np.testing.assert_allclose(stats.scale, s, rtol=1e-13, atol=0)
    np.testing.assert_allclose(stats.z, beta / s, rtol=1e-13, atol=0)
    np.testing.assert_allclose(stats.fire_prob, norm.cdf(beta / s), rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(stats.gamma, gamma)
    np.testing.assert_array_equal(stats.beta, beta)
    np.testing.assert_array_equal(stats.running_mean, rm)
    np.testing.assert_array_equal(stats.running_var, rv)
    assert stats.filter_norm is None


def test_scale_depends_on_eps_as_the_formula_says():
    layer_small, layer_big = bn(1, eps=1e-5), bn(1, eps=1.0)
    values = dict(gamma=[2.0], beta=[-1.0], rv=[1.0])
    s_small = channel_stats(layer_small, arrays(layer_small, **values), None).scale[0]
    s_big = channel_stats(layer_big, arrays(layer_big, **values), None).scale[0]
    assert s_small == pytest.approx(2.0 * math.sqrt(1 / (1 + 1e-5)), rel=1e-15)
    assert s_big == pytest.approx(2.0 * math.sqrt(0.5), rel=1e-15)


def test_zero_scale_gives_signed_infinite_z():
    # s == 0 from gamma == 0 (channels 0-2) and from running_var == 0 (channels 3-5)
    gamma = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    beta = [-0.5, 0.0, 0.5, -0.5, 0.0, 0.5]
    rv = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    layer = bn(6)
    stats = channel_stats(layer, arrays(layer, gamma, beta, rv), None)
    np.testing.assert_array_equal(stats.scale, np.zeros(6))
    np.testing.assert_array_equal(stats.z, [-np.inf, -np.inf, np.inf] * 2)
    np.testing.assert_array_equal(stats.fire_prob, [0.0, 0.0, 1.0] * 2)
    v = judge(layer, stats, T)
    assert v.constant == [0, 1, 2, 3, 4, 5]
    assert v.dead == [0, 1, 3, 4]  # z = -inf; beta = 0.5 > 1e-3 leaves a constant, live output
    assert v.worst_z == -np.inf


def test_constant_channel_with_tiny_positive_beta_is_dead():
    """z = +inf, but the output is a constant of at most constant_scale (~0 after the ReLU, no signal):
    counted dead, as the constant rule in judge() says; a larger constant output is not."""
    v = verdicts(bn(3), gamma=[1.0] * 3, beta=[5e-4, 1e-3, 2e-3], rv=[0.0] * 3)
    np.testing.assert_array_equal(v.stats.z, [np.inf] * 3)
    assert v.constant == [0, 1, 2]
    assert v.dead == [0, 1]


def test_infinite_z_is_written_as_null_in_json(tmp_path, cli):
    path = save(tmp_path, {"enc.conv.weight": torch.ones(2, 1, 3, 3),
                           **bn_tensors("enc.bn", [0.0, 0.0], [-1.0, 1.0], [1.0, 1.0])})
    report = inspect_json(cli, path, "--per-channel")
    per = layer_json(report, "enc.bn")["per_channel"]
    assert per["z"] == [None, None]  # non-finite: JSON null (schema 1.1)
    assert per["fire_prob"] == [0.0, 1.0]
    assert layer_json(report, "enc.bn")["worst_z"] is None


def test_nonfinite_channels_get_no_verdict():
    v = verdicts(bn(4), gamma=[np.nan, 1.0, 1.0, 1.0], beta=[-10.0, np.inf, -10.0, -10.0],
                 rv=[1.0, 1.0, -1.0, 1.0])
    assert np.isnan(v.stats.z[0]) and np.isnan(v.stats.fire_prob[0])
    assert v.nonfinite == [0, 1, 2]  # NaN gamma, infinite beta, negative running variance
    assert v.dead == [3]
    assert v.constant == [] and v.low_gain == [] and v.abnormal == []


# ---- affine=False ------------------------------------------------------------------------------


def test_affine_false_layer_is_gamma_one_beta_zero():
    layer = bn(3, affine=False)
    assert set(layer.params) == {"running_mean", "running_var"}
    rv = np.array([0.5, 2.0, 4.0])
    stats = channel_stats(layer, arrays(layer, rv=rv), None)
    np.testing.assert_array_equal(stats.gamma, np.ones(3))
    np.testing.assert_array_equal(stats.beta, np.zeros(3))
    np.testing.assert_allclose(stats.scale, np.sqrt(rv / (rv + 1e-5)), rtol=1e-15)
    np.testing.assert_array_equal(stats.z, np.zeros(3))
    np.testing.assert_array_equal(stats.fire_prob, np.full(3, 0.5))
    v = judge(layer, stats, T)
    assert v.dead == [] and v.low_gain == [] and v.abnormal == []


def test_affine_false_checkpoint_end_to_end(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3, affine=False))
    sd = net.state_dict()
    assert "1.weight" not in sd and "1.bias" not in sd
    sd["1.running_var"] = torch.tensor([0.5, 2.0, 4.0])
    result = inspect(save(tmp_path, sd), load=LoadOptions(assume_activation="relu"))
    (v,) = result.layers
    assert v.layer.name == "1" and set(v.layer.params) == {"running_mean", "running_var"}
    assert v.layer.conv == "0"
    np.testing.assert_array_equal(v.stats.gamma, np.ones(3))
    np.testing.assert_array_equal(v.stats.beta, np.zeros(3))
    assert v.dead == [] and result.n_dead == 0


# ---- thresholds: exact boundaries --------------------------------------------------------------


def test_dead_z_boundary_is_strict():
    # eps = 0, gamma = 1, rv = 1: s is exactly 1, so z is exactly beta
    below = np.nextafter(-3.0, -np.inf)
    above = np.nextafter(-3.0, np.inf)
    v = verdicts(bn(4, eps=0.0), gamma=[1.0] * 4, beta=[below, -3.0, above, -10.0], rv=[1.0] * 4)
    np.testing.assert_array_equal(v.stats.scale, np.ones(4))
    np.testing.assert_array_equal(v.stats.z, [below, -3.0, above, -10.0])
    assert v.dead == [0, 3]


def test_dead_z_threshold_moves_the_verdict():
    layer = bn(3, eps=1e-3)
    values = dict(gamma=[0.7, 1.3, 2.0], beta=[-1.0, -2.5, -4.0], rv=[1.0, 3.0, 0.2])
    z = channel_stats(layer, arrays(layer, **values), None).z
    for k in range(3):  # a threshold just above channel k's z makes it dead; exactly at z does not
        just_above = verdicts(layer, Thresholds(dead_z=float(np.nextafter(z[k], np.inf))), **values)
        at = verdicts(layer, Thresholds(dead_z=float(z[k])), **values)
        assert k in just_above.dead and k not in at.dead
    assert verdicts(layer, Thresholds(dead_z=-0.5), **values).dead == [0, 1, 2]
    assert verdicts(layer, Thresholds(dead_z=-100.0), **values).dead == []


def test_abnormal_boundary_is_strict_on_gamma_and_beta():
    t = 1e-10
    below, above = np.nextafter(t, 0), np.nextafter(t, 1)
    gamma = [below, t, above, below, below, -below]
    beta = [0.0, 0.0, 0.0, t, -below, below]
    v = verdicts(bn(6), Thresholds(abnormal=t), gamma=gamma, beta=beta, rv=[1.0] * 6)
    assert v.abnormal == [0, 4, 5]


def test_low_gain_boundary_is_strict():
    below, above = np.nextafter(1e-2, 0), np.nextafter(1e-2, 1)
    v = verdicts(bn(4, feeds="no", activation="linear"), gamma=[below, 1e-2, above, -below],
                 beta=[1.0] * 4, rv=[1.0] * 4)
    assert v.low_gain == [0, 3]
    assert verdicts(bn(4), Thresholds(low_gain=0.5), gamma=[0.4, 0.6, -0.4, 1.0], beta=[0.0] * 4,
                    rv=[1.0] * 4).low_gain == [0, 2]


def test_constant_scale_boundary_is_strict():
    below, above = np.nextafter(1e-3, 0), np.nextafter(1e-3, 1)
    v = verdicts(bn(3, eps=0.0), gamma=[below, 1e-3, above], beta=[1.0] * 3, rv=[1.0] * 3)
    np.testing.assert_array_equal(v.stats.scale, [below, 1e-3, above])
    assert v.constant == [0]


PRESET_GAMMAS = [5e-11, 1e-6, 1e-41, 1e-3]  # beta = 0 in all four channels


@pytest.mark.parametrize(("preset", "expected"), [
    ("paper", [0, 2]),  # 1e-10
    ("loose", [0, 1, 2]),  # 2e-5
    ("strict", [2]),  # 1e-40
])
def test_abnormal_presets_through_the_cli(preset, expected, tmp_path, cli):
    path = save(tmp_path, {"enc.conv.weight": torch.ones(4, 1, 3, 3),
                           **bn_tensors("enc.bn", PRESET_GAMMAS, [0.0] * 4, [1.0] * 4)})
    report = inspect_json(cli, path, "--abnormal-preset", preset)
    assert report["thresholds"]["abnormal"] == ABNORMAL_PRESETS[preset]
    assert layer_json(report, "enc.bn")["abnormal_channels"] == expected


def test_abnormal_presets_are_the_papers_values():
    assert ABNORMAL_PRESETS == {"paper": 1e-10, "loose": 2e-5, "strict": 1e-40}
    assert Thresholds().abnormal == 1e-10


def test_abnormal_default_and_explicit_threshold_through_the_cli(tmp_path, cli):
    path = save(tmp_path, {"enc.conv.weight": torch.ones(4, 1, 3, 3),
                           **bn_tensors("enc.bn", PRESET_GAMMAS, [0.0] * 4, [1.0] * 4)})
    report = inspect_json(cli, path)
    assert report["thresholds"]["abnormal"] == 1e-10
    assert layer_json(report, "enc.bn")["abnormal_channels"] == [0, 2]
    report = inspect_json(cli, path, "--abnormal-threshold", "1e-2")
    assert report["thresholds"]["abnormal"] == 1e-2
    assert layer_json(report, "enc.bn")["abnormal_channels"] == [0, 1, 2, 3]


def test_abnormal_preset_usage_errors(tmp_path, cli):
    path = save(tmp_path, bn_tensors("enc.bn", [1.0], [0.0], [1.0]))
    message = cli("inspect", path, "--abnormal-preset", "medium", "--json", "-").error()
    assert message == "--abnormal-preset must be one of paper, loose, strict, got 'medium'"
    message = cli("inspect", path, "--abnormal-preset", "paper", "--abnormal-threshold", "1e-3", "--json", "-").error()
    assert message == "give --abnormal-threshold or --abnormal-preset, not both"


def test_dead_z_option_through_the_cli(tmp_path, cli):
    path = save(tmp_path, {"enc.relu_bn.weight": torch.ones(2),
                           "enc.relu_bn.bias": torch.tensor([-2.0, -4.0], dtype=torch.float64),
                           "enc.relu_bn.running_mean": torch.zeros(2, dtype=torch.float64),
                           "enc.relu_bn.running_var": torch.ones(2, dtype=torch.float64)})
    report = inspect_json(cli, path)
    assert layer_json(report, "enc.relu_bn")["feeds_activation"] == "yes"  # name heuristic: "relu"
    assert layer_json(report, "enc.relu_bn")["dead_channels"] == [1]
    report = inspect_json(cli, path, "--dead-z", "-1.5")
    assert report["thresholds"]["dead_z"] == -1.5
    assert layer_json(report, "enc.relu_bn")["dead_channels"] == [0, 1]


# ---- collapsed filters ---------------------------------------------------------------------------


def test_collapsed_filter_threshold_relative_to_median():
    at = 1e-6 * 100.0  # default collapsed_filter times the median below: the boundary, inclusive
    norms = [100.0, 200.0, 150.0, 120.0, 0.0, at, float(np.nextafter(at, 1)), 1e-3, 110.0]  # median 100
    assert np.median(norms) == 100.0
    ones = dict(gamma=[1.0] * 9, beta=[1.0] * 9, rv=[1.0] * 9)
    assert verdicts(bn(9), filter_norm=norms, **ones).collapsed == [4, 5]
    assert verdicts(bn(9), Thresholds(collapsed_filter=1e-5), filter_norm=norms, **ones).collapsed == [4, 5, 6, 7]
    assert verdicts(bn(9), Thresholds(collapsed_filter=1e-9), filter_norm=norms, **ones).collapsed == [4]
    assert verdicts(bn(9), **ones).collapsed == []  # no feeding conv known: no verdict


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.int8], ids=lambda d: str(d).split(".")[-1])
def test_zeroed_conv_filter_is_flagged_end_to_end(dtype, tmp_path):
    """Conv weights of any stored dtype (quantised checkpoints keep int8/float8 filter banks)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, bias=False), torch.nn.BatchNorm2d(5), torch.nn.ReLU())
    with torch.no_grad():
        net[0].weight.mul_(20)
        net[0].weight[2].zero_()
    sd = net.state_dict()
    sd["0.weight"] = sd["0.weight"].to(dtype)
    result = inspect(save(tmp_path, sd))
    (v,) = result.layers
    assert v.layer.conv == "0"
    expected_norms = sd["0.weight"].double().reshape(5, -1).norm(dim=1).numpy()
    assert np.count_nonzero(expected_norms) == 4
    np.testing.assert_allclose(v.stats.filter_norm, expected_norms, rtol=1e-6)
    assert v.collapsed == [2]
    assert any(f.id == "collapsed-filters" and f.location == "1" for f in result.findings)


# ---- what the BN feeds -----------------------------------------------------------------------


@pytest.mark.parametrize(("feeds", "activation", "can_die"), [
    ("yes", "relu", True), ("yes", "relu6", True), ("yes", "hardtanh", True), ("yes", "silu", False),
    ("yes", "gelu", False), ("no", "relu", False), ("no", "residual-add", False), ("unknown", None, False),
])
def test_can_die(feeds, activation, can_die):
    assert bn(1, feeds=feeds, activation=activation).can_die is can_die


SILENT = dict(gamma=[1.0, 1.0, 0.0, 1.0], beta=[-10.0, 0.0, -1.0, 5.0], rv=[1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize(("feeds", "activation"), [("no", "residual-add"), ("no", "linear"), ("yes", "silu")])
def test_layer_not_feeding_a_zeroing_activation_has_no_dead_channels(feeds, activation):
    v = verdicts(bn(4, feeds=feeds, activation=activation), **SILENT)
    assert v.dead == [] and v.possibly_dead == []
    assert v.constant == [2, 3]  # the other verdicts are still given
    assert v.low_gain == [2]


def test_relu_layer_dead_channels():
    assert verdicts(bn(4), **SILENT).dead == [0, 2]


def test_unknown_activation_gives_possibly_dead_not_dead():
    v = verdicts(bn(4, feeds="unknown", activation=None), **SILENT)
    assert v.dead == []
    assert v.possibly_dead == [0, 2]


def _unknown_ckpt(tmp_path) -> Path:
    return save(tmp_path, {"enc.conv.weight": torch.ones(4, 2, 3, 3),
                           **bn_tensors("enc.bn", SILENT["gamma"], SILENT["beta"], SILENT["rv"])})


def test_assume_activation_turns_possibly_dead_into_dead(tmp_path):
    path = _unknown_ckpt(tmp_path)
    plain = inspect(path)
    (v,) = plain.layers
    assert (v.layer.feeds_activation, v.layer.activation, v.layer.activation_source) == ("unknown", None, "none")
    assert v.dead == [] and v.possibly_dead == [0, 2] and plain.n_dead == 0
    assert any(f.id == "possibly-dead-channels" for f in plain.findings)
    assumed = inspect(path, load=LoadOptions(assume_activation="relu"))
    (w,) = assumed.layers
    assert (w.layer.feeds_activation, w.layer.activation, w.layer.activation_source) == ("yes", "relu", "assumed")
    assert w.dead == [0, 2] and w.possibly_dead == [] and assumed.n_dead == 2


def test_assume_activation_through_the_cli(tmp_path, cli):
    path = _unknown_ckpt(tmp_path)
    report = inspect_json(cli, path, "--assume-activation", "relu")
    layer = layer_json(report, "enc.bn")
    assert layer["activation_source"] == "assumed" and layer["dead_channels"] == [0, 2]
    assert layer["possibly_dead_channels"] == []


def test_assume_activation_does_not_override_known_layers(tmp_path):
    tensors = {"_conv_stem.weight": torch.ones(4, 3, 3, 3),
               **bn_tensors("_bn0", *SILENT.values()),
               "_blocks.0._project_conv.weight": torch.ones(4, 4, 1, 1),
               **bn_tensors("_blocks.0._bn2", *SILENT.values()),
               **bn_tensors("enc.downsample_bn", *SILENT.values())}
    result = inspect(save(tmp_path, tensors), load=LoadOptions(assume_activation="relu"))
    by = {v.layer.name: v for v in result.layers}
    assert by["_blocks.0._bn2"].layer.activation_source == "architecture:efficientnet"
    assert by["_blocks.0._bn2"].layer.feeds_activation == "no" and by["_blocks.0._bn2"].dead == []
    assert by["_bn0"].layer.activation == "relu6" and by["_bn0"].dead == [0, 2]
    assert by["enc.downsample_bn"].layer.activation_source == "heuristic:name"
    assert by["enc.downsample_bn"].layer.feeds_activation == "no" and by["enc.downsample_bn"].dead == []


# ---- eps: --bn-eps and precedence ---------------------------------------------------------------


def _mem_ckpt(tensors: dict[str, torch.Tensor]) -> Checkpoint:
    return Checkpoint(Path("in-memory.pt"), "torch-zip", TensorStore.from_mapping(tensors))


def test_default_eps_and_user_eps():
    ckpt = _mem_ckpt(bn_tensors("enc.bn", [1.0], [0.0], [1.0]))
    (layer,) = locate(ckpt).layers
    assert (layer.eps, layer.eps_source) == (DEFAULT_BN_EPS, "default") == (1e-5, "default")
    (layer,) = locate(ckpt, bn_eps=0.25).layers
    assert (layer.eps, layer.eps_source) == (0.25, "user")


def test_bn_eps_changes_the_scale_of_default_eps_layers(tmp_path, cli):
    rv = np.array([1e-4, 1e-2, 1.0])
    gamma = np.array([1.0, -2.0, 0.5])
    path = save(tmp_path, {"enc.conv.weight": torch.ones(3, 1, 3, 3),
                           **bn_tensors("enc.bn", gamma, [0.0] * 3, rv)})
    for eps, source in ((None, "default"), (1e-2, "user"), (1.0, "user")):
        (v,) = inspect(path, load=LoadOptions(bn_eps=eps)).layers
        e = 1e-5 if eps is None else eps
        assert (v.layer.eps, v.layer.eps_source) == (e, source)
        np.testing.assert_allclose(v.stats.scale, np.abs(gamma) * np.sqrt(rv / (rv + e)), rtol=1e-14)
    report = inspect_json(cli, path, "--bn-eps", "1e-2", "--per-channel")
    layer = layer_json(report, "enc.bn")
    assert (layer["eps"], layer["eps_source"]) == (1e-2, "user")
    np.testing.assert_allclose(layer["per_channel"]["scale"], np.abs(gamma) * np.sqrt(rv / (rv + 1e-2)), rtol=1e-14)


def test_architecture_eps_and_user_overrides_it():
    """Precedence graph > user > architecture > default (avdiag/locate/__init__.py, _describe)."""
    ckpt = _mem_ckpt({"_conv_stem.weight": torch.ones(2, 3, 3, 3), **bn_tensors("_bn0", [1.0, 1.0], [0.0, 0.0], [1.0, 1.0])})
    (layer,) = locate(ckpt).layers
    assert (layer.eps, layer.eps_source) == (1e-3, "architecture:efficientnet")
    (layer,) = locate(ckpt, bn_eps=0.05).layers
    assert (layer.eps, layer.eps_source) == (0.05, "user")
    assert layer.activation_source == "architecture:efficientnet"  # --bn-eps touches only eps


class _StemNet(torch.nn.Module):
    """EfficientNet-named modules (so the architecture rule would answer eps 1e-3) with other eps."""

    def __init__(self):
        super().__init__()
        self._conv_stem = torch.nn.Conv2d(3, 4, 3, bias=False)
        self._bn0 = torch.nn.BatchNorm2d(4, eps=2e-3)
        self._swish = torch.nn.ReLU6()
        self._conv_head = torch.nn.Conv2d(4, 2, 1, bias=False)
        self._bn1 = torch.nn.BatchNorm2d(2, eps=4e-4)

    def forward(self, x):
        return self._swish(self._bn1(self._conv_head(self._swish(self._bn0(self._conv_stem(x))))))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_graph_eps_wins_over_user_and_architecture(how, tmp_path):
    import warnings

    net = _StemNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.zeros(1, 3, 8, 8))
    path = tmp_path / f"stem_{how}.pt"
    module.save(str(path))
    for user_eps in (None, 0.5):
        result = inspect(path, load=LoadOptions(bn_eps=user_eps))
        by = {v.layer.name: v.layer for v in result.layers}
        assert (by["_bn0"].eps, by["_bn0"].eps_source) == (2e-3, "graph")
        assert (by["_bn1"].eps, by["_bn1"].eps_source) == (4e-4, "graph")
        for layer in by.values():
            assert layer.activation_source == "graph:torchscript"
            assert (layer.feeds_activation, layer.activation) == ("yes", "relu6")
        assert (by["_bn0"].conv, by["_bn1"].conv) == ("_conv_stem", "_conv_head")
    # the same weights as a plain state dict: no graph, so the rule (and then the user) decides
    sd_path = save(tmp_path, net.state_dict(), "stem_sd.pt")
    by = {v.layer.name: v.layer for v in inspect(sd_path).layers}
    assert {n: (l.eps, l.eps_source) for n, l in by.items()} == {
        "_bn0": (1e-3, "architecture:efficientnet"), "_bn1": (1e-3, "architecture:efficientnet")}
    by = {v.layer.name: v.layer for v in inspect(sd_path, load=LoadOptions(bn_eps=0.5)).layers}
    assert {n: (l.eps, l.eps_source) for n, l in by.items()} == {"_bn0": (0.5, "user"), "_bn1": (0.5, "user")}


# ---- Thresholds round trip -----------------------------------------------------------------------


def test_thresholds_round_trip_through_to_dict_and_json(tmp_path):
    t = Thresholds(dead_z=-2.25, abnormal=2e-5, constant_scale=5e-4, low_gain=3e-2, collapsed_filter=1e-5)
    d = t.to_dict()
    assert d == {"dead_z": -2.25, "abnormal": 2e-5, "constant_scale": 5e-4, "low_gain": 3e-2,
                 "collapsed_filter": 1e-5}
    assert Thresholds(**d) == t
    assert Thresholds(**json.loads(json.dumps(d))) == t
    assert Thresholds(**Thresholds().to_dict()) == Thresholds()
    result = inspect(save(tmp_path, bn_tensors("enc.bn", [1.0], [0.0], [1.0])), thresholds=t)
    assert result.thresholds == t
    assert json.loads(json.dumps(result.to_dict()))["thresholds"] == d


def test_cli_thresholds_land_in_the_json(tmp_path, cli):
    path = save(tmp_path, bn_tensors("enc.bn", [1.0], [0.0], [1.0]))
    report = inspect_json(cli, path, "--dead-z", "-2.5", "--abnormal-preset", "strict", "--constant-scale", "1e-4",
                          "--low-gain", "0.05", "--collapsed-filter", "1e-3")
    assert Thresholds(**report["thresholds"]) == Thresholds(dead_z=-2.5, abnormal=1e-40, constant_scale=1e-4,
                                                            low_gain=0.05, collapsed_filter=1e-3)


class _OutputNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_bn_that_is_the_model_output(how, tmp_path):
    """A BN whose output is the model's output feeds nothing: no dead channels, activation "output"
    (what avdiag/locate/__init__.py _describe writes for a graph consumer "none")."""
    import warnings

    net = _OutputNet().eval()
    with torch.no_grad():
        net.bn.bias.fill_(-10.0)  # would be dead before a ReLU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.zeros(1, 3, 8, 8))
    path = tmp_path / f"out_{how}.pt"
    module.save(str(path))
    (v,) = inspect(path, load=LoadOptions(assume_activation="relu")).layers
    assert (v.layer.feeds_activation, v.layer.activation_source) == ("no", "graph:torchscript")
    assert v.dead == [] and v.possibly_dead == []
    assert v.layer.activation == "output"
