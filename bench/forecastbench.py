"""Backtest the month-end forecast on a real public usage series, or on a generated log.

`--series CSV` (default: tests/fixtures/bike_sharing_daily.csv, Capital Bikeshare's daily
rentals 2011-2012, a real series the model did not make) replays every month that has
eight weeks of history before it. Without it, the log `bench.loggen` writes (60 days, 60%
growth, a weekly pattern, daily noise: the very shape the model assumes) ends on
2026-04-01 and March is replayed. Each month's forecast is made from every day (the 7th
on), seeing only the days before, and compared with what the month cost; two naive
forecasts are scored the same way for scale.

    python -m bench.forecastbench [--series CSV | --generated [--rows N] [--db PATH]]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from bench.loggen import generate
from proxy import forecast, query
from proxy.storage.readers import open_reader

ROOT = Path(__file__).resolve().parent.parent
SERIES = ROOT / "tests" / "fixtures" / "bike_sharing_daily.csv"
DEFAULT_DB = Path(tempfile.gettempdir()) / "meterproxy-backtest.db"
MONTH = date(2026, 3, 1)
END = datetime(2026, 4, 1, tzinfo=UTC)


def read_series(path: Path) -> dict[date, float]:
    """A `date,value` CSV (header first) as daily amounts."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {date.fromisoformat(day): float(value) for day, value in rows}


def months_with_history(daily: dict[date, float], history_days: int = 56) -> list[date]:
    """Every complete month of the series with `history_days` of data before it."""
    first, last = min(daily), max(daily)
    month = (first + timedelta(days=history_days + 31)).replace(day=1)
    found = []
    while (end := (month + timedelta(days=32)).replace(day=1)) <= last + timedelta(days=1):
        if (month - first).days >= history_days:
            found.append(month)
        month = end
    return found


def naive(daily: dict[date, float], month: date, cut: int,
          days_in_month: int) -> dict[str, float]:
    """Month-to-date pace, and the last seven days' average, stretched to the month."""
    seen = [daily.get(month + timedelta(days=i), 0.0) for i in range(cut)]
    last7 = seen[-7:]
    return {"month-to-date pace": sum(seen) / cut * days_in_month,
            "trailing 7-day average": sum(seen) + statistics.mean(last7)
            * (days_in_month - cut)}


def score(daily: dict[date, float], months: list[date]) -> tuple[dict[str, list], list]:
    """Absolute relative errors per forecast, keyed by (cut-off day, error); band hits."""
    scores: dict[str, list[tuple[int, float]]] = {"meterproxy": []}
    inside = []
    for month in months:
        days_in_month = ((month + timedelta(days=32)).replace(day=1) - month).days
        cutoffs = range(7, days_in_month)
        result = forecast.backtest(daily, month, cutoffs)
        actual = result[0]["actual_usd"]
        scores["meterproxy"] += [(r["cutoff_day"], abs(r["error"])) for r in result]
        inside += [r["in_band"] for r in result]
        for cut in cutoffs:
            for name, value in naive(daily, month, cut, days_in_month).items():
                scores.setdefault(name, []).append((cut, abs(value - actual) / actual))
    return scores, inside


def generated_daily(rows: int, db: Path, seed: int) -> dict[date, float]:
    if not db.exists():
        print(f"generating {rows:,} rows into {db} ...", file=sys.stderr)
        generate(db, rows, seed, END)
    with open_reader(f"sqlite:///{db}") as log:
        rows_ = log.usage(query.UsageQuery(group_by=["day"], spend_only=True))
    return {date.fromisoformat(r["day"]): float(r["cost_usd"]) for r in rows_}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forecastbench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=Path, default=SERIES)
    parser.add_argument("--generated", action="store_true",
                        help="backtest on a generated log instead of the series")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=DEFAULT_DB)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.generated:
        daily, months = generated_daily(args.rows, args.db, args.seed), [MONTH]
        print(f"{args.db}: March 2026, forecast from each cut-off day")
    else:
        daily = read_series(args.series)
        months = months_with_history(daily)
        print(f"{args.series.name}: {len(months)} months, {months[0]:%Y-%m} to "
              f"{months[-1]:%Y-%m}, forecast from each cut-off day (the 7th on)")
    scores, inside = score(daily, months)
    print("\n| forecast | mean abs error | worst | from day 7-14 | from day 15+ |")
    print("|---|---:|---:|---:|---:|")
    for name, pairs in scores.items():
        errs = [e for _, e in pairs]
        early = [e for c, e in pairs if c < 15]
        late = [e for c, e in pairs if c >= 15]
        print(f"| {name} | {statistics.mean(errs) * 100:.1f}% | {max(errs) * 100:.1f}% | "
              f"{statistics.mean(early) * 100:.1f}% | {statistics.mean(late) * 100:.1f}% |")
    print(f"\nactual inside the 90% band on {sum(inside) / len(inside) * 100:.0f}% of "
          "cut-off days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
