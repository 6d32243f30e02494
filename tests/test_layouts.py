"""Each research codebase's checkpoint layout: modalities, per-layer modality, heads, dead counts.

Every model comes from ``avdiag.models`` (width 8), gets different planted channels in its audio
and visual encoders, and is saved the way its training code saves it (same nesting, same
DataParallel prefix, same file name extension).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import avdiag
from avdiag.models import (
    BalanceMMClassifier,
    CRMTClassifier,
    JournalOPMClassifier,
    LegacyOGMClassifier,
    MMParetoClassifier,
    OGMGEClassifier,
    resnet18,
)
from helpers.checkpoints import save_av
from layout_fixtures import (
    AUDIO_ABNORMAL,
    AUDIO_DEAD,
    N_CLASSES,
    VISUAL_ABNORMAL,
    VISUAL_DEAD,
    WIDTH,
    channels_by_layer,
    planted_av,
    planted_encoder,
    plant_encoder,
    realistic_bn,
    state_dict,
)


def _optim(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)


@dataclass
class Case:
    layout: str
    model: type
    encoders: tuple[str, str]  # (audio, visual) module paths
    heads: list[str]
    fusion: str
    file_name: str
    kwargs: dict

    def save(self, model: nn.Module, path: Path) -> None:
        sd = state_dict(model)
        dp = state_dict(model, "module.")  # nn.DataParallel(model).state_dict()
        if self.layout == "ogm-ge":  # OGM-GE main.py
            opt = _optim(model)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=70, gamma=0.1)
            obj = {"saved_epoch": 30, "modulation": "OGM_GE", "alpha": 0.8, "fusion": self.fusion,
                   "acc": 0.61, "model": dp, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        elif self.layout in ("ogm-ge-legacy", "mmpareto"):
            obj = {"model": dp}
        elif self.layout == "opm-journal":
            obj = sd
        elif self.layout == "crmt":
            obj = {"epoch": 30, "state_dict": sd}
        elif self.layout == "balancemm":
            obj = {"model": dp, "optim": _optim(model).state_dict(), "global_step": 3150}
        else:
            raise AssertionError(self.layout)
        torch.save(obj, path)


CASES = {
    "ogm-ge-concat": Case("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"),
                          ["fusion_module.fc_out"], "concat", "best_model.pth", {"fusion": "concat"}),
    "ogm-ge-sum": Case("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"),
                       ["fusion_module.fc_x", "fusion_module.fc_y"], "sum", "best_model.pth", {"fusion": "sum"}),
    "ogm-ge-film": Case("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"),
                        ["fusion_module.fc", "fusion_module.fc_out"], "film", "best_model.pth", {"fusion": "film"}),
    "ogm-ge-gated": Case("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"),
                         ["fusion_module.fc_x", "fusion_module.fc_y", "fusion_module.fc_out"], "gated",
                         "best_model.pth", {"fusion": "gated"}),
    "ogm-ge-legacy": Case("ogm-ge-legacy", LegacyOGMClassifier, ("parta", "partv"), ["fc_"], "concat",
                          "model.pth", {}),
    "opm-journal": Case("opm-journal", JournalOPMClassifier, ("encoder_1", "encoder_2"),
                        ["fusion_model.fxy"], "concat", "model.pth", {}),
    "mmpareto": Case("mmpareto", MMParetoClassifier, ("audio_net", "visual_net"),
                     ["head", "head_audio", "head_video"], "concat", "model.pth", {}),
    "crmt": Case("crmt", CRMTClassifier, ("audio_net", "visual_net"),
                 ["fusion_module.orth_layer.fc", "fusion_module.orth_layer.a_0", "fusion_module.orth_layer.a_1"],
                 "concat", "model.pth", {}),
    "balancemm": Case("balancemm", BalanceMMClassifier, ("modality_encoder.audio", "modality_encoder.visual"),
                      ["fusion_module.fc_out"], "concat", "epoch=30.ckpt", {}),
}


def _linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _heads(report: dict) -> dict[str, tuple[int, int]]:
    return {h["name"]: (h["in_features"], h["out_features"]) for h in report["layout"]["heads"]}


@pytest.mark.parametrize("case_id", list(CASES))
def test_research_layout(case_id, tmp_path):
    case = CASES[case_id]
    model, planted = _planted(case)
    path = tmp_path / case.file_name
    case.save(model, path)
    _check_layout(avdiag.inspect(path).to_dict(), case, model, planted, "")


@pytest.mark.parametrize("case_id", list(CASES))
def test_research_layout_inside_a_lightning_checkpoint(case_id, tmp_path):
    """A LightningModule holding the model as ``self.model``: every name gains ``model.``, which
    must hide neither the encoders nor the layout and its fusion."""
    case = CASES[case_id]
    model, planted = _planted(case)
    path = tmp_path / "epoch=29-step=3150.ckpt"
    torch.save({"state_dict": state_dict(model, "model."), "pytorch-lightning_version": "2.4.0",
                "epoch": 29, "global_step": 3150}, path)
    _check_layout(avdiag.inspect(path).to_dict(), case, model, planted, "model.")


def _planted(case: Case):
    torch.manual_seed(0)
    model = case.model(N_CLASSES, width=WIDTH, **case.kwargs)
    return model, planted_av(model, *case.encoders)


def _check_layout(report: dict, case: Case, model: nn.Module, planted, prefix: str) -> None:
    audio, visual = (prefix + e + "." for e in case.encoders)
    layout = report["layout"]
    assert layout["modalities"] == {"audio": audio, "visual": visual}
    # every BN layer belongs to the encoder it sits in; there is no third group
    assert len(report["layers"]) == 40
    for layer in report["layers"]:
        assert layer["name"].startswith((audio, visual)), layer["name"]
        assert layer["modality"] == ("audio" if layer["name"].startswith(audio) else "visual"), layer["name"]
    assert list(report["modalities"]) == ["audio", "visual"]
    # the planted channels, exactly, in the right modality
    planted = planted.prefixed(prefix)
    assert channels_by_layer(report) == planted.dead
    assert channels_by_layer(report, "abnormal_channels") == planted.abnormal
    for modality, n_dead in planted.dead_by_modality.items():
        summary = report["modalities"][modality]
        assert summary["n_dead"] == n_dead, modality
        assert summary["prefix"] == layout["modalities"][modality]
        assert summary["n_bn_layers"] == 20
    assert report["modalities"]["audio"]["n_abnormal"] == sum(map(len, AUDIO_ABNORMAL.values()))
    assert report["modalities"]["visual"]["n_abnormal"] == sum(map(len, VISUAL_ABNORMAL.values()))
    assert report["modalities"]["audio"]["worst_layer"].startswith(audio)
    # heads: the named linear layers, with the sizes the model has
    linears = _linears(model)
    assert _heads(report) == {prefix + h: linears[h] for h in case.heads}
    # the layout's name and fusion
    assert (layout["name"], layout["source"]) == (case.layout, "auto")
    assert layout["fusion"] == case.fusion


def test_single_modality_resnet(tmp_path):
    model, planted = planted_encoder()
    path = tmp_path / "resnet18.pth"
    torch.save(state_dict(model), path)

    report = avdiag.inspect(path).to_dict()

    assert report["layout"]["name"] == "single"
    assert report["layout"]["modalities"] == {}
    assert report["layout"]["heads"] == [] and report["layout"]["fusion"] is None
    assert list(report["modalities"]) == ["model"]
    assert {layer["modality"] for layer in report["layers"]} == {"model"}
    assert report["modalities"]["model"]["n_dead"] == planted.dead_by_modality["model"]
    assert report["modalities"]["model"]["n_bn_layers"] == 20
    assert channels_by_layer(report) == planted.dead


class _UnknownAV(nn.Module):
    """Encoders with names no layout knows (and no modality word in them)."""

    def __init__(self):
        super().__init__()
        self.enc_a = resnet18(in_channels=1, width=WIDTH)
        self.enc_b = resnet18(in_channels=3, width=WIDTH)
        self.head = nn.Linear(16 * WIDTH, N_CLASSES)


@pytest.fixture(scope="module")
def unknown_av(tmp_path_factory):
    torch.manual_seed(0)
    model = _UnknownAV()
    realistic_bn(model)
    plant_encoder(model, "enc_a", AUDIO_DEAD, AUDIO_ABNORMAL)
    plant_encoder(model, "enc_b", VISUAL_DEAD, VISUAL_ABNORMAL)
    path = tmp_path_factory.mktemp("unknown") / "model.pt"
    return save_av(model.eval(), path)


def test_unknown_layout_without_override_is_one_group(unknown_av):
    report = avdiag.inspect(unknown_av).to_dict()
    assert report["layout"]["name"] == "single"
    assert list(report["modalities"]) == ["model"]
    assert report["modalities"]["model"]["n_dead"] == sum(map(len, AUDIO_DEAD.values())) + sum(
        map(len, VISUAL_DEAD.values()))


@pytest.mark.parametrize("modality", [["audio=enc_a", "visual=enc_b"],
                                      {"audio": "enc_a.", "visual": "enc_b"}])
def test_modality_override_splits_an_unknown_layout(modality, unknown_av):
    report = avdiag.inspect(unknown_av, load=avdiag.LoadOptions(modality=modality)).to_dict()

    layout = report["layout"]
    assert (layout["name"], layout["source"]) == ("user", "user")
    assert layout["modalities"] == {"audio": "enc_a.", "visual": "enc_b."}
    assert _heads(report) == {"head": (16 * WIDTH, N_CLASSES)}
    for layer in report["layers"]:
        assert layer["modality"] == ("audio" if layer["name"].startswith("enc_a.") else "visual"), layer["name"]
    assert report["modalities"]["audio"]["n_dead"] == sum(map(len, AUDIO_DEAD.values()))
    assert report["modalities"]["visual"]["n_dead"] == sum(map(len, VISUAL_DEAD.values()))
    assert list(report["modalities"]) == ["audio", "visual"]
