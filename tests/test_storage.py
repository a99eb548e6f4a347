"""The SQLite usage log: migrations, WAL, and the batching writer thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import sqlite_utils

from proxy.storage.row import COLUMNS, UsageRow
from proxy.storage.sqlite import SqliteUsageLog, migrate
from proxy.storage.writer import UsageWriter


def test_migrations_from_blank_and_idempotent(tmp_path: Path) -> None:
    """A blank file gets the contract's columns, the per-call indexes and the hourly
    rollups (which whole-log questions read instead of covering indexes); a second run
    changes nothing."""
    path = tmp_path / "log.db"
    assert migrate(path)[0] == "m001_usage"
    assert migrate(path) == []
    db = sqlite_utils.Database(path)
    assert tuple(db["usage"].columns_dict) == COLUMNS
    indexed = {tuple(i.columns) for i in db["usage"].indexes}
    for column in ("ts", "outcome", "trace_id"):
        assert any(cols[0] == column for cols in indexed), column
    assert {"usage_hourly", "usage_hourly_customer", "usage_daily",
            "usage_daily_customer"} <= set(db.table_names())
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writer_batches_rows_from_many_threads(tmp_path: Path) -> None:
    """Rows submitted from several threads are all written, once each, and flushed on close."""
    log = SqliteUsageLog(f"sqlite:///{tmp_path / 'log.db'}")
    batches: list[int] = []
    write = log.write
    log.write = lambda rows: (batches.append(len(rows)), write(rows))[1]  # type: ignore[method-assign]
    writer = UsageWriter(log, interval_s=0.05, batch_rows=100)
    writer.start()

    def submit(prefix: str) -> None:
        for i in range(250):
            writer.submit(UsageRow(id=f"{prefix}{i:04d}", ts="2026-11-26T00:00:00.000000Z",
                                   provider="openai", cost_usd=0.0000012345))

    threads = [threading.Thread(target=submit, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("SELECT count(*), count(DISTINCT id) FROM usage").fetchone() == (1000,
                                                                                          1000)
    assert max(batches) <= 100 and len(batches) < 1000
    assert conn.execute("SELECT cost_usd FROM usage LIMIT 1").fetchone()[0] == 0.0000012345


def test_flush_waits_for_rows_written(tmp_path: Path) -> None:
    """flush() returns once every row submitted before it is on disk."""
    writer = UsageWriter(SqliteUsageLog(f"sqlite:///{tmp_path / 'log.db'}"), interval_s=0.05)
    writer.start()
    for i in range(10):
        writer.submit(UsageRow(id=f"r{i}", ts="2026-11-26T00:00:00.000000Z"))
    assert writer.flush(10)
    count = sqlite3.connect(tmp_path / "log.db").execute("SELECT count(*) FROM usage")
    assert count.fetchone()[0] == 10
    writer.close()
