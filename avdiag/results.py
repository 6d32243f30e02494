"""The result contract every command's result follows.

``to_dict()`` of every result (the ``--json`` document) carries:

- ``schema_version``: :data:`SCHEMA_VERSION` (one number for every command);
- ``tool``: ``{"name": "avdiag", "version": ..., "command": ...}``;
- ``checkpoints``: a list of :class:`CheckpointRef` dicts, the checkpoints the command read, in order;
- ``summary``: an object whose ``text`` is the one-line summary the terminal prints.

Floats that are not finite (NaN, +-Inf) are JSON ``null`` everywhere (:func:`json_safe`). Every result
also has ``to_frame()``: the same figures as a pandas DataFrame, one row per natural unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avdiag._version import __version__

SCHEMA_VERSION = "1.1"


@dataclass(frozen=True)
class CheckpointRef:
    """Which checkpoint a result is about."""

    path: str
    format: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "sha256": self.sha256}


def finite(value: float | None) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, numpy scalars and arrays as Python values,
    tuples as lists and paths as strings: what ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        return [json_safe(v) for v in items]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(obj.tolist())
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return obj


def envelope(command: str, checkpoints: list[CheckpointRef | dict[str, Any]], summary: dict[str, Any],
             body: dict[str, Any]) -> dict[str, Any]:
    """A result's JSON document: the contract's keys first, then the command's own ``body``."""
    if "text" not in summary:
        raise ValueError("a result summary needs a 'text' field")
    refs = [c.to_dict() if isinstance(c, CheckpointRef) else dict(c) for c in checkpoints]
    doc = {"schema_version": SCHEMA_VERSION, "tool": {"name": "avdiag", "version": __version__, "command": command},
           "checkpoints": refs, **body, "summary": summary}
    return json_safe(doc)
