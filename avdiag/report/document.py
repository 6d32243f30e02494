"""The report document: results in, a titled list of sections out, for the renderers to draw.

:func:`build_document` turns result dicts (commands' ``to_dict()``, or ``--json`` files read back) into
a :class:`Document`: one :class:`Section` per result, built by the section builder registered for the
result's ``tool.command`` (:mod:`avdiag.report.sections`), or by the generic one for an unknown command
or schema major version. A section shows what its JSON holds and nothing else: the z-score
histogram needs ``--per-channel`` arrays (without them the section says so), the firing-rate and
measured-vs-predicted figures need a probe (``--data``).

:mod:`avdiag.report.html` and :mod:`avdiag.report.markdown` render a Document; the block types are
re-exported here so that a renderer imports this module only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from avdiag._version import __version__
from avdiag.errors import UsageError
from avdiag.report import access as acc
from avdiag.report import sections as _sections  # noqa: F401  (importing it registers the builders)
from avdiag.report.blocks import COLLAPSE_ROWS, Block, Chart, Code, Section, Table, Text, builder_for

__all__ = ["COLLAPSE_ROWS", "Block", "Chart", "Code", "Document", "Section", "Table", "Text", "build_document",
           "check_results", "slug"]


@dataclass
class Document:
    title: str
    sections: list[Section]
    generator: str = f"avdiag {__version__}"


def check_results(results: Any) -> list[dict]:
    """``results`` as a list of result dicts, or a one-line UsageError (a bare dict is taken as one result)."""
    if isinstance(results, dict):
        results = [results]
    if not isinstance(results, (list, tuple)) or not results:
        raise UsageError("report: no results to render")
    for i, result in enumerate(results, 1):
        if not isinstance(result, dict):
            raise UsageError(f"report: result {i} is not a JSON object but {type(result).__name__}")
        if "schema_version" not in result:
            raise UsageError(f"report: result {i} has no schema_version: not an avdiag JSON report")
    return list(results)


def build_document(results: Any, title: str | None = None) -> Document:
    """One section per result (validated first); the title defaults to the first sections' titles."""
    sections = [_section(result, i) for i, result in enumerate(check_results(results), 1)]
    return Document(title or _default_title(sections), sections)


def _section(result: dict, position: int) -> Section:
    command = acc.command_of(result)
    builder = builder_for(command if acc.known_schema(result) else None)
    try:
        return builder(result, f"r{position}-{slug(command or 'result')}")
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UsageError(f"report: result {position} ({command or 'no command'}) is malformed: {e}") from e


def _default_title(sections: list[Section]) -> str:
    return "avdiag report: " + "; ".join(s.title for s in sections[:3]) + (" ..." if len(sections) > 3 else "")


def slug(text: str) -> str:
    """Lower-case letters and digits, anything else a hyphen (anchors, CSS classes)."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"
