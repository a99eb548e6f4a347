"""Printing results: aligned tables for people, JSON and CSV for machines."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from proxy import money

# A spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK, @SUM,
# +cmd|...); OWASP's advice is a leading apostrophe, which shows the text as it was.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# C0 and C1 control characters but newline and tab: ANSI escapes, bells, carriage returns.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def neutralise(text: str) -> str:
    """A text cell safe to open in a spreadsheet (every CSV we write goes through this)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def printable(text: str) -> str:
    """Text with control characters removed, safe to print on an operator's terminal."""
    return _CONTROL.sub("", text)


class PrintableStream:
    """A text stream that drops control characters from what it is given (the CLI's
    stdout: a `model` name in the log may carry ANSI escapes)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(printable(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def render(rows: Sequence[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return money.dumps(list(rows), indent=True).decode()
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
        return buf.getvalue().rstrip("\n")
    return table(rows)


def csv_cell(value: Any) -> str:
    """One CSV cell: exact decimals (never 1.8e-05), neutralised text."""
    if value is None:
        return ""
    if isinstance(value, float | Decimal):
        return money.exact(value)
    if isinstance(value, str):
        # An exact amount ("-0.25" from reconcile) is a number to a spreadsheet, not a formula.
        return value if _NUMBER.fullmatch(value) else neutralise(value)
    return str(value)


def csv_lines(rows: Any) -> str:
    """CSV text of rows of values, every cell through csv_cell."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([csv_cell(v) for v in row] for row in rows)
    return buf.getvalue()


def table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table; numbers right-aligned, money by the one rule (proxy.money)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[_display(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float | Decimal) or r.get(c) is None for r in rows)
               for c in columns]
    lines = ["  ".join(c.rjust(w) if n else c.ljust(w)
                       for c, w, n in zip(columns, widths, numeric, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.rjust(w) if n else v.ljust(w)
                               for v, w, n in zip(row, widths, numeric, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _display(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return money.text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
