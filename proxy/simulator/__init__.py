"""A simulated LLM provider: a real aiohttp server speaking the providers' wire formats.

`meterproxy demo` runs it so a newcomer sees metering without an API key; the test suite
runs it as the fake upstream. Answers are deterministic: the reply text derives from the
prompt and the usage is tiktoken's exact count, unless a queued Scenario says otherwise
(custom usage, an input count off by a given offset, an error status, a stream cut after N
chunks, a hang, a reset...).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Scenario:
    """How the simulator answers the next call (defaults: a normal, complete answer)."""

    usage: dict[str, Any] | None = None  # the provider's own usage object, verbatim
    # Added to the input count the provider reports: a number the proxy's own tokenizer
    # cannot arrive at, so a test sees whether a row took the provider's count.
    input_offset: int = 0
    text: str | None = None  # the reply text (default: derived from the prompt)
    model: str | None = None  # the response's model (default: the request's)
    status: int = 200
    body: bytes | None = None  # a raw body to send instead (errors, junk)
    headers: dict[str, str] = field(default_factory=dict)
    omit_usage: bool = False  # a provider that never reports usage
    cut_after: int | None = None  # streams: reset the connection after N events
    cut_body_at: int | None = None  # whole bodies: reset after this many bytes
    hang_s: float = 0.0  # wait this long before answering
    reset_before_headers: bool = False
    raw_stream: bytes | None = None  # a stream body to send verbatim, in one write
    raw_events: list[bytes] | None = None  # a stream body to send verbatim, a write each
    chunk_delay_s: float = 0.0
    repeat: int = 1  # answer this many calls this way


@dataclass
class Received:
    """A request as the simulator saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class Simulator:
    """The fake provider's state: what it received and what it will answer next."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        # Calls whose client (the proxy) had gone by the time the answer was ready, or went
        # away mid-stream (a proxy that stopped reading).
        self.abandoned = 0
        # Stream events written so far, over all calls (back-pressure shows here).
        self.events_sent = 0
        self._scenarios: collections.deque[Scenario] = collections.deque()

    def then(self, scenario: Scenario) -> None:
        """Queue a scenario for the next call(s)."""
        self._scenarios.append(scenario)

    def next_scenario(self) -> Scenario:
        if not self._scenarios:
            return Scenario()
        scenario = self._scenarios[0]
        scenario.repeat -= 1
        if scenario.repeat <= 0:
            self._scenarios.popleft()
        return scenario

    def app(self) -> web.Application:
        import importlib

        from proxy.dialects import registry

        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[_unreadable])
        app[SIMULATOR] = self
        # Every dialect has its simulator module, of the same name.
        for name in registry():
            importlib.import_module(f"proxy.simulator.{name}").add_routes(app, self)
        return app

    async def receive(self, request: web.Request) -> tuple[Received, Scenario]:
        body = await request.read()
        received = Received(request.method, request.path, dict(request.query),
                            dict(request.headers), body)
        self.received.append(received)
        scenario = self.next_scenario()
        if scenario.hang_s:
            await asyncio.sleep(scenario.hang_s)
            if request.transport is None or request.transport.is_closing():
                self.abandoned += 1
        if scenario.reset_before_headers:
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError
        return received, scenario


SIMULATOR = web.AppKey("simulator", Simulator)


@web.middleware
async def _unreadable(request: web.Request, handler: Any) -> web.StreamResponse:
    """A request the simulator cannot read gets a 400 in its provider's shape, as a real
    provider answers it, not a crash (the fuzz tests send every kind of body)."""
    try:
        return await handler(request)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        message = f"simulated provider cannot read the request: {type(exc).__name__}"
        if request.path.startswith("/v1/messages"):
            body: dict[str, Any] = {"type": "error", "error": {
                "type": "invalid_request_error", "message": message}}
        elif "/models/" in request.path:
            body = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
        else:
            body = {"error": {"message": message, "type": "invalid_request_error",
                              "param": None, "code": None}}
        return web.json_response(body, status=400)


async def send_events(request: web.Request, scenario: Scenario, events: list[bytes],
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Stream SSE events one write each, cutting or pausing as the scenario says."""
    out = web.StreamResponse(status=scenario.status, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        **(headers or {}), **scenario.headers})
    await out.prepare(request)
    if scenario.raw_stream is not None:
        events = [scenario.raw_stream]
    elif scenario.raw_events is not None:
        events = scenario.raw_events
    try:
        for i, event in enumerate(events):
            if scenario.cut_after is not None and i >= scenario.cut_after:
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return out
            await out.write(event)
            request.app[SIMULATOR].events_sent += 1
            if scenario.chunk_delay_s:
                await asyncio.sleep(scenario.chunk_delay_s)
        await out.write_eof()
    except ConnectionError:
        request.app[SIMULATOR].abandoned += 1
        raise
    return out


async def send_body(request: web.Request, scenario: Scenario, body: bytes,
                    content_type: str = "application/json") -> web.StreamResponse:
    """A whole body with its Content-Length, or its first `cut_body_at` bytes and a reset."""
    headers = {"Content-Type": content_type, **scenario.headers}
    if scenario.cut_body_at is None:
        return web.Response(status=scenario.status, body=body, headers=headers)
    out = web.StreamResponse(status=scenario.status, headers=headers)
    out.content_length = len(body)
    await out.prepare(request)
    await out.write(body[: scenario.cut_body_at])
    if request.transport is not None:
        request.transport.abort()
    return out


def reply_text(prompt: str) -> str:
    """A deterministic answer that reads like one."""
    words = [w for w in prompt.replace("\n", " ").split(" ") if w][:12]
    topic = " ".join(words) if words else "nothing in particular"
    return (f"Here is a simulated answer about: {topic}. It has a few sentences, "
            "so that streams carry several chunks and usage has real numbers.")


def bounded_text(text: str, model: str | None, limit: Any) -> str:
    """The text cut to at most `limit` tokens, as a provider stops at max_tokens."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return text
    from proxy import tokens

    encoding = tokens.get_encoding(tokens.encoding_name(model))
    ids = encoding.encode(text)
    return text if len(ids) <= limit else encoding.decode(ids[:limit])


def split_text(text: str, pieces: int = 8) -> list[str]:
    """Cut text into stream deltas at word boundaries (leading spaces kept, like real ones)."""
    words = text.split(" ")
    size = max(1, len(words) // pieces)
    parts = []
    for i in range(0, len(words), size):
        chunk = " ".join(words[i:i + size])
        parts.append(chunk if i == 0 else " " + chunk)
    return parts
