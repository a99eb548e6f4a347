"""How money is shown: one rule for every view, so no two views disagree about a figure.

- Text (CLI tables, the report, the forecast, the dashboard): USD to 6 decimal places,
  rounded half up once, from the exact amount (`text`, `usd`).
- JSON and CSV: the exact decimal string, no exponent and no trailing zeros (`exact`):
  "0.000018", never 1.8e-05 and never a float. It parses back to the same Decimal.

Amounts are `Decimal` up to here; a float (a forecast's projection) is first made a
Decimal at 6 places (`projection`), so what JSON says is what a table prints.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson

PLACES = 6
QUANTUM = Decimal(1).scaleb(-PLACES)  # 0.000001: what a text table shows


def exact(value: Decimal | int | float) -> str:
    """The exact decimal string of an amount: "0.000018", "12", "-0.5"."""
    amount = value if isinstance(value, Decimal) else Decimal(repr(value)) \
        if isinstance(value, float) else Decimal(value)
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def rounded(value: Decimal | int | float) -> Decimal:
    """The amount at 6 places, rounded half up: the one rounding every text view uses."""
    amount = value if isinstance(value, Decimal) else Decimal(repr(value)) \
        if isinstance(value, float) else Decimal(value)
    return amount.quantize(QUANTUM, rounding=ROUND_HALF_UP)


def text(value: Decimal | int | float | None) -> str:
    """An amount for a table: 1,234.567890 (6 places); "-" when unknown."""
    return "-" if value is None else f"{rounded(value):,.{PLACES}f}"


def usd(value: Decimal | int | float | None) -> str:
    """An amount for a sentence: $1,234.567890 (6 places); "-" when unknown."""
    return "-" if value is None else "$" + text(value)


def projection(value: float) -> Decimal:
    """A modelled amount (a forecast, a run rate: float arithmetic) as a Decimal at the
    6 places it can be shown with; never negative zero."""
    return rounded(value) + 0


def json_default(value: Any) -> Any:
    """orjson's `default`: a Decimal becomes its exact string."""
    if isinstance(value, Decimal):
        return exact(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(data: Any, indent: bool = False) -> bytes:
    """JSON with every Decimal as its exact string."""
    return orjson.dumps(data, default=json_default,
                        option=orjson.OPT_INDENT_2 if indent else None)
