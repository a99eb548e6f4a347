"""Usage-log migrations: frozen once shipped, and every older schema upgrades to today's.

The schema after m003 is checked against `fixtures/schema/sqlite_m003.json`, dumped from
the code that shipped m001-m003 (commit 8eb1e6a), so an edit to a shipped migration fails
here. Each older schema, with rows the old proxy wrote, upgrades to exactly the schema a
blank database gets, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import sqlite_utils

from proxy.storage import postgres as pg_log
from proxy.storage import rollups
from proxy.storage import sqlite as sqlite_log
from proxy.storage.row import COLUMNS, UsageRow
from proxy.token_classes import CLASSES
from tests.scale import pg_database

FIXTURES = Path(__file__).parent / "fixtures" / "schema"
NAMES = [name for name, _ in pg_log.migrations]
# A row the pre-m004 proxy wrote: 1,200 input tokens of which 200 audio, one web search
# (the old schema kept both only in the cost breakdown).
OLD_BREAKDOWN = {"model": "gpt-4o-audio-preview", "period": "2024-10-01", "classes": {
    "input": {"tokens": 1000, "usd_per_mtok": "2.5", "usd": "0.0025"},
    "audio_input": {"tokens": 200, "usd_per_mtok": "40", "usd": "0.008"},
    "output": {"tokens": 10, "usd_per_mtok": "10", "usd": "0.0001"},
    "web_search": {"requests": 1, "usd_per_1000": "25", "usd": "0.025"}}}


def _old_row(i: int, stop_before: str) -> dict[str, Any]:
    """A row as the proxy that stopped before `stop_before` wrote it: before m004 the audio
    and search counts lived only in the breakdown, from m004 on in their columns too."""
    row = {"id": f"old{i:03d}", "ts": f"2026-11-0{1 + i % 9}T00:00:00.000000Z",
            "outcome": "ok", "provider": "openai", "model": "gpt-4o-audio-preview",
            "customer": "acme", "input_tokens": 1200, "output_tokens": 10,
            "cost_usd": 0.0356, "cost_breakdown": orjson.dumps(OLD_BREAKDOWN).decode()}
    if NAMES.index(stop_before) > NAMES.index("m004_token_classes"):
        row |= {"audio_input_tokens": 200, "web_search_requests": 1}
    return row


# The old rows' hourly rollups, by hand: rows i = 0..19 fall on day 1 + i % 9 at 00h, so
# days 1 and 2 hold three rows and days 3-9 two; each is one call of 1,200 input tokens
# and $0.0356 (356,000,000 units of 1e-10 USD), customer acme, no key or feature.
OLD_ROLLUPS = {
    table: sorted((f"2026-11-0{day}T00", *dims, n, 1200 * n, 356_000_000 * n)
                  for day, n in ((1, 3), (2, 3), *((d, 2) for d in range(3, 10))))
    for table, dims in (
        # key_name, provider, model, feature (NULLs as '' and bits 1 + 8), outcome, priced
        ("usage_hourly", ("", "openai", "gpt-4o-audio-preview", "", "ok", 1, 1 + 8)),
        # customer, outcome, priced, nulls
        ("usage_hourly_customer", ("acme", "ok", 1, 0)))}
# m006 (daily twins): the same sums by day.
OLD_ROLLUPS |= {table.replace("hourly", "daily"): [(row[0][:10], *row[1:]) for row in rows]
                for table, rows in list(OLD_ROLLUPS.items())}


def _old_writer_folds(stop_before: str, flavor: str) -> list[str]:
    """What a proxy with m006 did besides inserting the rows: fold them into the
    rollups."""
    if NAMES.index(stop_before) <= NAMES.index("m006_rollups"):
        return []
    return rollups.fold_sql(flavor, "usage")


def _rollups(conn: Any) -> dict[str, list[tuple]]:
    out = {}
    for table, key in (("usage_hourly", "key_name, provider, model, feature"),
                       ("usage_hourly_customer", "customer"),
                       ("usage_daily", "key_name, provider, model, feature"),
                       ("usage_daily_customer", "customer")):
        cur = conn.cursor()
        period = "hour" if "hourly" in table else "day"
        cur.execute(f"SELECT {period}, {key}, outcome, priced, nulls, calls, input_tokens, "
                    f"cost_units FROM {table}")
        out[table] = sorted(tuple(int(v) if not isinstance(v, str) else v for v in row)
                            for row in cur.fetchall())
        cur.close()
    return out


def _sqlite_schema(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                            "AND name NOT LIKE '_sqlite%' AND name NOT LIKE 'sqlite_%' "
                            "ORDER BY type, name").fetchall()
    conn.close()
    return rows


def test_shipped_migrations_are_unchanged(tmp_path: Path) -> None:
    """m001-m003 create byte for byte the schema they created when they shipped."""
    db = sqlite_utils.Database(tmp_path / "log.db")
    sqlite_log.migrations.apply(db, stop_before="m004_token_classes")
    db.close()
    shipped = [tuple(r) for r in json.loads((FIXTURES / "sqlite_m003.json").read_text())]
    assert _sqlite_schema(tmp_path / "log.db") == shipped


def test_schema_columns_are_the_token_classes(tmp_path: Path) -> None:
    """A blank log gets a column for every token class, and the row writes every column."""
    sqlite_log.migrate(tmp_path / "log.db")
    columns = tuple(sqlite_utils.Database(tmp_path / "log.db")["usage"].columns_dict)
    assert columns == COLUMNS
    assert {c.column for c in CLASSES} <= set(columns)


@pytest.mark.parametrize("stop_before", NAMES[1:])
def test_sqlite_upgrades_from_each_older_schema(tmp_path: Path, stop_before: str) -> None:
    """An older log with rows upgrades to the blank schema; rows keep their meaning and
    the counts older breakdowns recorded move into the new columns."""
    blank, old = tmp_path / "blank.db", tmp_path / "old.db"
    sqlite_log.migrate(blank)
    db = sqlite_utils.Database(old)
    sqlite_log.migrations.apply(db, stop_before=stop_before)
    db["usage"].insert_all([_old_row(i, stop_before) for i in range(20)])
    for statement in _old_writer_folds(stop_before, "sqlite"):
        db.execute(statement)
    db.close()
    applied = sqlite_log.migrate(old)
    assert applied == NAMES[NAMES.index(stop_before):]
    assert _sqlite_schema(old) == _sqlite_schema(blank)
    with sqlite3.connect(old) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM usage")]
    conn.close()
    assert len(rows) == 20
    for row in rows:
        assert (row["input_tokens"], row["output_tokens"]) == (1200, 10)
        assert (row["audio_input_tokens"], row["web_search_requests"]) == (200, 1)
        assert row["image_input_tokens"] == row["cache_write_12h_tokens"] == 0
        # m005: each old row stands for one call and has no prefix fingerprint.
        assert (row["repeat_count"], row["prefix_hash"], row["prefix_tokens"]) == (1, None, None)
    # m006: the rollups hold the old rows, summed exactly.
    with sqlite3.connect(old) as conn:
        assert _rollups(conn) == OLD_ROLLUPS
    conn.close()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


def _pg_schema(conn: psycopg.Connection) -> tuple[list, list, list]:
    columns = conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM "
        "information_schema.columns WHERE table_schema = current_schema() "
        "ORDER BY table_name, ordinal_position").fetchall()
    indexes = conn.execute("SELECT tablename, indexname, indexdef FROM pg_indexes "
                           "WHERE schemaname = current_schema() ORDER BY 1, 2").fetchall()
    views = conn.execute("SELECT viewname, definition FROM pg_views "
                         "WHERE schemaname = current_schema() ORDER BY 1").fetchall()
    return columns, indexes, views


def _fresh_schema(conn: psycopg.Connection) -> None:
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")


@pytest.mark.parametrize("stop_before", NAMES[1:])
def test_postgres_upgrades_from_each_older_schema(pg_url: str, stop_before: str) -> None:
    """The same on PostgreSQL: an older schema with rows upgrades to the blank one."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _fresh_schema(conn)
        pg_log.migrate(conn)
        blank = _pg_schema(conn)
        _fresh_schema(conn)
        older = pg_log.migrations[:NAMES.index(stop_before)]
        saved = list(pg_log.migrations)  # migrate() has no stop_before: apply a prefix
        try:
            pg_log.migrations[:] = older
            pg_log.migrate(conn)
        finally:
            pg_log.migrations[:] = saved
        for i in range(20):
            row = _old_row(i, stop_before)
            conn.execute(f"INSERT INTO usage ({', '.join(row)}) "
                         f"VALUES ({', '.join('%s' for _ in row)})", list(row.values()))
        for statement in _old_writer_folds(stop_before, "postgresql"):
            conn.execute(statement)
        assert pg_log.migrate(conn) == NAMES[NAMES.index(stop_before):]
        assert _pg_schema(conn) == blank
        rows = conn.execute("SELECT input_tokens, audio_input_tokens, web_search_requests, "
                            "image_input_tokens, repeat_count, prefix_hash FROM usage").fetchall()
    assert rows == [(1200, 200, 1, 0, 1, None)] * 20


def test_rows_round_trip_every_class(tmp_path: Path) -> None:
    """Every class column a row carries is stored and read back as written."""
    log = sqlite_log.SqliteUsageLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.open()
    counts = {c.column: 10 + i for i, c in enumerate(CLASSES)}
    log.write([UsageRow(id="r1", ts="2026-12-01T00:00:00.000000Z", **counts)])
    log.close()
    with sqlite3.connect(tmp_path / "log.db") as conn:
        stored = conn.execute(f"SELECT {', '.join(counts)} FROM usage").fetchone()
    conn.close()
    assert stored == tuple(counts.values())


def test_cheap_names_are_the_registry(tmp_path: Path) -> None:
    """`MIGRATION_NAMES` (read without sqlite_utils) lists the registry's migrations in
    order, and the plain-sqlite3 check sees exactly what sqlite_utils sees as pending."""
    registry = [m.name for m in sqlite_log.migrations.pending(sqlite_utils.Database(memory=True))]
    assert list(sqlite_log.MIGRATION_NAMES) == registry == NAMES
    db = sqlite_utils.Database(tmp_path / "log.db")
    sqlite_log.migrations.apply(db, stop_before="m005_call_shape")
    expected = [m.name for m in sqlite_log.migrations.pending(db)]
    db.close()
    conn = sqlite_log.connect(tmp_path / "log.db")
    assert sqlite_log.pending_migrations(conn) == expected == NAMES[4:]
    conn.close()
    assert sqlite_log.migrate(tmp_path / "log.db") == NAMES[4:]
    assert sqlite_log.migrate(tmp_path / "log.db") == []
