#!/usr/bin/env python
"""Benchmark: ``avdiag.inspect_checkpoint`` against a bare load that touches every tensor.

Acceptance target (from the issue): on a ~1 GB checkpoint, in both ``.safetensors`` and
``.pt`` form, inspect runs within 1.5x of the bare load, and its peak memory stays under
300 MiB plus the largest tensor.

What one invocation does:

1. Builds a deterministic (seeded) audio-visual checkpoint of about ``--size-gb`` of
   float32: two ResNet-18-like encoders (``audio_net.``, ``visual_net.``) with widths
   scaled so the total reaches the target, plus a large fusion head and a classifier.
   It is saved once as ``model.safetensors`` (``safetensors.torch.save_file``) and once
   as ``model.pt`` (``torch.save({'model': state_dict})``).  The build runs in a child
   process so the parent stays small.
2. For each format: one untimed warm-up of A and of B (so both read from the page
   cache), then ``--repeats`` timed runs interleaved A, B, A, B, ...

   A  bare load + touch: ``torch.load(p, map_location='cpu', weights_only=True)`` for
      ``.pt``, ``safetensors.torch.load_file(p)`` for ``.safetensors``, then
      ``float(t.float().sum())`` over every tensor, then the loaded object is dropped.
   B  ``avdiag.inspect_checkpoint(p).to_dict()``.

   Every run (warm-ups included) is a fresh child process (this script with the hidden
   ``--child`` option).  The child imports torch, safetensors and avdiag *before* it
   starts its clock, so the figures cover only the load / inspect itself.  It reports:

   * wall seconds of the load / inspect (``time.perf_counter``);
   * peak anonymous memory: a background thread samples ``RssAnon`` from
     ``/proc/self/status`` every ~2 ms; the maximum over the run minus the value just
     before the clock started.  This is the private memory the run needed;
   * peak file-backed resident memory (``RssFile``, same sampling, minus baseline):
     pages of an mmap-ed checkpoint.  They are page cache shared with the kernel, not
     private memory, and are reported separately;
   * ``VmHWM`` (kernel high-water mark of the whole RSS, anon + file, imports included).

3. Prints one table per format (medians, B/A ratio, PASS/FAIL lines) and, with
   ``--json PATH``, writes every figure.  Exit status: 0 all PASS, 1 some FAIL,
   2 the harness could not measure (a child failed, e.g. ``inspect_checkpoint`` is
   missing).

Harness self-test: the hidden ``--stand-in`` option replaces B by a stand-in that does
what the spec says inspect does (sha256 of the file, a safe per-tensor load with
``safe_open`` / ``torch.load(mmap=True, weights_only=True)``, ``isfinite`` on every
tensor, a few BatchNorm statistics).  It exists to check the harness without the real
implementation, and gives a rough expectation for it.

``--profile`` runs one more B child under cProfile and prints the top functions.

Linux only (reads ``/proc/self/status``).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/inspect_bench.py               # 1 GB, 5 repeats
    PYTHONPATH=. .venv/bin/python benchmarks/inspect_bench.py --size-gb 0.2 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
SPEED_TARGET = 1.5  # B / A, ratio of medians
MEM_ALLOWANCE_MIB = 300.0  # plus the largest tensor
BUILD_VERSION = 1  # bump when the generated checkpoint changes
CHILD_TIMEOUT_S = 1800
EXIT_NO_INSPECT = 3  # a child that cannot find avdiag.inspect_checkpoint

FILE_NAMES = {"safetensors": "model.safetensors", "pt": "model.pt"}


# --------------------------------------------------------------------------------------
# /proc/self/status sampling


class _StatusReader:
    """Reads a few fields of /proc/self/status (values in bytes) from a kept-open fd."""

    FIELDS = (b"RssAnon:", b"RssFile:", b"VmRSS:", b"VmHWM:")

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/status", os.O_RDONLY)

    def read(self) -> dict[str, int]:
        raw = os.pread(self._fd, 16384, 0)
        out: dict[str, int] = {}
        for field in self.FIELDS:
            i = raw.find(field)
            if i < 0:
                continue
            j = raw.find(b"\n", i)
            parts = raw[i + len(field) : j].split()  # e.g. [b'265668', b'kB']
            out[field[:-1].decode()] = int(parts[0]) * 1024
        return out

    def close(self) -> None:
        os.close(self._fd)


class _PeakSampler(threading.Thread):
    """Background thread: max of RssAnon and RssFile, sampled every ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._interval = interval_s
        self._stop_event = threading.Event()
        self._reader = _StatusReader()
        first = self._reader.read()
        self.peak_anon = first["RssAnon"]
        self.peak_file = first["RssFile"]
        self.samples = 1

    def sample(self) -> None:
        s = self._reader.read()
        if s["RssAnon"] > self.peak_anon:
            self.peak_anon = s["RssAnon"]
        if s["RssFile"] > self.peak_file:
            self.peak_file = s["RssFile"]
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()  # one last look, after the work
        self._reader.close()


# --------------------------------------------------------------------------------------
# The checkpoint


def _conv(specs: list, name: str, out_c: int, in_c: int, k: int) -> None:
    specs.append((f"{name}.weight", (out_c, in_c, k, k), "conv"))


def _linear(specs: list, name: str, out_f: int, in_f: int) -> None:
    specs.append((f"{name}.weight", (out_f, in_f), "linear"))
    specs.append((f"{name}.bias", (out_f,), "bias"))


def _bn(specs: list, name: str, c: int) -> None:
    specs.append((f"{name}.weight", (c,), "bn_weight"))
    specs.append((f"{name}.bias", (c,), "bn_bias"))
    specs.append((f"{name}.running_mean", (c,), "bn_mean"))
    specs.append((f"{name}.running_var", (c,), "bn_var"))
    specs.append((f"{name}.num_batches_tracked", (), "bn_count"))


def _resnet(specs: list, prefix: str, in_ch: int, width: int, blocks=(2, 2, 2, 2)) -> int:
    """ResNet-18-like (BasicBlock) encoder; returns the output channel count."""
    _conv(specs, f"{prefix}conv1", width, in_ch, 7)
    _bn(specs, f"{prefix}bn1", width)
    in_c = width
    for li, n_blocks in enumerate(blocks):
        out_c = width * 2**li
        for bi in range(n_blocks):
            p = f"{prefix}layer{li + 1}.{bi}."
            _conv(specs, p + "conv1", out_c, in_c, 3)
            _bn(specs, p + "bn1", out_c)
            _conv(specs, p + "conv2", out_c, out_c, 3)
            _bn(specs, p + "bn2", out_c)
            if bi == 0 and in_c != out_c:
                _conv(specs, p + "downsample.0", out_c, in_c, 1)
                _bn(specs, p + "downsample.1", out_c)
            in_c = out_c
    return in_c


def checkpoint_specs(width: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) of every tensor for a visual width ``width`` (multiple of 8)."""
    specs: list = []
    audio_w = max(8, (width * 3 // 4) // 8 * 8)
    c_audio = _resnet(specs, "audio_net.", 1, audio_w)  # log-mel spectrogram input
    c_visual = _resnet(specs, "visual_net.", 3, width)  # RGB frames
    d = 8 * width  # joint embedding
    hidden = 4 * d
    _linear(specs, "fusion.audio_proj", d, c_audio)
    _linear(specs, "fusion.visual_proj", d, c_visual)
    _bn(specs, "fusion.bn", 2 * d)
    _linear(specs, "fusion.mlp.0", hidden, 2 * d)
    _bn(specs, "fusion.mlp.1", hidden)
    _linear(specs, "fusion.mlp.3", d, hidden)
    _linear(specs, "classifier", 309, d)  # VGGSound classes
    return specs


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _spec_bytes(specs) -> int:
    return sum(_numel(shape) * (8 if kind == "bn_count" else 4) for _, shape, kind in specs)


def pick_width(target_bytes: int) -> int:
    """Multiple of 8 whose checkpoint is closest to ``target_bytes``."""
    best_w, best_err = 8, None
    w = 8
    while True:
        size = _spec_bytes(checkpoint_specs(w))
        err = abs(size - target_bytes)
        if best_err is None or err < best_err:
            best_w, best_err = w, err
        if size > target_bytes:
            return best_w
        w += 8


def build_state_dict(size_gb: float, seed: int):
    import torch

    specs = checkpoint_specs(pick_width(int(size_gb * 1e9)))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape, kind in specs:
        if kind == "conv" or kind == "linear":
            fan_in = _numel(shape[1:])
            t = torch.randn(shape, generator=g).mul_(math.sqrt(2.0 / fan_in))
        elif kind == "bias":
            t = torch.randn(shape, generator=g).mul_(0.01)
        elif kind == "bn_weight":
            t = torch.randn(shape, generator=g).mul_(0.1).add_(1.0)
            # ~3% dead channels: gamma collapsed to ~0 during training
            dead = torch.rand(shape, generator=g) < 0.03
            t[dead] = torch.randn(int(dead.sum()), generator=g).mul_(1e-8)
        elif kind == "bn_bias":
            t = torch.randn(shape, generator=g).mul_(0.05)
        elif kind == "bn_mean":
            t = torch.randn(shape, generator=g).mul_(0.1)
        elif kind == "bn_var":
            t = torch.rand(shape, generator=g).add_(0.5)
        elif kind == "bn_count":
            t = torch.tensor(250_000, dtype=torch.int64)
        else:  # pragma: no cover
            raise AssertionError(kind)
        sd[key] = t.contiguous()
    return sd


def _manifest_matches(workdir: Path, want: dict) -> dict | None:
    mpath = workdir / "manifest.json"
    if not mpath.exists():
        return None
    try:
        have = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None
    if any(have.get(k) != v for k, v in want.items()):
        return None
    for fmt in want["formats"]:
        f = workdir / FILE_NAMES[fmt]
        if not f.exists() or f.stat().st_size != have["files"][fmt]["bytes"]:
            return None
    return have


def child_build(workdir: Path, size_gb: float, seed: int, formats: list[str]) -> None:
    import torch
    import safetensors.torch

    t0 = time.perf_counter()
    sd = build_state_dict(size_gb, seed)
    largest_key = max(sd, key=lambda k: sd[k].numel() * sd[k].element_size())
    files = {}
    for fmt in formats:
        path = workdir / FILE_NAMES[fmt]
        tmp = path.with_name(path.name + ".tmp")
        if fmt == "safetensors":
            safetensors.torch.save_file(sd, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"model": sd}, str(tmp))
        os.replace(tmp, path)
        files[fmt] = {"path": str(path), "bytes": path.stat().st_size}
    manifest = {
        "build_version": BUILD_VERSION,
        "size_gb": size_gb,
        "seed": seed,
        "formats": formats,
        "files": files,
        "n_tensors": len(sd),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "largest_tensor": {
            "key": largest_key,
            "shape": list(sd[largest_key].shape),
            "bytes": sd[largest_key].numel() * sd[largest_key].element_size(),
        },
        "build_s": time.perf_counter() - t0,
    }
    (workdir / "manifest.json").write_text(json.dumps(manifest, indent=2))


# --------------------------------------------------------------------------------------
# The work that is timed


def _touch_all(obj) -> tuple[int, float]:
    """Reduce every tensor in a (nested) dict/list; returns (count, checksum)."""
    import torch

    n, acc = 0, 0.0
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            acc += float(o.float().sum())
            n += 1
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return n, acc


def run_bare(path: str) -> dict:
    import torch
    import safetensors.torch

    if path.endswith(".safetensors"):
        obj = safetensors.torch.load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    n, acc = _touch_all(obj)
    del obj
    gc.collect()
    return {"tensors": n, "checksum": acc}


def run_inspect(path: str, fn) -> dict:
    report = fn(path).to_dict()
    return {
        "tensors": None,
        "report_keys": sorted(report),
        "layers": len(report.get("layers") or []),
        "findings": len(report.get("findings") or []),
    }


def hash_file(path: str) -> dict:
    """sha256 of the file, read in 8 MiB chunks (the --hash-floor reference)."""
    h = hashlib.sha256()
    buf = bytearray(8 * MIB)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return {"tensors": None, "sha256": h.hexdigest()}


def stand_in_inspect(path: str) -> dict:
    """Harness self-test only: what the spec says inspect does, written plainly."""
    import torch
    from safetensors import safe_open

    digest = hash_file(path)["sha256"]

    n_tensors, non_finite, bn = 0, [], {}

    def check(key, t):
        nonlocal n_tensors
        n_tensors += 1
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            non_finite.append(key)
        if key.endswith(".weight") and t.dim() == 1:
            bn[key] = int((t.abs() < 1e-5).sum())

    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                check(key, f.get_tensor(key))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, t in obj["model"].items():
            check(key, t)
        del obj
    return {
        "tensors": n_tensors,
        "sha256": digest,
        "non_finite": len(non_finite),
        "dead_channels": sum(bn.values()),
    }


def _resolve_inspect():
    """avdiag.inspect_checkpoint, or exit with a clear message."""
    try:
        import avdiag
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        _die_no_inspect(f"`import avdiag` failed: {type(exc).__name__}: {exc}")
    fn = getattr(avdiag, "inspect_checkpoint", None)
    if fn is None:
        where = getattr(avdiag, "__file__", None) or f"namespace package at {list(avdiag.__path__)}"
        _die_no_inspect(f"module avdiag ({where}) has no inspect_checkpoint")
    return fn


def _die_no_inspect(why: str):
    print(
        f"inspect_bench: avdiag.inspect_checkpoint is not available: {why}.\n"
        "inspect_bench: the implementation is not there yet (or not on PYTHONPATH); "
        "run with --stand-in to self-test the harness.",
        file=sys.stderr,
    )
    sys.exit(EXIT_NO_INSPECT)


def child_measure(mode: str, path: str, out: str, sample_ms: float, profile: bool) -> None:
    # Everything imported before the clock starts.
    import torch  # noqa: F401
    import safetensors.torch  # noqa: F401
    from safetensors import safe_open  # noqa: F401

    if mode == "inspect":
        fn = _resolve_inspect()
        work = lambda: run_inspect(path, fn)  # noqa: E731
    elif mode == "stand-in":
        work = lambda: stand_in_inspect(path)  # noqa: E731
    elif mode == "sha256":
        work = lambda: hash_file(path)  # noqa: E731
    elif mode == "bare":
        try:  # same imports as B, so the baselines match
            import avdiag  # noqa: F401
        except Exception:  # noqa: BLE001
            pass
        work = lambda: run_bare(path)  # noqa: E731
    else:  # pragma: no cover
        raise SystemExit(f"unknown child mode {mode!r}")

    gc.collect()
    reader = _StatusReader()
    base = reader.read()
    sampler = _PeakSampler(sample_ms / 1000.0)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    sampler.start()
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    summary = work()
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    sampler.stop()
    end = reader.read()
    reader.close()

    result = {
        "mode": mode,
        "path": path,
        "seconds": seconds,
        "baseline_anon": base["RssAnon"],
        "baseline_file": base["RssFile"],
        "baseline_rss": base["VmRSS"],
        "peak_anon": sampler.peak_anon,
        "peak_file": sampler.peak_file,
        "peak_anon_delta": sampler.peak_anon - base["RssAnon"],
        "peak_file_delta": sampler.peak_file - base["RssFile"],
        "vm_hwm": end["VmHWM"],
        "samples": sampler.samples,
        "summary": summary,
    }
    if prof is not None:
        import io
        import pstats

        text = io.StringIO()
        st = pstats.Stats(prof, stream=text)
        st.sort_stats("tottime").print_stats(20)
        st.sort_stats("cumulative").print_stats(25)
        result["profile"] = text.getvalue()
    Path(out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------
# Parent


class HarnessError(Exception):
    pass


def _child_env() -> dict:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return env


def _spawn(argv: list[str], what: str) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        proc = subprocess.run(
            cmd, env=_child_env(), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{what}: child timed out after {CHILD_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise HarnessError(f"{what}: child exited with status {proc.returncode}\n{tail}")


def measure(mode: str, path: Path, workdir: Path, sample_ms: float, profile=False) -> dict:
    out = workdir / f"result-{os.getpid()}-{time.monotonic_ns()}.json"
    argv = ["--child", mode, "--child-path", str(path), "--child-out", str(out)]
    argv += ["--sample-ms", str(sample_ms)]
    if profile:
        argv.append("--child-profile")
    _spawn(argv, f"{mode} on {path.name}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _mib(b: float) -> float:
    return b / MIB


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_format(fmt: str, path: Path, workdir: Path, args, largest_bytes: int) -> dict:
    b_mode = "stand-in" if args.stand_in else "inspect"
    # Untimed warm-ups: both read from the page cache afterwards.
    measure("bare", path, workdir, args.sample_ms)
    measure(b_mode, path, workdir, args.sample_ms)
    runs_a, runs_b = [], []
    for i in range(args.repeats):
        runs_a.append(measure("bare", path, workdir, args.sample_ms))
        runs_b.append(measure(b_mode, path, workdir, args.sample_ms))
        print(
            f"  [{fmt}] repeat {i + 1}/{args.repeats}: "
            f"A {runs_a[-1]['seconds']:.3f} s, B {runs_b[-1]['seconds']:.3f} s",
            flush=True,
        )

    def agg(runs):
        secs = [r["seconds"] for r in runs]
        anon = [r["peak_anon_delta"] for r in runs]
        filed = [r["peak_file_delta"] for r in runs]
        hwm = [r["vm_hwm"] for r in runs]
        return {
            "seconds": secs,
            "median_s": _median(secs),
            "min_s": min(secs),
            "max_s": max(secs),
            "peak_anon_delta_mib": [_mib(x) for x in anon],
            "median_peak_anon_delta_mib": _mib(_median(anon)),
            "max_peak_anon_delta_mib": _mib(max(anon)),
            "median_peak_file_delta_mib": _mib(_median(filed)),
            "median_vm_hwm_mib": _mib(_median(hwm)),
            "median_baseline_anon_mib": _mib(_median([r["baseline_anon"] for r in runs])),
            "summary": runs[-1]["summary"],
        }

    a, b = agg(runs_a), agg(runs_b)
    ratio = b["median_s"] / a["median_s"]
    paired = _median([rb["seconds"] / ra["seconds"] for ra, rb in zip(runs_a, runs_b)])
    mem_limit_mib = MEM_ALLOWANCE_MIB + _mib(largest_bytes)
    res = {
        "format": fmt,
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "largest_tensor_mib": _mib(largest_bytes),
        "A_bare_load_touch": a,
        "B": dict(b, what=("stand-in (harness self-test)" if args.stand_in else "avdiag.inspect_checkpoint")),
        "ratio_B_over_A_of_medians": ratio,
        "median_paired_ratio_B_over_A": paired,
        "speed_target": SPEED_TARGET,
        "speed_pass": ratio <= SPEED_TARGET,
        "memory_limit_mib": mem_limit_mib,
        "memory_pass": b["max_peak_anon_delta_mib"] < mem_limit_mib,
    }
    if args.hash_floor:
        secs = [measure("sha256", path, workdir, args.sample_ms)["seconds"] for _ in range(args.repeats)]
        res["sha256_only"] = {"seconds": secs, "median_s": _median(secs)}
    if args.profile:
        prof = measure(b_mode, path, workdir, args.sample_ms, profile=True)
        res["profile"] = prof.get("profile", "")
    return res


def print_table(res: dict, b_label: str) -> None:
    a, b = res["A_bare_load_touch"], res["B"]
    print()
    print(
        f"== {res['format']}: {res['file_bytes'] / 1e6:.1f} MB file, "
        f"largest tensor {res['largest_tensor_mib']:.1f} MiB"
    )
    hdr = (
        f"{'':28}{'median s':>9}{'min s':>8}{'max s':>8}"
        f"{'peak anon MiB':>15}{'(max)':>8}{'file-backed MiB':>17}{'VmHWM MiB':>11}"
    )
    print(hdr)
    for label, r in (("A bare load + touch", a), (f"B {b_label}", b)):
        print(
            f"{label:28}{r['median_s']:9.3f}{r['min_s']:8.3f}{r['max_s']:8.3f}"
            f"{r['median_peak_anon_delta_mib']:15.1f}{r['max_peak_anon_delta_mib']:8.1f}"
            f"{r['median_peak_file_delta_mib']:17.1f}{r['median_vm_hwm_mib']:11.1f}"
        )
    print(
        f"  peak anon = max RssAnon during the run minus RssAnon before it "
        f"(baseline after imports ~{b['median_baseline_anon_mib']:.0f} MiB); "
        "file-backed = RssFile growth (mmap-ed page cache, not private)"
    )
    verdict = "PASS" if res["speed_pass"] else "FAIL"
    print(
        f"{verdict} speed: B/A = {res['ratio_B_over_A_of_medians']:.2f} (ratio of medians; "
        f"median of paired ratios {res['median_paired_ratio_B_over_A']:.2f}), target <= {SPEED_TARGET}"
    )
    verdict = "PASS" if res["memory_pass"] else "FAIL"
    print(
        f"{verdict} memory: B peak anon {b['max_peak_anon_delta_mib']:.1f} MiB (worst of "
        f"{len(b['seconds'])}) < {MEM_ALLOWANCE_MIB:.0f} MiB + largest tensor "
        f"{res['largest_tensor_mib']:.1f} MiB = {res['memory_limit_mib']:.1f} MiB"
    )
    if "sha256_only" in res:
        h = res["sha256_only"]["median_s"]
        print(
            f"  sha256 of the file alone: median {h:.3f} s = {h / a['median_s']:.2f}x A "
            f"(a floor for B if inspect hashes the whole file before/besides reading tensors)"
        )
    if "profile" in res:
        print(f"\n-- cProfile of one B run on {res['format']} (profiling overhead included) --")
        print(res["profile"])


def main_parent(args) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FILE_NAMES]
    if bad or not formats:
        print(f"inspect_bench: unknown format(s) {bad}; choose from safetensors,pt", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.size_gb <= 0:
        print("inspect_bench: --repeats must be >= 1 and --size-gb > 0", file=sys.stderr)
        return 2
    if not Path("/proc/self/status").exists():
        print("inspect_bench: needs Linux (/proc/self/status)", file=sys.stderr)
        return 2

    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        remove = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="avdiag-bench-"))
        remove = not args.keep
    try:
        want = {"build_version": BUILD_VERSION, "size_gb": args.size_gb, "seed": args.seed, "formats": formats}
        manifest = _manifest_matches(workdir, want)
        if manifest is None:
            print(f"building ~{args.size_gb} GB checkpoint ({', '.join(formats)}) in {workdir} ...", flush=True)
            _spawn(
                ["--child", "build", "--child-path", str(workdir), "--size-gb", str(args.size_gb),
                 "--seed", str(args.seed), "--formats", ",".join(formats)],
                "build",
            )
            manifest = json.loads((workdir / "manifest.json").read_text())
            os.sync()  # no writeback of the fresh files during the timed runs
            print(f"  built in {manifest['build_s']:.1f} s", flush=True)
        else:
            print(f"reusing checkpoint in {workdir}", flush=True)
        largest = manifest["largest_tensor"]
        print(
            f"checkpoint: {manifest['n_tensors']} tensors, {manifest['tensor_bytes'] / 1e9:.3f} GB of data; "
            f"largest {largest['key']} {tuple(largest['shape'])} = {largest['bytes'] / MIB:.1f} MiB "
            f"({100 * largest['bytes'] / manifest['tensor_bytes']:.1f}% of total)"
        )
        b_label = "stand-in (self-test)" if args.stand_in else "avdiag.inspect_checkpoint"
        print(
            f"timing {args.repeats} interleaved runs of A (bare load + touch) and B ({b_label}) "
            "per format, each in a fresh process, after one warm-up of each",
            flush=True,
        )
        results = []
        for fmt in formats:
            path = workdir / FILE_NAMES[fmt]
            results.append(bench_format(fmt, path, workdir, args, largest["bytes"]))
        for res in results:
            print_table(res, b_label)
        all_pass = all(r["speed_pass"] and r["memory_pass"] for r in results)
        if args.stand_in:
            print("\nNOTE: B was the harness stand-in, not avdiag.inspect_checkpoint.")
        if args.json:
            doc = {
                "config": {
                    "size_gb": args.size_gb, "repeats": args.repeats, "formats": formats,
                    "seed": args.seed, "stand_in": args.stand_in, "sample_ms": args.sample_ms,
                },
                "machine": {
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                },
                "checkpoint": manifest,
                "results": results,
                "all_pass": all_pass,
            }
            try:
                import torch

                doc["machine"]["torch"] = torch.__version__
                doc["machine"]["torch_threads"] = torch.get_num_threads()
            except ImportError:
                pass
            Path(args.json).write_text(json.dumps(doc, indent=2))
            print(f"wrote {args.json}")
        return 0 if all_pass else 1
    except HarnessError as exc:
        print(f"\ninspect_bench: cannot measure: {exc}", file=sys.stderr)
        return 2
    finally:
        if remove:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"checkpoint kept in {workdir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time avdiag.inspect_checkpoint against a bare load that touches every tensor."
    )
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (default 1.0)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--workdir", help="where the checkpoints go (default: a temp dir, deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temp workdir")
    p.add_argument("--formats", default="safetensors,pt", help="comma list (default safetensors,pt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated weights (default 0)")
    p.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    p.add_argument("--profile", action="store_true", help="one extra B run under cProfile, printed")
    p.add_argument(
        "--hash-floor",
        action="store_true",
        help="also time a plain sha256 of the file (after the A/B runs): the floor for any inspect that hashes",
    )
    # Hidden: harness self-test and the child protocol.
    p.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sample-ms", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["build", "bare", "inspect", "stand-in", "sha256"], help=argparse.SUPPRESS)
    p.add_argument("--child-path", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "build":
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        child_build(Path(args.child_path), args.size_gb, args.seed, formats)
        return 0
    if args.child:
        child_measure(args.child, args.child_path, args.child_out, args.sample_ms, args.child_profile)
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
