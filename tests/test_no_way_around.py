"""No way around the meter (issue 11): each attack a key holder tried, refused or metered.

Every test drives the real server (in-process `Stack`, or `meterproxy serve` as its own
process) through the official SDKs or raw HTTP, with the simulator as the provider.
Prices come from the tables' published rates: gpt-4o-mini $0.15 in / $0.60 out per 1M
tokens, gemini-2.5-flash $0.30 / $2.50, gemini-embedding-001 $0.15 in.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from proxy import tokens
from proxy.budgets import Alerts, Budgets, budgets_from
from proxy.cli import main
from proxy.config import ConfigError, parse_settings
from proxy.dialects import for_name
from proxy.pricing import PriceBook
from proxy.simulator import Scenario
from proxy.storage import open_ledger
from tests.conftest import (
    OTHER_KEY,
    PROVIDER_KEY,
    VIRTUAL_KEY,
    Served,
    Stack,
    http,
    sha,
)
from tests.scale import redis_prefix, redis_url

ADMIN_KEY = "admin-secret-for-no-way-around"
ADMIN_ENV = "METERPROXY_TEST_ADMIN_KEY_NWA"
M = Decimal(1_000_000)
MINI_IN, MINI_OUT = Decimal("0.15") / M, Decimal("0.60") / M
FLASH_IN, FLASH_OUT = Decimal("0.30") / M, Decimal("2.50") / M


def auth(key: str = VIRTUAL_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def chat_body(**extra: Any) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini",
                         "messages": [{"role": "user", "content": "hello there"}], **extra})


def stack_with(tmp: Path, **config: Any) -> Stack:
    os.environ[ADMIN_ENV] = ADMIN_KEY
    return Stack(tmp, {"server": {"admin_key_env": ADMIN_ENV}, **config})


def keys(a: dict[str, Any] | None = None, b: dict[str, Any] | None = None) -> list[dict]:
    return [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY), **(a or {})},
            {"name": "team-b", "key_sha256": sha(OTHER_KEY), "models": ["gpt-4o-mini"],
             "tags": {"team": "b"}, **(b or {})}]


ZERO_BUDGET = {"budgets": [{"period": "day", "limit_usd": 0}]}


# Row 1: encoded, dotted and doubled paths reach the endpoint the provider decodes to.

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`meterproxy serve` on a $0 key budget, in front of a simulator."""
    tmp = tmp_path_factory.mktemp("served")
    sim = Stack(tmp / "sim")
    db = tmp / "served.db"
    config = {"storage": {"usage_log": f"sqlite:///{db}", "flush_interval_ms": 20},
              "providers": {name: {"base_url": sim.sim_url}
                            for name in ("openai", "anthropic", "gemini")},
              "keys": [{"name": "zero", "key_sha256": sha(VIRTUAL_KEY), **ZERO_BUDGET},
                       {"name": "open", "key_sha256": sha(OTHER_KEY),
                        "models": ["gpt-4o-mini"]}]}
    env = {"OPENAI_API_KEY": PROVIDER_KEY, "ANTHROPIC_API_KEY": PROVIDER_KEY,
           "GEMINI_API_KEY": PROVIDER_KEY}
    proc = Served(tmp, config, env=env)
    yield SimpleNamespace(url=proc.url, sim=sim.sim, db=db)
    proc.stop()
    sim.close()


@pytest.mark.parametrize(("path", "body", "headers"), [
    ("/openai/v1/chat/completion%73", chat_body(), auth()),
    ("/openai/v1/chat/%63ompletions", chat_body(), auth()),
    ("/openai/v1//chat/./completions", chat_body(), auth()),
    ("/openai/v1/x/../chat/completions/", chat_body(), auth()),
    ("/anthropic/v1/messag%65s",
     orjson.dumps({"model": "claude-haiku-4-5", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "hi"}]}),
     {"x-api-key": VIRTUAL_KEY, "anthropic-version": "2023-06-01",
      "Content-Type": "application/json"}),
    ("/gemini/v1beta/models/gemini-2.5-flash%3AgenerateContent",
     orjson.dumps({"contents": [{"parts": [{"text": "hi"}]}]}),
     {"x-goog-api-key": VIRTUAL_KEY, "Content-Type": "application/json"}),
])
def test_encoded_paths_meet_the_budget(served: Any, path: str, body: bytes,
                                       headers: dict[str, str]) -> None:
    """Every spelling of a metered endpoint is metered: the $0 budget refuses it unsent."""
    before = len(served.sim.received)
    reply = http("POST", served.url + path, body, headers)
    assert reply.status_code == 429, reply.content
    assert b"budget_exceeded" in reply.content
    assert len(served.sim.received) == before


def test_canonical_form_is_what_goes_upstream(served: Any) -> None:
    """The model allow-list sees the decoded endpoint, and upstream gets the canonical path."""
    sneaky = http("POST", served.url + "/openai/v1/chat/completion%73",
                  chat_body(model="gpt-4o"), auth(OTHER_KEY))
    assert sneaky.status_code == 403 and b"may not call model" in sneaky.content
    ok = http("POST", served.url + "/openai/v1//chat/./completion%73", chat_body(),
              auth(OTHER_KEY))
    assert ok.status_code == 200, ok.content
    assert served.sim.received[-1].path == "/v1/chat/completions"
    usage = ok.json()["usage"]
    row = _served_rows(served.db)[-1]
    assert row["endpoint"] == "chat.completions"
    assert Decimal(str(row["cost_usd"])) == (usage["prompt_tokens"] * MINI_IN
                                             + usage["completion_tokens"] * MINI_OUT)


@pytest.mark.parametrize("path", ["/openai/v1/chat%2Fcompletions",
                                  "/openai/v1/chat%2fcompletions",
                                  "/openai/v1/../../anthropic/v1/messages",
                                  "/openai/%2E%2E/anthropic/v1/messages"])
def test_ambiguous_paths_are_a_400_in_the_provider_shape(served: Any, path: str) -> None:
    before = len(served.sim.received)
    reply = http("POST", served.url + path, chat_body(), auth(OTHER_KEY))
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "ambiguous path" in reply.json()["error"]["message"]
    assert len(served.sim.received) == before


def _served_rows(db: Path) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + 10
    while True:
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
        except sqlite3.OperationalError:
            rows = []
        finally:
            conn.close()
        if (rows and rows[-1]["status"] == 200) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# Row 2: endpoints the proxy cannot meter are refused, unless an operator opens them.

NOT_METERED = [
    ("openai", "POST", "/v1/batches", {"input_file_id": "file-1", "endpoint":
                                       "/v1/chat/completions", "completion_window": "24h"}),
    ("openai", "POST", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}),
    ("openai", "POST", "/v1/audio/speech", {"model": "tts-1", "input": "hi", "voice": "alloy"}),
    ("openai", "POST", "/v1/threads/runs", {"assistant_id": "asst_1"}),
    ("openai", "POST", "/v1/fine_tuning/jobs", {"model": "gpt-4o-mini", "training_file": "f"}),
    ("openai", "POST", "/v1/realtime/sessions", {"model": "gpt-4o-realtime-preview"}),
    ("anthropic", "POST", "/v1/messages/batches", {"requests": []}),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", {}),
    ("gemini", "POST", "/v1beta/models/imagen-4.0-generate-001:predict", {}),
    ("gemini", "POST", "/v1beta/cachedContents", {"model": "models/gemini-2.5-flash"}),
]


def _key_headers(provider: str, key: str = VIRTUAL_KEY) -> dict[str, str]:
    return {"openai": auth(key),
            "anthropic": {"x-api-key": key, "anthropic-version": "2023-06-01",
                          "Content-Type": "application/json"},
            "gemini": {"x-goog-api-key": key, "Content-Type": "application/json"}}[provider]


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = stack_with(tmp_path_factory.mktemp("refusing"))
    yield s
    s.close()


@pytest.mark.parametrize(("provider", "method", "path", "body"), NOT_METERED)
def test_not_metered_endpoints_are_refused(refusing: Stack, provider: str, method: str,
                                           path: str, body: dict) -> None:
    before = len(refusing.sim.received)
    reply = http(method, f"{refusing.url}/{provider}{path}", orjson.dumps(body),
                 _key_headers(provider))
    assert reply.status_code == 403, reply.content
    text = reply.content.decode()
    assert "endpoint_not_metered" in text and f"providers.{provider}.allow_unmetered" in text
    assert len(refusing.sim.received) == before
    row = refusing.rows()[-1]
    assert row["status"] == 403 and row["outcome"] == "rejected"


def test_refusal_reaches_each_sdk_in_its_shape(refusing: Stack) -> None:
    client = openai.OpenAI(base_url=refusing.base(), api_key=VIRTUAL_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.batches.create(input_file_id="file-1", endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert err.value.code == "endpoint_not_metered"
    assert "allow_unmetered: [batches]" in err.value.message
    claude = anthropic.Anthropic(base_url=refusing.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                 max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.batches.create(requests=[{"custom_id": "a", "params": {
            "model": "claude-haiku-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}}])


def test_free_endpoints_still_pass(refusing: Stack) -> None:
    client = openai.OpenAI(base_url=refusing.base(), api_key=VIRTUAL_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
    gem = genai.Client(api_key=VIRTUAL_KEY, http_options=genai_types.HttpOptions(
        base_url=refusing.base("gemini", "")))
    counted = gem.models.count_tokens(model="gemini-2.5-flash", contents="count me please")
    assert counted.total_tokens == tokens.count_text("count me please", "gemini-2.5-flash")


def test_opened_endpoint_is_logged_unpriced_and_never_under_a_usd_budget(
        tmp_path: Path) -> None:
    s = stack_with(tmp_path, providers={"openai": {"allow_unmetered": ["batches"]}},
                   keys=keys(a={"budgets": [{"period": "day", "limit_usd": 100}]},
                             b={"models": []}))
    try:
        body = orjson.dumps(NOT_METERED[0][3])
        free = http("POST", s.base() + "/batches", body, auth(OTHER_KEY))
        assert free.status_code == 404  # the simulator has no batches: it was forwarded
        row = s.rows(1)[-1]
        assert row["endpoint"] == "batches" and row["priced"] == 0
        assert row["status"] == 404 and row["cost_usd"] is None
        budgeted = http("POST", s.base() + "/batches", body, auth(VIRTUAL_KEY))
        assert budgeted.status_code == 403
        assert "cannot run under the day budget" in budgeted.json()["error"]["message"]
        assert s.rows(2)[-1]["outcome"] == "rejected"
    finally:
        s.close()


def test_gemini_embeddings_are_metered(tmp_path: Path) -> None:
    s = stack_with(tmp_path)
    try:
        gem = genai.Client(api_key=VIRTUAL_KEY, http_options=genai_types.HttpOptions(
            base_url=s.base("gemini", "")))
        texts = ["the first text to embed", "and a second one"]
        result = gem.models.embed_content(model="gemini-embedding-001", contents=texts)
        assert len(result.embeddings) == 2
        row = s.rows(1)[-1]
        assert row["endpoint"] == "batchEmbedContents"
        counted = sum(tokens.count_text(t, "gemini-embedding-001") for t in texts)
        assert row["input_tokens"] == counted and row["usage_source"] == "estimated"
        assert Decimal(str(row["cost_usd"])) == counted * Decimal("0.15") / M
    finally:
        s.close()


# Row 3: the output bound times the answers asked for.

def test_n_multiplies_the_estimate(tmp_path: Path) -> None:
    """n=50 without max_tokens would hold 16,384 tokens once; it may use them 50 times."""
    s = stack_with(tmp_path, keys=keys(a={"budgets": [{"period": "day", "limit_usd": 0.02}]}))
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", n=50, messages=[
                {"role": "user", "content": "hello"}])
        assert len(s.sim.received) == 0
        # n=3 and 10 tokens each: admitted, and the simulator bills all three answers.
        done = client.chat.completions.create(model="gpt-4o-mini", n=3, max_tokens=10,
                                              messages=[{"role": "user", "content": "hello"}])
        assert len(done.choices) == 3 and done.usage.completion_tokens == 30
        row = s.rows(2)[-1]
        assert row["output_tokens"] == 30
    finally:
        s.close()


def test_candidate_count_multiplies_the_estimate(tmp_path: Path) -> None:
    """8 candidates of 100 tokens: $0.002 of output, over a $0.0015 budget."""
    s = stack_with(tmp_path, keys=keys(a={"budgets": [{"period": "day",
                                                       "limit_usd": 0.0015}]}))
    try:
        gem = genai.Client(api_key=VIRTUAL_KEY, http_options=genai_types.HttpOptions(
            base_url=s.base("gemini", "")))
        config = genai_types.GenerateContentConfig(candidate_count=8, max_output_tokens=100)
        with pytest.raises(genai_errors.ClientError) as err:
            gem.models.generate_content(model="gemini-2.5-flash", contents="hi", config=config)
        assert err.value.code == 429
        assert len(s.sim.received) == 0
        two = genai_types.GenerateContentConfig(candidate_count=2, max_output_tokens=100)
        answer = gem.models.generate_content(model="gemini-2.5-flash", contents="hi",
                                             config=two)
        assert len(answer.candidates) == 2
        row = s.rows(2)[-1]
        assert row["output_tokens"] == answer.usage_metadata.candidates_token_count
        assert Decimal(str(row["cost_usd"])) == (row["input_tokens"] * FLASH_IN
                                                 + row["output_tokens"] * FLASH_OUT)
    finally:
        s.close()


# Row 4: a model without a price under a USD budget (a private model: `ft:` fine-tunes
# are priced from their base model now).

def test_unpriced_model_is_refused_under_a_usd_budget(tmp_path: Path) -> None:
    s = stack_with(tmp_path, keys=keys(a={"budgets": [{"period": "day", "limit_usd": 0.02}]}))
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="acme-private-llm-9", messages=[
                {"role": "user", "content": "hello"}])
        assert err.value.code == "model_unpriced"
        assert "pricing.overrides" in err.value.message
        assert len(s.sim.received) == 0
        # A key without a USD budget still reaches it, logged unpriced.
        other = openai.OpenAI(base_url=s.base(), api_key=OTHER_KEY, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):  # team-b's model allow-list
            other.chat.completions.create(model="acme-private-llm-9", messages=[
                {"role": "user", "content": "hello"}])
    finally:
        s.close()


def test_unpriced_allow_admits_and_flags(tmp_path: Path) -> None:
    s = stack_with(tmp_path, pricing={"unpriced": "allow"},
                   keys=keys(a={"budgets": [{"period": "day", "limit_usd": 0.02}]}))
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        client.chat.completions.create(model="acme-private-llm-9", messages=[
            {"role": "user", "content": "hello"}])
        row = s.rows(1)[-1]
        assert row["priced"] == 0 and row["cost_usd"] is None
        metrics = http("GET", f"{s.url}/metrics",
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}).content.decode()
        assert ('meterproxy_unpriced_calls_total{provider="openai",model="other",'
                'key="team-a"} 1') in metrics
    finally:
        s.close()


# Row 5 and 12: the key's word wins.

def test_header_cannot_override_key_tags(tmp_path: Path) -> None:
    s = stack_with(tmp_path, budgets=[{"scope": {"tag:team": "b"}, "period": "day",
                                       "limit_usd": 0}])
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=OTHER_KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Meter-Tag-Team": "other"})
        assert "may not change it" in err.value.message
        with pytest.raises(openai.RateLimitError):  # repeating the key's value is fine
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Meter-Tag-Team": "b"})
        assert len(s.sim.received) == 0
    finally:
        s.close()


def test_keys_pin_and_restrict_customers(tmp_path: Path) -> None:
    s = stack_with(tmp_path, keys=keys(a={"customer": "Zürich \"q\" a=b|c"},
                                       b={"customers": ["globex"]}),
                   budgets=[{"scope": {"customer": "acme"}, "period": "day", "limit_usd": 1}])
    try:
        pinned = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            pinned.chat.completions.create(model="gpt-4o-mini", messages=[
                {"role": "user", "content": "hi"}], extra_headers={"X-Meter-Customer": "acme"})
        pinned.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": "hi"}])
        assert s.rows(2)[-1]["customer"] == "Zürich \"q\" a=b|c"
        restricted = openai.OpenAI(base_url=s.base(), api_key=OTHER_KEY, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            restricted.chat.completions.create(model="gpt-4o-mini", messages=[
                {"role": "user", "content": "hi"}], extra_headers={"X-Meter-Customer": "acme"})
        assert len(s.sim.received) == 1
    finally:
        s.close()


def test_remaining_header_tells_only_the_keys_own_budgets(tmp_path: Path) -> None:
    s = stack_with(tmp_path, keys=keys(a={"budgets": [{"period": "day", "limit_usd": 3}]}),
                   budgets=[{"scope": {"customer": "acme"}, "period": "day",
                             "limit_usd": 0.5}])
    try:
        body = chat_body(max_tokens=10)
        reply = http("POST", s.base() + "/chat/completions", body,
                     {**auth(), "X-Meter-Customer": "acme"})
        assert reply.status_code == 200
        # Far from both limits the hold is the body's bytes as input tokens (their upper
        # bound) and 10 output tokens, against $3.
        hold = len(body) * MINI_IN + 10 * MINI_OUT
        assert Decimal(reply.headers["x-meter-budget-remaining-usd"]) == Decimal(3) - hold
        other = http("POST", s.base() + "/chat/completions", chat_body(max_tokens=10),
                     {**auth(OTHER_KEY), "X-Meter-Customer": "acme"})
        assert other.status_code == 200
        assert "x-meter-budget-remaining-usd" not in other.headers
    finally:
        s.close()


# Row 6: a call that outlives reservations.ttl_s still holds, and its settle still counts.

def test_slow_calls_keep_their_holds_and_are_charged(tmp_path: Path) -> None:
    prompt = 3 + 3 + tokens.count_text("user") + tokens.count_text("hello there")
    usage = {"prompt_tokens": prompt, "completion_tokens": 100, "total_tokens": prompt + 100}
    each = prompt * MINI_IN + 100 * MINI_OUT
    s = stack_with(tmp_path, reservations={"ttl_s": 0.05},
                   keys=keys(a={"budgets": [{"period": "day",
                                             "limit_usd": float(each * 2 + each / 2)}]}))
    try:
        s.sim.then(Scenario(usage=usage, hang_s=0.4, repeat=4))
        results: list[int] = []

        def one() -> None:
            reply = http("POST", s.base() + "/chat/completions", chat_body(max_tokens=100),
                         auth())
            results.append(reply.status_code)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [200, 200, 429, 429]
        rows = s.calls(4)
        spent = sum((Decimal(str(r["cost_usd"])) for r in rows if r["status"] == 200),
                    Decimal(0))
        assert spent == 2 * each
        status = s.call(s.runtime.budgets.status())
        assert status[0]["spent_usd"] == spent and status[0]["reserved_usd"] == 0
    finally:
        s.close()


# Row 8: any attribution value is data.

NASTY = ["x,y", "a=b", "p|q", 'say "hi"', "50%,=|/@:"]


def test_any_customer_value_round_trips_and_restarts(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    budgets = [{"scope": {"customer": "*"}, "period": "month", "limit_usd": 1}]
    s = stack_with(tmp_path, budgets=budgets)
    try:
        for customer in NASTY:
            reply = http("POST", s.base() + "/chat/completions", chat_body(max_tokens=10),
                         {**auth(), "X-Meter-Customer": customer})
            assert reply.status_code == 200
        rows = s.rows(len(NASTY))
        cost = {r["customer"]: Decimal(str(r["cost_usd"])) for r in rows}
        api = http("GET", f"{s.url}/_meter/budgets",
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert api.status_code == 200, api.content
        page = http("GET", f"{s.url}/_meter/",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert page.status_code == 200
        assert main(["budgets", "--config", str(s.config_path)]) == 0
        capsys.readouterr()
    finally:
        s.close()
    again = stack_with(tmp_path, budgets=budgets)  # the restart that used to be refused
    try:
        status = again.call(again.runtime.budgets.status())
        from urllib.parse import unquote

        spent = {unquote(r["scope"].removeprefix("customer=")): r["spent_usd"]
                 for r in status}
        assert spent == cost
    finally:
        again.close()


# Row 9: background responses are refused (their output is fetched later, unmetered).

def test_background_responses_are_refused(tmp_path: Path) -> None:
    s = stack_with(tmp_path)
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.responses.create(model="gpt-4o-mini", input="hi", background=True)
        assert err.value.code == "endpoint_not_metered"
        assert "responses.background" in err.value.message
        assert len(s.sim.received) == 0
    finally:
        s.close()


# Row 10: context the provider keeps is part of the estimate.

def test_previous_response_id_holds_the_context_window(tmp_path: Path) -> None:
    long_prompt = "tokens " * 20_000
    s = stack_with(tmp_path, keys=keys(a={"budgets": [{"period": "day",
                                                       "limit_usd": 0.03}]}))
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        first = client.responses.create(model="gpt-4o-mini", input=long_prompt,
                                        max_output_tokens=20)

        async def burst() -> list[Any]:
            aclient = openai.AsyncOpenAI(base_url=s.base(), api_key=VIRTUAL_KEY,
                                         max_retries=0)
            return await asyncio.gather(*[aclient.responses.create(
                model="gpt-4o-mini", input="and then?", max_output_tokens=20,
                previous_response_id=first.id) for _ in range(10)], return_exceptions=True)

        results = asyncio.run(burst())
        # Each continuation is billed ~20,000 context tokens ($0.003): all ten would spend
        # $0.033. Each holds 128,000 ($0.0192), so at most one runs at a time.
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert refused and all(isinstance(r, openai.RateLimitError | openai.types.responses
                                          .Response) for r in results)
        rows = s.rows(11)
        billed = [r for r in rows[1:] if r["status"] == 200]
        assert all(r["input_tokens"] > 20_000 for r in billed)
        spent = sum((Decimal(str(r["cost_usd"])) for r in rows if r["cost_usd"]), Decimal(0))
        assert spent <= Decimal("0.03")
    finally:
        s.close()


# Row 11: a cancel at any await point of a Redis reserve leaves no hold.

def test_cancelled_reserve_leaves_no_redis_hold() -> None:
    settings = parse_settings({"keys": [{"name": "k", "key_sha256": sha("k"),
                                         "budgets": [{"period": "day", "limit_usd": 5}]}]},
                              "test")
    with redis_prefix() as prefix:
        asyncio.run(_cancel_everywhere(settings, f"{redis_url()}?prefix={prefix}"))


async def _cancel_everywhere(settings: Any, url: str) -> None:
    from datetime import UTC, datetime

    tasks: set[asyncio.Task] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)

    ledger = open_ledger(url)
    alerts = Alerts(settings.alerts.thresholds, None, spawn, None)
    budgets = Budgets(budgets_from(settings), ledger, PriceBook.load(None, {}), settings,
                      alerts, spawn)
    dialect = for_name("openai")
    payload = {"model": "gpt-4o-mini", "max_tokens": 10,
               "messages": [{"role": "user", "content": "hi"}]}
    body = orjson.dumps(payload)
    cancelled_somewhere = 0
    try:
        for steps in range(40):
            x = SimpleNamespace(
                id=f"call-{steps}", started=datetime.now(UTC), key_name="k", customer=None,
                feature=None, trace_id=None, tags={},
                call=dialect.describe("POST", "/v1/chat/completions", payload),
                dialect=dialect, payload=payload, body=body,
                upstream=SimpleNamespace(name="openai", pricing_table="openai"),
                reservation=None, budget_remaining=None, cost=None, usage=None)
            task = asyncio.create_task(budgets.reserve(x))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled_somewhere += 1
            else:
                budgets.settle(x)  # what record() does for a call that got its hold
            while tasks:
                await asyncio.gather(*list(tasks))
                tasks.difference_update([t for t in list(tasks) if t.done()])
        assert cancelled_somewhere >= 3  # some cancels landed inside the reserve
        # A reserve cancelled mid-flight is released when it completes: wait for that.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            while tasks:
                await asyncio.gather(*list(tasks))
                tasks.difference_update([t for t in list(tasks) if t.done()])
            status = await budgets.status()
            if all(r["reserved_usd"] == 0 for r in status) or \
                    asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        assert status and all(r["reserved_usd"] == 0 for r in status), status
    finally:
        await ledger.close()


# Passthrough with key budgets: refused at start, with the reason.

def test_passthrough_refuses_key_budgets() -> None:
    with pytest.raises(ConfigError, match="passthrough mode has no virtual keys"):
        parse_settings({"auth": {"mode": "passthrough"},
                        "keys": [{"name": "k", "key_sha256": sha("k"),
                                  "budgets": [{"period": "day", "limit_usd": 1}]}]}, "conf")


def test_error_bodies_are_json(refusing: Stack) -> None:
    """Refusals stay JSON in the provider's own shape (Gemini's here)."""
    reply = http("POST", refusing.url + "/gemini/v1beta/cachedContents", b"{}",
                 _key_headers("gemini"))
    error = json.loads(reply.content)["error"]
    assert error["code"] == 403 and error["status"] == "PERMISSION_DENIED"


@pytest.mark.parametrize(("dialect", "method", "path", "kind"), [
    ("openai", "POST", "/v1/chat/completions", "metered"),
    ("openai", "POST", "/v1/embeddings", "metered"),
    ("openai", "GET", "/v1/models", "free"),
    ("openai", "GET", "/v1/batches/batch_1", "free"),
    ("openai", "GET", "/v1/files/file-1/content", "free"),
    ("openai", "POST", "/v1/moderations", "free"),
    ("openai", "POST", "/v1/responses/input_tokens", "free"),
    ("openai", "POST", "/v1/batches", "not_metered"),
    ("openai", "POST", "/v1/files", "not_metered"),
    ("openai", "POST", "/v1/audio/transcriptions", "not_metered"),
    ("openai", "GET", "/v1/realtime", "not_metered"),
    ("anthropic", "POST", "/v1/messages", "metered"),
    ("anthropic", "POST", "/v1/messages/count_tokens", "free"),
    ("anthropic", "GET", "/v1/messages/batches/b1/results", "free"),
    ("anthropic", "POST", "/v1/messages/batches", "not_metered"),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "metered"),
    ("gemini", "POST", "/v1beta/models/gemini-embedding-001:embedContent", "metered"),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", "free"),
    ("gemini", "GET", "/v1beta/models", "free"),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", "not_metered"),
    ("gemini", "POST", "/upload/v1beta/files", "not_metered"),
])
def test_registry_endpoint_policy(dialect: str, method: str, path: str, kind: str) -> None:
    """Each dialect's SPEC states its endpoint policy; the default is not metered."""
    from proxy.dialects import registry

    policy = registry()[dialect].endpoint_policy
    assert policy is not None
    assert policy.classify(method, path) == kind


def test_nothing_in_the_log_stops_a_start(tmp_path: Path) -> None:
    """Rows with odd attribution (a number or an object as a tag, separators in a
    customer) are rebuilt into budgets, and the proxy starts."""
    import dataclasses
    from datetime import UTC, datetime

    from tests.usagegen import make_rows, write_log

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    odd = [("x,y", '{"team": 5}'), ("a=b|c", '{"team": {"nested": [1]}}'),
           ("%2C", '{"team": "o\'brien \\"q\\""}')]
    rows = [dataclasses.replace(row, ts=now, customer=customer, tags=tags, priced=1,
                                cost_usd=0.25, outcome="ok", key_name="team-a")
            for row, (customer, tags) in zip(make_rows(3), odd, strict=True)]
    write_log(tmp_path / "usage.db", rows)
    s = stack_with(tmp_path, budgets=[
        {"scope": {"customer": "*"}, "period": "day", "limit_usd": 1},
        {"scope": {"tag:team": "*"}, "period": "day", "limit_usd": 1}])
    try:
        status = s.call(s.runtime.budgets.status())
        spent = {r["scope"]: r["spent_usd"] for r in status}
        assert spent["customer=x%2Cy"] == spent["customer=a%3Db%7Cc"] == Decimal("0.25")
        assert spent["customer=%252C"] == Decimal("0.25")
        assert spent["tag:team=5"] == Decimal("0.25")
        reply = http("POST", s.base() + "/chat/completions", chat_body(max_tokens=10),
                     {**auth(), "X-Meter-Customer": "x,y"})
        assert reply.status_code == 200
    finally:
        s.close()
