#!/usr/bin/env python
"""Benchmark: the training step with ``avdiag.monitor.Monitor`` at its default settings against the
plain training step, side by side, and what each optional metric costs.

Acceptance target (from the issue): the monitored step at the monitor's defaults (per-step OGM-GE
scores, rho, coefficients and training-batch accuracies; the MMPareto cosine every
``DEFAULT_COSINE_EVERY`` = 100 steps; the dead-channel scan once per epoch) costs at most **1.10x**
the plain step.

What one invocation does (CPU, ``torch.set_num_threads(--threads)``):

1. Builds the OGM-GE classifier of ``avdiag.models`` (concat fusion, two ResNet-18 encoders at stem
   width ``--width``) and ``--batches`` distinct synthetic batches of ``--batch-size`` items
   (``synthetic`` spec below); SGD with momentum.
2. Warms up (untimed) both loops.
3. ``--rounds`` x ``--steps`` pairs of one plain step (forward, cross-entropy, backward, optimizer
   step) and one monitored step (the same plus ``monitor.step``), adjacent and in alternating
   order, so that the load drift of a shared machine hits both; every ``--steps`` monitored steps
   ``monitor.end_epoch()`` runs (timed apart: the per-epoch dead-channel scan).
4. The medians of the plain and monitored steps, the median paired overhead of the steps without a
   cosine and of those with one, the epoch end, and the amortised ratio
   ``(plain + overhead + cosine extra / cosine_every + epoch end / steps) / plain`` (exit 0 when it
   is at most ``--target``, 1 otherwise); also the ratio of the raw totals, which on a busy machine
   carries the load spikes of both kinds of step.
5. Each optional metric's own cost as a multiple of a plain step, each call paired with an adjacent
   plain step (medians of ``--repeats`` pairs): one MMPareto cosine (the monitor's, and the offline
   ``ConflictMeter`` in train mode for comparison), the dead-channel scan, the held-out accuracy /
   Shapley pass over ``--heldout`` items, the learning state over that many training and held-out
   items, and a whole training step with OGM-GE modulation and with MMPareto's gradient combination.

Usage::

    .venv/bin/python benchmarks/monitor_bench.py                  # < 2 min on 2 loaded cores
    .venv/bin/python benchmarks/monitor_bench.py --rounds 5 --width 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = "synthetic:n={n},classes=6,audio=0.9,visual=0.5,seed=0,f=32,t=24,size=16,frames=2"


def make_batches(n_batches: int, size: int, split: str = "train") -> list[dict]:
    from avdiag.data import make_loader, open_dataset

    data = open_dataset(SPEC.format(n=n_batches * size), split=split)
    return [{k: b[k] for k in ("audio", "visual", "label")} for b in make_loader(data, batch_size=size)]


class Loop:
    """One model and optimizer; ``step`` runs one training step, monitored or not."""

    def __init__(self, width: int):
        from avdiag.models import OGMGEClassifier

        torch.manual_seed(0)
        self.model = OGMGEClassifier(6, "concat", width=width)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def step(self, batch: dict, monitor=None) -> None:
        _, _, logits = self.model(batch["audio"], batch["visual"])
        loss = F.cross_entropy(logits, batch["label"])
        self.optimizer.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step(batch, logits, loss)
        self.optimizer.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(loop: Loop, batch: dict, fn, repeats: int) -> tuple[float, float]:
    """Medians of ``fn`` and of a plain step, each call adjacent to a plain step (order alternating)."""
    plain, measured = [], []
    for i in range(repeats):
        first, second = (lambda: loop.step(batch), fn) if i % 2 else (fn, lambda: loop.step(batch))
        t1, t2 = timed(first), timed(second)
        plain.append(t1 if i % 2 else t2)
        measured.append(t2 if i % 2 else t1)
    return statistics.median(measured), statistics.median(plain)


def side_by_side(loop: Loop, batches: list[dict], args) -> dict:
    """Plain and monitored steps in adjacent pairs; see the module docstring (3, 4)."""
    from avdiag.monitor import Monitor

    monitor = Monitor(loop.model, None, keep_records=False)  # the defaults
    for i in range(3):
        loop.step(batches[i % len(batches)])
        loop.step(batches[i % len(batches)], monitor)
    monitor.step_count = 0  # the warm-up steps do not shift the cosine schedule
    plain, monitored, with_cosine, epoch_ends = [], [], [], []
    for i in range(args.rounds * args.steps):
        batch = batches[i % len(batches)]
        if i % 2:
            t_plain, t_mon = timed(lambda: loop.step(batch)), timed(lambda: loop.step(batch, monitor))
        else:
            t_mon, t_plain = timed(lambda: loop.step(batch, monitor)), timed(lambda: loop.step(batch))
        plain.append(t_plain)
        (with_cosine if monitor.step_count % monitor.cosine_every == 0 else monitored).append((t_mon, t_plain))
        if monitor.step_count % args.steps == 0:
            epoch_ends.append(timed(monitor.end_epoch))
    monitor.close()
    p = statistics.median(plain)
    per_step = statistics.median([m - q for m, q in monitored])
    cosine_extra = statistics.median([m - q for m, q in with_cosine]) if with_cosine else 0.0
    epoch_end = statistics.median(epoch_ends) if epoch_ends else 0.0
    amortised = p + per_step + cosine_extra / monitor.cosine_every + epoch_end / args.steps
    total_mon = sum(m for m, _ in monitored + with_cosine) + sum(epoch_ends)
    return {"pairs": len(plain), "plain_median_s": p,
            "monitored_median_s": statistics.median([m for m, _ in monitored]),
            "per_step_overhead_s": per_step, "cosine_step_extra_s": cosine_extra, "epoch_end_s": epoch_end,
            "monitored_amortised_s": amortised, "ratio": amortised / p, "ratio_of_totals": total_mon / sum(plain),
            "defaults": {"every": 1, "cosine_every": monitor.cosine_every, "dead_channels": True}}


def optional_costs(loop: Loop, batches: list[dict], args) -> dict:
    from avdiag.measure.conflict import ConflictMeter
    from avdiag.monitor import Monitor
    from avdiag.monitor.epoch import heldout_metrics, learning_state_metrics
    from avdiag.monitor.interventions import measure_cosines

    probe = Monitor(loop.model, None, keep_records=False, cosine_every=0)
    parts, device, batch = probe.parts, torch.device("cpu"), batches[0]
    n = max(1, args.heldout // args.batch_size)
    heldout, train_probe = make_batches(n, args.batch_size, "test"), batches[:n]
    calls = {
        "cosine (the monitor's, one batch)": lambda: measure_cosines(probe._gradients, batch, batch["label"]),
        "cosine (offline ConflictMeter, train mode, for comparison)":
            lambda: ConflictMeter(parts, device, per_sample=False, train_mode=True).add(batch),
        "dead-channel scan": probe.scan.counts,
        f"held-out accuracy + Shapley ({n * args.batch_size} items)":
            lambda: heldout_metrics(parts, heldout, device, 0.8),
        f"learning state ({len(train_probe) * args.batch_size} + {n * args.batch_size} items)":
            lambda: learning_state_metrics(parts, train_probe, heldout, device, 0),
    }
    out = {}
    for name, fn in calls.items():
        m, p = paired(loop, batch, fn, args.repeats)
        out[name] = {"median_s": m, "x_plain_step": m / p}
    probe.close()
    for name, modulation in (("training step with OGM-GE modulation", "ogm-ge"),
                             ("training step with MMPareto combination", "mmpareto")):
        with Monitor(loop.model, None, keep_records=False, cosine_every=0, dead_channels=False,
                     modulation=modulation) as monitor:
            loop.step(batch, monitor)
            m, p = paired(loop, batch, lambda: loop.step(batch, monitor), args.repeats)
        out[name] = {"median_s": m, "x_plain_step": m / p}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="avdiag.monitor overhead against the plain training step")
    parser.add_argument("--width", type=int, default=8, help="ResNet-18 stem width [8]")
    parser.add_argument("--batch-size", type=int, default=16, help="items per batch [16]")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through [4]")
    parser.add_argument("--steps", type=int, default=100, help="step pairs per epoch [100]")
    parser.add_argument("--rounds", type=int, default=3, help="epochs [3]")
    parser.add_argument("--repeats", type=int, default=5, help="pairs per optional-metric timing [5]")
    parser.add_argument("--heldout", type=int, default=64, help="items of the held-out / learning-state passes [64]")
    parser.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    parser.add_argument("--target", type=float, default=1.10, help="the ratio to stay under [1.10]")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loop = Loop(args.width)
    batches = make_batches(args.batches, args.batch_size)
    start = time.perf_counter()
    main_result = side_by_side(loop, batches, args)
    costs = optional_costs(loop, batches, args)
    out = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                       "processor": platform.processor() or platform.machine()},
           "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"data": SPEC},
           **main_result, "optional": costs, "seconds": time.perf_counter() - start}
    r = main_result
    print(f"plain step        {1e3 * r['plain_median_s']:8.2f} ms (median of {r['pairs']} steps, each paired with "
          f"a monitored one)")
    print(f"monitored step    {1e3 * r['monitored_median_s']:8.2f} ms (median, steps without a cosine; paired "
          f"overhead {1e3 * r['per_step_overhead_s']:.2f} ms)")
    print(f"cosine step extra {1e3 * r['cosine_step_extra_s']:8.2f} ms every {r['defaults']['cosine_every']} steps; "
          f"epoch end (dead-channel scan) {1e3 * r['epoch_end_s']:.2f} ms every {args.steps} steps")
    print(f"ratio             {r['ratio']:8.3f}x amortised (target <= {args.target:g}x); raw totals "
          f"{r['ratio_of_totals']:.3f}x")
    for name, c in costs.items():
        print(f"  {name:58s} {1e3 * c['median_s']:8.1f} ms = {c['x_plain_step']:5.2f} plain steps")
    print(f"total {out['seconds']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if main_result["ratio"] <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
