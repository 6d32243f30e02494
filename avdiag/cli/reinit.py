"""`avdiag reinit CHECKPOINT --out PATH --method M`: ABRi, resets, re-learning, BN recalibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from avdiag.cli.app import command
from avdiag.cli.options import AllowGlobalOpt, JsonOpt, QuietOpt, ReportOpt, UnsafeOpt, VerboseOpt, takes_data
from avdiag.cli.output import Outputs, stderr_line, warn_unsafe
from avdiag.errors import UsageError


@command()
@takes_data
def reinit(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to rewrite (never modified without --in-place).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the patched checkpoint "
                   "(same format as the input; a .safetensors name converts).")] = None,
    method: Annotated[str, typer.Option("--method", metavar="abri|reset|relearn|recalibrate",
                                        help="abri, reset, relearn or recalibrate.")] = "abri",
    mode: Annotated[str, typer.Option("--mode", metavar="fold|module", help="abri: fold (drop-in checkpoint) or module "
                    "(re-parametrisation with extra keys).")] = "fold",
    alpha: Annotated[float, typer.Option("--alpha", help="abri: weight of the pretrained branch.")] = 0.5,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="abri module: one alpha per channel.")] = False,
    exact_blend: Annotated[bool, typer.Option("--exact-blend", help="abri fold: the paper's blend with --alpha on "
                           "every channel, even where it leaves a channel dead [default: such channels get the "
                           "largest smaller alpha that revives them, listed as revived beyond the blend].")] = False,
    revive_margin: Annotated[float, typer.Option("--revive-margin", help="abri fold: a revived channel's z ends at "
                             "least this far above the dead threshold (z < -3), i.e. z >= -1 by default.")] = 2.0,
    scope: Annotated[str, typer.Option("--scope", metavar="flagged|layers|all", help="flagged (channels), layers "
                     "(holding flagged channels) or all (BN layers).")] = "flagged",
    modality: Annotated[list[str], typer.Option("--modality", metavar="NAME|NAME=PREFIX",
                        help="Restrict to modality NAME; NAME=PREFIX defines a modality as with inspect.")] = [],
    stats: Annotated[Optional[str], typer.Option("--stats", metavar="reset|blend|data", help="abri fold running "
                     "statistics: reset, blend or data [default: data with --data, else blend].")] = None,
    variant: Annotated[str, typer.Option("--variant", metavar="all|tiny-gamma", help="reset: all (every BN) or "
                       "tiny-gamma (channels with |gamma| < 1e-6).")] = "all",
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
    json_out: JsonOpt = None, report: ReportOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = False,
    allow_global: AllowGlobalOpt = [], unsafe: UnsafeOpt = False,
    data=None,
) -> int:
    """Rewrite a checkpoint (ABRi, reset, re-learning, BN recalibration), verify it, report what changed."""
    from avdiag.report.terminal.reinit import render_reinit
    from avdiag.workflows.reinit import ReinitOptions
    from avdiag.workflows.reinit import reinit as run_reinit
    from avdiag.workflows.subject import LoadOptions

    if out is None and not in_place:
        raise UsageError("give --out PATH (or --in-place to overwrite the input)")
    restrict = [m for m in modality if "=" not in m]
    if len(restrict) > 1:
        raise UsageError("--modality NAME restricts to one modality")
    target = out or checkpoint
    outputs = Outputs([checkpoint, target], json_out, report, quiet)
    alphas = {k: v for k, v in (("audio", alpha_audio), ("visual", alpha_visual)) if v is not None}
    settings = dict(mode=mode, alpha=alpha, per_channel=per_channel, exact_blend=exact_blend,
                    revive_margin=revive_margin, scope=scope, stats=stats, variant=variant,
                    lam=lam, alphas=alphas, init_ckpt=str(init_ckpt) if init_ckpt else None, seed=init_seed)
    options = ReinitOptions.from_flags(method, settings, modality=restrict[0] if restrict else None)
    for flag in _unused_flags(settings, options.settings):
        stderr_line(f"avdiag: warning: {flag} does not apply to --method {method} (ignored)")
    warn_unsafe(unsafe)
    load = LoadOptions(tuple(allow_global), unsafe, [m for m in modality if "=" in m] or None)
    result = run_reinit(checkpoint, target, options, data=data, load=load, in_place=in_place,
                        drop_optimizer=drop_optimizer)
    for warning in result.warnings if result.target is not None else []:  # else the summary line says it
        stderr_line(f"avdiag: warning: {warning}")
    outputs.emit(result.to_dict(), lambda console: render_reinit(result, console, quiet=quiet, verbose=verbose))
    return 0


# The flags a method may take, with their command-line defaults (a flag left at its default is not "given").
_FLAGS = {"mode": ("--mode", "fold"), "alpha": ("--alpha", 0.5), "per_channel": ("--per-channel", False),
          "exact_blend": ("--exact-blend", False), "revive_margin": ("--revive-margin", 2.0),
          "scope": ("--scope", "flagged"), "stats": ("--stats", None), "variant": ("--variant", "all"),
          "lam": ("--lam", 3.0), "alphas": ("--alpha-audio/--alpha-visual", {}), "init_ckpt": ("--init-ckpt", None),
          "seed": ("--init-seed", 0)}


def _unused_flags(given: dict, settings) -> list[str]:
    """The flags given with a non-default value that the chosen method's settings have no field for."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(settings)} if dataclasses.is_dataclass(settings) else set()
    return [_FLAGS[name][0] for name, value in given.items()
            if name not in known and name in _FLAGS and value != _FLAGS[name][1]]
