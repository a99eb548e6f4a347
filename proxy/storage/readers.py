"""Every read of the usage log (and reprice's cost rewrite), behind one small class.

`open_reader(url)` gives a `LogReader` on a fresh connection, whatever holds the log;
its methods speak in domain terms (grouped usage, one call, spend per hour, rows to
reprice) and return plain values. The CLI, admin API, report, forecast, budgets and
reprice hold no SQL: they ask this. SQLite and PostgreSQL differ only in the `SqlFlavor`
(`proxy.storage.sql`); a new backend adds a flavor and one branch to `open_reader`.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from proxy.query import UNITS, UsageQuery
from proxy.storage import POSTGRES_SCHEMES, rollups
from proxy.storage import sql as q_sql
from proxy.storage.row import COLUMNS
from proxy.storage.sql import SQLITE, SqlFlavor
from proxy.timeparse import to_ts
from proxy.token_classes import PROMPT_COLUMNS

# Budget scope dimensions whose usage-log column has another name.
_COLUMN_OF = {"key": "key_name", "trace": "trace_id"}

if TYPE_CHECKING:
    from proxy.storage.metered import MeteredDay


@dataclass(frozen=True, slots=True)
class HourSpend:
    """Spend of the calls in one hour that share the asked-for dimension values."""

    attrs: dict[str, str | None]
    hour: datetime
    usd: Decimal
    tokens: int


@dataclass(frozen=True, slots=True)
class CostUpdate:
    """A repriced row: its new cost (None: still unpriced), breakdown and price version."""

    id: str
    cost_usd: Decimal | None
    cost_breakdown: str | None
    pricing_version: str | None


class LogReader:
    """One connection to the usage log; read-only unless opened `writable` (reprice)."""

    def __init__(self, conn: Any, flavor: SqlFlavor) -> None:
        self.conn = conn
        self.flavor = flavor

    @property
    def backend(self) -> str:
        return self.flavor.name

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def usage(self, q: UsageQuery) -> list[dict[str, Any]]:
        """Calls, tokens, exact cost, errors, rates grouped as `q` says (see UsageQuery)."""
        return q_sql.usage(self.conn, q, self.flavor)

    def export(self, q: UsageQuery, columns: Sequence[str] = COLUMNS) -> Any:
        """An open cursor over the raw rows `q` filters, oldest first (fetchmany it)."""
        return q_sql.export_cursor(self.conn, q, self.flavor, columns)

    def call(self, call_id: str) -> dict[str, Any] | None:
        """One row of the log, by its id."""
        return q_sql.call(self.conn, call_id, self.flavor)

    def charges(self, since: datetime | None, until: datetime | None,
                granularity: str) -> Iterator[dict[str, Any]]:
        """Calls that cost money (or should have), sorted by charge group then trace, for
        the FOCUS export (see `proxy.storage.charges`)."""
        from proxy.storage.charges import charge_rows

        return charge_rows(self.conn, since, until, granularity, self.flavor)

    def metered_by_day(self, provider: str, since: datetime, until: datetime
                       ) -> dict[tuple[str, str], MeteredDay]:
        """One provider's calls per UTC day and model, tokens and USD by class, for
        reconciling with its bill (see `proxy.storage.metered`)."""
        from proxy.storage.metered import metered_by_day

        return metered_by_day(self.conn, self.flavor, provider, since, until)

    def unpriced_models(self, since: datetime | None = None,
                        until: datetime | None = None) -> list[dict[str, Any]]:
        """Models called without a price: calls, first and last time (`priced = 0`)."""
        terms, params = q_sql.conditions(UsageQuery(since=since, until=until,
                                                     where={"priced": "0"}), self.flavor)
        return q_sql.fetch_dicts(
            self.conn, "SELECT provider, model, sum(repeat_count) AS calls, min(ts) AS first_ts, "
            f"max(ts) AS last_ts FROM usage WHERE {' AND '.join(terms)} "
            "GROUP BY provider, model ORDER BY calls DESC, provider, model", params)

    def spend_by_hour(self, dims: Sequence[str], since: datetime) -> list[HourSpend]:
        """Exact spend and tokens since `since`, per hour and per value of each dimension
        (`key`, `customer`, `feature`, `trace`, `tag:NAME`): a few rows per hour from a
        rollup where one has the dimensions, else one indexed range scan of the calls;
        however many budgets read it."""
        return self._spend_by(dims, since, 13, "%Y-%m-%dT%H")

    def spend_by_minute(self, dims: Sequence[str], since: datetime) -> list[HourSpend]:
        """The same per minute (each `hour` is then a minute): the anomaly check's
        trailing hour, counted from the log every instance writes to."""
        return self._spend_by(dims, since, 16, "%Y-%m-%dT%H:%M")

    def _spend_by(self, dims: Sequence[str], since: datetime, width: int,
                  fmt: str) -> list[HourSpend]:
        columns = [_COLUMN_OF.get(dim, dim) for dim in dims]
        rollup = rollups.covering(columns) if width == 13 else None
        exprs, params = [], []
        for dim, column in zip(dims, columns, strict=True):
            if dim.startswith("tag:"):
                expr, extra = self.flavor.tag(dim[4:])
                exprs.append(expr)
                params += extra
            else:
                exprs.append(rollup.column(column) if rollup is not None
                             else _COLUMN_OF.get(dim) or q_sql.dimension(dim)[0])
        n = len(dims)
        tokens = " + ".join((*PROMPT_COLUMNS, "output_tokens"))
        if rollup is None:
            sql = (f"SELECT {''.join(e + ', ' for e in exprs)}substr(ts, 1, {width}), "
                   f"sum({self.flavor.cost_units}), sum({tokens}) "
                   f"FROM usage WHERE ts >= {self.flavor.param} ")
        else:  # `since` is a whole hour: the rollup's hours are exact
            sql = (f"SELECT {''.join(e + ', ' for e in exprs)}hour, sum(cost_units), "
                   f"sum({tokens}) FROM {rollup.table} WHERE hour >= {self.flavor.param} ")
        sql += f"GROUP BY {', '.join(str(i + 1) for i in range(n + 1))}"
        cur = self.conn.cursor()
        try:
            cur.execute(sql, [*params, since.strftime(fmt)])
            return [HourSpend(attrs=dict(zip(dims, row[:n], strict=True)),
                              hour=datetime.strptime(row[n], fmt).replace(tzinfo=UTC),
                              usd=Decimal(int(row[n + 1] or 0)) * UNITS,
                              tokens=int(row[n + 2] or 0))
                    for row in cur.fetchall()]
        finally:
            cur.close()

    def rows_to_reprice(self, since: datetime, until: datetime | None = None
                        ) -> list[dict[str, Any]]:
        """Every row in the range, oldest first, as dicts of the contract's columns
        (`cost_breakdown` and `tags` decoded, whichever backend stored them)."""
        p = self.flavor.param
        sql = f"SELECT {', '.join(COLUMNS)} FROM usage WHERE ts >= {p}"
        params: list[Any] = [to_ts(since)]
        if until is not None:
            sql += f" AND ts < {p}"
            params.append(to_ts(until))
        rows = q_sql.fetch_dicts(self.conn, sql + " ORDER BY ts, id", params)
        for row in rows:
            for name in ("cost_breakdown", "tags"):
                if isinstance(row[name], str | bytes):
                    row[name] = orjson.loads(row[name])
        return rows

    def set_costs(self, updates: Sequence[CostUpdate]) -> None:
        """Rewrite the price of these rows, in one transaction (needs `writable`); the
        rollups lose the rows' old sums and gain the new ones in the same transaction."""
        p = self.flavor.param
        sql = (f"UPDATE usage SET cost_usd = {p}, cost_breakdown = {p}, "
               f"pricing_version = {p}, priced = {p} WHERE id = {p}")
        exact = self.flavor is not SQLITE  # PostgreSQL stores NUMERIC; SQLite a REAL
        params = [((u.cost_usd if exact else float(u.cost_usd))
                   if u.cost_usd is not None else None, u.cost_breakdown, u.pricing_version,
                   int(u.cost_usd is not None), u.id) for u in updates]
        repriced = "id IN (SELECT id FROM reprice_ids)"
        cur = self.conn.cursor()
        try:
            if self.flavor is SQLITE:
                cur.execute("BEGIN IMMEDIATE")
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS reprice_ids (id TEXT PRIMARY KEY)")
            cur.execute("DELETE FROM reprice_ids")
            cur.executemany(f"INSERT INTO reprice_ids (id) VALUES ({p}) ON CONFLICT DO NOTHING",
                            [(u.id,) for u in updates])
            for statement in rollups.fold_sql(self.flavor.name, "usage", repriced, "-"):
                cur.execute(statement)
            cur.executemany(sql, params)
            for statement in (*rollups.fold_sql(self.flavor.name, "usage", repriced),
                              *rollups.PRUNE_SQL, "DELETE FROM reprice_ids"):
                cur.execute(statement)
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            cur.close()


def open_reader(usage_log_url: str, *, writable: bool = False) -> LogReader:
    """A LogReader on a fresh connection to the usage log (read-only unless `writable`)."""
    if usage_log_url.startswith("sqlite:///"):
        from proxy.storage.sqlite import connect, sqlite_path

        path = sqlite_path(usage_log_url)
        if not path.exists():
            raise ValueError(f"no usage log at {path} yet: run meterproxy serve first")
        conn = connect(path, readonly=not writable)
        _ensure_math(conn)
        return LogReader(conn, SQLITE)
    if usage_log_url.startswith(POSTGRES_SCHEMES):
        from proxy.storage.postgres import connect, connect_reader
        from proxy.storage.sql import POSTGRES

        conn = connect(usage_log_url, autocommit=False) if writable else \
            connect_reader(usage_log_url)
        return LogReader(conn, POSTGRES)
    raise ValueError(f"storage.usage_log: cannot read {usage_log_url!r} "
                     "(supported: sqlite:///file.db, postgresql://...)")


def _ensure_math(conn: sqlite3.Connection) -> None:
    """SQLite builds without its math functions still get `ln` (for duration percentiles)."""
    try:
        conn.execute("SELECT ln(2)").fetchone()
    except sqlite3.OperationalError:
        conn.create_function("ln", 1, lambda x: math.log(x) if x and x > 0 else None,
                             deterministic=True)
