"""What a report section is made of, and the registry section builders add themselves to.

A section builder turns one result dict (a command's ``--json`` document) into a :class:`Section` of
blocks: :class:`Text`, :class:`Table`, :class:`Chart` and :class:`Code`. Renderers
(:mod:`avdiag.report.html`, :mod:`avdiag.report.markdown`) know the blocks and nothing about commands.

Builders live in :mod:`avdiag.report.sections`, one module per command, each registering itself with
``@section_builder("<command>")``; the module for results of an unknown command registers itself
with ``@fallback_builder``. This module sits below both (builders import it, it imports no builder), so
:mod:`avdiag.report.document` can load the sections package without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from avdiag.errors import UsageError

COLLAPSE_ROWS = 25  # tables longer than this fold (HTML and Markdown <details>)


@dataclass
class Text:
    text: str
    kind: str = "text"  # text / summary / note / warning


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    kinds: str  # one letter per column: c (code: names), l (text), r (number), s (severity)
    collapsed: bool | None = None  # None: fold when longer than COLLAPSE_ROWS

    def kind(self, column: int) -> str:
        return self.kinds[column] if column < len(self.kinds) else "l"

    def folds(self) -> bool:
        """Whether the table is shown folded (a <details> element)."""
        return self.collapsed if self.collapsed is not None else len(self.rows) > COLLAPSE_ROWS


@dataclass
class Code:
    title: str  # "" for an unfolded block
    text: str
    language: str = "text"


@dataclass
class Chart:
    key: str  # stable name within its section (dead-ratio, z-histogram, ...)
    title: str
    caption: str
    draw: Callable[[], bytes | None]  # the PNG, drawn only when a renderer needs it
    text: Callable[[], list[Block]] | None = None  # the chart without images: Unicode charts or count tables
    _drawn: list[bytes | None] = field(default_factory=list, init=False, repr=False, compare=False)

    def png(self, section: Section) -> bytes | None:
        """The chart's PNG (None: nothing to draw), drawn once however many renderers ask; malformed
        data becomes a one-line UsageError."""
        if not self._drawn:
            try:
                self._drawn.append(self.draw())
            except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
                raise UsageError(f"report: {section.command} result ({section.anchor}): cannot draw {self.key}: "
                                 f"{e}") from e
        return self._drawn[0]


Block = Union[Text, Table, Code, Chart]


@dataclass
class Section:
    anchor: str  # unique within a document: r<position>-<command>
    command: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


SectionBuilder = Callable[[dict, str], Section]  # (result dict, anchor) -> Section

_BUILDERS: dict[str, SectionBuilder] = {}
_FALLBACK: list[SectionBuilder] = []


def section_builder(command: str) -> Callable[[SectionBuilder], SectionBuilder]:
    """Register the decorated function as the section builder of results whose ``tool.command`` is
    ``command``."""
    def register(builder: SectionBuilder) -> SectionBuilder:
        if command in _BUILDERS and _BUILDERS[command] is not builder:
            raise ValueError(f"a section builder for {command!r} is already registered")
        _BUILDERS[command] = builder
        return builder
    return register


def fallback_builder(builder: SectionBuilder) -> SectionBuilder:
    """Register the decorated function as the builder of results no other builder takes."""
    _FALLBACK[:] = [builder]
    return builder


def builder_for(command: str | None) -> SectionBuilder:
    """The builder registered for ``command``, else the fallback (None: always the fallback)."""
    builder = _BUILDERS.get(command) if command else None
    if builder is not None:
        return builder
    if not _FALLBACK:
        raise LookupError("no fallback section builder registered (import avdiag.report.sections)")
    return _FALLBACK[0]


def registered_commands() -> list[str]:
    return sorted(_BUILDERS)
