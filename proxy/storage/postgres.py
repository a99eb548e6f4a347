"""The PostgreSQL usage log: the SQLite schema's twin, batched inserts, shared by instances.

Same table, same columns, same migrations (by name) as `proxy.storage.sqlite`, with
PostgreSQL types where they say more: NUMERIC for exact money, JSONB for `tags` and
`cost_breakdown`. `ts` stays ISO-8601 text so both logs sort and filter the same way.
Migrations are an append-only list; never edit one that has shipped, add the next (and
its SQLite twin). Several instances may start at once: an advisory lock serialises them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
import structlog

from proxy.storage import LogUnavailable, rollups
from proxy.storage.row import COLUMNS, UsageRow
from proxy.storage.shipped import (
    M002_VIEWS,
    M003_COMMON,
    M003_COVER_KEYS,
    M003_COVERED,
    M004_BACKFILL,
    M004_COLUMNS,
    M004_COVERED,
    M005_COLUMNS,
    M006_COST_UNITS,
    M006_DAILY,
    M006_DROP_INDEXES,
    M006_ROLLUPS,
    M007_ANOMALIES,
    M007_INDEXES,
    M008_DROP,
    M008_VIEWS,
    m006_backfill_daily,
    m006_create,
    m006_create_daily,
    m006_fold,
)

log = structlog.get_logger("meterproxy.usage_log")

MIGRATION_SET = "meterproxy"
CONNECT_TIMEOUT_S = 3
# Any stable 64-bit number: the advisory lock that serialises migrations across instances.
_MIGRATION_LOCK = 0x6D65746572

Migration = Callable[[psycopg.Connection], None]
migrations: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    """Register the next migration, named like its SQLite twin (m001_usage, ...)."""
    migrations.append((fn.__name__, fn))
    return fn


@migration
def m001_usage(conn: psycopg.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE usage (
            id TEXT PRIMARY KEY,
            ts TEXT NOT NULL,
            duration_ms DOUBLE PRECISION,
            ttfb_ms DOUBLE PRECISION,
            key_name TEXT,
            provider TEXT,
            endpoint TEXT,
            model TEXT,
            response_model TEXT,
            stream INTEGER NOT NULL DEFAULT 0,
            status INTEGER,
            outcome TEXT NOT NULL,
            input_tokens BIGINT NOT NULL DEFAULT 0,
            cached_input_tokens BIGINT NOT NULL DEFAULT 0,
            cache_write_tokens BIGINT NOT NULL DEFAULT 0,
            cache_write_1h_tokens BIGINT NOT NULL DEFAULT 0,
            output_tokens BIGINT NOT NULL DEFAULT 0,
            reasoning_tokens BIGINT NOT NULL DEFAULT 0,
            usage_source TEXT,
            cost_usd NUMERIC(30, 10),
            cost_breakdown JSONB,
            pricing_version TEXT,
            priced INTEGER NOT NULL DEFAULT 1,
            customer TEXT,
            feature TEXT,
            trace_id TEXT,
            tags JSONB,
            upstream_request_id TEXT,
            error TEXT
        )
        """
    )
    for column in ("ts", "key_name", "customer", "feature", "model"):
        conn.execute(f"CREATE INDEX idx_usage_{column}_ts ON usage ({column}, ts)")
    conn.execute("CREATE INDEX idx_usage_tags ON usage USING gin (tags jsonb_path_ops)")


# Views for psql and BI tools: plain sums, rounded for reading; `meterproxy usage` gives
# the exact ones. The same views as SQLite's m002_views.
@migration
def m002_views(conn: psycopg.Connection) -> None:
    for statement in M002_VIEWS:
        conn.execute(statement)


@migration
def m003_query_indexes(conn: psycopg.Connection) -> None:
    # SQLite's twin: spend by customer, feature or model reads a covering index (the
    # summed columns ride along with INCLUDE), replacing the narrower (column, ts)
    # indexes; day buckets, refusals, unpriced calls and traces are indexed too.
    for column, key in M003_COVER_KEYS:
        conn.execute(f"DROP INDEX idx_usage_{column}_ts")
        conn.execute(f"CREATE INDEX idx_usage_{column}_cover ON usage ({key}) "
                     f"INCLUDE ({M003_COVERED})")
    conn.execute("CREATE INDEX idx_usage_day ON usage (substr(ts, 1, 10), ts) "
                 "INCLUDE (cost_usd, priced)")
    for statement in M003_COMMON:
        conn.execute(statement)
    if conn.execute("SELECT 1 FROM usage LIMIT 1").fetchone():
        conn.execute("ANALYZE usage")


@migration
def m004_token_classes(conn: psycopg.Connection) -> None:
    # SQLite's twin: the new class columns, and the counts old breakdowns recorded.
    for column in M004_COLUMNS:
        conn.execute(f"ALTER TABLE usage ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0")
    for column, cls, unit in M004_BACKFILL:
        path = f"'{{classes,{cls},{unit}}}'"
        conn.execute(f"UPDATE usage SET {column} = (cost_breakdown #>> {path})::bigint "
                     f"WHERE cost_breakdown #>> {path} IS NOT NULL")
    for column, key in M003_COVER_KEYS:
        conn.execute(f"DROP INDEX idx_usage_{column}_cover")
        conn.execute(f"CREATE INDEX idx_usage_{column}_cover ON usage ({key}) "
                     f"INCLUDE ({M004_COVERED})")



@migration
def m005_call_shape(conn: psycopg.Connection) -> None:
    # Folded refusals and the stable-prefix fingerprint; old rows each stand for one call
    # and have no fingerprint.
    for column, kind in M005_COLUMNS:
        conn.execute(f"ALTER TABLE usage ADD COLUMN {column} {kind}")


@migration
def m006_rollups(conn: psycopg.Connection) -> None:
    # SQLite's twin: hourly rollups backfilled from the logged rows; the covering indexes
    # they replace are dropped.
    for table, dims in M006_ROLLUPS:
        conn.execute(m006_create(table, dims, "BIGINT"))
        conn.execute(m006_fold(table, dims, M006_COST_UNITS["postgresql"], "usage", "true"))
    hourly_dims = dict(M006_ROLLUPS)
    for table, hourly in M006_DAILY:  # daily twins, summed from the hourly rollups
        conn.execute(m006_create_daily(table, hourly_dims[hourly], "BIGINT"))
        conn.execute(m006_backfill_daily(table, hourly, hourly_dims[hourly]))
    for name in M006_DROP_INDEXES:
        conn.execute(f"DROP INDEX {name}")


@migration
def m007_anomalies(conn: psycopg.Connection) -> None:
    # SQLite's twin, with exact NUMERIC amounts.
    conn.execute(M007_ANOMALIES.format(money="NUMERIC(30, 10)"))
    for statement in M007_INDEXES:
        conn.execute(statement)



@migration
def m008_views_count_calls(conn: psycopg.Connection) -> None:
    # The Datasette/BI views count a folded refusal row as the calls it stands for.
    for statement in (*M008_DROP, *M008_VIEWS):
        conn.execute(statement)

def dsn(url: str) -> str:
    """A libpq URL from a `storage.usage_log` URL (SQLAlchemy's `+psycopg` is dropped)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection with a short connect timeout; unreachable raises LogUnavailable."""
    try:
        return psycopg.connect(dsn(url), autocommit=autocommit,
                               connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="meterproxy")
    except psycopg.OperationalError as exc:
        raise LogUnavailable(f"postgresql unreachable: {_first_line(exc)}") from exc


def connect_reader(url: str) -> psycopg.Connection:
    """A read-only connection for the query layer (autocommit: no transaction lingers)."""
    try:
        return psycopg.connect(dsn(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="meterproxy-reader",
                               options="-c default_transaction_read_only=on")
    except psycopg.OperationalError as exc:
        raise LogUnavailable(f"postgresql unreachable: {_first_line(exc)}") from exc


def migrate(conn: psycopg.Connection) -> list[str]:
    """Create or upgrade the schema; returns the names of the migrations applied now."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("""
            CREATE TABLE IF NOT EXISTS meterproxy_migrations (
                migration_set TEXT NOT NULL,
                name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (migration_set, name)
            )""")
        done = {name for (name,) in conn.execute(
            "SELECT name FROM meterproxy_migrations WHERE migration_set = %s",
            (MIGRATION_SET,))}
        for name, fn in migrations:
            if name in done:
                continue
            fn(conn)
            conn.execute("INSERT INTO meterproxy_migrations (migration_set, name) "
                         "VALUES (%s, %s)", (MIGRATION_SET, name))
            applied_now.append(name)
    return applied_now


_COLUMNS = ", ".join(COLUMNS)
_COST = COLUMNS.index("cost_usd")
# The rows of the batch that were not logged yet (a replay's are) go into `usage` and,
# through `usage_new`, into every rollup, in the batch's transaction.
_MOVE = (f"WITH new AS (INSERT INTO usage ({_COLUMNS}) SELECT {_COLUMNS} FROM usage_incoming "
         f"ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}) "
         f"INSERT INTO usage_new ({_COLUMNS}) SELECT {_COLUMNS} FROM new")
_FOLD = rollups.fold_sql("postgresql", "usage_new")


def _money(value: float | None) -> Decimal | None:
    # The row carries a float rounded from a Decimal at 1e-10; its shortest repr is that
    # decimal again, so NUMERIC stores the exact amount.
    return None if value is None else Decimal(repr(value))


class PostgresUsageLog:
    """Appends rows to PostgreSQL in batches. Used from the writer thread only.

    A batch is COPYed into a temporary table, then moved into `usage` with
    `ON CONFLICT (id) DO NOTHING`: one round of COPY for speed, and a batch written twice
    (a replay after a lost acknowledgement) still leaves one row per call. The rows that
    went in are folded into the hourly rollups in the same transaction.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection | None = None

    def open(self) -> None:
        self._connection()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.url)
            try:
                applied = migrate(conn)
                for table in ("usage_incoming", "usage_new"):
                    conn.execute(f"CREATE TEMP TABLE {table} (LIKE usage INCLUDING DEFAULTS) "
                                 "ON COMMIT DELETE ROWS")
            except psycopg.OperationalError as exc:
                conn.close()
                raise LogUnavailable(f"postgresql unreachable: {_first_line(exc)}") from exc
            if applied:
                log.info("usage_log_migrated", migrations=applied)
            self._conn = conn
        return self._conn

    def write(self, rows: list[UsageRow]) -> None:
        """Insert `rows` in one transaction; LogUnavailable when the server is away."""
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(f"COPY usage_incoming ({_COLUMNS}) FROM STDIN") as copy:
                    for row in rows:
                        values: list[Any] = list(row.values())
                        values[_COST] = _money(values[_COST])
                        copy.write_row(values)
                cur.execute(_MOVE)
                for statement in _FOLD:
                    cur.execute(statement)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop()
            raise LogUnavailable(f"postgresql unreachable: {_first_line(exc)}") from exc

    def _drop(self) -> None:
        if self._conn is not None:
            # A broken connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._drop()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
