"""Time `LogReader.usage` over a usage log, for the queries people actually run.

Made for the log `bench.loggen` writes; any meterproxy usage log works. Relative
windows ("the last 7 days") end at the newest row, so an old file gives the same shape.
Besides wall time it prints the process's CPU time per query (median): on a shared box
the wall time includes waiting for a core, the CPU time does not.

    python -m bench.querybench [--db /tmp/meterproxy-synthetic-usage.db] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from bench.loggen import DEFAULT_OUT
from proxy.query import UsageQuery
from proxy.storage.readers import open_reader
from proxy.timeparse import parse_time


def queries(newest: datetime) -> dict[str, UsageQuery]:
    """The typical queries, named as a user would ask them."""
    week, month, day = (newest - timedelta(days=n) for n in (7, 30, 1))
    return {
        "total": UsageQuery(),
        "by customer (top 20)": UsageQuery(group_by=["customer"], limit=20),
        "by day": UsageQuery(group_by=["day"], order_by="day"),
        "by tag:team": UsageQuery(group_by=["tag:team"]),
        "by model, feature=chat, last 7 days": UsageQuery(
            group_by=["model"], where={"feature": "chat"}, since=week),
        "by day, one customer, last 30 days": UsageQuery(
            group_by=["day"], where={"customer": "customer-0001"}, since=month, order_by="day"),
        "by tag:region, tag:env=prod, last 7 days": UsageQuery(
            group_by=["tag:region"], where={"tag:env": "prod"}, since=week),
        "by feature, last 24 hours": UsageQuery(group_by=["feature"], since=day),
        "by customer and model, key=prod-api, last 30 days": UsageQuery(
            group_by=["customer", "model"], where={"key_name": "prod-api"}, since=month,
            limit=50),
        # The rest of the aggregates and group-bys the query layer offers.
        "total with p50/p95 duration": UsageQuery(durations=True),
        "by feature": UsageQuery(group_by=["feature"]),
        "by model": UsageQuery(group_by=["provider", "model"]),
        "by customer and feature, last 7 days": UsageQuery(
            group_by=["customer", "feature"], since=week, limit=20),
        "by model with p95, last 7 days": UsageQuery(
            group_by=["model"], since=week, durations=True),
        "by week": UsageQuery(group_by=["week"], order_by="week"),
        "by outcome, error rate": UsageQuery(group_by=["outcome"], order_by="calls"),
        "top 10 traces, last 7 days": UsageQuery(
            group_by=["trace_id"], exclude={"trace_id": ""}, since=week, limit=10),
        "by hour, last 24 hours": UsageQuery(group_by=["hour"], since=day, order_by="hour"),
        "spend per day, last 30 days": UsageQuery(
            group_by=["day"], since=month, spend_only=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.querybench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=DEFAULT_OUT, help=f"({DEFAULT_OUT})")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each query (5)")
    args = parser.parse_args()
    if not args.db.exists():
        parser.error(f"no usage log at {args.db}: run python -m bench.loggen first")
    log = open_reader(f"sqlite:///{args.db}")
    try:
        count, newest = log.conn.execute("SELECT count(*), max(ts) FROM usage").fetchone()
        if not count:
            parser.error(f"{args.db} has no rows")
        print(f"{args.db}: {count:,} rows, newest {newest}")
        print("\n| query | groups | first s | median s | best s | median CPU s |\n"
              "|---|---:|---:|---:|---:|---:|")
        for name, q in queries(parse_time(newest)).items():
            times, cpu = [], []
            rows = []
            for _ in range(max(args.repeat, 1)):
                began, began_cpu = time.perf_counter(), time.process_time()
                rows = log.usage(q)
                times.append(time.perf_counter() - began)
                cpu.append(time.process_time() - began_cpu)
            print(f"| {name} | {len(rows)} | {times[0]:.3f} | {statistics.median(times):.3f} "
                  f"| {min(times):.3f} | {statistics.median(cpu):.3f} |", flush=True)
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
