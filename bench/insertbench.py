"""Insert throughput of the SQLite usage log, empty and at scale.

    python -m bench.insertbench --db /tmp/meterproxy-synthetic-usage.db [--rows 50000]

Writes `--rows` rows in the writer's batches (500) through `SqliteUsageLog.write` into a
fresh log and into a copy-free existing one (the rows are appended, then deleted again),
and prints rows per second for both: whether a large log slows the writer down.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from proxy.storage.row import UsageRow
from proxy.storage.sqlite import SqliteUsageLog

BATCH = 500


def rows(n: int, prefix: str) -> list[UsageRow]:
    return [UsageRow(id=f"{prefix}{i:09d}", ts=f"2031-01-01T00:00:{i % 60:02d}.000000Z",
                     key_name="bench", provider="openai", endpoint="chat.completions",
                     model="gpt-4o-mini", status=200, outcome="ok", input_tokens=120,
                     output_tokens=40, usage_source="provider", cost_usd=0.000042,
                     customer=f"c{i % 50}", feature=f"f{i % 7}", tags='{"env": "prod"}')
            for i in range(n)]


def rate(path: Path, n: int) -> float:
    log = SqliteUsageLog(f"sqlite:///{path}")
    log.open()
    batch_rows = rows(n, "zzbench")
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        log.write(batch_rows[i:i + BATCH])
    elapsed = time.perf_counter() - start
    log.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM usage WHERE id LIKE 'zzbench%'")
    conn.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="/tmp/meterproxy-synthetic-usage.db")
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty = rate(Path(tmp) / "empty.db", args.rows)
    size = sqlite3.connect(args.db).execute("SELECT count(*) FROM usage").fetchone()[0]
    full = rate(Path(args.db), args.rows)
    print(f"empty log: {empty:,.0f} rows/s; log of {size:,} rows: {full:,.0f} rows/s "
          f"({full / empty:.2f}x)")


if __name__ == "__main__":
    main()
