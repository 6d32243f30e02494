"""The `avdiag` Typer application: the root options, the error boundary, and the command registry.

Exit codes: 0 analysed; 1 policy violations (``check``); 2 unreadable, refused or usage error (one
line on stderr, no traceback; ``--debug`` shows it). Command modules import the library lazily inside
their functions, so ``avdiag --help`` and ``avdiag --version`` never import torch.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from typing import Annotated

import typer

from avdiag._version import __version__
from avdiag.errors import EXIT_ERROR, EXIT_OK, AvdiagError

app = typer.Typer(
    name="avdiag",
    help="Diagnose pre-trained audio-visual checkpoints: dead BatchNorm channels, modality imbalance.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _State:
    debug = False


def _set_debug(value: bool) -> bool:
    if value:
        _State.debug = True
        warnings.resetwarnings()
    return value


DebugOpt = Annotated[bool, typer.Option("--debug", callback=_set_debug, is_eager=True,
                                        help="Show tracebacks and warnings.")]


def _version(value: bool) -> None:
    if value:
        print(f"avdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          debug: DebugOpt = False) -> None:
    """avdiag: safe loading, dead-channel scans, rewrites, gradient conflict and a CI gate for
    audio-visual checkpoints."""


def command(name: str | None = None, group: typer.Typer | None = None):
    """Register a command on the app (or on a sub-command ``group``); it also takes ``--debug``
    (as ``avdiag CMD ... --debug``), and its usage shows plain metavars."""
    import functools
    import inspect

    def register(func):
        signature = inspect.signature(func, eval_str=True)
        for parameter in signature.parameters.values():
            _plain_metavar(parameter)
        debug = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt)

        @functools.wraps(func)
        def wrapper(*args, debug: bool = False, **kwargs):
            return func(*args, **kwargs)

        del wrapper.__wrapped__
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), debug])
        wrapper.__annotations__ = {**{p.name: p.annotation for p in signature.parameters.values()}, "debug": DebugOpt}
        (group or app).command(name)(wrapper)
        return func

    return register


_METAVARS = {str: "TEXT", int: "N", float: "X"}


def _plain_argument_display() -> None:
    """Typer writes a required argument as ``{CHECKPOINT}`` in usage lines and a repeated one's type as
    ``<list[str]>``; show ``CHECKPOINT`` and ``PATHS...`` with the element's type instead. Only applied
    where this typer has those hooks (older versions already print plain names)."""
    import re

    argument = getattr(typer.core, "TyperArgument", None)
    if argument is None or not hasattr(argument, "_usage_display_name") or getattr(argument, "_avdiag_plain", False):
        return
    usage, display_type = argument._usage_display_name, argument.display_type

    def plain_usage(self) -> str:
        name = usage(self)
        return name.replace("{", "").replace("}", "") if self.required else name

    def plain_type(self, ctx) -> str:
        return re.sub(r"list\[([^\]]*)\]", r"\1", display_type(self, ctx) or "")

    argument._usage_display_name, argument.display_type = plain_usage, plain_type
    argument._avdiag_plain = True


_plain_argument_display()


def _plain_metavar(parameter) -> None:
    """Usage lines without Python types: arguments by their upper-case name (CHECKPOINT, PATHS...), options
    by a plain word (TEXT, N, X, PATH) unless they name their own metavar (choices, formats)."""
    import typing
    from pathlib import Path

    annotation = parameter.annotation
    if typing.get_origin(annotation) is not typing.Annotated:
        return
    kind, *extras = typing.get_args(annotation)
    info = next((e for e in extras if isinstance(e, (typer.models.OptionInfo, typer.models.ArgumentInfo))), None)
    if info is None or info.metavar is not None:
        return
    if isinstance(info, typer.models.ArgumentInfo):
        info.metavar = parameter.name.upper()
        return
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if typing.get_args(kind) else kind
    if base is bool:
        return
    info.metavar = "PATH" if base is Path else _METAVARS.get(base)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error(line: str) -> None:
    sys.stderr.write(f"avdiag: error: {line}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (the console script passes it to sys.exit)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _State.debug = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stderr carries at most the one error line; --debug lifts this
        return _run(args)


def _run(args: list[str]) -> int:
    try:
        result = app(args=args, prog_name="avdiag", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except AvdiagError as e:
        _traceback()
        _error(_one_line(e))
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        _error("aborted")
        return EXIT_ERROR
    except typer.TyperException as e:  # usage errors from the argument parser
        _traceback()
        _error(_one_line(e.format_message()))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:  # a bug of ours: still one line, the traceback behind --debug
        _traceback()
        _error(f"internal error: {type(e).__name__}: {_one_line(e)[:300]} (rerun with --debug)")
        return EXIT_ERROR


def _traceback() -> None:
    if _State.debug:
        traceback.print_exc()

