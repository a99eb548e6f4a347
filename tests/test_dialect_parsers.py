"""The Anthropic and Gemini parsers on recorded wire bytes, split at every byte boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, MultiDict

from proxy.dialects import for_name
from proxy.dialects.anthropic import AnthropicDialect
from proxy.dialects.base import Call
from proxy.dialects.gemini import ArraySplitter, GeminiDialect
from proxy.errors import Kind, MeterError
from proxy.usage import Usage

FIXTURES = Path(__file__).parent / "fixtures"
ANTHROPIC = AnthropicDialect()
GEMINI = GeminiDialect()
MESSAGES = Call(endpoint="messages", model="claude-sonnet-4", stream=True, metered=True)
STREAM = Call(endpoint="streamGenerateContent", model="gemini-2.5-flash", stream=True,
              metered=True)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def meter(dialect: Any, call: Call, pieces: list[bytes]) -> tuple[bytes, Any]:
    """Feed pieces to a fresh meter; what the client got and what was metered."""
    m = dialect.stream_meter(call)
    out = b"".join(m.feed(piece) for piece in pieces)
    tail, metered = m.finish()
    return out + tail, (metered.usage, metered.prompt_usage, metered.text.text(),
                        metered.response_model, metered.error)


def every_split(dialect: Any, call: Call, data: bytes) -> tuple:
    """The metered result, checked identical for every two-piece split and byte by byte."""
    whole_out, whole = meter(dialect, call, [data])
    assert whole_out == data  # the client gets every byte, unchanged
    for i in range(len(data) + 1):
        out, got = meter(dialect, call, [data[:i], data[i:]])
        assert (out, got) == (data, whole), f"split at byte {i}"
    out, got = meter(dialect, call, [data[i:i + 1] for i in range(len(data))])
    assert (out, got) == (data, whole)
    return whole


def test_anthropic_basic_stream_takes_the_last_output_count() -> None:
    """docs/providers.md's stream: output is message_delta's 6, not 6 + message_start's 1."""
    usage, prompt, text, model, error = every_split(
        ANTHROPIC, MESSAGES, fixture("anthropic_stream_basic.sse"))
    assert usage == Usage(input_tokens=11, output_tokens=6)
    assert prompt == Usage(input_tokens=11)
    assert (text, model, error) == ("Hello", "claude-3-opus-latest", None)


def test_anthropic_cumulative_delta_with_cache_thinking_and_search() -> None:
    """Repeated input counts overwrite, never add; the cache split survives message_delta."""
    usage, prompt, text, model, _ = every_split(
        ANTHROPIC, MESSAGES, fixture("anthropic_stream_cache_thinking_search.sse"))
    assert usage == Usage(input_tokens=3, cached_input_tokens=9511, cache_write_tokens=1956,
                          cache_write_1h_tokens=1500, output_tokens=644, reasoning_tokens=210,
                          web_search_requests=1, service_tier="standard")
    assert prompt == Usage(input_tokens=3, cached_input_tokens=9511, cache_write_tokens=1956,
                           cache_write_1h_tokens=1500, web_search_requests=1,
                           service_tier="standard")
    assert text == ('The user wants today\'s "weather" {in Paris}. A search will tell.'
                    '{"query": "weather Paris"}Paris is sunny, 21 °C — café weather.')
    assert model == "claude-sonnet-4-20250514"


def test_anthropic_error_event_leaves_input_counts_and_text() -> None:
    """An overloaded_error mid-stream: no final usage, but the input counts and text stay."""
    usage, prompt, text, _, error = every_split(ANTHROPIC, MESSAGES,
                                                fixture("anthropic_stream_error.sse"))
    assert usage is None and prompt == Usage(input_tokens=25)
    assert (text, error) == ("Once upon a", "Overloaded")


def test_anthropic_cut_after_a_search_keeps_it() -> None:
    """A stream cut after a web search began, before message_delta: the search still counts."""
    data = fixture("anthropic_stream_cache_thinking_search.sse")
    cut = data[:data.index(b"event: content_block_start\ndata: {\"type\":\"content_block_start"
                           b"\",\"index\":3")]
    _, (usage, prompt, _, _, _) = meter(ANTHROPIC, MESSAGES, [cut])
    assert usage is None
    assert prompt == Usage(input_tokens=3, cached_input_tokens=9511, cache_write_tokens=1956,
                           cache_write_1h_tokens=1500, web_search_requests=1,
                           service_tier="standard")


def test_anthropic_whole_body() -> None:
    """A non-streamed message: recorded usage with a 5-minute-only split."""
    metered = ANTHROPIC.read_usage(MESSAGES, fixture("anthropic_message.json"))
    assert metered.usage == Usage(input_tokens=3, cached_input_tokens=9511,
                                  cache_write_tokens=1956, output_tokens=44)
    assert metered.response_model == "claude-haiku-4-5-20251001"


@pytest.mark.parametrize(("body", "expected"), [
    ({"cache_creation_input_tokens": 1956, "input_tokens": 3, "output_tokens": 44},
     Usage(input_tokens=3, cache_write_tokens=1956, output_tokens=44)),
    ({"cache_creation": {"ephemeral_1h_input_tokens": 70, "ephemeral_5m_input_tokens": 30},
      "input_tokens": 1, "output_tokens": 2},
     Usage(input_tokens=1, cache_write_tokens=100, cache_write_1h_tokens=70, output_tokens=2)),
    ({"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "input_tokens": 10809,
      "output_tokens": 644, "server_tool_use": {"web_fetch_requests": 0,
                                                "web_search_requests": 1},
      "service_tier": "standard"},
     Usage(input_tokens=10809, output_tokens=644, web_search_requests=1,
           service_tier="standard")),
    ({"input_tokens": None, "output_tokens": 5, "cache_creation": None,
      "output_tokens_details": {"thinking_tokens": 3}},
     Usage(output_tokens=5, reasoning_tokens=3)),
])
def test_anthropic_usage_shapes(body: dict, expected: Usage) -> None:
    """Absent split: every write is 5-minute; null and absent mean zero."""
    metered = ANTHROPIC.read_usage(MESSAGES, orjson.dumps({"usage": body}))
    assert metered.usage == expected


def test_gemini_sse_stream_last_chunk_is_final() -> None:
    """Running totals: the finishing chunk's counts, thoughts and tool-use prompt included."""
    usage, prompt, text, model, error = every_split(GEMINI, STREAM,
                                                    fixture("gemini_stream.sse"))
    assert usage == Usage(input_tokens=17 + 119, output_tokens=201 + 213, reasoning_tokens=213,
                          web_search_requests=1)  # Gemini 2.5: per grounded request
    assert prompt == Usage(input_tokens=17 + 119, web_search_requests=1)
    assert text == ("**Checking the forecast**\n\nI will look it up.Paris is sunny, 21 °C — "
                    "café weather.")
    assert (model, error) == ("gemini-2.5-flash", None)


def test_gemini_json_array_stream() -> None:
    """Without alt=sse: brackets, quotes and backslashes in strings never cut an element."""
    data = fixture("gemini_stream.json")
    usage, prompt, text, _, error = every_split(GEMINI, STREAM, data)
    assert usage == Usage(input_tokens=345 - 230, cached_input_tokens=230, output_tokens=51)
    assert prompt == Usage(input_tokens=345 - 230, cached_input_tokens=230)
    assert text == "".join(part["text"] for chunk in orjson.loads(data)
                           for part in chunk["candidates"][0]["content"]["parts"])
    assert error is None
    # Read whole (a client that asked for no stream gets the same array in one body).
    assert GEMINI.read_usage(STREAM, data).usage == usage


def test_gemini_whole_body_and_gemini3_search_queries() -> None:
    """generateContent: cached tokens leave the input; Gemini 3 bills each search query."""
    call = Call(endpoint="generateContent", model="gemini-2.5-flash", metered=True)
    metered = GEMINI.read_usage(call, fixture("gemini_response.json"))
    assert metered.usage == Usage(input_tokens=115, cached_input_tokens=230, output_tokens=51)
    body = orjson.dumps({"candidates": [{"finishReason": "STOP", "groundingMetadata": {
        "webSearchQueries": ["a", "b", "c"]}}], "usageMetadata": {"promptTokenCount": 5}})
    gemini3 = Call(endpoint="generateContent", model="gemini-3-flash-preview", metered=True)
    assert GEMINI.read_usage(gemini3, body).usage.web_search_requests == 3
    assert GEMINI.read_usage(call, body).usage.web_search_requests == 1


def test_gemini_cut_stream_has_input_counts_only() -> None:
    """A stream cut before the finishing chunk reports no final usage, only input counts."""
    data = fixture("gemini_stream.sse")
    cut = data[:data.rindex(b"data: ")]
    _, (usage, prompt, text, _, _) = meter(GEMINI, STREAM, [cut])
    assert usage is None and prompt == Usage(input_tokens=17)
    assert text.endswith("Paris is sunny")


def test_array_splitter_elements_at_every_split() -> None:
    """Nested arrays, escaped backslashes before quotes and brackets in strings."""
    elements = [b'{"a": "x]\\\\", "b": [1, {"c": "}\\"{["}]}', b'{"d": []}', b'[{"e": "]"}]']
    data = b" [\r\n" + b",\r\n".join(elements) + b"\r\n]"
    for i in range(len(data) + 1):
        splitter = ArraySplitter()
        assert splitter.feed(data[:i]) + splitter.feed(data[i:]) == elements, i
    splitter = ArraySplitter()
    assert [e for i in range(len(data)) for e in splitter.feed(data[i:i + 1])] == elements


def test_describe_anthropic_paths() -> None:
    """Only POST /v1/messages is metered; count_tokens and the rest pass through."""
    body = {"model": "claude-haiku-4-5", "max_tokens": 1024, "stream": True, "messages": []}
    call = ANTHROPIC.describe("POST", "/v1/messages", body)
    assert (call.endpoint, call.model, call.stream, call.metered, call.max_output_tokens) == (
        "messages", "claude-haiku-4-5", True, True, 1024)
    counted = ANTHROPIC.describe("POST", "/v1/messages/count_tokens", body)
    assert (counted.endpoint, counted.metered) == ("count_tokens", False)
    assert ANTHROPIC.describe("GET", "/v1/models", None).endpoint == "models"
    assert not ANTHROPIC.describe("GET", "/v1/messages", None).metered


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_describe_gemini_paths(version: str) -> None:
    """The model and the method come from the path; the output limit from generationConfig."""
    body = {"contents": [], "generationConfig": {"maxOutputTokens": 256}}
    stream = GEMINI.describe("POST", f"/{version}/models/gemini-2.5-pro:streamGenerateContent",
                             body)
    assert (stream.endpoint, stream.model, stream.stream, stream.metered,
            stream.max_output_tokens) == ("streamGenerateContent", "gemini-2.5-pro", True, True,
                                          256)
    once = GEMINI.describe("POST", f"/{version}/models/gemini-2.5-flash:generateContent", {})
    assert (once.endpoint, once.stream, once.metered, once.max_output_tokens) == (
        "generateContent", False, True, None)
    count = GEMINI.describe("POST", f"/{version}/models/gemini-2.5-flash:countTokens", body)
    assert (count.endpoint, count.model, count.metered) == ("countTokens", "gemini-2.5-flash",
                                                            False)
    assert GEMINI.describe("GET", f"/{version}/models", None).endpoint == "models"


def test_anthropic_keys_in_and_out() -> None:
    """x-api-key or Bearer in; the provider key goes out in x-api-key, the client's removed."""
    assert ANTHROPIC.client_key(make_mocked_request(
        "POST", "/v1/messages", headers={"x-api-key": "mp-1"})) == "mp-1"
    assert ANTHROPIC.client_key(make_mocked_request(
        "POST", "/v1/messages", headers={"Authorization": "Bearer mp-2"})) == "mp-2"
    headers = CIMultiDict({"X-Api-Key": "mp-1", "Authorization": "Bearer mp-2",
                           "anthropic-version": "2023-06-01", "anthropic-beta": "b1"})
    ANTHROPIC.set_upstream_key(headers, MultiDict(), "sk-ant", None)
    assert dict(headers) == {"anthropic-version": "2023-06-01", "anthropic-beta": "b1",
                             "x-api-key": "sk-ant"}


def test_gemini_keys_in_and_out() -> None:
    """x-goog-api-key or ?key= in; both removed, the provider key goes in the header."""
    assert GEMINI.client_key(make_mocked_request(
        "POST", "/v1beta/models/m:generateContent?key=mp-q")) == "mp-q"
    assert GEMINI.client_key(make_mocked_request(
        "POST", "/v1/models/m:generateContent", headers={"x-goog-api-key": "mp-h"})) == "mp-h"
    headers = CIMultiDict({"x-goog-api-key": "mp-h"})
    query = MultiDict([("alt", "sse"), ("key", "mp-q")])
    GEMINI.set_upstream_key(headers, query, "AIza-real", None)
    assert dict(headers) == {"x-goog-api-key": "AIza-real"} and list(query.items()) == [
        ("alt", "sse")]


@pytest.mark.parametrize("kind", list(Kind))
def test_error_shapes(kind: Kind) -> None:
    """Every proxy error in each provider's own shape; budget refusals name budget_exceeded."""
    err = MeterError(kind, "budget 'month' of customer=acme: limit 100 USD")
    anthropic_body = orjson.loads(ANTHROPIC.error_body(err))
    assert anthropic_body["type"] == "error" and set(anthropic_body["error"]) == {"type",
                                                                                  "message"}
    gemini_body = orjson.loads(GEMINI.error_body(err))["error"]
    assert set(gemini_body) == {"code", "message", "status"}
    assert gemini_body["code"] == err.status
    if kind is Kind.BUDGET_EXCEEDED:
        assert anthropic_body["error"]["type"] == "budget_exceeded"
        assert gemini_body["status"] == "RESOURCE_EXHAUSTED"
        assert "budget_exceeded" in gemini_body["message"]
    if kind is Kind.AUTHENTICATION:
        assert (anthropic_body["error"]["type"], gemini_body["status"]) == (
            "authentication_error", "UNAUTHENTICATED")


def test_prompt_texts() -> None:
    """System, message text, tool inputs and tool definitions; images are not text."""
    body = {"system": [{"type": "text", "text": "Be brief."}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "get_weather",
                     "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"},
                    {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]}
    texts, overhead = ANTHROPIC.prompt_texts(MESSAGES, body)
    assert texts == ["Be brief.", "Weather?", '{"city":"Paris"}', "Sunny",
                     '[{"name":"get_weather","input_schema":{"type":"object"}}]']
    assert overhead == 0
    gemini = {"systemInstruction": {"parts": [{"text": "Be brief."}]},
              "contents": [{"role": "user", "parts": [{"text": "Weather?"},
                                                      {"inlineData": {"data": "AAAA"}}]},
                           {"role": "model", "parts": [{"functionCall": {
                               "name": "get_weather", "args": {"city": "Paris"}}}]}],
              "tools": [{"googleSearch": {}}]}
    texts, _ = GEMINI.prompt_texts(STREAM, gemini)
    assert texts == ["Be brief.", "Weather?", '{"name":"get_weather","args":{"city":"Paris"}}',
                     '[{"googleSearch":{}}]']


def test_for_name_loads_both() -> None:
    """The dialect registry finds the two new adapters by their config names."""
    assert isinstance(for_name("anthropic"), AnthropicDialect)
    assert isinstance(for_name("gemini"), GeminiDialect)


def test_registry_declares_every_dialect_once() -> None:
    """Config names, built-in providers, key headers and tiers all come from the specs."""
    import importlib

    from proxy.dialects import builtin_providers, key_headers, registry, standard_tiers
    from proxy.dialects.openai import OpenAIDialect

    assert sorted(registry()) == ["anthropic", "gemini", "openai"]
    assert isinstance(for_name("openai"), OpenAIDialect)
    with pytest.raises(ValueError, match="no dialect named 'soap'"):
        for_name("soap")
    assert builtin_providers()["anthropic"][0] == "anthropic"
    assert builtin_providers()["groq"] == ("openai", registry()["openai"].providers["groq"])
    assert {"authorization", "x-api-key", "x-goog-api-key", "api-key"} == key_headers()
    assert {"default", "standard"} <= standard_tiers() and "flex" not in standard_tiers()
    for name in registry():
        assert callable(importlib.import_module(f"proxy.simulator.{name}").add_routes)


def test_anthropic_iterations_are_summed_and_advisor_steps_kept_apart() -> None:
    """With iterations the top level counts only `message` steps: compaction steps are
    added, advisor steps kept for their own model (pydantic-ai cassettes' usage bodies)."""
    from proxy.dialects.anthropic import usage

    compaction = {"input_tokens": 229, "output_tokens": 5, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "iterations": [
                      {"type": "compaction", "input_tokens": 100, "output_tokens": 131,
                       "cache_creation_input_tokens": 55096, "cache_read_input_tokens": 0},
                      {"type": "message", "input_tokens": 229, "output_tokens": 5,
                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}]}
    got = usage(compaction)
    assert (got.input_tokens, got.cache_write_tokens, got.output_tokens) == (329, 55096, 136)
    advisor = {"input_tokens": 2390, "output_tokens": 121,
               "output_tokens_details": {"thinking_tokens": 28}, "iterations": [
                   {"type": "message", "input_tokens": 1128, "output_tokens": 110},
                   {"type": "advisor_message", "model": "claude-opus-4-8",
                    "input_tokens": 2518, "output_tokens": 22},
                   {"type": "message", "input_tokens": 1262, "output_tokens": 11}]}
    got = usage(advisor)
    assert (got.input_tokens, got.output_tokens, got.reasoning_tokens) == (2390, 121, 28)
    assert [(m, u.input_tokens, u.output_tokens) for m, u in got.nested] == \
        [("claude-opus-4-8", 2518, 22)]


def test_openai_cache_writes_by_ttl_and_modalities() -> None:
    """Responses usage with cache writes split by TTL (30m / 12h) and image input."""
    from proxy.dialects.openai import _usage

    got = _usage("responses", {
        "input_tokens": 5000, "output_tokens": 40,
        "input_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 3000,
                                 "image_tokens": 200,
                                 "cache_write_tokens_details": {"ttl_30m_tokens": 1000,
                                                                "ttl_12h_tokens": 2000}},
        "output_tokens_details": {"reasoning_tokens": 10}}, "flex")
    assert (got.input_tokens, got.image_input_tokens, got.cached_input_tokens) == (1000, 200, 1000)
    assert (got.cache_write_tokens, got.cache_write_30m_tokens,
            got.cache_write_12h_tokens) == (3000, 1000, 2000)
    assert (got.output_tokens, got.reasoning_tokens, got.service_tier) == (40, 10, "flex")


def test_gemini_modalities_split_cached_and_uncached() -> None:
    """Cached audio is its own class; uncached audio is the prompt's audio less the
    cached audio (usageMetadata details per modality)."""
    from proxy.dialects.gemini import usage

    got = usage({"promptTokenCount": 1000, "cachedContentTokenCount": 600,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 500},
                                         {"modality": "AUDIO", "tokenCount": 500}],
                 "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 200},
                                        {"modality": "AUDIO", "tokenCount": 400}],
                 "candidatesTokenCount": 30,
                 "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 20}]})
    assert (got.input_tokens, got.audio_input_tokens) == (400, 100)
    assert (got.cached_input_tokens, got.cached_audio_input_tokens) == (600, 400)
    assert (got.output_tokens, got.image_output_tokens) == (30, 20)
