"""Table cells for report sections: JSON values as short text (numbers, shares, sizes, channel lists),
and the two generic tables every section may use (field/value pairs, and {name: {field: value}})."""

from __future__ import annotations

import math
from typing import Any

from avdiag.report import access as acc
from avdiag.report.blocks import Table

NONE = "–"  # an empty cell: the value is missing, or null (not finite) in a schema-1.1 file


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number: ints as they are, floats to ``digits`` significant digits, yes/no for booleans."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    v = acc.num(value)
    if v is None:
        return NONE
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def fmt_fixed(value: Any, places: int = 2) -> str:
    """A number with ``places`` decimals (non-finite ones as :func:`fmt_num` writes them)."""
    v = acc.num(value)
    if v is None:
        return NONE
    if not math.isfinite(v):
        return fmt_num(v)
    return f"{v:.{places}f}"


def fmt_pct(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    v = acc.finite_num(value)
    return NONE if v is None else f"{100 * v:.1f}%"


def fmt_bytes(value: Any) -> str:
    """A size in bytes, in B / KiB / MiB / GiB."""
    v = acc.finite_num(value)
    if v is None:
        return NONE
    for unit in ("B", "KiB", "MiB"):
        if v < 1024:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def preview(channels: Any, n: int = 8) -> str:
    """Channel indices, the first ``n`` of them ("" for none)."""
    values = acc.items(channels)
    if not values:
        return ""
    head = ", ".join(str(c) for c in values[:n])
    return head + (f", … ({len(values)} in all)" if len(values) > n else "")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def fmt_any(value: Any) -> str:
    """Any JSON value in one cell: scalars as text, short lists and flat objects spelled out, larger
    ones counted."""
    if value is None:
        return NONE
    if isinstance(value, (bool, int, float)):
        return fmt_num(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) <= 8 and all(_scalar(v) for v in value):
            return ", ".join(fmt_any(v) for v in value) or "(none)"
        return f"list of {len(value)}"
    if isinstance(value, dict):
        if len(value) <= 6 and all(_scalar(v) for v in value.values()):
            return ", ".join(f"{k} {fmt_any(v)}" for k, v in value.items()) or "(none)"
        return f"{len(value)} entries"
    return str(value)


def kv_table(title: str, pairs: list[tuple[str, Any]]) -> Table:
    """A field / value table, never folded; pairs whose value is None are left out."""
    return Table(title, ["field", "value"], [[k, fmt_any(v)] for k, v in pairs if v is not None], "ll",
                 collapsed=False)


def dict_table(title: str, first: str, data: dict) -> Table:
    """A table of {name: {field: value}}: one row per name, the union of the fields as columns
    (a name whose value is not an object gets it in a single "value" column)."""
    columns = list(dict.fromkeys(k for v in data.values() if isinstance(v, dict) for k in v))
    if any(not isinstance(v, dict) for v in data.values()):
        columns.append("value")
    rows = [[str(name)] + [fmt_any(v.get(c)) if isinstance(v, dict) else (fmt_any(v) if c == "value" else "")
                           for c in columns] for name, v in data.items()]
    return Table(title, [first] + columns, rows, "l" + "r" * len(columns), collapsed=False)
