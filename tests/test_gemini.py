"""The Gemini dialect end to end: the official google-genai SDK -> meterproxy -> simulator."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from google import genai
from google.genai import errors, types

from proxy.simulator import Scenario
from proxy.tokens import count_text
from tests.conftest import PROVIDER_KEY, VIRTUAL_KEY, Stack, http
from tests.expected import expected_cost, row_cost

MODEL = "gemini-2.5-flash"
PROMPT = "Say hello to the metering proxy"
# docs/providers.md's recorded body with a context-cache hit.
CACHED = {"cachedContentTokenCount": 230, "candidatesTokenCount": 51, "promptTokenCount": 345,
          "totalTokenCount": 396}


def gemini(stack: Stack, version: str | None = None, key: str = VIRTUAL_KEY) -> genai.Client:
    options = types.HttpOptions(base_url=f"{stack.url}/gemini", api_version=version)
    return genai.Client(api_key=key, http_options=options)


@pytest.fixture(scope="module")
def client(stack: Stack) -> genai.Client:
    return gemini(stack)


def tokens(row: dict) -> tuple[int, ...]:
    return (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"],
            row["reasoning_tokens"])


def test_generate_content_row_has_usage_metadata_and_exact_cost(stack: Stack, client) -> None:
    """generateContent under /v1/ (the SDK's default): tokens, exact cost, provider key."""
    before = len(stack.rows())
    result = client.models.generate_content(model=MODEL, contents=PROMPT)
    meta = result.usage_metadata
    received = stack.sim.received[-1]
    assert received.path == f"/v1/models/{MODEL}:generateContent"
    headers = {k.lower(): v for k, v in received.headers.items()}
    assert headers["x-goog-api-key"] == PROVIDER_KEY and VIRTUAL_KEY not in str(headers)
    row = stack.rows(before + 1)[-1]
    assert tokens(row) == (meta.prompt_token_count, 0, meta.candidates_token_count, 0)
    cost = expected_cost(stack, "gemini", MODEL, input=meta.prompt_token_count,
                         output=meta.candidates_token_count)
    assert row_cost(row) == cost
    assert result.sdk_http_response.headers["x-meter-cost-usd"] == format(cost, "f")
    assert (row["provider"], row["endpoint"], row["model"], row["response_model"],
            row["stream"], row["status"], row["outcome"], row["usage_source"]) == (
        "gemini", "generateContent", MODEL, MODEL, 0, 200, "ok", "provider")
    assert row["pricing_version"].startswith("gemini.yaml@")


def test_v1beta_stream(stack: Stack) -> None:
    """The same call under /v1beta/, streamed with alt=sse."""
    beta = gemini(stack, "v1beta")  # held: a client closes its connections when collected
    before = len(stack.rows())
    chunks = list(beta.models.generate_content_stream(model=MODEL, contents=PROMPT))
    received = stack.sim.received[-1]
    assert (received.path, received.query) == (
        f"/v1beta/models/{MODEL}:streamGenerateContent", {"alt": "sse"})
    assert len(chunks) > 2
    assert chunks[0].usage_metadata.candidates_token_count is None  # running totals
    meta = chunks[-1].usage_metadata
    row = stack.rows(before + 1)[-1]
    assert (row["endpoint"], row["stream"]) == ("streamGenerateContent", 1)
    assert tokens(row) == (meta.prompt_token_count, 0, meta.candidates_token_count, 0)


def test_stream_thinking_and_grounding(stack: Stack, client) -> None:
    """Thoughts are output and reasoning; tool-use prompt tokens are input; one grounded
    request is billed per call on Gemini 2.5."""
    config = types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(include_thoughts=True, thinking_budget=512),
        tools=[types.Tool(google_search=types.GoogleSearch())])
    before = len(stack.rows())
    chunks = list(client.models.generate_content_stream(model=MODEL, contents=PROMPT,
                                                        config=config))
    assert chunks[0].candidates[0].content.parts[0].thought is True
    meta = chunks[-1].usage_metadata
    assert meta.thoughts_token_count and meta.tool_use_prompt_token_count
    row = stack.rows(before + 1)[-1]
    prompt = meta.prompt_token_count + meta.tool_use_prompt_token_count
    output = meta.candidates_token_count + meta.thoughts_token_count
    assert tokens(row) == (prompt, 0, output, meta.thoughts_token_count)
    assert row_cost(row) == expected_cost(stack, "gemini", MODEL, input=prompt, output=output,
                                          searches=1)


def test_gemini3_bills_each_search_query(stack: Stack, client) -> None:
    """Gemini 3 grounding is billed per search query the model ran."""
    model = "gemini-3-flash-preview"
    config = types.GenerateContentConfig(tools=[types.Tool(google_search=types.GoogleSearch())])
    before = len(stack.rows())
    result = client.models.generate_content(model=model, contents=PROMPT, config=config)
    queries = result.candidates[0].grounding_metadata.web_search_queries
    assert len(queries) == 2
    meta = result.usage_metadata
    row = stack.rows(before + 1)[-1]
    prompt = meta.prompt_token_count + meta.tool_use_prompt_token_count
    assert row_cost(row) == expected_cost(stack, "gemini", model, input=prompt,
                                          output=meta.candidates_token_count, searches=2)
    assert json.loads(row["cost_breakdown"])["classes"]["web_search"]["requests"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_cached_content_leaves_the_input_column(stack: Stack, client, stream: bool) -> None:
    """promptTokenCount includes the cached tokens: uncached = 345 - 230, at its own rate."""
    stack.sim.then(Scenario(usage=CACHED))
    before = len(stack.rows())
    if stream:
        list(client.models.generate_content_stream(model=MODEL, contents=PROMPT))
    else:
        client.models.generate_content(model=MODEL, contents=PROMPT)
    row = stack.rows(before + 1)[-1]
    assert tokens(row) == (115, 230, 51, 0)
    assert row_cost(row) == expected_cost(stack, "gemini", MODEL, input=115, cached=230,
                                          output=51)


def test_query_key_is_stripped_and_replaced(stack: Stack) -> None:
    """A key in ?key= never goes upstream: the provider key goes in x-goog-api-key."""
    body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]})
    before = len(stack.rows())
    reply = http("POST", f"{stack.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent"
                         f"?alt=sse&key={VIRTUAL_KEY}", body,
                 headers={"Content-Type": "application/json"})
    assert reply.status_code == 200 and reply.content.count(b"\r\n\r\n") >= 3
    received = stack.sim.received[-1]
    assert received.query == {"alt": "sse"}
    assert received.headers["x-goog-api-key"] == PROVIDER_KEY
    assert VIRTUAL_KEY not in str(received.headers)
    assert stack.rows(before + 1)[-1]["key_name"] == "team-a"


def test_json_array_stream_without_alt_sse(stack: Stack) -> None:
    """Without alt=sse the stream is one JSON array: relayed unchanged, metered all the same."""
    path = f"/v1beta/models/{MODEL}:streamGenerateContent"
    body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]})
    direct = http("POST", f"{stack.sim_url}{path}", body,
                  headers={"x-goog-api-key": PROVIDER_KEY, "Content-Type": "application/json"})
    before = len(stack.rows())
    reply = http("POST", f"{stack.url}/gemini{path}", body,
                 headers={"x-goog-api-key": VIRTUAL_KEY, "Content-Type": "application/json"})
    assert reply.status_code == 200 and reply.content == direct.content
    assert "x-meter-cost-usd" not in reply.headers  # streamed through, not held for a header
    chunks = reply.json()
    meta = chunks[-1]["usageMetadata"]
    row = stack.rows(before + 1)[-1]
    assert (row["stream"], row["usage_source"]) == (1, "provider")
    assert tokens(row) == (meta["promptTokenCount"], 0, meta["candidatesTokenCount"], 0)


@pytest.mark.parametrize("stream", [False, True])
def test_no_usage_metadata_is_estimated(stack: Stack, client, stream: bool) -> None:
    """A response without usageMetadata: both sides counted with tiktoken, and said so."""
    stack.sim.then(Scenario(omit_usage=True))
    before = len(stack.rows())
    if stream:
        text = "".join(c.text for c in client.models.generate_content_stream(
            model=MODEL, contents=PROMPT))
    else:
        text = client.models.generate_content(model=MODEL, contents=PROMPT).text
    row = stack.rows(before + 1)[-1]
    assert (row["outcome"], row["usage_source"]) == ("ok", "estimated")
    assert tokens(row) == (count_text(PROMPT, MODEL), 0, count_text(text, MODEL), 0)
    assert "o200k_base" in row["error"]


def test_async_client_stream_and_not(stack: Stack) -> None:
    """client.aio, streamed and not, concurrently: one row each with its usage."""
    async def run() -> list[types.GenerateContentResponseUsageMetadata]:
        sync = gemini(stack)
        aclient = sync.aio

        def config(feature: str) -> types.GenerateContentConfig:
            return types.GenerateContentConfig(http_options=types.HttpOptions(
                headers={"X-Meter-Feature": feature}))

        async def plain(i: int) -> types.GenerateContentResponseUsageMetadata:
            result = await aclient.models.generate_content(
                model=MODEL, contents=f"plain call {i}", config=config(f"plain-{i}"))
            return result.usage_metadata

        async def streamed(i: int) -> types.GenerateContentResponseUsageMetadata:
            stream = await aclient.models.generate_content_stream(
                model=MODEL, contents=f"streamed call number {i}", config=config(f"stream-{i}"))
            return [chunk async for chunk in stream][-1].usage_metadata

        try:
            return await asyncio.gather(*(plain(i) for i in range(3)),
                                        *(streamed(i) for i in range(3)))
        finally:
            await aclient.aclose()

    before = len(stack.rows())
    metas = asyncio.run(run())
    rows = {r["feature"]: r for r in stack.rows(before + 6)[before:]}
    features = [f"plain-{i}" for i in range(3)] + [f"stream-{i}" for i in range(3)]
    for feature, meta in zip(features, metas, strict=True):
        row = rows[feature]
        assert tokens(row) == (meta.prompt_token_count, 0, meta.candidates_token_count, 0)
        assert row["stream"] == int(feature.startswith("stream")) and row["outcome"] == "ok"


def test_count_tokens_passes_through_unmetered(stack: Stack, client) -> None:
    """countTokens is forwarded and logged at zero cost."""
    before = len(stack.rows())
    assert client.models.count_tokens(model=MODEL, contents=PROMPT).total_tokens > 0
    row = stack.rows(before + 1)[-1]
    assert (row["endpoint"], row["model"], row["cost_usd"], row["outcome"]) == (
        "countTokens", MODEL, 0.0, "ok")


def test_unknown_key_is_401_in_gemini_shape(stack: Stack) -> None:
    """An unknown key never reaches the provider and gets Gemini's UNAUTHENTICATED."""
    received = len(stack.sim.received)
    before = len(stack.rows())
    bad = gemini(stack, key="mp-nope")
    with pytest.raises(errors.ClientError) as err:
        bad.models.generate_content(model=MODEL, contents=PROMPT)
    assert (err.value.code, err.value.status) == (401, "UNAUTHENTICATED")
    assert len(stack.sim.received) == received
    assert len(stack.rows()) == before  # no row for a stranger: counted in /metrics
