"""ABRi (Feng, Xia, Hu 2023, "Revisiting Pre-training in Audio-Visual Learning"): the fold math,
module-mode conversion of a small ResNet, a short fine-tune, and the exact eval-mode merge back."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avdiag.models import resnet18
from avdiag.rewrite.abri import (
    ABRiBatchNorm2d,
    abri_modules,
    abri_parameters,
    blend_running_stats,
    convert,
    fold_init,
    merge,
    reset_running_stats,
)

W = 8  # stem width: feature size 64
EXTRA = ("abri_alpha", "abri_new.weight", "abri_new.bias", "abri_new.running_mean", "abri_new.running_var",
         "abri_new.num_batches_tracked")
DEAD = ("bn1", 3)  # planted dead channel: stem bn1, channel 3


# --- fold math -------------------------------------------------------------------------------------


def test_fold_init_known_numbers():
    gamma = torch.tensor([0.0, 2.0, -1.0, 1e-8])
    beta = torch.tensor([-0.5, 1.0, 0.2, -0.5])
    g, b = fold_init(gamma, beta, 0.5)
    assert torch.allclose(g, torch.tensor([0.5, 1.5, 0.0, 0.5]))
    assert torch.allclose(b, torch.tensor([-0.25, 0.5, 0.1, -0.25]))
    g, b = fold_init(gamma, beta, 0.25)
    assert torch.allclose(g, torch.tensor([0.75, 1.25, 0.5, 0.75]))
    assert torch.allclose(b, torch.tensor([-0.125, 0.25, 0.05, -0.125]))
    # only the chosen channels change; index list, LongTensor, negative index and bool mask agree
    for channels in ([0, 3], torch.tensor([0, 3]), [0, -1], torch.tensor([True, False, False, True])):
        g, b = fold_init(gamma, beta, 0.5, channels=channels)
        assert torch.allclose(g, torch.tensor([0.5, 2.0, -1.0, 0.5]))
        assert torch.allclose(b, torch.tensor([-0.25, 1.0, 0.2, -0.25]))
    # per-channel alpha, restricted to channel 1
    g, b = fold_init(gamma, beta, torch.tensor([0.1, 0.0, 1.0, 0.9]), channels=[1])
    assert torch.allclose(g, torch.tensor([0.0, 1.0, -1.0, 1e-8]))
    assert torch.allclose(b, torch.tensor([-0.5, 0.0, 0.2, -0.5]))
    # inputs untouched, dtype kept
    assert gamma[0] == 0.0 and beta[1] == 1.0
    assert fold_init(gamma.half(), beta.half(), 0.5)[0].dtype == torch.float16
    with pytest.raises(IndexError, match=r"^channel index out of range for 4 channels$"):
        fold_init(gamma, beta, 0.5, channels=[4])
    with pytest.raises(ValueError, match=r"^alpha must be a scalar or have shape \(4,\), got \(3,\)$"):
        fold_init(gamma, beta, torch.ones(3))


def test_running_stat_blend_and_reset():
    mean = torch.tensor([2.0, -4.0, 0.5])
    var = torch.tensor([9.0, 0.0, 1e-6])
    m, v = blend_running_stats(mean, var, 0.5)
    assert torch.allclose(m, torch.tensor([1.0, -2.0, 0.25]))
    assert torch.allclose(v, torch.tensor([5.0, 0.5, 0.5000005]))
    m, v = blend_running_stats(mean, var, 0.5, channels=[1])
    assert torch.allclose(m, torch.tensor([2.0, -2.0, 0.5])) and torch.allclose(v, torch.tensor([9.0, 0.5, 1e-6]))
    m, v = reset_running_stats(mean, var)
    assert torch.equal(m, torch.zeros(3)) and torch.equal(v, torch.ones(3))
    m, v = reset_running_stats(mean, var, channels=torch.tensor([False, True, True]))
    assert torch.equal(m, torch.tensor([2.0, 0.0, 0.0])) and torch.equal(v, torch.tensor([9.0, 1.0, 1.0]))
    m, v = reset_running_stats(mean, var, channels=[])
    assert torch.equal(m, mean) and torch.equal(v, var)


# --- a "pretrained" small ResNet -------------------------------------------------------------------


def _pretrained(seed: int = 0) -> nn.Module:
    """A width-8 ResNet-18 whose BN layers look pre-trained (random affine parameters and running
    statistics, so the two ABRi branches differ) with one planted dead channel."""
    torch.manual_seed(seed)
    model = resnet18(3, width=W)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.uniform_(0.2, 1.0)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1000 + c)
        bn = getattr(model, DEAD[0])
        bn.weight[DEAD[1]] = 1e-9
        bn.bias[DEAD[1]] = -0.5
    return model


class _Net(nn.Module):
    """Encoder + a tiny linear head, for the fine-tune."""

    def __init__(self, encoder: nn.Module, n_classes: int = 5):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(8 * W, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pool(self.encoder(x)))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _finetune(per_channel: bool) -> tuple[nn.Module, set[str]]:
    """Convert a pretrained encoder, check alpha gradients, fine-tune a few SGD steps."""
    encoder = _pretrained()
    original_keys = set(encoder.state_dict())
    convert(encoder, per_channel=per_channel)
    net = _Net(encoder)
    alphas = {id(p) for p in abri_parameters(net)}
    rest = [p for p in net.parameters() if id(p) not in alphas]
    opt = torch.optim.SGD([{"params": rest}, {"params": abri_parameters(net), "lr": 0.5, "weight_decay": 0.0}],
                          lr=0.2, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = _images(16, 100 + step), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for name, m in abri_modules(encoder):
            grad = m.abri_alpha.grad
            assert grad is not None and grad.shape == m.abri_alpha.shape, name
            assert torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, f"{name}: abri_alpha got no gradient at step {step}"
            if per_channel:
                assert (grad != 0).all(), f"{name}: a channel's alpha got no gradient"
        opt.step()
    return encoder, original_keys


@pytest.fixture(scope="module", params=[False, True], ids=["per-layer", "per-channel"])
def trained(request):
    encoder, original_keys = _finetune(per_channel=request.param)
    return request.param, encoder, original_keys


# --- convert ---------------------------------------------------------------------------------------


def test_convert_keys_and_initial_state():
    encoder = _pretrained()
    sd = {k: v.clone() for k, v in encoder.state_dict().items()}
    bn_names = [n for n, m in encoder.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == 20
    out = convert(encoder)
    assert out is encoder
    layers = dict(abri_modules(encoder))
    assert sorted(layers) == sorted(bn_names)
    converted = encoder.state_dict()
    assert set(converted) == set(sd) | {f"{n}.{e}" for n in bn_names for e in EXTRA}
    for k, v in sd.items():  # the original keys keep their meaning (the pretrained branch)
        assert torch.equal(converted[k], v), k
    for name, m in layers.items():
        assert m.abri_alpha.shape == () and float(m.abri_alpha.detach()) == 0.5
        assert torch.equal(m.abri_new.weight, torch.ones(m.num_features))
        assert torch.equal(m.abri_new.bias, torch.zeros(m.num_features))
        assert torch.equal(m.abri_new.running_mean, torch.zeros(m.num_features))
        assert torch.equal(m.abri_new.running_var, torch.ones(m.num_features))
        assert m.abri_new.eps == m.eps and m.abri_new.momentum == m.momentum
    assert len(abri_parameters(encoder)) == 20
    # converting again changes nothing (abri_new branches are not converted)
    convert(encoder)
    assert set(encoder.state_dict()) == set(converted)
    # a module-mode checkpoint loads strictly into convert(build())
    fresh = convert(resnet18(3, width=W))
    fresh.load_state_dict(converted, strict=True)
    x = _images(4, 7)
    assert torch.equal(fresh.eval()(x), encoder.eval()(x))


def test_convert_include_and_per_channel():
    encoder = convert(_pretrained(), alpha=0.7, per_channel=True, include=lambda n: n.endswith("bn1"))
    names = [n for n, _ in abri_modules(encoder)]
    assert names and all(n.endswith("bn1") for n in names) and len(names) == 9
    assert all(m.abri_alpha.shape == (m.num_features,) and torch.all(m.abri_alpha == 0.7)
               for _, m in abri_modules(encoder))
    assert isinstance(encoder.layer1[0].bn2, nn.BatchNorm2d) and not isinstance(encoder.layer1[0].bn2, ABRiBatchNorm2d)


def test_dead_channel_gets_half_gamma_at_init():
    """Training mode at init: the pair equals one BN with gamma' = a*g + (1-a), beta' = a*b."""
    encoder = _pretrained()
    bn = copy.deepcopy(getattr(encoder, DEAD[0]))
    abri = ABRiBatchNorm2d.from_bn(bn).train()
    gamma_eff, beta_eff = abri.effective_affine()
    c = DEAD[1]
    assert abs(float(gamma_eff[c]) - 0.5) < 1e-6 and abs(float(beta_eff[c]) + 0.25) < 1e-6
    folded = copy.deepcopy(bn).train()
    with torch.no_grad():
        g, b = fold_init(bn.weight, bn.bias, 0.5)
        folded.weight.copy_(g)
        folded.bias.copy_(b)
    assert abs(float(folded.weight.detach()[c]) - 0.5) < 1e-6
    x = torch.randn(6, bn.num_features, 9, 9) * 3 + 1
    y = abri(x)
    assert torch.allclose(y, folded(x), atol=1e-5, rtol=1e-5)
    assert y[:, c].std() > 0.4  # the dead channel carries signal again
    # fold on the dead channel only
    g, b = fold_init(bn.weight, bn.bias, 0.5, channels=[c])
    assert torch.equal(g[:c], bn.weight[:c]) and abs(float(g[c]) - 0.5) < 1e-6


# --- fine-tune and merge ---------------------------------------------------------------------------


def test_finetune_moves_alpha_and_running_stats(trained):
    _, encoder, _ = trained
    for name, m in abri_modules(encoder):
        assert (m.abri_alpha.detach() - 0.5).abs().max() > 1e-3, name
        assert not torch.allclose(m.running_mean, m.abri_new.running_mean), name
        assert not torch.allclose(m.running_var, m.abri_new.running_var), name
        assert int(m.abri_new.num_batches_tracked) == 4 and int(m.num_batches_tracked) == 1004 + m.num_features


@pytest.mark.parametrize("with_data", [False, True], ids=["pretrained-stats", "data-stats"])
def test_merge_is_exact_in_eval(trained, with_data):
    per_channel, encoder, original_keys = trained
    unmerged = copy.deepcopy(encoder).eval()
    model = copy.deepcopy(encoder).train()
    loader = [_images(8, 500 + i) for i in range(3)] if with_data else None
    merged, report = merge(model, loader=loader)
    assert merged is model and merged.training  # modes restored / kept
    assert abri_modules(merged) == []
    assert not any(isinstance(m, ABRiBatchNorm2d) for m in merged.modules())
    sd = merged.state_dict()
    assert set(sd) == original_keys
    assert report.stats == ("data" if with_data else "pretrained") and not report.unreached
    assert set(report.layers.values()) == {"data" if with_data else "pretrained"}
    assert len(report.layers) == 20
    # eval outputs equal the unmerged pair's, on fresh inputs
    merged.eval()
    x = _images(8, 900)
    with torch.no_grad():
        ref, out = unmerged(x), merged(x)
    assert (ref - out).abs().max() < 1e-5
    # the original architecture loads the merged state dict strictly
    plain = resnet18(3, width=W)
    plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert (plain.eval()(x) - ref).abs().max() < 1e-5
    # num_batches_tracked of the pretrained branch is kept
    for name, m in abri_modules(unmerged):
        assert torch.equal(sd[f"{name}.num_batches_tracked"], m.num_batches_tracked)
        if not with_data:
            assert torch.equal(sd[f"{name}.running_mean"], m.running_mean)
            assert torch.equal(sd[f"{name}.running_var"], m.running_var)
    if with_data:  # the running stats are the exact input moments over the loader
        inputs: dict[str, list[torch.Tensor]] = {}
        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].clone()))
                 for n, m in abri_modules(unmerged)]
        with torch.no_grad():
            for batch in loader:
                unmerged(batch)
        for h in hooks:
            h.remove()
        for name, xs in inputs.items():
            flat = torch.cat(xs).double().transpose(0, 1).reshape(xs[0].shape[1], -1)
            var, mean = torch.var_mean(flat, dim=1, correction=0)
            assert torch.allclose(sd[f"{name}.running_mean"].double(), mean, atol=1e-5, rtol=1e-5), name
            assert torch.allclose(sd[f"{name}.running_var"].double(), var, atol=1e-5, rtol=1e-4), name
            assert report.positions[name] == flat.shape[1]
            assert not torch.allclose(sd[f"{name}.running_mean"], unmerged.get_submodule(name).running_mean)


def test_merge_with_data_single_layer_matches_training_mode():
    """With data statistics, the merged BN in training mode on the loader's data (as one batch)
    gives exactly the pair's eval output: batch statistics = the recorded running statistics."""
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    abri = ABRiBatchNorm2d.from_bn(bn, per_channel=True)
    with torch.no_grad():
        abri.abri_alpha.copy_(torch.tensor([0.5, 0.1, 1.3, -0.2, 0.8]))
        abri.abri_new.weight.uniform_(0.5, 1.5)
        abri.abri_new.running_mean.normal_()
        abri.abri_new.running_var.uniform_(0.5, 2.0)
    data = torch.randn(12, 5, 6, 6) * 4 + 10  # |mean| >> std: the shifted sums must not cancel
    data[:, 2] = 3.25  # a constant channel: variance exactly 0
    with torch.no_grad():
        ref = abri.eval()(data)
    merged, report = merge(abri, loader=list(data.split(5)), forward=lambda m, b: m(b))
    assert type(merged) is nn.BatchNorm2d and report.stats == "data" and report.batches == 3
    assert merged.running_var[2] == 0
    with torch.no_grad():
        assert (merged.eval()(data) - ref).abs().max() < 1e-4
        assert (merged.train()(data) - ref).abs().max() < 1e-4


def test_merge_reports_unreached_layers_and_rejects_forward_without_loader():
    encoder = convert(_pretrained())
    net = nn.Sequential(encoder.conv1, encoder.bn1)  # only the stem BN is reached
    loader = [_images(4, 11)]
    _, report = merge(encoder, loader=loader, forward=lambda _m, b: net(b))
    assert report.stats == "mixed" and report.layers["bn1"] == "data"
    assert len(report.unreached) == 19 and "bn1" not in report.unreached
    with pytest.raises(ValueError, match="^forward is given without a loader$"):
        merge(convert(_pretrained()), forward=lambda m, b: m(b))


def test_data_stats_make_resumed_training_agree_with_eval(trained):
    """Why re-estimate on data: the merged model in training mode (batch statistics) then stays
    close to the pair's eval output; with the stale pretrained statistics it does not."""
    _, encoder, _ = trained
    unmerged = copy.deepcopy(encoder).eval()
    batch = torch.cat([_images(8, 600 + i) for i in range(6)])
    with torch.no_grad():
        ref = unmerged(batch)
    errors = {}
    for source, loader in (("pretrained", None), ("data", [_images(8, 500 + i) for i in range(3)])):
        merged, _ = merge(copy.deepcopy(encoder), loader=loader)
        with torch.no_grad():
            errors[source] = float((merged.train()(batch) - ref).norm() / ref.norm())
    assert errors["data"] < 0.2 < errors["pretrained"]


def test_both_branches_follow_the_module_mode():
    bn = nn.BatchNorm2d(4)
    abri = ABRiBatchNorm2d.from_bn(bn)
    with torch.no_grad():
        abri.abri_new.running_mean.fill_(2.0)
    x = torch.randn(3, 4, 5, 5)
    abri.train()
    abri.training = False  # set on the module alone: the fresh branch follows it too
    y = abri(x)
    assert not abri.abri_new.training
    assert int(abri.abri_new.num_batches_tracked) == 0 and int(abri.num_batches_tracked) == 0
    expected = 0.5 * x / (1 + 1e-5) ** 0.5 + 0.5 * (x - 2.0) / (1 + 1e-5) ** 0.5
    assert torch.allclose(y, expected, atol=1e-6)
    with pytest.raises(ValueError, match="a BatchNorm2d with affine=False has none"):
        ABRiBatchNorm2d(4, affine=False)
    assert convert(nn.Sequential(nn.BatchNorm2d(4, affine=False)))[0].__class__ is nn.BatchNorm2d


def test_root_module_and_layers_without_running_stats():
    root = convert(nn.BatchNorm2d(4))
    assert isinstance(root, ABRiBatchNorm2d)
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1e-9, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([-0.5, 0.1, 0.3]))
    abri = convert(bn, per_channel=True)
    with torch.no_grad():
        abri.abri_alpha.copy_(torch.tensor([0.2, 0.9, -0.4]))
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        ref = abri.eval()(x)  # no running stats: batch statistics in both modes
    merged, report = merge(abri, loader=[x])
    assert report.stats == "batch" and report.layers == {"": "batch"} and merged.running_mean is None
    assert torch.allclose(merged.eval()(x), ref, atol=1e-6)


# --- the registered method on its own (no writing, no verification) --------------------------------


def _method_input(tmp_path, modality: str | None = None):
    """The rewrite input of a saved `_pretrained()` encoder: its file opened once and scanned statically."""
    from avdiag.measure.thresholds import Thresholds
    from avdiag.rewrite.methods import RewriteInput
    from avdiag.workflows.inspect import scan
    from avdiag.workflows.subject import Subject

    path = tmp_path / "encoder.pt"
    torch.save(_pretrained().state_dict(), path)
    subject = Subject.open(path)
    return RewriteInput(subject.ckpt, subject.located, scan(subject, Thresholds(), hash_file=False).layers, modality)


def test_abri_method_folds_the_flagged_channel(tmp_path):
    from avdiag.rewrite import methods
    from avdiag.rewrite.methods.abri import AbriOptions

    target = _method_input(tmp_path)
    sd = _pretrained().state_dict()
    layer, channel = DEAD
    rewrite = methods.get("abri").apply(target, AbriOptions(alpha=0.25, stats="reset"))
    assert sorted(rewrite.tensors) == sorted(f"{layer}.{role}" for role in
                                             ("weight", "bias", "running_mean", "running_var"))
    expected = {
        "weight": (0.25 * sd[f"{layer}.weight"].double() + 0.75).float(),
        "bias": (0.25 * sd[f"{layer}.bias"].double()).float(),
        "running_mean": torch.zeros_like(sd[f"{layer}.running_mean"]),
        "running_var": torch.ones_like(sd[f"{layer}.running_var"])}
    for role, value in expected.items():
        new, old = rewrite.tensors[f"{layer}.{role}"], sd[f"{layer}.{role}"]
        assert new.dtype == old.dtype and new[channel] == value[channel], role
        others = [c for c in range(len(old)) if c != channel]
        assert torch.equal(new[others], old[others]), f"{role}: only channel {channel} may change"
    assert rewrite.parameters == {"method": "abri", "mode": "fold", "alpha": 0.25, "scope": "flagged",
                                  "modality": None, "running_stats": "reset", "exact_blend": False,
                                  "layers": [layer], "channels": {layer: [channel]}}
    assert rewrite.diagnosis == {}


def test_abri_method_scopes_and_module_keys(tmp_path):
    from avdiag.rewrite import methods
    from avdiag.rewrite.methods.abri import AbriOptions

    target = _method_input(tmp_path)
    every_bn = sorted(n for n, m in _pretrained().named_modules() if isinstance(m, nn.BatchNorm2d))
    everything = methods.get("abri").apply(target, AbriOptions(scope="all"))
    assert everything.parameters["layers"] == every_bn and everything.parameters["channels"] == {}
    assert len(everything.tensors) == 4 * len(every_bn)
    module = methods.get("abri").apply(target, AbriOptions(mode="module", per_channel=True, alpha=0.3))
    c = _pretrained().bn1.num_features
    assert sorted(module.tensors) == sorted(f"{DEAD[0]}.{leaf}" for leaf in EXTRA)
    assert torch.equal(module.tensors[f"{DEAD[0]}.abri_alpha"], torch.full((c,), 0.3))


def test_abri_method_data_stats_without_data_is_a_usage_error(tmp_path):
    from avdiag.errors import UsageError
    from avdiag.rewrite import methods
    from avdiag.rewrite.methods.abri import AbriOptions

    method = methods.get("abri")
    with pytest.raises(UsageError, match="^--stats data needs --data$"):
        method.validate(AbriOptions(stats="data"), False)
    method.validate(AbriOptions(stats="data"), True)
    with pytest.raises(UsageError, match="^--stats data needs --data$"):  # apply checks it on its own too
        method.apply(_method_input(tmp_path), AbriOptions(stats="data"))
