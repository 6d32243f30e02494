#!/usr/bin/env python
"""Benchmark: ``avdiag.measure.conflict`` (and Shapley) against plain passes, a per-sample loop and
the floor of exact per-sample work.

Three comparisons (the first with a floor beside it), side by side in one run, on the built-in
OGM-GE classifier (``OGMGEClassifier(6, "concat", width=--width)``, two ResNet-18 encoders;
``--width 64`` is the real ResNet-18), one batch of ``--batch-size`` samples shaped like CREMA-D,
seeded and held on the device before any clock starts. CREMA-D's audio is a (257, 188) spectrogram
and its visual stream 224x224 RGB frames; on a 2-core CPU one round at that size takes about a
minute and a half (a warm-up and three rounds about six minutes, with a peak of ~9 GB resident), so
the DEFAULTS HALVE EVERY SPATIAL SIDE: audio ``--audio 128,94``, visual ``--image-size 112``, one
frame (``--frames``), about 2.5 minutes in all; ``--audio 257,188 --image-size 224`` is the full
size. The comparisons:

1. per-sample cosines: ``measure_conflict(parts, [batch], per_sample=True, method=--method)`` (eval
   mode; with the hooks engine its per-batch figures come from the same passes; ``--method`` picks
   the engine of :mod:`avdiag.measure.conflict.per_sample`, default ``auto``) against a LOOP of
   batch-size-1 backward passes (eval mode; per sample one forward, ``torch.autograd.grad`` of the
   fused loss for both encoders, of each uni-modal loss for its encoder, then the flattened cosines). The loop runs over
   the first ``--loop-samples`` samples and its time is scaled to the whole batch
   (every iteration is the same work; default 16 samples); their cosines must agree within 1e-4.
   Target: the loop (scaled) >= 10x the implementation.
   Beside it, ``floor_exact``: the least work ANY exact per-sample method must do, written plainly
   here: eval mode, one batched forward of the whole batch under ``torch.enable_grad()`` with
   forward hooks keeping the output of every ``Conv2d`` / ``Linear`` / ``BatchNorm`` module of both
   encoders (the encoders' ReLUs are switched out of place for the call, so that those outputs
   stay the tensors differentiated against), the fused and uni-modal losses as the loop computes
   them (summed over the batch, so each row of a feature gradient is that sample's own cotangent),
   their gradients at the pooled features, and per modality two ``torch.autograd.grad`` calls from
   the pooled feature, with the multimodal and the uni-modal cotangents, to those module outputs:
   the input-gradient half of two backward passes, no parameter gradient, no per-sample product.
   Every exact per-sample method needs at least this (the per-sample weight gradients, or their
   inner products, are built from these module-output gradients and the module inputs); what the
   loop does on top is the weight-gradient GEMMs and per-call overhead. Reported: the CEILING
   ``loop / floor_exact``, the most any exact per-sample method could gain over the loop on this
   machine (when it is below 10 the target above is out of reach for every exact method, not just
   this one), next to the achieved ``loop / conflict_per_sample``, and the SHARE
   ``floor_exact / conflict_per_sample`` (1.0: the implementation costs no more than the floor).
   These figures are informative only; they do not enter the exit status.
2. per-batch conflict: ``measure_conflict(parts, [batch], per_sample=False, train_mode=True)``
   against one plain training forward + backward (train mode, ``CE(fused).backward()``).
   Target <= 2.5x.
3. exact Shapley by feature ablation: ``avdiag.measure.contribution.shapley.shapley_batch(parts,
   batch)`` (encoders once, the fused head once on the four stacked coalitions) against one plain
   eval forward under ``torch.no_grad()``. Target <= 1.3x.

One untimed warm-up of everything, then ``--repeats`` rounds, the approaches interleaved within a
round; medians are compared. On CUDA each timing is bracketed by ``torch.cuda.synchronize()``.
BatchNorm running statistics are restored after each plain training step (untimed), so every round
sees the same model. Exit status: 0 all targets met, 1 one missed, 2 the cosines disagree.

Usage::

    .venv/bin/python benchmarks/conflict_bench.py                         # CPU defaults
    .venv/bin/python benchmarks/conflict_bench.py --audio 257,188 --image-size 224 --loop-samples 8 --json out.json
    .venv/bin/python benchmarks/conflict_bench.py --device cuda --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.measure.conflict import measure_conflict
from avdiag.measure.conflict.per_sample import ENGINES
from avdiag.measure.contribution.shapley import shapley_batch
from avdiag.models import OGMGEClassifier
from avdiag.models.parts import av_parts

N_CLASSES = 6
TARGETS = {"per_sample_speedup": 10.0, "batch_ratio": 2.5, "shapley_ratio": 1.3}
COS_TOL = 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result)."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    f, t = args.audio
    b = args.batch_size
    batch = {"audio": torch.randn(b, f, t, generator=g),
             "visual": torch.randn(b, 3, args.frames, args.image_size, args.image_size, generator=g),
             "label": torch.randint(N_CLASSES, (b,), generator=g), "index": torch.arange(b)}
    return {k: v.to(device) for k, v in batch.items()}


# ---- the straightforward references -------------------------------------------------------------


def loop_cosines(model: OGMGEClassifier, batch: dict[str, torch.Tensor], n: int) -> list[tuple[float, float]]:
    """Per-sample (cos_audio, cos_visual): batch-size-1 forward and backward passes, eval mode."""
    model.eval()
    fc = model.fusion_module.fc_out
    pa, pv = list(model.audio_net.parameters()), list(model.visual_net.parameters())
    out = []
    for i in range(n):
        a, v, fused = model(batch["audio"][i:i + 1], batch["visual"][i:i + 1])
        y = batch["label"][i:i + 1]
        d = a.shape[1]
        out_a = a @ fc.weight[:, :d].t() + fc.bias / 2
        out_v = v @ fc.weight[:, d:].t() + fc.bias / 2
        l_mm = F.cross_entropy(fused, y)
        g_mm = torch.autograd.grad(l_mm, pa + pv, retain_graph=True)
        g_a = torch.autograd.grad(F.cross_entropy(out_a, y), pa, retain_graph=True)
        g_v = torch.autograd.grad(F.cross_entropy(out_v, y), pv)
        cos = []
        for g1, g2 in ((g_mm[:len(pa)], g_a), (g_mm[len(pa):], g_v)):
            x = torch.cat([g.reshape(-1) for g in g1]).double()
            z = torch.cat([g.reshape(-1) for g in g2]).double()
            cos.append(float(x @ z / (x.norm() * z.norm())))
        out.append((cos[0], cos[1]))
    return out


def _encoder_modules(model: OGMGEClassifier) -> dict[str, list[nn.Module]]:
    """Per modality, the parameterised modules (Conv2d / Linear / BatchNorm) of its encoder."""
    kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    return {m: [mod for mod in net.modules() if isinstance(mod, kinds)]
            for m, net in (("audio", model.audio_net), ("visual", model.visual_net))}


@contextmanager
def _keep_outputs(model: OGMGEClassifier) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Forward hooks collecting every encoder module's output; the encoders' ReLUs run out of
    place meanwhile (an in-place ReLU would overwrite a kept BatchNorm output)."""
    kept: dict[str, list[torch.Tensor]] = {}
    handles = []
    relus = [r for net in (model.audio_net, model.visual_net) for r in net.modules()
             if isinstance(r, nn.ReLU) and r.inplace]
    for m, mods in _encoder_modules(model).items():
        kept[m] = []
        for mod in mods:
            handles.append(mod.register_forward_hook(lambda _mod, _inp, out, acc=kept[m]: acc.append(out)))
    for r in relus:
        r.inplace = False
    try:
        yield kept
    finally:
        for r in relus:
            r.inplace = True
        for h in handles:
            h.remove()


def floor_exact(model: OGMGEClassifier, batch: dict[str, torch.Tensor]) -> None:
    """The least work of any exact per-sample method (eval mode): one batched forward keeping the
    encoder module outputs, the loop's losses (summed: row i of a feature gradient is sample i's
    cotangent), and per modality two backward passes from the pooled feature to those outputs."""
    model.eval()
    fc = model.fusion_module.fc_out
    y = batch["label"]
    with torch.enable_grad():
        with _keep_outputs(model) as kept:
            a, v, fused = model(batch["audio"], batch["visual"])
        d = a.shape[1]
        out_a = a @ fc.weight[:, :d].t() + fc.bias / 2
        out_v = v @ fc.weight[:, d:].t() + fc.bias / 2
        cot_mm = torch.autograd.grad(F.cross_entropy(fused, y, reduction="sum"), [a, v], retain_graph=True)
        cot_uni = (torch.autograd.grad(F.cross_entropy(out_a, y, reduction="sum"), a, retain_graph=True)[0],
                   torch.autograd.grad(F.cross_entropy(out_v, y, reduction="sum"), v, retain_graph=True)[0])
        for feat, m, c1, c2 in zip((a, v), ("audio", "visual"), cot_mm, cot_uni):
            torch.autograd.grad(feat, kept[m], c1, retain_graph=True)
            torch.autograd.grad(feat, kept[m], c2)


def plain_train_step(model: OGMGEClassifier, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    _, _, logits = model(batch["audio"], batch["visual"])
    F.cross_entropy(logits, batch["label"]).backward()


def plain_forward(model: OGMGEClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch["audio"], batch["visual"])[2]


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=64, help="ResNet width (64 = ResNet-18)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--audio", type=lambda s: tuple(int(x) for x in s.split(",")), default=(128, 94),
                    help="spectrogram F,T (default 128,94: half of CREMA-D's 257,188)")
    ap.add_argument("--image-size", type=int, default=112, help="default 112: half of 224")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--loop-samples", type=int, default=16,
                    help="samples the batch-size-1 loop runs over (default 16; 0: the whole batch); its time is "
                         "scaled to the batch")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=("auto", *ENGINES), default="auto",
                    help="per-sample engine of measure_conflict (default auto: hooks where they apply)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    if min(args.batch_size, args.repeats, args.width, args.image_size, args.frames) < 1:
        ap.error("sizes and repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_loop = min(args.batch_size, args.loop_samples or args.batch_size)

    torch.manual_seed(args.seed)
    model = OGMGEClassifier(N_CLASSES, "concat", width=args.width).to(device)
    parts = av_parts(model)
    batch = make_batch(args, device)
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def restore_buffers() -> None:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])

    def run_plain_step() -> None:
        plain_train_step(model, batch)

    approaches: dict[str, Callable[[], object]] = {
        "plain_forward": lambda: plain_forward(model, batch),
        "shapley": lambda: shapley_batch(parts, batch),
        "plain_train_step": run_plain_step,
        "conflict_batch": lambda: measure_conflict(parts, [batch], device, per_sample=False, train_mode=True),
        "floor_exact": lambda: floor_exact(model, batch),
        "conflict_per_sample": lambda: measure_conflict(parts, [batch], device, per_sample=True, method=args.method),
        "loop_per_sample": lambda: loop_cosines(model, batch, n_loop),
    }
    times: dict[str, list[float]] = {k: [] for k in approaches}
    cpu_times: dict[str, list[float]] = {k: [] for k in approaches}
    max_diff = 0.0
    print(f"conflict_bench: OGMGEClassifier(6, 'concat', width={args.width}), batch {args.batch_size}, "
          f"audio {args.audio}, visual {args.frames}x{args.image_size}x{args.image_size}, device {device}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, loop over {n_loop} samples", flush=True)
    print(f"per-sample engine: {args.method}", flush=True)
    for rnd in range(args.repeats + 1):  # round 0: warm-up
        ours = loop = None
        for name, fn in approaches.items():
            dt, dc, out = timed(fn, device)
            if name == "plain_train_step":
                model.zero_grad(set_to_none=True)
                restore_buffers()
            if name == "conflict_per_sample":
                ours = out
            if name == "loop_per_sample":
                loop = out
                dt *= args.batch_size / n_loop
                dc *= args.batch_size / n_loop
            if rnd:
                times[name].append(dt)
                cpu_times[name].append(dc)
        for s, (ca, cv) in zip(ours.samples[:n_loop], loop):
            max_diff = max(max_diff, abs(s.cos_audio - ca), abs(s.cos_visual - cv))
        label = "warm-up" if rnd == 0 else f"round {rnd}"
        print(f"  {label}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if rnd and v), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}

    def ratios(m: dict[str, float]) -> dict[str, float]:
        return {"per_sample_speedup": m["loop_per_sample"] / m["conflict_per_sample"],
                "batch_ratio": m["conflict_batch"] / m["plain_train_step"],
                "shapley_ratio": m["shapley"] / m["plain_forward"],
                "per_sample_ceiling": m["loop_per_sample"] / m["floor_exact"],
                "floor_share": m["floor_exact"] / m["conflict_per_sample"]}

    figures, cpu_figures = ratios(med), ratios(cpu_med)
    ok = {"per_sample_speedup": figures["per_sample_speedup"] >= TARGETS["per_sample_speedup"],
          "batch_ratio": figures["batch_ratio"] <= TARGETS["batch_ratio"],
          "shapley_ratio": figures["shapley_ratio"] <= TARGETS["shapley_ratio"]}
    cos_ok = max_diff <= COS_TOL
    print("\nmedians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print("process CPU-time medians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in cpu_med.items()))
    print("ratios from CPU time (less sensitive to other load on the machine): "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu_figures.items()))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"per-sample cosines: loop {med['loop_per_sample']:.3f}s (scaled to {args.batch_size}) / measure_conflict "
          f"{med['conflict_per_sample']:.3f}s = {figures['per_sample_speedup']:.2f}x faster "
          f"(target >= {TARGETS['per_sample_speedup']:g}x) {'PASS' if ok['per_sample_speedup'] else 'FAIL'}")
    print(f"  exact per-sample floor: loop / floor_exact {med['floor_exact']:.3f}s = "
          f"{figures['per_sample_ceiling']:.2f}x (the CEILING for any exact method; achieved "
          f"{figures['per_sample_speedup']:.2f}x); floor_exact / measure_conflict = {figures['floor_share']:.2f} "
          f"(share of the implementation's time the floor accounts for)")
    print(f"  max |cos difference| over {n_loop} samples x 2 modalities: {max_diff:.2e} "
          f"(<= {COS_TOL:g}) {'PASS' if cos_ok else 'FAIL'}")
    print(f"per-batch conflict / plain forward+backward: {figures['batch_ratio']:.2f}x "
          f"(target <= {TARGETS['batch_ratio']:g}x) {'PASS' if ok['batch_ratio'] else 'FAIL'}")
    print(f"exact Shapley (shapley_batch) / plain forward: "
          f"{figures['shapley_ratio']:.2f}x (target <= {TARGETS['shapley_ratio']:g}x) "
          f"{'PASS' if ok['shapley_ratio'] else 'FAIL'}")
    if args.json:
        report = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                  "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "platform": platform.platform(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "loadavg": os.getloadavg(), "method": args.method, "times": times, "medians": med,
                  "cpu_times": cpu_times, "cpu_medians": cpu_med, "cpu_figures": cpu_figures,
                  "figures": figures, "targets": TARGETS, "pass": ok, "max_cos_diff": max_diff, "cos_ok": cos_ok}
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if not cos_ok:
        return 2
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
