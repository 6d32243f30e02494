"""Key layouts, shapes and parameter counts of the reference models, and the bundled
example checkpoint against the script that generates it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from avdiag.errors import ModelError
from avdiag.load import load_checkpoint
from avdiag.locate import locate
from avdiag.locate.resolve import resolve_model
from avdiag.models import (
    BalanceMMClassifier,
    CRMTClassifier,
    JournalOPMClassifier,
    LegacyOGMClassifier,
    MMParetoClassifier,
    OGMGEClassifier,
    ResNetEncoder,
    resnet18,
    resnet34,
)
from avdiag.models import registry
from avdiag.models.av import audio_features, visual_features
from avdiag.models.parts import AVParts, ablation, av_parts
from avdiag.models.registry import ArchFact, Architecture, ArchSpec, out_features, register, unregister

W = 8  # stem width for the small models
D = 8 * W  # feature size
N = 6  # classes
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _audio(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 1, 32, 32)


def _visual(b: int = 2, t: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, t, 32, 32)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- ResNet encoder ------------------------------------------------------------


def test_resnet18_key_layout_is_torchvision_without_fc():
    keys = set(resnet18(3, width=W).state_dict())
    # torchvision's resnet18 state_dict has 122 keys; fc.weight and fc.bias are dropped.
    assert len(keys) == 120
    for key in (
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.conv2.weight",
    ):
        assert key in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    downsample_blocks = {k.split(".downsample")[0] for k in keys if ".downsample." in k}
    assert downsample_blocks == {"layer2.0", "layer3.0", "layer4.0"}
    assert "conv1.bias" not in keys and "layer1.0.conv1.bias" not in keys


def test_resnet34_blocks():
    keys = set(resnet34(3, width=W).state_dict())
    assert len(keys) == 216  # 16 blocks * 12 + 3 downsamples * 6 + stem 6
    assert "layer3.5.bn2.weight" in keys and "layer3.6.bn1.weight" not in keys
    assert "layer4.2.conv2.weight" in keys


def test_resnet_widths_and_channels():
    shapes = _shapes(resnet18(1, width=W))
    assert shapes["conv1.weight"] == (W, 1, 7, 7)
    assert shapes["layer1.0.conv1.weight"] == (W, W, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (2 * W, W, 1, 1)
    assert shapes["layer3.1.bn1.weight"] == (4 * W,)
    assert shapes["layer4.1.conv2.weight"] == (8 * W, 8 * W, 3, 3)


def test_resnet_parameter_counts_at_full_width():
    # torchvision resnet18: 11,689,512 parameters, of which fc is 512*1000 + 1000 = 513,000.
    n18 = sum(p.numel() for p in resnet18(3, width=64).parameters())
    assert n18 == 11_689_512 - 513_000 == 11_176_512
    # torchvision resnet34: 21,797,672 parameters, same fc.
    n34 = sum(p.numel() for p in resnet34(3, width=64).parameters())
    assert n34 == 21_797_672 - 513_000


def test_resnet_init():
    net = resnet18(3, width=W)
    assert torch.equal(net.bn1.weight, torch.ones(W)) and torch.equal(net.bn1.bias, torch.zeros(W))
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    w = net.layer4[1].conv1.weight
    expected_std = (2.0 / (8 * W * 9)) ** 0.5
    assert abs(float(w.detach().std()) - expected_std) / expected_std < 0.05


def test_resnet_forward_and_pool():
    net = resnet18(1, width=W).eval()
    assert net.out_dim == 8 * W
    fmap = net(torch.randn(2, 1, 64, 40))
    assert fmap.shape == (2, 8 * W, 2, 2)
    assert ResNetEncoder.pool(fmap).shape == (2, 8 * W)
    torch.testing.assert_close(ResNetEncoder.pool(fmap), fmap.mean(dim=(2, 3)))
    # Folded frames: (B*T, C, h, w) -> mean over (T, h, w) per clip.
    folded = torch.randn(6, 4, 2, 2)
    pooled = ResNetEncoder.pool(folded, frames=3)
    torch.testing.assert_close(pooled, folded.reshape(2, 3, 4, 2, 2).mean(dim=(1, 3, 4)))
    with pytest.raises(ValueError, match=r"^expected a 4-D \(B, C, H, W\) input"):
        net(torch.randn(2, 1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"^depth must be one of \[18, 34\], got 50$"):
        ResNetEncoder(depth=50)


# --- audio-visual classifiers ----------------------------------------------------


@pytest.mark.parametrize(
    ("fusion", "head"),
    [
        ("concat", {"fusion_module.fc_out.weight": (N, 2 * D)}),
        ("sum", {"fusion_module.fc_x.weight": (N, D), "fusion_module.fc_y.weight": (N, D)}),
        ("film", {"fusion_module.fc.weight": (2 * D, D), "fusion_module.fc_out.weight": (N, D)}),
        (
            "gated",
            {
                "fusion_module.fc_x.weight": (D, D),
                "fusion_module.fc_y.weight": (D, D),
                "fusion_module.fc_out.weight": (N, D),
            },
        ),
    ],
)
def test_ogm_ge_layout(fusion, head):
    model = OGMGEClassifier(n_classes=N, fusion=fusion, width=W).eval()
    shapes = _shapes(model)
    assert shapes["audio_net.conv1.weight"] == (W, 1, 7, 7)
    assert shapes["visual_net.conv1.weight"] == (W, 3, 7, 7)
    assert "audio_net.layer2.0.downsample.1.running_var" in shapes
    fusion_keys = {k for k in shapes if k.startswith("fusion_module.")}
    assert fusion_keys == set(head) | {k.replace(".weight", ".bias") for k in head}
    for key, shape in head.items():
        assert shapes[key] == shape
    assert {k.split(".")[0] for k in shapes} == {"audio_net", "visual_net", "fusion_module"}
    a, v, logits = model(_audio(), _visual())
    assert a.shape == v.shape == (2, D) and logits.shape == (2, N)


def test_ogm_ge_rejects_unknown_fusion():
    with pytest.raises(ValueError, match=r"^fusion must be one of \['concat', 'film', 'gated', 'sum'\], got 'attention'$"):
        OGMGEClassifier(n_classes=N, fusion="attention", width=W)


def _first_half_probe(linear: torch.nn.Linear, d: int) -> None:
    """Make a 2d->n head read only its first d inputs: logits = sum of those inputs."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:, :d] = 1.0
        linear.bias.zero_()


@pytest.mark.parametrize(
    ("cls", "head", "first"),
    [
        (OGMGEClassifier, "fusion_module.fc_out", "audio"),
        (LegacyOGMClassifier, "fc_", "visual"),
        (JournalOPMClassifier, "fusion_model.fxy", "audio"),
        (MMParetoClassifier, "head", "audio"),
        (CRMTClassifier, "fusion_module.orth_layer.fc", "visual"),
        (BalanceMMClassifier, "fusion_module.fc_out", "audio"),
    ],
)
def test_fused_head_input_order(cls, head, first):
    model = cls(n_classes=N, width=W).eval()
    linear = model.get_submodule(head)
    assert tuple(linear.weight.shape) == (N, 2 * D)
    _first_half_probe(linear, D)
    audio, visual = _audio(), _visual()
    audio_net, visual_net = (model.get_submodule(name) for name in _ENCODERS[cls])
    frames = visual.permute(0, 2, 1, 3, 4).reshape(-1, 3, 32, 32)
    with torch.no_grad():
        feats = {
            "audio": ResNetEncoder.pool(audio_net(audio)),
            "visual": ResNetEncoder.pool(visual_net(frames), frames=visual.shape[2]),
        }
        out = model(audio, visual)
    fused = out[2] if cls in _RETURNS_FEATURES else out[0]
    other = "visual" if first == "audio" else "audio"
    torch.testing.assert_close(fused, feats[first].sum(dim=1, keepdim=True).expand(-1, N))
    assert not torch.allclose(fused, feats[other].sum(dim=1, keepdim=True).expand(-1, N))


_ENCODERS = {
    OGMGEClassifier: ("audio_net", "visual_net"),
    LegacyOGMClassifier: ("parta", "partv"),
    JournalOPMClassifier: ("encoder_1", "encoder_2"),
    MMParetoClassifier: ("audio_net", "visual_net"),
    CRMTClassifier: ("audio_net", "visual_net"),
    BalanceMMClassifier: ("modality_encoder.audio", "modality_encoder.visual"),
}
_RETURNS_FEATURES = {OGMGEClassifier, LegacyOGMClassifier, JournalOPMClassifier, BalanceMMClassifier}


@pytest.mark.parametrize("cls", list(_ENCODERS))
def test_encoder_names_and_top_level_modules(cls):
    keys = set(cls(n_classes=N, width=W).state_dict())
    audio, visual = _ENCODERS[cls]
    assert f"{audio}.conv1.weight" in keys and f"{visual}.conv1.weight" in keys
    assert f"{audio}.layer4.1.bn2.running_var" in keys
    assert f"{visual}.layer3.0.downsample.1.weight" in keys
    encoder_keys = {k for k in keys if k.startswith((f"{audio}.", f"{visual}."))}
    assert len(encoder_keys) == 2 * 120


def test_exact_head_keys():
    def heads(model):
        encoders = tuple(f"{name}." for name in _ENCODERS[type(model)])
        return sorted(k for k in model.state_dict() if not k.startswith(encoders))

    assert heads(LegacyOGMClassifier(N, width=W)) == ["fc_.bias", "fc_.weight"]
    assert heads(JournalOPMClassifier(N, width=W)) == ["fusion_model.fxy.bias", "fusion_model.fxy.weight"]
    assert heads(MMParetoClassifier(N, width=W)) == [
        "head.bias",
        "head.weight",
        "head_audio.bias",
        "head_audio.weight",
        "head_video.bias",
        "head_video.weight",
    ]
    assert heads(CRMTClassifier(N, width=W)) == [
        "fusion_module.orth_layer.a_0.bias",
        "fusion_module.orth_layer.a_0.weight",
        "fusion_module.orth_layer.a_1.bias",
        "fusion_module.orth_layer.a_1.weight",
        "fusion_module.orth_layer.fc.bias",
        "fusion_module.orth_layer.fc.weight",
    ]
    assert heads(BalanceMMClassifier(N, width=W)) == [
        "fusion_module.fc_out.bias",
        "fusion_module.fc_out.weight",
    ]
    assert isinstance(BalanceMMClassifier(N, width=W).modality_encoder, torch.nn.ModuleDict)


def test_unimodal_heads():
    audio, visual = _audio(), _visual()
    mm = MMParetoClassifier(N, width=W).eval()
    crmt = CRMTClassifier(N, width=W).eval()
    with torch.no_grad():
        fused, out_a, out_v = mm(audio, visual)
        a = ResNetEncoder.pool(mm.audio_net(audio))
        torch.testing.assert_close(out_a, mm.head_audio(a))
        assert fused.shape == out_a.shape == out_v.shape == (2, N)

        fused, out_a, out_v = crmt(audio, visual)
        a = ResNetEncoder.pool(crmt.audio_net(audio))
        torch.testing.assert_close(out_a, crmt.fusion_module.orth_layer.a_1(a))  # a_1 is audio
        assert fused.shape == out_a.shape == out_v.shape == (2, N)


def test_visual_clip_folding():
    """(B, 3, T, H, W): each frame goes through the encoder alone; features average over T."""
    model = OGMGEClassifier(n_classes=N, width=W).eval()
    visual = _visual(b=2, t=3)
    with torch.no_grad():
        _, v, _ = model(_audio(), visual)
        per_frame = torch.stack(
            [ResNetEncoder.pool(model.visual_net(visual[:, :, t])) for t in range(3)], dim=1
        )
    torch.testing.assert_close(v, per_frame.mean(dim=1))
    with pytest.raises(ValueError, match=r"^expected a 5-D \(B, C, T, H, W\) clip, got shape \(2, 3, 32, 32\)$"):
        model(_audio(), torch.randn(2, 3, 32, 32))


def test_audio_without_channel_axis():
    model = OGMGEClassifier(n_classes=N, width=W).eval()
    audio, visual = _audio(), _visual()
    with torch.no_grad():
        torch.testing.assert_close(model(audio[:, 0], visual)[2], model(audio, visual)[2])


# --- the bundled example checkpoint ---------------------------------------------


@pytest.fixture(scope="module")
def make_example():
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLES / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def on_disk():
    return torch.load(EXAMPLES / "ogm_ge_planted.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def generated(make_example):
    return make_example.build_checkpoint()


def _close(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    if torch.equal(actual, expected):
        return
    assert not exact and expected.is_floating_point()
    # Conv weights and momentum buffers go through one backward pass: another CPU's
    # kernels may round differently in the last bits.
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def test_example_checkpoint_matches_script(on_disk, generated):
    assert set(on_disk) == set(generated) == {
        "saved_epoch", "modulation", "alpha", "fusion", "acc", "model", "optimizer", "scheduler",
    }
    for key in ("saved_epoch", "modulation", "alpha", "fusion", "acc", "scheduler"):
        assert on_disk[key] == generated[key]
    assert type(on_disk["acc"]) is float and on_disk["saved_epoch"] == 30

    assert list(on_disk["model"]) == list(generated["model"])
    for key, expected in generated["model"].items():
        _close(on_disk["model"][key], expected, exact="bn" in key or "downsample.1" in key)

    opt_disk, opt_gen = on_disk["optimizer"], generated["optimizer"]
    assert opt_disk["param_groups"] == opt_gen["param_groups"]
    assert opt_disk["param_groups"][0]["momentum"] == 0.9
    assert set(opt_disk["state"]) == set(opt_gen["state"])
    for index, state in opt_gen["state"].items():
        _close(opt_disk["state"][index]["momentum_buffer"], state["momentum_buffer"], exact=False)


def test_example_checkpoint_layout(on_disk):
    model = on_disk["model"]
    assert all(k.startswith("module.") for k in model)
    reference = OGMGEClassifier(n_classes=6, fusion="concat", width=8).state_dict()
    assert {k.removeprefix("module."): tuple(v.shape) for k, v in model.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    # One momentum buffer per parameter, after a real step.
    n_params = sum(1 for k in model if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(on_disk["optimizer"]["state"]) == n_params
    assert (EXAMPLES / "ogm_ge_planted.pt").stat().st_size < 4_000_000


def test_example_planted_channels(make_example, on_disk):
    expected = json.loads((EXAMPLES / "ogm_ge_planted.expected.json").read_text())
    assert expected == make_example.planted_channels()
    assert set(expected["negative_bias"]) == {
        "audio_net.bn1", "audio_net.layer1.0.bn1", "audio_net.layer2.1.bn1", "visual_net.layer3.0.bn1",
    }
    assert set(expected["abnormal_pair"]) == {
        "audio_net.layer1.1.bn1", "audio_net.layer3.0.bn1", "audio_net.layer4.1.bn2",
    }
    model = on_disk["model"]
    planted: dict[str, set[int]] = {}
    for kind, layers in expected.items():
        for layer, channels in layers.items():
            assert 2 <= len(channels) <= 5
            planted[layer] = set(channels)
            gamma = model[f"module.{layer}.weight"][channels]
            beta = model[f"module.{layer}.bias"][channels]
            if kind == "negative_bias":
                assert torch.all(gamma == 0.05) and torch.all(beta == -0.5)
            else:
                assert torch.all(gamma.abs() < 1e-11) and torch.all(beta.abs() < 1e-11)
                assert torch.all(gamma.abs() > 0) and torch.all(beta.abs() > 0)

    # No unplanted channel looks dead: z = beta / (|gamma| sqrt(rv / (rv + eps))) >= -2.
    for key in model:
        if not key.endswith(".running_var"):
            continue
        layer = key.removeprefix("module.").removesuffix(".running_var")
        gamma, beta, rv = (model[f"module.{layer}.{p}"] for p in ("weight", "bias", "running_var"))
        z = beta / (gamma.abs() * torch.sqrt(rv / (rv + 1e-5)))
        keep = [c for c in range(len(z)) if c not in planted.get(layer, set())]
        assert float(z[keep].min()) >= -2.0, layer
        assert float(gamma[keep].min()) >= 0.5
        assert 0.5 <= float(rv.min()) and float(rv.max()) <= 2.0


# --- the architecture registry ------------------------------------------------------


class _ToyAV(torch.nn.Module):
    """An audio-visual classifier no built-in family knows: encoders ``ears`` and ``eyes`` (no
    modality word in the names), a BatchNorm ``gate`` feeding a sigmoid, and a head ``mix``."""

    def __init__(self, n_classes: int, width: int):
        super().__init__()
        self.ears, self.eyes = resnet18(1, width=width), resnet18(3, width=width)
        self.gate = torch.nn.BatchNorm1d(16 * width)
        self.mix = torch.nn.Linear(16 * width, n_classes)

    def fuse(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.sigmoid(self.gate(torch.cat((a, v), dim=1))))

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.fuse(audio_features(self.ears, audio), visual_features(self.eyes, visual))


class _Toy(Architecture):
    """Everything a family declares, in one class."""

    name = "toy-av"
    encoders = {"ears": "audio", "eyes": "visual"}

    def claims(self, evidence):
        return evidence.has("mix.")

    def spec(self, store, fusion):
        return ArchSpec(self.name, out_features(store, "mix"), store.info("ears.conv1.weight").shape[0], 18)

    def build(self, spec):
        return _ToyAV(spec.n_classes, spec.width)

    def parts(self, model):
        if not isinstance(model, _ToyAV):
            return None
        return AVParts(model, {"audio": model.ears, "visual": model.eyes}, model.mix, model.fuse,
                       ablation(model.fuse), "ablation", ("audio", "visual"))

    def bn_fact(self, name, idx):
        return ArchFact(self.name, "yes", "sigmoid", None) if name.split(".")[-1] == "gate" else None


def _toy_checkpoint(path: Path) -> _ToyAV:
    torch.manual_seed(0)
    model = _ToyAV(N, W).eval()
    with torch.no_grad():
        model.gate.running_mean.normal_()
    torch.save({"epoch": 3, "model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return model


def test_a_registered_family_is_detected_built_and_run(tmp_path):
    path = tmp_path / "toy.pth"
    original = _toy_checkpoint(path)
    builtins = [f.name for f in registry.families()]
    register(_Toy)
    try:
        ckpt = load_checkpoint(path)
        located = locate(ckpt)
        assert located.layout.name == "toy-av"
        assert located.layout.modalities == {"audio": "ears.", "visual": "eyes."}
        by_name = {layer.name: layer for layer in located.layers}
        assert (by_name["gate"].activation, by_name["gate"].activation_source) == ("sigmoid", "architecture:toy-av")
        assert by_name["ears.layer1.0.bn1"].activation_source == "architecture:resnet"
        assert by_name["eyes.bn1"].modality == "visual"

        resolved = resolve_model(ckpt, located.layout)
        assert resolved.source == "registry:toy-av" and resolved.spec.width == W
        batch = {"audio": _audio(), "visual": _visual(), "label": torch.zeros(2, dtype=torch.long)}
        with torch.no_grad():
            expected = original(batch["audio"], batch["visual"])
            torch.testing.assert_close(resolved(batch), expected)
            parts = av_parts(resolved.module)
            feats = parts.features(batch)
            torch.testing.assert_close(parts.fuse(feats["audio"], feats["visual"]), expected)
        assert parts.unimodal_source == "ablation"
    finally:
        unregister("toy-av")
    assert [f.name for f in registry.families()] == builtins
    located = locate(load_checkpoint(path))
    assert located.layout.name == "single"
    with pytest.raises(ModelError, match="layout 'single' matches no built-in architecture"):
        resolve_model(load_checkpoint(path), located.layout)
    with pytest.raises(TypeError, match="^_ToyAV is neither a built-in audio-visual classifier nor follows the adapter"):
        av_parts(original)


def test_registry_refuses_a_second_family_of_the_same_name():
    class Again(Architecture):
        name = "ogm-ge"

    with pytest.raises(ValueError, match="^architecture 'ogm-ge' is already registered$"):
        register(Again)
    assert type(registry.family("ogm-ge")).__name__ == "OGMGE"
    with pytest.raises(ModelError, match="^no registered architecture is named 'no-such-family'$"):
        registry.build(ArchSpec("no-such-family", N, W, 18))


def test_generic_signatures_are_tried_last():
    """CRMT and BalanceMM checkpoints also have a fusion_module: OGM-GE, tried after them, must not
    claim them."""
    order = [f.name for f in registry.families()]
    assert order[-1] == "ogm-ge"
    assert order.index("mmpareto") < order.index("crmt")
