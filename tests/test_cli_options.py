"""The thin CLI: every data option on every command that takes data, --debug as a real option, the
one output path refusing inputs, and the usage errors of the shared options."""

from __future__ import annotations

import re

import pytest

from avdiag.cli.options import DATA_PARAMETERS
from helpers.checkpoints import write_av_checkpoint

DATA_COMMANDS = ("inspect", "reinit", "conflict", "check")


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ogm.pt"
    return write_av_checkpoint(path, "ogm-ge", n_classes=3, width=4, prefix="").path


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_option_on_every_data_command(command, cli):
    flags = _flags(cli(command, "--help").ok().out)
    expected = {"--" + name.replace("_", "-") for name in DATA_PARAMETERS}
    assert expected <= flags, sorted(expected - flags)
    assert {"--amp", "--visual-layout", "--debug"} <= flags


def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path, cli):
    missing = tmp_path / "missing.pt"
    for argv in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        run = cli(*argv)
        assert run.code == 2 and run.out == "", run
        assert run.err.startswith("Traceback (most recent call last)"), run
        assert run.err.rstrip().splitlines()[-1] == f"avdiag: error: {missing}: no such file or directory"
    assert cli("inspect", missing).error() == f"{missing}: no such file or directory"  # no traceback without --debug


@pytest.mark.parametrize("args, message", [
    (["--visual-layout", "BTCHW", "--data", "synthetic"],
     "--visual-layout is for a --model factory (built-in models take (B,3,T,H,W))"),
    (["--visual-layout", "BTCHW"], "--visual-layout is used with --data (the model is only run on data)"),
    (["--model", "pkg:factory"], "--model pkg:factory: cannot import (No module named 'pkg'); the module must be "
                                 "importable from the current folder or PYTHONPATH"),
    (["--data", "synthetic", "--device", "mps"], "--device 'mps': avdiag runs on cpu or cuda[:N]"),
    (["--data", "synthetic", "--mean", "a,b"], "--mean wants comma-separated numbers, got 'a,b'"),
])
def test_shared_option_errors_are_one_line(args, message, checkpoint, cli):
    assert cli("inspect", checkpoint, *args).error() == message


def test_a_cuda_device_that_is_not_there(checkpoint, cli):
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    message = cli("inspect", checkpoint, "--data", "synthetic", "--device", "cuda:7").error()
    assert message.startswith("--device cuda"), message


@pytest.mark.parametrize("command", ["inspect", "diff", "check"])
def test_no_output_is_written_onto_an_input(command, checkpoint, cli):
    before = checkpoint.read_bytes()
    args = {"inspect": ["inspect", checkpoint], "diff": ["diff", checkpoint, checkpoint],
            "check": ["check", checkpoint]}[command]
    for option in ("--json", "--report"):
        assert cli(*args, option, checkpoint).error() == f"{option} {checkpoint}: refusing to overwrite an input"
    assert checkpoint.read_bytes() == before


def test_check_junit_and_sarif_never_overwrite_an_input(checkpoint, cli):
    before = checkpoint.read_bytes()
    for option in ("--junit", "--sarif"):
        assert cli("check", checkpoint, option, checkpoint).error() == \
            f"{option} {checkpoint}: refusing to overwrite an input"
    assert checkpoint.read_bytes() == before


def test_reinit_warns_about_flags_of_another_method(checkpoint, tmp_path, cli):
    out = tmp_path / "reset.pt"
    run = cli("reinit", checkpoint, "--method", "reset", "--scope", "layers", "--lam", "2", "-o", out, "-q").ok()
    assert run.err.splitlines() == ["avdiag: warning: --scope does not apply to --method reset (ignored)",
                                    "avdiag: warning: --lam does not apply to --method reset (ignored)"]
    assert cli("reinit", checkpoint, "--method", "abri", "--scope", "all", "-o", out, "-q").ok().err == ""


@pytest.mark.parametrize("command", ["inspect", "diff", "reinit"])
def test_quiet_is_one_line_at_any_width(command, checkpoint, tmp_path, cli, monkeypatch):
    """--quiet promises one line for scripts (``avdiag diff a b -q | grep``), however narrow the terminal."""
    monkeypatch.setenv("COLUMNS", "40")
    args = {"inspect": ["inspect", checkpoint], "diff": ["diff", checkpoint, checkpoint],
            "reinit": ["reinit", checkpoint, "-o", tmp_path / "out.pt"]}[command]
    lines = cli(*args, "-q").ok().out.splitlines()
    assert len(lines) == 1, lines


@pytest.mark.parametrize("command", [("inspect",), ("diff",), ("reinit",), ("conflict",), ("check",), ("report",),
                                     ("data", "build")])
def test_help_shows_no_python_types(command, cli, monkeypatch):
    """Usage lines and argument rows name arguments plainly: no ``{CHECKPOINT}``, no ``<list[str]>``."""
    monkeypatch.setenv("COLUMNS", "100")
    text = cli(*command, "--help").ok().out
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: avdiag {' '.join(command)} [OPTIONS]") and "{" not in usage, usage
    assert not re.search(r"list\[|<str>\.\.\.|NoneType|Optional", text), text
