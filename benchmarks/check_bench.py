#!/usr/bin/env python
"""Benchmark: one ``avdiag.workflows.check.check`` call over many checkpoints against one
``python -m avdiag inspect`` process per checkpoint.

Acceptance target (from the issue): checking 50 small checkpoints in one process is at
least **10x** faster than inspecting them one process each, the way a shell loop or a
pre-commit hook without ``check`` would.

What one invocation does:

1. Builds ``--n`` (50) deterministic small audio-visual checkpoints in ``--workdir`` (a
   temporary folder unless given): the OGM-GE classifier of ``avdiag.models`` (two
   ResNet-18 encoders at stem width ``--width``, 8: 1200 BatchNorm channels, ~1.5 MB),
   trained-looking BN statistics, a few dead channels planted per file (seeded by the
   file's number); even-numbered files as ``torch.save({'model': sd})`` ``.pt``, odd ones
   as ``.safetensors``.
2. Warms the page cache with one untimed ``check`` over the folder.
3. Times, in this one run:

   A  ``check([folder])`` in this process (avdiag already imported), with the
      default policy (no SHA-256);
   A' the same in a fresh child process, its interpreter start and imports included
      (what ``avdiag check folder/`` costs end to end);
   B  ``python -m avdiag inspect FILE -q --no-hash`` once per file, one after the other
      (same scan, same no-hash setting; each pays the interpreter start and the torch
      import).

4. Prints the seconds, the per-file cost of each, and the ratios B/A and B/A'. Exit
   status 0 when B/A >= ``--target`` (10), 1 when not, 2 when something failed (a child
   exited non-zero, a checkpoint was not analysed).

Usage::

    .venv/bin/python benchmarks/check_bench.py                   # 50 files, width 8
    .venv/bin/python benchmarks/check_bench.py --n 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def build(folder: Path, n: int, width: int) -> list[Path]:
    from safetensors.torch import save_file

    from avdiag.models import OGMGEClassifier

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        torch.manual_seed(i)
        model = OGMGEClassifier(6, width=width)
        with torch.no_grad():
            bns = sorted((name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
            for _, bn in bns:
                c = bn.num_features
                bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                bn.weight.copy_((1.0 + 0.1 * torch.randn(c, generator=gen)).clamp_min(0.5))
                bn.bias.copy_(0.05 * torch.randn(c, generator=gen))
            # a few dead channels in a BN that feeds a ReLU (a block's bn1)
            modules = dict(model.named_modules())
            bn1 = modules["audio_net.layer1.0.bn1"]
            dead = torch.randperm(bn1.num_features, generator=gen)[: 1 + i % 3]
            bn1.weight[dead] = 0.05
            bn1.bias[dead] = -0.5
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if i % 2 == 0:
            path = folder / f"ckpt_{i:03d}.pt"
            torch.save({"model": sd, "epoch": i}, path)
        else:
            path = folder / f"ckpt_{i:03d}.safetensors"
            save_file(sd, str(path))
        paths.append(path)
    return paths


def time_check_in_process(folder: Path) -> tuple[float, object]:
    from avdiag.workflows.check import Policy, check

    policy = Policy()  # the defaults: the benchmark must not pick up a policy from the cwd
    start = time.perf_counter()
    result = check([str(folder)], policy)
    return time.perf_counter() - start, result


def time_check_child(folder: Path) -> float:
    code = ("import sys; from avdiag.workflows.check import Policy, check; "
            "r = check([sys.argv[1]], Policy()); "
            "sys.exit(0 if all(f.analysed for f in r.files) else 3)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"check child exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return elapsed


def time_inspect_processes(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        proc = subprocess.run([sys.executable, "-m", "avdiag", "inspect", str(path), "-q", "--no-hash"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"avdiag inspect {path} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="number of checkpoints [50]")
    parser.add_argument("--width", type=int, default=8, help="ResNet stem width of each checkpoint [8]")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints [a temp dir, deleted]")
    parser.add_argument("--target", type=float, default=10.0, help="required B/A ratio [10]")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="check_bench_")) if temp else args.workdir
    folder = workdir / "models"
    try:
        if folder.exists():
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        paths = build(folder, args.n, args.width)
        size = sum(p.stat().st_size for p in paths)
        print(f"built {len(paths)} checkpoints ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s "
              f"under {folder}")

        warm, result = time_check_in_process(folder)  # untimed warm-up: page cache, lazy imports
        if len(result.checkpoints) != len(paths) or not all(f.analysed for f in result.checkpoints):
            print(f"error: check analysed {sum(f.analysed for f in result.checkpoints)} of {len(paths)} files: "
                  f"{result.summary_line()}")
            return 2
        print(f"warm-up check: {warm:.2f} s; {result.summary_line()}")

        a, _ = time_check_in_process(folder)
        a_child = time_check_child(folder)
        b = time_inspect_processes(paths)
    except RuntimeError as e:
        print(f"error: {e}")
        return 2
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)

    n = len(paths)
    ratio, ratio_child = b / a, b / a_child
    print()
    print(f"{'approach':58} {'seconds':>8} {'per file':>9}")
    print(f"{'A   check, one call, in process':58} {a:8.2f} {1000 * a / n:7.0f} ms")
    print(f"{'A2  check in a fresh process (start + imports)':58} {a_child:8.2f} {1000 * a_child / n:7.0f} ms")
    print(f"{'B   python -m avdiag inspect -q --no-hash, one per file':58} {b:8.2f} {1000 * b / n:7.0f} ms")
    print()
    print(f"B/A  = {ratio:.1f}x  (target >= {args.target:g}x): {'PASS' if ratio >= args.target else 'FAIL'}")
    print(f"B/A2 = {ratio_child:.1f}x  (end to end, one `avdiag check` process; informational)")
    if args.json:
        args.json.write_text(json.dumps({
            "n": n, "width": args.width, "bytes": size, "check_in_process_s": a, "check_child_s": a_child,
            "inspect_processes_s": b, "ratio": ratio, "ratio_child": ratio_child, "target": args.target,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        }, indent=2) + "\n")
    return 0 if ratio >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
