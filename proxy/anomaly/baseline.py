"""What an hour of a scope's spend usually costs, and how much more is an anomaly.

Pure functions over hourly spend (no I/O), shared by the running check, the CLI and the
backtest (bench/anomalybench.py).

The baseline of an hour is the median spend of the same hour of the week over the past
weeks (spend has a daily and a weekly rhythm: 3 am on a Sunday is not 11 am on a
Tuesday); with fewer than 3 such hours it falls back to the same hour of the day over the
past 7 days, then to the median of the last 24 hours. Medians ignore the odd past spike,
so one runaway night does not teach the baseline that runaway nights are normal.

How far above the baseline an hour may go comes from the scope's own hour-to-hour
variation, measured as ratios (log(spend + c) - log(baseline + c), c = min_usd) because
spend varies in proportion to its level: a quiet night hour moves by cents, a busy day
hour by dollars. The spread is the median absolute deviation of those ratios over all
past hours (scaled by 1.4826 to a standard deviation), floored at 0.1, or the same
measure over that hour of the week's own samples where it is wider. An hour is an
anomaly when it costs more than (baseline + c) * exp(k * spread) - c, and at least
min_usd more than the baseline, k being the configured sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from statistics import median

HOUR = timedelta(hours=1)
WEEK_HOURS = 24 * 7
MIN_SAMPLES = 3
MAD_TO_SD = 1.4826
SPREAD_FLOOR = 0.1
CENT = Decimal("0.000001")


def slot(hour: datetime) -> int:
    """The hour of the week (UTC), 0 = Monday 00:00."""
    return hour.weekday() * 24 + hour.hour


def hour_start(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Baseline:
    """One scope's baseline for each hour of the week, and its spread."""

    levels: tuple[Decimal, ...]  # 168 usual hourly spends, by slot()
    methods: tuple[str, ...]  # weekly | daily | recent, by slot()
    spreads: tuple[float, ...]  # robust standard deviation of log ratios, by slot()
    offset: Decimal  # c: spends well below it count as "about nothing"

    def limit(self, hour: datetime, k: float, min_usd: Decimal) -> Decimal:
        """The most an hour starting at `hour` may cost before it is an anomaly."""
        level = self.levels[slot(hour)]
        ratio = Decimal(repr(math.exp(k * self.spreads[slot(hour)])))
        return max((level + self.offset) * ratio - self.offset,
                   level + min_usd).quantize(CENT)

    def window(self, now: datetime, k: float, min_usd: Decimal
               ) -> tuple[Decimal, Decimal, str]:
        """The usual spend, the limit and the method for the hour ending at `now`: it
        covers the end of the previous clock hour and the start of this one, weighted by
        how much of each it spans."""
        this = hour_start(now)
        f = Decimal(repr((now - this) / HOUR))
        prev = this - HOUR
        usual = (1 - f) * self.levels[slot(prev)] + f * self.levels[slot(this)]
        limit = (1 - f) * self.limit(prev, k, min_usd) + f * self.limit(this, k, min_usd)
        return usual.quantize(CENT), limit.quantize(CENT), self.methods[slot(this)]


def baseline(hourly: Mapping[datetime, Decimal], now: datetime, weeks: int,
             min_history_hours: int, min_usd: Decimal) -> Baseline | None:
    """A scope's baseline from its spend per hour (hour starts, UTC; missing hours spent
    nothing) over the `weeks` before the hour containing `now`; None while the scope is
    younger than `min_history_hours` (a new scope has no usual to depart from)."""
    end = hour_start(now)
    start = end - timedelta(weeks=weeks)
    spent = [h for h, usd in hourly.items() if start <= h < end and usd > 0]
    if not spent:
        return None
    first = min(spent)
    if (end - first) / HOUR < min_history_hours:
        return None
    hours = [first + i * HOUR for i in range(int((end - first) / HOUR))]
    series = [hourly.get(h, Decimal(0)) for h in hours]
    by_slot: dict[int, list[Decimal]] = {}
    for h, usd in zip(hours, series, strict=True):
        by_slot.setdefault(slot(h), []).append(usd)
    day_ago = len(series) - 24
    week_ago = max(0, len(series) - WEEK_HOURS)
    by_hour: dict[int, list[Decimal]] = {}
    for h, usd in zip(hours[week_ago:], series[week_ago:], strict=True):
        by_hour.setdefault(h.hour, []).append(usd)
    recent = median(series[max(0, day_ago):])
    levels, methods = [], []
    for s in range(WEEK_HOURS):
        weekly = by_slot.get(s, [])
        daily = by_hour.get(s % 24, [])
        if len(weekly) >= MIN_SAMPLES:
            levels.append(median(weekly))
            methods.append("weekly")
        elif len(daily) >= MIN_SAMPLES:
            levels.append(median(daily))
            methods.append("daily")
        else:
            levels.append(recent)
            methods.append("recent")
    c = float(min_usd) or 0.01
    ratios = [math.log((float(usd) + c) / (float(levels[slot(h)]) + c))
              for h, usd in zip(hours, series, strict=True)]
    pooled = max(_robust_sd(ratios), SPREAD_FLOOR)
    # An hour of the week that varies more from week to week than the scope does overall
    # gets its own, wider band.
    by_slot_ratios: dict[int, list[float]] = {}
    for h, r in zip(hours, ratios, strict=True):
        by_slot_ratios.setdefault(slot(h), []).append(r)
    spreads = tuple(max(pooled, _robust_sd(by_slot_ratios[s]))
                    if methods[s] == "weekly" else pooled for s in range(WEEK_HOURS))
    return Baseline(levels=tuple(levels), methods=tuple(methods), spreads=spreads,
                    offset=Decimal(repr(c)))


def _robust_sd(values: list[float]) -> float:
    """1.4826 times the median absolute deviation: a standard deviation that a few
    outliers do not move."""
    mid = median(values)
    return MAD_TO_SD * median(abs(v - mid) for v in values)


def baselines(hourly: Mapping[str, Mapping[datetime, Decimal]], now: datetime, weeks: int,
              min_history_hours: int, min_usd: Decimal) -> dict[str, Baseline]:
    """A baseline for every scope value old enough to have one."""
    found = {}
    for value, series in hourly.items():
        b = baseline(series, now, weeks, min_history_hours, min_usd)
        if b is not None:
            found[value] = b
    return found


@dataclass(frozen=True, slots=True)
class Finding:
    """A scope whose trailing hour went over its limit."""

    kind: str
    value: str
    observed: Decimal
    usual: Decimal
    limit: Decimal
    method: str


def judge(kind: str, models: Mapping[str, Baseline], observed: Mapping[str, Decimal],
          now: datetime, k: float, min_usd: Decimal) -> Iterable[Finding]:
    """Every scope value of `kind` whose trailing-hour spend is over its limit."""
    for value, spent in observed.items():
        model = models.get(value)
        if model is None:
            continue
        usual, limit, method = model.window(now, k, min_usd)
        if spent > limit:
            yield Finding(kind, value, spent, usual, limit, method)
