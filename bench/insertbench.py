"""Insert throughput of the SQLite usage log, empty and at scale.

    python -m bench.insertbench --db /tmp/meterproxy-synthetic-usage.db [--rows 50000]

Writes `--rows` rows in the writer's batches (500) through `SqliteUsageLog.write` into a
fresh log and into a copy-free existing one (the rows are appended, then deleted again,
with their hours of the rollups), and prints rows per second for both: whether a large
log slows the writer down. The rows spread over 24 hours, 500 customers, 11 features
and 3 models, so each batch touches as many rollup rows as real traffic does.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from proxy.storage.rollups import ROLLUPS
from proxy.storage.row import UsageRow
from proxy.storage.sqlite import SqliteUsageLog

BATCH = 500
MODELS = ("gpt-4o-mini", "gpt-4.1-nano", "claude-sonnet-4")


def rows(n: int, prefix: str) -> list[UsageRow]:
    return [UsageRow(id=f"{prefix}{i:09d}",
                     ts=f"2031-01-01T{i * 24 // n:02d}:{i % 60:02d}:{i % 59:02d}.000000Z",
                     key_name="bench", provider="openai", endpoint="chat.completions",
                     model=MODELS[i % 3], status=200, outcome="ok", input_tokens=120,
                     output_tokens=40, usage_source="provider", cost_usd=0.000042,
                     customer=f"c{i % 500}", feature=f"f{i % 11}", tags='{"env": "prod"}')
            for i in range(n)]


def rate(path: Path, n: int) -> tuple[float, float]:
    """Rows per second of wall time, and per second of this process's CPU time (on a
    shared box the first includes waiting for a core and the disk)."""
    log = SqliteUsageLog(f"sqlite:///{path}")
    log.open()
    batch_rows = rows(n, "zzbench")
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, BATCH):
        log.write(batch_rows[i:i + BATCH])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    log.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM usage WHERE id LIKE 'zzbench%'")
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        for rollup in ROLLUPS:  # the bench's rows are the only ones in 2031
            if rollup.table in tables:
                conn.execute(f"DELETE FROM {rollup.table} WHERE {rollup.period} >= '2031'")
    conn.close()
    return n / elapsed, n / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="/tmp/meterproxy-synthetic-usage.db")
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty = rate(Path(tmp) / "empty.db", args.rows)
    size = sqlite3.connect(args.db).execute("SELECT count(*) FROM usage").fetchone()[0]
    full = rate(Path(args.db), args.rows)
    print(f"empty log: {empty[0]:,.0f} rows/s ({empty[1]:,.0f} per CPU s); log of {size:,} "
          f"rows: {full[0]:,.0f} rows/s ({full[1]:,.0f} per CPU s)")


if __name__ == "__main__":
    main()
