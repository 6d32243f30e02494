"""Tables that keep their numbers at any width: columns carry a priority, and the least important ones
are dropped (never truncated to an ellipsis) until the table fits the console; a name column folds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

_CELL_PADDING = 2  # one space each side of a cell
_MIN_NAME_WIDTH = 14
_NAME_WIDTH_FOR_FIT = 24  # a longer name folds rather than pushing numbers out


@dataclass
class Column:
    """One column: a short header, its cells, and how important it is (0 = always kept)."""

    header: str
    priority: int = 0
    justify: str = "right"
    name: bool = False  # the row label: may fold onto several lines instead of widening the table
    cells: list[str] = field(default_factory=list)

    def width(self) -> int:
        return max([len(self.header), *(len(c) for c in self.cells)])


def fitted_table(title: str, columns: list[Column], width: int, styles: list[str | None] | None = None) -> Table:
    """A rich Table of ``columns`` that fits ``width``: drops the least important columns first, then lets
    the name column fold. The title says how many columns were left out."""
    kept = list(columns)
    while _needed(kept) > width and any(c.priority for c in kept):
        worst = max(c.priority for c in kept)
        kept = [c for c in kept if c.priority != worst]
    dropped = len(columns) - len(kept)
    note = f" ({dropped} column(s) left out at this width)" if dropped else ""
    table = Table(title=escape(title) + note, title_justify="left")
    spare = width - _needed([c for c in kept if not c.name]) - 1
    for c in kept:
        if c.name:
            fold = max(_MIN_NAME_WIDTH, min(c.width(), spare - _CELL_PADDING - 1))
            table.add_column(escape(c.header), justify="left", overflow="fold", max_width=fold)
        else:
            table.add_column(escape(c.header), justify=c.justify, no_wrap=True)
    n_rows = max((len(c.cells) for c in kept), default=0)
    for i in range(n_rows):
        table.add_row(*(escape(c.cells[i]) for c in kept), style=(styles[i] if styles else None))
    return table


def _needed(columns: list[Column]) -> int:
    """Width of a table of ``columns`` with rich's default box: cells, padding and n + 1 rules."""
    widths = [min(c.width(), _NAME_WIDTH_FOR_FIT) if c.name else c.width() for c in columns]
    return sum(w + _CELL_PADDING for w in widths) + len(columns) + 1


def number(value: float | None, spec: str = ".3g") -> str:
    """``value`` formatted, '-' for None, never a negative zero ("-0.0" is printed as "0.0")."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    text = format(value, spec)
    if text.startswith("-") and float(text) == 0:
        text = text[1:]
    return text


def count(items) -> str:
    """How many ``items`` (a list or an int); '-' for none."""
    n = items if isinstance(items, int) else len(items)
    return str(n) if n else "-"
