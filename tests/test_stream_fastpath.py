"""The stream fast paths: Anthropic and Gemini events are pre-filtered by their bytes and
only those that can carry usage are parsed, yet usage comes out exact however the bytes
are cut, and a stream without usage still has all its text for the estimate.

Expected counts are written out by hand from the events below (Anthropic: message_start
carries the input and cache counts, message_delta the cumulative totals, the last value
wins; Gemini: every chunk's usageMetadata is a running total and the finishing one is
final), never read back from the parsers.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import types
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tokens
from proxy.dialects import anthropic as anthropic_module
from proxy.dialects import gemini as gemini_module
from proxy.dialects.anthropic import AnthropicDialect
from proxy.dialects.base import Call
from proxy.dialects.gemini import GeminiDialect
from proxy.simulator import Scenario
from proxy.usage import Usage
from tests.conftest import VIRTUAL_KEY, Stack, http

ANTHROPIC = AnthropicDialect()
GEMINI = GeminiDialect()
MESSAGES = Call(endpoint="messages", model="claude-sonnet-4-5", stream=True, metered=True)
STREAM = Call(endpoint="streamGenerateContent", model="gemini-2.5-flash", stream=True,
              metered=True)
# Model output that looks like the events the byte filters look for: inside a JSON string
# its quotes and newlines are escaped, so it must stay text.
FORGED = ('event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":'
          '999999}}\n\n"usageMetadata":{"promptTokenCount":999999},"finishReason":"STOP"')


def sse(name: str | None, obj: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def delta(kind: str, key: str, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": kind, key: text}}


ANTHROPIC_TEXT = ["Let me ", "think", " about ", FORGED, "{\"q\": ", "\"Paris\"}", "Sunny."]
ANTHROPIC_EVENTS = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_fast", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5-20250929", "stop_reason": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 300,
                  "cache_read_input_tokens": 4000, "output_tokens": 1,
                  "cache_creation": {"ephemeral_5m_input_tokens": 100,
                                     "ephemeral_1h_input_tokens": 200}}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "thinking", "thinking": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", delta("thinking_delta", "thinking", ANTHROPIC_TEXT[0])),
    ("content_block_delta", delta("thinking_delta", "thinking", ANTHROPIC_TEXT[1])),
    ("content_block_delta", delta("thinking_delta", "thinking", ANTHROPIC_TEXT[2])),
    ("content_block_delta", delta("thinking_delta", "thinking", ANTHROPIC_TEXT[3])),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
    ("content_block_delta", delta("input_json_delta", "partial_json", ANTHROPIC_TEXT[4])),
    ("content_block_delta", delta("input_json_delta", "partial_json", ANTHROPIC_TEXT[5])),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("content_block_delta", delta("text_delta", "text", ANTHROPIC_TEXT[6])),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"input_tokens": 12, "cache_creation_input_tokens": 300,
                                 "cache_read_input_tokens": 4000, "output_tokens": 87,
                                 "server_tool_use": {"web_search_requests": 1}}}),
    ("message_stop", {"type": "message_stop"}),
]
ANTHROPIC_STREAM = b"".join(sse(name, obj) for name, obj in ANTHROPIC_EVENTS)
# By hand: input 12 (Anthropic's input excludes the cache), cache reads 4000, writes 300
# of which 200 for an hour (the split from message_start survives message_delta, which
# has none), output 87 (message_delta's cumulative count, not 87 + 1), one web search.
ANTHROPIC_PROMPT = Usage(input_tokens=12, cached_input_tokens=4000, cache_write_tokens=300,
                         cache_write_1h_tokens=200, web_search_requests=1)
ANTHROPIC_USAGE = Usage(input_tokens=12, cached_input_tokens=4000, cache_write_tokens=300,
                        cache_write_1h_tokens=200, output_tokens=87, web_search_requests=1)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def run(dialect: Any, call: Call, pieces: list[bytes]) -> tuple[bytes, Any]:
    meter = dialect.stream_meter(call)
    out = b"".join(meter.feed(piece) for piece in pieces)
    tail, metered = meter.finish()
    return out + tail, metered


splits = st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_STREAM)), max_size=25)


@settings(max_examples=150, deadline=None)
@given(points=splits)
def test_anthropic_usage_is_exact_at_any_cut(points: list[int]) -> None:
    out, metered = run(ANTHROPIC, MESSAGES, cut(ANTHROPIC_STREAM, points))
    assert out == ANTHROPIC_STREAM
    assert metered.usage == ANTHROPIC_USAGE
    assert metered.prompt_usage == ANTHROPIC_PROMPT
    assert (metered.response_model, metered.response_id, metered.error) == (
        "claude-sonnet-4-5-20250929", "msg_fast", None)
    assert metered.text.text() == "".join(ANTHROPIC_TEXT)


def json_parsed_by(module: Any, monkeypatch: Any) -> list[bytes]:
    """Every document `module` hands orjson to parse, in order (its orjson spied on)."""
    parsed: list[bytes] = []
    real = orjson.loads

    class Spy:
        JSONDecodeError = orjson.JSONDecodeError
        dumps = staticmethod(orjson.dumps)

        @staticmethod
        def loads(data: bytes) -> Any:
            parsed.append(bytes(data))
            return real(data)

    monkeypatch.setattr(module, "orjson", Spy)
    return parsed


def test_anthropic_content_deltas_are_never_parsed_when_usage_comes(monkeypatch) -> None:
    """The fast path itself: with usage in the stream, only the events that can carry it
    (and the few block starts and markers) reach the JSON parser, none of the deltas."""
    parsed = json_parsed_by(anthropic_module, monkeypatch)
    _, metered = run(ANTHROPIC, MESSAGES, [ANTHROPIC_STREAM])
    assert metered.usage == ANTHROPIC_USAGE
    kinds = [orjson.loads(data)["type"] for data in parsed]
    assert "content_block_delta" not in kinds
    assert kinds.count("message_delta") == 1 and kinds.count("message_start") == 1


def test_anthropic_spaced_json_takes_the_slow_path_to_the_same_usage() -> None:
    """A provider that writes its JSON with spaces (or no event lines) misses the byte
    filter: every event is parsed, with the same result."""
    spaced = b"".join(b"data: " + json.dumps(obj).encode() + b"\n\n"
                      for _, obj in ANTHROPIC_EVENTS)
    out, metered = run(ANTHROPIC, MESSAGES, [spaced[:100], spaced[100:]])
    assert out == spaced
    assert (metered.usage, metered.prompt_usage) == (ANTHROPIC_USAGE, ANTHROPIC_PROMPT)
    assert metered.text.text() == "".join(ANTHROPIC_TEXT)


@settings(max_examples=60, deadline=None)
@given(points=splits)
def test_anthropic_stream_cut_before_usage_keeps_input_and_all_its_text(
        points: list[int]) -> None:
    """No message_delta: no final usage, exact input counts, and every delta's text
    (read only now) for the estimate, counted as tiktoken counts it."""
    data = ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"\n\nevent: message_delta\n") + 2]
    _, metered = run(ANTHROPIC, MESSAGES, cut(data, [p for p in points if p <= len(data)]))
    assert metered.usage is None
    assert metered.prompt_usage == ANTHROPIC_PROMPT
    text = "".join(ANTHROPIC_TEXT)
    assert metered.text.text() == text
    assert metered.text.count() == tokens.count_text(text)


def test_anthropic_malformed_delta_is_noticed_when_usage_never_comes() -> None:
    data = (sse("message_start", ANTHROPIC_EVENTS[0][1])
            + b'event: content_block_delta\ndata: {"type":"content_block_delta",broken\n\n')
    _, metered = run(ANTHROPIC, MESSAGES, [data])
    assert metered.usage is None and metered.error == "malformed event in the stream"


# Gemini: running totals in every chunk; the finishing chunk's are final.
def gemini_chunk(text: str | None, prompt: int, out: int, thoughts: int = 0,
                 finish: bool = False, meta: bool = True, **more: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"index": 0}
    if text is not None:
        candidate["content"] = {"parts": [{"text": text}], "role": "model"}
    if finish:
        candidate["finishReason"] = "STOP"
    chunk: dict[str, Any] = {"candidates": [candidate], **more}
    if meta:
        chunk["usageMetadata"] = {"promptTokenCount": prompt, "cachedContentTokenCount": 64,
                                  "candidatesTokenCount": out, "thoughtsTokenCount": thoughts,
                                  "totalTokenCount": prompt + out + thoughts}
    chunk |= {"modelVersion": "gemini-2.5-flash", "responseId": "resp-fast"}
    return chunk


GEMINI_TEXT = ["Paris ", "is ", FORGED, "sunny", "."]
GEMINI_CHUNKS = [
    gemini_chunk(GEMINI_TEXT[0], 100, 2, thoughts=40),
    gemini_chunk(GEMINI_TEXT[1], 100, 4, thoughts=40),
    gemini_chunk(GEMINI_TEXT[2], 100, 30, thoughts=40),
    # A function call whose arguments name the keys the filter looks for: parsed whole,
    # its arguments are no usage.
    {"candidates": [{"content": {"parts": [{"functionCall": {"name": "lookup", "args": {
        "usageMetadata": {"promptTokenCount": 999999}, "finishReason": "STOP"}}}]},
        "index": 0}], "usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 64,
                                        "candidatesTokenCount": 41, "thoughtsTokenCount": 40},
     "modelVersion": "gemini-2.5-flash", "responseId": "resp-fast"},
    gemini_chunk(GEMINI_TEXT[3], 100, 45, thoughts=40),
    gemini_chunk(GEMINI_TEXT[4], 100, 47, thoughts=40, finish=True),
]
GEMINI_CALL_TEXT = orjson.dumps(GEMINI_CHUNKS[3]["candidates"][0]["content"]["parts"][0][
    "functionCall"]).decode()
GEMINI_SSE = b"".join(sse(None, chunk) for chunk in GEMINI_CHUNKS)
GEMINI_ARRAY = b"[" + b",\r\n".join(orjson.dumps(c) for c in GEMINI_CHUNKS) + b"]"
# By hand, from the finishing chunk: prompt 100 of which 64 cached -> input 36, cached 64;
# output = candidates 47 + thoughts 40 = 87, of which reasoning 40.
GEMINI_USAGE = Usage(input_tokens=36, cached_input_tokens=64, output_tokens=87,
                     reasoning_tokens=40)
GEMINI_PROMPT = Usage(input_tokens=36, cached_input_tokens=64)
GEMINI_ALL_TEXT = "".join(GEMINI_TEXT[:3]) + GEMINI_CALL_TEXT + "".join(GEMINI_TEXT[3:])


@settings(max_examples=150, deadline=None)
@given(points=st.lists(st.integers(min_value=0, max_value=len(GEMINI_SSE)), max_size=25),
       array=st.booleans())
def test_gemini_last_usage_wins_at_any_cut(points: list[int], array: bool) -> None:
    data = GEMINI_ARRAY if array else GEMINI_SSE
    out, metered = run(GEMINI, STREAM, cut(data, [p for p in points if p <= len(data)]))
    assert out == data
    assert metered.usage == GEMINI_USAGE
    assert metered.prompt_usage == GEMINI_PROMPT
    assert (metered.response_model, metered.response_id, metered.error) == (
        "gemini-2.5-flash", "resp-fast", None)
    assert metered.text.text() == GEMINI_ALL_TEXT


def test_gemini_usage_after_the_finishing_chunk_is_final() -> None:
    """finishReason first, the final totals in a later chunk that has nothing else."""
    chunks = [gemini_chunk("Hi", 10, 1), gemini_chunk(" there", 10, 2, finish=True),
              {"candidates": [], "usageMetadata": {"promptTokenCount": 10,
                                                   "candidatesTokenCount": 3},
               "modelVersion": "gemini-2.5-flash", "responseId": "resp-fast"}]
    _, metered = run(GEMINI, STREAM, [b"".join(sse(None, c) for c in chunks)])
    # Cached 64 exceeds the prompt of 10 in the first two: min(64, 10) = 10 cached, 0 input;
    # the final chunk names no cache: input 10, output 3.
    assert metered.usage == Usage(input_tokens=10, output_tokens=3)
    assert metered.text.text() == "Hi there"


def test_gemini_only_chunks_that_say_more_are_parsed_as_they_come(monkeypatch) -> None:
    """Text-and-totals chunks are held raw: the stream parses the function-call chunk and
    the finishing one, never every chunk (the chunk held before each is dropped unread:
    the newer one carries usage, model and id of its own)."""
    parsed = json_parsed_by(gemini_module, monkeypatch)
    _, metered = run(GEMINI, STREAM, [GEMINI_SSE])
    assert metered.usage == GEMINI_USAGE
    assert [orjson.loads(d) for d in parsed] == [GEMINI_CHUNKS[3], GEMINI_CHUNKS[5]]


def test_gemini_held_chunk_is_read_when_the_next_says_less() -> None:
    """A finishing chunk without usage, model or id of its own: the held chunk's are the
    last seen, so it is read first (finished after it: its totals are input only)."""
    chunks = [gemini_chunk("Hi", 10, 2), {"candidates": [{"index": 0,
                                                          "finishReason": "STOP"}]}]
    _, metered = run(GEMINI, STREAM, [b"".join(sse(None, c) for c in chunks)])
    # min(64 cached, prompt 10) = 10 cached, so no uncached input; no final usage (the
    # totals came before the finish), as the whole-stream reading gives.
    assert metered.usage is None
    assert metered.prompt_usage == Usage(cached_input_tokens=10)
    assert (metered.response_model, metered.response_id) == ("gemini-2.5-flash", "resp-fast")


def test_gemini_stream_without_usage_still_gets_its_tally() -> None:
    chunks = [gemini_chunk(t, 0, 0, meta=False) for t in ("Bonjour", " à", " tous")]
    _, metered = run(GEMINI, STREAM, [b"".join(sse(None, c) for c in chunks)])
    assert metered.usage is None and metered.prompt_usage is None
    assert metered.text.text() == "Bonjour à tous"
    assert metered.text.count() == tokens.count_text("Bonjour à tous", "gemini-2.5-flash")


def test_long_deferred_stream_stays_bounded_and_counts_exactly() -> None:
    """Megabytes of content deltas and no usage: memory held stays near FOLD_CHARS, and
    the count is tiktoken's count of the whole text."""
    piece = " lorem ipsum dolor"
    n = 60_000
    head = sse("message_start", ANTHROPIC_EVENTS[0][1])
    meter = ANTHROPIC.stream_meter(MESSAGES)
    meter.feed(head)
    event = sse("content_block_delta", delta("text_delta", "text", piece))
    peak = 0
    for _ in range(n):
        meter.feed(event)
        peak = max(peak, meter.metered.text.held)
    _, metered = meter.finish()
    assert peak <= 2 * metered.text.FOLD_CHARS and metered.text.folds > 0
    assert metered.text.count() == tokens.count_text(piece * n)


def test_nothing_tokenizes_on_the_event_loop(tmp_path: Path, monkeypatch) -> None:
    """Through the real proxy with a budget on, near enough its limit that every call's
    hold counts its prompt (room for fewer than 64 holds: docs/budgets.md), and streams
    that end without usage (Anthropic, Gemini) are estimated from their text; all of it
    runs on the tokenizer pool's threads, none on the thread of the proxy's loop."""
    seen: list[tuple[str, str]] = []

    def spy(real: Any) -> Any:
        def counted(*args: Any, **kw: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith("proxy.simulator"):  # the fake provider's own counts
                seen.append((caller, threading.current_thread().name))
            return real(*args, **kw)
        return counted

    monkeypatch.setattr(tokens, "count_text", spy(tokens.count_text))
    monkeypatch.setattr(tokens, "count_texts", spy(tokens.count_texts))
    stack = Stack(tmp_path, {"budgets": [{"scope": {"key": "team-a"}, "period": "day",
                                          "limit_tokens": 5_000}]})
    no_usage = {
        "anthropic": ("/anthropic/v1/messages", {"x-api-key": VIRTUAL_KEY},
                      {"model": "claude-haiku-4-5", "max_tokens": 50, "stream": True,
                       "messages": [{"role": "user", "content": "Hi"}]},
                      sse("message_start", {"type": "message_start", "message": {
                          "id": "msg_n", "model": "claude-haiku-4-5", "content": [],
                          "usage": {"input_tokens": 9, "output_tokens": 1}}})
                      + sse("content_block_delta", delta("text_delta", "text", "Hello"))
                      + sse("content_block_delta", delta("text_delta", "text", " there"))
                      + sse("message_stop", {"type": "message_stop"})),
        "gemini": ("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                   {"x-goog-api-key": VIRTUAL_KEY},
                   {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
                    "generationConfig": {"maxOutputTokens": 50}},
                   sse(None, gemini_chunk("Hello", 0, 0, meta=False))
                   + sse(None, gemini_chunk(" there", 0, 0, meta=False))),
    }
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                       messages=[{"role": "user", "content": "Hi"}])
        for path, headers, body, raw in no_usage.values():
            stack.sim.then(Scenario(raw_stream=raw))
            reply = http("POST", f"{stack.url}{path}", orjson.dumps(body),
                         {"Content-Type": "application/json", **headers})
            assert reply.status_code == 200 and reply.content == raw
        rows = stack.rows(3)
    finally:
        stack.close()
    # The streams' output is their text as o200k_base counts it ("Hello there": 2 tokens);
    # Anthropic's input is message_start's 9.
    assert [(r["provider"], r["usage_source"], r["output_tokens"]) for r in rows] == [
        ("openai", "provider", rows[0]["output_tokens"]),
        ("anthropic", "estimated", 2), ("gemini", "estimated", 2)]
    assert rows[1]["input_tokens"] == 9
    callers = [caller for caller, _ in seen]
    assert callers.count("proxy.budgets") == 3 and "proxy.dialects.base" in callers, seen
    assert all(name.startswith("tokens-") for _, name in seen), seen


# Through the real proxy: the reads the relay hands the meters are what the fast paths
# take. Events written one at a time with a pause arrive one per read; a body written at
# once arrives as one read (or a few): both must meter exactly what the events say.
GEMINI_STREAM_PATH = "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
ONE_PER_READ, ALL_AT_ONCE = "one event per read", "all at once"


def crlf(event: bytes) -> bytes:
    """An LF LF event ended as the Gemini API ends it, CR LF CR LF."""
    assert event.endswith(b"\n\n") and event.count(b"\n") == 2
    return event[:-2] + b"\r\n\r\n"


def wire(events: list[bytes], reads: str) -> Scenario:
    if reads == ONE_PER_READ:
        return Scenario(raw_events=events, chunk_delay_s=0.01)
    return Scenario(raw_stream=b"".join(events))


def gemini_raw(stack: Stack, events: list[bytes], reads: str) -> tuple[bytes, dict[str, Any]]:
    """POST a stream call whose upstream sends `events`: the bytes the client got, the row."""
    before = len(stack.rows())
    stack.sim.then(wire(events, reads))
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    reply = http("POST", f"{stack.url}{GEMINI_STREAM_PATH}", orjson.dumps(body),
                 {"Content-Type": "application/json", "x-goog-api-key": VIRTUAL_KEY})
    assert reply.status_code == 200
    return reply.content, stack.rows(before + 1)[-1]


def row_usage(row: dict[str, Any]) -> Usage:
    return Usage(**{column: row[column] for column in Usage().counts()})


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
@pytest.mark.parametrize("ending", ["crlf", "lf"])
def test_gemini_sdk_stream_through_the_proxy_is_metered_exactly(stack: Stack, reads: str,
                                                                ending: str) -> None:
    """google-genai streams GEMINI_CHUNKS through the proxy, CR LF CR LF as the API writes
    them or LF LF, a read per event or all at once: the SDK gets every chunk and the row
    has the finishing chunk's usage, not the forged or function-call numbers."""
    events = [sse(None, chunk) for chunk in GEMINI_CHUNKS]
    if ending == "crlf":
        events = [crlf(event) for event in events]
    client = genai.Client(api_key=VIRTUAL_KEY, http_options=types.HttpOptions(
        base_url=f"{stack.url}/gemini", api_version="v1beta"))
    before = len(stack.rows())
    stack.sim.then(wire(events, reads))
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash",
                                                        contents="Hi"))
    assert len(chunks) == len(GEMINI_CHUNKS)
    assert chunks[-1].usage_metadata.candidates_token_count == 47
    row = stack.rows(before + 1)[-1]
    assert row_usage(row) == GEMINI_USAGE
    assert (row["usage_source"], row["outcome"], row["error"], row["response_model"]) == (
        "provider", "ok", None, "gemini-2.5-flash")


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
def test_gemini_crlf_bytes_pass_unchanged_and_usage_is_exact(stack: Stack, reads: str) -> None:
    events = [crlf(sse(None, chunk)) for chunk in GEMINI_CHUNKS]
    out, row = gemini_raw(stack, events, reads)
    assert out == b"".join(events)
    assert row_usage(row) == GEMINI_USAGE and row["error"] is None


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
def test_gemini_finish_read_before_later_totals(stack: Stack, reads: str) -> None:
    """The finishing chunk is parsed as it passes, not held: the totals-only chunk after it
    replaces it, and its finishReason is what makes those totals final."""
    chunks = [gemini_chunk("Hi", 10, 1), gemini_chunk(" there", 10, 2, finish=True),
              {"candidates": [], "usageMetadata": {"promptTokenCount": 10,
                                                   "candidatesTokenCount": 3},
               "modelVersion": "gemini-2.5-flash", "responseId": "resp-fast"}]
    events = [crlf(sse(None, chunk)) for chunk in chunks]
    out, row = gemini_raw(stack, events, reads)
    assert out == b"".join(events)
    assert row_usage(row) == Usage(input_tokens=10, output_tokens=3)
    assert row["usage_source"] == "provider"


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
def test_gemini_crlf_stream_without_usage_is_estimated(stack: Stack, reads: str) -> None:
    """No usageMetadata anywhere: the row's output is the streamed text as o200k_base
    counts it, every chunk's text included (held raw by the fast path, read at the end)."""
    texts = ["Bonjour", " à", " tous", ", encore"]
    events = [crlf(sse(None, gemini_chunk(t, 0, 0, meta=False))) for t in texts]
    out, row = gemini_raw(stack, events, reads)
    assert out == b"".join(events)
    assert (row["usage_source"], row["outcome"]) == ("estimated", "ok")
    assert row["output_tokens"] == tokens.count_text("".join(texts), "gemini-2.5-flash") > 0


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
@pytest.mark.parametrize("ending", ["crlf", "lf"])
def test_gemini_cut_event_is_noted_and_usage_still_exact(stack: Stack, reads: str,
                                                         ending: str) -> None:
    """A chunk cut short mid-stream (it names usageMetadata but does not end as JSON
    does) is no chunk to hold: the row notes it, and the final usage is still exact."""
    events = [sse(None, chunk) for chunk in GEMINI_CHUNKS]
    events.insert(2, events[1][:-12] + b"\n\n")
    if ending == "crlf":
        events = [crlf(event) for event in events]
    out, row = gemini_raw(stack, events, reads)
    assert out == b"".join(events)
    assert row_usage(row) == GEMINI_USAGE
    assert (row["error"], row["usage_source"]) == ("malformed event in the stream", "provider")


ANTHROPIC_PATH = "/anthropic/v1/messages"
# ANTHROPIC_EVENTS with an empty text block started before the last delta: every inert
# event the fast path skips (ping, block stop, message stop, an empty text block start).
ANTHROPIC_SKIPPABLE = [*ANTHROPIC_EVENTS[:12], ("content_block_start", {
    "type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
    *ANTHROPIC_EVENTS[12:]]


def anthropic_raw(stack: Stack, events: list[bytes], reads: str) -> tuple[bytes, dict[str, Any]]:
    before = len(stack.rows())
    stack.sim.then(wire(events, reads))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}
    reply = http("POST", f"{stack.url}{ANTHROPIC_PATH}", orjson.dumps(body),
                 {"Content-Type": "application/json", "x-api-key": VIRTUAL_KEY,
                  "anthropic-version": "2023-06-01"})
    assert reply.status_code == 200
    return reply.content, stack.rows(before + 1)[-1]


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
def test_anthropic_sdk_stream_through_the_proxy_is_metered_exactly(stack: Stack,
                                                                   reads: str) -> None:
    """The anthropic SDK streams the events through the proxy, a read per event or all at
    once: its final message and the row carry message_delta's totals and the input and
    cache counts of message_start, and the web search begun in the stream."""
    client = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                 max_retries=0)
    events = [sse(name, obj) for name, obj in ANTHROPIC_SKIPPABLE]
    before = len(stack.rows())
    stack.sim.then(wire(events, reads))
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=200,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        message = stream.get_final_message()
    assert message.usage.output_tokens == 87
    row = stack.rows(before + 1)[-1]
    assert row_usage(row) == ANTHROPIC_USAGE
    assert (row["usage_source"], row["outcome"], row["error"], row["response_model"]) == (
        "provider", "ok", None, "claude-sonnet-4-5-20250929")


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
def test_anthropic_stream_without_usage_is_estimated(stack: Stack, reads: str) -> None:
    """No message_delta: input and cache counts from message_start, the output estimated
    from every delta's text (deferred raw, read at the end), the inert events skipped."""
    cut_at = next(i for i, (name, _) in enumerate(ANTHROPIC_SKIPPABLE)
                  if name == "message_delta")
    events = [sse(name, obj) for name, obj in ANTHROPIC_SKIPPABLE[:cut_at]]
    events.append(sse("message_stop", {"type": "message_stop"}))
    out, row = anthropic_raw(stack, events, reads)
    assert out == b"".join(events)
    assert row["usage_source"] == "estimated"
    assert row_usage(row) == replace(ANTHROPIC_PROMPT, output_tokens=tokens.count_text(
        "".join(ANTHROPIC_TEXT)))


# Events a byte-exact skip must not swallow: each keeps today's path and is noted.
NOT_INERT = {
    "cut ping": b'event: ping\ndata: {"type":"ping"\n\n',
    "error": b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
             b'"message":"Overloaded"}}\n\n',
    "stop named as an error": b'event: message_stop\ndata: {"type":"error","error":'
                              b'{"type":"api_error","message":"Overloaded"}}\n\n',
}


@pytest.mark.parametrize("reads", [ONE_PER_READ, ALL_AT_ONCE])
@pytest.mark.parametrize("kind", sorted(NOT_INERT))
def test_anthropic_malformed_or_error_event_is_still_noted(stack: Stack, reads: str,
                                                           kind: str) -> None:
    events = [sse(name, obj) for name, obj in ANTHROPIC_SKIPPABLE]
    events.insert(3, NOT_INERT[kind])
    out, row = anthropic_raw(stack, events, reads)
    assert out == b"".join(events)
    assert row_usage(row) == ANTHROPIC_USAGE
    noted = "malformed event in the stream" if kind == "cut ping" else "Overloaded"
    assert row["error"] == noted
