"""Reading the tables rich draws on the terminal, by column name rather than by position (the column
order and widths change with the terminal's width)."""

from __future__ import annotations

HEADER, ROW, END = "┃", "│", "└"


def _cells(line: str, bar: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip(bar).split(bar)]


def _fold(cells: list[str], into: list[str]) -> list[str]:
    """A wrapped header or row continues on the next line: join each cell's pieces with a space."""
    return [" ".join(p for p in (a, b) if p) for a, b in zip(into, cells)]


def rich_tables(text: str) -> list[list[dict[str, str]]]:
    """Every table in ``text``: a list of rows, each {column header: cell text}. A row whose first cell
    is empty continues the row above it (a cell rich wrapped onto a second line)."""
    tables: list[list[dict[str, str]]] = []
    headers: list[str] | None = None
    rows: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(HEADER):
            cells = _cells(stripped, HEADER)
            headers = _fold(cells, headers) if headers is not None and not rows else cells
        elif stripped.startswith(ROW) and headers is not None:
            cells = _cells(stripped, ROW)
            if len(cells) != len(headers):
                continue
            if rows and not cells[0]:
                rows[-1] = _fold(cells, rows[-1])
            else:
                rows.append(cells)
        elif stripped.startswith(END) and headers is not None:
            tables.append([dict(zip(headers, row)) for row in rows])
            headers, rows = None, []
    return tables


def rows_by(text: str, column: str) -> dict[str, dict[str, str]]:
    """The rows of every table that has ``column``, keyed by that column's cell."""
    return {row[column]: row for table in rich_tables(text) for row in table if column in row}
