"""A report as GitHub-flavoured Markdown, for pull-request comments and READMEs.

The sections are those of the HTML page (the same :class:`~avdiag.report.document.Document`): summary
lines, tables, long tables folded into ``<details>`` (GitHub renders them), and the figures in one of
two ways:

* without ``image_prefix`` (the default, and what to paste into a PR comment, where images cannot be
  inlined): each figure becomes text: Unicode bar charts in ``text`` code blocks (dead ratio per
  layer, dead before -> after) or count tables (z ranges, firing-rate ranges). Figures without a text
  form (measured vs predicted, the conflict figures) are left out: the section's tables carry them;
* with ``image_prefix``: every figure is drawn as a PNG named ``<section anchor>-<figure key>.png``,
  linked as ``<image_prefix>/<name>``, and returned in :attr:`MarkdownReport.images` for the caller
  to write (``avdiag report --images`` puts them in ``<stem>_files/`` beside the .md).

Headings start at ``##`` (the report title), so a comment does not shout. GitHub limits a comment to
65,536 characters: tables are cut at ``MD_MAX_ROWS`` rows with a note. Every text from a result is
escaped, so it cannot open links, emphasis or HTML.

A pure renderer: it writes no file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from avdiag.report.document import Block, Chart, Code, Document, Section, Table, Text

MD_MAX_ROWS = 50
_ESCAPE = {c: "\\" + c for c in "\\`*_[]<>|#"}


@dataclass
class MarkdownReport:
    text: str
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG, linked as <image_prefix>/<name>


def md_text(text: object) -> str:
    """Plain text for Markdown: markup characters escaped, newlines turned into spaces."""
    return "".join(_ESCAPE.get(c, c) for c in " ".join(str(text).splitlines()))


def md_code(text: object) -> str:
    """An inline code span (in a table: its pipes escaped, which GitHub accepts inside code)."""
    s = " ".join(str(text).splitlines()).replace("|", "\\|")
    fence = "``" if "`" in s else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def render_markdown(document: Document, image_prefix: str | None = None) -> MarkdownReport:
    """The report as Markdown (see the module docstring for how figures are rendered)."""
    renderer = _Renderer(image_prefix)
    lines = [f"## {md_text(document.title)}", "",
             f"{md_text(document.generator)} report of {len(document.sections)} result(s).", ""]
    for n, section in enumerate(document.sections, 1):
        lines += [f"### {n}. {md_text(section.title)}", ""]
        for block in section.blocks:
            lines += renderer.block(block, section)
    return MarkdownReport("\n".join(lines).rstrip("\n") + "\n", renderer.images)


class _Renderer:
    """Renders blocks; collects the PNGs drawn when figures are images."""

    def __init__(self, image_prefix: str | None):
        self.image_prefix = image_prefix
        self.images: dict[str, bytes] = {}

    def block(self, block: Block, section: Section) -> list[str]:
        if isinstance(block, Text):
            text = md_text(block.text)
            styled = {"summary": f"**{text}**", "note": f"*{text}*", "warning": f"> **{text}**"}.get(block.kind, text)
            return [styled, ""]
        if isinstance(block, Table):
            return _table(block)
        if isinstance(block, Code):
            fenced = _fence(block.text, block.language)
            if block.title:
                return [f"<details><summary>{html.escape(block.title)}</summary>", "", *fenced, "", "</details>", ""]
            return [*fenced, ""]
        if isinstance(block, Chart):
            return self.image(block, section) if self.image_prefix is not None else self.text_chart(block, section)
        raise TypeError(f"unknown report block {type(block).__name__}")

    def image(self, chart: Chart, section: Section) -> list[str]:
        png = chart.png(section)
        if png is None:
            return [f"*{md_text(chart.title)}: nothing to draw.*", ""]
        name = f"{section.anchor}-{chart.key}.png"
        self.images[name] = png
        link = f"{self.image_prefix}/{name}" if self.image_prefix else name
        return [f"#### {md_text(chart.title)}", "", f"![{md_text(chart.title)}]({link})", "",
                f"*{md_text(chart.caption)}*", ""]

    def text_chart(self, chart: Chart, section: Section) -> list[str]:
        if chart.text is None:
            return []
        out = [f"#### {md_text(chart.title)}", ""]
        for inner in chart.text():
            out += _table(inner, heading=False) if isinstance(inner, Table) else self.block(inner, section)
        return out


def _fence(text: str, language: str) -> list[str]:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return [ticks + language, *text.splitlines(), ticks]


def _cell(table: Table, column: int, cell: str) -> str:
    kind = table.kind(column)
    if kind == "c" and cell not in ("", "–"):
        return md_code(cell)
    if kind == "s" and cell == "error":
        return "**error**"
    return md_text(cell) if cell != "" else " "


def _table(table: Table, heading: bool = True) -> list[str]:
    rows = table.rows[:MD_MAX_ROWS]
    kinds = [table.kind(i) for i in range(len(table.headers))]
    lines = ["| " + " | ".join(md_text(h) for h in table.headers) + " |",
             "|" + "|".join("---:" if k == "r" else "---" for k in kinds) + "|"]
    lines += ["| " + " | ".join(_cell(table, i, cell) for i, cell in enumerate(row)) + " |" for row in rows]
    if len(table.rows) > len(rows):
        lines += ["", f"*first {len(rows)} of {len(table.rows)} rows; the HTML report has them all*"]
    if table.folds():
        return [f"<details><summary>{html.escape(table.title)}</summary>", "", *lines, "", "</details>", ""]
    if heading:
        return [f"#### {md_text(table.title)}", "", *lines, ""]
    return [f"*{md_text(table.title)}*", "", *lines, ""]
