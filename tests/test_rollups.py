"""The hourly rollups answer exactly what the raw rows answer (issue 18).

Random rows (random dimensions, times across a month and a week boundary, exact costs,
unpriced calls, refusals standing for several calls) go through the real writers of both
backends in random batches, some replayed, some repriced afterwards; then every question
is checked against sums the test takes itself over the rows it wrote, in Python: the
grouped usage (from the rollups, with raw rows for partial edge hours, or from raw rows
where no rollup has the dimensions), the budgets' spend per hour, and the rollup tables
themselves.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.outcome import ERROR_OUTCOMES, REFUSAL_OUTCOMES
from proxy.query import UsageQuery
from proxy.storage import rollups
from proxy.storage.postgres import PostgresUsageLog
from proxy.storage.readers import CostUpdate, open_reader
from proxy.storage.row import UsageRow
from proxy.storage.sqlite import SqliteUsageLog
from proxy.token_classes import COLUMNS as CLASS_COLUMNS
from tests.scale import pg_database

START = datetime(2026, 11, 28, tzinfo=UTC)  # a Saturday; the rows span into December
SPAN_US = 5 * 86_400_000_000
POOLS: dict[str, tuple[Any, ...]] = {
    "key_name": (None, "web", "batch"),
    "provider": ("openai", "anthropic", None),
    "model": ("gpt-4o", "claude", None),
    "feature": (None, "chat", "search", ""),
    "customer": (None, "acme", "globex", ""),  # '' is a value, not "no customer"
    "outcome": ("ok", "ok", "upstream_error", "client_disconnect", "budget_exceeded",
                "rejected"),
}
DIMS = (*POOLS, "priced")
TOKENS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
          "web_search_requests")


def ts(us: int) -> str:
    return (START + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@st.composite
def usage_rows(draw: Any) -> list[UsageRow]:
    rows = []
    for i in range(draw(st.integers(1, 60))):
        dims = {name: draw(st.sampled_from(pool)) for name, pool in POOLS.items()}
        refused = dims["outcome"] in REFUSAL_OUTCOMES
        priced = draw(st.booleans()) or refused
        # Costs are exact at 1e-10 USD, as the pricing engine rounds them.
        cost = (0.0 if refused else float(Decimal(draw(st.integers(0, 10**13))) / 10**10)
                if priced else None)
        rows.append(UsageRow(
            id=f"r{i:03d}", ts=ts(draw(st.integers(0, SPAN_US - 1))), **dims,
            repeat_count=draw(st.integers(1, 5)) if refused else 1,
            priced=int(priced), cost_usd=cost,
            **{t: draw(st.integers(0, 10**6)) for t in TOKENS}))
    return rows


def moment(data: Any) -> datetime | None:
    """None, a whole day or hour, or any microsecond of the span (and around it)."""
    kind = data.draw(st.sampled_from(("none", "day", "hour", "any")))
    if kind == "none":
        return None
    if kind == "day":
        return START + timedelta(days=data.draw(st.integers(-1, 6)))
    if kind == "hour":
        return START + timedelta(hours=data.draw(st.integers(-2, 5 * 24 + 2)))
    return START + timedelta(microseconds=data.draw(st.integers(-10**9, SPAN_US + 10**9)))


@st.composite
def questions(draw: Any) -> UsageQuery:
    group_by = draw(st.lists(st.sampled_from(DIMS), max_size=2, unique=True))
    bucket = draw(st.sampled_from((None, "hour", "day", "week", "month")))
    if bucket:
        group_by.insert(draw(st.integers(0, len(group_by))), bucket)
    where: dict[str, Any] = {}
    exclude: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(DIMS))
        pool = ("0", "1") if name == "priced" else tuple(
            "" if v is None else v for v in POOLS[name])
        value = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True))
        target = exclude if draw(st.booleans()) else where
        target[name] = value[0] if len(value) == 1 else value
    return UsageQuery(group_by=group_by, where=where, exclude=exclude,
                      spend_only=draw(st.booleans()))


# The expected answers, from the rows alone.

def bucket(name: str, row: UsageRow) -> Any:
    if name == "hour":
        return row.ts[:13] + ":00"
    if name == "day":
        return row.ts[:10]
    if name == "month":
        return row.ts[:7]
    if name == "week":
        day = datetime.strptime(row.ts[:10], "%Y-%m-%d")
        return (day - timedelta(days=day.weekday())).strftime("%Y-%m-%d")
    return getattr(row, name)


def matches(row: UsageRow, name: str, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    have = getattr(row, name)
    return any(have is None if v == "" else str(have) == v for v in values)


def expected(rows: list[UsageRow], q: UsageQuery) -> dict[tuple, dict[str, Any]]:
    groups: dict[tuple, list[UsageRow]] = defaultdict(list)
    for row in rows:
        if q.since is not None and row.ts < q.since.strftime("%Y-%m-%dT%H:%M:%S.%fZ"):
            continue
        if q.until is not None and row.ts >= q.until.strftime("%Y-%m-%dT%H:%M:%S.%fZ"):
            continue
        if not all(matches(row, k, v) for k, v in q.where.items()):
            continue
        if any(matches(row, k, v) for k, v in q.exclude.items()):
            continue
        groups[tuple(bucket(g, row) for g in q.group_by)].append(row)
    if not q.group_by and not groups:
        groups[()] = []
    out = {}
    for key, members in groups.items():
        sums: dict[str, Any] = {
            "calls": sum(r.repeat_count for r in members),
            "cost_usd": sum((Decimal(repr(r.cost_usd)) for r in members
                             if r.cost_usd is not None), Decimal(0)),
            "unpriced_calls": sum(r.repeat_count for r in members if not r.priced)}
        if not q.spend_only:
            for column in CLASS_COLUMNS:
                sums[column] = sum(getattr(r, column) for r in members)
            sums["errors"] = sum(r.repeat_count for r in members
                                 if r.outcome in ERROR_OUTCOMES)
            sums["refusals"] = sum(r.repeat_count for r in members
                                   if r.outcome in REFUSAL_OUTCOMES)
        out[key] = sums
    return out


def answered(result: list[dict[str, Any]], q: UsageQuery) -> dict[tuple, dict[str, Any]]:
    out = {}
    for row in result:
        key = tuple(row[g] for g in q.group_by)
        assert key not in out, f"group {key} twice"
        out[key] = {k: v for k, v in row.items()
                    if k not in q.group_by and not k.endswith("_rate")}
    return out


# The backends.

class Backend:
    def __init__(self, kind: str, base: Any) -> None:
        self.kind, self.base, self.n = kind, base, 0

    def fresh(self) -> str:
        self.n += 1
        if self.kind == "sqlite":
            return f"sqlite:///{self.base / f'log{self.n}.db'}"
        with psycopg.connect(self.base, autocommit=True) as conn:
            tables = ", ".join(("usage", *(r.table for r in rollups.ROLLUPS)))
            conn.execute(f"TRUNCATE {tables}")
        return self.base

    def log(self, url: str) -> Any:
        return SqliteUsageLog(url) if self.kind == "sqlite" else PostgresUsageLog(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield Backend("sqlite", Path(tmp))
        return
    with pg_database() as url:
        PostgresUsageLog(url).open()  # migrate once
        yield Backend("postgresql", url)


def write(backend: Backend, rows: list[UsageRow], data: Any) -> str:
    """Through the real writer: random batches, a replayed batch, a row twice in one."""
    url = backend.fresh()
    log = backend.log(url)
    log.open()
    try:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), max_size=4)))
        starts = [0, *cuts]
        for a, b in zip(starts, [*cuts, len(rows)], strict=True):
            if a < b:
                log.write(rows[a:b])
        replay = data.draw(st.integers(0, len(rows) - 1))
        log.write(rows[replay:replay + 3] + rows[replay:replay + 1])
    finally:
        log.close()
    return url


def reprice(url: str, rows: list[UsageRow], data: Any) -> list[UsageRow]:
    """Reprice a random subset (some become unpriced, some priced) like `meterproxy
    reprice` does; returns the rows as they now stand."""
    picked = data.draw(st.sets(st.integers(0, len(rows) - 1), max_size=len(rows)))
    if not picked:
        return rows
    updates, now = [], list(rows)
    for i in sorted(picked):
        cost = data.draw(st.one_of(st.none(), st.integers(0, 10**12)))
        usd = None if cost is None else Decimal(cost) / 10**10
        updates.append(CostUpdate(rows[i].id, usd, None, "v2" if usd is not None else None))
        now[i] = replace(rows[i], cost_usd=None if usd is None else float(usd),
                         priced=int(usd is not None))
    with open_reader(url, writable=True) as log:
        log.set_costs(updates)
    return now


def rollup_contents(url: str) -> dict[tuple, tuple]:
    out = {}
    with open_reader(url) as log:
        for r in rollups.ROLLUPS:
            dims = ", ".join(r.column(d) for d in r.dims)
            cur = log.conn.cursor()
            cur.execute(f"SELECT {r.period}, {dims}, calls, input_tokens, output_tokens, "
                        f"cost_units FROM {r.table}")
            for hour, *rest in cur.fetchall():
                key = (r.table, hour, *rest[:len(r.dims)])
                assert key not in out
                out[key] = tuple(int(v) for v in rest[len(r.dims):])
            cur.close()
    return out


def rollups_from(rows: list[UsageRow]) -> dict[tuple, tuple]:
    out: dict[tuple, list[int]] = {}
    for r in rollups.ROLLUPS:
        for row in rows:
            period = row.ts[:13] if r.period == "hour" else row.ts[:10]
            key = (r.table, period, *(getattr(row, d) for d in r.dims))
            sums = out.setdefault(key, [0, 0, 0, 0])
            units = 0 if row.cost_usd is None else int(Decimal(repr(row.cost_usd)) * 10**10)
            for i, v in enumerate((row.repeat_count, row.input_tokens, row.output_tokens,
                                   units)):
                sums[i] += v
    return {k: tuple(v) for k, v in out.items()}


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=usage_rows(), data=st.data())
def test_every_question_answers_as_the_rows_do(backend: Backend, rows: list[UsageRow],
                                                data: Any) -> None:
    """Whatever was written, replayed and repriced: each question's sums (from rollups
    plus edge hours, or raw rows) equal the sums over the rows; so do the rollups."""
    url = write(backend, rows, data)
    if data.draw(st.booleans()):
        rows = reprice(url, rows, data)
    assert rollup_contents(url) == rollups_from(rows)
    with open_reader(url) as log:
        for _ in range(6):
            q = data.draw(questions())
            q.since, q.until = moment(data), moment(data)
            assert answered(log.usage(q), q) == expected(rows, q), q
        dims = data.draw(st.lists(st.sampled_from(("key", "customer", "feature")),
                                  max_size=3, unique=True))
        since = START + timedelta(hours=data.draw(st.integers(0, 5 * 24)))
        got = {(tuple(s.attrs.values()), s.hour): (s.usd, s.tokens)
               for s in log.spend_by_hour(dims, since)}
    want: dict[tuple, list] = defaultdict(lambda: [Decimal(0), 0])
    for row in rows:
        hour = datetime.strptime(row.ts[:13], "%Y-%m-%dT%H").replace(tzinfo=UTC)
        if hour >= since:
            key = (tuple(getattr(row, "key_name" if d == "key" else d) for d in dims), hour)
            want[key][0] += Decimal(repr(row.cost_usd)) if row.cost_usd is not None else 0
            want[key][1] += (row.input_tokens + row.cached_input_tokens
                             + row.output_tokens)
    assert got == {k: tuple(v) for k, v in want.items()}


def test_questions_on_rollup_dimensions_read_the_rollups() -> None:
    """The common whole-log questions are planned onto a rollup (not raw rows), and a
    window with no whole hour, tags or traces read raw rows."""
    hour = datetime(2026, 12, 1, 5, tzinfo=UTC)
    assert rollups.plan(UsageQuery(group_by=["customer"])).table == "usage_hourly_customer"
    assert rollups.plan(UsageQuery(group_by=["day", "model"], where={"feature": "chat"},
                                   since=hour)).table == "usage_hourly"
    assert rollups.plan(UsageQuery(group_by=["feature"], since=hour + timedelta(minutes=1),
                                   until=hour + timedelta(minutes=59))) is None
    assert rollups.plan(UsageQuery(group_by=["tag:team"])) is None
    assert rollups.plan(UsageQuery(group_by=["customer", "model"])) is None
    # A window of whole days and a few hours either side: days, hours, raw edges.
    q = UsageQuery(group_by=["day"], since=hour - timedelta(days=3, minutes=30),
                   until=hour + timedelta(hours=2, minutes=1))
    sql, params = rollups.source(q, rollups.plan(q), "?", "cost_units")
    assert "FROM usage_daily " in sql and "FROM usage_hourly " in sql and "FROM usage " in sql
    assert params == ["2026-11-29", "2026-12-01",  # whole days
                      "2026-11-28T05", "2026-11-29T00", "2026-12-01T00", "2026-12-01T07",
                      "2026-11-28T04:30:00.000000Z", "2026-11-28T05:00:00.000000Z",
                      "2026-12-01T07:00:00.000000Z", "2026-12-01T07:01:00.000000Z"]


def test_rollup_sums_cover_every_class_column() -> None:
    """A new token class needs a migration adding it to the rollups."""
    assert set(rollups.SUMS) == set(CLASS_COLUMNS)
