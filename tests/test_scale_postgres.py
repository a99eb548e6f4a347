"""The PostgreSQL usage log: SQLite's schema twin, batched idempotent inserts, the spool."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import sqlite_utils

from proxy.storage import LogUnavailable, open_usage_log, rollups
from proxy.storage import sqlite as sqlite_log
from proxy.storage.postgres import PostgresUsageLog, migrate, migrations
from proxy.storage.row import COLUMNS, UsageRow
from proxy.storage.spool import SpooledUsageLog, encode
from tests.scale import TcpForwarder, pg_database, pg_rows, wait_for


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.fixture
def table(pg_url: str) -> str:
    """The module's database with the schema in place and an empty usage table (and
    empty rollups: they sum the table)."""
    log = PostgresUsageLog(pg_url)
    log.open()
    log.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE usage, {', '.join(r.table for r in rollups.ROLLUPS)}")
    return pg_url


@pytest.fixture
def forwarder(pg_url: str) -> Iterator[tuple[TcpForwarder, str]]:
    """A forwarder to the server and the log URL through it."""
    port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    fwd = TcpForwarder(port)
    yield fwd, pg_url.replace(f":{port}/", f":{fwd.port}/")
    fwd.shutdown()


def rows(prefix: str, n: int, start: int = 0) -> list[UsageRow]:
    return [UsageRow(id=f"{prefix}{i:05d}", ts=f"2026-11-01T00:00:{i % 60:02d}.000000Z",
                     outcome="ok", provider="openai", model="gpt-4o-mini", key_name="team-a",
                     customer="acme", input_tokens=10 + i, output_tokens=5,
                     cost_usd=float(Decimal("0.0000012345") * (i + 1)),
                     cost_breakdown='{"input": {"tokens": 10}}',
                     tags='{"team": "search", "env": "prod"}' if i % 2 else None)
            for i in range(start, start + n)]


def test_schema_mirrors_sqlite(pg_url: str, tmp_path: Path) -> None:
    """The same migrations by name, the same columns in the same order, JSONB and indexes."""
    blank = sqlite_utils.Database(memory=True)
    assert [name for name, _ in migrations] == \
        [m.name for m in sqlite_log.migrations.pending(blank)]
    sqlite_log.migrate(tmp_path / "log.db")
    sqlite_columns = [c.name for c in sqlite_utils.Database(tmp_path / "log.db")["usage"].columns]
    log = PostgresUsageLog(pg_url)
    log.open()
    log.close()
    with psycopg.connect(pg_url) as conn:
        columns = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'usage' ORDER BY ordinal_position").fetchall()
        indexes = {name for (name,) in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'usage'")}
        assert migrate(conn) == []  # applied once, never again
        for view in ("daily_spend", "spend_by_customer", "spend_by_feature"):
            conn.execute(f"SELECT * FROM {view}").fetchall()
    assert [c for c, _ in columns] == sqlite_columns == list(COLUMNS)
    types = dict(columns)
    assert types["tags"] == types["cost_breakdown"] == "jsonb"
    assert types["cost_usd"] == "numeric"
    sqlite_indexes = {i.name for i in sqlite_utils.Database(tmp_path / "log.db")["usage"].indexes
                      if not i.name.startswith("sqlite_autoindex")}  # the primary key's
    assert sqlite_indexes <= indexes  # the same names, and a GIN index on tags besides
    assert "idx_usage_tags" in indexes


def test_instances_migrating_at_once() -> None:
    """Several instances starting together on a blank database migrate it once."""
    with pg_database() as url:
        errors: list[BaseException] = []

        def start() -> None:
            try:
                log = PostgresUsageLog(url)
                log.open()
                log.close()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM meterproxy_migrations").fetchone() == \
                (len(migrations),)


def test_batches_are_exact_and_idempotent(table: str) -> None:
    """Money lands as exact NUMERIC, tags as JSONB, and a batch written twice stays one
    row per call."""
    log = PostgresUsageLog(table)
    log.open()
    batch = rows("a", 50)
    log.write(batch)
    log.write(batch[10:30])
    log.close()
    got = pg_rows(table)
    assert [r["id"] for r in got] == [r.id for r in batch]
    assert got[3]["cost_usd"] == Decimal("0.0000049380")
    assert got[1]["tags"] == {"team": "search", "env": "prod"} and got[0]["tags"] is None
    with psycopg.connect(table) as conn:
        assert conn.execute("SELECT count(*) FROM usage WHERE tags @> %s",
                            ('{"team": "search"}',)).fetchone() == (25,)


def test_spool_replays_in_order_with_no_loss_or_duplicate(
        table: str, forwarder: tuple[TcpForwarder, str], tmp_path: Path) -> None:
    """While PostgreSQL is away rows go to the spool file; when it returns they are replayed
    oldest first, and rows written meanwhile queue behind them."""
    fwd, url = forwarder
    log = SpooledUsageLog(PostgresUsageLog(url), tmp_path / "spool", retry_s=0.1)
    log.open()
    log.write(rows("r", 10))
    fwd.close()
    log.write(rows("r", 10, 10))
    log.write(rows("r", 15, 20))
    assert log.spooled == 25
    spooled = list((tmp_path / "spool").glob("spool-*.jsonl"))
    assert len(spooled) == 1 and len(spooled[0].read_bytes().splitlines()) == 25
    fwd.open()
    log.write(rows("r", 5, 35))  # behind the spooled rows, not before them
    wait_for(lambda: log.spooled == 0, 15, "the spool to drain")
    log.close()
    with psycopg.connect(table) as conn:
        in_order = [i for (i,) in conn.execute("SELECT id FROM usage ORDER BY ctid")]
    assert in_order == [f"r{i:05d}" for i in range(40)]
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


def test_spool_outlives_the_process(table: str, forwarder: tuple[TcpForwarder, str],
                                    tmp_path: Path) -> None:
    """Rows spooled by a process that stopped before PostgreSQL returned are replayed by the
    next one to start, and rows already in the database are not written twice."""
    fwd, url = forwarder
    fwd.close()
    first = open_usage_log(url, spool_dir=str(tmp_path))
    first.open()  # starts although the database is away
    first.write(rows("s", 20))
    first.close()
    assert len(list(tmp_path.glob("spool-*.jsonl"))) == 1
    # As if a process died after committing a batch but before emptying its spool.
    direct = PostgresUsageLog(table)
    direct.open()
    direct.write(rows("t", 5))
    direct.close()
    (tmp_path / "spool-1-999999.jsonl").write_bytes(encode(rows("t", 5)) + b'{"id": "torn')
    fwd.open()
    second = open_usage_log(url, spool_dir=str(tmp_path))
    second.open()
    second.close()
    ids = [r["id"] for r in pg_rows(table)]
    assert ids == [f"s{i:05d}" for i in range(20)] + [f"t{i:05d}" for i in range(5)]
    assert list(tmp_path.glob("*.jsonl")) == []


def test_unreachable_is_reported_as_such(tmp_path: Path) -> None:
    """A server that is not there raises LogUnavailable (the spool's cue), promptly."""
    from tests.conftest import free_port

    log = PostgresUsageLog(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    with pytest.raises(LogUnavailable):
        log.open()


def varied_rows(n: int = 240) -> list[UsageRow]:
    """Calls across customers, models, outcomes, tags, hours and weeks."""
    out = []
    for i in range(n):
        day = 1 + i % 20
        out.append(UsageRow(
            id=f"v{i:05d}", ts=f"2026-10-{day:02d}T{i % 24:02d}:{i % 60:02d}:00.000000Z",
            duration_ms=5.0 + (i * 37) % 900, key_name=("team-a", "team-b")[i % 2],
            provider="openai", endpoint="chat.completions",
            model=("gpt-4o-mini", "gpt-4o", "o3")[i % 3], stream=i % 2,
            status=(200, 200, 200, 429, 502)[i % 5],
            outcome=("ok", "ok", "ok", "budget_exceeded", "upstream_error")[i % 5],
            input_tokens=100 + i, cached_input_tokens=(i % 4) * 10, output_tokens=50 + i % 7,
            reasoning_tokens=i % 3, usage_source="provider",
            cost_usd=None if i % 11 == 0 else float(Decimal("0.0000012345") * (i + 1)),
            priced=0 if i % 11 == 0 else 1,
            customer=(None, "acme", "globex", "initech")[i % 4],
            feature=("search", "chat")[i % 2], trace_id=f"t{i // 3}",
            tags=None if i % 5 == 0 else f'{{"team": "{("a", "b", "c")[i % 3]}", "env": "prod"}}'))
    return out


def test_query_layer_gives_the_same_answers_on_both(table: str, tmp_path: Path) -> None:
    """`meterproxy usage`'s query layer answers identically from SQLite and PostgreSQL:
    groups, time buckets, tags, filters, exclusions, exact cost, percentiles, explain,
    and budgets' spend rebuilt from the log."""
    from datetime import UTC, datetime

    from proxy import query
    from proxy.budgets import budgets_from, spend_from_log
    from proxy.config import parse_settings
    from proxy.storage.readers import open_reader

    data = varied_rows()
    sqlite_url = f"sqlite:///{tmp_path / 'log.db'}"
    for url in (sqlite_url, table):
        log = open_usage_log(url, spool_dir=str(tmp_path / "spool"))
        log.open()
        log.write(data)
        log.close()
    lite, pg = open_reader(sqlite_url), open_reader(table)
    assert pg.backend == "postgresql"
    since = datetime(2026, 10, 3, tzinfo=UTC)
    queries = [
        query.UsageQuery(),
        query.UsageQuery(group_by=["customer", "model"]),
        query.UsageQuery(group_by=["day"], since=since, durations=True),
        query.UsageQuery(group_by=["week", "tag:team"]),
        query.UsageQuery(group_by=["hour"], where={"tag:env": "prod"}, limit=5,
                         order_by="calls"),
        query.UsageQuery(group_by=["month", "outcome"], exclude={"customer": ""}),
        query.UsageQuery(group_by=["key_name"], where={"priced": "0"}),
        query.UsageQuery(group_by=["feature"], where={"model": ["o3", "gpt-4o"]},
                         order_by="p95_ms"),
        query.UsageQuery(group_by=["customer"], order_by="error_rate", durations=True),
    ]
    try:
        for q in queries:
            a = lite.usage(q)
            b = pg.usage(q)
            key = lambda r: repr(sorted(r.items(), key=lambda kv: kv[0]))  # noqa: E731
            assert sorted(map(key, a)) == sorted(map(key, b)), q
        total = pg.usage(query.UsageQuery())[0]
        assert total["cost_usd"] == sum(Decimal(repr(r.cost_usd)) for r in data
                                        if r.cost_usd is not None)
        lite_call = query.explain(lite, "v00007")
        pg_call = query.explain(pg, "v00007")
        assert lite_call is not None and pg_call is not None
        assert pg_call["total_usd"] == lite_call["total_usd"] == Decimal("0.0000098760")
        assert pg_call["row"]["tags"] == lite_call["row"]["tags"] == {"team": "b", "env": "prod"}
        settings = parse_settings({"budgets": [
            {"scope": {"customer": "*"}, "period": "month", "limit_usd": 1},
            {"scope": {"tag:team": "a"}, "period": "week", "limit_usd": 1}]}, "<test>")
        now = datetime(2026, 10, 14, 12, tzinfo=UTC)
        budgets = budgets_from(settings)
        assert spend_from_log(pg, budgets, now) == spend_from_log(lite, budgets, now) != {}
    finally:
        lite.close()
        pg.close()
