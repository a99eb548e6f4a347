"""The runtime's life cycle through the real server: reload under load, shutdown order."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.pricing import PriceBook
from proxy.simulator import Scenario
from tests.conftest import VIRTUAL_KEY, Stack, free_port, http, sha

ADMIN_KEY = "admin-secret-for-runtime-tests"
ADMIN_ENV = "METERPROXY_TEST_ADMIN_KEY"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# gpt-4o-mini at $0.15 in / $0.60 out per 1M tokens (PROVIDERS.md):
# 20,000 * 0.15e-6 + 45,000 * 0.60e-6 = 0.003 + 0.027 = $0.03.
SPEND_USAGE = {"prompt_tokens": 20_000, "completion_tokens": 45_000, "total_tokens": 65_000}
SPENT = Decimal("0.03")


def stack_with(tmp: Path, monkeypatch: pytest.MonkeyPatch, **config: Any) -> Stack:
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)
    return Stack(tmp, {"server": {"admin_key_env": ADMIN_ENV}, **config})


def with_key_budget(stack: Stack, budget: dict[str, Any]) -> None:
    config = dict(stack.config)
    config["keys"] = [{**k, "budgets": [budget]} if k["key_sha256"] == sha(VIRTUAL_KEY) else k
                      for k in config["keys"]]
    stack.write_config(config)


def chat(client: openai.OpenAI, stream: bool = False) -> Any:
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 20,
                              "messages": [{"role": "user", "content": "Say hi."}]}
    if stream:
        with client.chat.completions.create(stream=True, **kwargs) as events:
            return "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    return client.chat.completions.create(**kwargs).choices[0].message.content


def test_reload_under_load_swaps_budgets_without_stall_or_bypass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key that spent $0.03 today gets a $0.02 day budget by POST /_meter/reload.

    While the reload's price load is held, calls (streams too) keep completing: the load
    runs off the event loop. Once the reload answers, the very next call is refused, and a
    rename of the budget keeps its spend."""
    stack = stack_with(tmp_path, monkeypatch)
    loading, release = threading.Event(), threading.Event()
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0,
                               timeout=10)
        stack.sim.then(Scenario(usage=SPEND_USAGE))
        chat(client)
        assert Decimal(str(stack.rows(1)[0]["cost_usd"])) == SPENT

        load = PriceBook.load

        def held_load(cls: type, *args: Any, **kwargs: Any) -> PriceBook:
            loading.set()
            release.wait(30)
            return load(*args, **kwargs)

        monkeypatch.setattr(PriceBook, "load", classmethod(held_load))
        with_key_budget(stack, {"name": "daily", "period": "day", "limit_usd": 0.02})
        answers: list[Any] = []
        reloading = threading.Thread(target=lambda: answers.append(
            http("POST", f"{stack.url}/_meter/reload", b"", AUTH)))
        reloading.start()
        assert loading.wait(10), "the reload never started loading prices"
        # The price load is blocked right now; the proxy still answers, streams included.
        during = [chat(client, stream=i % 2 == 0) for i in range(4)]
        release.set()
        reloading.join(30)
        assert all(during) and len(stack.rows(5)) == 5
        assert answers[0].status_code == 200, answers[0].content

        before = len(stack.sim.received)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(client)
        assert refused.value.body["type"] == "budget_exceeded"
        assert len(stack.sim.received) == before  # never forwarded

        spent = sum(Decimal(str(r["cost_usd"])) for r in stack.rows() if r["outcome"] == "ok")
        with_key_budget(stack, {"name": "daily-renamed", "period": "day", "limit_usd": 0.02})
        assert http("POST", f"{stack.url}/_meter/reload", b"", AUTH).status_code == 200
        status = http("GET", f"{stack.url}/_meter/budgets", None, AUTH).json()
        assert [(s["name"], Decimal(str(s["spent_usd"]))) for s in status] == [
            ("daily-renamed", spent)]
        with pytest.raises(openai.RateLimitError):
            chat(client)
        assert len(stack.sim.received) == before
    finally:
        release.set()
        stack.close()


class SlowWebhook:
    """Answers the first alert POST with 503 only once the proxy is shutting down, so the
    alert's retry is still due while the proxy closes. Runs on a loop of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.attempts = 0
        self.delivered: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.shutting_down = asyncio.Event()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _hook(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts == 1:
            await self.shutting_down.wait()
            return web.Response(status=503)
        self.delivered.append(await request.json())
        return web.Response(status=204)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    def proxy_stopping(self) -> None:
        self.loop.call_soon_threadsafe(self.shutting_down.set)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_final_webhook_alert_is_delivered_at_shutdown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A threshold crossed by the last call before shutdown still reaches the webhook: the
    HTTP session closes only after background work (the alert's retry) has finished."""
    hook = SlowWebhook()
    stack = stack_with(tmp_path, monkeypatch,
                       alerts={"thresholds": [0.5], "webhook_url": hook.url},
                       keys=[{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY), "budgets": [
                           {"name": "daily", "period": "day", "limit_usd": 0.05}]}])
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        stack.sim.then(Scenario(usage=SPEND_USAGE))
        chat(client)
        while hook.attempts == 0:  # the alert's first POST is waiting at the webhook
            stack.call(asyncio.sleep(0.01))
    finally:
        stack.close(during=hook.proxy_stopping)
        hook.stop()
    assert [(a["name"], a["threshold"], Decimal(a["spent_usd"])) for a in hook.delivered] == [
        ("daily", 0.5, SPENT)]


def test_importing_the_proxy_does_no_work() -> None:
    """Importing every module the server and CLI use makes no executor (nor thread)."""
    import subprocess
    import sys

    code = ("import gc, threading, concurrent.futures as f, proxy.app, proxy.cli\n"
            "pools = [o for o in gc.get_objects() if isinstance(o, f.ThreadPoolExecutor)]\n"
            "print(len(pools), threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["0", "1"]


def test_reload_keeps_every_customers_budget_in_the_admin_views(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `customer: "*"` budget shows each customer's period in GET /_meter/budgets and on
    the dashboard after a reload, before that customer calls again: acme's call settled
    before the reload; globex's call was answered but its settle (held here at the ledger)
    finished only after the reload had swapped the snapshot. Before the fix, globex's
    period was missing from both views until globex called again."""
    stack = stack_with(tmp_path, monkeypatch, budgets=[
        {"name": "per-customer", "scope": {"customer": "*"}, "period": "month",
         "limit_usd": 5}])
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0,
                               timeout=10)

        def call(customer: str) -> None:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi."}],
                extra_headers={"X-Meter-Customer": customer})

        stack.sim.then(Scenario(usage=SPEND_USAGE))
        call("acme")
        stack.settle()

        async def new_gate() -> asyncio.Event:
            return asyncio.Event()

        gate = stack.call(new_gate())
        ledger = stack.server.services.ledger
        settle = ledger.settle

        async def held_settle(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await settle(*args, **kwargs)

        monkeypatch.setattr(ledger, "settle", held_settle)
        stack.sim.then(Scenario(usage=SPEND_USAGE))
        call("globex")  # answered; its settle waits at the gate on the old snapshot
        config = dict(stack.config)
        config["budgets"] = [{**config["budgets"][0], "limit_usd": 6}]  # same budget, new limit
        stack.write_config(config)
        assert http("POST", f"{stack.url}/_meter/reload", b"", AUTH).status_code == 200
        stack.loop.call_soon_threadsafe(gate.set)
        stack.rows(2)
        stack.settle()
        # $0.03 each (SPEND_USAGE, by hand above), now under the reloaded $6 limit.
        want = [("customer=acme", SPENT, Decimal(6)), ("customer=globex", SPENT, Decimal(6))]
        for _ in range(2):  # and again after a reload with nothing running
            status = http("GET", f"{stack.url}/_meter/budgets", None, AUTH).json()
            assert [(s["scope"], Decimal(s["spent_usd"]), Decimal(s["limit_usd"]))
                    for s in status] == want
            page = http("GET", f"{stack.url}/_meter/", None, AUTH).content.decode()
            for scope, _, _ in want:
                assert f"<span>per-customer: {scope}</span>" in page, scope
            assert http("POST", f"{stack.url}/_meter/reload", b"", AUTH).status_code == 200
    finally:
        stack.close()
