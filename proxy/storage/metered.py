"""What the meter logged for one provider, per UTC day and model: tokens and dollars by class.

The reconciliation's side of the log. Counts come from the class columns of
`proxy.token_classes` (so an unpriced call still counts its tokens); dollars per class
from each row's cost breakdown, summed exactly as Decimal. Rows are read in batches and
folded here, because the per-class split lives in the breakdown JSON, which SQLite and
PostgreSQL query differently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.storage.sql import SqlFlavor
from proxy.timeparse import to_ts
from proxy.token_classes import COLUMNS, priced_counts

BATCH_ROWS = 5000


@dataclass
class MeteredDay:
    """One day x model of one provider: counts and USD per priced token class (class names
    of `proxy.token_classes`, counts made disjoint by `priced_counts`), calls, unpriced."""

    counts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    usd: defaultdict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    calls: int = 0
    unpriced_calls: int = 0


def metered_by_day(conn: Any, flavor: SqlFlavor, provider: str, since: datetime,
                   until: datetime) -> dict[tuple[str, str], MeteredDay]:
    """{(YYYY-MM-DD, model as the provider answered it): MeteredDay} for calls in [since, until)."""
    p = flavor.param
    sql = (f"SELECT substr(ts, 1, 10), coalesce(response_model, model), cost_breakdown, priced, "
           f"{', '.join(COLUMNS)} FROM usage "
           f"WHERE provider = {p} AND ts >= {p} AND ts < {p}")
    found: dict[tuple[str, str], MeteredDay] = {}
    cursor = conn.cursor()
    try:
        cursor.execute(sql, (provider, to_ts(since), to_ts(until)))
        while batch := cursor.fetchmany(BATCH_ROWS):
            for day, model, breakdown, priced, *counts in batch:
                entry = found.get((day, model or ""))
                if entry is None:
                    entry = found[(day, model or "")] = MeteredDay()
                _fold(entry, dict(zip(COLUMNS, counts, strict=True)), breakdown, priced)
    finally:
        cursor.close()
    return found


def _fold(entry: MeteredDay, counts: dict[str, int | None], breakdown: Any, priced: Any
          ) -> None:
    entry.calls += 1
    for name, n in priced_counts({k: v or 0 for k, v in counts.items()}).items():
        if n:
            entry.counts[name] += n
    if not priced:
        entry.unpriced_calls += 1
    if not breakdown:
        return
    parsed = orjson.loads(breakdown) if isinstance(breakdown, str | bytes) else breakdown
    for name, line in (parsed.get("classes") or {}).items():
        entry.usd[name] += Decimal(str(line.get("usd", "0")))
