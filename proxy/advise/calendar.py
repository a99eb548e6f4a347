"""Announced price changes: periods in the tables that start within the next 90 days, for
models the window used, and what they do to this month's and next month's spend.

The effect is the window's calls of that model repriced on the coming period (the same
tokens), as a ratio to what they cost now, applied to the model's daily spend over the
window for the days of each month on or after the change.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from proxy.advise.calls import ZERO, LoggedCall
from proxy.forecast import month_bounds
from proxy.pricing import PriceBook
from proxy.pricing.book import Price

HORIZON_DAYS = 90


def _days(start: datetime, end: datetime) -> Decimal:
    return Decimal(max((end - start).total_seconds(), 0)) / 86400


def price_calendar(calls: list[LoggedCall], prices: PriceBook, since: datetime,
                   until: datetime, now: datetime) -> list[dict[str, Any]]:
    """Each coming period of a used model, with its effect on this and next month."""
    used: dict[tuple[str, str], list[LoggedCall]] = defaultdict(list)
    for call in calls:
        if call.price is not None:
            used[(call.table, call.price.model.name)].append(call)
    window_days = _days(since, until) or Decimal(1)
    month_end = month_bounds(now)[1]
    next_end = month_bounds(month_end)[1]
    found = []
    for (table, name), group in sorted(used.items()):
        entry = group[0].price.model
        for period in entry.periods:
            if not now < period.effective_from <= now + timedelta(days=HORIZON_DAYS):
                continue
            coming = Price(entry, period, f"{table}.yaml@{period.effective_from:%Y-%m-%d}",
                           period.rates)
            now_usd = sum((c.base_cost() for c in group), ZERO)
            then_usd = sum((c.priced_as(c.usage, coming) for c in group), ZERO)
            daily = now_usd / window_days
            change = then_usd - now_usd
            ratio = change / now_usd if now_usd else ZERO
            start = max(period.effective_from, now)
            found.append({
                "provider_table": table, "model": name,
                "effective_from": period.effective_from.date().isoformat(),
                "note": period.note, "source": period.source,
                "window_cost_usd": now_usd, "window_cost_at_new_price_usd": then_usd,
                "change_pct": (ratio * 100).quantize(Decimal("0.1")),
                "this_month_effect_usd": (daily * ratio * _days(start, month_end)).quantize(
                    Decimal("1e-6")),
                "next_month_effect_usd": (daily * ratio * _days(
                    max(period.effective_from, month_end), next_end)).quantize(Decimal("1e-6")),
            })
    return found
