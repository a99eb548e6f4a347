"""Rate limits through the real server: exact admission, true Retry-After, provider shapes.

Every count here uses max_retries=0: the official SDKs retry a 429 by default, and a
rate-limited 429 is meant to be retried (it has no `x-should-retry: false`).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from proxy import tokens
from proxy.config import ConfigError, parse_settings
from proxy.simulator import Scenario
from proxy.storage.ledger import LocalLedger, Window
from tests.conftest import OTHER_KEY, VIRTUAL_KEY, Stack, http

PROMPT = "How many calls may the search team make per minute?"
MAX_TOKENS = 100
ACTUAL_OUTPUT = 10  # what the fake provider reports: far less than the allowance
T0 = datetime(2026, 5, 4, 9, 0, 0, tzinfo=UTC)


class Clock:
    """The proxy's injectable clock: a test moves it by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


def prompt_tokens() -> int:
    """The chat prompt as OpenAI's cookbook counts it: 3 per message, 3 for the reply."""
    return 3 + 3 + tokens.count_text("user") + tokens.count_text(PROMPT)


def usage() -> dict[str, int]:
    p = prompt_tokens()
    return {"prompt_tokens": p, "completion_tokens": ACTUAL_OUTPUT,
            "total_tokens": p + ACTUAL_OUTPUT}


ADMIN_KEY = "rate-limit-admin-key"
ADMIN_ENV = "METERPROXY_TEST_RATE_ADMIN"


def rate_stack(tmp: Path, limits: list[dict], clock: Any = None, **extra: Any) -> Stack:
    os.environ[ADMIN_ENV] = ADMIN_KEY
    return Stack(tmp, {"rate_limits": limits, "server": {"admin_key_env": ADMIN_ENV},
                       **extra}, clock=clock)


def metrics(stack: Stack) -> str:
    return http("GET", f"{stack.url}/metrics", None,
                {"Authorization": f"Bearer {ADMIN_KEY}"}).content.decode()


def chat(client: openai.OpenAI, **headers: str) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}], extra_headers=headers)


def client(stack: Stack, key: str = VIRTUAL_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base(), api_key=key, max_retries=0)


def test_five_a_minute_admits_five_and_tells_the_true_wait(tmp_path: Path) -> None:
    """5 requests per sliding minute: calls at 0, 1, 2, 3, 4 s pass; at 10.5 s the 6th is a
    429 the SDK sees as rate_limited, Retry-After 50 (the call at 0 s leaves the window at
    60 s: 60 - 10.5 = 49.5, rounded up); at 60 s one call fits again, and the next is told
    1 s (the call at 1 s leaves at 61 s). Another key is not limited."""
    clock = Clock()
    stack = rate_stack(tmp_path, [{"name": "search-rpm", "scope": {"key": "team-a"},
                                   "per": "minute", "requests": 5}], clock=clock)
    try:
        stack.sim.then(Scenario(usage=usage(), repeat=20))
        a = client(stack)
        for second in range(5):
            clock.at(second)
            assert chat(a).status_code == 200
        clock.at(10.5)
        with pytest.raises(openai.RateLimitError) as err:
            chat(a)
        assert err.value.status_code == 429
        assert err.value.body["type"] == "rate_limited"
        assert err.value.body["code"] == "rate_limited"
        assert "search-rpm" in err.value.body["message"]
        headers = err.value.response.headers
        assert headers["retry-after"] == "50"
        assert "x-should-retry" not in headers  # retryable, unlike a budget refusal
        assert chat(client(stack, OTHER_KEY)).status_code == 200  # team-b has no limit
        clock.at(60)
        assert chat(a).status_code == 200
        with pytest.raises(openai.RateLimitError) as err:
            chat(a)
        assert err.value.response.headers["retry-after"] == "1"
        assert len(stack.sim.received) == 7
        rows = stack.rows(9)
        assert [(r["key_name"], r["outcome"], r["status"]) for r in rows] == [
            ("team-a", "ok", 200)] * 5 + [("team-a", "rate_limited", 429),
                                          ("team-b", "ok", 200), ("team-a", "ok", 200),
                                          ("team-a", "rate_limited", 429)]
        refused = [r for r in rows if r["outcome"] == "rate_limited"]
        assert all(r["cost_usd"] == 0 and r["model"] == "gpt-4o-mini" for r in refused)
        text = metrics(stack)
        assert 'meterproxy_rate_limited_total{limit="search-rpm"} 2' in text
        assert 'outcome="rate_limited"} 2' in text
    finally:
        stack.close()


def test_sdk_retries_a_rate_limited_call_by_default(tmp_path: Path) -> None:
    """With its default retries the OpenAI SDK waits the Retry-After and tries again (this
    is intended: the window then admits it); a Retry-After over its 120 s cap it does not
    wait for. Every attempt is a row."""
    stack = rate_stack(tmp_path, [{"scope": {"key": "team-a"}, "per": "second",
                                   "requests": 1},
                                  {"scope": {"key": "team-b"}, "per": "hour",
                                   "requests": 1}])
    try:
        stack.sim.then(Scenario(usage=usage(), repeat=5))
        retrying = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=2)
        assert chat(retrying).status_code == 200
        assert chat(retrying).status_code == 200  # 429, Retry-After: 1, then admitted
        hourly = openai.OpenAI(base_url=stack.base(), api_key=OTHER_KEY, max_retries=2)
        assert chat(hourly).status_code == 200
        with pytest.raises(openai.RateLimitError) as err:
            chat(hourly)
        assert int(err.value.response.headers["retry-after"]) > 120
        rows = stack.rows(5)
        assert [(r["key_name"], r["outcome"]) for r in rows] == [
            ("team-a", "ok"), ("team-a", "rate_limited"), ("team-a", "ok"),
            ("team-b", "ok"), ("team-b", "rate_limited")]
    finally:
        stack.close()


def test_tokens_count_the_estimate_until_the_call_settles_then_the_actual(
        tmp_path: Path) -> None:
    """A token window holds each call's estimate (prompt + max_tokens) while it runs and its
    actual tokens once settled. With room for 3 actual calls plus one estimate, 4 calls made
    one after another pass (3 would if estimates stayed), and the 5th waits for the first
    call to leave: 60 - 5 = 55 s."""
    p = prompt_tokens()
    estimate, actual = p + MAX_TOKENS, p + ACTUAL_OUTPUT
    limit = 3 * actual + estimate
    clock = Clock()
    stack = rate_stack(tmp_path, [{"name": "tpm", "scope": {"customer": "acme"},
                                   "per": "minute", "tokens": limit}], clock=clock)
    try:
        stack.sim.then(Scenario(usage=usage(), repeat=10))
        a = client(stack)
        for second in range(4):
            clock.at(second)
            assert chat(a, **{"X-Meter-Customer": "acme"}).status_code == 200
            stack.settle()
        clock.at(5)
        with pytest.raises(openai.RateLimitError) as err:
            chat(a, **{"X-Meter-Customer": "acme"})
        assert err.value.response.headers["retry-after"] == "55"
        assert err.value.body["code"] == "rate_limited"
        assert f"{limit:,} tokens per minute" in err.value.body["message"]
        assert chat(a).status_code == 200  # no customer: the limit does not apply
    finally:
        stack.close()


def test_usd_limit_per_hour_exact_to_the_cost(tmp_path: Path) -> None:
    """$ per hour: calls cost (P x $0.15 + 10 x $0.60) / 1M each (gpt-4o-mini's table),
    held at (P x $0.15 + 100 x $0.60) / 1M while running. Room for 2 actual + 1 estimate:
    3 pass; the 4th waits until the first leaves the hour (3600 - 30 = 3570 s)."""
    p = prompt_tokens()
    per_m = Decimal(1_000_000)
    actual = (p * Decimal("0.15") + ACTUAL_OUTPUT * Decimal("0.60")) / per_m
    estimate = (p * Decimal("0.15") + MAX_TOKENS * Decimal("0.60")) / per_m
    limit = 2 * actual + estimate
    clock = Clock()
    stack = rate_stack(tmp_path, [{"name": "usd-hour", "scope": {"key": "team-a"},
                                   "per": "hour", "usd": float(limit)}], clock=clock)
    try:
        stack.sim.then(Scenario(usage=usage(), repeat=10))
        a = client(stack)
        for second in (0, 10, 20):
            clock.at(second)
            assert chat(a).status_code == 200
            stack.settle()
        clock.at(30)
        with pytest.raises(openai.RateLimitError) as err:
            chat(a)
        assert err.value.response.headers["retry-after"] == "3570"
        rows = stack.rows(4)
        assert [Decimal(str(r["cost_usd"])) for r in rows[:3]] == [actual] * 3
    finally:
        stack.close()


def test_star_scope_gives_each_customer_its_own_window(tmp_path: Path) -> None:
    """customer: "*", 2 a minute: acme's third call is refused, globex's two still pass,
    from either key; a call naming no customer is not limited by it."""
    stack = rate_stack(tmp_path, [{"scope": {"customer": "*"}, "per": "minute",
                                   "requests": 2}])
    try:
        stack.sim.then(Scenario(usage=usage(), repeat=20))
        a, b = client(stack), client(stack, OTHER_KEY)
        chat(a, **{"X-Meter-Customer": "acme"})
        chat(b, **{"X-Meter-Customer": "acme"})
        with pytest.raises(openai.RateLimitError) as err:
            chat(a, **{"X-Meter-Customer": "acme"})
        assert "customer=acme" in err.value.body["message"]
        assert "globex" not in err.value.body["message"]
        chat(a, **{"X-Meter-Customer": "globex"})
        chat(b, **{"X-Meter-Customer": "globex"})
        with pytest.raises(openai.RateLimitError):
            chat(b, **{"X-Meter-Customer": "globex"})
        for _ in range(3):
            chat(a)
        rows = stack.rows(9)
        assert [(r["customer"], r["outcome"]) for r in rows] == [
            ("acme", "ok"), ("acme", "ok"), ("acme", "rate_limited"),
            ("globex", "ok"), ("globex", "ok"), ("globex", "rate_limited"),
            (None, "ok"), (None, "ok"), (None, "ok")]
        text = metrics(stack)
        assert 'meterproxy_rate_limited_total{limit="rate_limits[0]"} 2' in text
        assert "acme" not in text and "globex" not in text
    finally:
        stack.close()


def test_anthropic_and_gemini_shapes(tmp_path: Path) -> None:
    """Anthropic's error.type rate_limited, Gemini's RESOURCE_EXHAUSTED with a message that
    says rate_limited; both with Retry-After and no x-should-retry."""
    stack = rate_stack(tmp_path, [{"scope": {"key": "team-a"}, "per": "minute",
                                   "requests": 1}])
    try:
        stack.sim.then(Scenario(repeat=5))
        claude = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                     max_retries=0)
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                               messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError) as err:
            claude.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                                   messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["type"] == "error"
        assert err.value.body["error"]["type"] == "rate_limited"
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
        assert "x-should-retry" not in err.value.response.headers
        gclient = genai.Client(api_key=VIRTUAL_KEY, http_options=genai_types.HttpOptions(
            base_url=f"{stack.url}/gemini"))
        with pytest.raises(genai_errors.ClientError) as gerr:
            gclient.models.generate_content(model="gemini-2.5-flash", contents="hi")
        assert gerr.value.code == 429 and gerr.value.status == "RESOURCE_EXHAUSTED"
        assert gerr.value.message.startswith("rate_limited:")
        assert len(stack.sim.received) == 1
        rows = stack.rows(3)
        assert [(r["provider"], r["outcome"]) for r in rows] == [
            ("anthropic", "ok"), ("anthropic", "rate_limited"), ("gemini", "rate_limited")]
    finally:
        stack.close()


def test_a_call_larger_than_the_window_is_refused_for_good(tmp_path: Path) -> None:
    """A call whose estimate alone is over the token maximum can never be admitted: the 429
    says so, with x-should-retry: false and no Retry-After, so no SDK retries it."""
    stack = rate_stack(tmp_path, [{"scope": {"key": "team-a"}, "per": "minute",
                                   "tokens": MAX_TOKENS}])
    try:
        with pytest.raises(openai.RateLimitError) as err:
            chat(client(stack))
        assert err.value.body["code"] == "rate_limited"
        assert "cannot be admitted" in err.value.body["message"]
        assert err.value.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in err.value.response.headers
        assert stack.rows(1)[0]["outcome"] == "rate_limited"
    finally:
        stack.close()


def test_budget_refusal_wins_over_a_rate_limit(tmp_path: Path) -> None:
    """A call both a spent budget and a full window refuse is told about the budget (final),
    and neither the budget nor the window takes anything for it."""
    stack = rate_stack(tmp_path, [{"scope": {"key": "team-a"}, "per": "minute",
                                   "requests": 1}],
                       budgets=[{"scope": {"customer": "broke"}, "limit_usd": 0}])
    try:
        stack.sim.then(Scenario(usage=usage(), repeat=5))
        a = client(stack)
        with pytest.raises(openai.RateLimitError) as err:
            chat(a, **{"X-Meter-Customer": "broke"})
        assert err.value.body["code"] == "budget_exceeded"
        assert chat(a).status_code == 200  # the refused call did not enter the window
        with pytest.raises(openai.RateLimitError) as err:
            chat(a, **{"X-Meter-Customer": "broke"})
        assert err.value.body["code"] == "budget_exceeded"
    finally:
        stack.close()


@pytest.mark.parametrize(("entry", "message"), [
    ({"per": "minute", "requests": 5}, "rate_limits[0].scope: is required"),
    ({"scope": {"team": "x"}, "requests": 5}, "rate_limits[0].scope.team: scopes take"),
    ({"scope": {"key": "a"}, "per": "day", "requests": 5},
     "rate_limits[0].per: must be one of second, minute, hour"),
    ({"scope": {"key": "a"}}, "rate_limits[0]: needs requests, tokens or usd"),
    ({"scope": {"key": "a"}, "requests": 0}, "rate_limits[0].requests: must be positive"),
    ({"scope": {"key": "a"}, "usd": -1}, "rate_limits[0].usd: must be positive"),
    ({"scope": {"key": "a"}, "requests": 1.5}, "rate_limits[0].requests: must be a whole"),
    ({"scope": {"key": "a"}, "requests": 5, "burst": 2}, "rate_limits[0].burst: unknown key"),
])
def test_config_errors_are_clear(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({"rate_limits": [entry]}, "m.yaml")
    assert f"m.yaml: {message}" in str(err.value)


def test_config_rejects_a_repeated_name() -> None:
    with pytest.raises(ConfigError, match=r"rate_limits\[1\].name: repeats rate_limits\[0\]"):
        parse_settings({"rate_limits": [{"name": "x", "scope": {"key": "a"}, "requests": 1},
                                        {"name": "x", "scope": {"key": "b"}, "requests": 1}]},
                       "m.yaml")


def test_local_windows_of_many_scopes_do_not_pile_up() -> None:
    """A `"*"` limit over many customers: a window no call entered for a whole span is
    dropped at the next sweep (the local ledger sweeps once a minute)."""
    async def go() -> None:
        ledger = LocalLedger()
        for i in range(100):
            window = Window(key=f"rl:x:customer=c{i}/minute", span_ms=60_000, tokens=0,
                            usd=Decimal(0), max_requests=1, max_tokens=None, max_usd=None)
            await ledger.reserve(f"call{i}", [], 60, [window], now=T0)
        assert len(ledger._windows) == 100
        await ledger.reserve("late", [], 60, [window], now=T0 + timedelta(seconds=61))
        assert list(ledger._windows) == [window.key]

    asyncio.run(go())
