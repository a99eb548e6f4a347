"""The per-chunk stream fast path: when the whole events of a chunk (with the splitter's
pending bytes) can carry no usage and no error, OpenAI and Anthropic meters keep them as
one raw blob, read only if usage never comes. However the bytes are cut, the usage is
exact, and a stream without usage gives the same text and token estimate as the
per-event path (a CR LF copy of the stream, which always takes it).

Expected values are written out by hand from the events below, never read back from
the parsers: OpenAI's usage chunk gives prompt_tokens 20 and completion_tokens 7;
Anthropic's message_delta gives output_tokens 9 after message_start's input_tokens 11.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tokens
from proxy.dialects.anthropic import AnthropicDialect
from proxy.dialects.base import Call
from proxy.dialects.openai import OpenAIDialect
from proxy.usage import Usage

OPENAI = OpenAIDialect()
ANTHROPIC = AnthropicDialect()
CHAT = Call(endpoint="chat.completions", model="gpt-4o", stream=True, metered=True)
MESSAGES = Call(endpoint="messages", model="claude-sonnet-4-5", stream=True, metered=True)
# Model output that spells the markers the byte checks look for: inside a JSON string its
# quotes and newlines are escaped, so it stays text and must not stop the count.
FORGED = 'say "usage":{"prompt_tokens":999} and\n\nevent: message_delta\n\n"error"'
TEXT = ["The ", "capital ", "is ", FORGED, " Paris", ".", " Done"]


def chat_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chat_delta(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


CHAT_BODY = b"".join(chat_event(chat_delta(text)) for text in TEXT)
CHAT_USAGE_EVENT = chat_event({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                               "model": "gpt-4o-2024-08-06", "choices": [],
                               "usage": {"prompt_tokens": 20, "completion_tokens": 7,
                                         "total_tokens": 27}})
CHAT_WITH_USAGE = CHAT_BODY + CHAT_USAGE_EVENT + b"data: [DONE]\n\n"
CHAT_WITHOUT_USAGE = CHAT_BODY + b": keep-alive\n\n" + b"data: [DONE]\n\n"


def anthropic_event(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n"


ANTHROPIC_START = anthropic_event("message_start", {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "content": [],
    "model": "claude-sonnet-4-5-20250929", "usage": {"input_tokens": 11, "output_tokens": 1}}})
ANTHROPIC_BODY = ANTHROPIC_START + anthropic_event(
    "content_block_start", {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}) + b"".join(
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": text}})
    for text in TEXT)
ANTHROPIC_WITH_USAGE = ANTHROPIC_BODY + anthropic_event(
    "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                      "usage": {"output_tokens": 9}}) + anthropic_event(
    "message_stop", {"type": "message_stop"})


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(p for p in points if p <= len(data)), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def run(dialect: Any, call: Call, pieces: list[bytes]) -> tuple[bytes, Any]:
    meter = dialect.stream_meter(call)
    out = b"".join(meter.feed(piece) for piece in pieces)
    tail, metered = meter.finish()
    return out + tail, metered


def crlf(data: bytes) -> bytes:
    """The same stream with CR LF line ends: the per-event path reads it."""
    return data.replace(b"\n", b"\r\n")


points = st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_WITH_USAGE)), max_size=30)


@settings(max_examples=120, deadline=None)
@given(points=points)
def test_openai_stream_without_usage_estimates_as_the_per_event_path(points: list[int]) -> None:
    out, metered = run(OPENAI, CHAT, cut(CHAT_WITHOUT_USAGE, points))
    _, per_event = run(OPENAI, CHAT, [crlf(CHAT_WITHOUT_USAGE)])
    assert out == CHAT_WITHOUT_USAGE
    assert metered.usage is None and metered.error is None
    assert metered.response_model == "gpt-4o-2024-08-06"
    assert metered.text.text() == per_event.text.text() == "".join(TEXT)
    assert metered.text.count() == per_event.text.count() == tokens.count_text(
        "".join(TEXT), "gpt-4o")


@settings(max_examples=120, deadline=None)
@given(points=points)
def test_anthropic_stream_without_usage_estimates_as_the_per_event_path(
        points: list[int]) -> None:
    out, metered = run(ANTHROPIC, MESSAGES, cut(ANTHROPIC_BODY, points))
    _, per_event = run(ANTHROPIC, MESSAGES, [crlf(ANTHROPIC_BODY)])
    assert out == ANTHROPIC_BODY
    assert metered.usage is None and metered.error is None
    assert metered.prompt_usage == per_event.prompt_usage == Usage(input_tokens=11)
    assert metered.text.text() == per_event.text.text() == "".join(TEXT)
    assert metered.text.count() == per_event.text.count() == tokens.count_text("".join(TEXT))


def straddling(data: bytes, marker: bytes) -> st.SearchStrategy[list[int]]:
    """Random cuts, one of them always inside `marker` (its last occurrence)."""
    at = data.rindex(marker)
    inside = st.integers(min_value=at + 1, max_value=at + len(marker) - 1)
    return st.tuples(inside, points).map(lambda pair: [pair[0], *pair[1]])


@settings(max_examples=120, deadline=None)
@given(points=straddling(CHAT_WITH_USAGE, b'"usage":{'))
def test_openai_usage_marker_straddling_a_chunk_boundary_is_exact(points: list[int]) -> None:
    out, metered = run(OPENAI, CHAT, cut(CHAT_WITH_USAGE, points))
    assert out == CHAT_WITH_USAGE
    assert metered.usage == Usage(input_tokens=20, output_tokens=7)
    assert metered.error is None


ERROR_EVENT = chat_event({"error": {"message": "server overloaded", "type": "server_error"}})


@settings(max_examples=80, deadline=None)
@given(points=straddling(CHAT_BODY + ERROR_EVENT, b'"error"'))
def test_openai_error_marker_straddling_a_chunk_boundary_is_noted(points: list[int]) -> None:
    _, metered = run(OPENAI, CHAT, cut(CHAT_BODY + ERROR_EVENT, points))
    assert metered.usage is None and metered.error == "server overloaded"


@settings(max_examples=120, deadline=None)
@given(points=straddling(ANTHROPIC_WITH_USAGE, b"event: message_delta\n"))
def test_anthropic_usage_event_straddling_a_chunk_boundary_is_exact(points: list[int]) -> None:
    out, metered = run(ANTHROPIC, MESSAGES, cut(ANTHROPIC_WITH_USAGE, points))
    assert out == ANTHROPIC_WITH_USAGE
    assert metered.usage == Usage(input_tokens=11, output_tokens=9)
    assert metered.text.text() == "".join(TEXT)


def test_openai_malformed_event_in_a_blob_is_noted_when_usage_never_comes() -> None:
    data = chat_event(chat_delta("Hi")) + b"data: {broken\n\n" + chat_event(chat_delta("!"))
    _, metered = run(OPENAI, CHAT, [data[:20], data[20:]])
    assert metered.usage is None and metered.error == "malformed event in the stream"
    assert metered.text.text() == "Hi!"


def test_anthropic_ping_among_deltas_is_read_and_usage_stays_exact() -> None:
    ping = anthropic_event("ping", {"type": "ping"})
    data = ANTHROPIC_BODY + ping + ANTHROPIC_WITH_USAGE[len(ANTHROPIC_BODY):]
    _, metered = run(ANTHROPIC, MESSAGES, [data[i:i + 64] for i in range(0, len(data), 64)])
    assert metered.usage == Usage(input_tokens=11, output_tokens=9) and metered.error is None


def test_long_blob_stream_stays_bounded_by_bytes() -> None:
    """A 3 MB stream without usage, fed in 16 KB chunks: the tally never holds much more
    than its fold size, and the estimate still counts every word."""
    word = chat_event(chat_delta("word "))
    data = chat_event(chat_delta("")) + word * (3_000_000 // len(word))
    meter = OPENAI.stream_meter(CHAT)
    most = 0
    for at in range(0, len(data), 16384):
        meter.feed(data[at:at + 16384])
        most = max(most, meter.metered.text.held)
    _, metered = meter.finish()
    assert most <= 256 * 1024 + 16384 + len(word)
    assert metered.text.count() == tokens.count_text("word " * (3_000_000 // len(word)), "gpt-4o")


def per_event(data: bytes) -> list[bytes]:
    """One chunk per event, as providers write them (and as loopback delivers them)."""
    return [event + b"\n\n" for event in data.split(b"\n\n")[:-1]]


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(min_value=1, max_value=4), min_size=12, max_size=12))
def test_usage_is_exact_when_chunks_hold_whole_events(groups: list[int]) -> None:
    """Chunks that end exactly at event boundaries (one event each, or a few) take the
    shortest path; the usage event among them is still read."""
    for dialect, call, data, usage in (
            (OPENAI, CHAT, CHAT_WITH_USAGE, Usage(input_tokens=20, output_tokens=7)),
            (ANTHROPIC, MESSAGES, ANTHROPIC_WITH_USAGE, Usage(input_tokens=11, output_tokens=9))):
        events = per_event(data)
        pieces, at = [], 0
        for size in groups:
            pieces.append(b"".join(events[at:at + size]))
            at += size
        pieces.append(b"".join(events[at:]))
        out, metered = run(dialect, call, [p for p in pieces if p])
        assert out == data
        assert metered.usage == usage and metered.error is None
        assert metered.text.text() == "".join(TEXT)
        _, one_each = run(dialect, call, events)
        assert one_each.usage == usage
