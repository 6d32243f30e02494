"""Models avdiag does not know take part in `conflict` through the adapter protocol of
:mod:`avdiag.models.parts`: ``audio_encoder`` / ``visual_encoder`` modules giving pooled features,
``fuse(a, v)`` and optionally ``unimodal(a, v)``. Checked here on a small audio-visual transformer whose
visual encoder folds frames time-major (the row order the module-products engine cannot see): the
per-sample cosines and the Shapley values equal an independent loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avdiag.data import make_loader, open_dataset
from avdiag.measure.conflict import measure_conflict
from avdiag.measure.contribution.shapley import shapley_batch
from avdiag.models.parts import av_parts
from helpers.tiny_transformer import TinyAVTransformer

TOL = 1e-6


@pytest.fixture(scope="module")
def batches():
    return list(make_loader(open_dataset("synthetic:n=10,classes=4,f=16,t=16,size=16,frames=2"), batch_size=5))


def _cos(g1, g2):
    a, b = torch.cat([g.flatten() for g in g1]).double(), torch.cat([g.flatten() for g in g2]).double()
    return float(a @ b / (a.norm() * b.norm()))


def _loop_cosines(model, batch):
    """Per sample: the fused loss's and the uni-modal loss's gradients on each encoder, batch size 1."""
    rows = {}
    for i in range(len(batch["label"])):
        y = batch["label"][i:i + 1]
        a, v = model.audio_encoder(batch["audio"][i:i + 1]), model.visual_encoder(batch["visual"][i:i + 1])
        fused = model.fuse(a, v)
        uni = (model.unimodal(a, v) if hasattr(model, "head_a")
               else {"audio": model.fuse(a, torch.zeros_like(v)), "visual": model.fuse(torch.zeros_like(a), v)})
        for m in ("audio", "visual"):
            ps = list(getattr(model, f"{m}_encoder").parameters())
            g1 = torch.autograd.grad(F.cross_entropy(fused, y), ps, retain_graph=True)
            g2 = torch.autograd.grad(F.cross_entropy(uni[m], y), ps, retain_graph=True)
            rows[(int(batch["index"][i]), m)] = _cos(g1, g2)
    return rows


@pytest.mark.parametrize("unimodal_heads", [False, True])
def test_adapter_cosines_equal_a_loop(batches, unimodal_heads):
    torch.manual_seed(0)
    model = TinyAVTransformer(4, unimodal_heads=unimodal_heads).eval()
    parts = av_parts(model)
    assert parts.unimodal_source == ("heads" if unimodal_heads else "ablation")
    result = measure_conflict(parts, batches, "cpu", per_sample=True)
    assert set(result.engine.per_sample.values()) <= {"vmap", "loop"}
    expected = {k: v for batch in batches for k, v in _loop_cosines(model, batch).items()}
    assert len(result.samples) == 10
    for s in result.samples:
        for m in ("audio", "visual"):
            assert abs(s.cos(m) - expected[(s.index, m)]) <= TOL, (s.index, m)


def test_adapter_shapley_equals_the_four_coalitions(batches):
    """Feature ablation: a modality's pooled feature zeroed before fuse(a, v); the paper's game
    v(S) = |S| * p_S(label), v(empty) = 0."""
    torch.manual_seed(1)
    model = TinyAVTransformer(4).eval()
    batch = batches[0]
    got = shapley_batch(av_parts(model), batch)
    with torch.no_grad():
        a, v = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
        y = batch["label"]

        def prob(x, z):
            return model.fuse(x, z).softmax(-1).gather(1, y[:, None])[:, 0].double()

        both, only_a, only_v = 2 * prob(a, v), prob(a, torch.zeros_like(v)), prob(torch.zeros_like(a), v)
    expected = {"audio": 0.5 * (only_a + (both - only_v)), "visual": 0.5 * (only_v + (both - only_a))}
    for m in ("audio", "visual"):
        assert torch.allclose(torch.as_tensor(got.phi_probability[m], dtype=torch.float64), expected[m], atol=TOL)


def test_a_model_outside_the_protocol_is_told_what_it_needs():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_encoder = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"missing: visual_encoder, fuse; a model needs audio_encoder"):
        av_parts(Plain())


def test_conflict_command_takes_an_adapter_model_through_model(tmp_path, cli):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(TinyAVTransformer(4).state_dict(), path)
    d = cli("conflict", path, "--model", "helpers.tiny_transformer:make", "--data",
            "synthetic:n=6,classes=4,f=16,t=16,size=16,frames=2", "--batch-size", "3", "--heldout-split", "none",
            "--json", "-").json()
    assert d["model"] == "factory:helpers.tiny_transformer:make"
    assert d["contribution"]["unimodal_source"] == "ablation"
    for m in ("audio", "visual"):
        assert d["modalities"][m]["conflict"]["samples"] == 6
        layers = d["modalities"][m]["conflict"]["per_layer"]
        assert f"{m}_encoder.patch" in layers and all(k.split(".")[0] == f"{m}_encoder" for k in layers)
    assert set(d["conflict"]["engine"]["per_sample"].values()) <= {"vmap", "loop"}
