"""Rate limits on the Redis ledger: exact across three `meterproxy serve` processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import openai
import pytest
import redis

from proxy.simulator import Scenario
from proxy.storage import open_ledger
from proxy.storage.ledger import Window
from proxy.storage.redis_ledger import RedisLedger
from tests.conftest import KEY_ENV, VIRTUAL_KEY, free_port, sha
from tests.scale import (
    ADMIN_ENV,
    ProxyProcess,
    SimServer,
    chat_as,
    pg_database,
    pg_rows,
    redis_prefix,
    redis_url,
    wait_for,
    write_config,
)
from tests.test_rate_limits import MAX_TOKENS, PROMPT, prompt_tokens, usage

REQUESTS_N = 7
USD_K = 4


def estimate_usd() -> Decimal:
    """A call's hold: its prompt plus max_tokens at gpt-4o-mini's $0.15 / $0.60 per 1M."""
    return (prompt_tokens() * Decimal("0.15") + MAX_TOKENS * Decimal("0.60")) / 1_000_000


@dataclass
class Trio:
    sim: SimServer
    pg_url: str
    procs: list[ProxyProcess]


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    tmp = tmp_path_factory.mktemp("ratelimits")
    with pg_database() as pg_url, redis_prefix() as prefix:
        sim = SimServer()
        config = write_config(tmp / "meterproxy.yaml", {
            "server": {"admin_key_env": ADMIN_ENV},
            "storage": {"usage_log": pg_url, "ledger": f"{redis_url()}?prefix={prefix}",
                        "flush_interval_ms": 20, "spool_dir": str(tmp / "spool")},
            "providers": {"openai": {"base_url": sim.url, "api_key_env": KEY_ENV}},
            "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}],
            "rate_limits": [
                {"name": "burst-rph", "scope": {"customer": "burst"}, "per": "hour",
                 "requests": REQUESTS_N},
                {"name": "usd-rph", "scope": {"customer": "dollars"}, "per": "hour",
                 "usd": float(USD_K * estimate_usd() + estimate_usd() / 2)},
            ],
            "logging": {"format": "json"},
        })
        procs = [ProxyProcess(config, free_port(), tmp / f"serve-{i}.log") for i in range(3)]
        try:
            for proc in procs:
                proc.wait_ready()
            yield Trio(sim, pg_url, procs)
        finally:
            for proc in procs:
                proc.stop()
            sim.close()


async def _chat(url: str, customer: str) -> Any:
    return await chat_as(url, customer, PROMPT, MAX_TOKENS)


def _burst(t: Trio, customer: str, calls: int) -> list[Any]:
    async def go() -> list[Any]:
        return await asyncio.gather(*(_chat(t.procs[i % 3].url, customer)
                                      for i in range(calls)), return_exceptions=True)
    return asyncio.run(go())


def test_requests_exact_across_three_processes(trio: Trio) -> None:
    """60 concurrent calls spread over three processes on one Redis: exactly the 7 the
    window allows reach the provider; 53 get the rate_limited 429 with a Retry-After
    within the hour; PostgreSQL has one row for each of the 60."""
    t, calls = trio, 60
    before = len(t.sim.sim.received)
    t.sim.sim.then(Scenario(usage=usage(), hang_s=0.2, repeat=REQUESTS_N))
    results = _burst(t, "burst", calls)
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(admitted) == REQUESTS_N and len(refused) == calls - REQUESTS_N, results
    assert len(t.sim.sim.received) - before == REQUESTS_N
    assert all(e.body["code"] == "rate_limited" for e in refused)
    assert all(1 <= int(e.response.headers["retry-after"]) <= 3600 for e in refused)
    assert all("x-should-retry" not in e.response.headers for e in refused)
    # Identical refusals on one instance within a second are one row counting them.
    rows = wait_for(lambda: (r := pg_rows(t.pg_url, "customer = %s", ("burst",)))
                    and sum(x["repeat_count"] for x in r) >= calls and r,
                    what="rows for 60 calls in PostgreSQL")
    outcomes = sorted(r["outcome"] for r in rows for _ in range(r["repeat_count"]))
    assert outcomes == ["ok"] * REQUESTS_N + ["rate_limited"] * (calls - REQUESTS_N)


def test_usd_window_exact_across_three_processes(trio: Trio) -> None:
    """A USD window with room for 4.5 estimates: of 30 concurrent calls (each held at its
    estimate while it runs) exactly 4 pass, whichever process they reach."""
    t, calls = trio, 30
    before = len(t.sim.sim.received)
    # Each admitted call holds its estimate until it settles at its (smaller) actual cost,
    # which frees room: the provider hangs long enough that no call settles before all 30
    # have been decided, even on a loaded box (0.3 s once let a fifth call in).
    t.sim.sim.then(Scenario(usage=usage(), hang_s=4.0, repeat=USD_K))
    results = _burst(t, "dollars", calls)
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert len(admitted) == USD_K, results
    assert len(t.sim.sim.received) - before == USD_K


@pytest.fixture
def ledger_url() -> Iterator[str]:
    with redis_prefix() as prefix:
        yield f"{redis_url()}?prefix={prefix}"


def _window(tokens: int, max_tokens: int | None = None, max_requests: int | None = None,
            span_ms: int = 60_000) -> Window:
    return Window(key="w", span_ms=span_ms, tokens=tokens, usd=Decimal("0.001"),
                  max_requests=max_requests, max_tokens=max_tokens, max_usd=None)


def test_redis_window_settles_waits_and_expires(ledger_url: str) -> None:
    """On Redis: a settle replaces an entry's estimate by the actual tokens; a refusal's wait
    is the oldest entry's time left in the window (by Redis's clock); a call over the
    maximum alone is never admitted; the window's keys expire after it."""
    async def go() -> None:
        ledger = open_ledger(ledger_url)
        assert isinstance(ledger, RedisLedger)
        await ledger.seed({})
        try:
            first = await ledger.reserve("a", [], 60, [_window(100, max_tokens=150)])
            assert first.limited is None
            full = await ledger.reserve("b", [], 60, [_window(100, max_tokens=150)])
            assert full.limited is not None
            assert full.retry_after_s is not None and 0 < full.retry_after_s <= 60
            await ledger.settle("a", Decimal("0.0002"), 40)
            await ledger.settle("a", Decimal("0.0002"), 40)  # a retried settle: no change
            assert (await ledger.reserve("b", [], 60, [_window(100, max_tokens=150)])
                    ).limited is None  # 40 + 100 fits
            never = await ledger.reserve("c", [], 60, [_window(151, max_tokens=150)])
            assert never.limited is not None and never.retry_after_s is None
            client = redis.Redis.from_url(redis_url(), decode_responses=True)
            try:
                sums = client.hgetall(f"{ledger.prefix}ws:w")
                assert sums == {"tok": "140", "usd": str(10_000_000 + 2_000_000)}
                assert 60_000 < client.pttl(f"{ledger.prefix}w:w") <= 120_000
                assert 60_000 < client.pttl(f"{ledger.prefix}ws:w") <= 120_000
            finally:
                client.close()
        finally:
            await ledger.close()

    asyncio.run(go())


def test_redis_requests_wait_is_read_from_the_window(ledger_url: str) -> None:
    """3 per second: a 4th is told to wait under a second, and is admitted once it has."""
    async def go() -> None:
        ledger = open_ledger(ledger_url)
        await ledger.seed({})
        try:
            for i in range(3):
                assert (await ledger.reserve(f"r{i}", [], 60, [
                    _window(0, max_requests=3, span_ms=1000)])).limited is None
            over = await ledger.reserve("r3", [], 60, [_window(0, max_requests=3,
                                                                span_ms=1000)])
            assert over.limited is not None and 0 < over.retry_after_s <= 1
            await asyncio.sleep(over.retry_after_s)
            assert (await ledger.reserve("r3", [], 60, [
                _window(0, max_requests=3, span_ms=1000)])).limited is None
        finally:
            await ledger.close()

    asyncio.run(go())
