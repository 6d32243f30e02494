"""A report as one self-contained HTML page: CSS inline, figures as base64 PNG data URIs, no
JavaScript (long tables fold into ``<details>``), nothing fetched from elsewhere. Every text from a
result is HTML-escaped.

A pure renderer: :func:`render_html` takes a :class:`~avdiag.report.document.Document` and returns the
page; building the document and writing the file are done elsewhere
(:func:`avdiag.report.document.build_document`, :mod:`avdiag.workflows.report`).
"""

from __future__ import annotations

import base64
import html
import struct

from avdiag.report.document import Block, Chart, Code, Document, Section, Table, Text, slug

HTML_MAX_ROWS = 2000  # rows shown per table; a note says how many more there are
_CELL_CLASSES = {"r": "num", "c": "code"}

_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #1d1f23;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, nav, main, footer { max-width: 1200px; margin: 0 auto; padding: 0 24px; }
header h1 { font-size: 22px; margin: 24px 0 2px; }
p.meta, footer { color: #5b6068; font-size: 12px; }
nav ol { margin: 8px 0 0; padding-left: 20px; }
section.result { margin: 26px 0 40px; }
h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d3d7de; word-break: break-all; }
h3 { font-size: 15px; margin: 20px 0 6px; }
p.summary { font-weight: 600; background: #f2f5f9; border-left: 4px solid #4c72b0; padding: 8px 12px; margin: 8px 0; }
p.note { color: #5b6068; font-style: italic; }
p.warning { background: #fff5df; border-left: 4px solid #e0a030; padding: 6px 12px; }
div.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 4px 0 10px; font-size: 12.5px; }
th, td { border: 1px solid #d8dce2; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.code { white-space: nowrap; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 8px; overflow-x: auto; max-height: 480px; }
td.sev-error { color: #b00020; font-weight: 600; }
td.sev-warning { color: #9a5700; font-weight: 600; }
td.sev-info { color: #5b6068; }
figure { margin: 8px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; }
figcaption { color: #5b6068; font-size: 12px; margin-top: 4px; max-width: 760px; }
details > summary { cursor: pointer; font-weight: 600; font-size: 15px; margin: 16px 0 6px; }
p.more { color: #5b6068; font-size: 12px; }
"""


def render_html(document: Document) -> str:
    """The page of ``document``: a header, a table of contents when there are several sections, then
    one ``<section>`` per result (``data-command`` names its command)."""
    e = html.escape
    sections = document.sections
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="generator" content="{e(document.generator)}">', f"<title>{e(document.title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>",
           f'<header><h1>{e(document.title)}</h1><p class="meta">{e(document.generator)} report of '
           f"{len(sections)} result(s)</p></header>"]
    if len(sections) > 1:
        out.append("<nav><ol>" + "".join(f'<li><a href="#{e(s.anchor)}">{e(s.title)}</a></li>' for s in sections)
                   + "</ol></nav>")
    out.append("<main>")
    for section in sections:
        out.append(f'<section class="result" id="{e(section.anchor)}" data-command="{e(section.command)}">')
        out.append(f"<h2>{e(section.title)}</h2>")
        out.extend(_block(block, section) for block in section.blocks)
        out.append("</section>")
    out += ["</main>", "<footer><p>Made by avdiag from its JSON reports. Figures: matplotlib.</p></footer>",
            "</body>", "</html>", ""]
    return "\n".join(out)


def _block(block: Block, section: Section) -> str:
    e = html.escape
    if isinstance(block, Text):
        return f'<p class="{e(block.kind)}">{e(block.text)}</p>'
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Code):
        return f"<details><summary>{e(block.title)}</summary><pre>{e(block.text)}</pre></details>"
    if isinstance(block, Chart):
        return _chart(block, section)
    raise TypeError(f"unknown report block {type(block).__name__}")


def _chart(chart: Chart, section: Section) -> str:
    e = html.escape
    png = chart.png(section)
    if png is None:
        return f'<p class="note">{e(chart.title)}: nothing to draw.</p>'
    width, height = png_size(png)
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<h3>{e(chart.title)}</h3>\n<figure class="chart" data-chart="{e(chart.key)}">'
            f'<img src="{src}" alt="{e(chart.title)}" width="{width}" height="{height}">'
            f"<figcaption>{e(chart.caption)}</figcaption></figure>")


def _cell(table: Table, column: int, cell: str) -> str:
    kind = table.kind(column)
    text = html.escape(cell)
    if kind == "c" and cell not in ("", "–"):
        text = f"<code>{text}</code>"
    css = _CELL_CLASSES.get(kind) or (f"sev-{slug(cell)}" if kind == "s" else "")
    return f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>"


def _table(table: Table) -> str:
    e = html.escape
    rows = table.rows[:HTML_MAX_ROWS]
    head = "".join(f"<th>{e(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(_cell(table, i, cell) for i, cell in enumerate(row)) + "</tr>" for row in rows)
    out = f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if len(table.rows) > len(rows):
        out += f'<p class="more">first {len(rows)} of {len(table.rows)} rows</p>'
    if table.folds():
        return f"<details><summary>{e(table.title)}</summary>{out}</details>"
    return f"<h3>{e(table.title)}</h3>\n{out}"


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])
