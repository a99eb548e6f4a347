"""Hourly rollups of the usage log: how they are kept, and which one answers a question.

A rollup holds, per hour and per combination of its dimensions, the calls
(`sum(repeat_count)`), every token and unit column, and the cost as an exact integer
count of 1e-10 USD: the same sums the query layer takes over raw rows. The writer folds
each batch into every rollup in the transaction that inserts the rows (`fold_sql`), and
reprice takes its rows out and puts them back repriced, so a rollup always equals the
GROUP BY over `usage` it stands for. Rows are never deleted from `usage`.

Each hourly rollup has a daily twin with the same sums by UTC day. A question
whose groups and filters are all dimensions of one rollup reads the daily twin for the
whole days of its window (unless it groups by hour), the hourly rollup for the whole
hours around them, and raw rows only for the partial hours at either edge (`source`),
so it stays exact for any window. Tags, traces and the other per-call
columns are not rolled up: those questions read `usage` as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.query import TIME_BUCKETS, UsageQuery
from proxy.storage.shipped import (
    M006_COST_UNITS,
    M006_DAILY,
    M006_NOT_NULL,
    M006_ROLLUPS,
    M006_SUMS,
    m006_fold,
    m006_fold_daily,
)
from proxy.timeparse import to_ts

SUMS = M006_SUMS  # the summed class columns; tests check they are every class column


@dataclass(frozen=True)
class Rollup:
    """One rollup table, its period column (`hour` or `day`) and its dimensions."""

    table: str
    dims: tuple[str, ...]
    period: str = "hour"

    def column(self, dim: str) -> str:
        """The dimension as `usage` holds it: NULL where the key stores '' and a bit."""
        if dim in M006_NOT_NULL:
            return dim
        return f"CASE WHEN (nulls & {1 << self.dims.index(dim)}) <> 0 THEN NULL ELSE {dim} END"

    def fold(self, flavor: str, source: str, where: str = "true", sign: str = "") -> str:
        """The upsert adding (sign '') or removing (sign '-') `source`'s rows."""
        fold = m006_fold if self.period == "hour" else m006_fold_daily
        return fold(self.table, self.dims, M006_COST_UNITS[flavor], source, where, sign)


HOURLY = tuple(Rollup(table, dims) for table, dims in M006_ROLLUPS)
# Each hourly rollup's daily twin, by the hourly table's name.
DAILY = {hourly: Rollup(table, dict(M006_ROLLUPS)[hourly], "day")
         for table, hourly in M006_DAILY}
ROLLUPS = (*HOURLY, *DAILY.values())  # every table the writer folds rows into


def fold_sql(flavor: str, source: str, where: str = "true", sign: str = "") -> list[str]:
    """One upsert per rollup, for the rows of `source` (a table) matching `where`."""
    return [r.fold(flavor, source, where, sign) for r in ROLLUPS]


PRUNE_SQL = tuple(f"DELETE FROM {r.table} WHERE calls = 0" for r in ROLLUPS)


def covering(names: Iterable[str]) -> Rollup | None:
    """The smallest hourly rollup keyed by every one of `names`, if any."""
    wanted = set(names)
    for rollup in HOURLY:
        if wanted <= set(rollup.dims):
            return rollup
    return None


def plan(q: UsageQuery) -> Rollup | None:
    """The rollup that can answer `q`'s sums, or None to read raw rows.

    Hour-aligned windows and windows with whole hours inside both qualify: the partial
    hours at the edges come from raw rows (see `source`).
    """
    names = [g for g in q.group_by if g not in TIME_BUCKETS]
    names += [*q.where, *q.exclude]
    rollup = covering(names)
    if rollup is None:
        return None
    first, last = _whole_hours(q.since, q.until)
    if first is not None and last is not None and first >= last:
        return None  # no whole hour inside the window
    return rollup


def source(q: UsageQuery, rollup: Rollup, param: str, cost_units: str
           ) -> tuple[str, list[Any]]:
    """A subquery with `usage`'s names for `ts` and the dimensions `q` needs, `n` (calls),
    the summed columns and `cu` (cost in 1e-10 USD): the daily twin's whole days in `q`'s
    window, the rollup's whole hours around them and the raw rows of the partial edge
    hours. Filter and group it like `usage`."""
    first, last = _whole_hours(q.since, q.until)
    needed = {*q.group_by, *q.where, *q.exclude, "priced"}
    if not q.spend_only:
        needed.add("outcome")
    names = [d for d in rollup.dims if d in needed]
    dims = "".join(f"{rollup.column(d)} AS {d}, " for d in names)
    sums = "" if q.spend_only else "".join(f"{c}, " for c in SUMS)
    hours: list[tuple[datetime | None, datetime | None]] = [(first, last)]
    branches, params = [], []
    daily = DAILY.get(rollup.table) if "hour" not in q.group_by else None
    day_lo, day_hi = _whole_days(first, last)
    if daily is not None and (day_lo is None or day_hi is None or day_lo < day_hi):
        branches.append(_branch(daily, [(day_lo, day_hi)], dims, sums, param, params))
        hours = [(first, day_lo), (day_hi, last)]
        hours = [(lo, hi) for lo, hi in hours if lo is not None and hi is not None and lo < hi]
    if hours:
        branches.append(_branch(rollup, hours, dims, sums, param, params))
    edges = []
    if q.since is not None and first is not None and to_ts(q.since) < to_ts(first):
        edges.append(f"(ts >= {param} AND ts < {param})")
        params += [to_ts(q.since), to_ts(first)]
    if q.until is not None and last is not None and to_ts(last) < to_ts(q.until):
        edges.append(f"(ts >= {param} AND ts < {param})")
        params += [to_ts(last), to_ts(q.until)]
    if edges:
        branches.append(f"SELECT ts, {''.join(d + ', ' for d in names)}repeat_count AS n, "
                        f"{sums}{cost_units} AS cu FROM usage WHERE {' OR '.join(edges)}")
    return f"({' UNION ALL '.join(branches)})", params


def _branch(rollup: Rollup, ranges: list[tuple[datetime | None, datetime | None]],
            dims: str, sums: str, param: str, params: list[Any]) -> str:
    """SELECT a rollup's rows in the given [from, to) periods (None: unbounded)."""
    fmt = "%Y-%m-%dT%H" if rollup.period == "hour" else "%Y-%m-%d"
    sql = (f"SELECT {rollup.period} AS ts, {dims}calls AS n, {sums}cost_units AS cu "
           f"FROM {rollup.table}")
    terms = []
    for lo, hi in ranges:
        bounds = []
        if lo is not None:
            bounds.append(f"{rollup.period} >= {param}")
            params.append(lo.strftime(fmt))
        if hi is not None:
            bounds.append(f"{rollup.period} < {param}")
            params.append(hi.strftime(fmt))
        if bounds:
            terms.append("(" + " AND ".join(bounds) + ")")
    if terms and len(terms) == len(ranges):
        sql += " WHERE " + " OR ".join(terms)
    return sql


def _whole_days(first: datetime | None, last: datetime | None
                ) -> tuple[datetime | None, datetime | None]:
    """The first UTC midnight at or after `first`, and the one at or before `last`."""
    lo = hi = None
    if first is not None:
        lo = first.replace(hour=0)
        if lo < first:
            lo += timedelta(days=1)
    if last is not None:
        hi = last.replace(hour=0)
    return lo, hi


def _whole_hours(since: datetime | None, until: datetime | None
                 ) -> tuple[datetime | None, datetime | None]:
    """The first whole hour at or after `since`, and the hour `until` falls in."""
    first = last = None
    if since is not None:
        s = since.astimezone(UTC)
        first = s.replace(minute=0, second=0, microsecond=0)
        if first < s:
            first += timedelta(hours=1)
    if until is not None:
        last = until.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return first, last
