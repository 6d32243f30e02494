"""The whole pipeline on avdiag's built-in audio-visual transformer, with no download.

The built-in transformer (``avdiag.models.arch.av_transformer``: patch embeddings for the spectrogram
and the frames, two pre-norm blocks per modality, concat fusion) is trained briefly on AV digits
(spoken digits synthesised offline by espeak-ng / flite, paired by label with real handwritten digit
images; built into OUT/avdigits on the first run), or, with ``--quick``, on avdiag's synthetic
audio-visual set. Then, on the saved checkpoint, exactly what a user would run:

* ``inspect --data``: the static LayerNorm scan and the dormant units (ReDo) of every MLP and attention
  layer on the held-out split;
* ``conflict``: the per-sample gradient conflict between the fused and the uni-modal losses, and the
  modality contribution (Shapley values), through the adapter protocol the transformer follows;
* ``report``: both results in one HTML report.

Run::

    python examples/av_transformer.py                  # AV digits, a few minutes on 2 CPU cores
    python examples/av_transformer.py --quick          # synthetic data, well under a minute (a test uses it)
    python examples/av_transformer.py --out /tmp/avt   # where the checkpoint, JSON and report go

Then ``avdiag inspect OUT/av_transformer.pt --data avdigits:OUT/avdigits --split test`` and
``avdiag conflict OUT/av_transformer.pt --data avdigits:OUT/avdigits`` give the same results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from avdiag.data import build_avdigits, make_loader, open_dataset
from avdiag.models.arch.av_transformer import AVTransformer
from avdiag.workflows.conflict import conflict
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.inspect import inspect
from avdiag.workflows.report import report

SETTINGS = {  # name -> (epochs, width, depth, batch size, probe / conflict limit)
    "quick": (2, 16, 1, 16, 32),
    "full": (6, 32, 2, 32, 256),
}
QUICK_DATA = "synthetic:n=96,classes=6,audio=0.9,visual=0.7,seed=0,f=32,t=24,size=16,frames=1"


def data_spec(out: Path, quick: bool) -> str:
    if quick:
        return QUICK_DATA
    folder = out / "avdigits"
    if not (folder / "avdigits.json").is_file():
        build_avdigits(folder)
    return f"avdigits:{folder}"


def train(spec: str, epochs: int, width: int, depth: int, batch_size: int) -> tuple[AVTransformer, list[float]]:
    dataset = open_dataset(spec, split="train")
    batches = list(make_loader(dataset, batch_size=batch_size, seed=0))
    n_classes = len(dataset.classes) or int(max(int(b["label"].max()) for b in batches)) + 1
    torch.manual_seed(0)
    model = AVTransformer(n_classes, dim=width, depth=depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        total = 0.0
        for i in torch.randperm(len(batches), generator=order).tolist():
            batch = batches[i]
            loss = F.cross_entropy(model(batch["audio"], batch["visual"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["label"])
        losses.append(total / len(dataset))
    return model.eval(), losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic data and a tiny model (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path("av_transformer"),
                        help="folder for the checkpoint, the JSON results and report.html [av_transformer]")
    args = parser.parse_args(argv)
    epochs, width, depth, batch_size, limit = SETTINGS["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    spec = data_spec(args.out, args.quick)
    model, losses = train(spec, epochs, width, depth, batch_size)
    checkpoint = args.out / "av_transformer.pt"
    torch.save(model.state_dict(), checkpoint)

    inspected = inspect(checkpoint, data=DataSource(spec, split="test", batch_size=64, device="cpu", limit=limit))
    conflicted = conflict(checkpoint, DataSource(spec, split="train", batch_size=32, device="cpu", limit=limit))
    results = [inspected.to_dict(per_channel=True)] + ([conflicted.to_dict()] if conflicted is not None else [])
    for result in results:
        (args.out / f"{result['tool']['command']}.json").write_text(json.dumps(result, indent=1))
    report(results, args.out / "report.html", title="avdiag on the built-in AV transformer")
    summary = {"data": spec, "train_loss": losses, "inspect": inspected.summary_line(),
               "dormant": inspected.dormant.to_dict()["modalities"] if inspected.dormant else None,
               "conflict": conflicted.summary_line() if conflicted is not None else None}
    print(json.dumps(summary, indent=1))
    print(f"wrote {checkpoint}, inspect.json, conflict.json and {args.out / 'report.html'} in "
          f"{time.perf_counter() - start:.0f} s")
    return {"checkpoint": checkpoint, "inspect": inspected, "conflict": conflicted, "train_loss": losses}


if __name__ == "__main__":
    main()
