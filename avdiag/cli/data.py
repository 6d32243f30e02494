"""`avdiag data build NAME DIR`: build a dataset offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from avdiag.cli.app import app, command
from avdiag.errors import UsageError

data_app = typer.Typer(help="Build and check datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@command("build", group=data_app)
def build(
    name: Annotated[str, typer.Argument(help="Dataset to build: avdigits.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created).")],
    max_voices: Annotated[Optional[int], typer.Option("--max-voices", min=2, help="Fewer voices: a quick build.")]
        = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the voice split and pairing.")] = 0,
) -> int:
    """Build a dataset offline (avdigits: spoken digits by many voices + real handwritten digits)."""
    from avdiag.data import build_avdigits

    if name != "avdigits":
        raise UsageError(f"unknown dataset {name!r}: avdiag can build avdigits")
    path = build_avdigits(out_dir, max_voices=max_voices, seed=seed)
    print(f"built avdigits in {path}")
    print(f"next: use it with --data avdigits:{path} (e.g. avdiag inspect CKPT --data avdigits:{path})")
    return 0
