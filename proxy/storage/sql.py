"""The SQL of the usage log's reads, for both backends (used only by `LogReader`).

Everything is pushed down to SQL: filters, grouping, sums, ordering and the limit. Costs
are summed exactly: each stored cost (rounded to 1e-10 USD) is turned back into an
integer count of 1e-10 USD before summing, so totals are Decimal-exact rather than a
float sum. Duration percentiles come from a log-scale histogram counted in SQL (25
buckets per e-fold, so a reported percentile is within 2.1% of the exact one).

The functions take any DB-API connection plus the `SqlFlavor` of its database; the rest
of the proxy asks `proxy.storage.readers.LogReader` instead.

How a new backend plugs in: define a `SqlFlavor` next to `SQLITE` and `POSTGRES` below
(placeholder style, tag extraction, ISO-week bucket, exact cost units, duration bucket,
how to write a group key), and return it from `proxy.storage.readers.open_reader` for
that URL scheme. The SQL built here otherwise sticks to what both databases accept
(`substr`, `||`, `CASE`, `coalesce`, `count`, `sum`, `IN`, `LIMIT`), and never contains a
literal `%` (the format placeholder style would take it for one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from proxy.query import (
    BUCKETS_PER_E,
    COARSE_BUCKETS,
    DIMENSIONS,
    ERROR_OUTCOMES,
    INTEGER_DIMENSIONS,
    KNOWN_NAMES,
    ORDERABLE,
    PERCENTILES,
    REFUSAL_OUTCOMES,
    TAG_NAME,
    TIME_BUCKETS,
    UNITS,
    QueryError,
    UsageQuery,
    percentile,
)
from proxy.storage import rollups
from proxy.storage.row import COLUMNS
from proxy.timeparse import to_ts
from proxy.token_classes import COLUMNS as CLASS_COLUMNS


@dataclass(frozen=True)
class SqlFlavor:
    """What differs between the SQL of the usage-log backends; see the module docstring."""

    name: str
    param: str  # the DB-API placeholder: "?" (qmark) or "%s" (format)
    tag: Callable[[str], tuple[str, list[Any]]]  # SQL for a tag's value, and its parameters
    week: str  # the Monday of the week of {day} (a 'YYYY-MM-DD' expression), same form
    cost_units: str  # cost_usd as an exact integer count of 1e-10 USD
    duration_bucket: str  # round(ln(duration_ms) * BUCKETS_PER_E) as an integer
    group_key: Callable[[str], str]  # how to write a column in GROUP BY (index hints)


# Grouping raw rows by a column that leads an index (trace_id, outcome) would cost a
# random table read per row to avoid a sort, three times slower on a large log than a
# scan and a sort, so unary + hides the index from the planner. (The covering indexes
# that once made grouping by customer, feature or model cheap gave way to the rollups in
# m006, see proxy.storage.rollups.)

SQLITE = SqlFlavor(
    name="sqlite",
    param="?",
    tag=lambda name: ("json_extract(tags, ?)", [f'$."{name}"']),
    week="date({day}, '-6 days', 'weekday 1')",
    cost_units="CAST(round(cost_usd * 1e10) AS INTEGER)",
    duration_bucket=f"CAST(round(ln(duration_ms) * {BUCKETS_PER_E}) AS INTEGER)",
    group_key=lambda column: f"+{column}",
)

# PostgreSQL (proxy.storage.postgres): tags are JSONB, cost_usd is an exact NUMERIC.
POSTGRES = SqlFlavor(
    name="postgresql",
    param="%s",
    tag=lambda name: ("(tags ->> %s)", [name]),
    week="to_char(date_trunc('week', ({day})::timestamp), 'YYYY-MM-DD')",
    cost_units="CAST(round(cost_usd * 10000000000) AS BIGINT)",
    duration_bucket=f"CAST(round(ln(duration_ms) * {BUCKETS_PER_E}) AS INTEGER)",
    group_key=lambda column: column,  # hash aggregation: no sort to avoid
)


def dimension(name: str, flavor: SqlFlavor = SQLITE) -> tuple[str, list[Any]]:
    """The SQL expression (and its parameters) for a group-by or filter name."""
    if name in DIMENSIONS:
        return name, []
    if name in TIME_BUCKETS:
        return _bucket(name, flavor), []
    if name.startswith("tag:"):
        tag = name[4:]
        if not TAG_NAME.fullmatch(tag):
            raise QueryError(f"bad tag name {tag!r} (tags are [a-z0-9_.-], up to 64)")
        return flavor.tag(tag)
    raise QueryError(f"cannot group or filter by {name!r} (known: {', '.join(KNOWN_NAMES)})")


def _bucket(name: str, flavor: SqlFlavor) -> str:
    if name == "hour":
        return "substr(ts, 1, 13) || ':00'"
    if name == "day":
        return "substr(ts, 1, 10)"
    if name == "month":
        return "substr(ts, 1, 7)"
    return flavor.week.format(day="substr(ts, 1, 10)")


def conditions(q: UsageQuery, flavor: SqlFlavor = SQLITE) -> tuple[list[str], list[Any]]:
    """The WHERE terms (joined with AND) and their parameters for a query's filters."""
    p = flavor.param
    terms: list[str] = []
    params: list[Any] = []
    if q.since is not None:
        terms.append(f"ts >= {p}")
        params.append(to_ts(q.since))
    if q.until is not None:
        terms.append(f"ts < {p}")
        params.append(to_ts(q.until))
    for negate, filters in ((False, q.where), (True, q.exclude)):
        for name, value in filters.items():
            expr, expr_params = dimension(name, flavor)
            values = [value] if isinstance(value, str) else list(value)
            typed = [_typed(name, v) for v in values if v != ""]
            parts = []
            if typed and name in INTEGER_DIMENSIONS:
                # Validated integers go in as literals, so a partial index (priced = 0)
                # can serve them.
                parts.append(f"{expr} = {typed[0]}" if len(typed) == 1
                             else f"{expr} IN ({', '.join(str(v) for v in typed)})")
            elif typed:
                marks = ", ".join(p for _ in typed)
                parts.append(f"{expr} IN ({marks})" if len(typed) > 1 else f"{expr} = {p}")
                params += expr_params + typed
            if len(typed) < len(values):
                parts.append(f"{expr} IS NULL")
                params += expr_params
            match = " OR ".join(parts) or "1 = 0"  # an empty list matches nothing
            if negate:
                # NOT (x = v) is unknown, not true, where x is NULL; keep those rows.
                terms.append(f"NOT coalesce(({match}), 0 = 1)")
            else:
                terms.append(f"({match})")
    return terms, params


def _typed(name: str, value: str) -> Any:
    if name in INTEGER_DIMENSIONS:
        try:
            return int(value)
        except ValueError:
            raise QueryError(f"{name} takes a whole number, not {value!r}") from None
    return value


def _aggregates(spend_only: bool, n: str, cost_units: str) -> str:
    """The sums of a usage question; `n` is how many calls a row stands for
    (`repeat_count`, or a rollup's `calls`) and `cost_units` its exact cost."""
    spend = (f"coalesce(sum({n}), 0) AS calls, sum({cost_units}) AS cost_units, "
             f"coalesce(sum(CASE WHEN priced = 0 THEN {n} ELSE 0 END), 0) AS unpriced_calls")
    if spend_only:
        return spend
    sums = ", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in CLASS_COLUMNS)
    errors, refusals = _ERRORS, _REFUSALS
    return (f"coalesce(sum({n}), 0) AS calls, {sums}, sum({cost_units}) AS cost_units, "
            f"coalesce(sum(CASE WHEN priced = 0 THEN {n} ELSE 0 END), 0) AS unpriced_calls, "
            f"coalesce(sum(CASE WHEN outcome IN ({errors}) THEN {n} ELSE 0 END), 0) AS errors, "
            f"coalesce(sum(CASE WHEN outcome IN ({refusals}) THEN {n} ELSE 0 END), 0) "
            "AS refusals")


_ERRORS = ", ".join(f"'{o}'" for o in ERROR_OUTCOMES)  # SQL literals, from a closed set
_REFUSALS = ", ".join(f"'{o}'" for o in REFUSAL_OUTCOMES)
_ORDER_SQL = {
    "cost_usd": "cost_units",
    "cache_hit_rate": "CASE WHEN sum(cached_input_tokens) + sum(input_tokens) > 0 THEN "
                      "1.0 * sum(cached_input_tokens) / "
                      "(sum(cached_input_tokens) + sum(input_tokens)) ELSE 0 END",
    "error_rate": "1.0 * sum(CASE WHEN outcome IN "
                  f"({_ERRORS}) THEN {{n}} ELSE 0 END) / sum({{n}})",
}


def usage(conn: Any, q: UsageQuery, flavor: SqlFlavor = SQLITE) -> list[dict[str, Any]]:
    """Calls, tokens by class, exact cost, errors, refusals and rates, as `q` says.

    Each row has the group-by names, then `calls`, the token classes, `cost_usd`
    (Decimal), `unpriced_calls`, `errors`, `refusals`, `cache_hit_rate` = cached /
    (cached + uncached input), `error_rate`, and with `q.durations` `p50_ms`, `p95_ms`.
    """
    order = q.order_by or "cost_usd"
    orderable = ("calls", "cost_usd", "unpriced_calls") if q.spend_only else ORDERABLE
    if order not in orderable and order not in q.group_by:
        raise QueryError(f"cannot order by {order!r} (known: {', '.join(orderable)}, "
                         "or a group-by name)")
    if q.limit is not None and q.limit < 0:
        raise QueryError("a limit cannot be negative")
    by_percentile = order in PERCENTILES
    durations = q.durations or by_percentile
    # Weeks and months are summed from days: days come from an index in order, so only
    # the day totals are sorted into weeks, not every call.
    coarse = any(g in COARSE_BUCKETS for g in q.group_by)
    inner = list(dict.fromkeys("day" if g in COARSE_BUCKETS else g for g in q.group_by))
    rollup = rollups.plan(q)
    sql, params = _grouped(q, inner, flavor, rollup)
    n = "repeat_count" if rollup is None else "n"
    order_sql = {**_ORDER_SQL, "error_rate": _ORDER_SQL["error_rate"].format(n=n)}
    if coarse:
        outer = [_coarse(g, flavor) for g in q.group_by]
        summed = ("calls", "cost_units", "unpriced_calls") if q.spend_only else (
            "calls", *CLASS_COLUMNS, "cost_units", "unpriced_calls", "errors", "refusals")
        sums = ", ".join(f"sum({c}) AS {c}" for c in summed)
        sql = (f"SELECT {', '.join(outer)}, {sums} FROM ({sql}) AS days "
               f"GROUP BY {', '.join(str(i + 1) for i in range(len(outer)))}")
        order_sql = {**_ORDER_SQL, "error_rate": "1.0 * sum(errors) / sum(calls)"}
    if q.group_by and not by_percentile:
        if order in q.group_by:
            sql += f" ORDER BY {quote(order)} ASC"
        else:
            sql += f" ORDER BY {order_sql.get(order, order)} DESC"
        sql += "".join(f", {quote(g)} ASC" for g in q.group_by if g != order)
        if q.limit is not None:
            sql += f" LIMIT {flavor.param}"
            params.append(int(q.limit))
    rows = [_finish(row, q.group_by) for row in fetch_dicts(conn, sql, params)]
    if not q.group_by and rows and rows[0]["calls"] == 0:
        rows[0]["cost_usd"] = Decimal(0)
    if durations:
        _add_percentiles(conn, q, flavor, rows)
    if by_percentile:
        rows.sort(key=lambda r: (r[order] is None, -(r[order] or 0)))
        if q.limit is not None:
            rows = rows[:q.limit]
    return rows


def _grouped(q: UsageQuery, group_by: list[str], flavor: SqlFlavor,
             rollup: rollups.Rollup | None = None) -> tuple[str, list[Any]]:
    """SELECT the group names and the sums over the calls `q` filters, GROUP BY them:
    from raw rows, or from `rollup` (its whole hours, raw rows for the edge hours)."""
    selects: list[str] = []
    params: list[Any] = []
    for name in group_by:
        expr, expr_params = dimension(name, flavor)
        selects.append(f"{flavor.group_key(expr) if name in DIMENSIONS else expr} "
                       f"AS {quote(name)}")
        params += expr_params
    if rollup is None:
        selects.append(_aggregates(q.spend_only, "repeat_count", flavor.cost_units))
        terms, where_params = conditions(q, flavor)
        sql = f"SELECT {', '.join(selects)} FROM usage"
    else:
        selects.append(_aggregates(q.spend_only, "n", "cu"))
        subquery, source_params = rollups.source(q, rollup, flavor.param, flavor.cost_units)
        params += source_params
        # The source already keeps only the window; the other filters apply as on usage.
        terms, where_params = conditions(replace(q, since=None, until=None), flavor)
        sql = f"SELECT {', '.join(selects)} FROM {subquery} AS usage"
    if terms:
        sql += " WHERE " + " AND ".join(terms)
    params += where_params
    if group_by:
        sql += " GROUP BY " + ", ".join(str(i + 1) for i in range(len(group_by)))
    return sql, params


def _coarse(name: str, flavor: SqlFlavor) -> str:
    """A group of the outer query over day totals: weeks and months from the day."""
    day = quote("day")
    if name == "week":
        return f"{flavor.week.format(day=day)} AS {quote(name)}"
    if name == "month":
        return f"substr({day}, 1, 7) AS {quote(name)}"
    return f"{quote(name)} AS {quote(name)}"


def _finish(row: dict[str, Any], group_by: list[str]) -> dict[str, Any]:
    """A result row in the contract's order: group names, calls, token classes, cost_usd,
    the other counts, then the rates."""
    out: dict[str, Any] = {name: row[name] for name in group_by}
    out["calls"] = int(row["calls"] or 0)
    units = row["cost_units"]
    if "errors" not in row:  # spend_only
        out["cost_usd"] = Decimal(int(units)) * UNITS if units is not None else Decimal(0)
        out["unpriced_calls"] = int(row["unpriced_calls"] or 0)
        return out
    for name in CLASS_COLUMNS:
        out[name] = int(row[name] or 0)
    out["cost_usd"] = Decimal(int(units)) * UNITS if units is not None else Decimal(0)
    for name in ("unpriced_calls", "errors", "refusals"):
        out[name] = int(row[name] or 0)
    prompt = out["cached_input_tokens"] + out["input_tokens"]
    out["cache_hit_rate"] = out["cached_input_tokens"] / prompt if prompt else 0.0
    out["error_rate"] = out["errors"] / out["calls"] if out["calls"] else 0.0
    return out


def _add_percentiles(conn: Any, q: UsageQuery, flavor: SqlFlavor,
                     rows: list[dict[str, Any]]) -> None:
    """p50/p95 of duration_ms per group, from a log-scale histogram counted in SQL."""
    selects: list[str] = []
    params: list[Any] = []
    for name in q.group_by:
        expr, expr_params = dimension(name, flavor)
        selects.append(flavor.group_key(expr) if name in DIMENSIONS else expr)
        params += expr_params
    terms, where_params = conditions(q, flavor)
    params += where_params
    terms.append("duration_ms > 0")
    if len(q.group_by) == 1 and 0 < len(rows) <= 1000 and q.limit is not None:
        # Only the groups being returned: a top-10 by customer need not bin every call.
        expr, expr_params = dimension(q.group_by[0], flavor)
        values = [r[q.group_by[0]] for r in rows if r[q.group_by[0]] is not None]
        parts = [f"{expr} IN ({', '.join(flavor.param for _ in values)})"] if values else []
        params += expr_params + values if values else []
        if len(values) < len(rows):
            parts.append(f"{expr} IS NULL")
            params += expr_params
        terms.append("(" + " OR ".join(parts) + ")")
    selects += [flavor.duration_bucket, "sum(repeat_count)"]
    n = len(selects) - 1
    sql = (f"SELECT {', '.join(selects)} FROM usage WHERE {' AND '.join(terms)} "
           f"GROUP BY {', '.join(str(i + 1) for i in range(n))}")
    histograms: dict[tuple[Any, ...], dict[int, int]] = {}
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        for record in cur:
            key = tuple(record[:-2])
            histograms.setdefault(key, {})[int(record[-2])] = int(record[-1])
    finally:
        cur.close()
    for row in rows:
        hist = histograms.get(tuple(row[g] for g in q.group_by), {})
        row["p50_ms"] = percentile(hist, 0.50)
        row["p95_ms"] = percentile(hist, 0.95)


def fetch_dicts(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows as dicts keyed by the result's column names, on any DB-API connection."""
    cur = conn.cursor()
    try:
        cur.execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, record, strict=True)) for record in cur.fetchall()]
    finally:
        cur.close()


def call(conn: Any, call_id: str, flavor: SqlFlavor = SQLITE) -> dict[str, Any] | None:
    """One row of the usage log, by id."""
    rows = fetch_dicts(conn, f"SELECT {', '.join(COLUMNS)} FROM usage WHERE id = "
                       f"{flavor.param}", [call_id])
    return rows[0] if rows else None


def export_cursor(conn: Any, q: UsageQuery, flavor: SqlFlavor = SQLITE,
                  columns: Sequence[str] = COLUMNS) -> Any:
    """An open cursor over the raw rows `q` filters, oldest first; fetch it in batches."""
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise QueryError(f"unknown column(s) {', '.join(unknown)} "
                         f"(known: {', '.join(COLUMNS)})")
    terms, params = conditions(q, flavor)
    sql = f"SELECT {', '.join(columns)} FROM usage"
    if terms:
        sql += " WHERE " + " AND ".join(terms)
    sql += " ORDER BY ts, id"
    if q.limit is not None:
        sql += f" LIMIT {flavor.param}"
        params.append(int(q.limit))
    cur = conn.cursor()
    cur.execute(sql, params)
    return cur


def batches(cursor: Any, size: int = 1000) -> Iterator[list[tuple[Any, ...]]]:
    """The cursor's rows, `size` at a time, so no caller holds the whole log."""
    try:
        while True:
            batch = cursor.fetchmany(size)
            if not batch:
                return
            yield batch
    finally:
        cursor.close()


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
