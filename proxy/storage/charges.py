"""The usage log read as charges: calls that cost money (or should have), in group order.

The FOCUS export (proxy.focus) aggregates these rows in one pass. The SQL sorts them by
charge period and attribution, then by trace id, so every group arrives contiguous and
its distinct traces can be counted without remembering them: memory stays flat however
large the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from proxy.storage.sql import SQLITE, SqlFlavor
from proxy.timeparse import to_ts
from proxy.token_classes import COLUMNS as COUNT_COLUMNS

# One charge group: the period bucket and the attribution a FOCUS row is keyed by.
GROUP = ("period", "provider", "model", "key_name", "customer", "feature", "tags")
_FIXED = ("ts", "provider", "model", "key_name", "customer", "feature", "tags", "trace_id",
          "pricing_version", "priced", "cost_breakdown", "repeat_count")
_PERIOD = {"hour": "substr(ts, 1, 13)", "day": "substr(ts, 1, 10)"}
BATCH_ROWS = 2000


def charge_rows(conn: Any, since: datetime | None, until: datetime | None,
                granularity: str, flavor: SqlFlavor = SQLITE) -> Iterator[dict[str, Any]]:
    """Priced calls with a cost breakdown and unpriced calls, sorted by group then trace.

    Each row is a dict of `period` (the charge period's start as `YYYY-MM-DD` or
    `YYYY-MM-DDTHH`) and the columns the export needs. Calls that cost nothing (refused,
    free endpoints) have no breakdown and are left out by the database.
    """
    if granularity not in _PERIOD:
        raise ValueError(f"granularity must be hour or day, not {granularity!r}")
    columns = (*_FIXED, *COUNT_COLUMNS)
    p = flavor.param
    terms = ["(cost_breakdown IS NOT NULL OR priced = 0)"]
    params: list[Any] = []
    if since is not None:
        terms.append(f"ts >= {p}")
        params.append(to_ts(since))
    if until is not None:
        terms.append(f"ts < {p}")
        params.append(to_ts(until))
    order = ", ".join(("period", *GROUP[1:], "trace_id"))
    sql = (f"SELECT {_PERIOD[granularity]} AS period, {', '.join(columns)} FROM usage "
           f"WHERE {' AND '.join(terms)} ORDER BY {order}")
    names = ("period", *columns)
    # PostgreSQL: a server-side cursor, or the driver would fetch the whole result first.
    cursor = (conn.cursor(name="meterproxy_charges", withhold=True)
              if flavor.name == "postgresql" else conn.cursor())
    try:
        cursor.execute(sql, params)
        while batch := cursor.fetchmany(BATCH_ROWS):
            for values in batch:
                yield dict(zip(names, values, strict=True))
    finally:
        cursor.close()
