"""The SQLite usage log's migrations, as a `sqlite_utils.Migrations` registry.

Imported only when a migration is pending (or by tests): `proxy.storage.sqlite` checks
`MIGRATION_NAMES` against the `_sqlite_migrations` table with plain sqlite3 first, so a
`serve` on an up-to-date log never loads sqlite_utils (about 13 MB of its resident set).
Append-only: never edit a migration that has shipped, add the next here AND its name to
`proxy.storage.sqlite.MIGRATION_NAMES` (tests/test_migrations.py checks they agree).
"""

from __future__ import annotations

import sqlite_utils
from sqlite_utils import Migrations

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

migrations = Migrations("meterproxy")


@migrations()
def m001_usage(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE usage (
            id TEXT PRIMARY KEY,
            ts TEXT NOT NULL,
            duration_ms REAL,
            ttfb_ms REAL,
            key_name TEXT,
            provider TEXT,
            endpoint TEXT,
            model TEXT,
            response_model TEXT,
            stream INTEGER NOT NULL DEFAULT 0,
            status INTEGER,
            outcome TEXT NOT NULL,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            cached_input_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            usage_source TEXT,
            cost_usd REAL,
            cost_breakdown TEXT,
            pricing_version TEXT,
            priced INTEGER NOT NULL DEFAULT 1,
            customer TEXT,
            feature TEXT,
            trace_id TEXT,
            tags TEXT,
            upstream_request_id TEXT,
            error TEXT
        )
        """
    )
    for column in ("ts", "key_name", "customer", "feature", "model"):
        db.execute(f"CREATE INDEX idx_usage_{column}_ts ON usage ({column}, ts)")


# Views for Datasette and sqlite-utils users: plain SQL sums (floats), rounded for reading;
# `meterproxy usage` gives the exact ones.
@migrations()
def m002_views(db: sqlite_utils.Database) -> None:
    for statement in M002_VIEWS:
        db.execute(statement)


@migrations()
def m003_query_indexes(db: sqlite_utils.Database) -> None:
    # Spend by customer, feature or model (and by them together, with the provider)
    # reads a covering index in group order: no table reads, no sort. They replace the
    # narrower (customer, ts), (feature, ts) and (model, ts) indexes, which they include.
    for column, key in M003_COVER_KEYS:
        db.execute(f"DROP INDEX idx_usage_{column}_ts")
        db.execute(f"CREATE INDEX idx_usage_{column}_cover ON usage ({key}, {M003_COVERED})")
    # Daily spend (charts, forecasts, budgets) reads this small index in day order: no
    # sort, no table.
    db.execute("CREATE INDEX idx_usage_day ON usage (substr(ts, 1, 10), ts, cost_usd, priced)")
    # What the report looks up: refusals and errors, unpriced calls, one trace's calls.
    for statement in M003_COMMON:
        db.execute(statement)
    if db.execute("SELECT 1 FROM usage LIMIT 1").fetchone():
        db.execute("ANALYZE")  # statistics of an empty table would mislead the planner later


@migrations()
def m004_token_classes(db: sqlite_utils.Database) -> None:
    # New token classes and unit charges; old rows keep their meaning (each new count is
    # a part of an older column, or a charge the old columns never held).
    for column in M004_COLUMNS:
        db.execute(f"ALTER TABLE usage ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    for column, cls, unit in M004_BACKFILL:
        path = f"'$.classes.{cls}.{unit}'"
        db.execute(f"UPDATE usage SET {column} = json_extract(cost_breakdown, {path}) "
                   f"WHERE json_valid(cost_breakdown) "
                   f"AND json_extract(cost_breakdown, {path}) IS NOT NULL")
    for column, key in M003_COVER_KEYS:
        db.execute(f"DROP INDEX idx_usage_{column}_cover")
        db.execute(f"CREATE INDEX idx_usage_{column}_cover ON usage ({key}, {M004_COVERED})")



@migrations()
def m005_call_shape(db: sqlite_utils.Database) -> None:
    # Folded refusals and the stable-prefix fingerprint; old rows each stand for one call
    # and have no fingerprint.
    for column, kind in M005_COLUMNS:
        db.execute(f"ALTER TABLE usage ADD COLUMN {column} {kind}")


@migrations()
def m006_rollups(db: sqlite_utils.Database) -> None:
    # Hourly rollups (see proxy.storage.rollups), backfilled from the rows already logged;
    # the covering indexes they replace are dropped, so an insert maintains four small
    # indexes and a few rollup rows instead of five wide indexes.
    for table, dims in M006_ROLLUPS:
        db.execute(m006_create(table, dims, "INTEGER") + " WITHOUT ROWID")
        db.execute(m006_fold(table, dims, M006_COST_UNITS["sqlite"], "usage", "true"))
    hourly_dims = dict(M006_ROLLUPS)
    for table, hourly in M006_DAILY:  # daily twins, summed from the hourly rollups
        db.execute(m006_create_daily(table, hourly_dims[hourly], "INTEGER") + " WITHOUT ROWID")
        db.execute(m006_backfill_daily(table, hourly, hourly_dims[hourly]))
    for name in M006_DROP_INDEXES:
        db.execute(f"DROP INDEX {name}")


@migrations()
def m007_anomalies(db: sqlite_utils.Database) -> None:
    # Amounts as TEXT: SQLite's REAL would round the Decimal an operator reads back.
    db.execute(M007_ANOMALIES.format(money="TEXT"))
    for statement in M007_INDEXES:
        db.execute(statement)


@migrations()
def m008_views_count_calls(db: sqlite_utils.Database) -> None:
    # The Datasette/BI views count a folded refusal row as the calls it stands for.
    for statement in (*M008_DROP, *M008_VIEWS):
        db.execute(statement)
