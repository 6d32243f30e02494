"""Benchmark: the start-up cost of `avdiag --help` and `avdiag --version` against importing typer and rich.

The CLI imports torch and the heavy modules lazily, inside the command that needs them, so the
help and version screens should cost about what the CLI framework itself costs. Each command runs
``--repeats`` times, interleaved so that machine noise hits all of them alike; the medians and the
ratio to the baseline ``python -c "import typer, rich"`` are printed. The target (<= 1.5x) is for
``avdiag --help`` and ``avdiag --version``; a command's own help (``avdiag inspect --help``) is shown
for reference: typer builds that command's parameters, and its coercion layer imports pydantic.

    python benchmarks/startup_bench.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET = 1.5
TARGETED = ("avdiag --help", "avdiag --version")


def commands() -> dict[str, list[str]]:
    return {
        "baseline: import typer, rich": [sys.executable, "-c", "import typer, rich"],
        "avdiag --help": [sys.executable, "-m", "avdiag", "--help"],
        "avdiag --version": [sys.executable, "-m", "avdiag", "--version"],
        "avdiag inspect --help": [sys.executable, "-m", "avdiag", "inspect", "--help"],
        "reference: import torch": [sys.executable, "-c", "import torch"],
    }


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    runs = commands()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, argv in runs.items():  # warm the page cache once
        time_once(argv)
    for _ in range(args.repeats):
        for name, argv in runs.items():
            times[name].append(time_once(argv))
    base = statistics.median(times["baseline: import typer, rich"])
    print(f"{'command':32} {'median s':>9} {'ratio':>7}")
    worst = 0.0
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / base
        if name in TARGETED:
            worst = max(worst, ratio)
        print(f"{name:32} {median:9.3f} {ratio:6.2f}x")
    verdict = "meets" if worst <= TARGET else "misses"
    print(f"worst of {' / '.join(TARGETED)}: {worst:.2f}x: {verdict} the {TARGET}x target "
          f"({args.repeats} runs each, medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
