"""Inputs that once slipped through: each asserts what the user sees."""

from __future__ import annotations

import re

import torch
from torch import nn

from avdiag import LoadOptions, inspect

DIFF_COUNTS = re.compile(r"^(\d+) changed, (\d+) added, (\d+) removed, (\d+) unchanged tensors; ")


def _dead_sequential() -> dict[str, torch.Tensor]:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].bias[:2] = -100.0
    return m.state_dict()


def test_a_tensor_next_to_the_nested_state_dict_does_not_hide_it(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": _dead_sequential(), "best_acc": torch.tensor(0.9)}, path)
    result = inspect(path, load=LoadOptions(assume_activation="relu"))
    assert result.checkpoint.unwrapped[0] == {"kind": "key", "value": "model"}
    assert [v.dead for v in result.layers] == [[0, 1]]


def test_json_never_overwrites_the_input(tmp_path, cli):
    path = tmp_path / "ckpt.pt"
    torch.save(_dead_sequential(), path)
    before = path.read_bytes()
    assert cli("inspect", path, "--json", path).error() == f"--json {path}: refusing to overwrite an input"
    assert path.read_bytes() == before


def test_non_finite_thresholds_are_usage_errors(tmp_path, cli):
    path = tmp_path / "ckpt.pt"
    torch.save(_dead_sequential(), path)
    for option, name, value in (("--dead-z", "dead_z", "-inf"), ("--abnormal-threshold", "abnormal", "nan")):
        message = cli("inspect", path, "--json", "-", option, value).error()  # stdout empty: no JSON
        assert message == f"threshold {name} must be a finite number, got {value}"


def test_names_with_markup_brackets_render(tmp_path, cli):
    sd = {f"enc[/].bn.{k}": v for k, v in _dead_sequential().items() if k.startswith("1.")}
    path = tmp_path / "markup.pt"
    torch.save(sd, path)
    out = cli("inspect", path).ok().out
    assert re.search(r"(?m)^\W*enc\[/\]\.bn\.1\s", out), out  # the layer's row: "[/]" not taken as rich markup


def _diff_counts(cli, a, b, *options: str) -> tuple[int, ...]:
    line = cli("diff", a, b, "-q", *options).ok().out
    found = DIFF_COUNTS.match(line)
    assert found, line
    return tuple(int(n) for n in found.groups())


def test_diff_atol(tmp_path, cli):
    sd = _dead_sequential()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd, a)
    torch.save({k: v + 1e-7 if v.is_floating_point() else v for k, v in sd.items()}, b)
    # (changed, added, removed, unchanged): the 6 float tensors moved by 1e-7, num_batches_tracked did not
    assert _diff_counts(cli, a, b) == (6, 0, 0, 1)
    assert _diff_counts(cli, a, b, "--atol", "1e-6") == (0, 0, 0, 7)
