"""The window's calls as the advisor reads them, and pricing one call's usage another way.

Every figure the advisor gives is a difference between two prices of the same logged
usage, both from the pricing engine at the call's own time (its price period), so the
advice is exact Decimal arithmetic on the tables, like the meter itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy.config import Settings
from proxy.outcome import Outcome
from proxy.pricing import PriceBook, cost
from proxy.pricing.book import Price
from proxy.reprice import usage_of
from proxy.storage.readers import LogReader
from proxy.usage import Usage

ZERO = Decimal(0)
NO_FEATURE = "(none)"


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """One usage row, with its usage rebuilt and its price in force found."""

    id: str
    ts: datetime
    provider: str
    table: str
    model: str  # the priced model's table name when priced, else the requested name
    feature: str
    customer: str | None
    trace_id: str | None
    stream: bool
    duration_ms: float | None
    outcome: str
    usage: Usage
    cost: Decimal  # as logged (0 for unpriced)
    price: Price | None
    prefix_hash: str | None
    prefix_tokens: int | None
    base: Decimal = ZERO  # the engine's price of the call as it was (priced once, on reading)

    @property
    def ok(self) -> bool:
        return self.outcome == Outcome.OK

    def base_cost(self) -> Decimal:
        """The engine's price of the call as it was (nested models' steps aside)."""
        return self.base

    def priced_as(self, usage: Usage, price: Price | None = None) -> Decimal:
        """What `usage` would have cost at this call's time (at `price`, else its own)."""
        found = price or self.price
        if found is None:
            return ZERO
        return cost(usage, found, self.ts).total


def table_of(settings: Settings, provider: str | None) -> str:
    """The pricing table a provider's calls are priced from (as the proxy and reprice do)."""
    conf = settings.providers.get(provider or "")
    return (conf.pricing if conf and conf.pricing else provider) or ""


def read_calls(log: LogReader, settings: Settings, prices: PriceBook, since: datetime,
               until: datetime | None) -> list[LoggedCall]:
    """The window's calls that reached a provider with usage, oldest first."""
    calls = []
    for row in log.rows_to_reprice(since, until):
        usage = usage_of(row)
        if not usage.billable:
            continue
        table = table_of(settings, row["provider"])
        ts = datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).astimezone(UTC)
        price = prices.lookup(table, (row["response_model"], row["model"]), ts)
        logged = row["cost_usd"]
        base = cost(usage, price, ts).total if price is not None else ZERO
        calls.append(LoggedCall(
            id=row["id"], ts=ts, provider=row["provider"] or "", table=table,
            model=price.model.name if price is not None else (row["model"] or ""),
            feature=row["feature"] or NO_FEATURE, customer=row["customer"],
            trace_id=row["trace_id"], stream=bool(row["stream"]),
            duration_ms=row["duration_ms"], outcome=row["outcome"] or "", usage=usage,
            cost=Decimal(str(logged)) if logged is not None else ZERO, price=price,
            prefix_hash=row.get("prefix_hash"), prefix_tokens=row.get("prefix_tokens"),
            base=base))
    return calls


def moved(usage: Usage, tokens: int, to: Iterable[str]) -> Usage:
    """`usage` with `tokens` of its uncached input moved into each column of `to` (a cache
    read, or a write and its lifetime part)."""
    changes: dict[str, Any] = {"input_tokens": usage.input_tokens - tokens}
    for column in to:
        changes[column] = getattr(usage, column) + tokens
    return replace(usage, **changes)


def uncached(usage: Usage) -> Usage:
    """`usage` as if no cache had been read or written: every prompt token plain input."""
    from proxy.token_classes import BY_COLUMN

    prompt = usage.prompt_tokens
    changes = {c: 0 for c in ("cached_input_tokens", "cache_write_tokens")}
    for column, cls in BY_COLUMN.items():
        if cls.within in changes:
            changes[column] = 0
    return replace(usage, input_tokens=prompt, **changes)
