"""At 80 columns the terminal keeps the numbers people came for: no cell of the conflict tables is
truncated to an ellipsis, and every per-modality cosine and Shapley value is printed in full."""

from __future__ import annotations

import json
import re

import pytest


def _number(value: str) -> re.Pattern:
    """``value`` as a whole number in a line: not the start of a longer one, not the end of one."""
    return re.compile(rf"(?<![\d.]){re.escape(value)}(?![\d])")


@pytest.mark.parametrize("columns", [80, 100, 160])
def test_conflict_tables_keep_their_numbers(columns, tmp_path, cli, av_checkpoint, monkeypatch):
    path = av_checkpoint("ogm.pt", "ogm-ge", n_classes=3, width=4, prefix="").path
    monkeypatch.setenv("COLUMNS", str(columns))
    doc_path = tmp_path / "conflict.json"
    out = cli("conflict", path, "--data", "synthetic:n=8,classes=3,size=32", "--batch-size", "4",
              "--heldout-split", "none", "--json", doc_path).ok().out
    lines = out.splitlines()
    assert "…" not in out
    assert max(len(line) for line in lines) <= columns
    doc = json.loads(doc_path.read_text())
    for m, entry in doc["modalities"].items():
        cos = _number(f"{entry['conflict']['cos_mean']:+.4f}".replace("-0.0000", "+0.0000"))
        shapley = _number(f"{entry['contribution']['shapley_mean']['accuracy']:.3f}")
        rows = [line for line in lines if line.startswith(f"│ {m} ")]
        assert any(cos.search(row) for row in rows), (m, cos.pattern, rows)
        assert any(shapley.search(row) for row in rows), (m, shapley.pattern, rows)
