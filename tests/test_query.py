"""The query layer against a generated usage log whose totals are computed independently."""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlite_utils

from proxy import query
from proxy.query import UsageQuery
from proxy.storage import sql
from proxy.storage.readers import open_reader
from proxy.storage.row import UsageRow
from proxy.storage.sqlite import SqliteUsageLog, migrate, migrations
from proxy.token_classes import COLUMNS as TOKEN_COLUMNS
from tests.usagegen import make_rows

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list[UsageRow]]]:
    path = tmp_path_factory.mktemp("query") / "usage.db"
    writer = SqliteUsageLog(f"sqlite:///{path}")
    writer.open()
    rows = make_rows()
    writer.write(rows)
    writer.close()
    reader = open_reader(f"sqlite:///{path}")
    assert reader.flavor is sql.SQLITE
    yield reader, rows
    reader.close()


def value_of(row: UsageRow, name: str) -> Any:
    """What the query layer should group `row` under for `name`, computed in Python."""
    ts = datetime.strptime(row.ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    if name == "hour":
        return row.ts[:13] + ":00"
    if name == "day":
        return row.ts[:10]
    if name == "month":
        return row.ts[:7]
    if name == "week":
        return (ts.date() - timedelta(days=ts.weekday())).isoformat()
    if name.startswith("tag:"):
        return orjson.loads(row.tags or "{}").get(name[4:])
    return getattr(row, name)


def expected(rows: list[UsageRow], group_by: list[str],
             keep: Callable[[UsageRow], bool] = lambda r: True) -> dict[tuple, dict[str, Any]]:
    groups: dict[tuple, list[UsageRow]] = defaultdict(list)
    for r in rows:
        if keep(r):
            groups[tuple(value_of(r, g) for g in group_by)].append(r)
    out = {}
    for key, members in groups.items():
        sums = {c: sum(getattr(r, c) for r in members) for c in TOKEN_COLUMNS}
        errors = sum(r.outcome in query.ERROR_OUTCOMES for r in members)
        prompt = sums["cached_input_tokens"] + sums["input_tokens"]
        durations = sorted(r.duration_ms for r in members if r.duration_ms)
        out[key] = {
            "calls": len(members), **sums,
            "cost_usd": sum((Decimal(str(r.cost_usd)) for r in members if r.cost_usd is not None),
                            Decimal(0)),
            "unpriced_calls": sum(not r.priced for r in members), "errors": errors,
            "refusals": sum(r.outcome == "budget_exceeded" for r in members),
            "cache_hit_rate": sums["cached_input_tokens"] / prompt if prompt else 0.0,
            "error_rate": errors / len(members),
            "p50_ms": nearest_rank(durations, 0.5), "p95_ms": nearest_rank(durations, 0.95),
        }
    return out


def nearest_rank(values: list[float], fraction: float) -> float | None:
    return values[max(1, math.ceil(fraction * len(values))) - 1] if values else None


def check(got: list[dict[str, Any]], want: dict[tuple, dict[str, Any]],
          group_by: list[str]) -> None:
    if not group_by and not want:  # no call matches: one total of zeros
        assert [(r["calls"], r["cost_usd"], r["input_tokens"]) for r in got] == [(0, 0, 0)]
        return
    assert {tuple(r[g] for g in group_by) for r in got} == set(want)
    for r in got:
        w = want[tuple(r[g] for g in group_by)]
        for name in ("calls", *TOKEN_COLUMNS, "cost_usd", "unpriced_calls", "errors",
                     "refusals"):
            assert r[name] == w[name], (group_by, r, name)
        assert r["cache_hit_rate"] == pytest.approx(w["cache_hit_rate"])
        assert r["error_rate"] == pytest.approx(w["error_rate"])
        for p in ("p50_ms", "p95_ms"):
            if p in r:
                assert (r[p] is None) == (w[p] is None)
                if w[p] is not None:  # the histogram's promise: within 2.1%
                    assert abs(r[p] / w[p] - 1) <= 0.021, (r[p], w[p])


GROUPINGS = [[d] for d in query.DIMENSIONS] + [[b] for b in query.TIME_BUCKETS] + [
    ["tag:env"], ["tag:team"], ["customer", "feature"], ["provider", "model"],
    ["day", "customer"], ["tag:env", "model"], []]


@pytest.mark.parametrize("group_by", GROUPINGS, ids=lambda g: ",".join(g) or "total")
def test_every_group_by_matches_python_totals(log, group_by: list[str]) -> None:
    """Each group-by gives exactly the counts, tokens, cost and rates summed in Python."""
    conn, rows = log
    got = conn.usage(UsageQuery(group_by=group_by, durations=True))
    check(got, expected(rows, group_by), group_by)


def parse(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


FILTERS: list[tuple[str, dict[str, Any], dict[str, Any], Callable[[UsageRow], bool]]] = [
    ("customer", {"customer": "acme"}, {}, lambda r: r.customer == "acme"),
    ("escaped customer", {"customer": "<b>initech</b> & co"}, {},
     lambda r: r.customer == "<b>initech</b> & co"),
    ("no customer", {"customer": ""}, {}, lambda r: r.customer is None),
    ("not acme", {}, {"customer": "acme"}, lambda r: r.customer != "acme"),
    ("has customer", {}, {"customer": ""}, lambda r: r.customer is not None),
    ("two features", {"feature": ["search", "chat"]}, {},
     lambda r: r.feature in ("search", "chat")),
    ("tag", {"tag:env": "prod"}, {}, lambda r: '"env":"prod"' in (r.tags or "")),
    ("quoted tag", {"tag:team": "o'brien \"q\""}, {},
     lambda r: value_of(r, "tag:team") == "o'brien \"q\""),
    ("untagged team", {"tag:team": ""}, {}, lambda r: value_of(r, "tag:team") is None),
    ("not web", {}, {"tag:team": "web"}, lambda r: value_of(r, "tag:team") != "web"),
    ("unpriced", {"priced": "0"}, {}, lambda r: r.priced == 0),
    ("streamed 429", {"stream": "1", "status": "429"}, {},
     lambda r: r.stream == 1 and r.status == 429),
    ("model and outcome", {"model": "gpt-4o", "outcome": "ok"}, {},
     lambda r: r.model == "gpt-4o" and r.outcome == "ok"),
    ("key and day", {"key_name": "team-b", "day": "2026-03-10"}, {},
     lambda r: r.key_name == "team-b" and r.ts.startswith("2026-03-10")),
    ("week", {"week": "2026-03-09"}, {}, lambda r: "2026-03-09" <= r.ts < "2026-03-16"),
    ("trace", {"trace_id": "t7"}, {"outcome": "rejected"},
     lambda r: r.trace_id == "t7" and r.outcome != "rejected"),
    ("none of no values", {"customer": []}, {}, lambda r: False),
    ("two outcomes or none", {}, {"outcome": ["ok", "rejected"], "tag:team": ["web", ""]},
     lambda r: r.outcome not in ("ok", "rejected")
     and value_of(r, "tag:team") not in ("web", None)),
]


@pytest.mark.parametrize("name,where,exclude,keep", FILTERS, ids=[f[0] for f in FILTERS])
def test_every_filter_matches_python_totals(log, name, where, exclude, keep) -> None:
    """Filters on columns, tags, NULLs, several values and exclusions keep the right calls."""
    conn, rows = log
    for group_by in ([], ["provider"]):
        got = conn.usage(UsageQuery(group_by=group_by, where=where, exclude=exclude))
        check(got, expected(rows, group_by, keep), group_by)


def test_since_and_until_bound_the_time_range(log) -> None:
    """since is inclusive, until exclusive, both to the microsecond."""
    conn, rows = log
    since, until = parse(rows[100].ts), START + timedelta(days=9, hours=5)
    got = conn.usage(UsageQuery(since=since, until=until, group_by=["day"]))
    check(got, expected(rows, ["day"], lambda r: since <= parse(r.ts) < until), ["day"])


def test_order_and_limit(log) -> None:
    """Metrics sort descending, group names ascending; the limit keeps the first N."""
    conn, rows = log
    want = expected(rows, ["trace_id"])
    top = conn.usage(UsageQuery(group_by=["trace_id"], limit=5))
    assert [r["cost_usd"] for r in top] == sorted((w["cost_usd"] for w in want.values()),
                                                   reverse=True)[:5]
    by_name = conn.usage(UsageQuery(group_by=["day"], order_by="day"))
    assert [r["day"] for r in by_name] == sorted(r["day"] for r in by_name)
    for metric in ("calls", "output_tokens", "errors", "cache_hit_rate", "error_rate"):
        got = conn.usage(UsageQuery(group_by=["customer", "model"], order_by=metric,
                                           limit=4))
        best = sorted((w[metric] for w in expected(rows, ["customer", "model"]).values()),
                      reverse=True)[:4]
        assert [r[metric] for r in got] == pytest.approx(best)
    slowest = conn.usage(UsageQuery(group_by=["model"], order_by="p95_ms", limit=2))
    assert [r["p95_ms"] for r in slowest] == sorted(
        (r["p95_ms"] for r in conn.usage(UsageQuery(group_by=["model"],
                                                           durations=True))), reverse=True)[:2]
    assert all("p50_ms" in r for r in slowest)


def test_percentiles_for_the_returned_groups_only(log) -> None:
    """With a limit, percentiles are binned for the returned groups, and still right."""
    conn, rows = log
    got = conn.usage(UsageQuery(group_by=["customer"], durations=True, limit=2))
    assert len(got) == 2
    want = expected(rows, ["customer"])
    for r in got:
        w = want[(r["customer"],)]
        assert abs(r["p95_ms"] / w["p95_ms"] - 1) <= 0.021


def test_spend_only_is_the_same_money(log) -> None:
    """spend_only sums just calls, cost and unpriced calls, and they agree with the full sums."""
    conn, _ = log
    full = conn.usage(UsageQuery(group_by=["feature", "day"]))
    lean = conn.usage(UsageQuery(group_by=["feature", "day"], spend_only=True))
    assert [{k: r[k] for k in ("feature", "day", "calls", "cost_usd", "unpriced_calls")}
            for r in full] == lean
    assert set(lean[0]) == {"feature", "day", "calls", "cost_usd", "unpriced_calls"}


def test_bad_queries_are_query_errors(log) -> None:
    """Unknown names, bad tag names, bad numbers and bad filters are refused with a reason."""
    conn, _ = log
    for q, words in ((UsageQuery(group_by=["colour"]), "cannot group or filter by 'colour'"),
                     (UsageQuery(group_by=["tag:Bad Name"]), "bad tag name"),
                     (UsageQuery(where={"priced": "yes"}), "whole number"),
                     (UsageQuery(order_by="vibes"), "cannot order by 'vibes'"),
                     (UsageQuery(group_by=["x); DROP TABLE usage; --"]), "cannot group")):
        with pytest.raises(query.QueryError, match=words):
            conn.usage(q)
    with pytest.raises(query.QueryError):
        query.parse_filters(["no-equals-sign"])
    assert query.parse_filters(["a=1", "a=2", "b!=", "tag:x!=y"]) == (
        {"a": ["1", "2"]}, {"b": "", "tag:x": "y"})


def test_explain_lists_each_class_and_the_total(log) -> None:
    """explain() turns the stored breakdown into class x rate lines and keeps the total."""
    conn, rows = log
    assert query.explain(conn, "no-such-id") is None
    found = query.explain(conn, rows[0].id)
    assert found["id"] == rows[0].id and found["row"]["customer"] == rows[0].customer
    assert isinstance(found["row"]["tags"], dict)


def test_export_cursor_streams_filtered_rows_in_batches(log) -> None:
    """export_cursor + batches: the filtered raw rows in time order, a batch at a time."""
    conn, rows = log
    cursor = conn.export(UsageQuery(where={"customer": "acme"}), columns=(
        "id", "ts", "customer", "cost_usd"))
    batches = list(sql.batches(cursor, size=100))
    got = [r for b in batches for r in b]
    assert len(batches) > 1 and all(len(b) <= 100 for b in batches)
    want = sorted((r for r in rows if r.customer == "acme"), key=lambda r: (r.ts, r.id))
    assert [g[0] for g in got] == [r.id for r in want]
    with pytest.raises(query.QueryError, match="unknown column"):
        conn.export(UsageQuery(), columns=("id", "password"))


def test_views_for_datasette(log) -> None:
    """The daily_spend, spend_by_customer and spend_by_feature views sum the log."""
    conn, rows = log
    daily = {r[0]: (r[1], r[7]) for r in conn.conn.execute("SELECT * FROM daily_spend")}
    for (day,), w in expected(rows, ["day"]).items():
        assert daily[day][0] == w["calls"]
        assert daily[day][1] == pytest.approx(float(w["cost_usd"]), abs=1e-6)
    names = [d[0] for d in conn.conn.execute("SELECT * FROM spend_by_customer").description]
    assert names[:3] == ["month", "customer", "calls"]
    by_feature = {(r[0], r[1]): r[2] for r in conn.conn.execute("SELECT * FROM spend_by_feature")}
    assert by_feature == {("2026-03", f): w["calls"]
                          for (f,), w in expected(rows, ["feature"]).items()}


def test_views_count_the_calls_a_folded_row_stands_for(tmp_path: Path) -> None:
    """A refusal row folding 5 identical refusals counts as 5 calls in every view (m008);
    an unpriced one counts 5 unpriced calls."""
    writer = SqliteUsageLog(f"sqlite:///{tmp_path / 'usage.db'}")
    writer.open()
    writer.write([
        UsageRow(id="a", ts="2026-03-02T10:00:00.000000Z", customer="acme", feature="chat",
                 input_tokens=10, output_tokens=2, cost_usd=0.25),
        UsageRow(id="b", ts="2026-03-02T10:00:01.000000Z", customer="acme", feature="chat",
                 outcome="budget_exceeded", repeat_count=5, priced=0),
    ])
    writer.close()
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        day = conn.execute("SELECT day, calls, cost_usd, unpriced_calls "
                           "FROM daily_spend").fetchall()
        customer = conn.execute("SELECT customer, calls FROM spend_by_customer").fetchall()
        feature = conn.execute("SELECT feature, calls FROM spend_by_feature").fetchall()
    conn.close()
    assert day == [("2026-03-02", 6, 0.25, 5)]
    assert customer == [("acme", 6)] and feature == [("chat", 6)]


def test_migrations_upgrade_an_m001_log_with_rows(tmp_path: Path) -> None:
    """A log made by m001 alone upgrades in place: rows kept, views, indexes and rollups
    added (m006 dropped the covering indexes the rollups replace)."""
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    migrations.apply(db, stop_before="m002_views")
    old = list(db["usage"].columns_dict)  # what m001 created
    db.close()
    insert = (f"INSERT INTO usage ({', '.join(old)}) VALUES ({', '.join('?' for _ in old)})")
    with sqlite3.connect(path) as conn:  # rows written by the old proxy
        conn.executemany(insert, [[getattr(r, c) for c in old] for r in make_rows(50)])
    conn.close()
    assert migrate(path) == [m.name for m in migrations.pending(sqlite_utils.Database(memory=True))
                             if m.name != "m001_usage"]
    assert migrate(path) == []
    db = sqlite_utils.Database(path)
    assert db["usage"].count == 50
    assert {"daily_spend", "spend_by_customer", "spend_by_feature"} <= set(db.view_names())
    indexes = {i.name for i in db["usage"].indexes}
    assert {"idx_usage_ts_ts", "idx_usage_outcome_ts", "idx_usage_unpriced_ts",
            "idx_usage_trace_id"} <= indexes
    assert not {"idx_usage_customer_ts", "idx_usage_customer_cover", "idx_usage_day",
                "idx_usage_feature_cover", "idx_usage_model_cover"} & indexes
    assert db.execute("SELECT sum(calls) FROM usage_hourly").fetchone() == (50,)
    assert db.execute("SELECT sum(calls) FROM usage_hourly_customer").fetchone() == (50,)


def test_queries_use_the_indexes(log) -> None:
    """Spend by customer or feature reads the hourly rollups, and unpriced calls by tag
    read the partial index, instead of the table."""
    conn, _ = log

    def plan(q: UsageQuery) -> str:
        captured: list[str] = []
        real = sql.fetch_dicts

        def spy(c: Any, sql: str, params: Any = ()) -> list[dict[str, Any]]:
            captured.append(" ".join(str(r[3]) for r in c.execute(
                "EXPLAIN QUERY PLAN " + sql, list(params))))
            return real(c, sql, params)

        sql.fetch_dicts = spy
        try:
            conn.usage(q)
        finally:
            sql.fetch_dicts = real
        return captured[0]

    by_customer = plan(UsageQuery(group_by=["customer"]))
    assert "usage_daily_customer" in by_customer and "SCAN usage " not in by_customer
    by_feature = plan(UsageQuery(group_by=["feature"], since=START + timedelta(days=20)))
    assert "usage_daily" in by_feature and "SCAN usage " not in by_feature
    assert "idx_usage_unpriced_ts" in plan(UsageQuery(where={"priced": "0"},
                                                      group_by=["tag:team"]))
