"""The `avdiag` command line. Each command parses options, calls the library, renders the result.

Exit codes: 0 analysed; 2 unreadable, refused or usage error (one line on stderr, no traceback;
``--debug`` shows it).
"""

from __future__ import annotations

import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from avdiag._version import __version__
from avdiag.errors import EXIT_ERROR, EXIT_OK, AvdiagError, UsageError
from avdiag.measure.probe import ProbeThresholds
from avdiag.measure.thresholds import ABNORMAL_PRESETS, Thresholds

app = typer.Typer(
    name="avdiag",
    help="Diagnose pre-trained audio-visual checkpoints: dead BatchNorm channels, modality imbalance.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_DEFAULTS = Thresholds()

# Options shared by several commands, declared once.
JsonOpt = Annotated[Optional[str], typer.Option("--json", metavar="PATH",
                    help="Write the JSON report to PATH ('-' = stdout, and nothing else on stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", metavar="PATH",
                      help="Also write a self-contained report: PATH.html (plots embedded) or PATH.md.")]
AllowGlobalOpt = Annotated[list[str], typer.Option("--allow-global", metavar="pkg.Class",
                           help="Admit this pickle global as an inert placeholder (repeatable).")]
UnsafeOpt = Annotated[bool, typer.Option("--unsafe", help="DANGER: load with full pickle, which runs any code "
                      "in the file. Only for files you made yourself.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Data to run the model on: "
                    "cremad:ROOT, vggsound:ROOT, ks:ROOT, ave:ROOT, avdigits:DIR, a bare name under $AVDIAG_DATA, "
                    "a .npz/.safetensors tensor file, an image or wav folder, synthetic[:k=v,...], pkg.mod:factory.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", metavar="pkg.module:factory",
                     help="Build the model with this factory (strict load) instead of the built-in registry.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1)]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use at most this many samples "
                     "(a seeded random subset).")]
WorkersOpt = Annotated[int, typer.Option("--num-workers", min=0)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sample selection.")]
AmpOpt = Annotated[bool, typer.Option("--amp", help="Autocast on GPU.")]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Resize images (folders).")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", metavar="R,G,B", help="Image normalisation mean.")]
StdOpt = Annotated[Optional[str], typer.Option("--std", metavar="R,G,B", help="Image normalisation std.")]
SampleRateOpt = Annotated[Optional[int], typer.Option("--sample-rate", help="Expected wav sample rate.")]
ClassOrderOpt = Annotated[Optional[str], typer.Option("--class-order", help="e.g. ogm or alphabetical (CREMA-D).")]
FramesOpt = Annotated[Optional[int], typer.Option("--frames", min=1, help="Visual frames per item.")]
SecondsOpt = Annotated[Optional[float], typer.Option("--seconds", help="Audio duration (tile/crop).")]
NFftOpt = Annotated[Optional[int], typer.Option("--n-fft", min=2, help="STFT size.")]
HopOpt = Annotated[Optional[int], typer.Option("--hop", min=1, help="STFT hop.")]
VisualLayoutOpt = Annotated[Optional[str], typer.Option("--visual-layout", help="BCTHW or BTCHW: how a --model "
                          "factory wants clips, (B,3,T,H,W) or (B,T,3,H,W) [default: its visual_layout attribute, "
                          "else BCTHW].")]
ResampleOpt = Annotated[bool, typer.Option("--resample", help="Resample wav files whose rate differs from the "
                        "dataset's (as librosa.load(sr=...) does) instead of refusing them.")]


@dataclass
class DataArgs:
    """The data-related options of a command, gathered into the library's ProbeOptions."""

    data: str | None
    model: str | None
    device: str
    split: str
    batch_size: int
    limit: int | None
    num_workers: int
    seed: int
    amp: bool
    image_size: int | None
    mean: str | None
    std: str | None
    sample_rate: int | None
    class_order: str | None
    frames: int | None
    seconds: float | None
    n_fft: int | None
    hop: int | None
    resample: bool
    visual_layout: str | None = None

    def options(self, thresholds: ProbeThresholds | None = None, progress: bool = False):
        from avdiag.data import DataOptions
        from avdiag.inspection import ProbeOptions

        if self.data is None:
            if self.model is not None:
                raise UsageError("--model is used with --data (the model is only run on data)")
            return None
        if self.visual_layout is not None and (self.model is None or self.visual_layout not in ("BCTHW", "BTCHW")):
            raise UsageError("--visual-layout is BCTHW or BTCHW, for a --model factory (built-in models take "
                             "(B,3,T,H,W))")
        data_options = DataOptions(image_size=self.image_size, mean=_floats(self.mean, "--mean"),
                                   std=_floats(self.std, "--std"), sample_rate=self.sample_rate,
                                   class_order=self.class_order, frames=self.frames, seconds=self.seconds,
                                   n_fft=self.n_fft, hop=self.hop, resample=self.resample)
        return ProbeOptions(data=self.data, model=self.model, device=self.device, split=self.split,
                            batch_size=self.batch_size, limit=self.limit, num_workers=self.num_workers,
                            seed=self.seed, amp=self.amp, thresholds=thresholds or ProbeThresholds(),
                            data_options=data_options, progress=progress, visual_layout=self.visual_layout)



def _version(value: bool) -> None:
    if value:
        print(f"avdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """avdiag: safe loading, dead-channel scans and rewrites for audio-visual checkpoints."""


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file, or a sharded checkpoint folder.")],
    json_out: JsonOpt = None,
    report: ReportOpt = None,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="Add per-channel arrays to the JSON.")] = False,
    quiet: QuietOpt = False,
    modality: Annotated[list[str], typer.Option("--modality", metavar="NAME=PREFIX",
                        help="Assign layers under PREFIX to modality NAME (repeatable); overrides auto-detection.")] = [],
    bn_eps: Annotated[Optional[float], typer.Option("--bn-eps", help="BatchNorm eps where the graph does not tell "
                      "[default: the architecture's, else 1e-5].")] = None,
    dead_z: Annotated[float, typer.Option("--dead-z", help="Dead when z = beta/s is below this.")] = _DEFAULTS.dead_z,
    abnormal: Annotated[Optional[float], typer.Option("--abnormal-threshold",
                        help="Abnormal affine pair: |gamma| and |beta| below this [default: 1e-10].")] = None,
    abnormal_preset: Annotated[Optional[str], typer.Option("--abnormal-preset",
                               help=f"Paper presets for the threshold: {', '.join(f'{k}={v:g}' for k, v in ABNORMAL_PRESETS.items())}.")] = None,
    constant_scale: Annotated[float, typer.Option("--constant-scale",
                              help="Constant channel: effective scale s below this.")] = _DEFAULTS.constant_scale,
    low_gain: Annotated[float, typer.Option("--low-gain", help="Low gain: |gamma| below this.")] = _DEFAULTS.low_gain,
    collapsed: Annotated[float, typer.Option("--collapsed-filter",
                         help="Collapsed filter: norm below this times the layer's median.")] = _DEFAULTS.collapsed_filter,
    assume_activation: Annotated[Optional[str], typer.Option("--assume-activation", metavar="ACT",
                                 help="Where what a BN feeds is unknown, assume ACT (e.g. relu).")] = None,
    allow_global: AllowGlobalOpt = [],
    unsafe: UnsafeOpt = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the file's SHA-256 (reported as null).")] = False,
    data: DataOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", split: SplitOpt = "train",
    batch_size: BatchSizeOpt = 32, limit: LimitOpt = None, num_workers: WorkersOpt = 0, seed: SeedOpt = 0,
    amp: AmpOpt = False,
    dead_rate: Annotated[float, typer.Option("--dead-rate", help="Measured dead: fires at <= this fraction "
                         "of positions.")] = ProbeThresholds().dead_rate,
    rare_rate: Annotated[float, typer.Option("--rare-rate", help="Rarely active: fires at <= this fraction.")]
        = ProbeThresholds().rare_rate,
    image_size: ImageSizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, sample_rate: SampleRateOpt = None,
    class_order: ClassOrderOpt = None, frames: FramesOpt = None, seconds: SecondsOpt = None, n_fft: NFftOpt = None,
    hop: HopOpt = None, resample: ResampleOpt = False, visual_layout: VisualLayoutOpt = None,
    debug: DebugOpt = False,
) -> int:
    """Load a checkpoint safely and flag dead, abnormal and constant BatchNorm channels."""
    from avdiag.inspection import inspect_checkpoint
    from avdiag.report.jsonout import write_json
    from avdiag.report.terminal import render_inspect

    thresholds = Thresholds(dead_z=dead_z, abnormal=_abnormal(abnormal, abnormal_preset),
                            constant_scale=constant_scale, low_gain=low_gain, collapsed_filter=collapsed)
    if unsafe:
        _stderr("avdiag: WARNING: --unsafe loads with full pickle: code inside the file runs with your rights")
    probe = DataArgs(data, model, device, split, batch_size, limit, num_workers, seed, amp, image_size, mean, std,
                     sample_rate, class_order, frames, seconds, n_fft, hop, resample, visual_layout).options(
        ProbeThresholds(dead_rate=dead_rate, rare_rate=rare_rate), progress=not quiet and sys.stderr.isatty())
    result = inspect_checkpoint(checkpoint, thresholds=thresholds, modality=list(modality), bn_eps=bn_eps,
                                assume_activation=assume_activation, allow_globals=list(allow_global),
                                unsafe=unsafe, hash_file=not no_hash, probe=probe)
    if json_out is not None:
        write_json(result.to_dict(per_channel=per_channel), json_out, protect=(checkpoint,))
    if report is not None:
        _write_report([result.to_dict(per_channel=True)], report)
    if json_out != "-":
        render_inspect(result, _console(), quiet=quiet)
    return EXIT_OK


@app.command()
def reinit(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to rewrite (never modified without --in-place).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the patched checkpoint "
                   "(same format as the input; a .safetensors name converts).")] = None,
    method: Annotated[str, typer.Option("--method", help="abri, reset, relearn or recalibrate.")] = "abri",
    mode: Annotated[str, typer.Option("--mode", help="abri: fold (drop-in checkpoint) or module "
                    "(re-parametrisation with extra keys).")] = "fold",
    alpha: Annotated[float, typer.Option("--alpha", help="abri: weight of the pretrained branch.")] = 0.5,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="abri module: one alpha per channel.")] = False,
    scope: Annotated[str, typer.Option("--scope", help="flagged (channels), layers (holding flagged channels) "
                     "or all (BN layers).")] = "flagged",
    modality: Annotated[list[str], typer.Option("--modality", metavar="NAME|NAME=PREFIX",
                        help="Restrict to modality NAME; NAME=PREFIX defines a modality as with inspect.")] = [],
    stats: Annotated[Optional[str], typer.Option("--stats", help="abri fold running statistics: reset, blend or "
                     "data [default: data with --data, else blend].")] = None,
    variant: Annotated[str, typer.Option("--variant", help="reset: all (every BN) or tiny-gamma "
                       "(channels with |gamma| < 1e-6).")] = "all",
    lam: Annotated[float, typer.Option("--lam", help="relearn: alpha = tanh(lam * purity gap).")] = 3.0,
    alpha_audio: Annotated[Optional[float], typer.Option("--alpha-audio", help="relearn: skip the diagnosis "
                           "for audio.")] = None,
    alpha_visual: Annotated[Optional[float], typer.Option("--alpha-visual", help="relearn: skip the diagnosis "
                            "for visual.")] = None,
    init_ckpt: Annotated[Optional[Path], typer.Option("--init-ckpt", help="relearn: the initial weights "
                         "[default: the architecture's initialisation with --init-seed].")] = None,
    init_seed: Annotated[int, typer.Option("--init-seed", help="relearn: seed of the generated initialisation.")]
        = 0,
    in_place: Annotated[bool, typer.Option("--in-place", help="Overwrite the input (atomically).")] = False,
    drop_optimizer: Annotated[bool, typer.Option("--drop-optimizer", help="Remove the (stale) optimizer state.")]
        = False,
    json_out: JsonOpt = None, report: ReportOpt = None, quiet: QuietOpt = False,
    data: DataOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", split: SplitOpt = "train",
    batch_size: BatchSizeOpt = 32, limit: LimitOpt = None, num_workers: WorkersOpt = 0, seed: SeedOpt = 0,
    image_size: ImageSizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, sample_rate: SampleRateOpt = None,
    class_order: ClassOrderOpt = None, frames: FramesOpt = None, seconds: SecondsOpt = None, n_fft: NFftOpt = None,
    hop: HopOpt = None, resample: ResampleOpt = False,
    allow_global: AllowGlobalOpt = [], unsafe: UnsafeOpt = False, debug: DebugOpt = False,
) -> int:
    """Rewrite a checkpoint (ABRi, reset, re-learning, BN recalibration), verify it, report what changed."""
    from avdiag.report.jsonout import write_json
    from avdiag.report.rewrite_terminal import render_rewrite
    from avdiag.rewrite.reinit import RewriteOptions, reinit_checkpoint

    if out is None and not in_place:
        raise UsageError("give --out PATH (or --in-place to overwrite the input)")
    restrict = [m for m in modality if "=" not in m]
    if len(restrict) > 1:
        raise UsageError("--modality NAME restricts to one modality")
    alphas = {k: v for k, v in (("audio", alpha_audio), ("visual", alpha_visual)) if v is not None}
    source = DataArgs(data, model, device, split, batch_size, limit, num_workers, seed, False, image_size, mean, std,
                      sample_rate, class_order, frames, seconds, n_fft, hop, resample).options()
    options = RewriteOptions(method=method, mode=mode, alpha=alpha, per_channel=per_channel, scope=scope,
                             modality=restrict[0] if restrict else None, stats=stats, variant=variant, lam=lam,
                             alphas=alphas, init_ckpt=str(init_ckpt) if init_ckpt else None, seed=init_seed,
                             data=source)
    if unsafe:
        _stderr("avdiag: WARNING: --unsafe loads with full pickle: code inside the file runs with your rights")
    result = reinit_checkpoint(checkpoint, out or checkpoint, options,
                               modality_prefixes=[m for m in modality if "=" in m] or None,
                               allow_globals=tuple(allow_global), unsafe=unsafe, in_place=in_place,
                               drop_optimizer=drop_optimizer)
    for warning in result.warnings:
        _stderr(f"avdiag: warning: {warning}")
    if json_out is not None:
        write_json(result.to_dict(), json_out, protect=(checkpoint, result.target))
    if report is not None:
        _write_report([result.to_dict()], report)
    if json_out != "-":
        render_rewrite(result, _console(), quiet=quiet)
    return EXIT_OK


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="The checkpoint before.")],
    b: Annotated[Path, typer.Argument(help="The checkpoint after.")],
    json_out: JsonOpt = None, report: ReportOpt = None, quiet: QuietOpt = False,
    atol: Annotated[float, typer.Option("--atol", help="Values within this absolute difference count as "
                    "unchanged [default: 0, bitwise].")] = 0.0,
    allow_global: AllowGlobalOpt = [], unsafe: UnsafeOpt = False, debug: DebugOpt = False,
) -> int:
    """Compare two checkpoints: tensors added/removed/changed, channels that died or revived."""
    from avdiag.measure.diff import diff_checkpoints
    from avdiag.report.diff_terminal import render_diff
    from avdiag.report.jsonout import write_json

    if unsafe:
        _stderr("avdiag: WARNING: --unsafe loads with full pickle: code inside the file runs with your rights")
    result = diff_checkpoints(a, b, allow_globals=tuple(allow_global), unsafe=unsafe, atol=atol)
    if json_out is not None:
        write_json(result.to_dict(), json_out, protect=(a, b))
    if report is not None:
        _write_report([result.to_dict()], report)
    if json_out != "-":
        render_diff(result, _console(), quiet=quiet)
    return EXIT_OK


@app.command()
def check(
    paths: Annotated[list[str], typer.Argument(help="Checkpoints, folders (searched recursively) or globs.")],
    policy: Annotated[Optional[Path], typer.Option("--policy", metavar="PATH", help="avdiag.toml ([check]) or "
                      "pyproject.toml ([tool.avdiag.check]) [default: found in the current folder].")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", metavar="OLD", help="Fail when dead channels "
                        "grew (with --data: a modality's contribution fell) versus OLD (a checkpoint, or a folder of "
                        "same-named ones).")] = None,
    json_out: JsonOpt = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", metavar="PATH", help="JUnit XML: one testcase per "
                     "file and rule.")] = None,
    sarif: Annotated[Optional[Path], typer.Option("--sarif", metavar="PATH", help="SARIF 2.1.0 log.")] = None,
    report: ReportOpt = None,
    fail_on: Annotated[Optional[str], typer.Option("--fail-on", help="error or warning.")] = None,
    on_nothing_analysed: Annotated[Optional[str], typer.Option("--on-nothing-analysed",
                                   help="error, violation or pass.")] = None,
    quiet: QuietOpt = False, allow_global: AllowGlobalOpt = [],
    data: DataOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", split: SplitOpt = "train",
    batch_size: BatchSizeOpt = 32, limit: LimitOpt = None, num_workers: WorkersOpt = 0, seed: SeedOpt = 0,
    amp: AmpOpt = False,
    ogm_alpha: Annotated[float, typer.Option("--ogm-alpha", help="OGM-GE alpha of the contribution rule.")] = 0.8,
    image_size: ImageSizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, sample_rate: SampleRateOpt = None,
    class_order: ClassOrderOpt = None, frames: FramesOpt = None, seconds: SecondsOpt = None, n_fft: NFftOpt = None,
    hop: HopOpt = None, resample: ResampleOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Check checkpoints against a policy (CI gate). Exit 0 pass, 1 policy violations, 2 errors.

    With --data, each checkpoint's model also runs on the data: probe findings, and the contribution
    and conflict rules (and, with --baseline, a fall in a modality's contribution)."""
    from avdiag.check import Policy, check_paths
    from avdiag.report.ci import write_reports

    rules = Policy.load(policy).with_overrides(fail_on=fail_on, on_nothing_analysed=on_nothing_analysed)
    source = DataArgs(data, model, device, split, batch_size, limit, num_workers, seed, amp, image_size, mean, std,
                      sample_rate, class_order, frames, seconds, n_fft, hop, resample).options()
    result = check_paths(paths, rules, baseline=baseline, allow_globals=tuple(allow_global), data=source,
                         ogm_alpha=ogm_alpha, progress=not quiet and json_out != "-" and sys.stderr.isatty())
    write_reports(result, console=_console(), json_out=json_out, junit_out=junit, sarif_out=sarif, quiet=quiet)
    if report is not None:
        _write_report([result.to_dict()], report)
    return result.exit_code


@app.command()
def conflict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint of a built-in audio-visual classifier.")],
    data: DataOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", split: SplitOpt = "train",
    batch_size: BatchSizeOpt = 32, limit: LimitOpt = None, num_workers: WorkersOpt = 0, seed: SeedOpt = 0,
    image_size: ImageSizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, sample_rate: SampleRateOpt = None,
    class_order: ClassOrderOpt = None, frames: FramesOpt = None, seconds: SecondsOpt = None, n_fft: NFftOpt = None,
    hop: HopOpt = None, resample: ResampleOpt = False,
    ogm_alpha: Annotated[float, typer.Option("--ogm-alpha", help="OGM-GE alpha (0.8 CREMA-D, 0.1 VGGSound).")] = 0.8,
    heldout_split: Annotated[Optional[str], typer.Option("--heldout-split", help="Split for the learning state "
                             "(k-means purity gap); 'none' skips it.")] = "test",
    no_per_sample: Annotated[bool, typer.Option("--no-per-sample", help="Skip per-sample gradients.")] = False,
    train_mode: Annotated[bool, typer.Option("--train-mode", help="Per-batch gradients with BatchNorm in train "
                          "mode (as in a training step).")] = False,
    samples: Annotated[Optional[Path], typer.Option("--samples", metavar="PATH", help="Per-sample table: .csv or "
                       ".parquet.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write PNG plots here.")] = None,
    json_out: JsonOpt = None, report: ReportOpt = None, quiet: QuietOpt = False,
    allow_global: AllowGlobalOpt = [], unsafe: UnsafeOpt = False, debug: DebugOpt = False,
) -> int:
    """Per-modality gradient conflict and contribution on data (torchrun: one shard per process)."""
    from avdiag.imbalance import ImbalanceOptions, analyse_imbalance
    from avdiag.report.conflict_view import render_imbalance, write_plots
    from avdiag.report.jsonout import write_json

    if data is None:
        raise UsageError("avdiag conflict needs --data")
    source = DataArgs(data, model, device, split, batch_size, limit, num_workers, seed, False, image_size, mean, std,
                      sample_rate, class_order, frames, seconds, n_fft, hop, resample).options()
    if unsafe:
        _stderr("avdiag: WARNING: --unsafe loads with full pickle: code inside the file runs with your rights")
    options = ImbalanceOptions(source, ogm_alpha=ogm_alpha, per_sample=not no_per_sample,
                               heldout_split=None if (heldout_split or "").lower() == "none" else heldout_split,
                               train_mode=train_mode)
    result = analyse_imbalance(checkpoint, options, allow_globals=tuple(allow_global), unsafe=unsafe)
    if result is None:  # a torchrun rank other than 0: rank 0 writes everything once
        return EXIT_OK
    if json_out is not None:
        write_json(result.to_dict(), json_out, protect=(checkpoint,))
    if samples is not None:
        _write_table(result.samples_frame(), samples)
    if plots is not None:
        write_plots(result, plots)
    if report is not None:
        _write_report([result.to_dict()], report)
    if json_out != "-":
        render_imbalance(result, _console(), quiet=quiet)
    return EXIT_OK


def _write_table(frame, path: Path) -> None:
    if path.suffix == ".parquet":
        try:
            frame.to_parquet(path)
        except ImportError as e:
            raise UsageError(f"--samples {path}: Parquet needs pyarrow (pip install pyarrow), or use .csv") from e
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise UsageError(f"--samples {path}: use a .csv or .parquet name")



@app.command("report")
def report_cmd(
    results: Annotated[list[Path], typer.Argument(help="JSON results of avdiag commands (--json output).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="report.html (self-contained, plots embedded) "
                      "or report.md (for pull-request comments).")],
    title: Annotated[Optional[str], typer.Option("--title")] = None,
    images: Annotated[bool, typer.Option("--images", help="Markdown: write the plots as PNGs beside the report.")]
        = False,
    debug: DebugOpt = False,
) -> int:
    """Render one HTML or Markdown report from the JSON results of other commands."""
    from avdiag.report.html import load_results, write_report

    write_report(load_results(results), output, title=title, images=images)
    print(f"wrote {output}")
    return EXIT_OK


def _write_report(results: list[dict], path: Path, title: str | None = None) -> None:
    from avdiag.report.html import write_report

    write_report(results, path, title=title)


def _console() -> Console:
    # Piped output gets a wide page instead of rich's 80 columns, so tables are not truncated.
    return Console(width=shutil.get_terminal_size((120, 40)).columns)


def _abnormal(value: float | None, preset: str | None) -> float:
    if value is not None and preset is not None:
        raise UsageError("give --abnormal-threshold or --abnormal-preset, not both")
    if preset is not None:
        if preset not in ABNORMAL_PRESETS:
            raise UsageError(f"--abnormal-preset must be one of {', '.join(ABNORMAL_PRESETS)}, got {preset!r}")
        return ABNORMAL_PRESETS[preset]
    return _DEFAULTS.abnormal if value is None else value


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise UsageError(f"{option} wants comma-separated numbers, got {text!r}") from e


data_app = typer.Typer(help="Build and check datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("build")
def data_build(
    name: Annotated[str, typer.Argument(help="Dataset to build: avdigits.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created).")],
    max_voices: Annotated[Optional[int], typer.Option("--max-voices", min=2, help="Fewer voices: a quick build.")]
        = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> int:
    """Build a dataset offline (avdigits: spoken digits by many voices + real handwritten digits)."""
    from avdiag.data import build_avdigits

    if name != "avdigits":
        raise UsageError(f"unknown dataset {name!r}: avdiag can build avdigits")
    path = build_avdigits(out_dir, max_voices=max_voices, seed=seed)
    print(f"built avdigits in {path}")
    return EXIT_OK


def _stderr(line: str) -> None:
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (the console script passes it to sys.exit)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")  # stderr carries at most the one error line
        return _run(args, debug)


def _run(args: list[str], debug: bool) -> int:
    try:
        result = app(args=args, prog_name="avdiag", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except AvdiagError as e:
        if debug:
            traceback.print_exc()
        _stderr(f"avdiag: error: {_one_line(e)}")
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        _stderr("avdiag: error: aborted")
        return EXIT_ERROR
    except typer.TyperException as e:  # usage errors from the argument parser
        if debug:
            traceback.print_exc()
        _stderr(f"avdiag: error: {_one_line(e.format_message())}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _stderr("avdiag: error: interrupted")
        return 130
    except Exception as e:  # a bug of ours: still one line, the traceback behind --debug
        if debug:
            traceback.print_exc()
        _stderr(f"avdiag: error: internal error: {type(e).__name__}: {_one_line(e)[:300]} (rerun with --debug)")
        return EXIT_ERROR
