"""What the meter logged for one provider, per UTC day and model: tokens and dollars by class.

The reconciliation's side of the log. Counts come from the class columns of
`proxy.token_classes` (so an unpriced call still counts its tokens); dollars per class
from each row's cost breakdown, summed exactly as Decimal. Rows are read in batches and
folded here, because the per-class split lives in the breakdown JSON, which SQLite and
PostgreSQL query differently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
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
    """{(YYYY-MM-DD, model as the provider answered it): MeteredDay} for calls in [since, until).

    Counts are summed in SQL and split into priced classes once per group (a part is capped
    at its parent's sum, not per row: the same unless a row reported more of a part than of
    its whole); dollars are summed here from each breakdown, exactly.
    """
    p = flavor.param
    day, model = "substr(ts, 1, 10)", "coalesce(response_model, model)"
    where = f"WHERE provider = {p} AND ts >= {p} AND ts < {p}"
    params = (provider, to_ts(since), to_ts(until))
    found: dict[tuple[str, str], MeteredDay] = {}
    sums = ", ".join(f"sum({c})" for c in COLUMNS)
    for d, m, calls, unpriced, *counts in _all(
            conn, f"SELECT {day}, {model}, sum(repeat_count), sum(CASE WHEN priced = 0 THEN "
                  f"repeat_count ELSE 0 END), {sums} FROM usage {where} GROUP BY 1, 2", params):
        entry = found[(d, m or "")] = MeteredDay(calls=calls, unpriced_calls=unpriced or 0)
        split = priced_counts({c: int(n or 0) for c, n in zip(COLUMNS, counts, strict=True)})
        entry.counts.update({name: n for name, n in split.items() if n})
    for d, m, breakdown in _all(conn, f"SELECT {day}, {model}, cost_breakdown FROM usage "
                                      f"{where} AND cost_breakdown IS NOT NULL", params):
        parsed = orjson.loads(breakdown) if isinstance(breakdown, str | bytes) else breakdown
        usd = found.setdefault((d, m or ""), MeteredDay()).usd
        for name, line in (parsed.get("classes") or {}).items():
            usd[name] += Decimal(str(line.get("usd") or "0"))
    return found


def _all(conn: Any, sql: str, params: tuple) -> Iterator[tuple]:
    cursor = conn.cursor()
    try:
        cursor.execute(sql, params)
        while batch := cursor.fetchmany(BATCH_ROWS):
            yield from batch
    finally:
        cursor.close()
