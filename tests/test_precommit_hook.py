"""The pre-commit hook definition: it reuses the user's environment (never installs the CUDA torch),
runs `avdiag check` on the staged checkpoints, and its file pattern picks checkpoints only."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

from avdiag.cli import main

HOOKS = Path(__file__).resolve().parents[1] / ".pre-commit-hooks.yaml"


def hook_definition() -> dict[str, str]:
    """The one hook's scalar fields (the file is a one-item YAML list of flat keys; no YAML parser needed)."""
    fields: dict[str, str] = {}
    for line in HOOKS.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line.startswith("    "):
            continue
        key, _, value = line.lstrip("- ").partition(":")
        fields[key.strip()] = value.strip().strip("'\"")
    return fields


def test_hook_reuses_the_environment_and_installs_nothing():
    hook = hook_definition()
    assert hook["id"] == "avdiag-check"
    assert hook["language"] == "system"  # pre-commit builds no environment: no torch download at all
    assert "additional_dependencies" not in hook
    assert hook["require_serial"] == "true" and hook["pass_filenames"] == "true"


def test_hook_file_pattern_picks_checkpoints_only():
    pattern = re.compile(hook_definition()["files"])
    for name in ("model.pt", "a/b/ckpt.pth", "w.safetensors", "m.ckpt", "model.pth.tar", "x.pt2", "pytorch_model.bin",
                 "model.safetensors.index.json"):
        assert pattern.search(name), name
    for name in ("train.py", "README.md", "config.json", "notes.txt", "model.pt.py"):
        assert not pattern.search(name), name


def test_hook_entry_gates_staged_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no policy file here: the defaults apply
    good = tmp_path / "good.pt"
    torch.save({"fc.weight": torch.ones(2, 2)}, good)
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.tensor([[float("nan"), 1.0]])}, bad)
    program, *args = shlex.split(hook_definition()["entry"])
    assert program == "avdiag"
    assert main([*args, "-q", str(good)]) == 0
    assert main([*args, "-q", str(good), str(bad)]) == 1  # NaN weights: a policy violation
