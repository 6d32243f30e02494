"""Every option shared by several commands, declared once.

Commands list the output and load options by these aliases; the data options (23 of them) are added
to a command by :func:`takes_data`, which also turns them into one :class:`DataSource`. This module
imports only typer and torch-free parts of avdiag, so ``avdiag --help`` never imports torch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from avdiag.errors import UsageError

JsonOpt = Annotated[Optional[str], typer.Option("--json", metavar="PATH",
                    help="Write the JSON report to PATH ('-' = stdout, and nothing else on stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line; no progress.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print every row and informational finding, "
                       "not only the rows that carry a finding.")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", metavar="PATH",
                      help="Also write a self-contained report: PATH.html (plots embedded) or PATH.md.")]
AllowGlobalOpt = Annotated[list[str], typer.Option("--allow-global", metavar="pkg.Class",
                           help="Admit this pickle global as an inert placeholder (repeatable).")]
UnsafeOpt = Annotated[bool, typer.Option("--unsafe", help="DANGER: load with full pickle, which runs any code "
                      "in the file. Only for files you made yourself.")]

DATA_PANEL = "Data (run the model on real data)"


def _data_option(*names: str, **kwargs: Any) -> Any:
    return typer.Option(*names, rich_help_panel=DATA_PANEL, **kwargs)


# name -> (annotation, default): the parameters takes_data adds to a command.
DATA_PARAMETERS: dict[str, tuple[Any, Any]] = {
    "data": (Annotated[Optional[str], _data_option(
        "--data", metavar="SPEC", help="Data to run the model on: cremad:ROOT, vggsound:ROOT, ks:ROOT, ave:ROOT "
        "(layout detected from the files; name the folders with NAME:ROOT,audio=DIR,frames=DIR,list=FILE, "
        "{split} in them becoming train/test), avdigits:DIR, a bare name under $AVDIAG_DATA, a .npz/.safetensors "
        "tensor file, an image or wav folder, synthetic[:k=v,...], pkg.mod:factory.")], None),
    "model": (Annotated[Optional[str], _data_option(
        "--model", metavar="pkg.module:factory",
        help="Build the model with this factory (strict load) instead of the built-in registry.")], None),
    "visual_layout": (Annotated[Optional[str], _data_option(
        "--visual-layout", metavar="BCTHW|BTCHW", help="BCTHW or BTCHW: how a --model factory wants clips, "
        "(B,3,T,H,W) or (B,T,3,H,W) [default: its visual_layout attribute, else BCTHW].")], None),
    "device": (Annotated[str, _data_option("--device", metavar="auto|cpu|cuda[:N]", help="Where the model runs.")],
               "auto"),
    "split": (Annotated[str, _data_option("--split", help="Dataset split.")], "train"),
    "batch_size": (Annotated[int, _data_option("--batch-size", min=1, help="Samples per batch.")], 32),
    "limit": (Annotated[Optional[int], _data_option(
        "--limit", min=1, help="Use at most this many samples (a seeded random subset).")], None),
    "num_workers": (Annotated[int, _data_option("--num-workers", min=0, help="DataLoader worker processes.")], 0),
    "seed": (Annotated[int, _data_option("--seed", help="Seed of the sample selection.")], 0),
    "amp": (Annotated[bool, _data_option("--amp", help="Autocast on GPU (bfloat16 where supported, else float16); "
                                         "std-based verdicts become approximate.")], False),
    "tf32": (Annotated[bool, _data_option("--tf32", help="Allow TF32 matmuls and convolutions on GPU: faster, but "
                                          "per-sample cosines move by ~1e-4..1e-3 [default: full float32].")], False),
    "float64": (Annotated[bool, _data_option("--float64", help="Run the model and the measurements in float64: the "
                                             "reference that tells float32 rounding from a real effect (slower).")],
                False),
    "image_size": (Annotated[Optional[int], _data_option("--image-size", help="Resize images (folders).")], None),
    "mean": (Annotated[Optional[str], _data_option("--mean", metavar="R,G,B", help="Image normalisation mean.")],
             None),
    "std": (Annotated[Optional[str], _data_option("--std", metavar="R,G,B", help="Image normalisation std.")], None),
    "sample_rate": (Annotated[Optional[int], _data_option("--sample-rate", help="Expected wav sample rate.")], None),
    "class_order": (Annotated[Optional[str], _data_option(
        "--class-order", help="e.g. ogm or alphabetical (CREMA-D).")], None),
    "frames": (Annotated[Optional[int], _data_option("--frames", min=1, help="Visual frames per item.")], None),
    "seconds": (Annotated[Optional[float], _data_option("--seconds", help="Audio duration (tile/crop).")], None),
    "n_fft": (Annotated[Optional[int], _data_option("--n-fft", min=2, help="STFT size.")], None),
    "hop": (Annotated[Optional[int], _data_option("--hop", min=1, help="STFT hop.")], None),
    "strict_data": (Annotated[bool, _data_option(
        "--strict-data", help="Stop with an error at the first list row whose files are missing, damaged or have "
        "too few frames [default: skip such rows, as the research loaders do, and report them].")], False),
    "audio_start": (Annotated[Optional[float], _data_option(
        "--audio-start", metavar="SECONDS", min=0.0, help="Where the audio crop starts, in seconds from the start "
        "of the clip (cremad, vggsound wav audio) [default: cremad 0, vggsound 2.5, the middle of the "
        "training draw range].")], None),
    "resample": (Annotated[bool, _data_option(
        "--resample", help="Resample wav files whose rate differs from the dataset's (as librosa.load(sr=...) "
        "does) instead of refusing them.")], False),
}


def takes_data(command: Callable[..., Any] | None = None, *, model_without_data: bool = False) -> Any:
    """Add every data option to ``command`` and call it with ``data=`` one DataSource (None without --data).
    ``model_without_data``: ``--model`` is also accepted alone and passed as ``model=`` (the static scan
    reads what each BatchNorm feeds from the model)."""
    if command is None:
        return functools.partial(takes_data, model_without_data=model_without_data)
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name not in ("data", "model")]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in DATA_PARAMETERS.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in DATA_PARAMETERS}
        model = {"model": values["model"]} if model_without_data else {}
        return command(*args, data=data_source(**values, model_alone=model_without_data), **model, **kwargs)

    del wrapper.__wrapped__  # typer must read the new signature, not the command's own
    wrapper.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    return wrapper


def data_source(data: str | None, model: str | None, visual_layout: str | None, device: str, split: str,
                batch_size: int, limit: int | None, num_workers: int, seed: int, amp: bool, tf32: bool, float64: bool,
                image_size: int | None,
                mean: str | None, std: str | None, sample_rate: int | None, class_order: str | None,
                frames: int | None, seconds: float | None, n_fft: int | None, hop: int | None, resample: bool,
                strict_data: bool = False, audio_start: float | None = None, model_alone: bool = False):
    """The DataSource the data options describe, or None when no --data was given (``model_alone``: a
    --model without --data is the caller's to use)."""
    if data is None:
        alone = (("--model", None if model_alone else model), ("--visual-layout", visual_layout))
        given = [flag for flag, value in alone if value is not None]
        if given:
            raise UsageError(f"{given[0]} is used with --data (the model is only run on data)")
        if strict_data or audio_start is not None:
            raise UsageError(f"{'--strict-data' if strict_data else '--audio-start'} is used with --data")
        return None
    from avdiag.data.base import DataOptions
    from avdiag.workflows.datasource import DataSource

    options = DataOptions(image_size=image_size, mean=floats(mean, "--mean"), std=floats(std, "--std"),
                          sample_rate=sample_rate, class_order=class_order, frames=frames, seconds=seconds,
                          n_fft=n_fft, hop=hop, resample=resample, audio_start=audio_start)
    return DataSource(data, split=split, options=options, model=model, visual_layout=visual_layout, device=device,
                      batch_size=batch_size, limit=limit, num_workers=num_workers, seed=seed, amp=amp, tf32=tf32,
                      float64=float64, strict_data=strict_data)


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` -> (0.5, 0.5, 0.5); a one-line UsageError for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise UsageError(f"{option} wants comma-separated numbers, got {text!r}") from e
