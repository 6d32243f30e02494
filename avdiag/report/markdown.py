"""The Markdown variant of a report, for pull-request comments and READMEs.

The sections are those of the HTML report (:func:`avdiag.report.html.build_sections`), rendered as
GitHub-flavoured Markdown: summary lines, tables, long tables folded into ``<details>`` (GitHub
renders them), and the figures in one of two ways:

* without ``image_dir`` (the default, and what to paste into a PR comment, where images cannot be
  inlined): each figure becomes text: Unicode bar charts in ``text`` code blocks (dead ratio per
  layer, dead before -> after) or count tables (z ranges, firing-rate ranges). The
  measured-vs-predicted figure has no text form: the section's "disagree" table carries it;
* with ``image_dir``: the PNGs are written into that folder (created if needed) as
  ``<section anchor>-<figure key>.png`` and linked as ``<link_prefix>/<file>`` (default: the folder
  as given); ``write_report(..., images=True)`` puts them in ``<stem>_files/`` beside the .md with
  relative links.

Headings start at ``##`` (the report title), so a comment does not shout. GitHub limits a comment to
65,536 characters: tables are cut at ``MD_MAX_ROWS`` rows with a note.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from avdiag._version import __version__
from avdiag.errors import UsageError
from avdiag.report.html import COLLAPSE_ROWS, Chart, Code, Section, Table, Text, build_sections, default_title, \
    draw_chart

MD_MAX_ROWS = 50
_ESCAPE = {c: "\\" + c for c in "\\`*_[]<>|#"}


def md_text(text: Any) -> str:
    """Plain text for Markdown: markup characters escaped, newlines turned into spaces."""
    return "".join(_ESCAPE.get(c, c) for c in " ".join(str(text).splitlines()))


def md_code(text: Any) -> str:
    """An inline code span (in a table: its pipes escaped, which GitHub accepts inside code)."""
    s = " ".join(str(text).splitlines()).replace("|", "\\|")
    fence = "``" if "`" in s else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def render_markdown(results: list[dict], image_dir: Path | None = None, *, title: str | None = None,
                    link_prefix: str | None = None) -> str:
    """The report as Markdown (see the module docstring for how figures are rendered)."""
    sections = build_sections(results)
    if image_dir is not None:
        image_dir = Path(image_dir)
        try:
            image_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"report: cannot create {image_dir} ({e.strerror or e})") from e
    prefix = (link_prefix if link_prefix is not None else image_dir.as_posix()) if image_dir is not None else None
    lines = [f"## {md_text(title or default_title(sections))}", "",
             f"avdiag {md_text(__version__)} report of {len(sections)} result(s).", ""]
    for n, section in enumerate(sections, 1):
        lines += [f"### {n}. {md_text(section.title)}", ""]
        for block in section.blocks:
            lines += _block(block, section, image_dir, prefix)
    return "\n".join(lines).rstrip("\n") + "\n"


def _block(block: Any, section: Section, image_dir: Path | None, prefix: str | None) -> list[str]:
    if isinstance(block, Text):
        text = md_text(block.text)
        styled = {"summary": f"**{text}**", "note": f"*{text}*", "warning": f"> **{text}**"}.get(block.kind, text)
        return [styled, ""]
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Code):
        fenced = _fence(block.text, "json" if block.title == "JSON" else "text")
        if block.title:
            return [f"<details><summary>{html.escape(block.title)}</summary>", "", *fenced, "", "</details>", ""]
        return [*fenced, ""]
    if isinstance(block, Chart):
        return _chart(block, section, image_dir, prefix)
    raise TypeError(f"unknown report block {type(block).__name__}")


def _chart(chart: Chart, section: Section, image_dir: Path | None, prefix: str | None) -> list[str]:
    if image_dir is not None:
        png = draw_chart(chart, section)
        if png is None:
            return [f"*{md_text(chart.title)}: nothing to draw.*", ""]
        name = f"{section.anchor}-{chart.key}.png"
        try:
            (image_dir / name).write_bytes(png)
        except OSError as e:
            raise UsageError(f"report: cannot write {image_dir / name} ({e.strerror or e})") from e
        return [f"#### {md_text(chart.title)}", "", f"![{md_text(chart.title)}]({prefix}/{name})", "",
                f"*{md_text(chart.caption)}*", ""]
    if chart.text is None:
        return []
    out = [f"#### {md_text(chart.title)}", ""]
    for inner in chart.text():
        if isinstance(inner, Table):
            out += _table(inner, heading=False)
        else:
            out += _block(inner, section, None, None)
    return out


def _fence(text: str, lang: str) -> list[str]:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return [ticks + lang, *text.splitlines(), ticks]


def _table(t: Table, heading: bool = True) -> list[str]:
    rows = t.rows[:MD_MAX_ROWS]
    lines = ["| " + " | ".join(md_text(h) for h in t.headers) + " |",
             "|" + "|".join("---:" if k == "r" else "---" for k in t.kinds.ljust(len(t.headers), "l")) + "|"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            kind = t.kinds[i] if i < len(t.kinds) else "l"
            if kind == "c" and cell not in ("", "–"):
                cells.append(md_code(cell))
            elif kind == "s" and cell == "error":
                cells.append("**error**")
            else:
                cells.append(md_text(cell) if cell != "" else " ")
        lines.append("| " + " | ".join(cells) + " |")
    if len(t.rows) > len(rows):
        lines += ["", f"*first {len(rows)} of {len(t.rows)} rows; the HTML report has them all*"]
    collapsed = t.collapsed if t.collapsed is not None else len(t.rows) > COLLAPSE_ROWS
    if collapsed:
        return [f"<details><summary>{html.escape(t.title)}</summary>", "", *lines, "", "</details>", ""]
    if heading:
        return [f"#### {md_text(t.title)}", "", *lines, ""]
    return [f"*{md_text(t.title)}*", "", *lines, ""]
