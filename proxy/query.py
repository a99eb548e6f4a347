"""The one query layer behind the CLI, the admin API and the dashboard.

Aggregates are pushed down to SQL. Costs are summed exactly: each stored cost (rounded to
1e-10 USD) is turned back into an integer count of 1e-10 USD before summing, so totals are
Decimal-exact rather than a float sum.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from proxy.storage.row import COLUMNS, TOKEN_COLUMNS
from proxy.timeparse import to_ts

TAG_NAME = re.compile(r"[a-z0-9_.-]{1,64}")
# Columns that name a thing (groupable, filterable); numbers are aggregated instead.
DIMENSIONS = ("key_name", "provider", "endpoint", "model", "response_model", "stream",
              "status", "outcome", "usage_source", "pricing_version", "priced", "customer",
              "feature", "trace_id", "upstream_request_id")
TIME_BUCKETS = {
    "hour": "substr(ts, 1, 13) || ':00'",
    "day": "substr(ts, 1, 10)",
    "week": "date(substr(ts, 1, 10), '-6 days', 'weekday 1')",
    "month": "substr(ts, 1, 7)",
}
ORDERABLE = ("calls", "cost_usd", *TOKEN_COLUMNS)
_UNITS = Decimal("1e-10")


class QueryError(ValueError):
    """A query that names an unknown column or has a malformed filter."""


@dataclass
class UsageQuery:
    since: datetime | None = None
    until: datetime | None = None
    group_by: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)
    order_by: str | None = None
    limit: int | None = None


def _dimension(name: str) -> tuple[str, list[Any]]:
    """The SQL expression (and its parameters) for a group-by or filter name."""
    if name in DIMENSIONS:
        return name, []
    if name in TIME_BUCKETS:
        return TIME_BUCKETS[name], []
    if name.startswith("tag:"):
        tag = name[4:]
        if not TAG_NAME.fullmatch(tag):
            raise QueryError(f"bad tag name {tag!r}")
        return "json_extract(tags, ?)", [f'$."{tag}"']
    known = ", ".join((*DIMENSIONS, *TIME_BUCKETS, "tag:NAME"))
    raise QueryError(f"cannot group or filter by {name!r} (known: {known})")


def parse_where(items: list[str]) -> dict[str, str]:
    where = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise QueryError(f"--where takes key=value, not {item!r}")
        where[key.strip()] = value
    return where


def usage(conn: sqlite3.Connection, q: UsageQuery) -> list[dict[str, Any]]:
    """Calls, tokens by class and exact cost, grouped and filtered as `q` says."""
    selects: list[str] = []
    params: list[Any] = []
    for name in q.group_by:
        expr, p = _dimension(name)
        selects.append(f"{expr} AS {_quote(name)}")
        params += p
    sums = ", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in TOKEN_COLUMNS)
    selects.append(f"count(*) AS calls, {sums}, "
                   "sum(CAST(round(cost_usd * 1e10) AS INTEGER)) AS cost_units, "
                   "coalesce(sum(priced = 0), 0) AS unpriced_calls")
    conditions, where_params = _conditions(q)
    sql = f"SELECT {', '.join(selects)} FROM usage"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    params += where_params
    if q.group_by:
        sql += " GROUP BY " + ", ".join(str(i + 1) for i in range(len(q.group_by)))
    order = q.order_by or "cost_usd"
    if order not in ORDERABLE and order not in q.group_by:
        raise QueryError(f"cannot order by {order!r} (known: {', '.join(ORDERABLE)})")
    order_expr = "cost_units" if order == "cost_usd" else _quote(order)
    direction = "ASC" if order in q.group_by else "DESC"
    sql += f" ORDER BY {order_expr} {direction}" + "".join(
        f", {_quote(g)} ASC" for g in q.group_by if g != order)
    if q.limit is not None:
        sql += " LIMIT ?"
        params.append(int(q.limit))
    conn.row_factory = sqlite3.Row
    rows = []
    for r in conn.execute(sql, params):
        row = dict(r)
        if not q.group_by and row["calls"] == 0:
            row["cost_units"] = 0
        units = row.pop("cost_units")
        row["cost_usd"] = Decimal(units or 0) * _UNITS
        rows.append(row)
    return rows


def _conditions(q: UsageQuery) -> tuple[list[str], list[Any]]:
    conditions: list[str] = []
    params: list[Any] = []
    if q.since is not None:
        conditions.append("ts >= ?")
        params.append(to_ts(q.since))
    if q.until is not None:
        conditions.append("ts < ?")
        params.append(to_ts(q.until))
    for name, value in q.where.items():
        expr, p = _dimension(name)
        conditions.append(f"{expr} = ?")
        params += [*p, value]
    return conditions, params


def call(conn: sqlite3.Connection, call_id: str) -> dict[str, Any] | None:
    """One row of the usage log, by id."""
    conn.row_factory = sqlite3.Row
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage WHERE id = ?",
                       (call_id,)).fetchone()
    return dict(row) if row else None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
