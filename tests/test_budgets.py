"""Budgets: exact under concurrency, clear refusals in every SDK, periods, restarts, alerts."""

from __future__ import annotations

import asyncio
import json
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
from proxy.cli import main
from proxy.simulator import Scenario
from tests.conftest import OTHER_KEY, VIRTUAL_KEY, Stack, Webhook, http, sha

PROMPT = "How much budget is left for the search feature this month?"
MAX_TOKENS = 100
ADMIN_KEY = "admin-secret-for-tests"
ADMIN_ENV = "METERPROXY_TEST_ADMIN_KEY"


def exact_usage() -> dict[str, Any]:
    """Usage equal to the proxy's estimate: the chat prompt per OpenAI's cookbook, full output."""
    prompt = 3 + 3 + tokens.count_text("user") + tokens.count_text(PROMPT)
    return {"prompt_tokens": prompt, "completion_tokens": MAX_TOKENS,
            "total_tokens": prompt + MAX_TOKENS}


def call_cost() -> Decimal:
    """gpt-4o-mini at the table's $0.15 in / $0.60 out per 1M tokens."""
    u = exact_usage()
    return (u["prompt_tokens"] * Decimal("0.15") + u["completion_tokens"] * Decimal("0.60")) \
        / Decimal(1_000_000)


def budget_stack(tmp: Path, budgets: list[dict], key_budgets: list[dict] | None = None,
                 clock: Any = None, **extra: Any) -> Stack:
    os.environ[ADMIN_ENV] = ADMIN_KEY
    config: dict[str, Any] = {"budgets": budgets, "server": {"admin_key_env": ADMIN_ENV},
                              **extra}
    if key_budgets:
        config["keys"] = [
            {"name": "team-a", "key_sha256": sha(VIRTUAL_KEY), "budgets": key_budgets},
            {"name": "team-b", "key_sha256": sha(OTHER_KEY)},
        ]
    return Stack(tmp, config, clock=clock)


def chat(client: openai.OpenAI, **headers: str) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}], extra_headers=headers)


def holds_and_counts(tmp: Path, limit: Decimal, calls: int, monkeypatch: pytest.MonkeyPatch,
                     **extra: Any) -> tuple[list[int], int, int]:
    """Tokens each of `calls` calls held (the estimate's), how many prompts were tokenized,
    and the JSON body's byte length."""
    import proxy.budgets as budgets_module

    stack = budget_stack(tmp, [], key_budgets=[{"period": "day", "limit_usd": float(limit)}],
                         **extra)
    held: list[int] = []
    counted: list[int] = []
    estimate, count_prompt = stack.runtime.budgets.estimate, budgets_module.count_prompt

    def spy_estimate(*args: Any) -> tuple[Decimal, int]:
        result = estimate(*args)
        held.append(result[1])
        return result

    def spy_count(*args: Any) -> int:
        counted.append(1)
        return count_prompt(*args)

    stack.runtime.budgets.estimate = spy_estimate
    monkeypatch.setattr(budgets_module, "count_prompt", spy_count)
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=calls))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for _ in range(calls):
            assert chat(client).http_response.status_code == 200
        body = stack.sim.received[0].body
        rows = stack.calls(calls)
        assert [Decimal(str(r["cost_usd"])) for r in rows] == [call_cost()] * calls
    finally:
        stack.close()
    return held, len(counted), len(body)


def test_far_from_its_limit_a_prompt_is_held_by_its_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Far from its limit a call holds its body's byte length as input tokens (an upper
    bound: a token is at least a byte) and nothing is tokenized (the embedded ledger's
    balance is read in place, so even the first call knows it is far)."""
    held, counted, size = holds_and_counts(tmp_path, Decimal(1000), 3, monkeypatch)
    assert exact_usage()["prompt_tokens"] < size
    assert held == [size + MAX_TOKENS] * 3
    assert counted == 0


def test_on_redis_only_the_first_call_is_counted_far_from_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a shared ledger an instance judges by the balance it last saw: its first call
    on a budget is counted exactly, the rest far from the limit are held by their bytes."""
    from tests.scale import redis_prefix, redis_url

    with redis_prefix() as prefix:
        held, counted, size = holds_and_counts(
            tmp_path, Decimal(1000), 3, monkeypatch,
            storage={"ledger": f"{redis_url()}?prefix={prefix}"})
    exact = exact_usage()["prompt_tokens"]
    assert held == [size + MAX_TOKENS, exact + MAX_TOKENS] + [size + MAX_TOKENS] * 2
    assert counted == 1


def test_near_its_limit_every_prompt_is_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for fewer than 64 holds of its size, each call is counted exactly before
    it is held, so a burst near the limit is admitted as if every prompt were counted."""
    held, counted, size = holds_and_counts(tmp_path, 40 * call_cost(), 3, monkeypatch)
    exact = exact_usage()["prompt_tokens"]
    assert held == [size + MAX_TOKENS, exact + MAX_TOKENS] * 3
    assert counted == 3


def test_burst_admits_exactly_what_the_budget_allows(tmp_path: Path) -> None:
    """50 concurrent calls on a budget with room for 7: exactly 7 reach the provider."""
    cost, k = call_cost(), 7
    limit = k * cost + cost / 2
    stack = budget_stack(tmp_path, [], key_budgets=[{"period": "day",
                                                     "limit_usd": float(limit)}])
    try:
        stack.sim.then(Scenario(usage=exact_usage(), hang_s=0.2, repeat=50))

        async def burst() -> list[Any]:
            client = openai.AsyncOpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY,
                                        max_retries=0)
            try:
                return await asyncio.gather(*(client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": PROMPT}]) for _ in range(50)),
                    return_exceptions=True)
            finally:
                await client.close()

        results = asyncio.run(burst())
        admitted = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(admitted) == k and len(refused) == 50 - k
        assert len(stack.sim.received) == k
        for err in refused:
            assert err.body["type"] == "budget_exceeded" and err.body["code"] == "budget_exceeded"
            assert "key=team-a" in err.body["message"] and "day" in err.body["message"]
            assert err.response.headers["x-should-retry"] == "false"
            assert int(err.response.headers["retry-after"]) > 0
        rows = stack.calls(50)
        # Identical refusals are folded into rows counting them (repeat_count).
        outcomes = sorted(r["outcome"] for r in rows for _ in range(r["repeat_count"]))
        assert outcomes == ["budget_exceeded"] * (50 - k) + ["ok"] * k
        assert all(r["status"] == 429 for r in rows if r["outcome"] == "budget_exceeded")
        status = stack.call(stack.runtime.budgets.status())
        assert len(status) == 1
        assert status[0]["spent_usd"] == k * cost <= limit
        assert status[0]["reserved_usd"] == 0
    finally:
        stack.close()


def test_refusals_in_anthropic_and_gemini_shapes(tmp_path: Path) -> None:
    """A spent budget is a 429 each SDK raises as its own rate-limit error, not retried."""
    stack = budget_stack(tmp_path, [{"scope": {"customer": "broke"}, "period": "month",
                                     "limit_usd": 0}])
    try:
        client = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                     default_headers={"X-Meter-Customer": "broke"})
        with pytest.raises(anthropic.RateLimitError) as err:
            client.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                                   messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["type"] == "error"
        assert err.value.body["error"]["type"] == "budget_exceeded"
        assert "customer=broke" in err.value.body["error"]["message"]
        gclient = genai.Client(api_key=VIRTUAL_KEY, http_options=genai_types.HttpOptions(
            base_url=f"{stack.url}/gemini", headers={"X-Meter-Customer": "broke"}))
        with pytest.raises(genai_errors.ClientError) as gerr:
            gclient.models.generate_content(model="gemini-2.5-flash", contents="hi")
        assert gerr.value.code == 429 and gerr.value.status == "RESOURCE_EXHAUSTED"
        assert "budget_exceeded" in gerr.value.message
        assert len(stack.sim.received) == 0
        rows = stack.rows(2)
        assert [r["outcome"] for r in rows] == ["budget_exceeded"] * 2
        assert [r["provider"] for r in rows] == ["anthropic", "gemini"]
    finally:
        stack.close()


def test_wildcard_scope_gives_each_customer_its_own_budget(tmp_path: Path) -> None:
    """customer: "*" counts acme's calls from any key together, and globex's apart."""
    cost = call_cost()
    stack = budget_stack(tmp_path, [{"scope": {"customer": "*"}, "period": "month",
                                     "limit_usd": float(2 * cost + cost / 2)}])
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=10))
        a = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        b = openai.OpenAI(base_url=stack.base(), api_key=OTHER_KEY, max_retries=0)
        first = chat(a, **{"X-Meter-Customer": "acme"})
        # acme's budget is not the key's own: its balance is not told to whoever names acme.
        assert "x-meter-budget-remaining-usd" not in first.headers
        chat(b, **{"X-Meter-Customer": "acme"})
        with pytest.raises(openai.RateLimitError):
            chat(a, **{"X-Meter-Customer": "acme"})
        chat(b, **{"X-Meter-Customer": "globex"})
        chat(a, **{"X-Meter-Customer": "globex"})
        stack.rows(5)
        status = {r["scope"]: r for r in stack.call(stack.runtime.budgets.status())}
        assert status["customer=acme"]["spent_usd"] == 2 * cost
        assert status["customer=globex"]["spent_usd"] == 2 * cost
    finally:
        stack.close()


def test_period_rolls_over_at_midnight_with_injected_clock(tmp_path: Path) -> None:
    """A spent day budget refuses until the next day starts, then admits again."""
    now = [datetime(2026, 3, 10, 23, 59, 0, tzinfo=UTC)]
    cost = call_cost()
    stack = budget_stack(tmp_path, [{"scope": {"feature": "search"}, "period": "day",
                                     "limit_usd": float(cost + cost / 2)}],
                         clock=lambda: now[0])
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=10))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        chat(client, **{"X-Meter-Feature": "search"})
        with pytest.raises(openai.RateLimitError) as err:
            chat(client, **{"X-Meter-Feature": "search"})
        assert err.value.response.headers["retry-after"] == "60"
        assert "2026-03-11T00:00:00Z" in err.value.body["message"]
        now[0] += timedelta(minutes=2)
        chat(client, **{"X-Meter-Feature": "search"})
        rows = stack.rows(3)
        assert [r["outcome"] for r in rows] == ["ok", "budget_exceeded", "ok"]
        assert rows[0]["ts"].startswith("2026-03-10T23:59") and rows[2]["ts"].startswith(
            "2026-03-11T00:01")
    finally:
        stack.close()


def test_restart_mid_period_keeps_the_spend(tmp_path: Path) -> None:
    """After a restart the ledger is rebuilt from the usage log: spent stays spent."""
    cost = call_cost()
    budgets = [{"scope": {"customer": "acme"}, "period": "month",
                "limit_usd": float(2 * cost + cost / 2)}]
    stack = budget_stack(tmp_path, budgets)
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=2))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        chat(client, **{"X-Meter-Customer": "acme"})
        chat(client, **{"X-Meter-Customer": "acme"})
        stack.rows(2)
    finally:
        stack.close()
    again = budget_stack(tmp_path, budgets)
    try:
        status = again.call(again.runtime.budgets.status())
        assert status[0]["spent_usd"] == 2 * cost
        client = openai.OpenAI(base_url=again.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            chat(client, **{"X-Meter-Customer": "acme"})
        assert len(again.sim.received) == 0
    finally:
        again.close()


def test_alert_thresholds_fire_once_with_webhook(tmp_path: Path) -> None:
    """50% and 100% alerts each fire once, as a POST to a real loopback webhook."""
    hook = Webhook()
    cost = call_cost()
    stack = budget_stack(tmp_path, [{"name": "acme-monthly", "scope": {"customer": "acme"},
                                     "period": "month", "limit_usd": float(4 * cost),
                                     "enforce": "alert_only"}],
                         alerts={"thresholds": [0.5, 1.0], "webhook_url": hook.url})
    hook.start(stack)
    try:
        stack.sim.then(Scenario(usage=exact_usage(), repeat=6))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for i in range(6):  # alert_only: the fifth and sixth calls go through too
            chat(client, **{"X-Meter-Customer": "acme"})
            stack.rows(i + 1)
        hook.wait(2)
        stack.rows(6)
        assert [a["threshold"] for a in hook.received] == [0.5, 1.0]
        assert hook.received[0]["name"] == "acme-monthly"
        assert hook.received[0]["period"] == "month"
        assert Decimal(hook.received[1]["spent_usd"]) == 4 * cost
        assert len(stack.sim.received) == 6
    finally:
        hook.stop()
        stack.close()


def test_reload_refuses_a_bad_config_and_keeps_the_old(tmp_path: Path) -> None:
    """POST /_meter/reload with a broken file answers 400 and changes nothing."""
    stack = budget_stack(tmp_path, [])
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        good = stack.config
        stack.config_path.write_text("keys: [{name: x, key_sha256: nothex}]\n")
        bad = http("POST", f"{stack.url}/_meter/reload", b"", auth)
        assert bad.status_code == 400 and "key_sha256" in bad.json()["error"]
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        assert chat(client).parse().choices
        assert http("POST", f"{stack.url}/_meter/reload", b"").status_code == 401
        good["keys"] = good["keys"][1:]  # drop team-a
        stack.write_config(good)
        assert http("POST", f"{stack.url}/_meter/reload", b"", auth).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            chat(client)
    finally:
        stack.close()


def test_budgets_cli_and_admin_api(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`meterproxy budgets` and GET /_meter/budgets show limit, spent and reset time."""
    cost = call_cost()
    stack = budget_stack(tmp_path, [{"scope": {"customer": "acme"}, "period": "month",
                                     "limit_usd": 1}])
    try:
        stack.sim.then(Scenario(usage=exact_usage()))
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        chat(client, **{"X-Meter-Customer": "acme"})
        stack.rows(1)
        api = http("GET", f"{stack.url}/_meter/budgets", None,
                   {"Authorization": f"Bearer {ADMIN_KEY}"})
        assert api.status_code == 200
        (row,) = api.json()
        assert row["scope"] == "customer=acme" and Decimal(str(row["spent_usd"])) == cost
        assert http("GET", f"{stack.url}/_meter/budgets").status_code == 401
        assert main(["budgets", "--config", str(stack.config_path), "--format", "json"]) == 0
        (cli,) = json.loads(capsys.readouterr().out)
        assert {k: cli[k] for k in ("scope", "period", "limit_usd")} == {
            "scope": "customer=acme", "period": "month", "limit_usd": "1"}  # exact strings
        assert Decimal(str(cli["spent_usd"])) == cost
        assert Decimal(str(cli["remaining_usd"])) == 1 - cost
        assert cli["resets_at"].endswith("T00:00:00Z")
    finally:
        stack.close()
