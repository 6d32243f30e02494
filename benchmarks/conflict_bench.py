#!/usr/bin/env python
"""Benchmark: ``avdiag.measure.conflict`` (and Shapley) against plain passes, a per-sample loop and
the floor of exact per-sample work, with the peak resident memory of the per-sample run.

Three comparisons (the first with a floor beside it), side by side in one run, on the built-in
OGM-GE classifier (``OGMGEClassifier(6, "concat", width=--width)``, two ResNet-18 encoders;
``--width 64`` is the real ResNet-18), one batch of ``--batch-size`` samples, seeded and held on the
device before any clock starts. Three shapes (``--preset``):

* ``half`` (the default): every spatial side of CREMA-D halved, audio 128x94, one 112 px frame,
  batch 64;
* ``full``: CREMA-D, audio (257, 188) spectrogram, one 224x224 RGB frame, batch 64;
* ``vggsound``: audio 129x626, three 224 px frames, batch 32.

``--audio``, ``--image-size``, ``--frames`` and ``--batch-size`` override a preset. The comparisons:

1. per-sample cosines: ``measure_conflict(parts, [batch], per_sample=True, method=--method)`` (eval
   mode, chunked under ``--max-memory``; with the hooks engine its per-batch figures come from the
   same passes) against a LOOP of batch-size-1 backward passes (eval mode; per sample one forward,
   ``torch.autograd.grad`` of the fused loss for both encoders, of each uni-modal loss for its
   encoder, then the flattened cosines). The loop runs over the first ``--loop-samples`` samples and
   its time is scaled to the whole batch (every iteration is the same work; default 16 samples);
   their cosines must agree within 1e-4. Target: the loop (scaled) >= 3x the implementation at
   half size, >= 1.3x at 224 px (``--target-speedup`` overrides).
   The engine picks a method per layer by timing the candidates on its first chunk and remembers
   the choice for the process (like ``cudnn.benchmark``): the warm-up round pays for the trials,
   and its time is reported apart (``first call``).
   Beside it, ``floor_exact``: eval mode, one batched forward of the whole batch keeping the output
   of every ``Conv2d`` / ``Linear`` / ``BatchNorm`` module of both encoders (the encoders' ReLUs
   switched out of place for the call), the loop's losses (summed over the batch, so each row of a
   feature gradient is that sample's own cotangent), their gradients at the pooled features, and
   per modality two ``torch.autograd.grad`` calls from the pooled feature to those module outputs:
   the input-gradient half of two backward passes, no parameter gradient, no per-sample product.
   Every exact per-sample method needs at least this; the loop adds the weight-gradient GEMMs and
   per-call overhead. Reported: the CEILING ``loop / floor_exact`` (an upper bound on the speed-up
   of any exact per-sample method on this machine), the achieved ``loop / conflict_per_sample``,
   and the SHARE ``floor_exact / conflict_per_sample``. An exact method that also gives the
   per-batch figures must form the weight gradients of both losses as well (the loop's GEMMs,
   batched), so it sits well above the floor.
   With ``--sketch DIM``, ``conflict_sketch`` (approximate per-sample cosines from a random
   projection of DIM numbers per layer) is timed beside it, with its largest cosine difference
   from the exact engine over the batch.
2. per-batch conflict: ``measure_conflict(parts, [batch], per_sample=False, train_mode=True)``
   against one plain training forward + backward (train mode, ``CE(fused).backward()``).
   Target <= 2.5x.
3. exact Shapley by feature ablation: ``avdiag.measure.contribution.shapley.shapley_batch(parts,
   batch)`` (encoders once, the fused head once on the four stacked coalitions) against one plain
   eval forward under ``torch.no_grad()``. Target <= 1.3x.

Memory: before the timings, a fresh Python process builds the same model and batch and runs the
per-sample measure once (trials included); its peak resident memory (``VmHWM``) is reported,
with its resident memory before the call. Target <= 3 GB (``--target-rss-gb``).

One untimed warm-up of everything, then ``--repeats`` rounds, the approaches interleaved within a
round; medians are compared, of wall time and of process CPU time (less sensitive to other load;
the load average is printed at the start and the end). On CUDA each timing is bracketed by
``torch.cuda.synchronize()`` and memory is the peak allocated on the device. BatchNorm running
statistics are restored after each plain training step (untimed), so every round sees the same
model. Exit status: 0 all targets met, 1 one missed, 2 the cosines disagree.

Usage::

    .venv/bin/python benchmarks/conflict_bench.py                                  # half size, CPU
    .venv/bin/python benchmarks/conflict_bench.py --preset full --loop-samples 8 --json full.json
    .venv/bin/python benchmarks/conflict_bench.py --preset vggsound --repeats 1 --loop-samples 4
    .venv/bin/python benchmarks/conflict_bench.py --device cuda --amp --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.measure.conflict import DEFAULT_MAX_MEMORY, measure_conflict, parse_memory
from avdiag.measure.conflict.per_sample import ENGINES
from avdiag.measure.contribution.shapley import shapley_batch
from avdiag.models import OGMGEClassifier
from avdiag.models.parts import av_parts

N_CLASSES = 6
TARGETS = {"batch_ratio": 2.5, "shapley_ratio": 1.3}
SPEEDUP_TARGET = {"half": 3.0, "full": 1.3}  # loop / per-sample: below 224 px, and at 224 px
RSS_TARGET_GB = 3.0
COS_TOL, COS_TOL_AMP = 1e-4, 1e-2
PRESETS = {"half": {"audio": (128, 94), "image_size": 112, "frames": 1, "batch_size": 64},
           "full": {"audio": (257, 188), "image_size": 224, "frames": 1, "batch_size": 64},
           "vggsound": {"audio": (129, 626), "image_size": 224, "frames": 3, "batch_size": 32}}


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


# ---- memory -------------------------------------------------------------------------------------


def resident_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB (``/proc/self/status``; the peak from
    ``getrusage`` where that file is missing)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return math.nan, peak


def rss_probe(args: argparse.Namespace) -> dict[str, float]:
    """In THIS process (started for it): build the model and batch, run the per-sample measure once,
    and report resident memory before and the peak after (device memory on CUDA)."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = OGMGEClassifier(N_CLASSES, "concat", width=args.width).to(device)
    batch = make_batch(args, device)
    before, _ = resident_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = measure_conflict(av_parts(model), [batch], device, per_sample=True, method=args.method,
                              memory_bytes=args.max_memory, sketch=args.sketch, amp=args.amp)
    seconds = time.perf_counter() - start
    _, peak = resident_mib()
    out = {"rss_before_mib": before, "rss_peak_mib": peak, "first_call_s": seconds,
           "chunk_size": result.engine.chunk_size, "per_sample_bytes": result.engine.per_sample_bytes}
    if device.type == "cuda":
        out["device_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_rss_probe(argv: list[str]) -> dict[str, float]:
    """Run :func:`rss_probe` in a fresh process with the same options."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--rss-probe"], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=64, help="ResNet width (64 = ResNet-18)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="half",
                    help="input shapes: half (default; half of CREMA-D), full (CREMA-D), vggsound")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--audio", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="spectrogram F,T (default: the preset's)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--loop-samples", type=int, default=16,
                    help="samples the batch-size-1 loop runs over (default 16; 0: the whole batch); its time is "
                         "scaled to the batch")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=("auto", *ENGINES), default="auto",
                    help="per-sample engine of measure_conflict (default auto: hooks where they apply)")
    ap.add_argument("--max-memory", type=parse_memory, default=DEFAULT_MAX_MEMORY,
                    help="memory budget of the per-sample measure (default 2G)")
    ap.add_argument("--sketch", type=int, default=None, help="also time the approximate mode with DIM per layer")
    ap.add_argument("--amp", action="store_true", help="autocast (CUDA only)")
    ap.add_argument("--target-speedup", type=float, default=None,
                    help="loop / per-sample target (default 3 below 224 px, 1.3 at 224 px)")
    ap.add_argument("--target-rss-gb", type=float, default=RSS_TARGET_GB)
    ap.add_argument("--no-rss", action="store_true", help="skip the memory probe")
    ap.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch_size, args.repeats, args.width, args.image_size, args.frames) < 1:
        ap.error("sizes and repeats must be positive")
    if args.target_speedup is None:
        args.target_speedup = SPEEDUP_TARGET["half" if args.image_size < 224 else "full"]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        print(json.dumps(rss_probe(args)))
        return 0
    device = torch.device(args.device)
    n_loop = min(args.batch_size, args.loop_samples or args.batch_size)
    load_start = os.getloadavg()
    memory = None if args.no_rss else run_rss_probe(_without_json(argv))

    torch.manual_seed(args.seed)
    model = OGMGEClassifier(N_CLASSES, "concat", width=args.width).to(device)
    parts = av_parts(model)
    batch = make_batch(args, device)
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def restore_buffers() -> None:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])

    def per_sample(sketch: int | None = None):
        return measure_conflict(parts, [batch], device, per_sample=True, method=args.method,
                                memory_bytes=args.max_memory, sketch=sketch, amp=args.amp)

    approaches: dict[str, Callable[[], object]] = {
        "plain_forward": lambda: plain_forward(model, batch),
        "shapley": lambda: shapley_batch(parts, batch),
        "plain_train_step": lambda: plain_train_step(model, batch),
        "conflict_batch": lambda: measure_conflict(parts, [batch], device, per_sample=False, train_mode=True),
        "floor_exact": lambda: floor_exact(model, batch),
        "conflict_per_sample": per_sample,
        "loop_per_sample": lambda: loop_cosines(model, batch, n_loop),
    }
    if args.sketch:
        approaches["conflict_sketch"] = lambda: per_sample(args.sketch)
    times: dict[str, list[float]] = {k: [] for k in approaches}
    cpu_times: dict[str, list[float]] = {k: [] for k in approaches}
    first_call: dict[str, float] = {}
    max_diff = sketch_diff = 0.0
    print(f"conflict_bench: OGMGEClassifier(6, 'concat', width={args.width}), batch {args.batch_size}, "
          f"audio {args.audio}, visual {args.frames}x{args.image_size}x{args.image_size}, device {device}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, loop over {n_loop} samples, "
          f"max memory {args.max_memory / 2**30:.2f} GiB", flush=True)
    print(f"per-sample engine: {args.method}; load average at the start: "
          f"{' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
    engine = None
    for rnd in range(args.repeats + 1):  # round 0: warm-up
        outs = {}
        for name, fn in approaches.items():
            dt, dc, outs[name] = timed(fn, device)
            if name == "plain_train_step":
                model.zero_grad(set_to_none=True)
                restore_buffers()
            if name == "loop_per_sample":
                dt *= args.batch_size / n_loop
                dc *= args.batch_size / n_loop
            if rnd:
                times[name].append(dt)
                cpu_times[name].append(dc)
            else:
                first_call[name] = dt
        ours, loop = outs["conflict_per_sample"], outs["loop_per_sample"]
        engine = ours.engine
        for s, (ca, cv) in zip(ours.samples[:n_loop], loop):
            max_diff = max(max_diff, abs(s.cos_audio - ca), abs(s.cos_visual - cv))
        if args.sketch:
            for a, b in zip(outs["conflict_sketch"].samples, ours.samples):
                sketch_diff = max(sketch_diff, abs(a.cos_audio - b.cos_audio), abs(a.cos_visual - b.cos_visual))
        label = "warm-up" if rnd == 0 else f"round {rnd}"
        shown = times if rnd else {k: [v] for k, v in first_call.items()}
        print(f"  {label}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in shown.items()), flush=True)
    return report(args, device, times, cpu_times, first_call, max_diff, sketch_diff, memory, engine, load_start)


def _without_json(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def ratios(m: dict[str, float]) -> dict[str, float]:
    out = {"per_sample_speedup": m["loop_per_sample"] / m["conflict_per_sample"],
           "batch_ratio": m["conflict_batch"] / m["plain_train_step"],
           "shapley_ratio": m["shapley"] / m["plain_forward"],
           "per_sample_ceiling": m["loop_per_sample"] / m["floor_exact"],
           "floor_share": m["floor_exact"] / m["conflict_per_sample"]}
    if "conflict_sketch" in m:
        out["sketch_speedup"] = m["loop_per_sample"] / m["conflict_sketch"]
    return out


def report(args, device, times, cpu_times, first_call, max_diff, sketch_diff, memory, engine, load_start) -> int:
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    figures, cpu_figures = ratios(med), ratios(cpu_med)
    ok = {"per_sample_speedup": figures["per_sample_speedup"] >= args.target_speedup,
          "batch_ratio": figures["batch_ratio"] <= TARGETS["batch_ratio"],
          "shapley_ratio": figures["shapley_ratio"] <= TARGETS["shapley_ratio"]}
    if memory is not None and device.type == "cpu":
        ok["rss"] = memory["rss_peak_mib"] <= args.target_rss_gb * 1000**3 / 2**20
    tol = COS_TOL_AMP if args.amp else COS_TOL
    cos_ok = max_diff <= tol
    verdict = lambda key: "PASS" if ok[key] else "FAIL"  # noqa: E731
    print("\nmedians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print("process CPU-time medians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in cpu_med.items()))
    print("ratios from CPU time (less sensitive to other load on the machine): "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu_figures.items()))
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in load_start)}; at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"per-sample cosines: loop {med['loop_per_sample']:.3f}s (scaled to {args.batch_size}) / measure_conflict "
          f"{med['conflict_per_sample']:.3f}s = {figures['per_sample_speedup']:.2f}x faster "
          f"(target >= {args.target_speedup:g}x) {verdict('per_sample_speedup')}")
    print(f"  first call (layer trials included): {first_call['conflict_per_sample']:.3f}s; chunk "
          f"{engine.chunk_size} samples, {engine.per_sample_bytes / 2**20:.1f} MiB measured per sample")
    print(f"  exact per-sample floor: loop / floor_exact {med['floor_exact']:.3f}s = "
          f"{figures['per_sample_ceiling']:.2f}x (the CEILING for any exact method; achieved "
          f"{figures['per_sample_speedup']:.2f}x); floor_exact / measure_conflict = {figures['floor_share']:.2f}")
    print(f"  max |cos difference| over {min(args.batch_size, args.loop_samples or args.batch_size)} samples x 2 "
          f"modalities: {max_diff:.2e} (<= {tol:g}) {'PASS' if cos_ok else 'FAIL'}")
    methods = sorted(set(engine.layers.values()))
    print("  methods chosen per layer: " + ", ".join(
        f"{m} {sum(v == m for v in engine.layers.values())}" for m in methods))
    if args.sketch:
        print(f"  sketch {args.sketch}: loop / conflict_sketch {med['conflict_sketch']:.3f}s = "
              f"{figures['sketch_speedup']:.2f}x; max |cos difference| from the exact engine {sketch_diff:.2e}")
    if memory is not None:
        line = (f"per-sample run, fresh process: resident {memory['rss_before_mib']:.0f} MiB before, peak "
                f"{memory['rss_peak_mib']:.0f} MiB ({memory['rss_peak_mib'] * 2**20 / 1000**3:.2f} GB)")
        if "rss" in ok:
            line += f" (target <= {args.target_rss_gb:g} GB) {verdict('rss')}"
        if "device_peak_mib" in memory:
            line += f"; device peak {memory['device_peak_mib']:.0f} MiB"
        print(line)
    print(f"per-batch conflict / plain forward+backward: {figures['batch_ratio']:.2f}x "
          f"(target <= {TARGETS['batch_ratio']:g}x) {verdict('batch_ratio')}")
    print(f"exact Shapley (shapley_batch) / plain forward: "
          f"{figures['shapley_ratio']:.2f}x (target <= {TARGETS['shapley_ratio']:g}x) {verdict('shapley_ratio')}")
    if args.json:
        out = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "platform": platform.platform(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "times": times, "medians": med,
               "first_call": first_call, "cpu_times": cpu_times, "cpu_medians": cpu_med,
               "cpu_figures": cpu_figures, "figures": figures, "targets": {**TARGETS,
                                                                             "per_sample_speedup": args.target_speedup,
                                                                             "rss_gb": args.target_rss_gb},
               "pass": ok, "max_cos_diff": max_diff, "cos_ok": cos_ok, "sketch_max_diff": sketch_diff,
               "memory": memory, "engine": engine.to_dict()}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    if not cos_ok:
        return 2
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
