"""relay: send the upstream response back unchanged, metering usage on the side.

Event streams go through chunk by chunk as they arrive; the meter sees each chunk once and
never holds the stream. Other bodies are read whole (up to BUFFER_LIMIT) so the cost can go
out as a header before the body; anything larger streams through as well.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy import headers as hop
from proxy.dialects.base import Metered
from proxy.errors import Kind, MeterError
from proxy.exchange import Exchange
from proxy.outcome import Outcome

BUFFER_LIMIT = 32 * 1024 * 1024
TAIL_KEEP = 256 * 1024
# How a response that had begun can break off on the upstream side.
_UPSTREAM_BROKE = (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)


def response_headers(upstream: aiohttp.ClientResponse, x: Exchange) -> CIMultiDict[str]:
    """The provider's headers, repeated ones (Set-Cookie) included, less hop-by-hop ones.

    The body reaches us decoded, so its Content-Encoding no longer applies."""
    headers = hop.strip(upstream.headers, toward_provider=False, drop=("content-encoding",))
    headers["X-Meter-Request-Id"] = x.id
    if x.budget_remaining is not None:
        headers["X-Meter-Budget-Remaining-USD"] = format(x.budget_remaining, "f")
    return headers


async def relay(
    x: Exchange,
    upstream: aiohttp.ClientResponse,
    settle: Callable[[Exchange], None],
) -> web.StreamResponse:
    """Return the upstream response to the client; `settle` prices it before headers go."""
    x.status = x.upstream_status = upstream.status
    x.upstream_request_id = upstream.headers.get(x.dialect.request_id_header)
    if upstream.status >= 400:
        x.outcome = Outcome.UPSTREAM_ERROR
    content_type = upstream.headers.get("Content-Type", "")
    try:
        # A streamed answer goes on as it arrives whatever its type (Gemini without alt=sse
        # streams one JSON array): a whole stream is never held back.
        if content_type.startswith("text/event-stream") or (x.call.stream
                                                            and upstream.status < 400):
            return await _relay_stream(x, upstream)
        return await _relay_body(x, upstream, settle)
    finally:
        upstream.release()


async def _relay_stream(x: Exchange, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    meter = x.dialect.stream_meter(x.call) if x.call.metered and upstream.status < 400 else None
    out = web.StreamResponse(status=upstream.status, headers=response_headers(upstream, x))
    await out.prepare(x.request)
    try:
        async for chunk in upstream.content.iter_any():
            x.mark_first_byte()
            data = meter.feed(chunk) if meter is not None else chunk
            if data:
                await _write(x, out, data)
    except _UPSTREAM_BROKE as exc:
        if x.outcome == Outcome.CLIENT_DISCONNECT:
            raise
        x.outcome = Outcome.UPSTREAM_ERROR
        x.error = f"upstream stream broke: {type(exc).__name__}"
    finally:
        if meter is not None:
            tail, x.metered = meter.finish()
        else:
            tail, x.metered = b"", Metered()
    if x.outcome == Outcome.UPSTREAM_ERROR and upstream.status < 400:
        # Pass the break on: a clean end would tell the client it has the whole answer.
        _abort(x)
        return out
    if tail:
        await _write(x, out, tail)
    if x.metered.error and x.outcome == Outcome.OK:
        x.error = x.metered.error
        if x.metered.usage is None:  # an error (event or junk) ended it before its usage
            x.outcome = Outcome.UPSTREAM_ERROR
    await out.write_eof()
    return out


async def _relay_body(
    x: Exchange, upstream: aiohttp.ClientResponse, settle: Callable[[Exchange], None]
) -> web.StreamResponse:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in upstream.content.iter_any():
            x.mark_first_byte()
            chunks.append(chunk)
            size += len(chunk)
            if size > BUFFER_LIMIT:
                return await _relay_large(x, upstream, chunks)
    except _UPSTREAM_BROKE as exc:
        # Nothing is sent yet: a clear 502 beats a 200 with half a body.
        raise MeterError(Kind.UPSTREAM_UNREACHABLE,
                         f"{x.provider} broke off its response ({type(exc).__name__})") from None
    body = b"".join(chunks)
    if x.call.metered and upstream.status < 400:
        x.metered = x.dialect.read_usage(x.call, body)
    headers = response_headers(upstream, x)
    settle(x)
    if x.cost is not None:
        headers["X-Meter-Cost-USD"] = format(x.cost, "f")
    return web.Response(status=upstream.status, body=body, headers=headers)


async def _relay_large(
    x: Exchange, upstream: aiohttp.ClientResponse, head: list[bytes]
) -> web.StreamResponse:
    """A body too large to hold: stream it on, keep its tail for the usage at its end."""
    out = web.StreamResponse(status=upstream.status, headers=response_headers(upstream, x))
    await out.prepare(x.request)
    tail = Tail(TAIL_KEEP)
    try:
        for chunk in head:
            await _write(x, out, chunk)
            tail.add(chunk)
        head.clear()
        async for chunk in upstream.content.iter_any():
            await _write(x, out, chunk)
            tail.add(chunk)
    except _UPSTREAM_BROKE as exc:
        if x.outcome == Outcome.CLIENT_DISCONNECT:
            raise
        x.outcome = Outcome.UPSTREAM_ERROR
        x.error = f"upstream body broke: {type(exc).__name__}"
        _abort(x)
        return out
    x.metered = x.dialect.read_usage(x.call, tail.bytes()) if x.call.metered else Metered()
    await out.write_eof()
    return out


class Tail:
    """The last `keep` bytes of a body: whole chunks in a deque, dropped from the front
    once the rest still covers `keep`, joined once at the end. No chunk is copied while
    the body passes (a 100 MB answer is not 0.5 GB of memcpy)."""

    __slots__ = ("_chunks", "_keep", "_size")

    def __init__(self, keep: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._keep = keep
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self._keep:
            self._size -= len(self._chunks.popleft())

    def bytes(self) -> bytes:
        return b"".join(self._chunks)[-self._keep:]


async def _write(x: Exchange, out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        x.outcome = Outcome.CLIENT_DISCONNECT
        x.error = "client disconnected mid-response"
        raise


def _abort(x: Exchange) -> None:
    transport = x.request.transport
    if transport is not None:
        transport.abort()
