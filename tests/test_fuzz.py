"""Bad input, fuzzed: bodies, headers, paths and query strings never make the proxy fail."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import VIRTUAL_KEY, Stack

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ENDPOINTS = ("/openai/v1/chat/completions", "/openai/v1/responses", "/openai/v1/embeddings",
             "/anthropic/v1/messages", "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
             "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)  # orjson's range
    | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
request_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(orjson.dumps),
    st.fixed_dictionaries({"model": st.text(max_size=20) | st.integers(-9, 2**40),
                           "stream": st.booleans() | st.text(max_size=3),
                           "messages": json_values, "max_tokens": json_values,
                           "contents": json_values}).map(orjson.dumps),
)


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("fuzz"), {"server": {"max_body_mb": 1}})
    yield s
    s.close()


# What a client reads when the proxy itself fails: the pipeline's own 500, and aiohttp's
# for an exception that escaped every handler.
PROXY_FAILED = (b"meterproxy failed on this call", b"Server got itself in trouble")


def raw_request(stack: Stack, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (no client-side validation); the status and the whole answer,
    headers and body (every request says `Connection: close`, so it ends at EOF)."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=20) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert b"\r\n\r\n" in data, data[:300]
    status_line = data.split(b"\r\n", 1)[0].split(b" ")
    return int(status_line[1]), data


def assert_not_a_proxy_failure(raw: bytes) -> None:
    """The answer's body is the provider's or a clear refusal, never the proxy's own 500."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert not any(m in body for m in (*PROXY_FAILED, b"Traceback")), raw[:500]


def post(stack: Stack, path: str, body: bytes, extra: bytes = b"") -> tuple[int, bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            f"Authorization: Bearer {VIRTUAL_KEY}\r\nx-api-key: {VIRTUAL_KEY}\r\n"
            f"x-goog-api-key: {VIRTUAL_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n"
    return raw_request(stack, head, body)


def assert_no_proxy_error(stack: Stack) -> None:
    rows = stack.rows()
    assert not [r for r in rows if r["outcome"] == "proxy_error"], "the proxy failed"


@FUZZ
@given(body=request_bodies, endpoint=st.sampled_from(ENDPOINTS))
def test_fuzzed_bodies(fuzz_stack: Stack, body: bytes, endpoint: str) -> None:
    """Any body to any metered endpoint: a provider-shaped answer, never a proxy failure."""
    _, raw = post(fuzz_stack, endpoint, body)
    assert_not_a_proxy_failure(raw)
    assert_no_proxy_error(fuzz_stack)


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.$!~ABC", min_size=1,
                       max_size=70)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                               blacklist_characters="\r\n\x7f"),
                        max_size=300)


@FUZZ
@given(tags=st.lists(st.tuples(header_names, header_values), max_size=40),
       customer=header_values,
       metadata=st.text(st.characters(min_codepoint=0x20, blacklist_characters="\x7f"),
                        max_size=80))
def test_fuzzed_attribution_headers(fuzz_stack: Stack, tags: list, customer: str,
                                    metadata: str) -> None:
    """Random tag names, values, sizes and encodings: 200 or a clear 400, never a failure.

    (Control characters are refused by the HTTP parser before any handler runs.)
    """
    lines = b"".join(f"X-Meter-Tag-{n}: {v}\r\n".encode("latin-1") for n, v in tags)
    lines += f"X-Meter-Customer: {customer}\r\n".encode("latin-1")
    lines += f"x-portkey-metadata: {metadata}\r\n".encode()
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    status, raw = post(fuzz_stack, ENDPOINTS[0], body, lines)
    assert status in (200, 400), raw[:300]
    if status == 400:
        assert b'"invalid_request_error"' in raw
    assert_not_a_proxy_failure(raw)
    assert_no_proxy_error(fuzz_stack)


@FUZZ
@given(path=st.lists(st.text(min_size=0, max_size=12), max_size=5),
       query=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=4),
       method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS"]))
def test_fuzzed_paths_and_queries(fuzz_stack: Stack, path: list[str], query: list,
                                  method: str) -> None:
    """Odd paths and query strings route or 404 cleanly, for every method."""
    target = "/" + "/".join(quote(p, safe="") for p in path)
    if query:
        target += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query)
    head = (f"{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            f"Authorization: Bearer {VIRTUAL_KEY}\r\nContent-Length: 0\r\n\r\n").encode()
    _, raw = raw_request(fuzz_stack, head)
    assert_not_a_proxy_failure(raw)
    assert_no_proxy_error(fuzz_stack)


def test_oversized_body_is_413_in_the_providers_shape(fuzz_stack: Stack) -> None:
    """A body over server.max_body_mb is refused with a 413 the SDK understands."""
    body = b'{"model": "gpt-4o-mini", "pad": "' + b"p" * (2 * 1024 * 1024) + b'"}'
    status, raw = post(fuzz_stack, ENDPOINTS[3], body)
    assert status == 413
    assert b'"type":"error"' in raw and b"request_too_large" in raw
