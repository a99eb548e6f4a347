"""Month-end spend forecasts: the daily run rate, a day-of-week pattern and a trend.

A daily spend series is split into a weekday pattern (each weekday's average ratio to a
centred 7-day moving average) and a deseasonalised level; a straight line is fitted to
the last four weeks of the level. The rest of the period is that line times each day's
weekday factor, plus what today has still to spend (from the usual hour-of-day profile).
The low/high band is the regression's 90% prediction interval for the remaining sum, so
it widens with noisy history, short history and distant month ends.

A backtest (`backtest`) replays the model at cut-off days inside a finished month and
compares each forecast with what the month actually cost.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from proxy import money
from proxy.budgets import Budget
from proxy.query import UsageQuery
from proxy.storage.readers import LogReader

HISTORY_DAYS = 56  # eight weeks: enough for a weekday pattern, recent enough for a trend
TREND_DAYS = 28  # the line is fitted to the last four weeks
Z90 = 1.645  # two-sided 90% band
SCOPE_COLUMNS = {"key": "key_name", "customer": "customer", "feature": "feature"}

Daily = Mapping[date, float]


@dataclass(frozen=True)
class Projection:
    """Spend to the end of a period: what is spent, the forecast and its 90% band."""

    actual_usd: float  # spent from the period's start until now
    forecast_usd: float  # actual plus the projected rest of the period
    low_usd: float
    high_usd: float
    daily_rate_usd: float  # today's deseasonalised level (the run rate)
    history_days: int  # complete days of history the model saw
    days: list[tuple[date, float]] = field(default_factory=list)  # projected spend per day

    def exhausted_on(self, limit_usd: float) -> date | None:
        """The first day the projected cumulative spend reaches the limit, if it does."""
        running = self.actual_usd
        if running >= limit_usd:
            return self.days[0][0] if self.days else None
        for day, usd in self.days:
            running += usd
            if running >= limit_usd:
                return day
        return None


def weekday_factors(daily: Daily) -> list[float]:
    """Each weekday's spend relative to the week around it (Monday first); 1.0 when unsure.

    Classical decomposition: ratio of each day to the centred 7-day moving average,
    averaged per weekday, then scaled so the seven factors average 1. Needs two weeks.
    """
    days = sorted(daily)
    if len(days) < 14:
        return [1.0] * 7
    values = [daily[d] for d in days]
    ratios: dict[int, list[float]] = defaultdict(list)
    for i in range(3, len(days) - 3):
        window = values[i - 3:i + 4]
        mean = sum(window) / 7
        if mean > 0:
            ratios[days[i].weekday()].append(values[i] / mean)
    if len(ratios) < 7:
        return [1.0] * 7
    raw = [sum(ratios[w]) / len(ratios[w]) for w in range(7)]
    scale = sum(raw) / 7
    return [r / scale if scale > 0 else 1.0 for r in raw]


def intraday_share(hourly_profile: Mapping[int, float] | None, now: datetime) -> float:
    """How much of a typical day's spend has happened by `now` (UTC), from hourly totals."""
    elapsed = (now.hour * 3600 + now.minute * 60 + now.second) / 86400
    if not hourly_profile or sum(hourly_profile.values()) <= 0:
        return elapsed
    total = sum(hourly_profile.values())
    done = sum(v for h, v in hourly_profile.items() if h < now.hour)
    done += hourly_profile.get(now.hour, 0.0) * (now.minute * 60 + now.second) / 3600
    return min(max(done / total, 0.0), 1.0)


def project(daily: Daily, now: datetime, start: datetime, end: datetime,
            hourly_profile: Mapping[int, float] | None = None,
            factors: Sequence[float] | None = None) -> Projection:
    """Forecast the spend of the period [start, end) at `now` from a daily series.

    `daily` holds spend per UTC day up to and including today (today partial); days with
    no spend may be missing. Days before `start` count as history only. `factors` are
    weekday factors to use instead of the series' own (a small customer's few calls say
    little about the weekly shape; the whole log's do).
    """
    today = now.astimezone(UTC).date()
    first = min((d for d, v in daily.items() if v), default=today)
    history = {d: float(daily.get(d, 0.0))
               for d in _days(max(first, today - timedelta(days=HISTORY_DAYS)), today)}
    start_day = start.astimezone(UTC).date()
    actual = sum(float(v) for d, v in daily.items() if start_day <= d <= today)
    factors = list(factors) if factors is not None else weekday_factors(history)
    # A weekday that never spends says nothing about the level; it is projected as zero.
    level_series = [(d, v / factors[d.weekday()]) for d, v in sorted(history.items())
                    if factors[d.weekday()] > 1e-9]
    fit = _fit([(i, v) for i, (_, v) in enumerate(level_series[-TREND_DAYS:])])
    share = intraday_share(hourly_profile, now)
    if not level_series:  # no complete day yet: extrapolate today's pace
        so_far = float(daily.get(today, 0.0))
        pace = so_far / share if share > 0.02 else 0.0
        fit = _Fit(level=pace, slope=0.0, sigma=pace, n=1, t_mean=0.0, sxx=0.0, t_last=-1)
    end_day = (end - timedelta(microseconds=1)).astimezone(UTC).date()
    days: list[tuple[date, float]] = []
    weights: list[tuple[float, float]] = []  # (weekday factor x share of the day, t)
    for offset, day in enumerate(_days(today, end_day + timedelta(days=1))):
        t = fit.t_last + 1 + offset
        portion = 1.0 - share if offset == 0 else 1.0
        factor = factors[day.weekday()] * portion
        usd = max(fit.at(t), 0.0) * factor
        days.append((day, usd))
        weights.append((factor, t))
    rest = sum(usd for _, usd in days)
    spread = Z90 * math.sqrt(_variance(fit, weights))
    forecast = actual + rest
    return Projection(
        actual_usd=actual, forecast_usd=forecast,
        low_usd=max(actual, forecast - spread), high_usd=forecast + spread,
        daily_rate_usd=max(fit.at(fit.t_last + 1), 0.0), history_days=len(level_series),
        days=days)


@dataclass(frozen=True)
class _Fit:
    level: float  # the line's value at t_mean
    slope: float
    sigma: float  # residual standard deviation
    n: int
    t_mean: float
    sxx: float
    t_last: int

    def at(self, t: float) -> float:
        return self.level + self.slope * (t - self.t_mean)


def _fit(points: list[tuple[int, float]]) -> _Fit:
    """Least squares line through (t, level); flat when there are fewer than 14 points."""
    n = len(points)
    if n == 0:
        return _Fit(0.0, 0.0, 0.0, 0, 0.0, 0.0, -1)
    t_mean = sum(t for t, _ in points) / n
    y_mean = sum(y for _, y in points) / n
    sxx = sum((t - t_mean) ** 2 for t, _ in points)
    slope = 0.0
    if n >= 14 and sxx > 0:
        slope = sum((t - t_mean) * (y - y_mean) for t, y in points) / sxx
    fitted = _Fit(y_mean, slope, 0.0, n, t_mean, sxx, points[-1][0])
    dof = max(n - (2 if slope else 1), 1)
    residuals = sum((y - fitted.at(t)) ** 2 for t, y in points)
    sigma = math.sqrt(residuals / dof) if n > 1 else abs(y_mean)
    return _Fit(y_mean, slope, sigma, n, t_mean, sxx, points[-1][0])


def _variance(fit: _Fit, weights: list[tuple[float, float]]) -> float:
    """Variance of the projected sum: each day's own noise, plus the line's uncertainty."""
    if fit.n == 0:
        return 0.0
    noise = sum(f * f for f, _ in weights)
    total = sum(f for f, _ in weights)
    level = total * total / fit.n
    slope = 0.0
    if fit.slope and fit.sxx > 0:
        slope = sum(f * (t - fit.t_mean) for f, t in weights) ** 2 / fit.sxx
    return fit.sigma ** 2 * (noise + level + slope)


def _days(first: date, stop: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((stop - first).days)]


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month containing `now`."""
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    nxt = (start + timedelta(days=32)).replace(day=1)
    return start, nxt


# --- reading the log -------------------------------------------------------------------

Series = dict[tuple, dict[date, Decimal]]


def _series(rows: Iterable[dict[str, Any]], keys: list[str]) -> Series:
    out: Series = defaultdict(dict)
    for row in rows:
        out[tuple(row[k] for k in keys)][date.fromisoformat(row["day"])] = row["cost_usd"]
    return out


def _floats(daily: Mapping[date, Decimal]) -> dict[date, float]:
    return {d: float(v) for d, v in daily.items()}


def hourly_profile(log: LogReader, now: datetime) -> dict[int, float]:
    """Spend per UTC hour of day over the last week (how a day's spend is spread)."""
    rows = log.usage(UsageQuery(since=now - timedelta(days=7), until=now,
                                        group_by=["hour"], spend_only=True))
    profile: dict[int, float] = defaultdict(float)
    for row in rows:
        profile[int(row["hour"][11:13])] += float(row["cost_usd"])
    return dict(profile)


def history_start(now: datetime) -> datetime:
    return datetime.combine(now.date() - timedelta(days=HISTORY_DAYS), time(), UTC)


def forecast_month(log: LogReader, now: datetime, budgets: list[Budget] | None = None,
                   top: int = 10) -> dict[str, Any]:
    """This month's forecast in total and for the top customers (by the last two weeks'
    spend), and each budget's current period: spent, forecast, band, and the day it runs
    out if it will."""
    start, end = month_bounds(now)
    since = history_start(now)
    profile = hourly_profile(log, now)
    total_daily = _series(log.usage(UsageQuery(
        since=since, until=now, group_by=["day"], spend_only=True)), [])[()]
    total_floats = _floats(total_daily)
    history = {d: v for d, v in total_floats.items() if d < now.date()}
    factors = weekday_factors(history)
    total = project(total_floats, now, start, end, profile, factors)
    first = start.date()
    recent = log.usage(UsageQuery(
        since=now - timedelta(days=14), until=now, group_by=["customer"],
        exclude={"customer": ""}, limit=top, spend_only=True))
    names = [r["customer"] for r in recent]
    known: dict[tuple, Series] = {}
    if any(b.scope == (("customer", "*"),) for b in budgets or []):
        # A budget per customer needs every customer's series; the top ones are in it.
        by_customer = _scope_series(log, known, ["customer"], {}, now)
    elif names:
        by_customer = _series(log.usage(UsageQuery(
            since=since, until=now, group_by=["customer", "day"], where={"customer": names},
            spend_only=True)), ["customer"])
    else:
        by_customer = {}
    customers = []
    for name in names:
        daily = by_customer.get((name,), {})
        customers.append({"customer": name, **_money(
            project(_floats(daily), now, start, end, profile, factors), _since(daily, first))})
    customers.sort(key=lambda r: -r["forecast_usd"])
    return {
        "as_of": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "month": start.strftime("%Y-%m"),
        "month_end": end.strftime("%Y-%m-%d"),
        "total": _money(total, _since(total_daily, first)),
        "projected": [(d.isoformat(), money.projection(usd)) for d, usd in total.days],
        "customers": customers,
        "budgets": budget_forecasts(log, budgets or [], now, profile, known, factors),
    }


def budget_forecasts(log: LogReader, budgets: list[Budget], now: datetime,
                     profile: Mapping[int, float] | None = None,
                     known: dict[tuple, Series] | None = None,
                     factors: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Each budget's current period (one row per scope for `*` budgets), most at risk first.

    `known` holds daily series already read, by their sorted group columns, so a budget
    over the same calls costs no extra query. `total` budgets are projected to the
    month's end.
    """
    known = known if known is not None else {}
    rows = []
    for budget in budgets:
        if budget.limit_usd is None or budget.per_trace:
            continue  # a month-end forecast per agent run would say nothing
        start, end = budget.bounds(now)
        if end is None:
            end = month_bounds(now)[1]
        where: dict[str, str] = {}
        groups: list[str] = []
        for dim, want in budget.scope:
            column = SCOPE_COLUMNS.get(dim, dim)
            if want == "*":
                groups.append(column)
            else:
                where[column] = want
        series = _scope_series(log, known, groups, where, now)
        spent = _spent(log, series, groups, where, start, now)
        limit = float(budget.limit_usd)
        for key, daily in series.items():
            if any(v is None for v in key):
                continue  # calls without the attribute are not in a `*` budget
            values = dict(zip(groups, key, strict=True))
            exact = spent.get(key, Decimal(0))
            p = _with_actual(project(_floats(daily), now, start, end, profile, factors),
                             float(exact))
            scope = ",".join(f"{dim}={values[SCOPE_COLUMNS.get(dim, dim)]}" if want == "*"
                             else f"{dim}={want}" for dim, want in budget.scope)
            burst = p.exhausted_on(limit)
            rows.append({
                "scope": scope, "name": budget.name, "period": budget.period,
                "limit_usd": budget.limit_usd, **_money(p, exact),
                "forecast_share": round(p.forecast_usd / limit, 4) if limit else None,
                "at_risk": p.forecast_usd >= limit or p.high_usd >= limit,
                "exhausted_on": burst.isoformat() if burst else None,
                "resets_at": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            })
    rows.sort(key=lambda r: -(r["forecast_share"] or 0))
    return rows


def _scope_series(log: LogReader, known: dict[tuple, Series], groups: list[str],
                  where: dict[str, str], now: datetime) -> Series:
    """Daily spend per value of `groups` among calls matching `where`, read once."""
    dims = tuple(sorted([*groups, *where]))
    if dims in known:  # e.g. customer=acme from the per-customer series
        index = {d: i for i, d in enumerate(dims)}
        out: Series = {}
        for key, daily in known[dims].items():
            if all(key[index[c]] == v for c, v in where.items()):
                out[tuple(key[index[g]] for g in groups)] = daily
        return out or ({(): {}} if not groups else {})
    series = _series(log.usage(UsageQuery(
        since=history_start(now), until=now, group_by=[*groups, "day"], where=dict(where),
        spend_only=True)), groups)
    if not where:
        known[dims] = series
    return series if series or groups else {(): {}}


def _spent(log: LogReader, series: Series, groups: list[str], where: dict[str, str],
           start: datetime, now: datetime) -> dict[tuple, Decimal]:
    """Exact spend since the period's start: from the daily series when the period starts
    at a UTC midnight inside the history, else from the log."""
    if start.astimezone(UTC).time() == time() and start >= history_start(now):
        first = start.astimezone(UTC).date()
        return {key: sum((v for d, v in daily.items() if d >= first), Decimal(0))
                for key, daily in series.items()}
    rows = log.usage(UsageQuery(since=start, until=now, group_by=groups,
                                        where=dict(where), spend_only=True))
    return {tuple(r[g] for g in groups): r["cost_usd"] for r in rows}


def _with_actual(p: Projection, actual: float) -> Projection:
    shift = actual - p.actual_usd
    return Projection(actual, p.forecast_usd + shift, max(actual, p.low_usd + shift),
                      p.high_usd + shift, p.daily_rate_usd, p.history_days, p.days)


def _since(daily: Mapping[date, Decimal], first: date) -> Decimal:
    """Exact spend on the days from `first` (a month's own days of a longer series)."""
    return sum((v for d, v in daily.items() if d >= first), Decimal(0))


def _money(p: Projection, spent: Decimal) -> dict[str, Any]:
    """A projection as money: `spent_usd` is the exact spend so far (the very figure the
    report, `budgets` and the admin API show); the modelled part (`projected_usd`, the
    rest of the period) is a Decimal at 6 places, and the forecast and band are spent plus
    the modelled amount, so every view adds up."""
    def plus(modelled: float) -> Decimal:
        return spent + money.projection(modelled - p.actual_usd)

    return {"spent_usd": spent, "projected_usd": money.projection(p.forecast_usd - p.actual_usd),
            "forecast_usd": plus(p.forecast_usd), "low_usd": max(spent, plus(p.low_usd)),
            "high_usd": plus(p.high_usd), "daily_rate_usd": money.projection(p.daily_rate_usd),
            "history_days": p.history_days}


# --- backtest --------------------------------------------------------------------------

def backtest(daily: Daily, month: date, cutoffs: Iterable[int] | None = None,
             hourly_profile: Mapping[int, float] | None = None) -> list[dict[str, Any]]:
    """Forecast a finished month from each cut-off day (the model sees only the days
    before it) and compare with the month's actual spend.

    Returns one row per cut-off: the forecast, its band, the actual, the relative error
    and whether the actual fell inside the band.
    """
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    actual = sum(v for d, v in daily.items() if start.date() <= d < end.date())
    days_in_month = (end - start).days
    out = []
    for cut in cutoffs or range(3, days_in_month):
        now = start + timedelta(days=cut)  # midnight: the days before are complete
        seen = {d: v for d, v in daily.items() if d < now.date()}
        p = project(seen, now, start, end, hourly_profile)
        out.append({"cutoff_day": cut, "forecast_usd": p.forecast_usd, "low_usd": p.low_usd,
                    "high_usd": p.high_usd, "actual_usd": actual,
                    "error": (p.forecast_usd - actual) / actual if actual else 0.0,
                    "in_band": p.low_usd <= actual <= p.high_usd})
    return out
