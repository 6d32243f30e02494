"""Modality imbalance as it develops in training, without and with OGM-GE, watched by ``avdiag.monitor``.

The built-in OGM-GE classifier (two ResNet-18 encoders of width W, concat fusion) is trained twice on
the same imbalanced synthetic audio-visual set (``synthetic:audio=0.95,visual=0.7``: every audio item
shows its class's pattern 95 % of the time, every visual item 70 %), with the same seed, head
initialisation and batch order: once plainly, once with OGM-GE's gradient modulation and
generalisation enhancement applied by the monitor (``modulation="ogm-ge"``). Each run is monitored
with the defaults plus a small held-out loader (accuracy, Shapley values) and writes its run log;
both logs go into one report. Nothing is planted: the numbers printed and drawn are the run's.

Run::

    python examples/imbalance_dynamics.py                  # a few minutes on 2 CPU cores
    python examples/imbalance_dynamics.py --quick          # well under a minute (the test uses it)
    python examples/imbalance_dynamics.py --out /tmp/imb   # where the logs and the report go

Then ``avdiag report OUT/plain.jsonl OUT/ogm_ge.jsonl -o report.md`` or ``avdiag check OUT/plain.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from avdiag.data import make_loader, open_dataset
from avdiag.measure.runlog import read_run_log
from avdiag.models import OGMGEClassifier
from avdiag.monitor import Monitor
from avdiag.workflows.report import report

SETTINGS = {  # name -> (train items, held-out items, epochs, width, batch size)
    "quick": (128, 64, 3, 4, 32),
    "full": (768, 256, 8, 8, 32),
}
DATA = "synthetic:n={n},classes=6,audio=0.95,visual=0.7,seed=0,f=32,t=24,size=16,frames=1"


def load_split(n: int, split: str) -> dict[str, torch.Tensor]:
    """The whole split as one batch dict (small enough to keep in memory)."""
    batches = list(make_loader(open_dataset(DATA.format(n=n), split=split), batch_size=n))
    return {k: batches[0][k] for k in ("audio", "visual", "label")}


def batches_of(data: dict[str, torch.Tensor], size: int, generator: torch.Generator | None) -> list[dict]:
    n = data["label"].shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [{k: v[order[i:i + size]] for k, v in data.items()} for i in range(0, n, size)]


def train(name: str, modulation: str | None, train_data: dict, heldout: list[dict], epochs: int, width: int,
          batch_size: int, out: Path) -> Path:
    torch.manual_seed(0)
    model = OGMGEClassifier(6, "concat", width=width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    log = out / f"{name}.jsonl"
    order = torch.Generator().manual_seed(1)  # the same batch order in both runs
    with Monitor(model, log, heldout=heldout, modulation=modulation, cosine_every=4) as monitor:
        for _ in range(epochs):
            model.train()
            for batch in batches_of(train_data, batch_size, order):
                _, _, logits = model(batch["audio"], batch["visual"])
                loss = F.cross_entropy(logits, batch["label"])
                optimizer.zero_grad()
                loss.backward()
                monitor.step(batch, logits, loss)
                optimizer.step()
            monitor.end_epoch()
    return log


def summary(log_path: Path) -> dict:
    log = read_run_log(log_path)
    last = log.epochs[-1]
    held = last.get("heldout", {})
    return {"run": log_path.stem, "epochs": len(log.epochs),
            "mean_rho_audio_last_epoch": last["means"]["rho"]["audio"],
            "mean_rho_audio_first_epoch": log.epochs[0]["means"]["rho"]["audio"],
            "heldout_fused": held.get("fused_accuracy"),
            "heldout_audio": held.get("unimodal_accuracy", {}).get("audio"),
            "heldout_visual": held.get("unimodal_accuracy", {}).get("visual"),
            "shapley_audio": held.get("shapley_accuracy", {}).get("audio"),
            "shapley_visual": held.get("shapley_accuracy", {}).get("visual"),
            "cos_visual_last_epoch": last["means"].get("cos", {}).get("visual"),
            "dead_channels_last": {m: v["dead"] for m, v in last.get("dead_channels", {}).items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (well under a minute), for tests")
    parser.add_argument("--out", type=Path, default=Path("imbalance_dynamics"),
                        help="folder for the two run logs and report.html / report.md [imbalance_dynamics]")
    args = parser.parse_args(argv)
    n_train, n_held, epochs, width, batch_size = SETTINGS["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    train_data = load_split(n_train, "train")
    heldout = batches_of(load_split(n_held, "test"), 64, None)
    logs = [train(name, modulation, train_data, heldout, epochs, width, batch_size, args.out)
            for name, modulation in (("plain", None), ("ogm_ge", "ogm-ge"))]
    results = [read_run_log(p).to_result() for p in logs]
    for target in (args.out / "report.html", args.out / "report.md"):
        report(results, target, title="Modality imbalance during training: plain vs OGM-GE",
               images=target.suffix == ".md")
    rows = [summary(p) for p in logs]
    print(json.dumps(rows, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(f"wrote {', '.join(str(p) for p in logs)} and {args.out / 'report.html'} in "
          f"{time.perf_counter() - start:.0f} s")
    return {"logs": logs, "summary": rows}


if __name__ == "__main__":
    main()
