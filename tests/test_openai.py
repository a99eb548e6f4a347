"""The OpenAI dialect end to end: the official openai SDK -> meterproxy -> simulated OpenAI."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal

import openai
import orjson
import pytest

from proxy.simulator import Scenario
from tests.conftest import OTHER_KEY, PROVIDER_KEY, VIRTUAL_KEY, Stack, http

MESSAGES = [{"role": "user", "content": "Say hello to the metering proxy"}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)


@pytest.fixture(scope="module")
def direct(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.sim_url}/v1", api_key=PROVIDER_KEY, max_retries=0)


def expected_cost(stack: Stack, model: str, **tokens: int) -> Decimal:
    """The cost computed here from the table's rates, independently of the engine."""
    price = stack.runtime.prices.lookup("openai", [model], datetime.now(UTC))
    assert price is not None
    rates = price.rates
    total = (
        tokens.get("input", 0) * rates.input
        + tokens.get("cached", 0) * (rates.cached_input or rates.input)
        + tokens.get("output", 0) * (rates.output or 0)
    ) / Decimal(1_000_000)
    return total.quantize(Decimal("1e-10"))


def test_chat_response_is_what_direct_returns(stack: Stack, client, direct) -> None:
    """A non-streamed chat completion reaches the client byte for byte as the provider sent it."""
    raw_direct = direct.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.http_response.content == raw_direct.http_response.content
    assert raw.headers["x-request-id"] == raw_direct.headers["x-request-id"]
    assert raw.parse().usage.prompt_tokens > 0


def test_chat_row_has_exact_tokens_cost_and_attribution(stack: Stack, client) -> None:
    """The row carries the provider's token counts, the exact Decimal cost and the tags."""
    before = len(stack.rows())
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES,
        extra_headers={"X-Meter-Customer": "acme", "X-Meter-Feature": "search",
                       "X-Meter-Trace-Id": "trace-42", "X-Meter-Tag-Env": "prod"})
    usage = raw.parse().usage
    row = stack.rows(before + 1)[-1]
    assert row["id"] == raw.headers["x-meter-request-id"]
    assert (row["input_tokens"], row["output_tokens"]) == (usage.prompt_tokens,
                                                           usage.completion_tokens)
    assert row["cached_input_tokens"] == 0 and row["reasoning_tokens"] == 0
    cost = expected_cost(stack, "gpt-4o-mini", input=usage.prompt_tokens,
                         output=usage.completion_tokens)
    assert Decimal(str(row["cost_usd"])) == cost
    assert Decimal(raw.headers["x-meter-cost-usd"]) == cost
    assert row["pricing_version"].startswith("openai.yaml@2024-07-18+")
    assert (row["customer"], row["feature"], row["trace_id"]) == ("acme", "search", "trace-42")
    assert json.loads(row["tags"]) == {"env": "prod"}
    assert (row["status"], row["outcome"], row["usage_source"], row["priced"]) == (
        200, "ok", "provider", 1)
    assert (row["provider"], row["endpoint"], row["model"], row["key_name"]) == (
        "openai", "chat.completions", "gpt-4o-mini", "team-a")
    assert row["response_model"] == "gpt-4o-mini" and row["stream"] == 0


def test_provider_gets_real_key_and_no_meter_headers(stack: Stack, client) -> None:
    """Upstream sees the provider key, never the virtual key or an attribution header."""
    client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES,
        extra_headers={"X-Meter-Customer": "acme", "Helicone-Property-Session": "s1",
                       "Helicone-User-Id": "u1", "x-portkey-metadata": '{"_user": "u2"}'})
    headers = {k.lower(): v for k, v in stack.sim.received[-1].headers.items()}
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert VIRTUAL_KEY not in str(headers)
    assert not [h for h in headers if h.startswith(("x-meter", "helicone", "x-portkey"))]


def test_cached_tokens_priced_at_the_cached_rate(stack: Stack, client) -> None:
    """Cache reads leave the uncached input column and cost the table's cached rate."""
    usage = {"prompt_tokens": 4020, "completion_tokens": 4, "total_tokens": 4024,
             "prompt_tokens_details": {"audio_tokens": 0, "cache_write_tokens": 0,
                                       "cached_tokens": 4012},
             "completion_tokens_details": {"reasoning_tokens": 2}}
    stack.sim.then(Scenario(usage=usage))
    before = len(stack.rows())
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    row = stack.rows(before + 1)[-1]
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"],
            row["reasoning_tokens"]) == (8, 4012, 4, 2)
    assert Decimal(str(row["cost_usd"])) == expected_cost(stack, "gpt-4o", input=8, cached=4012,
                                                          output=4)


def test_stream_chunks_equal_direct_and_usage_chunk_hidden(stack: Stack, client, direct) -> None:
    """The proxy asks for usage on streams but the client sees exactly the direct chunks."""
    direct_chunks = [c.model_dump() for c in direct.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)]
    before = len(stack.rows())
    chunks = [c.model_dump() for c in client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)]
    assert chunks == direct_chunks
    assert all(c["usage"] is None and c["choices"] for c in chunks)
    sent = orjson.loads(stack.sim.received[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    row = stack.rows(before + 1)[-1]
    assert row["stream"] == 1 and row["usage_source"] == "provider"
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert row["ttfb_ms"] is not None and row["ttfb_ms"] <= row["duration_ms"]


def test_stream_usage_kept_when_client_asked(stack: Stack, client) -> None:
    """A client that asked for include_usage gets its usage chunk, and the row matches it."""
    before = len(stack.rows())
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    row = stack.rows(before + 1)[-1]
    assert (row["input_tokens"], row["output_tokens"]) == (usage.prompt_tokens,
                                                           usage.completion_tokens)


def test_async_client_streams_and_logs(stack: Stack) -> None:
    """The async SDK streams through the proxy and each call gets its own row."""
    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        async def one(i: int) -> str:
            stream = await aclient.chat.completions.create(
                model="gpt-4o-mini", stream=True,
                messages=[{"role": "user", "content": f"call {i}"}],
                extra_headers={"X-Meter-Feature": f"async-{i}"})
            return "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        try:
            return await asyncio.gather(*(one(i) for i in range(5)))
        finally:
            await aclient.close()

    before = len(stack.rows())
    texts = asyncio.run(run())
    assert all("simulated answer" in t for t in texts)
    rows = stack.rows(before + 5)[before:]
    assert sorted(r["feature"] for r in rows) == [f"async-{i}" for i in range(5)]
    assert all(r["outcome"] == "ok" and r["output_tokens"] > 0 for r in rows)


def test_responses_api_stream_and_not(stack: Stack, client) -> None:
    """Responses usage comes from the body and from the response.completed event."""
    before = len(stack.rows())
    result = client.responses.create(model="gpt-4.1", input="What does a meter do?")
    events = list(client.responses.create(model="gpt-4.1", input="Again", stream=True))
    (completed,) = [e for e in events if e.type == "response.completed"]
    rows = stack.rows(before + 2)[before:]
    assert rows[0]["endpoint"] == "responses" and rows[1]["stream"] == 1
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (
        result.usage.input_tokens, result.usage.output_tokens)
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (
        completed.response.usage.input_tokens, completed.response.usage.output_tokens)
    assert Decimal(str(rows[1]["cost_usd"])) == expected_cost(
        stack, "gpt-4.1", input=rows[1]["input_tokens"], output=rows[1]["output_tokens"])


def test_legacy_completions_and_embeddings(stack: Stack, client) -> None:
    """Legacy completions and embeddings are metered like chat."""
    before = len(stack.rows())
    done = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon")
    emb = client.embeddings.create(model="text-embedding-3-small", input=["one", "two words"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    rows = stack.rows(before + 2)[before:]
    assert rows[0]["endpoint"] == "completions"
    assert rows[0]["input_tokens"] == done.usage.prompt_tokens
    assert rows[1]["endpoint"] == "embeddings"
    assert rows[1]["input_tokens"] == emb.usage.prompt_tokens and rows[1]["output_tokens"] == 0
    assert Decimal(str(rows[1]["cost_usd"])) == expected_cost(
        stack, "text-embedding-3-small", input=emb.usage.prompt_tokens)


def test_other_endpoints_pass_through_at_zero_cost(stack: Stack, client) -> None:
    """GET /v1/models is forwarded and logged with cost 0."""
    before = len(stack.rows())
    models = client.models.list()
    assert [m.id for m in models] == ["gpt-4o-mini"]
    row = stack.rows(before + 1)[-1]
    assert (row["endpoint"], row["cost_usd"], row["outcome"], row["status"]) == (
        "models", 0.0, "ok", 200)


def test_unknown_key_is_401_in_openai_shape(stack: Stack) -> None:
    """An unknown virtual key never reaches the provider, gets OpenAI's 401, and is
    counted in /metrics, not written as a usage row (DESIGN.md section 7)."""
    bad = openai.OpenAI(base_url=stack.base(), api_key="mp-not-a-key", max_retries=0)
    received = len(stack.sim.received)
    before = len(stack.rows())
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert err.value.body["code"] == "invalid_api_key"
    assert set(err.value.body) == {"message", "type", "param", "code"}
    assert len(stack.sim.received) == received
    assert len(stack.rows()) == before
    assert stack.runtime.metrics.refused[(("status", "401"),)] >= 1


def test_model_allowlist_is_403(stack: Stack) -> None:
    """A key limited to some models is refused others, in OpenAI's shape."""
    limited = openai.OpenAI(base_url=stack.base(), api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    ok = limited.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ok.choices[0].message.content
    row = stack.last_row()
    assert row["key_name"] == "team-b" and json.loads(row["tags"]) == {"team": "b"}


@pytest.mark.parametrize("headers", [
    {"X-Meter-Tag-Bad$Name": "x"},
    {"X-Meter-Customer": "x" * 300},
    {"x-portkey-metadata": "not json"},
    {"X-Meter-Colour": "red"},
    {f"X-Meter-Tag-t{i}": "v" for i in range(33)},
])
def test_bad_attribution_is_400_never_dropped(stack: Stack, client, headers) -> None:
    """Invalid tags are refused with a 400 that names the problem."""
    before = len(stack.rows())
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                       extra_headers=headers)
    assert err.value.body["type"] == "invalid_request_error"
    assert stack.rows(before + 1)[-1]["outcome"] == "rejected"


def test_peer_gateway_headers_become_tags(stack: Stack, client) -> None:
    """Helicone, Portkey and Cloudflare attribution headers land in tags; ours win."""
    before = len(stack.rows())
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers={
        "Helicone-Property-Session": "s1", "Helicone-User-Id": "u1",
        "x-portkey-metadata": '{"_user": "u2", "plan": "pro"}',
        "cf-aig-metadata": '{"region": "eu"}', "X-Meter-Tag-Plan": "enterprise"})
    tags = json.loads(stack.rows(before + 1)[-1]["tags"])
    assert tags["session"] == "s1" and tags["region"] == "eu"
    assert tags["plan"] == "enterprise"
    assert tags["user"] in ("u1", "u2")


def test_unpriced_model_is_proxied_and_logged_unpriced(stack: Stack, client) -> None:
    """A model with no table price still works; its row says priced=0 and cost NULL."""
    before = len(stack.rows())
    out = client.chat.completions.create(model="my-finetune-xyz", messages=MESSAGES)
    assert out.choices[0].message.content
    row = stack.rows(before + 1)[-1]
    assert (row["priced"], row["cost_usd"], row["pricing_version"]) == (0, None, None)
    assert row["input_tokens"] == out.usage.prompt_tokens


def test_non_ascii_and_one_megabyte_bodies_pass_intact(stack: Stack) -> None:
    """The body the provider receives is byte for byte the body the client sent."""
    text = "Grüße, 東京! Ünïcödé ✓ " + "x" * (1024 * 1024)
    body = orjson.dumps({"model": "gpt-4o-mini",
                         "messages": [{"role": "user", "content": text}]})
    response = http("POST", f"{stack.base()}/chat/completions", body,
                    headers={"Authorization": f"Bearer {VIRTUAL_KEY}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 200
    assert stack.sim.received[-1].body == body


def test_malformed_json_and_unknown_provider(stack: Stack) -> None:
    """Bad input gets a clear error in OpenAI's shape, and a row."""
    before = len(stack.rows())
    headers = {"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json"}
    bad = http("POST", f"{stack.base()}/chat/completions", b'{"model": ', headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    nowhere = http("POST", f"{stack.url}/nope/v1/chat/completions", b"{}", headers)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"
    rows = stack.rows(before + 2)[before:]
    assert [r["status"] for r in rows] == [400, 404]
    assert all(r["outcome"] == "rejected" for r in rows)


def test_upstream_error_passes_through_unchanged(stack: Stack, client) -> None:
    """A provider error reaches the SDK as the provider sent it, logged as upstream_error."""
    body = orjson.dumps({"error": {"message": "Rate limit reached", "type": "tokens",
                                   "param": None, "code": "rate_limit_exceeded"}})
    stack.sim.then(Scenario(status=429, body=body, headers={"retry-after": "7"}))
    before = len(stack.rows())
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert err.value.response.content == body
    assert err.value.response.headers["retry-after"] == "7"
    row = stack.rows(before + 1)[-1]
    assert (row["status"], row["outcome"], row["cost_usd"]) == (429, "upstream_error", 0.0)


def test_azure_deployment_by_config(stack: Stack) -> None:
    """An Azure-style provider: api-key header upstream, the model from the deployment path."""
    azure = openai.AzureOpenAI(azure_endpoint=f"{stack.url}/azure", api_key=VIRTUAL_KEY,
                               api_version="2024-10-21", azure_deployment="gpt-4o-mini",
                               max_retries=0)
    before = len(stack.rows())
    azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    headers = {k.lower(): v for k, v in stack.sim.received[-1].headers.items()}
    assert headers["api-key"] == PROVIDER_KEY and "authorization" not in headers
    row = stack.rows(before + 1)[-1]
    assert row["provider"] == "azure" and row["priced"] == 1 and row["cost_usd"] > 0
