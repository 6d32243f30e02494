"""At 80 columns the terminal keeps the numbers people came for: no cell of the conflict tables is
truncated to an ellipsis, and every per-modality cosine and Shapley value is printed in full."""

from __future__ import annotations

import json

import pytest
import torch

from avdiag.cli import main
from avdiag.models import OGMGEClassifier


@pytest.mark.parametrize("columns", [80, 100, 160])
def test_conflict_tables_keep_their_numbers(columns, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "ogm.pt"
    torch.save({"model": OGMGEClassifier(3, width=4).state_dict()}, path)
    monkeypatch.setenv("COLUMNS", str(columns))
    doc_path = tmp_path / "conflict.json"
    code = main(["conflict", str(path), "--data", "synthetic:n=8,classes=3,size=32", "--batch-size", "4",
                 "--heldout-split", "none", "--json", str(doc_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= columns
    doc = json.loads(doc_path.read_text())
    for m, entry in doc["modalities"].items():
        cos = f"{entry['conflict']['cos_mean']:+.4f}".replace("-0.0000", "+0.0000")
        shapley = f"{entry['contribution']['shapley_mean']['accuracy']:.3f}"
        row = next(line for line in out.splitlines() if line.startswith(f"│ {m} ") and cos in line)
        assert row
        assert any(line.startswith(f"│ {m} ") and shapley in line for line in out.splitlines())
