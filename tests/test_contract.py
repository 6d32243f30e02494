"""The result contract, on one small checkpoint through all five commands: schema 1.1, the tool, a
checkpoint reference, ``summary`` as an object with ``text``, and no NaN / infinity anywhere (null)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avdiag.cli import main
from avdiag.models import OGMGEClassifier
from avdiag.results import SCHEMA_VERSION

DATA = "synthetic:n=8,classes=3,size=32"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An OGM-GE classifier whose first audio BN channel has gamma = 0 and beta < 0: its z is -inf and its
    scale 0, so the static scan meets non-finite values that must come out as null."""
    torch.manual_seed(0)
    model = OGMGEClassifier(3, width=4)
    state = model.state_dict()
    state["audio_net.bn1.weight"][0] = 0.0
    state["audio_net.bn1.bias"][0] = -1.0
    path = tmp_path_factory.mktemp("contract") / "ogm.pt"
    torch.save({"model": state}, path)
    return path


def _json(args: list[str], capsys, expect: tuple[int, ...] = (0,)) -> dict:
    code = main([*args, "--json", "-"])
    out, err = capsys.readouterr()
    assert code in expect, err
    return json.loads(out, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _commands(checkpoint: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(checkpoint), "--per-channel"],
        "diff": ["diff", str(checkpoint), str(checkpoint)],
        "reinit": ["reinit", str(checkpoint), "--out", str(tmp_path / "abri.pt"), "--scope", "all"],
        "conflict": ["conflict", str(checkpoint), "--data", DATA, "--batch-size", "4", "--heldout-split", "none"],
        "check": ["check", str(checkpoint)],
    }


@pytest.mark.parametrize("command", ["inspect", "diff", "reinit", "conflict", "check"])
def test_every_command_follows_the_contract(command, checkpoint, tmp_path, capsys):
    args = _commands(checkpoint, tmp_path)[command]
    doc = _json(args, capsys, expect=(0, 1) if command == "check" else (0,))  # check: 1 = violations found
    assert doc["schema_version"] == SCHEMA_VERSION == "1.1"
    assert doc["tool"]["name"] == "avdiag" and doc["tool"]["command"] == command
    assert isinstance(doc["summary"], dict) and isinstance(doc["summary"]["text"], str) and doc["summary"]["text"]
    paths = [Path(c["path"]).resolve() for c in doc["checkpoints"]]
    assert checkpoint.resolve() in paths
    assert all(set(c) == {"path", "format", "sha256"} for c in doc["checkpoints"])
    bad = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}
    assert not [s for s in _strings(doc) if s.lower() in bad]


def test_the_planted_channel_is_null_not_a_string(checkpoint, capsys):
    doc = _json(["inspect", str(checkpoint), "--per-channel"], capsys)
    layer = next(layer for layer in doc["layers"] if layer["name"] == "audio_net.bn1")
    assert layer["per_channel"]["z"][0] is None  # -inf
    assert 0 in layer["dead_channels"]
