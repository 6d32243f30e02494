#!/usr/bin/env python
"""Benchmark: the dormant-unit measurement (``avdiag.measure.dormant``) against the plain forward.

Acceptance target: the probe with the dormant collector attached runs within 1.15x of the plain
forward over the same batches, on the built-in audio-visual transformer.

What one invocation does:

1. Builds the built-in AV transformer (``avdiag.models.arch.av_transformer.AVTransformer``, width
   ``--width``, ``--depth`` blocks per modality, 10 classes), seeded, saves its state dict and reads
   it back through ``Subject`` -> ``resolve_model``, as ``inspect --data`` does.
2. Synthesises ``--batches`` batches of ``--batch-size`` AV-digits shaped samples (spectrogram
   (129, 126), one 32x32 RGB frame), held in memory before any clock starts.
3. One untimed warm-up of each, then ``--repeats`` interleaved rounds of

       A  the plain forward: eval mode, ``torch.inference_mode()``, TF32 off as in the probe, no hooks;
       B  ``probe(resolved, [], batches, device, collectors=[DormantCollector(tau)])`` and the
          collector's ``result()``: what ``inspect --data`` runs on a model without BatchNorm.

       C  the same ``probe`` call without the collector (no BatchNorm here: the probe's fixed cost);

   Reported: the medians, their ratio B/A (the verdict), the median of the per-round ratios, and
   B/C (what the collector's hooks alone add).

Exit status: 0 the target is met, 1 it is not.

Usage::

    .venv/bin/python benchmarks/dormant_bench.py                     # CPU, 4 batches of 16, 5 repeats
    .venv/bin/python benchmarks/dormant_bench.py --width 128 --depth 4 --json dormant.json
    .venv/bin/python benchmarks/dormant_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from avdiag.measure.dormant import DormantCollector
from avdiag.measure.precision import full_fp32
from avdiag.measure.probe import probe
from avdiag.models.arch.av_transformer import AVTransformer
from avdiag.workflows.subject import Subject

TARGET = 1.15


def make_batches(n: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"audio": torch.randn(size, 129, 126, generator=g).to(device),
             "visual": torch.randn(size, 3, 1, 32, 32, generator=g).to(device),
             "label": torch.randint(0, 10, (size,), generator=g).to(device)} for _ in range(n)]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="transformer width [64]")
    parser.add_argument("--depth", type=int, default=2, help="blocks per modality [2]")
    parser.add_argument("--batches", type=int, default=4, help="batches per run [4]")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch [16]")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds [5]")
    parser.add_argument("--tau", type=float, default=0.0, help="dormant threshold [0]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "avt.pt"
        torch.save(AVTransformer(10, dim=args.width, depth=args.depth).state_dict(), path)
        resolved = Subject.open(path).model()
    resolved.to(device).eval()
    batches = make_batches(args.batches, args.batch_size, device)

    def plain() -> None:  # in the probe's precision (TF32 off), so that only the measurement differs
        with torch.inference_mode(), full_fp32(device):
            for b in batches:
                resolved(b)

    def with_dormant() -> None:
        collector = DormantCollector(args.tau)
        probe(resolved, [], batches, device, collectors=[collector])
        collector.result()

    def bare_probe() -> None:
        probe(resolved, [], batches, device)

    plain(), with_dormant(), bare_probe()  # warm-up
    rounds = [(timed(plain, device), timed(with_dormant, device), timed(bare_probe, device))
              for _ in range(args.repeats)]
    a = statistics.median(r[0] for r in rounds)
    b = statistics.median(r[1] for r in rounds)
    c = statistics.median(r[2] for r in rounds)
    figures = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "width": args.width, "depth": args.depth, "batches": args.batches, "batch_size": args.batch_size,
               "repeats": args.repeats,
               "plain_median_s": a, "dormant_median_s": b, "ratio_of_medians": b / a,
               "median_of_ratios": statistics.median(r[1] / r[0] for r in rounds),
               "bare_probe_median_s": c, "dormant_over_bare_probe": b / c, "target": TARGET,
               "met": b / a <= TARGET}
    collector = DormantCollector(args.tau)
    probe(resolved, [], batches[:1], device, collectors=[collector])
    figures["hooked_layers"] = len(collector.result().layers)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
