"""`avdiag conflict` end to end: JSON fields, per-sample table, plots, torchrun sharding."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_fixtures import write_vggsound

ROOT = Path(__file__).resolve().parents[1]


def test_conflict_on_a_vggsound_layout_reports_the_documented_fields(tmp_path, cli, av_checkpoint):
    root = write_vggsound(tmp_path / "vggsound")
    ckpt = av_checkpoint("mmpareto.pt", "mmpareto", n_classes=3).path
    samples, plots = tmp_path / "samples.csv", tmp_path / "plots"
    d = cli("conflict", ckpt, "--data", f"vggsound:{root}", "--batch-size", "2", "--image-size", "32",
            "--heldout-split", "none", "--samples", samples, "--plots", plots, "--json", "-").json()
    assert d["schema_version"] == "1.1" and d["tool"]["command"] == "conflict"
    for m in ("audio", "visual"):
        entry = d["modalities"][m]
        assert -1.0 <= entry["conflict"]["cos_mean"] <= 1.0
        assert 0.0 <= entry["conflict"]["conflict_rate"] <= 1.0
        assert entry["conflict"]["per_layer"] and all(k.startswith(f"{m}_net.") for k in entry["conflict"]["per_layer"])
        assert set(entry["contribution"]["shapley_mean"]) == {"accuracy", "probability"}
        assert 0.0 <= entry["contribution"]["unimodal_accuracy"] <= 1.0
        assert entry["ogm"]["score"] > 0
    rho = d["ogm"]["rho"]
    assert math.isclose(rho["visual"] * rho["audio"], 1.0, rel_tol=1e-9)
    assert d["contribution"]["unimodal_source"] == "heads"
    table = samples.read_text().splitlines()
    assert table[0].startswith("index,label,cos_audio,cos_visual") and len(table) == 1 + d["contribution"]["n_samples"]
    for png in ("per_sample_cosine.png", "shapley.png", "per_layer_conflict.png"):
        Image.open(plots / png).verify()


def test_one_batch_cos_mean_is_that_batch(cli, av_checkpoint):
    ckpt = av_checkpoint("mmpareto.pt", "mmpareto", n_classes=4).path
    d = cli("conflict", ckpt, "--data", "synthetic:n=6,classes=4", "--batch-size", "6", "--heldout-split", "none",
            "--json", "-").json()
    for m in ("audio", "visual"):
        c = d["modalities"][m]["conflict"]
        assert c["batches"] == 1 and c["cos_per_batch"] == [c["cos_mean"]]


def test_errors_are_one_line(tmp_path, cli, av_checkpoint):
    plain = tmp_path / "plain.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict(), plain)
    message = cli("conflict", plain, "--data", "synthetic:n=4").error()
    assert message == f"{plain}: layout 'single' matches no built-in architecture; pass --model package.module:factory"
    ckpt = av_checkpoint("mmpareto.pt", "mmpareto", n_classes=4).path
    assert cli("conflict", ckpt).error() == "avdiag conflict needs --data"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed next to this Python")
def test_torchrun_two_processes_equal_one(tmp_path, av_checkpoint):
    path = av_checkpoint("ogm.pt", "ogm-ge", n_classes=4).path
    args = ["conflict", str(path), "--data", "synthetic:n=24,classes=4", "--batch-size", "4", "--device", "cpu",
            "-q", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "avdiag", *args, str(one)], check=True, env=env, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "avdiag", *args, str(two)],
                   check=True, env=env, capture_output=True, timeout=300)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for m in ("audio", "visual"):
        ca, cb = a["modalities"][m]["conflict"], b["modalities"][m]["conflict"]
        assert ca["cos_per_batch"] == pytest.approx(cb["cos_per_batch"], abs=1e-6)
        assert ca["sample_cos_mean"] == pytest.approx(cb["sample_cos_mean"], abs=1e-6)
        sa, sb = a["modalities"][m]["contribution"], b["modalities"][m]["contribution"]
        assert sa["shapley_mean"]["probability"] == pytest.approx(sb["shapley_mean"]["probability"], abs=1e-6)
        assert sa["unimodal_accuracy"] == sb["unimodal_accuracy"]
    assert a["ogm"]["rho"]["visual"] == pytest.approx(b["ogm"]["rho"]["visual"], abs=1e-6)


def test_conflict_report_section_has_its_charts(cli, av_checkpoint):
    import base64
    import io
    import re

    from avdiag.report.document import build_document
    from avdiag.report.html import render_html

    ckpt = av_checkpoint("mmpareto.pt", "mmpareto", n_classes=4).path
    doc = cli("conflict", ckpt, "--data", "synthetic:n=8,classes=4", "--batch-size", "4", "--heldout-split", "none",
              "--json", "-").json()
    page = render_html(build_document([doc]))
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert "Gradient conflict per layer" in page and "Contribution per modality" in page and len(images) == 2
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


def test_memory_budget_and_sketch_options_reach_the_json(cli, av_checkpoint):
    ckpt = av_checkpoint("mmpareto.pt", "mmpareto", n_classes=4).path
    base = ("conflict", ckpt, "--data", "synthetic:n=6,classes=4", "--batch-size", "3", "--heldout-split", "none")
    exact = cli(*base, "--max-memory", "64M", "--json", "-").json()
    assert exact["options"]["max_memory"] == 64 * 2**20 and exact["conflict"]["engine"]["memory_budget"] == 64 * 2**20
    assert exact["conflict"]["per_sample_exact"] is True and exact["options"]["sketch"] is None
    sketched = cli(*base, "--sketch", "16", "--json", "-").json()
    assert sketched["conflict"]["per_sample_exact"] is False and sketched["options"]["sketch"] == 16
    assert "approximate (sketch 16 per layer" in sketched["summary"]["text"]
    assert cli(*base, "--max-memory", "a lot").error() == "--max-memory: expected a size such as 2G or 512M, got 'a lot'"
    assert cli(*base, "--sketch", "0").error().startswith("--sketch: expected a positive number")
