"""Backtest the month-end forecast on a generated log with a weekly shape and a trend.

The log (`bench.loggen`: 60 days, 60% growth, a weekly pattern, daily noise) ends on
2026-04-01, so March is a finished month with February as history. The forecast is
replayed from every day of March, seeing only the days before, and compared with what
March cost; two naive forecasts are scored the same way for scale.

    python -m bench.forecastbench [--rows 1000000] [--db /tmp/meterproxy-backtest.db]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from bench.loggen import generate
from proxy import forecast, query
from proxy.storage.readers import open_reader

DEFAULT_DB = Path(tempfile.gettempdir()) / "meterproxy-backtest.db"
MONTH = date(2026, 3, 1)
END = datetime(2026, 4, 1, tzinfo=UTC)


def naive(daily: dict[date, float], cut: int, days_in_month: int) -> dict[str, float]:
    """Month-to-date pace, and the last seven days' average, stretched to the month."""
    seen = [daily.get(MONTH + timedelta(days=i), 0.0) for i in range(cut)]
    last7 = [daily.get(MONTH + timedelta(days=i), 0.0) for i in range(cut - 7, cut)]
    return {"month-to-date pace": sum(seen) / cut * days_in_month,
            "trailing 7-day average": sum(seen) + statistics.mean(last7)
            * (days_in_month - cut)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forecastbench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=DEFAULT_DB)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if not args.db.exists():
        print(f"generating {args.rows:,} rows into {args.db} ...", file=sys.stderr)
        generate(args.db, args.rows, args.seed, END)
    conn, flavor = open_reader(f"sqlite:///{args.db}")
    try:
        rows = query.usage(conn, query.UsageQuery(group_by=["day"], spend_only=True), flavor)
    finally:
        conn.close()
    daily = {date.fromisoformat(r["day"]): float(r["cost_usd"]) for r in rows}
    days_in_month = 31
    cutoffs = range(7, days_in_month)
    result = forecast.backtest(daily, MONTH, cutoffs)
    actual = result[0]["actual_usd"]
    print(f"{args.db}: March 2026 cost ${actual:,.2f}; forecast from each cut-off day")
    print("\n| from day | forecast | 90% band | error |\n|---:|---:|---:|---:|")
    for r in result:
        print(f"| {r['cutoff_day']} | ${r['forecast_usd']:,.0f} | ${r['low_usd']:,.0f} - "
              f"${r['high_usd']:,.0f} | {r['error'] * 100:+.1f}% |")
    scores = {"meterproxy": [abs(r["error"]) for r in result]}
    for cut in cutoffs:
        for name, value in naive(daily, cut, days_in_month).items():
            scores.setdefault(name, []).append(abs(value - actual) / actual)
    print("\n| forecast | mean abs error | worst | from day 7-14 | from day 15+ |")
    print("|---|---:|---:|---:|---:|")
    for name, errs in scores.items():
        early = [e for c, e in zip(cutoffs, errs, strict=True) if c < 15]
        late = [e for c, e in zip(cutoffs, errs, strict=True) if c >= 15]
        print(f"| {name} | {statistics.mean(errs) * 100:.1f}% | {max(errs) * 100:.1f}% | "
              f"{statistics.mean(early) * 100:.1f}% | {statistics.mean(late) * 100:.1f}% |")
    inside = sum(r["in_band"] for r in result) / len(result)
    print(f"\nactual inside the 90% band from {inside * 100:.0f}% of cut-off days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
