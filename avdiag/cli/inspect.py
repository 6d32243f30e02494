"""`avdiag inspect CHECKPOINT [--data SPEC]`: dead, abnormal and constant BatchNorm channels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from avdiag.cli.app import command
from avdiag.cli.options import AllowGlobalOpt, JsonOpt, QuietOpt, ReportOpt, UnsafeOpt, VerboseOpt, takes_data
from avdiag.cli.output import Outputs, warn_unsafe
from avdiag.errors import UsageError
from avdiag.measure.thresholds import ABNORMAL_PRESETS, ProbeThresholds, Thresholds

_STATIC = Thresholds()
_PROBE = ProbeThresholds()
_PRESETS = ", ".join(f"{k}={v:g}" for k, v in ABNORMAL_PRESETS.items())


@command()
@takes_data(model_without_data=True)
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file, or a sharded checkpoint folder.")],
    json_out: JsonOpt = None,
    report: ReportOpt = None,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="Add per-channel arrays to the JSON.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    modality: Annotated[list[str], typer.Option("--modality", metavar="NAME=PREFIX",
                        help="Assign layers under PREFIX to modality NAME (repeatable); overrides auto-detection.")]
        = [],
    bn_eps: Annotated[Optional[float], typer.Option("--bn-eps", help="BatchNorm eps where the graph does not tell "
                      "[default: the architecture's, else 1e-5].")] = None,
    dead_z: Annotated[float, typer.Option("--dead-z", help="Dead when z = beta/s is below this.")] = _STATIC.dead_z,
    abnormal: Annotated[Optional[float], typer.Option("--abnormal-threshold",
                        help="Abnormal affine pair: |gamma| and |beta| below this [default: 1e-10].")] = None,
    abnormal_preset: Annotated[Optional[str], typer.Option("--abnormal-preset",
                               help=f"Paper presets for the threshold: {_PRESETS}.")] = None,
    constant_scale: Annotated[float, typer.Option("--constant-scale",
                              help="Constant channel: effective scale s below this.")] = _STATIC.constant_scale,
    low_gain: Annotated[float, typer.Option("--low-gain", help="Low gain: |gamma| below this.")] = _STATIC.low_gain,
    collapsed: Annotated[float, typer.Option("--collapsed-filter", help="Collapsed filter: norm below this times "
                         "the layer's median.")] = _STATIC.collapsed_filter,
    assume_activation: Annotated[Optional[str], typer.Option("--assume-activation", metavar="ACT",
                                 help="Where what a BN feeds is unknown, assume ACT (e.g. relu).")] = None,
    dead_rate: Annotated[float, typer.Option("--dead-rate", help="Measured dead: fires at <= this fraction "
                         "of positions.")] = _PROBE.dead_rate,
    rare_rate: Annotated[float, typer.Option("--rare-rate", help="Rarely active: fires at <= this fraction.")]
        = _PROBE.rare_rate,
    dormant_tau: Annotated[float, typer.Option("--dormant-tau", metavar="TAU",
                           help="With --data: a unit of an activation, MLP, conv or attention layer is dormant when "
                                "its ReDo score (mean |output| over the layer's mean) is <= TAU; 0 means exactly zero "
                                "(within 1e-6). ReDo's values: 0, 0.025, 0.1.")] = 0.0,
    no_dormant: Annotated[bool, typer.Option("--no-dormant", help="With --data: skip the dormant-unit measurement.")]
        = False,
    allow_global: AllowGlobalOpt = [],
    unsafe: UnsafeOpt = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the file's SHA-256 (reported as null).")] = False,
    data=None,
    model=None,
) -> int:
    """Load a checkpoint safely and flag dead, abnormal and constant BatchNorm channels."""
    from avdiag.report.progress import progress_for
    from avdiag.report.terminal.inspect import render_inspect
    from avdiag.workflows.inspect import inspect as run_inspect
    from avdiag.workflows.subject import LoadOptions

    out = Outputs([checkpoint], json_out, report, quiet)
    thresholds = Thresholds(dead_z=dead_z, abnormal=abnormal_threshold(abnormal, abnormal_preset),
                            constant_scale=constant_scale, low_gain=low_gain, collapsed_filter=collapsed)
    if not 0.0 <= dormant_tau < 1.0:
        raise UsageError(f"--dormant-tau must be in [0, 1), got {dormant_tau:g}")
    warn_unsafe(unsafe)
    load = LoadOptions(tuple(allow_global), unsafe, list(modality) or None, bn_eps, assume_activation)
    result = run_inspect(checkpoint, thresholds=thresholds, data=data, model=model,
                         probe_thresholds=ProbeThresholds(dead_rate=dead_rate, rare_rate=rare_rate),
                         hash_file=not no_hash, load=load, progress=progress_for(quiet or not out.terminal),
                         dormant_tau=None if no_dormant else dormant_tau)
    out.emit(result.to_dict(per_channel=per_channel),
             lambda console: render_inspect(result, console, quiet=quiet, verbose=verbose),
             report_document=result.to_dict(per_channel=True) if report is not None else None)
    return 0


def abnormal_threshold(value: float | None, preset: str | None) -> float:
    if value is not None and preset is not None:
        raise UsageError("give --abnormal-threshold or --abnormal-preset, not both")
    if preset is not None:
        if preset not in ABNORMAL_PRESETS:
            raise UsageError(f"--abnormal-preset must be one of {', '.join(ABNORMAL_PRESETS)}, got {preset!r}")
        return ABNORMAL_PRESETS[preset]
    return _STATIC.abnormal if value is None else value
