"""Every command's terminal output at 80 and 100 columns keeps its key numbers in full: no ellipsis, no
line wider than the console, no negative zero, and the figures of the JSON printed next to their row."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ogm_ge_planted.pt"
DATA = "synthetic:n=16,classes=6"


def _row(out: str, label: str, *cells: str) -> str:
    """The table row that starts with ``label`` and holds every cell as a whole token."""
    for line in out.splitlines():
        text = line.strip("│ ")
        if text.startswith(label + " ") and all(re.search(rf"(?<![\w./-]){re.escape(c)}(?![\w./])", line)
                                                 for c in cells):
            return line
    raise AssertionError(f"no row {label!r} with {cells} in:\n{out}")


def _readable(out: str, columns: int | None) -> None:
    """``columns`` None: lines soft-wrap (check keeps a violation on one line for grep in CI logs)."""
    assert "…" not in out
    if columns is not None:
        assert max(len(line) for line in out.splitlines()) <= columns
    assert not re.search(r"(?<![\w.])-0\.0+(?![\d])", out), "negative zero printed"


@pytest.fixture
def example(tmp_path) -> Path:
    path = tmp_path / "ogm.pt"
    shutil.copy(EXAMPLE, path)
    return path


@pytest.mark.parametrize("columns", [80, 100])
def test_inspect_shows_every_layer_with_dead_channels(columns, example, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    doc = cli("inspect", example, "--json", "-").json()
    out = cli("inspect", example, "--data", DATA, "--batch-size", "8").ok().out
    probed = cli("inspect", example, "--data", DATA, "--batch-size", "8", "--json", "-").json()
    _readable(out, columns)
    prefixes = {m: (p or "") for m, p in doc["layout"]["modalities"].items()}
    measured = {layer["name"]: layer for layer in probed["layers"]}
    for layer in doc["layers"]:
        if layer["dead_channels"]:
            short = layer["name"].removeprefix(prefixes.get(layer["modality"], ""))
            _row(out, short, f"{len(layer['dead_channels'])}/{layer['channels']}",
                 f"{len(measured[layer['name']]['measured_dead_channels'])}/{layer['channels']}")
    assert out.rstrip().splitlines()[-1] == doc["summary"]["text"] or doc["summary"]["text"] in out.replace("\n", " ")


@pytest.mark.parametrize("columns", [80, 100])
def test_diff_and_reinit_show_what_changed(columns, example, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    fixed = tmp_path / "fixed.pt"
    rewrite = cli("reinit", example, "--out", fixed, "--json", "-").json()
    reinit_out = cli("reinit", example, "--out", tmp_path / "again.pt").ok().out
    _readable(reinit_out, columns)
    for m, n in rewrite["dead_before"].items():
        assert f"{m}: dead channels {n} -> {rewrite['dead_after'][m]}" in reinit_out
    assert "outputs moved: max |change|" in reinit_out

    doc = cli("diff", example, fixed, "--json", "-").json()
    out = cli("diff", example, fixed).ok().out
    _readable(out, columns)
    for m, entry in doc["modalities"].items():
        _row(out, m, f"{entry['n_dead_before']} -> {entry['n_dead_after']}")
    for layer in doc["bn_layers"]:
        if layer["revived"]:
            _row(out, layer["name"], str(len(layer["revived"])))


@pytest.mark.parametrize("columns", [80, 100])
def test_check_names_the_file_and_its_verdict(columns, example, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.chdir(tmp_path)
    run = cli("check", example)
    _readable(run.out, None)
    doc = cli("check", example, "--json", "-").json()
    assert run.out.rstrip().splitlines()[-1] == doc["summary"]["text"]
    inspection = doc["files"][0]["inspection"]["text"]
    assert re.search(rf"^(PASS|FAIL|ERROR)\s+\S*ogm\.pt\s+{re.escape(inspection)}$", run.out, re.M)
