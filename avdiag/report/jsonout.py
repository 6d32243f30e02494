"""Write a result's dict as JSON to a path or to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from avdiag.errors import UsageError


def write_json(data: dict[str, Any], target: str, protect: tuple[str | Path, ...] = ()) -> None:
    """Write ``data`` to ``target`` ('-' = stdout); never onto one of the ``protect`` paths (the inputs)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    for other in protect:
        if path.exists() and Path(other).exists() and path.resolve() == Path(other).resolve():
            raise UsageError(f"--json {target}: refusing to overwrite an input")
    if path.is_dir():
        raise UsageError(f"--json {target}: is a directory")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--json {target}: cannot write ({e.strerror})") from e
