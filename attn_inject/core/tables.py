"""Plain-text tables, as the plan and the validation report print them."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_table"]


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    indent: str = "",
    rule_under_last: bool = True,
) -> str:
    """``header`` and ``rows`` in left-aligned columns two spaces apart, a rule of dashes
    under the header. ``rule_under_last=False`` draws the last column's rule as wide as its
    header only, for a last column of free text (a check's detail) that may run long."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    rule = ["-" * w for w in widths]
    if not rule_under_last:
        rule[-1] = "-" * len(header[-1])
    lines = [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines.insert(1, indent + "  ".join(rule))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """``header`` and ``rows`` as the lines of a Markdown table, ``|`` in a cell escaped."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
