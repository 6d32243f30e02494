#!/usr/bin/env python
"""Benchmark: how many operators the per-batch passes dispatch, against the plain passes they are
measured against (issue 14's GPU figures: per-batch conflict <= 2.5x one training step, exact
Shapley <= 1.3x one forward).

On a GPU a small model's pass is launch-bound: its time is about the number of kernels it launches,
not their arithmetic (the H200 run of conflict_bench measured per-batch conflict at 5.0x-5.3x the
training step while the CPU gave 1.7x). This script counts, with ``torch.profiler``, the operators
each pass dispatches (views and allocations left out: what remains launches kernels), and times the
passes on a tiny model, where the CPU is host-bound much as a GPU is launch-bound. Side by side, in
one process:

* ``plain_forward`` (eval, no grad) and ``shapley`` (``shapley_batch``: encoders once, the head on
  the four coalitions);
* ``train_step`` (forward + backward) and ``conflict_batch`` (per-batch MMPareto conflict, train
  mode) with the per-tensor products taken in one batched float64 pass (the GPU's default) and
  ``conflict_batch_per_tensor`` (each parameter tensor on its own, the large-tensor CPU default).

Prints medians (the approaches interleaved round by round) and the ratios; ``--json`` writes them. Exit 0.

Usage::

    .venv/bin/python benchmarks/launch_bench.py                   # CPU, width 4, seconds
    .venv/bin/python benchmarks/launch_bench.py --device cuda --width 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from avdiag.measure.conflict import gradients, measure_conflict
from avdiag.measure.contribution.shapley import shapley_batch
from avdiag.models import OGMGEClassifier
from avdiag.models.parts import av_parts

# operators that only reshape, alias, allocate or read a scalar: no kernel of their own
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::as_strided",
    "aten::as_strided_", "aten::resize_", "aten::detach", "aten::detach_", "aten::resolve_conj",
    "aten::resolve_neg", "aten::_has_compatible_shallow_copy_type", "aten::to", "aten::_to_copy",
    "aten::_local_scalar_dense", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::t",
    "aten::transpose", "aten::permute", "aten::reshape", "aten::_unsafe_view", "aten::alias", "aten::slice",
    "aten::select", "aten::lift_fresh", "aten::item", "aten::unbind", "aten::split", "aten::narrow",
}


def plain_forward(model: OGMGEClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch["audio"], batch["visual"])[2]


def train_step(model: OGMGEClassifier, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch["audio"], batch["visual"])[2], batch["label"]).backward()


def with_products(mode: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        saved, gradients.PRODUCTS = gradients.PRODUCTS, mode
        try:
            return fn()
        finally:
            gradients.PRODUCTS = saved

    return run


def kernel_ops(fn: Callable[[], object]) -> int:
    """Operators ``fn`` dispatches that launch work: the innermost aten calls that are not views,
    allocations or scalar reads (a convolution counts once, not with the calls it makes)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def launches(event) -> bool:
        return event.name.startswith("aten::") and event.name not in NO_KERNEL

    def has_launching_child(event) -> bool:
        return any(launches(c) or has_launching_child(c) for c in event.cpu_children)

    return sum(1 for e in prof.events() if launches(e) and not has_launching_child(e))


def median_ms(approaches: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds of each approach, the approaches interleaved round by round (load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in approaches}
    for _ in range(repeats):
        for name, fn in approaches.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=4, help="ResNet width (64 = ResNet-18; default 4)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--audio", default="32,24", help="spectrogram F,T")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = OGMGEClassifier(6, "concat", width=args.width).to(device)
    parts = av_parts(model)
    f, t = (int(x) for x in args.audio.split(","))
    b = args.batch_size
    batch = {"audio": torch.randn(b, f, t, device=device), "label": torch.randint(0, 6, (b,), device=device),
             "visual": torch.randn(b, 3, 1, args.image_size, args.image_size, device=device),
             "index": torch.arange(b, device=device)}

    def conflict() -> object:
        return measure_conflict(parts, [batch], device, per_sample=False, train_mode=True)

    approaches: dict[str, Callable[[], object]] = {
        "plain_forward": lambda: plain_forward(model, batch),
        "shapley": lambda: shapley_batch(parts, batch),
        "train_step": lambda: train_step(model, batch),
        "conflict_batch": with_products("batched", conflict),
        "conflict_batch_per_tensor": with_products("per-tensor", conflict),
    }
    for fn in approaches.values():
        fn()  # warm-up
    ops = {name: kernel_ops(fn) for name, fn in approaches.items()}
    ms = median_ms(approaches, device, args.repeats)
    ratios = {
        "shapley_vs_forward": {"ops": ops["shapley"] / ops["plain_forward"],
                               "time": ms["shapley"] / ms["plain_forward"]},
        "conflict_vs_train_step": {"ops": ops["conflict_batch"] / ops["train_step"],
                                   "time": ms["conflict_batch"] / ms["train_step"]},
        "conflict_per_tensor_vs_train_step": {"ops": ops["conflict_batch_per_tensor"] / ops["train_step"],
                                              "time": ms["conflict_batch_per_tensor"] / ms["train_step"]},
    }
    print(f"launch_bench: {device}, width {args.width}, batch {b}, audio {f}x{t}, image {args.image_size}, "
          f"{args.repeats} interleaved rounds, torch {torch.__version__}")
    for name in approaches:
        print(f"  {name:27s} {ops[name]:6d} ops  {ms[name]:8.2f} ms (median)")
    for name, r in ratios.items():
        print(f"  {name:35s} ops {r['ops']:.2f}x  time {r['time']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "config": {k: str(v) for k, v in vars(args).items()},
                                         "ops": ops, "median_ms": ms, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
