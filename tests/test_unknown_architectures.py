"""Architectures avdiag does not know (issue 11): what a BatchNorm feeds, read from the model when there is
one (torch.fx, or a synthetic run), else from nn.Sequential numbering, validated against the probe on
briefly trained VGG-BN-style networks and real images (sklearn's handwritten digits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.data.tensors import save_tensor_file
from avdiag.load.store import TensorStore
from avdiag.locate.consumers import model_facts
from avdiag.locate.resolve import ResolvedModel
from avdiag.locate.sequential import ModuleTree, sequential_fact
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.inspect import inspect

FACTORY = "test_unknown_architectures"  # this module, importable from tests/ (the --model factories below)
# What follows each block's BN: a zeroing ReLU, a pooling layer alone (nothing zeroes), a smooth or
# parametric activation, or the next conv directly.
VARIANTS = {
    "vgg": ("relu", "relu", "relu", "relu"),
    "mixed": ("relu", "pool", "gelu", "direct", "prelu", "relu"),
}
WIDTHS = (16, 32, 32, 32, 32, 32)
ZEROING = {"relu"}


def _after_bn(kind: str, channels: int) -> list[nn.Module]:
    return {"relu": [nn.ReLU()], "pool": [nn.MaxPool2d(3, stride=1, padding=1)], "gelu": [nn.GELU()],
            "direct": [], "prelu": [nn.PReLU(channels)]}[kind]


class VGGLike(nn.Module):
    """conv-BN-<kind> blocks in one nn.Sequential (or one Sequential per block: ``nested``), halving the
    resolution after the first and third block, then a Sequential head (Flatten, Linear)."""

    def __init__(self, kinds: tuple[str, ...], nested: bool = False, n_classes: int = 10):
        super().__init__()
        blocks, c = [], 3
        for i, kind in enumerate(kinds):
            out = WIDTHS[i]
            block = [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), *_after_bn(kind, out)]
            if i in (0, 2):
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block) if nested else block)
            c = out
        self.features = nn.Sequential(*blocks) if nested else nn.Sequential(*[m for b in blocks for m in b])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 2 * 2, n_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def vgg_net() -> VGGLike:
    return VGGLike(VARIANTS["vgg"])


def nested_net() -> VGGLike:
    return VGGLike(VARIANTS["vgg"], nested=True)


def mixed_net() -> VGGLike:
    return VGGLike(VARIANTS["mixed"])


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real handwritten digits (8x8, grey, repeated over 3 channels), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).div(16.0).unsqueeze(1).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target[:n])


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, steps: int,
                  lr: float = 0.8, weight_decay: float = 5e-3) -> nn.Module:
    """SGD steps at a high learning rate with weight decay, so that some ReLU channels die as they do in
    real training, then a fifth as many at a twentieth of the rate (as a schedule ends), so that the running
    statistics settle on the final weights."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    for step in range(steps + steps // 5):
        if step == steps:
            for group in opt.param_groups:
                group["lr"] = lr / 20
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained_checkpoint(tmp_path, factory, *, seed: int = 0, steps: int = 100, n: int = 600):
    torch.manual_seed(seed)
    model = factory()
    x, y = digits(n)
    train_briefly(model, x, y, seed=seed, steps=steps)
    path = tmp_path / f"{factory.__name__}-{seed}.pt"
    torch.save(model.state_dict(), path)
    return path, model


def digits_file(tmp_path, n: int = 256):
    x, y = digits(n)
    return save_tensor_file(tmp_path / "digits.npz", y.numpy(), visual=x.numpy())


def rule_against_probe(path, data_file, factory_name: str) -> dict[str, int]:
    """Per channel: the static verdict without a model (the Sequential-numbering rule and z) against the truth
    (never fires on the real digits, measured by the probe, where the model shows a zeroing activation).
    ``model_*``: the same z verdict with the consumers read from the model (what the rule could reach)."""
    static = inspect(path, hash_file=False)
    measured = inspect(path, hash_file=False,
                       data=DataSource(str(data_file), model=f"{FACTORY}:{factory_name}", device="cpu", batch_size=128))
    truth = {v.layer.name: set(measured.measured[v.layer.name].dead) if v.layer.activation in ZEROING else set()
             for v in measured.layers}
    counts = {"tp": 0, "fp": 0, "fn": 0, "model_tp": 0, "model_fp": 0, "model_fn": 0, "channels": 0}
    for prefix, layers in (("", static.layers), ("model_", measured.layers)):
        for v in layers:
            predicted, real = set(v.dead), truth[v.layer.name]
            counts[prefix + "tp"] += len(predicted & real)
            counts[prefix + "fp"] += len(predicted - real)
            counts[prefix + "fn"] += len(real - predicted)
    counts["channels"] = sum(v.layer.channels for v in static.layers)
    return counts


# ---- the Sequential-numbering rule, from names alone ---------------------------------------------

def _facts(model: nn.Module) -> dict[str, tuple[str, str, str] | None]:
    state = model.state_dict()
    tree = ModuleTree.of(TensorStore.from_mapping(state))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return {n: sequential_fact(n, state[n + ".running_mean"].shape[0], tree) for n in bns}


def test_the_rule_reads_each_kind_of_successor_from_the_numbering():
    facts = _facts(mixed_net())
    # features: 0 conv 1 bn 2 relu 3 maxpool | 4 conv 5 bn 6 pool | 7 conv 8 bn 9 gelu 10 maxpool |
    #           11 conv 12 bn | 13 conv 14 bn 15 prelu | 16 conv 17 bn 18 relu ; head: 0 flatten 1 linear
    assert facts["features.1"] == ("yes", "relu", "sequential-numbering")
    assert facts["features.5"] == ("yes", "relu", "sequential-numbering")  # the rule's known blind spot: a pool
    assert facts["features.8"] == ("yes", "relu", "sequential-numbering")  # and a GELU look alike
    assert facts["features.12"] == ("no", "conv", "sequential-numbering")
    assert facts["features.14"] == ("yes", "prelu", "sequential-numbering")
    assert facts["features.17"] == ("yes", "relu", "sequential-numbering")  # last BN, the head follows


def test_the_last_bn_of_each_nested_block_is_recognised():
    facts = _facts(nested_net())
    assert set(facts) == {f"features.{i}.1" for i in range(4)}
    assert all(f == ("yes", "relu", "sequential-numbering") for f in facts.values())


def test_no_rule_where_nothing_follows_or_names_are_not_numbered():
    tail = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # the network ends at the BN
    named = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "bn": nn.BatchNorm2d(4), "fc": nn.Linear(4, 2)})
    assert _facts(tail) == {"1": None}
    assert _facts(named) == {"bn": None}


def test_unknown_sequential_checkpoint_counts_dead_channels_and_says_how(tmp_path):
    model = vgg_net().eval()
    with torch.no_grad():
        model.features[5].bias[[1, 2]] = -8.0
    torch.save(model.state_dict(), tmp_path / "vgg.pt")
    result = inspect(tmp_path / "vgg.pt")
    layer = next(v for v in result.layers if v.layer.name == "features.5")
    assert layer.dead == [1, 2] and layer.possibly_dead == []
    assert layer.layer.activation_source == "sequential-numbering"
    assert result.n_dead == 2 and result.n_undecided == 0
    assert "undecided" not in result.summary_line()
    assert result.modalities["model"].activations == {"relu": sum(WIDTHS[:4])}


def test_assume_activation_names_the_parameter_free_module(tmp_path):
    from avdiag.workflows.subject import LoadOptions

    model = vgg_net().eval()
    with torch.no_grad():
        model.features[5].bias[[1, 2]] = -8.0
    torch.save(model.state_dict(), tmp_path / "vgg.pt")
    result = inspect(tmp_path / "vgg.pt", load=LoadOptions(assume_activation="gelu"))
    assert result.n_dead == 0  # a GELU passes negative values on: nothing is dead
    assert {v.layer.activation for v in result.layers} == {"gelu"}


def test_what_stays_unknown_is_possibly_dead_and_the_summary_says_what_decides_it(tmp_path, cli):
    state = {"stem.conv.weight": torch.randn(4, 3, 3, 3), "stem.norm.weight": torch.ones(4),
             "stem.norm.bias": torch.tensor([-9.0, 0.0, -7.0, 0.1]), "stem.norm.running_mean": torch.zeros(4),
             "stem.norm.running_var": torch.ones(4)}
    torch.save(state, tmp_path / "odd.pt")
    result = inspect(tmp_path / "odd.pt")
    assert result.n_dead == 0 and result.n_undecided == 2
    assert result.summary_line().endswith(
        "; 2 undecided (what their BN feeds is unknown: --assume-activation relu or --model decides)")
    doc = cli("inspect", tmp_path / "odd.pt", "--json", "-").json()
    assert doc["summary"]["n_undecided"] == 2
    assert doc["modalities"]["model"]["activations"] == {"?": 4}


class PReLUBlock(nn.Module):
    """An AV-HuBERT-style ResNet block: conv-BN-PReLU, conv-BN, residual add, PReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.PReLU(c)
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


def test_bn_followed_by_prelu_is_never_dead_nor_undecided(tmp_path):
    video = nn.Module()
    video.frontend3D = nn.Sequential(nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8), nn.PReLU(8), nn.MaxPool3d(2))
    video.trunk = nn.Sequential(PReLUBlock(8), PReLUBlock(8))
    with torch.no_grad():
        for bn in (m for m in video.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn.bias[:4] = -9.0  # z ~ -9: dead before a ReLU, alive before a PReLU
    torch.save({f"feature_extractor_video.resnet.{k}": v for k, v in video.state_dict().items()}, tmp_path / "av.pt")
    result = inspect(tmp_path / "av.pt")
    assert result.n_dead == 0 and result.n_undecided == 0
    sources = {v.layer.name.split("resnet.")[1]: (v.layer.activation, v.layer.activation_source) for v in result.layers}
    assert sources == {"frontend3D.1": ("prelu", "sequential-numbering"),
                       "trunk.0.bn1": ("prelu", "heuristic:prelu-sibling"),
                       "trunk.0.bn2": ("prelu", "heuristic:prelu-sibling"),
                       "trunk.1.bn1": ("prelu", "heuristic:prelu-sibling"),
                       "trunk.1.bn2": ("prelu", "heuristic:prelu-sibling")}
    assert result.modalities[next(iter(result.modalities))].activations == {"prelu": 40}


# ---- the model itself ------------------------------------------------------------------------------

def test_fx_reads_every_consumer_of_the_mixed_network():
    facts, how = model_facts(ResolvedModel(mixed_net().eval(), "test", ("image",)))
    assert how == "fx"
    kinds = {name: f.consumer for name, f in facts.items()}
    assert kinds == {"features.1": "relu", "features.5": "conv", "features.8": "gelu", "features.12": "conv",
                     "features.14": "prelu", "features.17": "relu"}  # the pool alone is followed to the conv
    assert facts["features.1"].conv == "features.0"


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, a synthetic run can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = self.conv(image)
        if float(y.mean()) > 1e9:
            y = y * 0
        a = torch.relu(F.max_pool2d(self.bn_a(y), 2))
        b = self.act(self.bn_b(y))
        c = F.silu(self.bn_c(y))
        return self.fc((F.adaptive_avg_pool2d(a, 1) + F.adaptive_avg_pool2d(b + c, 1)).flatten(1))


def test_a_synthetic_run_reads_the_consumers_where_fx_cannot_trace():
    facts, how = model_facts(ResolvedModel(Untraceable().eval(), "test", ("image",)))
    assert how == "hooks"
    assert {n: f.consumer for n, f in facts.items()} == {"bn_a": "relu", "bn_b": "leaky_relu", "bn_c": "silu"}


def test_the_synthetic_run_leaves_the_model_as_it_was():
    model = Untraceable().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_facts(ResolvedModel(model, "test", ("image",)))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_synthetic_run_agrees_with_architecture_knowledge_on_a_built_in_model(av_checkpoint):
    from avdiag.workflows.subject import Subject

    subject = Subject.open(av_checkpoint("best_model.pth", "ogm-ge").path)
    facts, how = model_facts(subject.model())  # its forward unpacks shapes: torch.fx cannot trace it
    assert how == "hooks" and len(facts) == len(subject.located.layers) == 40
    for layer in subject.located.layers:  # in-place ReLUs end the BN output's readers
        expected = "relu" if layer.activation == "relu" else "add"
        assert facts[layer.name].consumer == expected, (layer.name, layer.activation)


def untraceable() -> Untraceable:
    return Untraceable()


def test_with_model_the_static_scan_takes_the_consumers_from_the_model(tmp_path):
    model = mixed_net().eval()
    with torch.no_grad():
        for i in (1, 5, 8, 14):
            model.features[i].bias[:3] = -9.0  # z ~ -9 everywhere: only the ReLU layer has dead channels
    torch.save(model.state_dict(), tmp_path / "mixed.pt")
    by_rule = {v.layer.name: v for v in inspect(tmp_path / "mixed.pt").layers}
    assert by_rule["features.5"].dead == [0, 1, 2]  # the rule takes the pool for an activation
    result = inspect(tmp_path / "mixed.pt", model=f"{FACTORY}:mixed_net")
    layers = {v.layer.name: v for v in result.layers}
    assert {n: (v.layer.activation, v.layer.activation_source) for n, v in layers.items()} == {
        "features.1": ("relu", f"model:factory:{FACTORY}:mixed_net (fx)"),
        "features.5": ("conv", f"model:factory:{FACTORY}:mixed_net (fx)"),
        "features.8": ("gelu", f"model:factory:{FACTORY}:mixed_net (fx)"),
        "features.12": ("conv", f"model:factory:{FACTORY}:mixed_net (fx)"),
        "features.14": ("prelu", f"model:factory:{FACTORY}:mixed_net (fx)"),
        "features.17": ("relu", f"model:factory:{FACTORY}:mixed_net (fx)")}
    assert layers["features.1"].dead == [0, 1, 2]
    assert result.n_dead == 3  # PReLU, GELU, the conv: kept out of the dead count
    assert result.modalities["model"].activations == {"conv": WIDTHS[1] + WIDTHS[3], "gelu": WIDTHS[2],
                                                      "prelu": WIDTHS[4], "relu": WIDTHS[0] + WIDTHS[5]}


def test_untraceable_model_given_with_model_is_read_by_a_synthetic_run(tmp_path):
    model = Untraceable().eval()
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b, model.bn_c):
            bn.bias[:2] = -9.0
    torch.save(model.state_dict(), tmp_path / "odd.pt")
    assert inspect(tmp_path / "odd.pt").n_undecided == 6
    result = inspect(tmp_path / "odd.pt", model=f"{FACTORY}:untraceable")
    assert {v.layer.name: v.layer.activation for v in result.layers} == {
        "bn_a": "relu", "bn_b": "leaky_relu", "bn_c": "silu"}
    assert result.n_dead == 2 and result.n_undecided == 0


# ---- validation: the rule against the probe on briefly trained networks ------------------------------

def test_on_a_trained_vgg_the_rule_does_what_the_model_does_and_agrees_with_the_probe(tmp_path):
    path, _ = trained_checkpoint(tmp_path, vgg_net, seed=1)
    counts = rule_against_probe(path, digits_file(tmp_path), "vgg_net")
    assert counts["tp"] + counts["fn"] >= 3, counts  # brief high-rate training really kills channels
    assert [counts[k] for k in ("tp", "fp", "fn")] == [counts["model_" + k] for k in ("tp", "fp", "fn")]
    assert counts["tp"] / max(counts["tp"] + counts["fp"], 1) >= 0.9, counts
    assert counts["tp"] / (counts["tp"] + counts["fn"]) >= 0.4, counts  # the rest: z misses, model or not


def test_on_a_trained_mixed_network_the_rule_misses_nothing_the_model_finds(tmp_path):
    path, _ = trained_checkpoint(tmp_path, mixed_net, seed=1)
    counts = rule_against_probe(path, digits_file(tmp_path), "mixed_net")
    assert counts["tp"] + counts["fn"] >= 3, counts
    assert counts["tp"] == counts["model_tp"] and counts["fp"] >= counts["model_fp"], counts


def test_without_the_rule_the_same_checkpoint_reported_nothing(tmp_path):
    path, _ = trained_checkpoint(tmp_path, vgg_net, seed=1)
    state = torch.load(path, weights_only=True)
    renamed = {k.replace("features.", "features.stage_"): v for k, v in state.items()}  # numbering hidden
    torch.save(renamed, tmp_path / "renamed.pt")
    with_rule, without = inspect(path), inspect(tmp_path / "renamed.pt")
    assert with_rule.n_dead > 0 and with_rule.n_undecided == 0
    assert without.n_dead == 0 and without.n_undecided == with_rule.n_dead


def summary_numbers(tmp_path, seeds=range(5), steps: int = 100) -> dict[str, dict[str, float]]:
    """Precision and recall of the rule per variant over ``seeds`` (the numbers quoted in the README)."""
    out = {}
    data_file = digits_file(tmp_path, 512)
    for factory in (vgg_net, nested_net, mixed_net):
        total: dict[str, float] = {}
        for seed in seeds:
            path, _ = trained_checkpoint(tmp_path, factory, seed=seed, steps=steps)
            for k, v in rule_against_probe(path, data_file, factory.__name__).items():
                total[k] = total.get(k, 0) + v
        for prefix in ("", "model_"):
            tp, fp, fn = (total[prefix + k] for k in ("tp", "fp", "fn"))
            total[prefix + "precision"] = tp / max(tp + fp, 1)
            total[prefix + "recall"] = tp / max(tp + fn, 1)
        out[factory.__name__] = total
    return out


if __name__ == "__main__":  # python tests/test_unknown_architectures.py: the validation numbers
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as folder:
        for name, numbers in summary_numbers(Path(folder), range(int(sys.argv[1]) if len(sys.argv) > 1 else 5)).items():
            print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in numbers.items()})
