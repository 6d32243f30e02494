#!/usr/bin/env python
"""Benchmark: ``avdiag.measure.probe.probe`` against the plain forward over the same batches.

Acceptance target: the probe over N batches runs within 1.15x of the plain forward over the
same N batches, measured in one run, and the probe's memory does not grow with N.

What one invocation does:

1. Builds the built-in OGM-GE audio-visual classifier (``avdiag.models.OGMGEClassifier``,
   concat fusion, 6 classes, two ResNet-18 encoders; ``--width 64`` is the real ResNet-18),
   seeded.  Its state dict is saved as ``{'model': {'module.' + k: v}}`` (a DataParallel
   training checkpoint) in a temp dir and read back through ``load_checkpoint`` ->
   ``locate`` -> ``resolve_model``, so the probe sees the BN layer names a user would get.
2. Synthesises ``--batches`` batches of ``--batch-size`` CREMA-D shaped samples (audio
   spectrogram (257, 188), visual ``--frames`` RGB frames of 224x224, a label), seeded,
   all held in memory (and on the device) before any clock starts.
3. Speed: one untimed warm-up of each, then ``--repeats`` rounds interleaved

       A  plain forward: the model in eval mode, ``torch.inference_mode()``, no hooks,
          ``for b in batches: rm(b)`` (under autocast with ``--amp``);
       B  ``probe(rm, layers, batches, device, amp)``: the same forward with a hook on every
          BN layer plus the final read-back of the statistics.

   On CUDA each run is bracketed by ``torch.cuda.synchronize()``.  Reported: medians, the
   ratio of the medians B/A (the verdict, target <= 1.15) and the median of the per-round
   ratios.
4. Memory: the probe over N and over 4N batches (and the plain forward, for reference), with
   the batches produced lazily by a generator that cycles through two fixed batches, so
   the data does not grow with N.  CPU: a thread samples ``RssAnon`` in /proc/self/status
   every ~2 ms; the figure is the peak during the run minus the value just before (taken
   after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so memory freed by earlier runs
   and kept by the allocator does not shift the baseline).  CUDA:
   ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before.  The check:
   peak(4N) <= 1.10 * peak(N) + 20 MiB.  Memory still held after the run is shown too.
5. ``--profile``: one more probe run under ``torch.profiler`` (CPU activity; CUDA too on a
   GPU), with ``_Accumulator.add`` wrapped in a ``record_function`` label for the duration of
   that run only, so the hooks' share can be read off; the top ops by self time are printed.
6. ``--micro`` (``--micro-only``: nothing else): a micro-benchmark of the individual torch
   reductions, of the installed ``_Accumulator.add`` and, for reference, of the first probe
   version's four sums and a torch.compile'd fused pass, on one (8, 64, 112, 112) float32
   tensor (the visual stem's BN output at batch 8).

Exit status: 0 every check passes, 1 one fails, 2 the harness could not measure.

Usage::

    .venv/bin/python benchmarks/probe_bench.py                       # CPU, 8 batches of 8, 5 repeats
    .venv/bin/python benchmarks/probe_bench.py --batches 4 --repeats 3 --profile --micro
    .venv/bin/python benchmarks/probe_bench.py --device cuda --amp --json probe_gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

MIB = 1024 * 1024
SPEED_TARGET = 1.15  # probe / plain forward, ratio of the medians
MEM_REL_TOL = 0.10  # peak(4N) <= (1 + MEM_REL_TOL) * peak(N) + MEM_ABS_TOL
MEM_ABS_TOL_MIB = 20.0
N_CLASSES = 6
AUDIO_SHAPE = (257, 188)  # CREMA-D log spectrogram (freq, time)
IMAGE_SIZE = 224


# --------------------------------------------------------------------------------------
# memory


class _AnonPeak(threading.Thread):
    """Samples this process's RssAnon (from a kept-open /proc/self/status) every ``interval_s``
    until stopped; ``before`` is the first sample, ``peak`` the maximum, ``after`` the last."""

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(name="rss-anon-sampler", daemon=True)
        self._interval = interval_s
        self._stop_event = threading.Event()
        self._fd = os.open("/proc/self/status", os.O_RDONLY)
        self.before = self.peak = self.after = self._read()
        self.samples = 1

    def _read(self) -> int:
        raw = os.pread(self._fd, 16384, 0)
        i = raw.find(b"RssAnon:")
        if i < 0:
            raise RuntimeError("/proc/self/status has no RssAnon field")
        return int(raw[i + 8 : raw.find(b"\n", i)].split()[0]) * 1024

    def _sample(self) -> int:
        value = self._read()
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self._sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.after = self._sample()
        os.close(self._fd)


def _malloc_trim() -> None:
    """Hand glibc's free heap memory back to the OS, so RssAnon before a run is its live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figures then include the allocator's cache
        pass


def measure_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Peak memory growth of ``fn()`` above the level just before it, and what it left, in MiB.

    On CPU, glibc keeps freed memory of earlier runs; ``malloc_trim(0)`` before the run (and
    before the last sample after it) makes the baseline and the retained figure live memory.
    """
    gc.collect()
    _malloc_trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device)
        del result
        gc.collect()
        after = torch.cuda.memory_allocated(device)
        return {"peak_mib": (peak - before) / MIB, "retained_mib": (after - before) / MIB,
                "seconds": seconds, "kind": "cuda max_memory_allocated"}
    sampler = _AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = fn()
        seconds = time.perf_counter() - t0
        del result
        gc.collect()
        _malloc_trim()
    finally:
        sampler.stop()
    return {"peak_mib": (sampler.peak - sampler.before) / MIB, "retained_mib": (sampler.after - sampler.before) / MIB,
            "seconds": seconds, "samples": sampler.samples, "kind": "RssAnon"}


# --------------------------------------------------------------------------------------
# model and data


def build_resolved(width: int, seed: int, workdir: Path):
    """The OGM-GE model saved as a DataParallel checkpoint and resolved back, as a user would."""
    from avdiag.load import load_checkpoint
    from avdiag.locate import locate
    from avdiag.locate.resolve import resolve_model
    from avdiag.models import OGMGEClassifier

    torch.manual_seed(seed)
    model = OGMGEClassifier(n_classes=N_CLASSES, fusion="concat", width=width)
    with torch.no_grad():  # non-trivial BN statistics, so the outputs are not plain N(0, 1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    path = workdir / "ogmge_resnet18.pt"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    del model
    ckpt = load_checkpoint(path)
    located = locate(ckpt)
    resolved = resolve_model(ckpt, located.layout)
    return resolved, located.layers, ckpt


def make_batch(gen: torch.Generator, batch_size: int, frames: int) -> dict[str, torch.Tensor]:
    return {
        "audio": torch.randn(batch_size, *AUDIO_SHAPE, generator=gen),
        "visual": torch.randn(batch_size, 3, frames, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
        "label": torch.randint(0, N_CLASSES, (batch_size,), generator=gen),
    }


def batch_mib(batch: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in batch.values()) / MIB


def cycling(fixed: list[dict[str, torch.Tensor]], n: int) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` batches produced lazily, reusing the tensors of ``fixed``: the data does not grow with n."""
    for i in range(n):
        yield fixed[i % len(fixed)]


# --------------------------------------------------------------------------------------
# the two approaches


class Runner:
    def __init__(self, resolved, layers, device: torch.device, amp: bool) -> None:
        from avdiag.measure.probe import probe

        self._probe = probe
        self.resolved, self.layers, self.device = resolved, layers, device
        self.amp = amp and device.type == "cuda"
        self.model = resolved.module.to(device).eval()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def plain(self, batches) -> int:
        # the same precision as the probe: full float32 (TF32 off) and the probe's autocast dtype
        from avdiag.measure.precision import measuring

        n = 0
        with torch.inference_mode(), measuring(self.device, amp=self.amp):
            for b in batches:
                self.resolved(b)
                n += 1
        self._sync()
        return n

    def probe(self, batches):
        run = self._probe(self.resolved, self.layers, batches, self.device, amp=self.amp)
        self._sync()
        return run

    def timed(self, fn: Callable[[], object]) -> float:
        self._sync()
        t0 = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# profile


def profile_probe(runner: Runner, batches, row_limit: int) -> dict:
    """One probe run under torch.profiler; ``_Accumulator.add`` labelled for this run only."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from avdiag.measure import probe as probe_mod

    label = "avdiag::_Accumulator.add"
    original = probe_mod._Accumulator.add

    def labelled_add(self, out):
        with record_function(label):
            return original(self, out)

    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    probe_mod._Accumulator.add = labelled_add
    try:
        with profile(activities=activities) as prof:
            with record_function("avdiag::probe"):
                runner.probe(batches)
    finally:
        probe_mod._Accumulator.add = original
    averages = prof.key_averages()
    sort_key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=row_limit)
    totals = {e.key: e for e in averages}
    whole = totals.get("avdiag::probe")
    hooks = totals.get(label)
    out = {"table": table, "sort_by": sort_key}
    if whole is not None and hooks is not None:
        out["probe_cpu_total_s"] = whole.cpu_time_total / 1e6
        out["hooks_cpu_total_s"] = hooks.cpu_time_total / 1e6
        out["hook_calls"] = hooks.count
    rows = sorted((e for e in averages if not e.key.startswith("avdiag::")),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    out["top_self_cpu"] = [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6}
                           for e in rows]
    return out


# --------------------------------------------------------------------------------------
# micro-benchmark of the reductions


def _time_median(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def original_stats(x: torch.Tensor, t: float):
    """What the first ``_Accumulator.add`` computed per call (sums, for reference):
    fire count (int64), sum (float64), sum of squares, max, over (0, 2, 3)."""
    dims = [0, *range(2, x.dim())]
    fire = (x > t).sum(dim=dims)
    total = x.sum(dim=dims, dtype=torch.float64)
    total_sq = torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32).to(torch.float64).square()
    peak = x.amax(dim=dims).float()
    return fire, total, total_sq, peak


def _activity_stats(acc) -> tuple[torch.Tensor, ...]:
    """(fire count, mean, variance, max) in float64 from an accumulator's ``result()``."""
    r = acc.result()
    f64 = [torch.as_tensor(a, dtype=torch.float64) for a in (r.fire_rate, r.mean, r.std, r.max)]
    return torch.round(f64[0] * r.positions), f64[1], f64[2] ** 2, f64[3]


def micro_benchmark(device: torch.device, repeats: int, shape=(8, 64, 112, 112)) -> list[dict]:
    """Per-call time of the individual per-layer reductions (the installed probe's and
    alternatives), of avdiag's installed ``_Accumulator.add`` and of the first probe version's
    four sums, on one BN-output-sized tensor.

    Whole-statistics variants are checked against float64 on the same tensor: ``max_rel_err``
    is the largest relative error over (fire count, mean, variance, max), fire counts must be
    exact, and ``const_std`` is the std they give a channel that is constant 5.3.
    """
    from avdiag.measure.probe import _Accumulator

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(device)
    const = torch.full((2, 4, *shape[2:]), 5.3, device=device)
    dims, sp = [0, 2, 3], [2, 3]
    xd = x.double()
    exact = ((x > 0).sum(dims).double().cpu(), xd.mean(dims).cpu(), xd.var(dims, correction=0).cpu(),
             xd.amax(dims).cpu())

    def installed_once(v):
        acc = _Accumulator(0.0)
        acc.add(v)
        return _activity_stats(acc)

    def original_once(v):
        fire, total, total_sq, peak = (a.double().cpu() for a in original_stats(v, 0.0))
        n = v.numel() // v.shape[1]
        mean = total / n
        return fire, mean, (total_sq / n - mean**2).clamp_min(0), peak

    persistent = _Accumulator(0.0)
    cases: list[tuple[str, Callable[[], object], Callable[[torch.Tensor], tuple] | None]] = [
        ("floor  x.sum()  (one read of x)", lambda: x.sum(), None),
        ("floor  torch.relu(x)  (one read, one new tensor)", lambda: torch.relu(x), None),
        ("fire   (x > 0).sum(0,2,3) -> int64  (original)", lambda: (x > 0).sum(dim=dims), None),
        ("fire   (x > 0).sum(0,2,3, dtype=int32)", lambda: (x > 0).sum(dim=dims, dtype=torch.int32), None),
        ("fire   (x > 0).sum(2,3, int32).sum(0)", lambda: (x > 0).sum(sp, dtype=torch.int32).sum(0), None),
        ("fire   relu(x).sign_().sum(2,3).sum(0)", lambda: torch.relu(x).sign_().sum(sp).sum(0), None),
        ("sum    x.sum(0,2,3, dtype=float64)  (original)", lambda: x.sum(dim=dims, dtype=torch.float64), None),
        ("sum    x.sum(0,2,3)  float32", lambda: x.sum(dim=dims), None),
        ("sum    x.sum(2,3).sum(0, float64)", lambda: x.sum(sp).sum(0, dtype=torch.float64), None),
        ("sq     vector_norm(x, (0,2,3), float32)  (original)",
         lambda: torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32), None),
        ("sq     vector_norm(x, (2,3))", lambda: torch.linalg.vector_norm(x, dim=sp), None),
        ("var    var_mean(x, (0,2,3))", lambda: torch.var_mean(x, dim=dims, correction=0), None),
        ("var    var_mean(x, (2,3))", lambda: torch.var_mean(x, dim=sp, correction=0), None),
        ("var    d = x - x[:,:,:1,:1]; d.sum(2,3), norm(d,(2,3))", lambda: (
            (d := x - x[:, :, :1, :1]).sum(sp), torch.linalg.vector_norm(d, dim=sp)), None),
        ("peak   x.amax(0,2,3)", lambda: x.amax(dim=dims), None),
        ("peak   x.amax(2,3).amax(0)", lambda: x.amax(sp).amax(0), None),
        ("ALL    avdiag _Accumulator.add (installed)", lambda: persistent.add(x), installed_once),
        ("ALL    original four sums (first probe version)", lambda: original_stats(x, 0.0), original_once),
    ]
    compiled = _compiled_fused(x)
    if compiled is not None:
        cases.append(("ALL    torch.compile'd sums, one fused pass", compiled, None))

    results = []
    for name, fn, check in cases:
        try:
            seconds, fastest = _time_median(fn, repeats, device)
        except Exception as e:  # an alternative this torch / device does not support
            results.append({"case": name, "error": f"{type(e).__name__}: {e}"})
            continue
        row = {"case": name, "ms": seconds * 1e3, "min_ms": fastest * 1e3}
        if check is not None:
            got = check(x)
            errs = [float(((g.double() - e).abs() / e.abs().clamp_min(1.0)).max()) for g, e in zip(got, exact)]
            row["max_rel_err"] = max(errs)
            row["fire_exact"] = errs[0] == 0.0
            row["const_std"] = float(check(const)[2].max().sqrt())
        results.append(row)
    return results


def _compiled_fused(x: torch.Tensor) -> Callable[[], object] | None:
    """Fire count, sum, sum of squares and max in one torch.compile'd function (inductor
    fuses them into one loop over x); timing only, to show the floor of a fused kernel."""
    def stats(v: torch.Tensor):
        vf = v.flatten(2)
        return ((vf > 0).sum(-1, dtype=torch.int32).sum(0), vf.sum(-1).double().sum(0),
                (vf * vf).sum(-1).double().sum(0), vf.amax(-1).amax(0))

    try:
        compiled = torch.compile(stats, dynamic=False)
        compiled(x)  # compile now, outside the timing
    except Exception as e:
        print(f"  (torch.compile unavailable here: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    return lambda: compiled(x)


# --------------------------------------------------------------------------------------
# report


def print_micro(device: torch.device, repeats: int) -> list[dict]:
    print(f"\nmicro-benchmark: one (8, 64, 112, 112) float32 tensor on {device}, median (and min) of "
          f"{repeats}, {torch.get_num_threads()} threads")
    rows = micro_benchmark(device, repeats)
    for row in rows:
        if "error" in row:
            print(f"  {row['case']:56s}   error: {row['error'][:80]}")
        else:
            check = ""
            if "max_rel_err" in row:
                check = (f"   rel err {row['max_rel_err']:.1e}, fire {'exact' if row['fire_exact'] else 'NOT exact'}"
                         f", constant std {row['const_std']:.1e}")
            print(f"  {row['case']:56s} {row['ms']:8.2f} ms  (min {row['min_ms']:7.2f}){check}")
    return rows


def write_json(path: Path | None, report: dict) -> None:
    if path:
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8, help="N, batches per timed run (default 8)")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    ap.add_argument("--frames", type=int, default=1, help="visual frames per sample (default 1)")
    ap.add_argument("--width", type=int, default=64, help="ResNet width; 64 is the real ResNet-18 (default)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of plain and probe (default 5)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--amp", action="store_true", help="autocast in both approaches (CUDA only)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-factor", type=int, default=4, help="the memory check compares N and this x N (default 4)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory part")
    ap.add_argument("--profile", action="store_true", help="one probe run under torch.profiler, top ops printed")
    ap.add_argument("--profile-rows", type=int, default=20)
    ap.add_argument("--micro", action="store_true",
                    help="micro-benchmark the per-layer reductions on an (8, 64, 112, 112) tensor")
    ap.add_argument("--micro-repeats", type=int, default=20)
    ap.add_argument("--micro-only", action="store_true", help="run only the micro-benchmark (no model)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)

    if args.batches < 1 or args.batch_size < 1 or args.repeats < 1 or args.frames < 1:
        ap.error("--batches, --batch-size, --frames and --repeats must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("probe_bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.amp and device.type != "cuda":
        print("note: --amp applies to CUDA only (the probe ignores it on CPU); running without autocast")
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                   "machine": platform.machine(), "cpu_count": os.cpu_count(),
                   "loadavg_at_start": os.getloadavg(),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    print(f"probe_bench: device={device}{' amp' if args.amp and device.type == 'cuda' else ''} "
          f"torch {torch.__version__} threads={torch.get_num_threads()} "
          f"loadavg={' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if report["config"]["gpu"]:
        print(f"  gpu: {report['config']['gpu']}")

    if args.micro_only:
        report["micro"] = print_micro(device, args.micro_repeats)
        write_json(args.json, report)
        return 0

    try:
        with tempfile.TemporaryDirectory(prefix="probe_bench_") as tmp:
            resolved, layers, ckpt = build_resolved(args.width, args.seed, Path(tmp))
            runner = Runner(resolved, layers, device, args.amp)
            del ckpt
    except Exception as e:
        print(f"probe_bench: could not build / resolve the model: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in runner.model.parameters())
    print(f"  model: {resolved.source}, width {args.width}, {n_params / 1e6:.1f} M parameters, "
          f"{len(layers)} BN layers located")

    gen = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(gen, args.batch_size, args.frames) for _ in range(args.batches)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    print(f"  data: {args.batches} batches x {args.batch_size} samples (audio {AUDIO_SHAPE}, visual 3x{args.frames}x"
          f"{IMAGE_SIZE}x{IMAGE_SIZE}), {args.batches * batch_mib(batches[0]):.0f} MiB held on {device}")
    report["model"] = {"source": resolved.source, "width": args.width, "parameters": n_params,
                       "bn_layers": len(layers)}

    # sanity: the probe measures every located layer
    run = runner.probe(batches[:1])
    if run.missing_layers or len(run.activity) != len(layers):
        print(f"probe_bench: the probe missed {len(run.missing_layers)} of {len(layers)} BN layers "
              f"(e.g. {run.missing_layers[:3]})", file=sys.stderr)
        return 2
    del run

    # ---- speed
    print(f"\nspeed: {args.repeats} interleaved rounds after one warm-up of each")
    runner.plain(batches)
    runner.probe(batches)
    plain_s, probe_s = [], []
    for i in range(args.repeats):
        plain_s.append(runner.timed(lambda: runner.plain(batches)))
        probe_s.append(runner.timed(lambda: runner.probe(batches)))
        print(f"  round {i + 1}: plain {plain_s[-1]:.3f} s   probe {probe_s[-1]:.3f} s   "
              f"ratio {probe_s[-1] / plain_s[-1]:.3f}")
    med_plain, med_probe = statistics.median(plain_s), statistics.median(probe_s)
    ratio = med_probe / med_plain
    paired = statistics.median(p / a for p, a in zip(probe_s, plain_s))
    samples = args.batches * args.batch_size
    speed_pass = ratio <= SPEED_TARGET
    report["speed"] = {"plain_s": plain_s, "probe_s": probe_s, "plain_median_s": med_plain,
                       "probe_median_s": med_probe, "ratio_of_medians": ratio, "median_paired_ratio": paired,
                       "target": SPEED_TARGET, "pass": speed_pass,
                       "plain_samples_per_s": samples / med_plain, "probe_samples_per_s": samples / med_probe}

    # ---- memory
    mem = None
    if not args.no_memory:
        n_small, n_big = args.batches, args.batches * args.mem_factor
        print(f"\nmemory: N={n_small} and {args.mem_factor}N={n_big} batches, generated lazily from 2 fixed batches")
        runs = {}
        for n in (n_small, n_big):
            for name, fn in (("plain", runner.plain), ("probe", runner.probe)):
                m = runs[f"{name}_{n}"] = measure_memory(lambda: fn(cycling(batches[:2], n)), device)
                print(f"  {name:5s} N={n:3d}: peak +{m['peak_mib']:7.1f} MiB   retained {m['retained_mib']:+7.1f} MiB"
                      f"   ({m['seconds']:.2f} s)")
        peak = {key: m["peak_mib"] for key, m in runs.items()}
        small, big = peak[f"probe_{n_small}"], peak[f"probe_{n_big}"]
        limit = (1 + MEM_REL_TOL) * small + MEM_ABS_TOL_MIB
        mem = report["memory"] = {
            "runs": runs, "n": n_small, "n_big": n_big, "probe_peak_n_mib": small, "probe_peak_big_mib": big,
            "limit_mib": limit, "probe_extra_over_plain_n_mib": small - peak[f"plain_{n_small}"],
            "probe_extra_over_plain_big_mib": big - peak[f"plain_{n_big}"], "pass": big <= limit,
            "measure": runs[f"probe_{n_small}"]["kind"]}

    # ---- summary
    print("\n| | plain forward | probe | probe / plain |")
    print("|---|---|---|---|")
    print(f"| median of {args.repeats} (s) | {med_plain:.3f} | {med_probe:.3f} | **{ratio:.3f}** "
          f"(target <= {SPEED_TARGET}) |")
    print(f"| median paired ratio | | | {paired:.3f} |")
    print(f"| samples / s | {samples / med_plain:.1f} | {samples / med_probe:.1f} | |")
    if mem is not None:
        for n in (mem["n"], mem["n_big"]):
            plain_mib, probe_mib = mem["runs"][f"plain_{n}"]["peak_mib"], mem["runs"][f"probe_{n}"]["peak_mib"]
            print(f"| peak memory, {n} batches (MiB) | {plain_mib:.1f} | {probe_mib:.1f} | "
                  f"extra {probe_mib - plain_mib:+.1f} |")
    print(f"\nspeed   probe/plain {ratio:.3f} <= {SPEED_TARGET}: {'PASS' if speed_pass else 'FAIL'}")
    ok = speed_pass
    if mem is not None:
        print(f"memory  probe peak {big:.1f} MiB at {n_big} batches <= "
              f"{1 + MEM_REL_TOL:.2f} x {small:.1f} + {MEM_ABS_TOL_MIB:.0f} = {limit:.1f} MiB "
              f"({mem['measure']}): {'PASS' if mem['pass'] else 'FAIL'}")
        ok = ok and mem["pass"]

    # ---- profile / micro
    if args.profile:
        print("\nprofile: one probe run over the same batches under torch.profiler")
        prof = profile_probe(runner, batches, args.profile_rows)
        print(prof["table"])
        if "hooks_cpu_total_s" in prof:
            print(f"  hooks (_Accumulator.add, {prof['hook_calls']} calls): {prof['hooks_cpu_total_s']:.3f} s of "
                  f"{prof['probe_cpu_total_s']:.3f} s CPU time in the probe "
                  f"({100 * prof['hooks_cpu_total_s'] / prof['probe_cpu_total_s']:.1f}%)")
        report["profile"] = {k: v for k, v in prof.items() if k != "table"}
    if args.micro:
        report["micro"] = print_micro(device, args.micro_repeats)

    write_json(args.json, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
