"""Every way an Anthropic or Gemini call can fail still yields exactly one, truthful row.

Each test checks what the client got (status and body, or a broken stream) and the row:
its outcome, and usage that is neither lost nor counted twice.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from google import genai
from google.genai import errors, types

from proxy import tokens
from proxy.simulator import Scenario, reply_text, split_text
from tests.conftest import KEY_ENV, VIRTUAL_KEY, Stack, free_port, http

CLAUDE = "claude-haiku-4-5"
GEMINI = "gemini-2.5-flash"
PROMPT = "Tell me about usage meters"
PIECES = split_text(reply_text(PROMPT))  # the deltas the simulator streams, in order
PROMPT_TOKENS = 5  # PROMPT in o200k_base, the proxy's estimate for Claude and Gemini too
# The simulator reports this many input tokens more than tiktoken counts: a row holding
# PROMPT_TOKENS + OFFSET took the provider's count, one holding PROMPT_TOKENS estimated it.
OFFSET = 1000
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The usual stack plus one provider of each dialect that nothing listens for."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    s = Stack(tmp_path_factory.mktemp("failures"), {"providers": {
        "anthropic-down": {"base_url": nowhere, "dialect": "anthropic", "api_key_env": KEY_ENV},
        "gemini-down": {"base_url": nowhere, "dialect": "gemini", "api_key_env": KEY_ENV}}})
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose providers time out after 0.3 s of silence."""
    s = Stack(tmp_path_factory.mktemp("slow"), {"providers": {
        "anthropic": {"timeout_s": 0.3}, "gemini": {"timeout_s": 0.3}}})
    yield s
    s.close()


def claude(stack: Stack, provider: str = "anthropic") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base(provider, ""), api_key=VIRTUAL_KEY,
                               max_retries=0)


def gemini(stack: Stack, provider: str = "gemini") -> genai.Client:
    return genai.Client(api_key=VIRTUAL_KEY,
                        http_options=types.HttpOptions(base_url=f"{stack.url}/{provider}"))


def call(stack: Stack, dialect: str, provider: str | None = None, stream: bool = False) -> Any:
    """One call through the official SDK of `dialect`; its usage, or the SDK's exception."""
    if dialect == "anthropic":
        client = claude(stack, provider or "anthropic")
        messages = [{"role": "user", "content": PROMPT}]
        if stream:
            with client.messages.stream(model=CLAUDE, max_tokens=256, messages=messages) as s:
                return s.get_final_message().usage
        return client.messages.create(model=CLAUDE, max_tokens=256, messages=messages).usage
    client = gemini(stack, provider or "gemini")
    if stream:
        return list(client.models.generate_content_stream(model=GEMINI, contents=PROMPT))
    return client.models.generate_content(model=GEMINI, contents=PROMPT).usage_metadata


def error_of(stack: Stack, dialect: str, provider: str | None = None,
             stream: bool = False) -> tuple[int, dict]:
    """The status and JSON body of the error the SDK raised."""
    kinds = (anthropic.APIStatusError,) if dialect == "anthropic" else (errors.APIError,)
    with pytest.raises(kinds) as err:
        call(stack, dialect, provider, stream)
    if dialect == "anthropic":
        return err.value.status_code, err.value.body
    return err.value.code, err.value.details


def one_row(stack: Stack, before: int) -> dict:
    """The single row a call added: exactly one more than before."""
    rows = stack.rows(before + 1)
    assert len(rows) == before + 1, rows[before:]
    return rows[-1]


UPSTREAM_ERRORS = [
    ("anthropic", 529, {"type": "error", "error": {"type": "overloaded_error",
                                                   "message": "Overloaded"},
                        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}),
    ("anthropic", 400, {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "max_tokens: Field required"},
                        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fz"}),
    ("gemini", 429, {"error": {"code": 429, "message": "Resource has been exhausted "
                               "(e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}),
    ("gemini", 500, {"error": {"code": 500, "message": "An internal error has occurred.",
                               "status": "INTERNAL"}}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("dialect", "status", "body"), UPSTREAM_ERRORS)
def test_upstream_error_passes_through_unchanged(stack: Stack, dialect: str, status: int,
                                                 body: dict, stream: bool) -> None:
    """The provider's 4xx/5xx reaches the SDK as sent; one upstream_error row, cost 0."""
    raw = orjson.dumps(body)
    stack.sim.then(Scenario(status=status, body=raw, headers={"request-id": "req_upstream"}))
    before = len(stack.rows())
    assert error_of(stack, dialect, stream=stream) == (status, body)
    row = one_row(stack, before)
    assert (row["status"], row["outcome"], row["cost_usd"], row["input_tokens"],
            row["output_tokens"], row["stream"]) == (status, "upstream_error", 0.0, 0, 0,
                                                     int(stream))
    if dialect == "anthropic":
        assert row["upstream_request_id"] == "req_upstream"


@pytest.mark.parametrize(("dialect", "shape"), [
    ("anthropic", {"type": "error", "error": {"type": "api_error"}}),
    ("gemini", {"error": {"code": 502, "status": "UNAVAILABLE"}}),
])
def test_unreachable_provider_is_502(stack: Stack, dialect: str, shape: dict) -> None:
    """Nothing listening upstream: a 502 in the provider's own shape, one row."""
    before = len(stack.rows())
    status, body = error_of(stack, dialect, f"{dialect}-down")
    assert status == 502 and _contains(body, shape)
    assert "cannot reach" in str(body)
    row = one_row(stack, before)
    assert (row["provider"], row["status"], row["outcome"], row["cost_usd"]) == (
        f"{dialect}-down", 502, "upstream_error", 0.0)


@pytest.mark.parametrize(("dialect", "shape"), [
    ("anthropic", {"type": "error", "error": {"type": "timeout_error"}}),
    ("gemini", {"error": {"code": 504, "status": "DEADLINE_EXCEEDED"}}),
])
def test_slow_provider_is_504_after_timeout(slow: Stack, dialect: str, shape: dict) -> None:
    """No answer within the provider's timeout_s: a 504 in its shape, one row."""
    slow.sim.then(Scenario(hang_s=1.0))
    before = len(slow.rows())
    status, body = error_of(slow, dialect)
    assert status == 504 and _contains(body, shape)
    row = one_row(slow, before)
    assert (row["status"], row["outcome"], row["cost_usd"]) == (504, "upstream_error", 0.0)
    assert "did not answer within 0.3 s" in row["error"]


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"])
def test_reset_before_headers_is_502(stack: Stack, dialect: str) -> None:
    """The provider drops the connection before answering: 502, one row."""
    stack.sim.then(Scenario(reset_before_headers=True))
    before = len(stack.rows())
    status, _ = error_of(stack, dialect)
    assert status == 502
    row = one_row(stack, before)
    assert (row["status"], row["outcome"]) == (502, "upstream_error")


# Events before the first text delta: Anthropic's message_start, content_block_start and
# ping; Gemini's text starts in its first chunk.
LEAD = {"anthropic": 3, "gemini": 0}


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"])
def test_stream_cut_after_n_chunks_is_estimated(stack: Stack, dialect: str) -> None:
    """A reset after 3 text chunks: the client's stream breaks; the row keeps the provider's
    input count and estimates the output as tiktoken's count of the text streamed."""
    stack.sim.then(Scenario(cut_after=LEAD[dialect] + 3, input_offset=OFFSET))
    before = len(stack.rows())
    streamed: list[str] = []
    with pytest.raises(Exception) as err:
        if dialect == "anthropic":
            client = claude(stack)
            with client.messages.stream(model=CLAUDE, max_tokens=256,
                                        messages=[{"role": "user", "content": PROMPT}]) as s:
                streamed.extend(s.text_stream)
        else:
            client = gemini(stack)
            for chunk in client.models.generate_content_stream(model=GEMINI, contents=PROMPT):
                streamed.append(chunk.text)
    assert not isinstance(err.value, AssertionError)
    text = "".join(PIECES[:3])
    assert "".join(streamed) == text
    row = one_row(stack, before)
    model = CLAUDE if dialect == "anthropic" else GEMINI
    assert (row["status"], row["outcome"], row["usage_source"], row["stream"]) == (
        200, "upstream_error", "partial", 1)
    assert row["output_tokens"] == tokens.count_text(text, model)
    # The input count came from the provider (message_start / the early chunks), exactly.
    assert row["input_tokens"] == PROMPT_TOKENS + OFFSET
    assert "upstream stream broke" in row["error"] and "o200k_base" in row["error"]
    assert row["cost_usd"] > 0


def test_stream_cut_before_any_usage_counts_the_prompt(stack: Stack) -> None:
    """Reset right after the headers: the prompt is counted from the request, output 0."""
    stack.sim.then(Scenario(cut_after=0))
    before = len(stack.rows())
    system = "You are terse."
    with pytest.raises(Exception) as err:
        client = claude(stack)
        with client.messages.stream(model=CLAUDE, max_tokens=256, system=system,
                                    messages=[{"role": "user", "content": PROMPT}]) as s:
            s.until_done()
    assert not isinstance(err.value, AssertionError)
    row = one_row(stack, before)
    assert (row["outcome"], row["usage_source"], row["output_tokens"]) == (
        "upstream_error", "partial", 0)
    assert row["input_tokens"] == tokens.count_texts([system, PROMPT], CLAUDE)


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"])
def test_client_disconnect_stops_reading_upstream(stack: Stack, dialect: str) -> None:
    """The client leaves after its first text: the proxy stops reading the provider, and
    the row says client_disconnect with the usage consumed so far."""
    text = " ".join(f"word{i}" for i in range(400))
    pieces = split_text(text, 40)
    stack.sim.then(Scenario(text=text, chunk_delay_s=0.02, input_offset=OFFSET))
    abandoned = stack.sim.abandoned
    before = len(stack.rows())
    if dialect == "anthropic":
        path = "/anthropic/v1/messages"
        body = {"model": CLAUDE, "max_tokens": 4096, "stream": True,
                "messages": [{"role": "user", "content": PROMPT}]}
        headers = {"x-api-key": VIRTUAL_KEY, "anthropic-version": "2023-06-01"}
    else:
        path = f"/gemini/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse"
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
        headers = {"x-goog-api-key": VIRTUAL_KEY}
    first = _read_then_leave(stack, path, orjson.dumps(body), headers, b"word0")
    assert first.startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 10
    while stack.sim.abandoned == abandoned and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.sim.abandoned == abandoned + 1  # the provider saw its reader go away
    row = one_row(stack, before)
    model = CLAUDE if dialect == "anthropic" else GEMINI
    assert (row["status"], row["outcome"], row["usage_source"]) == (
        200, "client_disconnect", "partial")
    assert row["input_tokens"] == PROMPT_TOKENS + OFFSET  # the provider's count
    # Whatever had arrived when the client left: some whole prefix of the deltas.
    prefixes = {tokens.count_text("".join(pieces[:n]), model) for n in range(1, len(pieces))}
    assert row["output_tokens"] in prefixes


def _read_then_leave(stack: Stack, path: str, body: bytes, headers: dict[str, str],
                     until: bytes) -> bytes:
    """Send a request on a raw socket, read until `until` arrives, then close it."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n{head}\r\n").encode() + body
    got = b""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(request)
        while until not in got:
            data = sock.recv(65536)
            assert data, "the proxy closed the stream first"
            got += data
    return got


def test_error_event_mid_stream_is_upstream_error(stack: Stack) -> None:
    """Anthropic's overloaded_error event mid-stream: the SDK raises, the row is partial."""
    raw = (FIXTURES / "anthropic_stream_error.sse").read_bytes()
    stack.sim.then(Scenario(raw_stream=raw))
    before = len(stack.rows())
    with pytest.raises(anthropic.APIStatusError) as err:
        call(stack, "anthropic", stream=True)
    assert err.value.body["error"]["type"] == "overloaded_error"
    row = one_row(stack, before)
    assert (row["status"], row["outcome"], row["usage_source"], row["error"].split(";")[0]) == (
        200, "upstream_error", "partial", "Overloaded")
    assert (row["input_tokens"], row["output_tokens"]) == (
        25, tokens.count_text("Once upon a", CLAUDE))


MALFORMED = {
    "anthropic": (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"type":"message","role":"assistant","content":[],"model":"claude-haiku-4-5",'
        b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"del\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"output_tokens":7}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
    "gemini": (
        b'data: {"candidates": [{"content": {"parts": [{"text": "Hel\r\n\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": "lo"}], "role": "model"},'
        b' "finishReason": "STOP", "index": 0}], "usageMetadata": {"promptTokenCount": 25,'
        b' "candidatesTokenCount": 7, "totalTokenCount": 32}, "modelVersion": '
        b'"gemini-2.5-flash"}\r\n\r\n'),
}


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"])
def test_malformed_event_is_relayed_and_noted(stack: Stack, dialect: str) -> None:
    """A broken event passes to the client untouched; the final usage still counts once."""
    stack.sim.then(Scenario(raw_stream=MALFORMED[dialect]))
    before = len(stack.rows())
    path, headers = _raw_target(dialect)
    reply = _post(stack, path, headers)
    assert reply.endswith(MALFORMED[dialect])
    row = one_row(stack, before)
    assert (row["status"], row["outcome"], row["usage_source"], row["input_tokens"],
            row["output_tokens"], row["error"]) == (
        200, "ok", "provider", 25, 7, "malformed event in the stream")


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"])
def test_stream_that_is_not_sse_is_estimated(stack: Stack, dialect: str) -> None:
    """An HTML page where events should be: relayed as is; the row counts the prompt."""
    junk = b"<html><body>502 Bad Gateway</body></html>\n"
    stack.sim.then(Scenario(raw_stream=junk))
    before = len(stack.rows())
    path, headers = _raw_target(dialect)
    assert _post(stack, path, headers).endswith(junk)
    row = one_row(stack, before)
    model = CLAUDE if dialect == "anthropic" else GEMINI
    assert (row["status"], row["outcome"], row["usage_source"], row["output_tokens"]) == (
        200, "upstream_error", "partial", 0)
    assert row["input_tokens"] == tokens.count_text(PROMPT, model)
    assert row["error"].startswith("malformed event in the stream")


def _raw_target(dialect: str) -> tuple[str, dict[str, str]]:
    if dialect == "anthropic":
        return "/anthropic/v1/messages", {"x-api-key": VIRTUAL_KEY}
    return (f"/gemini/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse",
            {"x-goog-api-key": VIRTUAL_KEY})


def _post(stack: Stack, path: str, headers: dict[str, str]) -> bytes:
    """A streamed request in plain HTTP; the whole response body."""
    if path.startswith("/anthropic"):
        body = {"model": CLAUDE, "max_tokens": 256, "stream": True,
                "messages": [{"role": "user", "content": PROMPT}]}
    else:
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    return http("POST", f"{stack.url}{path}", orjson.dumps(body),
                headers={"Content-Type": "application/json", **headers}).content


def _contains(body: Any, shape: Any) -> bool:
    """Whether every key of `shape` is in `body` with the same value (nested)."""
    if isinstance(shape, dict):
        return isinstance(body, dict) and all(k in body and _contains(body[k], v)
                                              for k, v in shape.items())
    return body == shape
