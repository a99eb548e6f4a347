"""What a call should cost, computed in the tests from the table's rates, not by the engine."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from tests.conftest import Stack

MILLION = Decimal(1_000_000)


def expected_cost(stack: Stack, table: str, model: str, *, input: int = 0, cached: int = 0,
                  write_5m: int = 0, write_1h: int = 0, output: int = 0, searches: int = 0,
                  at: datetime | None = None) -> Decimal:
    """Tokens of each class times the loaded table's rate, plus per-search fees; 1e-10 USD."""
    price = stack.runtime.prices.lookup(table, [model], at or datetime.now(UTC))
    assert price is not None, f"no price for {table}/{model}"
    rates = price.rates
    total = Decimal(0)
    for tokens, rate in ((input, rates.input), (cached, rates.cached_input),
                         (write_5m, rates.cache_write_5m), (write_1h, rates.cache_write_1h),
                         (output, rates.output)):
        if tokens:
            assert rate is not None, f"{table}/{model} has no rate for a class used"
            total += tokens * rate / MILLION
    if searches:
        total += searches * price.rates.web_search / Decimal(1000)
    return total.quantize(Decimal("1e-10"))


def row_cost(row: dict) -> Decimal:
    """The row's cost_usd as a Decimal (SQLite hands back a float; 1e-10 survives repr)."""
    return Decimal(str(row["cost_usd"])).quantize(Decimal("1e-10"))
