"""`avdiag conflict CHECKPOINT --data SPEC`: per-modality gradient conflict and contribution."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from avdiag.cli.app import command
from avdiag.cli.options import AllowGlobalOpt, JsonOpt, QuietOpt, ReportOpt, UnsafeOpt, takes_data
from avdiag.cli.output import Outputs, warn_unsafe
from avdiag.errors import UsageError

TABLE_SUFFIXES = (".csv", ".parquet")


@command()
@takes_data
def conflict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint of an audio-visual classifier.")],
    ogm_alpha: Annotated[float, typer.Option("--ogm-alpha", help="OGM-GE alpha (0.8 CREMA-D, 0.1 VGGSound).")] = 0.8,
    heldout_split: Annotated[Optional[str], typer.Option("--heldout-split", help="Split for the learning state "
                             "(k-means purity gap); 'none' skips it.")] = "test",
    no_per_sample: Annotated[bool, typer.Option("--no-per-sample", help="Skip per-sample gradients.")] = False,
    train_mode: Annotated[bool, typer.Option("--train-mode", help="Per-batch gradients with BatchNorm in train "
                          "mode (as in a training step).")] = False,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", metavar="SIZE", help="Memory budget of the "
                          "gradient passes (2G, 512M); batches run in chunks that fit it [default: 2G on a CPU, half "
                          "the free memory of a GPU].")] = None,
    sketch: Annotated[Optional[int], typer.Option("--sketch", metavar="DIM", help="Approximate per-sample cosines "
                      "from a random projection of DIM numbers per layer; the error is measured and reported.")] = None,
    samples: Annotated[Optional[Path], typer.Option("--samples", metavar="PATH", help="Per-sample table: .csv or "
                       ".parquet.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write PNG plots here.")] = None,
    json_out: JsonOpt = None, report: ReportOpt = None, quiet: QuietOpt = False,
    allow_global: AllowGlobalOpt = [], unsafe: UnsafeOpt = False,
    data=None,
) -> int:
    """Per-modality gradient conflict and contribution on data (torchrun: one shard per process)."""
    from avdiag.report.progress import progress_for
    from avdiag.report.terminal.conflict import render_conflict
    from avdiag.workflows.conflict import conflict as run_conflict
    from avdiag.workflows.subject import LoadOptions

    if data is None:
        raise UsageError("avdiag conflict needs --data")
    if samples is not None and samples.suffix not in TABLE_SUFFIXES:
        raise UsageError(f"--samples {samples}: use a .csv or .parquet name")
    out = Outputs([checkpoint], json_out, report, quiet, files={"--samples": samples})
    warn_unsafe(unsafe)
    heldout = None if (heldout_split or "").lower() == "none" else heldout_split
    result = run_conflict(checkpoint, data, ogm_alpha=ogm_alpha, per_sample=not no_per_sample, heldout_split=heldout,
                          train_mode=train_mode, max_memory=max_memory, sketch=sketch,
                          load=LoadOptions(tuple(allow_global), unsafe),
                          progress=progress_for(quiet or not out.terminal))
    if result is None:  # a torchrun rank other than 0: rank 0 writes everything once
        return 0
    document = result.to_dict()
    if samples is not None:
        out.write_table("--samples", result.to_frame())
    if plots is not None:
        from avdiag.report.plots import write_conflict_plots

        write_conflict_plots(result.to_dict(samples=True), plots)
    out.emit(document, lambda console: render_conflict(result, console, quiet=quiet))
    return 0
