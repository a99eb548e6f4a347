"""The savings advisor on the demo log plus injected patterns, against hand computations.

The demo (proxy/demo.py: its simulator, the real proxy, 36 calls) writes the log; four
patterns are then injected as rows: a prefix repeated without a cache read, a feature on
an expensive model with short answers, a burst of long calls at 3 am, and a looping agent
trace. Every expected dollar figure is computed below from rates typed from the pricing
tables, with the arithmetic written out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import main
from proxy.demo import _demo
from proxy.forecast import month_bounds
from proxy.storage.row import UsageRow
from proxy.storage.sqlite import SqliteUsageLog
from tests.conftest import VIRTUAL_KEY, Stack, http

ADMIN_ENV = "METERPROXY_TEST_ADVISE_ADMIN"
ADMIN_KEY = "admin-key-for-the-advisor"
M = Decimal(1_000_000)

# pricing/anthropic.yaml, claude-sonnet-4-5 from 2025-09-29: input 3.00, cached_input 0.30,
# cache_write_5m 3.75, cache_write_1h 6.00, output 15.00 (USD per 1M tokens).
SONNET = {"input": Decimal("3.00"), "cached": Decimal("0.30"), "write_5m": Decimal("3.75"),
          "write_1h": Decimal("6.00"), "output": Decimal("15.00")}
# pricing/openai.yaml, gpt-4o from 2024-10-02: input 2.50, cached 1.25, output 10.00.
GPT4O = {"input": Decimal("2.50"), "cached": Decimal("1.25"), "output": Decimal("10.00")}
# gpt-4o-mini from 2024-07-18: input 0.15, cached 0.075, output 0.60.
MINI = {"input": Decimal("0.15"), "cached": Decimal("0.075"), "output": Decimal("0.60")}
# gpt-4.1 from 2025-04-14: input 2.00, output 8.00; its batch tier: input 1.00, output 4.00.
GPT41 = {"input": Decimal("2.00"), "output": Decimal("8.00")}
GPT41_BATCH = {"input": Decimal("1.00"), "output": Decimal("4.00")}
# gpt-4.1-mini from 2025-04-14: input 0.40, cached 0.10, output 1.60; batch 0.20/0.10/0.80.
GPT41_MINI = {"input": Decimal("0.40"), "cached": Decimal("0.10"), "output": Decimal("1.60")}
GPT41_MINI_BATCH = {"input": Decimal("0.20"), "cached": Decimal("0.10"),
                    "output": Decimal("0.80")}
# The overlay below announces gpt-4o-mini at twice its price from ten days ahead.
MINI_NEXT = {"input": Decimal("0.30"), "cached": Decimal("0.15"), "output": Decimal("1.20")}


def usd(rates: dict[str, Decimal], input: int = 0, output: int = 0, cached: int = 0
        ) -> Decimal:
    return (input * rates["input"] + cached * rates.get("cached", 0)
            + output * rates["output"]) / M


def _ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def injected(now: datetime) -> list[UsageRow]:
    rows: list[UsageRow] = []

    def add(when: datetime, provider: str, model: str, feature: str, input: int, output: int,
            cost: Decimal, **extra: Any) -> None:
        rows.append(UsageRow(
            id=f"inj-{len(rows):04d}", ts=_ts(when), duration_ms=extra.pop("duration", 2000.0),
            key_name="demo", provider=provider, endpoint="chat.completions", model=model,
            response_model=model, stream=extra.pop("stream", 1), status=200, outcome="ok",
            input_tokens=input, output_tokens=output, usage_source="provider",
            cost_usd=float(cost), priced=1, customer="acme", feature=feature, **extra))

    day = now.replace(minute=0, second=0, microsecond=0)
    # 1. support on claude-sonnet-4-5: one 5,000-token prefix, 20 calls a minute apart,
    #    never a cache read. 5,200 input (prefix + question), 400 output.
    start = (day - timedelta(days=3)).replace(hour=14)
    for k in range(20):
        add(start + timedelta(minutes=k), "anthropic", "claude-sonnet-4-5", "support", 5200, 400,
            usd(SONNET, 5200, 400), prefix_hash="a" * 32, prefix_tokens=5000)
    # 2. classify on gpt-4o: 30 calls, 800 in, 5 out (short answers), streamed.
    start = (day - timedelta(days=2)).replace(hour=10)
    for k in range(30):
        add(start + timedelta(minutes=10 * k), "openai", "gpt-4o", "classify", 800, 5,
            usd(GPT4O, 800, 5), duration=500.0)
    # 3. nightly-report on gpt-4.1: 12 calls at 3 am, not streamed, 45 s each.
    start = (day - timedelta(days=5)).replace(hour=3)
    for k in range(12):
        add(start + timedelta(minutes=2 * k), "openai", "gpt-4.1", "nightly-report", 3000,
            2000, usd(GPT41, 3000, 2000), stream=0, duration=45_000.0)
    # 4. agent on gpt-4o-mini: four runs of 3 calls, and one that loops for 40 calls.
    start = (day - timedelta(days=4)).replace(hour=9)
    for run in range(4):
        for k in range(3):
            add(start + timedelta(hours=run, seconds=30 * k), "openai", "gpt-4o-mini", "agent",
                1000, 100, usd(MINI, 1000, 100), trace_id=f"agent-{run}")
    start = start.replace(hour=16)
    for k in range(40):
        add(start + timedelta(seconds=15 * k), "openai", "gpt-4o-mini", "agent", 1000, 100,
            usd(MINI, 1000, 100), trace_id="agent-loop", prefix_hash="b" * 32,
            prefix_tokens=800)
    return rows


def _overlay(tables: Path, announced: datetime) -> None:
    """gpt-4o-mini as bundled, plus an announced period (pricing.dir lays it over)."""
    tables.mkdir()
    rates = {"input": 0.15, "cached_input": 0.075, "output": 0.60, "service_tiers": {
        "batch": {"input": 0.075, "cached_input": 0.075, "output": 0.30}}}
    (tables / "openai.yaml").write_text(yaml.safe_dump({
        "provider": "openai", "source": "https://platform.openai.com/docs/pricing",
        "checked": "2026-11-26", "models": {"gpt-4o-mini": {
            "aliases": ["gpt-4o-mini-2024-07-18"], "context_window": 128000,
            "max_output_tokens": 16384, "prices": [
                {"effective_from": "2024-07-18", **rates},
                {"effective_from": announced.date().isoformat(), "input": 0.30,
                 "cached_input": 0.15, "output": 1.20}]}}}))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("advise")
    db = tmp / "usage.db"
    asyncio.run(_demo(db, 36))
    now = datetime.now(UTC)
    log = SqliteUsageLog(f"sqlite:///{db}")
    log.open()
    log.write(injected(now))
    log.close()
    announced = datetime.combine((now + timedelta(days=10)).date(), datetime.min.time(), UTC)
    _overlay(tmp / "tables", announced)
    config = tmp / "advise.yaml"
    config.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{db}"},
                                      "pricing": {"dir": str(tmp / "tables")}}))
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM usage")]
    conn.close()
    return {"tmp": tmp, "db": db, "config": str(config), "rows": rows, "announced": announced}


def run(capsys: pytest.CaptureFixture, *args: str) -> Any:
    assert main(list(args)) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "json" in args else out


# The hand computations of the four recommendations.
# 1. Caching support's prefix: the first call writes it, the 19 later ones (a minute
#    apart, inside 5 minutes) read it. 5-minute lifetime:
#      reads  19 x 5,000 x (3.00 - 0.30) / 1M = 0.2565
#      write   1 x 5,000 x (3.75 - 3.00) / 1M = 0.00375
#      saves 0.2565 - 0.00375 = 0.25275
#    1-hour lifetime: 0.2565 - 5,000 x (6.00 - 3.00) / 1M = 0.2415 (less: 5m is proposed)
CACHE_5M = (19 * 5000 * (SONNET["input"] - SONNET["cached"])
            - 5000 * (SONNET["write_5m"] - SONNET["input"])) / M
CACHE_1H = (19 * 5000 * (SONNET["input"] - SONNET["cached"])
            - 5000 * (SONNET["write_1h"] - SONNET["input"])) / M
# 2. nightly-report on the batch tier: 12 x (3,000 x (2.00 - 1.00) + 2,000 x (8.00 - 4.00))
#    / 1M = 12 x 0.011 = 0.132
BATCH = 12 * (usd(GPT41, 3000, 2000) - usd(GPT41_BATCH, 3000, 2000))
# 3. classify on gpt-4o-mini: 30 x ((800 x 2.50 + 5 x 10.00) - (800 x 0.15 + 5 x 0.60)) / 1M
#    = 30 x (0.00205 - 0.000123) = 0.05781
SMALLER = 30 * (usd(GPT4O, 800, 5) - usd(MINI, 800, 5))
# 4. The looping trace: 40 calls x 0.00021 = 0.0084, against the feature's median run
#    (three calls, 0.00063): 0.0084 - 0.00063 = 0.00777
LOOP = 40 * usd(MINI, 1000, 100) - 3 * usd(MINI, 1000, 100)


def test_hand_computed_figures() -> None:
    """The constants above say what the comments say (the arithmetic, done once more)."""
    figures = (CACHE_5M, CACHE_1H, BATCH, SMALLER, LOOP)
    assert figures == tuple(Decimal(x) for x in ("0.25275", "0.2415", "0.132", "0.05781",
                                                 "0.00777"))


def _ranked(recs: list[dict[str, Any]]) -> list[tuple]:
    return [(r["rank"], r["kind"], r["feature"], Decimal(r["savings_usd"])) for r in recs]


EXPECTED = [(1, "prompt_cache", "support", CACHE_5M), (2, "cheaper_tier", "nightly-report", BATCH),
            (3, "smaller_model", "classify", SMALLER), (4, "looping_trace", "agent", LOOP)]


def test_advise_ranks_the_injected_patterns(world: dict[str, Any],
                                            capsys: pytest.CaptureFixture) -> None:
    """meterproxy advise: the four patterns, in order of the hand-computed dollars."""
    data = run(capsys, "advise", "--config", world["config"], "--format", "json")
    assert _ranked(data["recommendations"]) == EXPECTED
    cache = data["recommendations"][0]
    assert (cache["model"], cache["lifetime"]) == ("claude-sonnet-4-5", "5m")
    assert {k: Decimal(v) for k, v in cache["evidence"]["savings_by_lifetime_usd"].items()} == {
        "5m": CACHE_5M, "1h": CACHE_1H}
    assert cache["evidence"]["repeats"] == 19
    assert cache["evidence"]["median_reuse_interval_s"] == 60
    assert data["recommendations"][1]["tier"] == "batch"
    assert data["recommendations"][2]["target"] == "gpt-4o-mini"
    loop = data["recommendations"][3]
    assert loop["trace_id"] == "agent-loop" and loop["evidence"]["same_prefix_calls"] == 40
    assert Decimal(data["savings_usd"]) == CACHE_5M + BATCH + SMALLER + LOOP
    assert data["anomalies"] == []  # the guardrail's table: nothing open in this log
    text = run(capsys, "advise", "--config", world["config"])
    assert "1. saves $0.252750  [prompt_cache]" in text
    assert "4. saves $0.007770  [looping_trace]" in text


def test_price_calendar_and_its_forecast_effect(world: dict[str, Any],
                                                capsys: pytest.CaptureFixture) -> None:
    """The announced gpt-4o-mini price doubles its calls' cost from its date: the effect on
    this and next month is the model's daily spend x 100% x the days after the change."""
    data = run(capsys, "advise", "--config", world["config"], "--format", "json")
    (item,) = data["calendar"]
    announced = world["announced"]
    assert (item["model"], item["effective_from"]) == ("gpt-4o-mini",
                                                       announced.date().isoformat())
    mini = [r for r in world["rows"] if r["model"] == "gpt-4o-mini"]
    now_usd = sum(usd(MINI, r["input_tokens"], r["output_tokens"], r["cached_input_tokens"])
                  for r in mini)
    then_usd = sum(usd(MINI_NEXT, r["input_tokens"], r["output_tokens"],
                       r["cached_input_tokens"]) for r in mini)
    assert Decimal(item["window_cost_usd"]) == now_usd
    assert then_usd == 2 * now_usd and Decimal(item["change_pct"]) == 100
    daily = now_usd / 30  # the window is 30 days
    month_end = month_bounds(datetime.now(UTC))[1]
    next_end = month_bounds(month_end)[1]
    this_days = max((month_end - announced).days, 0)
    next_days = (next_end - max(announced, month_end)).days
    assert Decimal(item["this_month_effect_usd"]) == (daily * this_days).quantize(
        Decimal("1e-6"))
    assert Decimal(item["next_month_effect_usd"]) == (daily * next_days).quantize(
        Decimal("1e-6"))


@pytest.mark.parametrize("tier", [None, "batch"])
def test_whatif_matches_hand_repricing(world: dict[str, Any], capsys: pytest.CaptureFixture,
                                       tier: str | None) -> None:
    """whatif --map gpt-4o=gpt-4.1-mini: each feature's difference is its gpt-4o calls'
    tokens at gpt-4.1-mini's rates (batch: its batch rates) minus at gpt-4o's."""
    args = ["whatif", "--config", world["config"], "--map", "gpt-4o=gpt-4.1-mini",
            *(["--tier", tier] if tier else [])]
    data = run(capsys, *args, "--format", "json")
    target = GPT41_MINI_BATCH if tier else GPT41_MINI
    expected: dict[str, Decimal] = {}
    counts: dict[str, int] = {}
    for r in world["rows"]:
        if r["model"] != "gpt-4o":
            continue
        tokens = (r["input_tokens"] - r["cached_input_tokens"], r["output_tokens"],
                  r["cached_input_tokens"])
        expected[r["feature"]] = expected.get(r["feature"], Decimal(0)) + (
            usd(target, *tokens) - usd(GPT4O, *tokens))
        counts[r["feature"]] = counts.get(r["feature"], 0) + 1
    got = {f["feature"]: Decimal(f["delta_usd"]) for f in data["features"]
           if f["repriced"]}
    assert got == expected
    assert {f["feature"]: f["repriced"] for f in data["features"] if f["repriced"]} == counts
    assert got["classify"] == 30 * (usd(target, 800, 5) - usd(GPT4O, 800, 5))
    assert Decimal(data["total"]["delta_usd"]) == sum(expected.values())
    text = run(capsys, *args)
    assert "What if gpt-4o -> gpt-4.1-mini" in text and "classify" in text


def test_whatif_refuses_an_unknown_model(world: dict[str, Any],
                                         capsys: pytest.CaptureFixture) -> None:
    """A target no table prices is one line on stderr, exit 2."""
    assert main(["whatif", "--config", world["config"], "--map", "gpt-4o=gpt-nonesuch"]) == 2
    assert "gpt-nonesuch" in capsys.readouterr().err


def test_admin_endpoint_and_dashboard(world: dict[str, Any],
                                      capsys: pytest.CaptureFixture) -> None:
    """GET /_meter/advise through the real server gives the same ranking; only the admin
    key opens it (a tenant's virtual key reads no one's advice); the dashboard shows it."""
    os.environ[ADMIN_ENV] = ADMIN_KEY
    stack = Stack(world["tmp"], {"server": {"admin_key_env": ADMIN_ENV},
                                 "pricing": {"dir": str(world["tmp"] / "tables")}})
    try:
        url = f"{stack.url}/_meter/advise"
        reply = http("GET", url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert reply.status_code == 200
        assert _ranked(reply.json()["recommendations"]) == EXPECTED
        for headers in ({}, {"Authorization": f"Bearer {VIRTUAL_KEY}"}):
            denied = http("GET", url, headers=headers)
            assert denied.status_code == 401 and b"support" not in denied.content
        bad = http("GET", f"{url}?format=xml", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert bad.status_code == 400
        page = http("GET", f"{stack.url}/_meter/",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert page.status_code == 200 and b"Savings advice" in page.content
        assert b"Cache the repeated prompt prefix of support" in page.content
    finally:
        stack.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_same_advice_from_both_backends(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        backend: str) -> None:
    """The injected patterns alone, in a SQLite file and in PostgreSQL: the same four
    recommendations and the same dollars (PostgreSQL keeps exact NUMERIC costs)."""
    from contextlib import nullcontext

    from proxy.storage import open_usage_log
    from tests.scale import pg_database

    context = pg_database() if backend == "postgresql" else nullcontext(
        f"sqlite:///{tmp_path / 'usage.db'}")
    with context as url:
        log = open_usage_log(url, spool_dir=str(tmp_path / "spool"))
        log.open()
        log.write(injected(datetime.now(UTC)))
        log.close()
        config = tmp_path / "advise.yaml"
        config.write_text(yaml.safe_dump({"storage": {"usage_log": url}}))
        data = run(capsys, "advise", "--config", str(config), "--format", "json")
    assert _ranked(data["recommendations"]) == EXPECTED
    assert data["window"]["calls"] == 20 + 30 + 12 + 52


def test_caching_that_loses_money(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """1-hour cache writes two hours apart are never read: each write pays the premium.
    Hand: 3 x 5,000 x (6.00 - 3.00) / 1M = 0.045 lost (claude-sonnet-4-5 rates above)."""
    now = datetime.now(UTC)
    rows = [UsageRow(id=f"faq-{k}", ts=_ts(now - timedelta(hours=2 * k + 1)), key_name="k",
                     provider="anthropic", endpoint="messages", model="claude-sonnet-4-5",
                     status=200, input_tokens=200, cache_write_tokens=5000,
                     cache_write_1h_tokens=5000, output_tokens=100, feature="faq",
                     cost_usd=float((200 * SONNET["input"] + 5000 * SONNET["write_1h"]
                                     + 100 * SONNET["output"]) / M), prefix_hash="c" * 32,
                     prefix_tokens=5000) for k in range(3)]
    db = tmp_path / "usage.db"
    log = SqliteUsageLog(f"sqlite:///{db}")
    log.open()
    log.write(rows)
    log.close()
    config = tmp_path / "advise.yaml"
    config.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{db}"}}))
    data = run(capsys, "advise", "--config", str(config), "--format", "json")
    loss = 3 * 5000 * (SONNET["write_1h"] - SONNET["input"]) / M
    assert [(r["kind"], r["feature"], Decimal(r["savings_usd"]))
            for r in data["recommendations"]] == [("cache_loss", "faq", loss)]
    (use,) = data["caching"]
    assert (Decimal(use["saved_usd"]), Decimal(use["hit_rate"])) == (-loss, 0)
