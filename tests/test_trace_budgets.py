"""Per-trace budgets: each agent run (trace id) its own budget, through the real server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from proxy.simulator import Scenario
from proxy.storage import open_ledger
from proxy.storage.ledger import Hold, LocalLedger
from proxy.storage.redis_ledger import RedisLedger
from tests.conftest import VIRTUAL_KEY, Stack, sha
from tests.scale import redis_prefix, redis_url
from tests.test_budgets import call_cost, chat, exact_usage

K = 3  # calls one run may make
T0 = datetime(2026, 5, 4, 9, 0, 0, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def trace_stack(tmp: Path, clock: object = None) -> Stack:
    """$ for K calls and a half per trace; the customer's month has room for 20 calls."""
    cost = call_cost()
    return Stack(tmp, {"budgets": [
        {"name": "per-run", "scope": {"trace": "*"}, "period": "total",
         "limit_usd": float(K * cost + cost / 2)},
        {"name": "acme-month", "scope": {"customer": "acme"}, "period": "month",
         "limit_usd": float(20 * cost)},
    ]}, clock=clock)


def test_a_looping_run_is_refused_at_its_limit_and_nothing_else_is(tmp_path: Path) -> None:
    """Each call costs (P x $0.15 + 100 x $0.60) / 1M (gpt-4o-mini; the fake provider
    reports exactly the estimate). Run-1 loops: calls 1-3 pass, the 4th is refused with
    budget_exceeded naming its trace and no Retry-After (a run's budget never resets).
    Run-2 (X-Meter-Trace-Id), a W3C traceparent run and acme's calls without a trace id
    still pass; acme's month is charged for every admitted call and nothing else."""
    cost = call_cost()
    stack = trace_stack(tmp_path)
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=20))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        run1 = {"X-Meter-Customer": "acme", "X-Meter-Trace-Id": "run-1"}
        for _ in range(K):
            assert chat(client, **run1).status_code == 200
        with pytest.raises(openai.RateLimitError) as err:
            chat(client, **run1)
        assert err.value.body["code"] == "budget_exceeded"
        assert "trace=run-1" in err.value.body["message"]
        assert "per-run" in err.value.body["message"]
        assert "retry-after" not in err.value.response.headers
        assert err.value.response.headers["x-should-retry"] == "false"
        assert chat(client, **{"X-Meter-Customer": "acme",
                               "X-Meter-Trace-Id": "run-2"}).status_code == 200
        assert chat(client, **{"X-Meter-Customer": "acme",
                               "traceparent": TRACEPARENT}).status_code == 200
        # No trace id: the per-trace budget does not apply (documented), the customer's does.
        for _ in range(K + 1):
            assert chat(client, **{"X-Meter-Customer": "acme"}).status_code == 200
        rows = stack.rows(4 + 2 + K + 1)
        assert [(r["trace_id"], r["outcome"]) for r in rows[:6]] == [
            ("run-1", "ok")] * K + [("run-1", "budget_exceeded"), ("run-2", "ok"),
                                    ("4bf92f3577b34da6a3ce929d0e0e4736", "ok")]
        assert all(r["trace_id"] is None and r["outcome"] == "ok" for r in rows[6:])
        status = {r["scope"]: r for r in stack.call(stack.runtime.budgets.status())}
        admitted = K + 2 + K + 1
        assert status["customer=acme"]["spent_usd"] == admitted * cost
        assert not any(scope.startswith("trace=") for scope in status)  # not listed
    finally:
        stack.close()


def test_rotating_trace_ids_escape_the_run_budget_but_not_the_keys(tmp_path: Path) -> None:
    """The attacker's move: a new trace id on every call. No run budget ever fills (what
    docs/budgets.md says it does not guarantee); a budget on the key still stops the
    spend at exactly its 5 calls."""
    cost = call_cost()
    stack = Stack(tmp_path, {"budgets": [
        {"scope": {"trace": "*"}, "period": "total", "limit_usd": float(K * cost + cost / 2)},
    ], "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY),
                 "budgets": [{"period": "day", "limit_usd": float(5 * cost + cost / 2)}]}]})
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=20))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for i in range(5):
            assert chat(client, **{"X-Meter-Trace-Id": f"rotated-{i}"}).status_code == 200
        with pytest.raises(openai.RateLimitError) as err:
            chat(client, **{"X-Meter-Trace-Id": "rotated-5"})
        assert "key=team-a" in err.value.body["message"]
    finally:
        stack.close()


def _spend_run_then_stop(stack: Stack, run: dict[str, str]) -> None:
    """K calls of one run (its whole budget), their rows written, then the stack stopped."""
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=20))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for _ in range(K):
            chat(client, **run)
        stack.rows(K)
    finally:
        stack.close()


def test_a_runs_spend_survives_a_restart(tmp_path: Path) -> None:
    """The local ledger rebuilds a run's spend from the usage log: after a restart the run
    that spent its budget is still refused, another run is not."""
    stack = trace_stack(tmp_path)
    run1 = {"X-Meter-Trace-Id": "run-1"}
    _spend_run_then_stop(stack, run1)
    again = trace_stack(tmp_path)
    try:
        again.sim.then(Scenario(usage=exact_usage(), repeat=20))
        client = openai.OpenAI(base_url=again.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            chat(client, **run1)
        assert chat(client, **{"X-Meter-Trace-Id": "run-3"}).status_code == 200
    finally:
        again.close()


def test_an_idle_run_is_forgotten_after_a_day(tmp_path: Path) -> None:
    """A `total` per-trace budget's counters go a day after the run's last call (else one
    per run would pile up): a spent run is refused 23 h later, and starts afresh 25 h
    after its last call (documented)."""
    now = [T0]
    stack = trace_stack(tmp_path, clock=lambda: now[0])
    run1 = {"X-Meter-Trace-Id": "run-1"}
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=20))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for _ in range(K):
            chat(client, **run1)
        stack.settle()
        now[0] = T0 + timedelta(hours=23)
        with pytest.raises(openai.RateLimitError):
            chat(client, **run1)
        now[0] = T0 + timedelta(hours=25)
        assert chat(client, **run1).status_code == 200
    finally:
        stack.close()


def test_local_ledger_drops_idle_trace_counters() -> None:
    """Many runs do not grow the local ledger for ever: an idle trace's counters go at the
    next sweep once its idle time has passed, and a held (running) one never does."""
    async def go() -> None:
        ledger = LocalLedger()
        hold = Hold(key="per-run:trace=r1/total@1970-01-01T00:00Z", usd=Decimal("0.01"),
                    tokens=5, limit_usd=Decimal(1), limit_tokens=None, block=True,
                    period_end=None, idle_s=3600)
        running = Hold(key="per-run:trace=r2/total@1970-01-01T00:00Z", usd=Decimal("0.01"),
                       tokens=5, limit_usd=Decimal(1), limit_tokens=None, block=True,
                       period_end=None, idle_s=3600)
        await ledger.reserve("c1", [hold], 60, now=T0)
        await ledger.settle("c1", Decimal("0.01"), 5)
        await ledger.reserve("c2", [running], 60, now=T0)
        await ledger.reserve("c3", [], 60, now=T0 + timedelta(seconds=3601))  # sweeps
        balances = ledger._balances
        assert hold.key not in balances and running.key in balances

    asyncio.run(go())


def test_redis_trace_counters_expire_when_idle() -> None:
    """On Redis a `total` per-trace budget's keys expire its idle time after the last call
    (a calendar budget's expire after its period; an ordinary `total` one never)."""
    async def go(url: str) -> None:
        ledger = open_ledger(url)
        assert isinstance(ledger, RedisLedger)
        await ledger.seed({})
        try:
            hold = Hold(key="per-run:trace=r1/total@1970-01-01T00:00Z", usd=Decimal("0.01"),
                        tokens=5, limit_usd=Decimal(1), limit_tokens=None, block=True,
                        period_end=None, idle_s=86_400)
            assert (await ledger.reserve("c1", [hold], 60)).refused is None
            ttl = await ledger.redis.pttl(f"{ledger.prefix}b:{hold.key}")
            assert 86_300_000 < ttl <= 86_400_000
            await ledger.settle("c1", Decimal("0.01"), 5)
            ttl = await ledger.redis.pttl(f"{ledger.prefix}b:{hold.key}")
            assert 86_300_000 < ttl <= 86_400_000
        finally:
            await ledger.close()

    with redis_prefix() as prefix:
        asyncio.run(go(f"{redis_url()}?prefix={prefix}"))


def test_runs_rebuilt_at_start_are_forgotten_too(tmp_path: Path) -> None:
    """A run rebuilt from the usage log at start-up is still refused, and its counters go
    a day later like a live run's (else every restart would pin a day of runs)."""
    now = [T0]
    run1 = {"X-Meter-Trace-Id": "run-1"}
    stack = trace_stack(tmp_path, clock=lambda: now[0])
    _spend_run_then_stop(stack, run1)
    now[0] = T0 + timedelta(hours=1)
    again = trace_stack(tmp_path, clock=lambda: now[0])
    try:
        again.sim.then(Scenario(usage=exact_usage(), repeat=20))
        client = openai.OpenAI(base_url=again.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            chat(client, **run1)
        ledger = again.runtime.budgets.ledger
        seeded = [k for k in ledger._balances if "trace=run-1" in k]
        assert len(seeded) == 1
        now[0] = T0 + timedelta(hours=26)
        assert chat(client, **{"X-Meter-Trace-Id": "run-9"}).status_code == 200  # sweeps
        assert seeded[0] not in ledger._balances
    finally:
        again.close()


def test_redis_seeded_trace_counters_expire_when_idle() -> None:
    """A per-trace `total` budget seeded from the log on Redis expires after its idle time;
    any other seeded period keeps the 40-day seed TTL."""
    async def go(url: str) -> None:
        ledger = open_ledger(url)
        assert isinstance(ledger, RedisLedger)
        try:
            run, other = "per-run:trace=r1/total@1970-01-01T00:00Z", "m:customer=a/month@x"
            await ledger.seed({run: (Decimal("0.5"), 10), other: (Decimal("1"), 2)},
                              {run: 86_400})
            assert 86_300_000 < await ledger.redis.pttl(f"{ledger.prefix}b:{run}") <= 86_400_000
            assert await ledger.redis.pttl(f"{ledger.prefix}b:{other}") > 39 * 86_400_000
            assert (await ledger.balances([run]))[run].spent_usd == Decimal("0.5")
        finally:
            await ledger.close()

    with redis_prefix() as prefix:
        asyncio.run(go(f"{redis_url()}?prefix={prefix}"))
