"""Time what a FinOps user opens on a large log: the report, the forecast, the dashboard
page, and the CSV export (its rate, and that its memory stays flat).

Made for the log `bench.loggen` writes; "now" is the newest row, so an old file gives
the same shape.

    python -m bench.visibilitybench [--db /tmp/meterproxy-synthetic-usage.db] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.loggen import DEFAULT_OUT
from proxy import dashboard, forecast, query
from proxy.budgets import budgets_from
from proxy.config import parse_settings
from proxy.report import build_report
from proxy.storage.readers import open_reader
from proxy.storage.sql import batches
from proxy.timeparse import parse_time

# Budgets and plans shaped like the generated log's customers, keys and features.
CONFIG = {
    "budgets": [{"scope": {"customer": "customer-0001"}, "period": "month", "limit_usd": 250},
                {"scope": {"feature": "*"}, "period": "month", "limit_usd": 800},
                {"scope": {"customer": "*"}, "period": "day", "limit_usd": 10}],
    "customers": {"customer-0000": {"plan_usd": 5000}, "customer-0003": {"plan_usd": 200}},
}


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(max(repeat, 1)):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return times, result


def export(url: str, since: Any, trace: bool = False) -> tuple[int, int]:
    """Write the CSV export of everything since `since` to nowhere, a batch at a time as
    GET /_meter/export.csv does; the rows, and with `trace` the peak Python memory."""
    log = open_reader(url)
    if trace:
        tracemalloc.start()
    rows, peak = 0, 0
    try:
        for batch in batches(log.export(query.UsageQuery(since=since))):
            buf = io.StringIO()
            csv.writer(buf).writerows(batch)
            rows += len(batch)
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        if trace:
            tracemalloc.stop()
        log.close()
    return rows, peak


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.visibilitybench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=DEFAULT_OUT, help=f"({DEFAULT_OUT})")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.db.exists():
        parser.error(f"no usage log at {args.db}: run python -m bench.loggen first")
    url = f"sqlite:///{args.db}"
    settings = parse_settings({**CONFIG, "storage": {"usage_log": url}}, "bench")
    log = open_reader(url)
    count, newest = log.conn.execute("SELECT count(*), max(ts) FROM usage").fetchone()
    now = parse_time(newest)
    print(f"{args.db}: {count:,} rows, newest {newest}")
    print("\n| what | first s | median s | best s |\n|---|---:|---:|---:|")
    report_times: dict[str, list[float]] = {}
    for days in (7, 30):
        times, data = timed(lambda d=days: build_report(
            lambda: open_reader(url), settings, now - timedelta(days=d), None, now), args.repeat)
        report_times[f"report, last {days} days (12 sections, 3 threads)"] = times
    report_times["forecast: month, top 10 customers, 3 budgets (~530 scopes)"] = timed(
        lambda: forecast.forecast_month(log, now, budgets_from(settings), 10),
        args.repeat)[0]
    report_times["dashboard HTML from a 30-day report"] = timed(
        lambda: dashboard.render_page(data, [], "30d"), args.repeat)[0]
    for name, times in report_times.items():
        print(f"| {name} | {times[0]:.3f} | {statistics.median(times):.3f} | "
              f"{min(times):.3f} |")
    log.close()
    for days in (1, 7, 30):
        began = time.perf_counter()
        rows, _ = export(url, now - timedelta(days=days))
        seconds = time.perf_counter() - began
        _, peak = export(url, now - timedelta(days=days), trace=True)
        print(f"\nCSV export, last {days} days: {rows:,} rows in {seconds:.2f} s "
              f"({rows / seconds:,.0f} rows/s); peak Python memory {peak / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
