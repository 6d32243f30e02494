"""The section of a result no other builder takes: a command this avdiag has no view for, a result
without ``tool.command``, or a schema whose major version it does not know. It shows the summary,
the top-level fields and the JSON itself (folded, cut at ``MAX_JSON_CHARS``)."""

from __future__ import annotations

import json

from avdiag._version import __version__
from avdiag.report import access as acc
from avdiag.report.blocks import Code, Section, Text, fallback_builder
from avdiag.report.cells import kv_table

MAX_JSON_CHARS = 100_000


@fallback_builder
def generic_section(res: dict, anchor: str) -> Section:
    command = acc.command_of(res)
    section = Section(anchor, command or "result", f"{command or 'result'} (no dedicated view)")
    text = acc.summary_text(res)
    if text:
        section.add(Text(text, "summary"))
    section.add(Text(f"avdiag {__version__} has no dedicated view for {_why(res, command)}: its top-level fields "
                     f"follow.", "note"),
                kv_table("Fields", [(str(k), v) for k, v in res.items()
                                    if not isinstance(v, (dict, list)) or k in ("tool", "summary")]),
                Code("JSON", _dump(res), "json"))
    return section


def _why(res: dict, command: str) -> str:
    if not acc.known_schema(res):
        return f"schema {res.get('schema_version')!r}"
    return f"command {command!r}" if command else "a result without tool.command"


def _dump(res: dict) -> str:
    text = json.dumps(res, indent=1, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n... ({len(text) - MAX_JSON_CHARS} more characters)"
    return text
