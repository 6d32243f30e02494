"""The thin CLI: every data option on every command that takes data, --debug as a real option, the
one output path refusing inputs, and the usage errors of the shared options."""

from __future__ import annotations

import re

import pytest
import torch

from avdiag.cli import main
from avdiag.cli.options import DATA_PARAMETERS
from avdiag.models import OGMGEClassifier

DATA_COMMANDS = ("inspect", "reinit", "conflict", "check")


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "ogm.pt"
    torch.save({"model": OGMGEClassifier(3, width=4).state_dict()}, path)
    return path


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_option_on_every_data_command(command, capsys):
    assert main([command, "--help"]) == 0
    flags = _flags(capsys.readouterr().out)
    expected = {"--" + name.replace("_", "-") for name in DATA_PARAMETERS}
    assert expected <= flags, sorted(expected - flags)
    assert {"--amp", "--visual-layout", "--debug"} <= flags


def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    for argv in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.rstrip().splitlines()[-1].startswith("avdiag: error: ")
    assert main(["inspect", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("avdiag: error: ") and "missing.pt" in err


@pytest.mark.parametrize("args, message", [
    (["--visual-layout", "BTCHW", "--data", "synthetic"], "--visual-layout is for a --model factory"),
    (["--visual-layout", "BTCHW"], "--visual-layout is used with --data"),
    (["--model", "pkg:factory"], "--model is used with --data"),
    (["--data", "synthetic", "--device", "mps"], "--device 'mps': avdiag runs on cpu or cuda[:N]"),
    (["--data", "synthetic", "--device", "cuda:7"], "--device cuda"),
    (["--data", "synthetic", "--mean", "a,b"], "--mean wants comma-separated numbers"),
])
def test_shared_option_errors_are_one_line(args, message, checkpoint, capsys):
    assert main(["inspect", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("avdiag: error: ") and message in err, err


@pytest.mark.parametrize("command", ["inspect", "diff", "check"])
def test_no_output_is_written_onto_an_input(command, checkpoint, capsys):
    before = checkpoint.read_bytes()
    args = {"inspect": ["inspect", str(checkpoint)], "diff": ["diff", str(checkpoint), str(checkpoint)],
            "check": ["check", str(checkpoint)]}[command]
    for option in ("--json", "--report"):
        assert main([*args, option, str(checkpoint)]) == 2
        err = capsys.readouterr().err
        assert f"{option} {checkpoint}: refusing to overwrite an input" in err
    assert checkpoint.read_bytes() == before


def test_check_junit_and_sarif_never_overwrite_an_input(checkpoint, capsys):
    before = checkpoint.read_bytes()
    for option in ("--junit", "--sarif"):
        assert main(["check", str(checkpoint), option, str(checkpoint)]) == 2
        assert "refusing to overwrite an input" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


def test_reinit_warns_about_flags_of_another_method(checkpoint, tmp_path, capsys):
    out = tmp_path / "reset.pt"
    assert main(["reinit", str(checkpoint), "--method", "reset", "--scope", "layers", "--lam", "2", "-o", str(out),
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert "avdiag: warning: --scope does not apply to --method reset (ignored)" in err
    assert "avdiag: warning: --lam does not apply to --method reset (ignored)" in err
    assert main(["reinit", str(checkpoint), "--method", "abri", "--scope", "all", "-o", str(out), "-q"]) == 0
    assert "does not apply" not in capsys.readouterr().err
