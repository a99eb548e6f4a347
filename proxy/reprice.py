"""Reprice logged calls after a pricing-table fix, and say what changed in total.

Each row's usage is rebuilt from its token columns and, where the cost breakdown recorded
them, its exact class split (audio, web searches) and service tier; it is then priced by
the table in force at the row's own timestamp. Rows without tokens keep their zero cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.config import Settings
from proxy.pricing import PriceBook, cost, rounded
from proxy.storage.readers import CostUpdate, LogReader
from proxy.token_classes import COLUMNS
from proxy.usage import Usage

UNITS = Decimal("1e-10")


@dataclass
class RepriceResult:
    rows_seen: int = 0
    rows_changed: int = 0
    newly_priced: int = 0
    before_usd: Decimal = Decimal(0)
    after_usd: Decimal = Decimal(0)
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delta_usd(self) -> Decimal:
        return self.after_usd - self.before_usd


def usage_of(row: dict[str, Any]) -> Usage:
    """A row's usage: its class columns, and the service tier and speed its breakdown
    recorded (m004 copied the older rows' audio and search counts into their columns)."""
    usage = Usage(**{c: row[c] or 0 for c in COLUMNS})
    breakdown = row["cost_breakdown"] or {}
    for key in ("service_tier", "speed"):
        value = breakdown.get(key)
        if isinstance(value, str):
            setattr(usage, key, value.split(" ", 1)[0])
    return usage


def reprice(log: LogReader, settings: Settings, prices: PriceBook,
            since: datetime, until: datetime | None = None, *, dry_run: bool = False
            ) -> RepriceResult:
    """Recompute cost_usd, cost_breakdown, pricing_version and priced for rows in range
    (`log` opened writable unless `dry_run`)."""
    result = RepriceResult()
    updates = []
    for row in log.rows_to_reprice(since, until):
        usage = usage_of(row)
        if not usage.billable:
            continue
        result.rows_seen += 1
        provider = settings.providers.get(row["provider"] or "")
        table = (provider.pricing if provider and provider.pricing else row["provider"]) or ""
        when = datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).astimezone(UTC)
        price = prices.lookup(table, (row["response_model"], row["model"]), when)
        old = Decimal(str(row["cost_usd"])) if row["cost_usd"] is not None else None
        if price is None:
            new, breakdown, version = None, None, None
        else:
            found = cost(usage, price, when)
            new = rounded(found.total)
            breakdown = orjson.dumps({"model": price.model.name,
                                      "period": price.period.effective_from.date().isoformat(),
                                      **found.breakdown}).decode()
            version = price.version
        result.before_usd += old or 0
        result.after_usd += new or 0
        if new == old and version == row["pricing_version"]:
            continue
        result.rows_changed += 1
        result.newly_priced += int(old is None and new is not None)
        result.changes.append({"id": row["id"], "model": row["model"], "before_usd": old,
                               "after_usd": new, "pricing_version": version})
        updates.append(CostUpdate(row["id"], new, breakdown, version))
    if updates and not dry_run:
        log.set_costs(updates)
    return result
