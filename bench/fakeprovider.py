"""A fake OpenAI provider that answers at once with canned bytes, for the load benchmark.

Unlike `proxy.simulator` it does no work per call beyond reading the request: every
answer (a chat completion with usage, or an SSE stream of N chunks) is built at start-up,
so what the benchmark measures is whatever stands in front of it.

    python -m bench.fakeprovider --port 9100 [--chunks 20] [--chunk-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from aiohttp import web

HOST = "127.0.0.1"
MODEL = "gpt-4o-mini-2024-07-18"
CREATED = 1_721_172_741
PROMPT_TOKENS = 31
REQUEST_ID = "req_bench_0000000000000000"
_WORDS = ("Hello", " there", ",", " benchmark", ".", " This", " answer", " is", " canned",
          " and", " arrives", " at", " once", ";", " every", " piece", " is", " one",
          " token", " long")


def pieces(n: int) -> list[str]:
    """The reply text cut into `n` one-token pieces."""
    return [_WORDS[i % len(_WORDS)] for i in range(n)]


def usage(completion_tokens: int) -> dict[str, Any]:
    """An OpenAI usage object as the API sends it."""
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def completion_body(chunks: int) -> bytes:
    """A whole chat completion whose reply is the text of `chunks` pieces."""
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "".join(pieces(chunks)),
                                             "refusal": None, "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage(chunks), "service_tier": "default", "system_fingerprint": "fp_bench",
    })


def stream_events(chunks: int, include_usage: bool) -> list[bytes]:
    """The wire events of a streamed chat completion: role, pieces, stop, usage, [DONE]."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED,
            "model": MODEL, "service_tier": "default", "system_fingerprint": "fp_bench"}
    extra = {"usage": None} if include_usage else {}

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}], **extra}

    events = [choice({"role": "assistant", "content": "", "refusal": None})]
    events += [choice({"content": piece}) for piece in pieces(chunks)]
    events.append(choice({}, "stop"))
    if include_usage:
        events.append({**head, "choices": [], "usage": usage(chunks)})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def make_app(chunks: int = 20, chunk_delay_ms: float = 0.0) -> web.Application:
    """The fake provider: POST /v1/chat/completions, JSON or stream as the body asks."""
    body = completion_body(chunks)
    streams = {True: stream_events(chunks, True), False: stream_events(chunks, False)}
    delay = chunk_delay_ms / 1000

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return web.json_response({"error": {"message": "body is not a JSON object",
                                                "type": "invalid_request_error"}}, status=400)
        if payload.get("stream") is not True:
            return web.Response(body=body, headers={"Content-Type": "application/json",
                                                    "x-request-id": REQUEST_ID})
        options = payload.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                          "Cache-Control": "no-cache",
                                          "x-request-id": REQUEST_ID})
        await out.prepare(request)
        for event in streams[include]:
            await out.write(event)
            if delay:
                await asyncio.sleep(delay)
        await out.write_eof()
        return out

    async def otlp(request: web.Request) -> web.Response:
        await request.read()  # an OTLP/HTTP sink for `loadgen --otel`: accept, drop
        return web.Response(content_type="application/x-protobuf", body=b"")

    app = web.Application(client_max_size=256 * 1024 * 1024)  # hostile-input bench: 60 MB
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/traces", otlp)
    app.router.add_post("/v1/metrics", otlp)
    return app


def new_loop() -> asyncio.AbstractEventLoop:
    """The event loop every benchmark process uses: uvloop when installed, as meterproxy does."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help=f"port on {HOST}")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="pause between stream events (default: none)")
    args = parser.parse_args()
    web.run_app(make_app(args.chunks, args.chunk_delay_ms), host=HOST, port=args.port,
                access_log=None, print=None, loop=new_loop())


if __name__ == "__main__":
    main()
