"""avdiag.measure.contribution against an independent computation written out here.

The reference below runs the encoders itself, pools by hand, applies each layout's fused head with
its own matrix products in float64, its own softmax, and its own Shapley / OGM-GE / OPM formulas;
it shares no code with the implementation (only the models and, for the learning state, the
k-means purity that the implementation is required to reuse).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from avdiag.data import make_loader, open_dataset
from avdiag.errors import DataError
from avdiag.measure.contribution import (
    Contribution, ContributionPartial, ModalityGap, contribution_partial, learning_state, measure_contribution,
    modality_gap, ogm, opm, shapley, shapley_batch, shapley_input_ablation, unimodal,
)
from avdiag.models import MMParetoClassifier, OGMGEClassifier, resnet18
from avdiag.models.parts import AVParts, av_parts
from avdiag.measure.contribution.learning_state import cluster_purity

TOL = 1e-5
SPEC = "synthetic:n=40,classes=4,seed=0"


# --- the independent reference -------------------------------------------------------------------


def ref_features(model: nn.Module, batch: dict, zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    audio, visual = batch["audio"], batch["visual"]
    if zero:
        audio, visual = torch.zeros_like(audio), torch.zeros_like(visual)
    with torch.no_grad():
        fa = model.audio_net(audio[:, None]).mean(dim=(2, 3))
        b, c, t, h, w = visual.shape
        fmap = model.visual_net(visual.transpose(1, 2).reshape(b * t, c, h, w))
        fv = fmap.mean(dim=(2, 3)).reshape(b, t, -1).mean(dim=1)
    return fa.double(), fv.double()


def _w(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight.detach().double(), linear.bias.detach().double()


def ref_head(layout: str, model: nn.Module, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = a.shape[1]
    if layout in ("concat", "heads"):
        w, b = _w(model.fusion_module.fc_out if layout == "concat" else model.head)
        return a @ w[:, :d].T + v @ w[:, d:].T + b
    wx, bx = _w(model.fusion_module.fc_x)
    wy, by = _w(model.fusion_module.fc_y)
    wo, bo = _w(model.fusion_module.fc_out)
    return (1.0 / (1.0 + torch.exp(-(a @ wx.T + bx))) * (v @ wy.T + by)) @ wo.T + bo


def ref_unimodal(layout: str, model: nn.Module, a: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    d = a.shape[1]
    if layout == "concat":
        w, b = _w(model.fusion_module.fc_out)
        return {"audio": a @ w[:, :d].T + b / 2, "visual": v @ w[:, d:].T + b / 2}
    if layout == "heads":
        (wa, ba), (wv, bv) = _w(model.head_audio), _w(model.head_video)
        return {"audio": a @ wa.T + ba, "visual": v @ wv.T + bv}
    return {"audio": ref_head(layout, model, a, torch.zeros_like(v)),
            "visual": ref_head(layout, model, torch.zeros_like(a), v)}


def ref_softmax_at(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    x = logits.numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[np.arange(len(x)), y.numpy()]


def ref_game(layout: str, model: nn.Module, batch: dict, input_zero: bool = False) -> dict:
    a, v = ref_features(model, batch)
    if input_zero:
        za, zv = ref_features(model, batch, zero=True)
    else:
        za, zv = torch.zeros_like(a), torch.zeros_like(v)
    y = batch["label"]
    logits = {"audio+visual": ref_head(layout, model, a, v), "audio": ref_head(layout, model, a, zv),
              "visual": ref_head(layout, model, za, v), "empty": ref_head(layout, model, za, zv)}
    correct = {c: (lg.argmax(dim=1) == y).numpy() for c, lg in logits.items()}
    prob = {c: ref_softmax_at(lg, y) for c, lg in logits.items()}
    out = {"correct": correct, "probability": prob}
    for kind, q in (("accuracy", {c: x.astype(float) for c, x in correct.items()}), ("probability", prob)):
        v_av, v_a, v_v, v_0 = 2 * q["audio+visual"], q["audio"], q["visual"], 0.0
        out[f"phi_{kind}"] = {"audio": 0.5 * (v_a - v_0) + 0.5 * (v_av - v_v),
                              "visual": 0.5 * (v_v - v_0) + 0.5 * (v_av - v_a)}
        out[f"v_{kind}"] = {"av": v_av, "empty": v_0}
    uni = ref_unimodal(layout, model, a, v)
    out["uni_prob"] = {m: ref_softmax_at(lg, y) for m, lg in uni.items()}
    out["uni_correct"] = {m: (lg.argmax(dim=1) == y).numpy() for m, lg in uni.items()}
    out["features"] = {"audio": a.numpy(), "visual": v.numpy()}
    return out


def ref_ogm(s_a: float, s_v: float, alpha: float) -> tuple[float, float, float, float]:
    rho_v = s_v / s_a
    rho_a = 1 / rho_v
    if rho_v > 1:
        return rho_a, rho_v, 1.0, 1 - math.tanh(alpha * rho_v)
    return rho_a, rho_v, 1 - math.tanh(alpha * rho_a), 1.0


def ref_opm(s_a: float, s_v: float, q_base: float = 0.5, lam: float = 0.5) -> tuple[float, float]:
    def q(s_m, s_o):
        r = math.tanh(max(s_m / s_o - 1, 0.0))
        return min(1.0, max(0.0, q_base * (1 + lam * r))) if r > 0 else 0.0
    return q(s_a, s_v), q(s_v, s_a)


# --- fixtures ------------------------------------------------------------------------------------


def _build(layout: str) -> nn.Module:
    torch.manual_seed({"concat": 1, "heads": 2, "gated": 3}[layout])
    if layout == "heads":
        model = MMParetoClassifier(4, width=8)
    else:
        model = OGMGEClassifier(4, "concat" if layout == "concat" else "gated", width=8)
    with torch.no_grad():
        # Non-trivial BN statistics (a zero input then gives a non-zero feature) and heads whose
        # logits spread enough for predictions to vary between samples and coalitions.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.2, 0.3)
            elif isinstance(m, nn.Linear):
                m.weight.mul_(1.0)
                m.bias.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    return list(make_loader(open_dataset(SPEC), batch_size=16))  # batches of 16, 16, 8


LAYOUTS = ["concat", "heads", "gated"]
SOURCES = {"concat": "slice", "heads": "heads", "gated": "ablation"}


@pytest.fixture(scope="module", params=LAYOUTS)
def case(request, batches):
    layout = request.param
    model = _build(layout)
    refs = [ref_game(layout, model, b) for b in batches]
    refs_input = [ref_game(layout, model, b, input_zero=True) for b in batches]
    result = measure_contribution(av_parts(model), batches, "cpu", heldout_batches=batches[:2])
    return layout, model, refs, refs_input, result


def _cat(refs: list[dict], *keys: str) -> np.ndarray:
    out = []
    for r in refs:
        x = r
        for k in keys:
            x = x[k]
        out.append(x)
    return np.concatenate(out)


# --- per-sample Shapley values -------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ablation", ["feature", "input"])
def test_shapley_batch_matches_reference(layout, ablation, batches):
    model = _build(layout)
    fn = shapley_batch if ablation == "feature" else shapley_input_ablation
    for batch in batches:
        got = fn(av_parts(model), batch)
        ref = ref_game(layout, model, batch, input_zero=ablation == "input")
        assert got.ablation == ablation
        np.testing.assert_array_equal(got.index, batch["index"].numpy())
        np.testing.assert_array_equal(got.label, batch["label"].numpy())
        for c in ("audio+visual", "audio", "visual", "empty"):
            np.testing.assert_array_equal(got.correct[c], ref["correct"][c])
            np.testing.assert_allclose(got.probability[c], ref["probability"][c], rtol=0, atol=TOL)
        for kind in ("accuracy", "probability"):
            phi = getattr(got, f"phi_{kind}")
            for m in ("audio", "visual"):
                np.testing.assert_allclose(phi[m], ref[f"phi_{kind}"][m], rtol=0, atol=TOL)
            # efficiency: phi_a + phi_v = v(av) - v(empty)
            values = got.values(kind)
            np.testing.assert_allclose(phi["audio"] + phi["visual"], values["audio+visual"] - values["empty"],
                                       rtol=0, atol=1e-12)
            np.testing.assert_allclose(phi["audio"] + phi["visual"],
                                       ref[f"v_{kind}"]["av"] - ref[f"v_{kind}"]["empty"], rtol=0, atol=TOL)
        json.dumps(got.to_dict(), allow_nan=False)


def test_the_two_ablations_differ(batches):
    """Zeroing the raw input is not zeroing the feature once BN has statistics."""
    model = _build("concat")
    feat = shapley_batch(av_parts(model), batches[0])
    inp = shapley_input_ablation(av_parts(model), batches[0])
    assert not np.allclose(feat.probability["audio"], inp.probability["audio"])


def test_the_samples_are_varied(case):
    """Guard for the reference: the fixtures must exercise both right and wrong predictions."""
    _, _, refs, _, _ = case
    phi = _cat(refs, "phi_accuracy", "audio")
    assert len(np.unique(phi)) >= 2


# --- the dataset-level measurement ----------------------------------------------------------------


def test_measure_matches_reference(case, batches):
    layout, model, refs, refs_input, result = case
    rows = result.samples
    assert result.unimodal_source == SOURCES[layout]
    assert result.n_samples == 40 and result.n_batches == 3 and result.n_classes == 4
    np.testing.assert_array_equal(rows["index"], np.arange(40))
    np.testing.assert_array_equal(rows["label"], _cat([{"y": b["label"].numpy()} for b in batches], "y"))
    for kind in ("accuracy", "probability"):
        for m in ("audio", "visual"):
            for suffix, refset in (("", refs), ("_input", refs_input)):
                ref = _cat(refset, f"phi_{kind}", m)
                np.testing.assert_allclose(rows[f"phi_{m}_{kind}{suffix}"], ref, rtol=0, atol=TOL)
            mc = result.modalities[m]
            assert abs(getattr(mc, f"shapley_mean_{kind}") - _cat(refs, f"phi_{kind}", m).mean()) < TOL
            assert abs(getattr(mc, f"shapley_input_mean_{kind}") - _cat(refs_input, f"phi_{kind}", m).mean()) < TOL
    assert abs(result.fused_accuracy - _cat(refs, "correct", "audio+visual").mean()) < TOL
    assert abs(result.empty_accuracy - _cat(refs, "correct", "empty").mean()) < TOL
    assert abs(result.empty_probability - _cat(refs, "probability", "empty").mean()) < TOL
    np.testing.assert_allclose(rows["fused_probability"], _cat(refs, "probability", "audio+visual"), atol=TOL)

    scores = {}
    for m in ("audio", "visual"):
        np.testing.assert_array_equal(rows[f"uni_{m}_correct"], _cat(refs, "uni_correct", m))
        np.testing.assert_allclose(rows[f"uni_{m}_probability"], _cat(refs, "uni_prob", m), rtol=0, atol=TOL)
        assert abs(result.modalities[m].unimodal_accuracy - _cat(refs, "uni_correct", m).mean()) < TOL
        scores[m] = float(_cat(refs, "uni_prob", m).sum())
        assert abs(result.modalities[m].ogm_score - scores[m]) < TOL
        assert abs(result.ogm.scores[m] - scores[m]) < TOL

    rho_a, rho_v, k_a, k_v = ref_ogm(scores["audio"], scores["visual"], 0.8)
    assert abs(result.ogm.rho["audio"] - rho_a) < TOL and abs(result.ogm.rho["visual"] - rho_v) < TOL
    assert abs(result.ogm.coefficients["audio"] - k_a) < TOL
    assert abs(result.ogm.coefficients["visual"] - k_v) < TOL
    per_batch = [ref_ogm(float(r["uni_prob"]["audio"].sum()), float(r["uni_prob"]["visual"].sum()), 0.8)
                 for r in refs]
    assert abs(result.ogm.batch_mean_coefficients["audio"] - np.mean([p[2] for p in per_batch])) < TOL
    assert abs(result.ogm.batch_mean_coefficients["visual"] - np.mean([p[3] for p in per_batch])) < TOL

    q_a, q_v = ref_opm(scores["audio"], scores["visual"])
    assert abs(result.opm.drop_probability["audio"] - q_a) < TOL
    assert abs(result.opm.drop_probability["visual"] - q_v) < TOL
    per_batch_q = [ref_opm(float(r["uni_prob"]["audio"].sum()), float(r["uni_prob"]["visual"].sum())) for r in refs]
    assert abs(result.opm.batch_mean_drop_probability["audio"] - np.mean([q[0] for q in per_batch_q])) < TOL
    assert abs(result.opm.batch_mean_drop_probability["visual"] - np.mean([q[1] for q in per_batch_q])) < TOL
    assert result.opm.execute_probability == 0.7

    d = result.to_dict(samples=True)
    json.dumps(d, allow_nan=False)
    assert d["modalities"]["audio"]["ogm"]["score"] == pytest.approx(scores["audio"], abs=TOL)
    assert set(d["modalities"]["visual"]["shapley_mean"]) == {"accuracy", "probability"}
    frame = result.to_frame()
    assert len(frame) == 40
    assert {"index", "label", "phi_audio_accuracy", "phi_visual_accuracy", "phi_audio_probability",
            "phi_visual_probability"} <= set(frame.columns)


def test_learning_state_and_modality_gap(case, batches):
    _, model, refs, _, result = case
    feats = {m: _cat(refs, "features", m) for m in ("audio", "visual")}
    labels = np.concatenate([b["label"].numpy() for b in batches])
    held = [ref_features(model, b) for b in batches[:2]]
    held_feats = {"audio": np.concatenate([h[0].numpy() for h in held]),
                  "visual": np.concatenate([h[1].numpy() for h in held])}
    held_labels = labels[:32]
    state = result.learning_state
    assert state.k == 4 and state.lam == 3.0
    for m in ("audio", "visual"):
        s = state.modalities[m]
        p_train = cluster_purity(feats[m], labels, 4, seed=0)
        p_held = cluster_purity(held_feats[m], held_labels, 4, seed=0)
        assert s.purity_train == pytest.approx(p_train, abs=1e-12)
        assert s.purity_heldout == pytest.approx(p_held, abs=1e-12)
        assert s.gap == pytest.approx(abs(p_train - p_held), abs=1e-12)
        assert s.alpha == pytest.approx(math.tanh(3.0 * abs(p_train - p_held)), abs=1e-12)
        assert (s.n_train, s.n_heldout) == (40, 32)
    unit = {m: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) for m, f in feats.items()}
    gap = float(np.sqrt(((unit["audio"].mean(axis=0) - unit["visual"].mean(axis=0)) ** 2).sum()))
    assert result.modality_gap.distance == pytest.approx(gap, abs=TOL)


def test_no_heldout_and_unequal_dims(batches):
    torch.manual_seed(0)
    audio, visual = resnet18(in_channels=1, width=8), resnet18(in_channels=3, width=4)
    head = nn.Linear(audio.out_dim + visual.out_dim, 4)
    fuse = lambda a, v: head(torch.cat((a, v), dim=1))  # noqa: E731
    parts = AVParts(nn.ModuleDict({"a": audio, "v": visual, "h": head}), {"audio": audio, "visual": visual},
                    head, fuse, lambda a, v: {"audio": fuse(a, 0 * v), "visual": fuse(0 * a, v)}, "ablation",
                    ("audio", "visual"))
    result = measure_contribution(parts, batches, "cpu")
    assert result.modality_gap.distance is None and "differ" in result.modality_gap.reason
    assert ModalityGap.from_dict(result.modality_gap.to_dict(records=False)).distance is None
    s = result.learning_state.modalities["audio"]
    assert s.purity_train is not None and s.purity_heldout is None and s.gap is None and s.alpha is None
    json.dumps(result.to_dict(), allow_nan=False)


def test_modes_and_weights_are_left_alone(batches):
    model = _build("concat").train()
    model.visual_net.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_contribution(av_parts(model), batches[:1], "cpu")
    shapley_batch(av_parts(model), batches[0])
    assert model.training and model.audio_net.training and not model.visual_net.bn1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- shards ---------------------------------------------------------------------------------------


def _close(x, y, path=""):
    if isinstance(x, dict):
        assert set(x) == set(y), path
        for k in x:
            _close(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y)):
            _close(a, b, f"{path}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, abs=1e-12), path
    else:
        assert x == y, path


def test_shards_combine_to_the_single_run(batches):
    parts = av_parts(_build("heads"))
    single = measure_contribution(parts, batches, "cpu", heldout_batches=batches[2:])
    with pytest.raises(ValueError, match="no batches"):
        contribution_partial(parts, [], "cpu")
    shard_a = contribution_partial(parts, batches[:1], "cpu",
                                   heldout_batches=[{k: v[:4] for k, v in batches[2].items()}])
    shard_b = contribution_partial(parts, batches[1:], "cpu",
                                   heldout_batches=[{k: v[4:] for k, v in batches[2].items()}])
    combined = ContributionPartial.combine([shard_b, shard_a]).result()
    _close(combined.to_dict(samples=True), single.to_dict(samples=True))
    restored = ContributionPartial.from_dict(json.loads(json.dumps(shard_a.to_dict(), allow_nan=False)))
    again = ContributionPartial.combine([restored, shard_b]).result()
    _close(again.to_dict(samples=True), single.to_dict(samples=True))
    with pytest.raises(ValueError, match="disjoint"):
        ContributionPartial.combine([shard_a, shard_a])
    # the results combine too, and round-trip through their records
    results = [Contribution.from_dict(json.loads(json.dumps(p.result().to_dict(records=True), allow_nan=False)))
               for p in (shard_b, shard_a)]
    _close(Contribution.combine(results).to_dict(samples=True), single.to_dict(samples=True))
    with pytest.raises(ValueError, match="records"):
        Contribution.from_dict(single.to_dict())


MEASURES = {"shapley": shapley.measure, "unimodal": unimodal.measure, "ogm": ogm.measure, "opm": opm.measure,
            "learning_state": learning_state.measure, "modality_gap": modality_gap.measure}


@pytest.mark.parametrize("name", list(MEASURES))
def test_each_measure_round_trips_and_combines(name, batches):
    """measure(parts, batches, device) -> result; shards shipped as JSON and combined in the wrong
    order give the figures of one run over all the batches."""
    parts = av_parts(_build("heads"))
    whole = MEASURES[name](parts, batches, "cpu")
    shards = [MEASURES[name](parts, batches[i:i + 1], "cpu") for i in range(len(batches))]
    kind = type(whole)
    shipped = [kind.from_dict(json.loads(json.dumps(r.to_dict(), allow_nan=False))) for r in reversed(shards)]
    _close(kind.combine(shipped).to_dict(), whole.to_dict())
    _close(kind.from_dict(whole.to_dict()).to_dict(), whole.to_dict())


def test_each_measure_alone_equals_the_one_pass(batches):
    parts = av_parts(_build("gated"))
    together = measure_contribution(parts, batches, "cpu", heldout_batches=batches[:2])
    feature = shapley.measure(parts, batches, "cpu")
    inputs = shapley.measure(parts, batches, "cpu", ablation="input")
    for m in ("audio", "visual"):
        c = together.modalities[m]
        assert (feature.mean(m, "accuracy"), feature.mean(m, "probability")) == \
            (c.shapley_mean_accuracy, c.shapley_mean_probability)
        assert inputs.mean(m, "probability") == c.shapley_input_mean_probability
        assert unimodal.measure(parts, batches, "cpu").accuracy(m) == c.unimodal_accuracy
    assert ogm.measure(parts, batches, "cpu").to_dict() == together.ogm.to_dict()
    assert opm.measure(parts, batches, "cpu").to_dict() == together.opm.to_dict()
    state = learning_state.measure(parts, batches, "cpu", heldout_batches=batches[:2])
    assert state.to_dict(records=False) == together.learning_state.to_dict(records=False)
    assert modality_gap.measure(parts, batches, "cpu").distance == together.modality_gap.distance
    with pytest.raises(ValueError, match="ablation"):
        shapley.measure(parts, batches, "cpu", ablation="noise")
    with pytest.raises(DataError, match="visual"):
        ogm.measure(parts, [{k: v for k, v in batches[0].items() if k != "visual"}], "cpu")


def test_non_finite_values_travel_as_null(batches):
    """A shard's records go through JSON for the torchrun gather: NaN and infinities come back NaN."""
    partial = contribution_partial(av_parts(_build("concat")), batches[:1], "cpu")
    partial.shapley.probability["audio"][0] = np.nan
    partial.unimodal.probability["visual"][2] = np.inf
    partial.features.features["visual"][1, 0] = np.nan
    partial.modality_gap.feature_sums["audio"][3] = np.nan
    text = json.dumps(partial.to_dict(), allow_nan=False)
    assert '"nan"' not in text.lower() and '"inf"' not in text.lower()
    back = ContributionPartial.from_dict(json.loads(text))
    assert np.isnan(back.shapley.probability["audio"][0]) and np.isnan(back.shapley.phi_probability["audio"][0])
    assert np.isnan(back.unimodal.probability["visual"][2])
    assert np.isnan(back.features.features["visual"][1, 0])
    assert np.isnan(back.modality_gap.feature_sums["audio"][3]) and np.isnan(back.modality_gap.distance)
    assert back.unimodal.batch_scores.shape == (1, 4)


# --- an audio-dominated task -----------------------------------------------------------------------


def test_audio_dominates_when_audio_is_informative():
    """A width-8 OGM-GE concat model trained a few quick epochs (~2 s) on data where audio shows
    the class 95 % of the time and visual 10 %: audio must carry the contribution."""
    spec = "synthetic:n=96,classes=4,audio=0.95,visual=0.1,seed=0"
    train = list(make_loader(open_dataset(spec), batch_size=32))
    test = list(make_loader(open_dataset(spec, split="test"), batch_size=32))
    torch.manual_seed(0)
    model = OGMGEClassifier(4, "concat", width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for b in train:
            loss = nn.functional.cross_entropy(model(b["audio"], b["visual"])[2], b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    result = measure_contribution(av_parts(model), test, "cpu", heldout_batches=train)
    a, v = result.modalities["audio"], result.modalities["visual"]
    assert result.fused_accuracy > 0.5
    assert a.shapley_mean_accuracy > v.shapley_mean_accuracy
    assert a.shapley_mean_probability > v.shapley_mean_probability
    assert a.ogm_score > v.ogm_score
    assert a.unimodal_accuracy > v.unimodal_accuracy
    assert result.ogm.rho["visual"] < 1 < result.ogm.rho["audio"]
    assert result.ogm.coefficients["visual"] == 1.0 and result.ogm.coefficients["audio"] < 1.0
    assert result.ogm.dominant == "audio"
    assert result.opm.drop_probability["audio"] > 0.5 and result.opm.drop_probability["visual"] == 0.0
