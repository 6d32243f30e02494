"""`avdiag check --data`: the contribution and conflict rules, and a contribution fall versus a baseline.

Two width-8 OGM-GE concat models are trained for a few seconds on seeded synthetic data: one on
data where audio shows the class 95 % of the time and visual never (visual under-contributes), one on
data where both modalities are clean (both contribute). A third checkpoint is the balanced model
with the visual half of its fused classifier zeroed, so visual no longer reaches the prediction.
The figures the rules read are recomputed here from plain forward and backward passes of the
models (sharing no code with avdiag), and every threshold is tested on both sides of the value.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avdiag.data import make_loader, open_dataset
from avdiag.data.synthetic import SyntheticDataset
from avdiag.errors import AvdiagError, UsageError
from avdiag.models import OGMGEClassifier
from avdiag.report.ci import junit_xml
from avdiag.workflows.check import Policy, check
from avdiag.workflows.datasource import DataSource
from helpers.checkpoints import save_av

CLASSES = 4
DATA = "synthetic:n=40,classes=4,audio=1.0,visual=1.0,seed=0"  # the data check runs on: its test split


def _train(spec: str, seed: int) -> OGMGEClassifier:
    train = list(make_loader(open_dataset(spec), batch_size=32))
    torch.manual_seed(seed)
    model = OGMGEClassifier(CLASSES, "concat", width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for b in train:
            loss = F.cross_entropy(model(b["audio"], b["visual"])[2], b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check_data")
    audio_dom = _train("synthetic:n=96,classes=4,audio=0.95,visual=0.0,seed=0", seed=0)
    balanced = _train("synthetic:n=96,classes=4,audio=1.0,visual=1.0,seed=0", seed=1)
    cut = OGMGEClassifier(CLASSES, "concat", width=8)
    cut.load_state_dict(balanced.state_dict())
    with torch.no_grad():
        cut.fusion_module.fc_out.weight[:, cut.audio_net.out_dim:] = 0.0  # visual no longer reaches the logits
    (root / "old").mkdir()
    return {"audio_dom": save_av(audio_dom, root / "audio_dom.pt"), "balanced": save_av(balanced, root / "balanced.pt"),
            "cut": save_av(cut.eval(), root / "cut.pt"), "old_balanced": save_av(balanced, root / "old" / "cut.pt"),
            "plain": _plain(root / "plain.pt")}


def _plain(path: Path) -> Path:
    torch.save({"encoder.weight": torch.randn(4, 4)}, path)
    return path


def _model(path: Path) -> OGMGEClassifier:
    model = OGMGEClassifier(CLASSES, "concat", width=8)
    sd = torch.load(path, weights_only=True)["model"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    return model.eval()


def _batch() -> dict[str, torch.Tensor]:
    ds = open_dataset(DATA, split="test")
    return next(iter(make_loader(ds, batch_size=len(ds))))


# ---- independent figures ------------------------------------------------------------------------


def _shares(model: OGMGEClassifier, b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Two-player Shapley of the gain game g(S) = 1[correct_S] - 1[correct_empty], a modality removed
    by zeroing its pooled feature, over the sum of both."""
    fc = model.fusion_module.fc_out
    with torch.no_grad():
        a, v, _ = model(b["audio"], b["visual"])
        za, zv = torch.zeros_like(a), torch.zeros_like(v)

        def correct(fa: torch.Tensor, fv: torch.Tensor) -> float:
            return float((F.linear(torch.cat([fa, fv], 1), fc.weight, fc.bias).argmax(1) == b["label"]).double().mean())

        c_av, c_a, c_v, c_0 = correct(a, v), correct(a, zv), correct(za, v), correct(za, zv)
    assert c_av > c_0, "the model must do better than its head's biases for shares to exist"
    phi = {"audio": ((c_a - c_0) + (c_av - c_v)) / 2, "visual": ((c_v - c_0) + (c_av - c_a)) / 2}
    return {m: p / (c_av - c_0) for m, p in phi.items()}


def _cosines(model: OGMGEClassifier, b: dict[str, torch.Tensor]) -> dict[str, float]:
    """One batch, eval mode: cos(grad of the fused loss, grad of the sliced uni-modal loss) per encoder."""
    fc = model.fusion_module.fc_out
    a, v, fused = model(b["audio"], b["visual"])
    d = a.shape[1]
    uni = {"audio": a @ fc.weight[:, :d].t() + fc.bias / 2, "visual": v @ fc.weight[:, d:].t() + fc.bias / 2}
    out = {}
    for m, enc in (("audio", model.audio_net), ("visual", model.visual_net)):
        params = list(enc.parameters())
        g1 = torch.autograd.grad(F.cross_entropy(fused, b["label"]), params, retain_graph=True)
        g2 = torch.autograd.grad(F.cross_entropy(uni[m], b["label"]), params, retain_graph=True)
        x = torch.cat([g.reshape(-1) for g in g1]).double()
        y = torch.cat([g.reshape(-1) for g in g2]).double()
        out[m] = float(x @ y / (x.norm() * y.norm()))
    return out


# ---- running check --------------------------------------------------------------------------------


def _data() -> DataSource:
    return DataSource(DATA, split="test", batch_size=64, device="cpu")


def _policy(rules: dict) -> Policy:
    return Policy.from_mapping({"rules": rules})


def _found(result, rule_id: str) -> dict[str, str]:
    return {v.location: v.message for v in result.violations if v.rule_id == rule_id}


def test_contribution_rule_flags_exactly_the_modalities_below_their_share(ckpts):
    path = ckpts["audio_dom"]
    share = _shares(_model(path), _batch())
    assert share["visual"] < 0.2 < share["audio"]  # the audio-dominated model leans on audio
    limits = sorted({0.0, 0.2, 0.5, *(min(1.0, max(0.0, share[m] + d)) for m in share for d in (-0.01, 0.01))})
    for limit in limits:
        result = check([str(path)], _policy({"modality-contribution": {"severity": "error", "min_share": limit}}),
                             data=_data())
        figures = result.files[0].data["modalities"]
        for m in ("audio", "visual"):
            assert figures[m]["share_accuracy"] == pytest.approx(share[m], abs=1e-9)
        expected = {f"modality:{m}" for m in share if share[m] < limit}
        found = _found(result, "modality-contribution")
        assert set(found) == expected, limit
        for location, message in found.items():
            said = re.search(rf"\bcontribution share (\d\.\d{{3}}) < {re.escape(f'{limit:g}')} \(accuracy-valued", message)
            assert said and abs(float(said.group(1)) - share[location.split(":")[1]]) <= 5e-4, message
        assert result.exit_code == (1 if expected else 0)


def test_contribution_rule_rho_and_unimodal_accuracy(ckpts):
    path = ckpts["audio_dom"]
    result = check([str(path)], _policy({"modality-contribution": {"min_share": 0.0, "max_rho": 1.0,
                                                                         "min_unimodal_accuracy": 0.0}}), data=_data())
    d = result.files[0].data["modalities"]
    assert d["audio"]["rho"] > 1.0 > d["visual"]["rho"]  # OGM-GE: audio's score over visual's
    assert math.isclose(d["audio"]["rho"] * d["visual"]["rho"], 1.0, rel_tol=1e-9)
    found = _found(result, "modality-contribution")
    assert list(found) == ["modality:visual"] and "audio dominates" in found["modality:visual"]
    acc = d["visual"]["unimodal_accuracy"]
    result = check([str(path)], _policy({"modality-contribution": {
        "min_share": 0.0, "min_unimodal_accuracy": {"visual": min(1.0, acc + 0.01)}}}), data=_data())
    assert "uni-modal accuracy" in _found(result, "modality-contribution")["modality:visual"]


def test_conflict_rule_on_both_sides_of_the_measured_cosine(ckpts):
    path = ckpts["balanced"]
    cos = _cosines(_model(path), _batch())
    result = check([str(path)], _policy({"modality-conflict": {"min_cos_mean": -1.0, "max_conflict_rate": 1.0}}),
                         data=_data())
    d = result.files[0].data
    assert d["n_batches"] == 1  # one batch covers the data: cos_mean is that batch's cosine
    for m in ("audio", "visual"):
        assert d["modalities"][m]["cos_mean"] == pytest.approx(cos[m], abs=1e-5)
    assert _found(result, "modality-conflict") == {}
    m = min(cos, key=cos.get)
    result = check([str(path)], _policy({"modality-conflict": {"min_cos_mean": min(1.0, cos[m] + 1e-3),
                                                                     "max_conflict_rate": 1.0}}), data=_data())
    assert f"modality:{m}" in _found(result, "modality-conflict")
    result = check([str(path)], _policy({"modality-conflict": {"min_cos_mean": max(-1.0, min(cos.values()) - 1e-3),
                                                                     "max_conflict_rate": 1.0}}), data=_data())
    assert _found(result, "modality-conflict") == {}


def test_baseline_fails_when_a_modality_contribution_fell(ckpts):
    new, old = ckpts["cut"], ckpts["old_balanced"]
    before, after = _shares(_model(old), _batch()), _shares(_model(new), _batch())
    assert after["visual"] == 0.0 and before["visual"] > 0.05  # zeroed visual columns: no visual gain
    result = check([str(new)], Policy(), baseline=str(old), data=_data())
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert result.exit_code == 1 and d["summary"]["exit_code"] == 1
    f = d["files"][0]
    drops = [v for v in f["violations"] if v["rule_id"] == "modality-contribution-drop"]
    assert [v["location"] for v in drops] == ["modality:visual"] and drops[0]["outcome"] == "fail"
    summary = f["baseline"]["contribution"]["visual"]
    assert summary["share_before"] == pytest.approx(before["visual"], abs=1e-9) and summary["share_after"] == 0.0
    assert f["baseline"]["modalities"]["audio"]["growth"] == 0  # the dead-channel comparison still runs
    # the same checkpoint as its own baseline: nothing fell
    result = check([str(old)], Policy(), baseline=str(old), data=_data())
    assert _found(result, "modality-contribution-drop") == {}
    assert "modality-contribution-drop" in result.files[0].rules


def test_without_data_the_data_rules_are_silent_unless_configured(ckpts):
    path = str(ckpts["balanced"])
    default = check([path], Policy())
    assert "modality-contribution" not in default.files[0].rules and not default.files[0].not_evaluated
    configured = check([path], _policy({"modality-contribution": "error"}))
    f = configured.files[0]
    assert "modality-contribution" in f.rules and "modality-conflict" not in f.rules
    assert f.not_evaluated == [{"rule_id": "modality-contribution", "reason": "needs data: run check with --data"}]
    case = ET.fromstring(junit_xml(configured)).find(".//testcase[@name='modality-contribution']")
    assert case is not None and case.find("skipped") is not None
    assert configured.exit_code == 0


def test_a_checkpoint_without_a_model_is_not_evaluated_on_data(ckpts):
    result = check([str(ckpts["plain"])], Policy(), data=_data())
    f = result.files[0]
    assert f.status == "pass" and f.inspection is not None
    skipped = {n["rule_id"]: n["reason"] for n in f.not_evaluated}
    assert {"modality-contribution", "modality-conflict", "measured-dead-channels"} <= set(skipped)
    assert all(r.startswith("no model to run on the data") for r in skipped.values())


@pytest.mark.parametrize("rules, needle", [
    ({"modality-contribution": {"min_share": 1.5}}, "ratio between 0 and 1"),
    ({"modality-contribution": {"value": "logits"}}, "'accuracy' or 'probability'"),
    ({"modality-contribution": {"max_rho": 0.5}}, ">= 1"),
    ({"modality-conflict": {"min_cos_mean": 2}}, "cosine between -1 and 1"),
    ({"modality-conflict": {"min_share": 0.2}}, "unknown parameter 'min_share'"),
    ({"modality-contribution-drop": {"max_drop": -0.1}}, "ratio between 0 and 1"),
])
def test_bad_data_rule_parameters_are_usage_errors(rules, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        _policy(rules)


def test_bad_data_spec_is_a_one_line_error_before_any_checkpoint(ckpts, monkeypatch):
    import avdiag.load

    monkeypatch.setattr(avdiag.load, "load_checkpoint", lambda *a, **k: pytest.fail("a checkpoint was read"))
    with pytest.raises(AvdiagError) as caught:
        check([str(ckpts["balanced"])], Policy(), data=DataSource("synthetic:n=4,bogus=1"))
    assert str(caught.value) == "synthetic: unknown key 'bogus': expected n, classes, audio, visual, seed, f, t, size, frames"


def test_check_report_shows_the_data_figures(ckpts, tmp_path):
    from test_report import _parse, _png, _table

    from avdiag.workflows.report import report as write_report

    report, md = tmp_path / "check.html", tmp_path / "check.md"
    paths = [str(ckpts["audio_dom"]), str(ckpts["balanced"])]
    result = check(paths, Policy(), data=_data())
    assert result.exit_code == 0  # data rules are warnings by default
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    write_report([document], report)
    (section,) = _parse(report.read_text()).sections
    assert section["command"] == "check" and section["charts"] == ["check-shares"]
    image = _png(section["images"][0]["src"])
    assert image.width > 300 and image.height > 100
    rows = _table(section, "path", "contribution share")["rows"]
    shares = {(r[0], r[1]): float(r[2]) for r in rows}
    expected = _shares(_model(ckpts["audio_dom"]), _batch())
    audio_dom = next(p for p, _ in shares if p.endswith("audio_dom.pt"))
    assert shares[(audio_dom, "visual")] == pytest.approx(expected["visual"], abs=1e-3)
    write_report([document], md)
    assert "contribution share" in md.read_text()


def test_data_violations_in_sarif_and_junit(ckpts):
    jsonschema = pytest.importorskip("jsonschema")
    from avdiag.report.ci import sarif

    schema = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())
    policy = _policy({"modality-contribution": "error", "modality-conflict": {"min_cos_mean": 1.0}})
    result = check([str(ckpts["audio_dom"]), str(ckpts["cut"])], policy, data=_data())
    log = sarif(result)
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(log))
    results = log["runs"][0]["results"]
    contribution = [r for r in results if r["ruleId"] == "modality-contribution"]
    assert {r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] for r in contribution} == {"modality:visual"}
    assert {r["level"] for r in contribution} == {"error"}
    fingerprints = [r["partialFingerprints"]["avdiag/v1"] for r in results]
    assert len(fingerprints) == len(set(fingerprints))  # one violation per rule, file and location
    suites = ET.fromstring(junit_xml(result)).findall("testsuite")
    for suite in suites:
        cases = {c.get("name"): c for c in suite.iter("testcase")}
        assert cases["modality-contribution"].find("failure") is not None
        assert cases["modality-conflict"].find("system-out") is not None  # a warning: shown, not failing
    assert result.exit_code == 1


def test_data_without_both_modalities_leaves_the_data_rules_not_evaluated(ckpts):
    data = DataSource("synthetic:n=8,classes=4,visual=none", split="test", batch_size=8, device="cpu")
    result = check([str(ckpts["balanced"])], Policy(), data=data)
    reasons = {n["rule_id"]: n["reason"] for n in result.files[0].not_evaluated}
    assert set(reasons) >= {"modality-contribution", "modality-conflict"}
    assert "visual" in reasons["modality-contribution"] and result.exit_code == 0


def test_the_data_is_decoded_once_for_every_checkpoint_and_the_baseline(ckpts, monkeypatch):
    """Three checkpoints and a baseline, with the probe and both data rules: every sample is read once."""
    reads: list[int] = []
    real = SyntheticDataset.__getitem__

    def counting(self, i):
        reads.append(int(i))
        return real(self, i)

    monkeypatch.setattr(SyntheticDataset, "__getitem__", counting)
    paths = [str(ckpts[name]) for name in ("audio_dom", "balanced", "cut")]
    data = _data()
    n = len(open_dataset(DATA, split="test"))
    result = check(paths, Policy(), data=data)
    assert len(reads) == n and sorted(reads) == list(range(n))
    assert [f.status for f in result.files] == ["pass"] * 3
    assert all(f.data["n_samples"] == n for f in result.files)  # each checkpoint ran on all of it
    assert all("measured dead" in f.inspection["text"] for f in result.files)  # the probe used it too
    reads.clear()
    result = check([paths[2]], Policy(), baseline=str(ckpts["old_balanced"]), data=data)
    assert len(reads) == n  # the baseline ran on the same decoded batches
    assert result.files[0].baseline["contribution"]["visual"]["share_after"] == 0.0
