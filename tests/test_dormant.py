"""Dormant units on data (ReDo, Sokar et al. 2023): units planted dormant in a transformer MLP and in
conv channels before a SiLU are found exactly; the score equals an independent computation; the
measurement reaches `inspect --data` (JSON, findings) on the built-in AV transformer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from avdiag.measure.dormant import (DORMANT_UNITS, DormantCollector, dormant_units, measure_dormant, redo_scores)
from avdiag.models.arch.av_transformer import AVTransformer
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.inspect import inspect

PLANTED_MLP = [3, 7, 40]
PLANTED_CONV = [1, 5]


def _plant_linear(fc: nn.Linear, units: list[int], bias: float = -50.0) -> None:
    """Zero the units' incoming weights and give them a large negative bias."""
    with torch.no_grad():
        fc.weight[units] = 0.0
        fc.bias[units] = bias


def _transformer(activation: str = "relu") -> AVTransformer:
    torch.manual_seed(0)
    model = AVTransformer(4, dim=32, depth=2, activation=activation)
    _plant_linear(model.audio_encoder.blocks[1].mlp.fc1, PLANTED_MLP)
    return model.eval()


def _inputs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, 24, generator=g), torch.randn(n, 3, 2, 16, 16, generator=g)


def _by_name(report):
    return {layer.name: layer for layer in report.layers}


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_planted_mlp_units_are_exactly_the_dormant_ones(activation):
    model = _transformer(activation)
    audio, visual = _inputs()
    report = measure_dormant(model, [(audio[:3], visual[:3]), (audio[3:], visual[3:])])
    layers = _by_name(report)
    planted = layers["audio_encoder.blocks.1.mlp.act"]
    assert (planted.kind, planted.units, planted.dormant) == ("mlp", 64, PLANTED_MLP)
    assert planted.positions == 6 * (16 // 8) * (24 // 8)  # samples x tokens
    others = [layer for name, layer in layers.items() if name != planted.name]
    assert others and all(layer.dormant == [] for layer in others)
    assert {layers[n].kind for n in layers if n.endswith(".attn")} == {"attention"}


def test_score_equals_an_independent_computation():
    model = _transformer()
    audio, visual = _inputs()
    report = measure_dormant(model, [(audio[:2], visual[:2]), (audio[2:], visual[2:])], tau=0.1)
    block = model.audio_encoder.blocks[1]
    # recompute the MLP's hidden activation by hand from the block's input
    captured = {}
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(audio, visual)
    handle.remove()
    x = captured["x"]
    with torch.no_grad():
        h = block.norm1(x)
        x = x + block.attn(h, h, h, need_weights=False)[0]
        hidden = torch.relu(block.norm2(x) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    mean_abs = hidden.abs().double().mean(dim=(0, 1)).numpy()
    expected = mean_abs / (mean_abs.mean() + 1e-9)
    measured = _by_name(report)["audio_encoder.blocks.1.mlp.act"]
    np.testing.assert_allclose(measured.scores, expected, rtol=1e-5, atol=1e-9)
    assert measured.dormant == [int(i) for i in np.flatnonzero(expected <= 0.1)]
    assert set(PLANTED_MLP) <= set(measured.dormant)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.SiLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


def test_planted_conv_channels_before_a_silu():
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():
        net.conv1.weight[PLANTED_CONV] = 0.0
        net.conv1.bias[PLANTED_CONV] = -100.0  # SiLU(-100) ~ -4e-42: zero within the tolerance
    x = torch.randn(4, 3, 8, 8)
    report = measure_dormant(net, [x])
    layers = _by_name(report)
    assert (layers["act1"].kind, layers["act1"].units, layers["act1"].dormant) == ("conv", 8, PLANTED_CONV)
    assert layers["act2"].dormant == []
    with torch.no_grad():
        out = net.act1(net.conv1(x))
    mean_abs = out.abs().double().mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(layers["act1"].scores, redo_scores(mean_abs), rtol=1e-5, atol=1e-12)


def test_tau_thresholds_and_the_zero_tolerance():
    scores = np.array([0.0, 1e-8, 0.02, 0.05, 1.0, np.nan])
    assert dormant_units(scores, 0.0) == [0, 1]
    assert dormant_units(scores, 0.025) == [0, 1, 2]
    assert dormant_units(scores, 0.1) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        DormantCollector(tau=1.5)


def test_bn_fed_activations_are_left_to_the_bn_probe_and_reused_modules_split():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.relu(self.bn(self.conv(x)))  # call 1: fed by the BN
            return self.relu(y + x[:, :1])  # call 2: fed by an add

    report = measure_dormant(Net(), [torch.randn(2, 3, 5, 5)])
    assert [layer.name for layer in report.layers] == ["relu#2"]
    assert report.left_to_bn_probe == 1 and report.layers[0].kind == "conv"


def test_inspect_data_reports_planted_dormant_units(tmp_path):
    torch.manual_seed(0)
    model = AVTransformer(4, dim=32, depth=2)  # GELU, as the registry builds it
    _plant_linear(model.visual_encoder.blocks[0].mlp.fc1, PLANTED_MLP)
    path = tmp_path / "avt.pt"
    torch.save(model.state_dict(), path)
    data = DataSource("synthetic:n=8,classes=4,f=16,t=16,size=16,frames=2", batch_size=4, device="cpu")
    result = inspect(path, data=data, hash_file=False)
    assert result.layout.name == "av-transformer"
    assert result.probe.model == "registry:av-transformer"
    doc = json.loads(json.dumps(result.to_dict()))
    dormant = doc["dormant"]
    assert dormant["tau"] == 0.0 and dormant["n_dormant"] == len(PLANTED_MLP)
    hit = [layer for layer in dormant["layers"] if layer["n_dormant"]]
    assert [(h["name"], h["kind"], h["modality"], h["dormant_units"]) for h in hit] == [
        ("visual_encoder.blocks.0.mlp.act", "mlp", "visual", PLANTED_MLP)]
    assert dormant["modalities"]["visual"]["n_dormant"] == 3 and dormant["modalities"]["audio"]["n_dormant"] == 0
    assert [f.location for f in result.findings if f.id == DORMANT_UNITS] == ["visual_encoder.blocks.0.mlp.act"]
    assert "3/" in result.summary_line() and "dormant units" in result.summary_line()
    off = inspect(path, data=data, hash_file=False, dormant_tau=None)
    assert off.dormant is None and "dormant" not in off.to_dict()


def test_dormant_units_check_rule(tmp_path):
    from avdiag.workflows.check import check
    from avdiag.workflows.check.rules.base import REGISTRY, Facts

    torch.manual_seed(0)
    model = AVTransformer(4, dim=32, depth=2)
    _plant_linear(model.audio_encoder.blocks[1].mlp.fc1, list(range(20)))  # 20 of audio's 192 units
    path = tmp_path / "avt.pt"
    torch.save(model.state_dict(), path)
    data = DataSource("synthetic:n=4,classes=4,f=16,t=16,size=16,frames=1", batch_size=4, device="cpu")
    scan = inspect(path, data=data, hash_file=False)
    rule = REGISTRY["dormant-units"]
    _, params = rule.configure("warning", "test")
    (found,) = rule.evaluate(Facts(str(path), scan), params).found
    assert found.location == "modality:audio" and "20/192" in found.message
    _, loose = rule.configure({"modalities": {"audio": 0.2}}, "test")
    assert rule.evaluate(Facts(str(path), scan), loose).found == []
    assert rule.evaluate(Facts(str(path), inspect(path, hash_file=False)), params).skipped
    doc = check([str(path)], data=data).to_dict()  # the registered rule, end to end
    (report,) = doc["files"]
    assert [v["location"] for v in report["violations"] if v["rule_id"] == "dormant-units"] == ["modality:audio"]


# ---- the static LayerNorm scan ------------------------------------------------------------------


def test_layernorm_scan_constant_low_gain_nonfinite_and_collapsed_rows(tmp_path):
    from avdiag.measure.layernorm import COLLAPSED_ROWS, CONSTANT_FEATURES

    torch.manual_seed(0)
    model = AVTransformer(4, dim=32, depth=2)
    sd = model.state_dict()
    sd["audio_encoder.blocks.0.norm2.weight"][[1, 4]] = torch.tensor([0.0, 1e-5])  # reach <= 1e-5 * sqrt(31)
    sd["audio_encoder.blocks.0.norm2.weight"][9] = 1e-3  # low gain, not constant: reach 5.6e-3
    sd["visual_encoder.norm.bias"][2] = float("nan")
    sd["visual_encoder.blocks.1.mlp.fc2.weight"][[0, 30]] = 0.0
    path = tmp_path / "ln.pt"
    torch.save(sd, path)
    result = inspect(path, hash_file=False)
    scan = result.layernorm
    layers = {v.name: v for v in scan.layers}
    assert len(layers) == 10 and {v.modality for v in scan.layers} == {"audio", "visual"}
    norm2 = layers["audio_encoder.blocks.0.norm2"]
    assert (norm2.constant, norm2.low_gain) == ([1, 4], [9])
    assert layers["visual_encoder.norm"].nonfinite == [2]
    assert layers["visual_encoder.blocks.1.norm1"].collapsed_rows == {
        "visual_encoder.blocks.1.attn.out_proj": [], "visual_encoder.blocks.1.mlp.fc2": [0, 30]}
    ids = {f.id for f in result.findings}
    assert {CONSTANT_FEATURES, COLLAPSED_ROWS, "nonfinite-tensor"} <= ids
    assert not ids & {"dead-channels", "possibly-dead-channels", DORMANT_UNITS}  # nothing is called dead statically
    doc = json.loads(json.dumps(result.to_dict()))["layernorm"]
    assert doc["n_constant"] == 2 and doc["n_collapsed_rows"] == 2 and doc["layers"][0]["kind"] == "layernorm"
    # the bound is real: the constant features' outputs stay within constant_scale of beta on any input
    ln = nn.LayerNorm(32)
    ln.load_state_dict({"weight": sd["audio_encoder.blocks.0.norm2.weight"], "bias": sd["audio_encoder.blocks.0.norm2.bias"]})
    x = torch.randn(512, 32) * torch.logspace(-3, 3, 512)[:, None]
    x[0, 4] += 1e6  # rows where one feature takes the largest normalised value, sqrt(D - 1)
    x[1, 9] += 1e6
    with torch.no_grad():
        y = ln(x)
        spread = (y - ln.bias).abs().max(dim=0).values
    assert float(spread[[1, 4]].max()) < scan.thresholds.constant_scale and float(spread[9]) > 1e-3
    from avdiag.workflows.report import report

    report([result.to_dict()], tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "LayerNorm layers per modality" in text and "`audio_encoder.blocks.0.norm2`" in text


def test_layernorm_names_and_no_layernorm(tmp_path):
    from avdiag.measure.layernorm import find_layernorms

    names = {"enc.layers.0.input_layernorm.weight": (8,), "enc.layers.0.self_attn_layer_norm.weight": (8,),
             "enc.layers.0.self_attn_layer_norm.bias": (8,), "t.resblocks.0.ln_1.weight": (8,), "t.ln_final.weight": (8,),
             "b.0.norm1_a.weight": (8,), "c.bn1.weight": (8,), "c.fc.weight": (4, 8), "c.normalize.weight": (8,)}
    found = find_layernorms(list(names), names.__getitem__, lambda m: m == "c.bn1")
    assert [(m, b is not None) for m, _, b, _ in found] == [
        ("enc.layers.0.input_layernorm", False), ("enc.layers.0.self_attn_layer_norm", True),
        ("t.resblocks.0.ln_1", False), ("t.ln_final", False), ("b.0.norm1_a", False)]
    path = tmp_path / "cnn.pt"
    torch.save(ConvNet().state_dict(), path)
    result = inspect(path, hash_file=False)
    assert result.layernorm is None and "layernorm" not in result.to_dict()
    transformer = tmp_path / "avt.pt"
    torch.save(AVTransformer(4, dim=16, depth=1).state_dict(), transformer)
    scanned = inspect(transformer, hash_file=False)  # no BatchNorm, but the LayerNorm scan had work to do
    assert scanned.layernorm is not None and "no-batchnorm" not in {f.id for f in scanned.findings}


# ---- the built-in AV transformer: conflict through the adapter, the example ---------------------


def test_builtin_transformer_conflict_and_shapley_equal_a_loop():
    import torch.nn.functional as F

    from avdiag.data import make_loader, open_dataset
    from avdiag.measure.conflict import measure_conflict
    from avdiag.measure.contribution.shapley import shapley_batch
    from avdiag.models.parts import av_parts

    torch.manual_seed(0)
    model = AVTransformer(4, dim=16, depth=1).eval()
    batches = list(make_loader(open_dataset("synthetic:n=6,classes=4,f=16,t=16,size=16,frames=2"), batch_size=3))
    parts = av_parts(model)
    result = measure_conflict(parts, batches, "cpu", per_sample=True)
    for batch in batches:
        for i in range(len(batch["label"])):
            y = batch["label"][i:i + 1]
            a, v = model.audio_encoder(batch["audio"][i:i + 1]), model.visual_encoder(batch["visual"][i:i + 1])
            losses = {"fused": F.cross_entropy(model.fuse(a, v), y),
                      "audio": F.cross_entropy(model.fuse(a, torch.zeros_like(v)), y),
                      "visual": F.cross_entropy(model.fuse(torch.zeros_like(a), v), y)}
            sample = next(s for s in result.samples if s.index == int(batch["index"][i]))
            for m in ("audio", "visual"):
                params = list(getattr(model, f"{m}_encoder").parameters())
                g1 = torch.cat([g.flatten() for g in torch.autograd.grad(losses["fused"], params, retain_graph=True)])
                g2 = torch.cat([g.flatten() for g in torch.autograd.grad(losses[m], params, retain_graph=True)])
                expected = float(g1.double() @ g2.double() / (g1.double().norm() * g2.double().norm()))
                assert abs(sample.cos(m) - expected) <= 1e-6, (sample.index, m)
    batch = batches[0]
    got = shapley_batch(parts, batch)
    with torch.no_grad():
        a, v = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
        p = lambda x, z: model.fuse(x, z).softmax(-1).gather(1, batch["label"][:, None])[:, 0].double()  # noqa: E731
        both, only_a, only_v = 2 * p(a, v), p(a, torch.zeros_like(v)), p(torch.zeros_like(a), v)
    expected = 0.5 * (only_a + (both - only_v))
    assert torch.allclose(torch.as_tensor(got.phi_probability["audio"], dtype=torch.float64), expected, atol=1e-6)


def test_example_quick_runs_the_pipeline(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "av_transformer.py"
    spec = importlib.util.spec_from_file_location("av_transformer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--quick", "--out", str(tmp_path)])
    assert out["train_loss"][-1] < out["train_loss"][0]
    assert out["inspect"].layout.name == "av-transformer" and out["inspect"].probe.model == "registry:av-transformer"
    assert out["inspect"].dormant.n_units == 2 * (16 + 32)  # one block per modality: attention 16, MLP 32 units
    assert out["conflict"] is not None
    for name in ("av_transformer.pt", "inspect.json", "conflict.json", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Dormant units per layer" in (tmp_path / "report.html").read_text()


def test_cli_dormant_options(cli, tmp_path):
    torch.manual_seed(0)
    model = AVTransformer(4, dim=16, depth=1)
    _plant_linear(model.audio_encoder.blocks[0].mlp.fc1, [2, 5])
    path = tmp_path / "avt.pt"
    torch.save(model.state_dict(), path)
    data = ("--data", "synthetic:n=4,classes=4,f=16,t=16,size=16,frames=1", "--device", "cpu")
    doc = cli("inspect", path, *data, "--dormant-tau", "0.025", "--json", "-").json()
    assert doc["dormant"]["tau"] == 0.025 and doc["dormant"]["layers"][1]["dormant_units"][:2] == [2, 5]
    assert "dormant" not in cli("inspect", path, *data, "--no-dormant", "--json", "-").json()
    cli("inspect", path, *data, "--dormant-tau", "1.5").error("--dormant-tau must be in [0, 1)")
    text = cli("inspect", path, *data).out
    assert "audio_encoder.blocks.0.mlp.act (mlp): 2/32 [2, 5]" in text
