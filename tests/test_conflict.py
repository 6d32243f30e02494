"""avdiag.measure.conflict against an independent, straightforward computation.

The reference below shares no code with the implementation: it runs the model's own forward,
builds the uni-modal logits by hand for each layout, takes one ``torch.autograd.grad`` per loss,
flattens the gradients and computes every figure from the vectors; per-sample figures come from a
loop of batch-size-1 backward passes in eval mode.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from avdiag.data import make_loader, open_dataset
from avdiag.errors import DataError
from avdiag.measure.conflict import GradientConflict, ModalityConflict, measure_conflict, mmpareto_weights
from avdiag.models import ConcatFusion, MMParetoClassifier, OGMGEClassifier
from avdiag.models.parts import AVParts, av_parts

TOL = 1e-5
GAMMA = 1.5
SPEC = "synthetic:n=12,classes=6,audio=0.9,visual=0.2,seed=0,f=32,t=24,size=16,frames=2"

LAYOUTS = {  # name -> (builder, layout of the uni-modal logits)
    "concat": (lambda: OGMGEClassifier(6, "concat", width=8), "slice"),
    "mmpareto": (lambda: MMParetoClassifier(6, width=8), "heads"),
    "film": (lambda: OGMGEClassifier(6, "film", width=8), "ablation"),
}


# ---- the independent reference ----------------------------------------------------------------


def ref_logits(model, layout, audio, visual):
    """(fused, out_audio, out_visual) written out per layout."""
    if layout == "heads":
        return model(audio, visual)
    a, v, fused = model(audio, visual)
    if layout == "slice":
        w, b = model.fusion_module.fc_out.weight, model.fusion_module.fc_out.bias
        d = a.shape[1]
        return fused, a @ w[:, :d].t() + 0.5 * b, v @ w[:, d:].t() + 0.5 * b
    head = model.fusion_module
    return fused, head(a, torch.zeros_like(v)), head(torch.zeros_like(a), v)


def ref_shared_head(model, layout):
    """(tensor, index) pairs of the head elements both uni-modal logits use, by hand; None: none."""
    if layout == "slice":
        return [(model.fusion_module.fc_out.bias, slice(None))]
    if layout == "ablation":  # FiLM: out_v sees only fc's bias (a = 0) and its beta half; out_a no gamma
        fm = model.fusion_module
        return [(fm.fc.bias, slice(fm.d, None)), (fm.fc_out.weight, slice(None)), (fm.fc_out.bias, slice(None))]
    return None


def enc_params(model, m):
    net = model.audio_net if m == "audio" else model.visual_net
    prefix = "audio_net." if m == "audio" else "visual_net."
    return [(prefix + n, p) for n, p in net.named_parameters()]


def flat(grads):
    return torch.cat([g.reshape(-1).double() for g in grads])


def cosine(x, y):
    return float(x @ y / (x.norm() * y.norm()))


def ref_batch(model, layout, batch, train_mode):
    model.train(train_mode)
    fused, oa, ov = ref_logits(model, layout, batch["audio"], batch["visual"])
    y = batch["label"]
    l_mm, l_a, l_v = F.cross_entropy(fused, y), F.cross_entropy(oa, y), F.cross_entropy(ov, y)
    out = {"losses": (l_mm.item(), l_a.item(), l_v.item())}
    for m, l_uni in (("audio", l_a), ("visual", l_v)):
        named = enc_params(model, m)
        ps = [p for _, p in named]
        g1 = torch.autograd.grad(l_mm, ps, retain_graph=True)
        g2 = torch.autograd.grad(l_uni, ps, retain_graph=True)
        v1, v2 = flat(g1), flat(g2)
        c = cosine(v1, v2)
        if c <= 0:
            a1 = float((v2 @ v2 - v1 @ v2) / ((v1 - v2) @ (v1 - v2)))
            a1 = min(0.999, max(0.001, a1))
        else:
            a1 = 0.5
        a2 = 1 - a1
        hat = 2 * a1 * v1 + 2 * a2 * v2
        scale = GAMMA * max(1.0, float((v1 + v2).norm() / hat.norm()))
        tensor_scales = []
        for t1, t2 in zip(g1, g2):
            t1, t2 = t1.double(), t2.double()
            th = 2 * a1 * t1 + 2 * a2 * t2
            tensor_scales.append(GAMMA * max(1.0, float((t1 + t2).norm() / th.norm())))
        pc = v1 - (v1 @ v2) / (v2 @ v2) * v2 if float(v1 @ v2) < 0 else v1
        layers = {}
        for (name, _), t1, t2 in zip(named, g1, g2):
            layer = name.rsplit(".", 1)[0]
            layers.setdefault(layer, ([], []))
            layers[layer][0].append(t1)
            layers[layer][1].append(t2)
        out[m] = {"cos": c, "norm_multimodal": float(v1.norm()), "norm_unimodal": float(v2.norm()),
                  "magnitude_ratio": float(v2.norm() / v1.norm()), "weights": (a1, a2), "scale": scale,
                  "tensor_scale": (min(tensor_scales), max(tensor_scales)),
                  "pcgrad_norm": float(pc.norm()), "pcgrad_cos": cosine(pc, v1),
                  "per_layer": {k: cosine(flat(x), flat(z)) for k, (x, z) in layers.items()}}
    shared = ref_shared_head(model, layout)
    if shared is None:
        out["head_cos"] = None
    else:
        ts = [t for t, _ in shared]
        ga = torch.autograd.grad(l_a, ts, retain_graph=True)
        gv = torch.autograd.grad(l_v, ts)
        out["head_cos"] = cosine(torch.cat([g[s].reshape(-1).double() for g, (_, s) in zip(ga, shared)]),
                                 torch.cat([g[s].reshape(-1).double() for g, (_, s) in zip(gv, shared)]))
        out["head_shared"] = sum(int(t[s].numel()) for t, s in shared)
    return out


def ref_samples(model, layout, batch):
    """Per-sample encoder cosines: a loop of batch-size-1 backward passes, eval mode."""
    model.eval()
    rows = []
    for i in range(len(batch["label"])):
        fused, oa, ov = ref_logits(model, layout, batch["audio"][i:i + 1], batch["visual"][i:i + 1])
        y = batch["label"][i:i + 1]
        row = {"index": int(batch["index"][i]), "label": int(y)}
        for m, o in (("audio", oa), ("visual", ov)):
            ps = [p for _, p in enc_params(model, m)]
            g1 = torch.autograd.grad(F.cross_entropy(fused, y), ps, retain_graph=True)
            g2 = torch.autograd.grad(F.cross_entropy(o, y), ps, retain_graph=True)
            row["cos_" + m] = cosine(flat(g1), flat(g2))
        rows.append(row)
    return rows


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches():
    return list(make_loader(open_dataset(SPEC), batch_size=6))


def build(name, seed=0):
    torch.manual_seed(seed)
    builder, layout = LAYOUTS[name]
    return builder(), layout


def close(a, b, rel=False):
    if rel:
        return abs(a - b) <= TOL * max(1.0, abs(b))
    return abs(a - b) <= TOL


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode,per_sample", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_batch_figures_match_reference(name, train_mode, per_sample, batches):
    """Per-batch figures; (eval, per_sample) takes them from the shared per-sample pass."""
    model, layout = build(name)
    parts = av_parts(model)
    assert parts.unimodal_source == layout
    result = measure_conflict(parts, batches, "cpu", per_sample=per_sample, train_mode=train_mode)
    assert len(result.batches) == len(batches)
    for rec, batch in zip(result.batches, batches):
        ref = ref_batch(model, layout, batch, train_mode)
        assert close(rec.loss_multimodal, ref["losses"][0])
        assert close(rec.loss_unimodal["audio"], ref["losses"][1])
        assert close(rec.loss_unimodal["visual"], ref["losses"][2])
        for m in ("audio", "visual"):
            got, want = rec.modalities[m], ref[m]
            assert close(got.cos, want["cos"]), (m, got.cos, want["cos"])
            assert got.conflict == (want["cos"] <= 0)
            assert close(got.norm_multimodal, want["norm_multimodal"], rel=True)
            assert close(got.norm_unimodal, want["norm_unimodal"], rel=True)
            assert close(got.magnitude_ratio, want["magnitude_ratio"], rel=True)
            assert close(got.weights[0], want["weights"][0]) and close(got.weights[1], want["weights"][1])
            assert close(got.mmpareto_scale, want["scale"], rel=True)
            assert close(got.mmpareto_tensor_scale[0], want["tensor_scale"][0], rel=True)
            assert close(got.mmpareto_tensor_scale[1], want["tensor_scale"][1], rel=True)
            assert close(got.pcgrad_norm, want["pcgrad_norm"], rel=True)
            assert close(got.pcgrad_cos, want["pcgrad_cos"])
            assert set(got.per_layer) == set(want["per_layer"])
            for layer, c in want["per_layer"].items():
                assert close(got.per_layer[layer], c), (m, layer, got.per_layer[layer], c)
        if ref["head_cos"] is None:
            assert rec.head_cos is None
            assert result.head_shared == 0 and result.head_note == "no shared parameters"
        else:
            assert close(rec.head_cos, ref["head_cos"]), (rec.head_cos, ref["head_cos"])
            assert result.head_shared == ref["head_shared"]
    if name == "mmpareto" and not train_mode:  # the min-norm (conflict) branch is exercised
        assert any(r.modalities[m].conflict for r in result.batches for m in ("audio", "visual"))


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_per_sample_cosines_match_loop(name, method, batches):
    model, layout = build(name, seed=1)
    result = measure_conflict(av_parts(model), batches, "cpu", per_sample=True, method=method,
                              memory_bytes=64 * 1024)  # small chunks: exercises the chunking
    assert result.per_sample_method == method
    ref = [row for batch in batches for row in ref_samples(model, layout, batch)]
    assert [s.index for s in result.samples] == sorted(r["index"] for r in ref)
    by_index = {r["index"]: r for r in ref}
    for s in result.samples:
        r = by_index[s.index]
        assert s.label == r["label"]
        assert close(s.cos_audio, r["cos_audio"]), (s.index, s.cos_audio, r["cos_audio"])
        assert close(s.cos_visual, r["cos_visual"]), (s.index, s.cos_visual, r["cos_visual"])
    frame = result.to_frame()
    assert list(frame.columns) == ["index", "label", "cos_audio", "cos_visual"] and len(frame) == 12
    worst = result.most_conflicting("visual", 3)
    lowest = sorted(r["cos_visual"] for r in ref)[:3]
    assert len(worst) == 3 and all(close(w.cos_visual, c) for w, c in zip(worst, lowest))
    assert all(by_index[w.index]["cos_visual"] == c for w, c in zip(worst, lowest))


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_per_sample_after_train_mode_batches(method, batches):
    """train_mode=True: per-sample cosines still in eval mode with the model's own running statistics
    (a train-mode forward updates them; they must not leak into the per-sample pass)."""
    model, layout = build("concat", seed=5)
    with torch.no_grad():  # non-trivial running statistics, so that a leak would show
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
    result = measure_conflict(av_parts(model), batches + batches, "cpu", per_sample=True, train_mode=True,
                              method=method)
    ref = {r["index"]: r for batch in batches for r in ref_samples(model, layout, batch)}
    assert len(result.samples) == 24
    for s in result.samples:
        assert close(s.cos_audio, ref[s.index]["cos_audio"]) and close(s.cos_visual, ref[s.index]["cos_visual"])


def test_shared_pass_equals_separate_passes(batches):
    """Eval-mode per-batch figures from the shared per-sample pass equal the plain per-batch run."""
    model, _ = build("concat", seed=2)
    parts = av_parts(model)
    a = measure_conflict(parts, batches, "cpu", per_sample=True)
    b = measure_conflict(parts, batches, "cpu", per_sample=False)
    for ra, rb in zip(a.batches, b.batches):
        for m in ("audio", "visual"):
            assert close(ra.modalities[m].cos, rb.modalities[m].cos)
            assert close(ra.modalities[m].mmpareto_scale, rb.modalities[m].mmpareto_scale, rel=True)


def test_one_batch_mean_is_the_batch(batches):
    model, _ = build("mmpareto")
    everything = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    result = measure_conflict(av_parts(model), [everything], "cpu", per_sample=False)
    for m in ("audio", "visual"):
        s = result.summary(m)
        assert s.batches == 1 and s.cos_mean == result.batches[0].modalities[m].cos and s.cos_std == 0.0
        assert s.conflict_rate == float(result.batches[0].modalities[m].conflict)
        assert s.per_layer == result.batches[0].modalities[m].per_layer
        assert s.magnitude_ratio_mean == result.batches[0].modalities[m].magnitude_ratio


def test_summaries_and_combine_are_exact(batches):
    model, _ = build("film", seed=3)
    parts = av_parts(model)
    whole = measure_conflict(parts, batches, "cpu")
    cos = [b.modalities["visual"].cos for b in whole.batches]
    s = whole.summary("visual")
    assert close(s.cos_mean, sum(cos) / len(cos))
    assert close(s.cos_std, math.sqrt(sum((c - s.cos_mean) ** 2 for c in cos) / len(cos)))
    assert s.conflict_rate == sum(c <= 0 for c in cos) / len(cos)
    # two "ranks", shipped as JSON, combined in the wrong order: the same summaries, bit for bit
    ranks = [measure_conflict(parts, batches[i:i + 1], "cpu") for i in range(len(batches))]
    shipped = [GradientConflict.from_dict(json.loads(json.dumps(r.to_dict()))) for r in reversed(ranks)]
    combined = GradientConflict.combine(shipped)
    assert combined.to_dict()["modalities"] == whole.to_dict()["modalities"]
    assert combined.to_dict()["samples"] == whole.to_dict()["samples"]
    assert [b.first_index for b in combined.batches] == [b.first_index for b in whole.batches]
    assert combined.head_cos_mean == whole.head_cos_mean


def test_model_state_is_restored(batches):
    model, _ = build("concat")
    model.train()
    model.visual_net.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_conflict(av_parts(model), batches, "cpu", per_sample=True, train_mode=True)
    assert model.training and model.audio_net.training
    assert not model.visual_net.conv1.weight.requires_grad and model.audio_net.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_to_dict_is_json(batches):
    model, _ = build("mmpareto")
    d = measure_conflict(av_parts(model), batches, "cpu").to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["head"]["cos_mean"] is None
    assert set(d["modalities"]) == {"audio", "visual"}
    assert d["per_sample_mode"] == "eval"
    back = GradientConflict.from_dict(json.loads(text))
    assert back.head_shared == 0 and all(b.head_cos is None for b in back.batches)  # no shared head: None


def test_non_finite_floats_are_null_and_read_back_as_nan(batches):
    """The torchrun gather ships to_dict(): a NaN or an infinity must come back NaN, never as a string."""
    model, _ = build("film", seed=3)  # a shared head: head_cos is a float
    result = measure_conflict(av_parts(model), batches[:1], "cpu")
    result.samples[0].cos_audio = math.nan
    result.batches[0].modalities["visual"].cos = math.inf
    layer = result.layers["visual"][0]
    result.batches[0].modalities["visual"].per_layer[layer] = math.nan
    result.batches[0].head_cos = math.nan
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert '"nan"' not in text.lower() and '"inf"' not in text.lower()
    doc = json.loads(text)
    assert doc["samples"][0]["cos_audio"] is None and doc["batches"][0]["head_cos"] is None
    back = GradientConflict.from_dict(doc)
    assert math.isnan(back.samples[0].cos_audio) and math.isnan(back.batches[0].head_cos)
    assert math.isnan(back.batches[0].modalities["visual"].cos)
    assert math.isnan(back.batches[0].modalities["visual"].per_layer[layer])
    assert json.dumps(back.to_dict(), allow_nan=False) == text
    summary = back.summary("audio")
    again = ModalityConflict.from_dict(json.loads(json.dumps(summary.to_dict(), allow_nan=False)))
    assert again.to_dict() == summary.to_dict() and again.batches == 1 and math.isfinite(again.sample_cos_mean)


def test_audio_dominated_synthetic_report():
    """Briefly train the concat model on audio-dominated data and print the conflict figures."""
    torch.manual_seed(0)
    ds = open_dataset("synthetic:n=48,classes=6,audio=0.9,visual=0.2,seed=0,f=32,t=24,size=16")
    data = list(make_loader(ds, batch_size=16))
    model = OGMGEClassifier(6, "concat", width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(6):
        for b in data:
            opt.zero_grad()
            F.cross_entropy(model(b["audio"], b["visual"])[2], b["label"]).backward()
            opt.step()
    result = measure_conflict(av_parts(model), data, "cpu", train_mode=True)
    print("\naudio-dominated synthetic (audio=0.9, visual=0.2), OGM-GE concat width 8, 6 epochs:")
    for m, s in result.summaries.items():
        print(f"  {m:6s} cos_mean {s.cos_mean:+.3f} std {s.cos_std:.3f} conflict_rate {s.conflict_rate:.2f} "
              f"|g_m|/|g_mm| {s.magnitude_ratio_mean:.3f} a1 {s.weight_multimodal_mean:.3f} "
              f"scale {s.mmpareto_scale_mean:.3f} sample_cos {s.sample_cos_mean:+.3f} "
              f"sample_conflict {s.sample_conflict_rate:.2f} worst {[r['index'] for r in s.most_conflicting[:5]]}")
    print(f"  head cos (shared bias) {result.head_cos_mean:+.3f}")
    for s in result.summaries.values():
        assert -1 <= s.cos_mean <= 1 and 0 <= s.conflict_rate <= 1 and s.magnitude_ratio_mean > 0
    # the trained model fits most samples to a saturated softmax: per-sample gradients are tiny
    # (their squares underflow float32) or exactly zero (cosine NaN, on both sides)
    ref = {r["index"]: r for batch in data for r in ref_samples(model, "slice", batch)}
    for s in result.samples:
        for got, want in ((s.cos_audio, ref[s.index]["cos_audio"]), (s.cos_visual, ref[s.index]["cos_visual"])):
            assert (math.isnan(got) and math.isnan(want)) or close(got, want), (s.index, got, want)


def test_a_batch_without_a_modality_is_a_data_error(batches):
    model, _ = build("concat")
    audio_only = {k: v for k, v in batches[0].items() if k != "visual"}
    with pytest.raises(DataError, match="no visual"):
        measure_conflict(av_parts(model), [audio_only], "cpu")
    with pytest.raises(ValueError, match="method"):
        measure_conflict(av_parts(model), batches, "cpu", method="magic")


def test_mmpareto_weights_formula():
    assert mmpareto_weights(1.0, 0.5, 1.0) == (0.5, 0.5)  # no conflict
    n1, d, n2 = 4.0, -1.0, 1.0
    a1, a2 = mmpareto_weights(n1, d, n2)
    assert math.isclose(a1, (n2 - d) / (n1 + n2 - 2 * d)) and math.isclose(a1 + a2, 1.0)
    assert mmpareto_weights(1e8, -1e-3, 1.0)[0] == 0.001  # clipped
    assert mmpareto_weights(1.0, -1e-3, 1e8)[0] == 0.999


# ---- a custom encoder: conv bias, dilation, stride, valid padding, Linear, a module run twice ----


class TinyEncoder(torch.nn.Module):
    def __init__(self, cin: int, twice: bool):
        super().__init__()
        self.twice = twice
        self.conv1 = torch.nn.Conv2d(cin, 4, 3, stride=2, padding=1, bias=True)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, dilation=2, padding="valid", bias=True)
        self.mix = torch.nn.Conv2d(6, 6, 1, bias=False)
        self.fc = torch.nn.Linear(6, 5)
        self.out_dim = 5
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)), inplace=True)
        x = self.mix(self.conv2(x))
        return self.mix(x) if self.twice else x

    def pool(self, fmap, frames=None):
        if frames:
            fmap = fmap.reshape(-1, frames, *fmap.shape[1:]).mean(1)
        return self.fc(fmap.mean((2, 3)))


class TinyAV(torch.nn.Module):
    def __init__(self, twice: bool):
        super().__init__()
        self.audio_net, self.visual_net = TinyEncoder(1, twice), TinyEncoder(3, twice)
        self.fusion_module = ConcatFusion(5, 6)

    def forward(self, audio, visual):
        a = self.audio_net.pool(self.audio_net(audio.unsqueeze(1)))
        b, c, t, h, w = visual.shape
        v = self.visual_net.pool(self.visual_net(visual.transpose(1, 2).reshape(b * t, c, h, w)), frames=t)
        return a, v, self.fusion_module(a, v)


def tiny_parts(model):
    fc = model.fusion_module.fc_out

    def unimodal(a, v):
        return {"audio": a @ fc.weight[:, :5].t() + fc.bias / 2, "visual": v @ fc.weight[:, 5:].t() + fc.bias / 2}

    return AVParts(model, {"audio": model.audio_net, "visual": model.visual_net}, model.fusion_module,
                   model.fusion_module.forward, unimodal, "slice", ("audio", "visual"))


@pytest.mark.parametrize("twice", [False, True])
def test_custom_encoder(twice, batches):
    torch.manual_seed(4)
    model = TinyAV(twice)
    result = measure_conflict(tiny_parts(model), batches, "cpu", per_sample=True, memory_bytes=4096)
    assert result.per_sample_method == ("vmap" if twice else "hooks")  # a module run twice: vmap
    ref_rows = {r["index"]: r for batch in batches for r in ref_samples(model, "slice", batch)}
    for s in result.samples:
        assert close(s.cos_audio, ref_rows[s.index]["cos_audio"])
        assert close(s.cos_visual, ref_rows[s.index]["cos_visual"])
    for train_mode, res in ((False, result), (True, measure_conflict(tiny_parts(model), batches, "cpu",
                                                                      per_sample=False, train_mode=True))):
        for rec, batch in zip(res.batches, batches):
            ref = ref_batch(model, "slice", batch, train_mode)
            for m in ("audio", "visual"):
                assert close(rec.modalities[m].cos, ref[m]["cos"])
                assert close(rec.modalities[m].norm_multimodal, ref[m]["norm_multimodal"], rel=True)
                for layer, c in ref[m]["per_layer"].items():
                    assert close(rec.modalities[m].per_layer[layer], c), (layer, rec.modalities[m].per_layer[layer], c)
            assert close(rec.head_cos, ref["head_cos"])
