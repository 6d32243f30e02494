"""Rewrites that finish the job (issue 11): ABRi's default fold leaves no channel in scope dead, the paper's
exact blend stays available and says what it leaves dead, re-learning lists only what it changed."""

from __future__ import annotations

import torch
from torch import nn

from avdiag.rewrite.abri import fold_init, reviving_alpha
from avdiag.workflows.inspect import inspect
from avdiag.workflows.reinit import AbriOptions, RelearnOptions, ReinitOptions, ReinitResult, reinit
from helpers.checkpoints import av_model, save_av

# Strongly negative bias: the paper's blend halves beta (-12 -> -6) and the channel stays dead.
NEGATIVE = {"visual_net.layer1.0.bn1": [2, 5], "audio_net.layer2.1.bn1": [0, 7, 11]}
NEGATIVE_GAMMA, NEGATIVE_BETA = 1.0, -12.0


def _checkpoint(tmp_path, name: str = "best_model.pth"):
    """An OGM-GE checkpoint with the planted dead and abnormal channels of layout_fixtures, plus
    strongly-negative-bias dead channels the blend alone cannot revive."""
    model, planted = av_model("ogm-ge", planted=True)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, channels in NEGATIVE.items():
            modules[layer].weight[channels] = NEGATIVE_GAMMA
            modules[layer].bias[channels] = NEGATIVE_BETA
    return save_av(model, tmp_path / name), planted


def _z(gamma: torch.Tensor, beta: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return beta.double() / (gamma.double().abs() * torch.sqrt(var.double() / (var.double() + eps)))


def test_reviving_alpha_keeps_the_blend_where_it_is_enough_and_revives_the_rest():
    gamma = torch.tensor([1.0, 0.05, 3e-13, 1.0, 2.0])
    beta = torch.tensor([-12.0, -0.5, -2e-13, 0.3, -40.0])
    var = torch.tensor([1.0, 1.2, 0.8, 1.0, 1.0])
    alpha = reviving_alpha(gamma, beta, var, 1e-5, 0.5, "blend")
    assert alpha[1:4].tolist() == [0.5, 0.5, 0.5]  # the blend already revives these (or they were alive)
    assert 0 < alpha[0] < 0.5 and 0 < alpha[4] < 0.5
    g, b = fold_init(gamma, beta, alpha)
    z = _z(g, b, alpha.float() * var + (1 - alpha.float()))
    assert bool((z[[0, 4]] >= -1.0 - 1e-6).all()), z
    # the least change: one grid step more of the pretrained branch would fall short of z >= -1
    step = 0.5 / 400
    g2, b2 = fold_init(gamma, beta, alpha + step)
    assert bool((_z(g2, b2, (alpha + step).float() * var + 1 - (alpha + step).float())[[0, 4]] < -1.0).all())


def test_reviving_alpha_only_touches_the_given_channels_and_finite_ones():
    gamma = torch.tensor([1.0, 1.0, float("nan")])
    beta = torch.tensor([-12.0, -12.0, -12.0])
    alpha = reviving_alpha(gamma, beta, torch.ones(3), 1e-5, 0.5, "reset", channels=[1, 2])
    assert alpha[0] == 0.5 and alpha[1] < 0.5 and alpha[2] == 0.5


def test_default_abri_leaves_no_dead_channel_and_lists_the_revived_ones(tmp_path):
    src, planted = _checkpoint(tmp_path)
    out = tmp_path / "fixed.pth"
    result = reinit(src, out)
    assert result.still_dead == {}
    revived = {name: r["channels"] for name, r in result.revived_beyond_blend.items()}
    assert revived == NEGATIVE
    for r in result.revived_beyond_blend.values():
        assert all(0 < a < 0.5 for a in r["alpha"])
    after = inspect(out)
    assert after.n_dead == 0 and sum(result.dead_after.values()) == 0
    flagged_before = {**planted.dead, **NEGATIVE}
    for v in after.layers:
        assert not v.abnormal, v.layer.name  # the abnormal pairs were blended too
        assert not v.dead, (v.layer.name, v.dead, flagged_before.get(v.layer.name))
    assert f"{result.n_revived} revived beyond the paper's blend" in result.summary_line()
    assert result.n_revived == sum(len(c) for c in NEGATIVE.values())


def test_exact_blend_reproduces_the_paper_and_says_what_it_leaves_dead(tmp_path):
    src, _ = _checkpoint(tmp_path)
    out = tmp_path / "exact.pth"
    result = reinit(src, out, ReinitOptions("abri", AbriOptions(exact_blend=True)))
    assert result.revived_beyond_blend == {}
    assert result.still_dead == NEGATIVE
    assert result.summary_line().startswith("5 channel(s) in scope still dead after the rewrite")
    doc = result.to_dict()
    assert doc["still_dead"] == NEGATIVE and doc["summary"]["n_still_dead"] == 5
    assert ReinitResult.from_dict(doc).still_dead == NEGATIVE
    written = torch.load(out, weights_only=True)["model"]
    original = torch.load(src, weights_only=True)["model"]
    layer, channels = "visual_net.layer1.0.bn1", NEGATIVE["visual_net.layer1.0.bn1"]
    gamma, beta = fold_init(original[f"module.{layer}.weight"], original[f"module.{layer}.bias"], 0.5, channels)
    assert torch.equal(written[f"module.{layer}.weight"], gamma)
    assert torch.equal(written[f"module.{layer}.bias"], beta)


def test_cli_reinit_then_inspect_finds_nothing_dead(tmp_path, cli):
    src, _ = _checkpoint(tmp_path)
    out = tmp_path / "fixed.pth"
    doc = cli("reinit", src, "--out", out, "--json", "-").json()
    assert doc["still_dead"] == {}
    assert {k: v["channels"] for k, v in doc["revived_beyond_blend"].items()} == NEGATIVE
    assert cli("inspect", out, "--json", "-").json()["summary"]["n_dead"] == 0
    text = cli("reinit", src, "--out", tmp_path / "exact.pth", "--exact-blend").out
    assert "5 channel(s) in scope still dead" in text
    assert "still dead after the rewrite with these options" in text


def test_a_revive_margin_of_zero_lands_just_above_the_dead_threshold(tmp_path):
    src, _ = _checkpoint(tmp_path)
    result = reinit(src, tmp_path / "fixed.pth", ReinitOptions("abri", AbriOptions(revive_margin=0.0)))
    assert result.still_dead == {}
    after = inspect(tmp_path / "fixed.pth")
    for v in after.layers:
        if v.layer.name in NEGATIVE:
            z = v.stats.z[NEGATIVE[v.layer.name]]
            assert ((z >= -3.0) & (z < -2.9)).all(), z


def test_relearn_with_alpha_zero_leaves_that_modality_unchanged(tmp_path, cli):
    model, _ = av_model("ogm-ge", realistic=True)
    src = save_av(model, tmp_path / "best_model.pth")
    options = ReinitOptions("relearn", RelearnOptions(alphas={"audio": 0.0, "visual": 0.3}))
    result = reinit(src, tmp_path / "relearned.pth", options)
    names = [c.name for c in result.changes]
    assert names and not [n for n in names if "audio_net" in n]
    assert all("visual_net" in n for n in names)
    assert result.parameters["per_modality"]["audio"] == "alpha 0: unchanged"
    assert result.parameters["per_modality"]["visual"] == f"alpha 0.3: {len(names)} tensors rewritten"
    text = cli("reinit", src, "--out", tmp_path / "cli.pth", "--method", "relearn", "--alpha-audio", "0",
               "--alpha-visual", "0.3").out
    assert "audio: alpha 0: unchanged" in text


def test_relearn_with_every_alpha_zero_writes_nothing_and_says_why(tmp_path):
    model, _ = av_model("ogm-ge", realistic=True)
    src = save_av(model, tmp_path / "best_model.pth")
    result = reinit(src, tmp_path / "none.pth", ReinitOptions("relearn", RelearnOptions(alphas={"audio": 0.0,
                                                                                                 "visual": 0.0})))
    assert result.target is None and result.changes == []
    assert "audio alpha 0: unchanged" in result.summary_line()
    assert not (tmp_path / "none.pth").exists()


def test_abnormal_pairs_alone_are_revived_by_the_blend(tmp_path):
    model, _ = av_model("ogm-ge", realistic=True)
    with torch.no_grad():
        bn = dict(model.named_modules())["visual_net.layer2.0.bn1"]
        assert isinstance(bn, nn.BatchNorm2d)
        bn.weight[[1, 3]] = 3e-13
        bn.bias[[1, 3]] = -2e-13
    src = save_av(model, tmp_path / "abnormal.pth")
    before = inspect(src)
    assert before.n_dead == 2
    result = reinit(src, tmp_path / "fixed.pth")
    assert result.revived_beyond_blend == {} and result.still_dead == {}
    assert inspect(tmp_path / "fixed.pth").n_dead == 0


def test_with_statistics_from_data_the_revived_channels_are_alive_under_those_statistics(tmp_path):
    from avdiag.workflows.datasource import DataSource

    src, _ = _checkpoint(tmp_path)
    data = DataSource("synthetic:n=24,classes=6,audio=0.9,visual=0.3,seed=1", device="cpu", batch_size=12)
    result = reinit(src, tmp_path / "fixed.pth", data=data)
    assert result.parameters["running_stats"] == "data"
    assert result.still_dead == {}
    assert set(NEGATIVE) <= set(result.revived_beyond_blend)
    assert inspect(tmp_path / "fixed.pth").n_dead == 0


def test_an_unknown_sequential_numbered_checkpoint_is_fixed_too(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        net[1].bias[[0, 3]] = -15.0
        net[4].weight[[5]], net[4].bias[[5]] = 3e-13, -2e-13
    torch.save(net.state_dict(), tmp_path / "seq.pt")
    assert inspect(tmp_path / "seq.pt").n_dead == 3
    result = reinit(tmp_path / "seq.pt", tmp_path / "fixed.pt")
    assert {k: v["channels"] for k, v in result.revived_beyond_blend.items()} == {"1": [0, 3]}
    assert result.still_dead == {} and inspect(tmp_path / "fixed.pt").n_dead == 0


def test_a_negative_revive_margin_is_a_one_line_usage_error(tmp_path, cli):
    src, _ = _checkpoint(tmp_path)
    message = cli("reinit", src, "--out", tmp_path / "x.pth", "--revive-margin", "-1").error()
    assert message == "--revive-margin must be a number >= 0, got -1.0"
    assert not (tmp_path / "x.pth").exists()


def test_the_report_lists_revived_and_still_dead_channels(tmp_path):
    from avdiag.report.document import build_document
    from avdiag.report.markdown import render_markdown

    src, _ = _checkpoint(tmp_path)
    revived = reinit(src, tmp_path / "fixed.pth").to_dict()
    exact = reinit(src, tmp_path / "exact.pth", ReinitOptions("abri", AbriOptions(exact_blend=True))).to_dict()
    text = render_markdown(build_document([revived, exact])).text
    assert "Revived beyond the paper's blend" in text and "Still dead after the rewrite" in text
    assert "visual_net.layer1.0.bn1" in text and "0, 7, 11" in text
