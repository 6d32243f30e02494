"""avdiag.monitor: per-step figures equal the offline measures on the same batches and weights, the run
log survives a killed run, the run rules of `check` on both sides of their thresholds, the report of a
run log, the interventions, and the Lightning callback (skipped without Lightning)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avdiag.data import make_loader, open_dataset
from avdiag.errors import ModelError, UsageError
from avdiag.measure.conflict import measure_conflict
from avdiag.measure.contribution import ogm
from avdiag.measure.runlog import RunLogWriter, read_run_log
from avdiag.models import OGMGEClassifier
from avdiag.models.parts import av_parts
from avdiag.monitor import Monitor
from avdiag.workflows.check import Policy, check

ROOT = Path(__file__).resolve().parents[1]
SPEC = "synthetic:n={n},classes=6,audio=0.9,visual=0.3,seed=0,f=32,t=24,size=16,frames=2"


def batches(n: int = 24, size: int = 8, split: str = "train") -> list[dict]:
    return list(make_loader(open_dataset(SPEC.format(n=n), split=split), batch_size=size))


def tiny_model(seed: int = 0) -> OGMGEClassifier:
    torch.manual_seed(seed)
    return OGMGEClassifier(6, "concat", width=4)


def train_step(model, optimizer, batch, monitor, offline=None):
    _, _, logits = model(batch["audio"], batch["visual"])
    loss = F.cross_entropy(logits, batch["label"])
    optimizer.zero_grad()
    loss.backward()
    record = monitor.step(batch, logits, loss)
    measured = offline(batch) if offline is not None else None  # same weights: before optimizer.step()
    optimizer.step()
    return record, measured


# ---- the per-step figures are the offline measures ----------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_step_figures_equal_offline_measures(mode):
    model = tiny_model()
    model.train(mode == "train")
    parts = av_parts(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def offline(batch):
        conflict = measure_conflict(parts, [batch], per_sample=False, train_mode=mode == "train")
        scores = ogm.measure(parts, [batch]).batch_scores[0][:2] if mode == "eval" else None
        return conflict.batches[0], scores

    with Monitor(model, cosine_every=1, dead_channels=False) as monitor:
        for batch in batches():
            record, (conflict, scores) = train_step(model, optimizer, batch, monitor, offline)
            for m in ("audio", "visual"):
                assert record["conflict"][m]["cos"] == pytest.approx(conflict.modalities[m].cos, abs=1e-6)
            if scores is not None:  # OGM-GE offline runs in eval mode: comparable when BN is frozen
                assert [record["ogm"]["scores"]["audio"], record["ogm"]["scores"]["visual"]] == \
                    pytest.approx(list(scores), rel=1e-6)


def test_step_scores_come_from_the_loops_own_forward():
    """In train mode (batch statistics) the scores are those of the loop's forward, by hand."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, cosine_every=0, dead_channels=False) as monitor:
        for batch in batches(16):
            a, v, logits = model(batch["audio"], batch["visual"])
            a, v = a.detach(), v.detach()
            w, b = model.fusion_module.fc_out.weight.detach(), model.fusion_module.fc_out.bias.detach()
            d = a.shape[1]
            y = batch["label"]
            by_hand = {m: float(F.softmax(f @ w[:, s].T + b / 2, dim=1).gather(1, y[:, None]).sum())
                       for m, f, s in (("audio", a, slice(0, d)), ("visual", v, slice(d, None)))}
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            record = monitor.step(batch, logits, loss)
            optimizer.step()
            assert record["ogm"]["scores"] == pytest.approx(by_hand, rel=1e-5)
            rho_v = by_hand["visual"] / by_hand["audio"]
            assert record["ogm"]["rho"]["visual"] == pytest.approx(rho_v, rel=1e-5)
            k = 1 - math.tanh(0.8 * max(rho_v, 1 / rho_v))
            assert min(record["ogm"]["coefficients"].values()) == pytest.approx(k, rel=1e-5)
            assert record["train_accuracy"]["fused"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))


class AdapterModel(torch.nn.Module):
    """A custom model through the adapter protocol: encoders giving pooled features, ``fuse``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio_encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 24, 16), torch.nn.ReLU())
        self.visual_encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 16 * 16, 16),
                                                  torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 6)

    def fuse(self, a, v):
        return self.head(torch.cat((a, v), dim=1))

    def forward(self, audio, visual):
        return self.fuse(self.audio_encoder(audio), self.visual_encoder(visual))


def test_custom_model_through_the_adapter_protocol():
    model = AdapterModel()
    parts = av_parts(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, cosine_every=1) as monitor:
        for batch in batches(16):
            logits = model(batch["audio"], batch["visual"])
            loss = F.cross_entropy(logits, batch["label"])
            optimizer.zero_grad()
            loss.backward()
            record = monitor.step(batch, logits, loss)
            conflict = measure_conflict(parts, [batch], per_sample=False).batches[0]
            scores = ogm.measure(parts, [batch]).batch_scores[0][:2]
            optimizer.step()
            assert [record["conflict"][m]["cos"] for m in ("audio", "visual")] == \
                pytest.approx([conflict.modalities[m].cos for m in ("audio", "visual")], abs=1e-6)
            assert [record["ogm"]["scores"][m] for m in ("audio", "visual")] == pytest.approx(list(scores), rel=1e-6)
        assert monitor.end_epoch()["dead_channels"] == {}  # no BatchNorm: nothing to scan


def test_dead_channel_scan_equals_inspect(tmp_path):
    import avdiag

    model = tiny_model()
    with torch.no_grad():
        model.audio_net.bn1.bias[:3] = -10.0  # planted: z = beta / s far below -3
        model.visual_net.layer1[0].bn1.bias[:2] = -10.0
    with Monitor(model, cosine_every=0) as monitor:
        scan = monitor.scan.counts()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    offline = avdiag.inspect(tmp_path / "m.pt", hash_file=False).modalities
    for m in ("audio", "visual"):
        assert scan[m]["dead"] == offline[m].n_dead
        assert scan[m]["channels"] == offline[m].n_bn_channels
    assert (scan["audio"]["dead"], scan["visual"]["dead"]) == (3, 2)


# ---- interventions ------------------------------------------------------------------------------


def test_ogm_ge_modulation_scales_conv_gradients_only():
    model = tiny_model()
    batch = batches(8)[0]
    with Monitor(model, cosine_every=0, dead_channels=False, modulation="ogm-ge", ge=False) as monitor:
        _, _, logits = model(batch["audio"], batch["visual"])
        F.cross_entropy(logits, batch["label"]).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        record = monitor.step(batch, logits)
    k = record["ogm"]["coefficients"]
    assert record["interventions"][0]["applied"] and min(k.values()) < 1
    for name, p in model.named_parameters():
        enc = "audio" if name.startswith("audio_net") else "visual" if name.startswith("visual_net") else None
        scale = k[enc] if enc and p.dim() == 4 else 1.0
        torch.testing.assert_close(p.grad, before[name] * scale)


def test_modulation_acts_only_in_its_epoch_window():
    """OGM-GE's code modulates from `modulation_starts` up to `modulation_ends`; so does the monitor."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = batches(8)[0]
    seen = []
    with Monitor(model, cosine_every=0, dead_channels=False, modulation="ogm-ge", ge=False,
                 modulation_epochs=(1, 2)) as monitor:
        for _ in range(3):
            record, _ = train_step(model, optimizer, batch, monitor)
            seen.append("interventions" in record)
            monitor.end_epoch()
    assert seen == [False, True, False]
    assert monitor.header["config"]["modulation_epochs"] == [1, 2]
    for bad in ((2, 1), (-1, None), "soon"):
        with pytest.raises(UsageError, match="modulation_epochs"):
            Monitor(tiny_model(), modulation="ogm-ge", modulation_epochs=bad)


def test_mmpareto_combination_logs_the_cosine_and_keeps_buffers():
    model = tiny_model()
    batch = batches(8)[0]
    offline = measure_conflict(av_parts(model), [batch], per_sample=False, train_mode=True).batches[0]
    with Monitor(model, cosine_every=0, dead_channels=False, modulation="mmpareto") as monitor:
        _, _, logits = model(batch["audio"], batch["visual"])
        F.cross_entropy(logits, batch["label"]).backward()
        buffers = [b.clone() for b in model.buffers()]
        record = monitor.step(batch, logits)
    for m in ("audio", "visual"):
        assert record["conflict"][m]["cos"] == pytest.approx(offline.modalities[m].cos, abs=1e-6)
        if not record["conflict"][m]["conflict"]:  # MMPareto's weights without conflict
            assert record["interventions"][0]["modalities"][m]["weights"] == [0.5, 0.5]
    for b, saved in zip(model.buffers(), buffers):
        assert torch.equal(b, saved)


# ---- the run log --------------------------------------------------------------------------------


KILLED_RUN = """
import os, signal, sys, torch, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from test_monitor import batches, tiny_model
from avdiag.monitor import Monitor
model = tiny_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
monitor = Monitor(model, {log!r}, cosine_every=0, dead_channels=True)
for epoch in range(3):
    for i, b in enumerate(batches(16)):
        _, _, logits = model(b["audio"], b["visual"])
        loss = F.cross_entropy(logits, b["label"])
        opt.zero_grad(); loss.backward(); monitor.step(b, logits, loss); opt.step()
        if epoch == 1 and i == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no exit handlers
    monitor.end_epoch()
"""


@pytest.mark.slow  # a child process: its torch import and first passes take 4-30 s on a loaded machine
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_run_log_survives_a_killed_run(tmp_path):
    log = tmp_path / "run.jsonl"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), log=str(log))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    run = read_run_log(log)
    assert [s["step"] for s in run.steps] == [1, 2, 3]
    assert [e["epoch"] for e in run.epochs] == [0]
    assert run.header["config"]["cosine_every"] == 0 and not run.truncated
    # a line cut in the middle by the kill: dropped, the rest read
    cut = tmp_path / "cut.jsonl"
    cut.write_text(log.read_text() + lines[1][: len(lines[1]) // 2])
    again = read_run_log(cut)
    assert again.truncated and len(again.steps) == 3


def test_run_log_rejects_what_is_not_one(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"kind": "step", "step": 1}\n')
    with pytest.raises(UsageError, match="not an avdiag run log"):
        read_run_log(bad)
    bad.write_text("not json\n{}\n")
    with pytest.raises(UsageError, match="line 1 is not JSON"):
        read_run_log(bad)


def test_bad_use_is_a_one_line_error():
    with pytest.raises(ModelError, match="parts="):
        Monitor(torch.nn.Linear(2, 2))
    with pytest.raises(UsageError, match="modulation"):
        Monitor(tiny_model(), modulation="opm")
    with Monitor(tiny_model(), cosine_every=0) as monitor, pytest.raises(UsageError, match="no forward"):
        monitor.step(batches(8)[0])


# ---- the run rules of check -----------------------------------------------------------------------


def write_log(path: Path, rho_audio: list[float], cos_visual: list[float], dead: list[int]) -> Path:
    writer = RunLogWriter(path, {"cosine_every": 1}, {"class": "test"},
                          {"dead_channels": {"audio": {"dead": dead[0], "channels": 64}}})
    for step, cos in enumerate(cos_visual, 1):
        writer.write({"kind": "step", "step": step, "epoch": 0,
                      "conflict": {"audio": {"cos": 0.5}, "visual": {"cos": cos}}})
    for epoch, (rho, n_dead) in enumerate(zip(rho_audio, dead[1:])):
        writer.write({"kind": "epoch", "epoch": epoch, "step": len(cos_visual),
                      "means": {"rho": {"audio": rho, "visual": 1 / rho}},
                      "dead_channels": {"audio": {"dead": n_dead, "channels": 64}}})
    writer.close()
    return path


RUN_RULES_OFF = {"run-imbalance": "off", "run-conflict": "off", "run-dead-channels-growth": "off"}


def violations(path: Path, rules: dict) -> dict[str, list[str]]:
    """The violations of ``rules`` alone (the other run rules off), by rule id."""
    result = check([str(path)], Policy.from_mapping({"rules": {**RUN_RULES_OFF, **rules}}))
    out: dict[str, list[str]] = {}
    for v in result.violations:
        out.setdefault(v.rule_id, []).append(v.location)
    return out


def test_run_rules_on_both_sides_of_their_thresholds(tmp_path):
    log = write_log(tmp_path / "run.jsonl", rho_audio=[1.5, 3.5, 3.2, 3.1], cos_visual=[0.2, -0.1, -0.2, 0.1, -0.3],
                    dead=[2, 2, 3, 5, 6])
    assert violations(log, {"run-imbalance": {"max_rho": 3.0, "epochs": 3}}) == {"run-imbalance": ["modality:audio"]}
    assert violations(log, {"run-imbalance": {"max_rho": 3.15, "epochs": 3}}) == {}
    assert violations(log, {"run-imbalance": {"max_rho": 3.0, "epochs": 4}}) == {}  # epoch 0: 1.5
    assert violations(log, {"run-conflict": {"min_cos": 0.0, "max_share": 0.5, "steps": 5}}) == \
        {"run-conflict": ["modality:visual"]}  # 3 of 5 below 0
    assert violations(log, {"run-conflict": {"min_cos": 0.0, "max_share": 0.6, "steps": 5}}) == {}
    assert violations(log, {"run-conflict": {"min_cos": 0.0, "max_share": 0.5, "steps": 2}}) == {}  # 1 of 2
    assert violations(log, {"run-dead-channels-growth": {"max_growth": 3}}) == \
        {"run-dead-channels-growth": ["modality:audio"]}  # 2 -> 6
    assert violations(log, {"run-dead-channels-growth": {"max_growth": 4}}) == {}
    result = check([str(log)], Policy.from_mapping({"rules": {**RUN_RULES_OFF,
                                                                "run-dead-channels-growth": {"max_growth": 3}}}))
    assert result.exit_code == 1 and result.files[0].kind == "run-log"
    assert result.summary_line().startswith("check FAIL (policy violations): 1 run log(s): 0 passed, 1 failed")


def test_run_rules_skip_and_refuse_cleanly(tmp_path):
    log = write_log(tmp_path / "run.jsonl", rho_audio=[5.0], cos_visual=[], dead=[0, 0])
    result = check([str(log)], Policy())
    assert result.exit_code == 0
    assert {n["rule_id"] for n in result.files[0].not_evaluated} == {"run-imbalance", "run-conflict"}
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{}\n")
    assert check([str(broken)], Policy()).exit_code == 2
    with pytest.raises(UsageError):
        Policy.from_mapping({"rules": {"run-conflict": {"steps": 0}}})


# ---- the report ---------------------------------------------------------------------------------


def test_report_draws_the_timelines(tmp_path):
    from avdiag.workflows.report import load_results, report

    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    log = tmp_path / "run.jsonl"
    with Monitor(model, log, cosine_every=2, heldout=batches(12, 12, "test")) as monitor:
        for _ in range(2):
            for batch in batches(16):
                train_step(model, optimizer, batch, monitor)
            monitor.end_epoch()
    html = report(load_results([log]), tmp_path / "r.html").read_text()
    for title in ("OGM-GE rho and coefficients over steps", "MMPareto cosine per modality over steps",
                  "Dead BatchNorm channels per modality over epochs", "Held-out accuracy and Shapley values"):
        assert title in html
    assert html.count("data:image/png;base64") >= 4
    md = report(load_results([log]), tmp_path / "r.md").read_text()
    assert "| step | cos audio | cos visual |" in md and "| epoch | fused accuracy |" in md


# ---- Lightning ----------------------------------------------------------------------------------

HAS_LIGHTNING = any(importlib.util.find_spec(m) is not None for m in ("lightning", "pytorch_lightning"))


@pytest.mark.skipif(HAS_LIGHTNING, reason="Lightning is installed: the callback test runs instead")
def test_lightning_absent_is_a_one_line_error():
    from avdiag.monitor.lightning import MonitorCallback

    with pytest.raises(UsageError, match="pip install"):
        MonitorCallback("run.jsonl")


@pytest.mark.slow
def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch") if importlib.util.find_spec("lightning") else \
        pytest.importorskip("pytorch_lightning")
    from avdiag.monitor.lightning import MonitorCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model()

        def training_step(self, batch, _):
            return F.cross_entropy(self.model(batch["audio"], batch["visual"])[2], batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = batches(16)
    trainer = pl.Trainer(max_epochs=2, callbacks=[MonitorCallback(tmp_path / "run.jsonl", cosine_every=1)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    run = read_run_log(tmp_path / "run.jsonl")
    assert len(run.steps) == 2 * len(data) and len(run.epochs) == 2
    assert all("cos" in s["conflict"]["audio"] for s in run.steps)


# ---- the example --------------------------------------------------------------------------------


@pytest.mark.slow
def test_imbalance_dynamics_example_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import imbalance_dynamics
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = imbalance_dynamics.main(["--quick", "--out", str(tmp_path)])
    plain, modulated = (read_run_log(p) for p in out["logs"])
    assert len(plain.epochs) == len(modulated.epochs) == imbalance_dynamics.SETTINGS["quick"][2]
    assert "interventions" not in plain.steps[0]
    assert all(s["interventions"][0]["method"] == "ogm-ge" for s in modulated.steps)
    assert all("heldout" in e and "dead_channels" in e for e in plain.epochs)
    assert "training run" in (tmp_path / "report.html").read_text()
