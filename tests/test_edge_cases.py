"""Inputs that once slipped through: each asserts what the user sees."""

from __future__ import annotations

import torch
from torch import nn

from avdiag import LoadOptions, inspect
from avdiag.cli import main


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


def test_json_never_overwrites_the_input(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save(_dead_sequential(), path)
    before = path.read_bytes()
    assert main(["inspect", str(path), "--json", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_non_finite_thresholds_are_usage_errors(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save(_dead_sequential(), path)
    for option, value in (("--dead-z", "-inf"), ("--abnormal-threshold", "nan")):
        assert main(["inspect", str(path), "--json", "-", option, value]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "finite" in err


def test_names_with_markup_brackets_render(tmp_path, capsys):
    sd = {f"enc[/].bn.{k}": v for k, v in _dead_sequential().items() if k.startswith("1.")}
    path = tmp_path / "markup.pt"
    torch.save(sd, path)
    assert main(["inspect", str(path)]) == 0
    assert "enc[/].bn" in capsys.readouterr().out


def test_diff_atol(tmp_path, capsys):
    sd = _dead_sequential()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd, a)
    torch.save({k: v + 1e-7 if v.is_floating_point() else v for k, v in sd.items()}, b)
    assert main(["diff", str(a), str(b), "-q"]) == 0
    assert "0 changed" not in capsys.readouterr().out
    assert main(["diff", str(a), str(b), "-q", "--atol", "1e-6"]) == 0
    assert "0 changed" in capsys.readouterr().out
