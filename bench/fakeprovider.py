"""A fake provider that answers at once with canned bytes, in all three wire formats.

Unlike `proxy.simulator` it does no work per call beyond reading the request (and, for
OpenAI and Anthropic, its `stream` flag): every answer is built at start-up, so what the
benchmark measures is whatever stands in front of it. The shapes follow the providers'
recorded answers (tests/fixtures/replay, /work/shared/PROVIDERS.md), usage included:

- OpenAI `POST /v1/chat/completions`: a chat completion, or an SSE stream of a role chunk,
  N content chunks, a stop chunk, a usage chunk (with `stream_options.include_usage`) and
  `data: [DONE]`.
- Anthropic `POST /v1/messages`: a message, or `event:`/`data:` pairs: message_start (input
  usage), content_block_start, ping, N text deltas, content_block_stop, message_delta
  (cumulative output usage), message_stop.
- Gemini `POST /{v1,v1beta}/models/{model}:generateContent` and
  `:streamGenerateContent?alt=sse`: a response, or N `data:` chunks separated by CRLF blank
  lines, each with running `usageMetadata` totals, the last with `finishReason`.

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
ANTHROPIC_MODEL = "claude-haiku-4-5-20251001"
GEMINI_MODEL = "gemini-2.5-flash"
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


def anthropic_usage(output_tokens: int) -> dict[str, Any]:
    """An Anthropic usage object as a recorded answer carries it (no cache use)."""
    return {"input_tokens": PROMPT_TOKENS, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens, "service_tier": "standard"}


def anthropic_message(chunks: int) -> bytes:
    """A whole Messages API answer whose text is `chunks` pieces."""
    return orjson.dumps({
        "id": "msg_01BenchBenchBenchBenchBench", "type": "message", "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [{"type": "text", "text": "".join(pieces(chunks))}],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": anthropic_usage(chunks)})


def anthropic_events(chunks: int) -> list[bytes]:
    """The wire events of a streamed message, as the API sends them."""
    start = anthropic_usage(1)
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01BenchBenchBenchBenchBench", "type": "message", "role": "assistant",
            "model": ANTHROPIC_MODEL, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": start}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}})
               for piece in pieces(chunks)]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"input_tokens": PROMPT_TOKENS,
                                     "cache_creation_input_tokens": 0,
                                     "cache_read_input_tokens": 0,
                                     "output_tokens": chunks}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            for name, data in events]


def gemini_usage(candidates: int | None) -> dict[str, Any]:
    """Gemini usageMetadata; running totals, as each streamed chunk carries them."""
    out: dict[str, Any] = {"promptTokenCount": PROMPT_TOKENS}
    if candidates is not None:
        out["candidatesTokenCount"] = candidates
    out |= {"totalTokenCount": PROMPT_TOKENS + (candidates or 0),
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": PROMPT_TOKENS}]}
    return out


def gemini_response(text: str, candidates: int | None, finish: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": gemini_usage(candidates),
            "modelVersion": GEMINI_MODEL, "responseId": "benchBenchBenchBench0000"}


def gemini_body(chunks: int) -> bytes:
    """A whole generateContent answer whose text is `chunks` pieces."""
    return orjson.dumps(gemini_response("".join(pieces(chunks)), chunks, True))


def gemini_events(chunks: int) -> list[bytes]:
    """streamGenerateContent?alt=sse: one chunk per piece, running usage, CRLF separators."""
    out = []
    for i, piece in enumerate(pieces(chunks)):
        last = i == chunks - 1
        running = i + 1 if i or last else None  # the first chunk: prompt counts only
        out.append(b"data: " + orjson.dumps(gemini_response(piece, running, last))
                   + b"\r\n\r\n")
    return out


def _stream_flag(payload: Any) -> bool | None:
    return payload.get("stream") is True if isinstance(payload, dict) else None


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": None}}, status=400)


def make_app(chunks: int = 20, chunk_delay_ms: float = 0.0) -> web.Application:
    """The fake provider: the three dialects' chat endpoints, JSON or stream as asked."""
    body = completion_body(chunks)
    streams = {True: stream_events(chunks, True), False: stream_events(chunks, False)}
    message, message_events = anthropic_message(chunks), anthropic_events(chunks)
    generated, generated_events = gemini_body(chunks), gemini_events(chunks)
    delay = chunk_delay_ms / 1000
    json_headers = {"Content-Type": "application/json", "x-request-id": REQUEST_ID,
                    "request-id": REQUEST_ID}
    sse_headers = {"Content-Type": "text/event-stream; charset=utf-8",
                   "Cache-Control": "no-cache", "x-request-id": REQUEST_ID,
                   "request-id": REQUEST_ID}

    async def send(request: web.Request, events: list[bytes]) -> web.StreamResponse:
        out = web.StreamResponse(headers=sse_headers)
        await out.prepare(request)
        for event in events:
            await out.write(event)
            if delay:
                await asyncio.sleep(delay)
        await out.write_eof()
        return out

    async def read_json(request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None

    async def chat(request: web.Request) -> web.StreamResponse:
        payload = await read_json(request)
        stream = _stream_flag(payload)
        if stream is None:
            return _bad_request("body is not a JSON object")
        if not stream:
            return web.Response(body=body, headers=json_headers)
        options = payload.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        return await send(request, streams[include])

    async def messages(request: web.Request) -> web.StreamResponse:
        stream = _stream_flag(await read_json(request))
        if stream is None:
            return web.json_response({"type": "error", "error": {
                "type": "invalid_request_error", "message": "body is not a JSON object"}},
                status=400)
        if not stream:
            return web.Response(body=message, headers=json_headers)
        return await send(request, message_events)

    async def gemini(request: web.Request) -> web.StreamResponse:
        await request.read()
        action = request.match_info["action"].rpartition(":")[2]
        if action == "generateContent":
            return web.Response(body=generated, headers=json_headers)
        if action == "streamGenerateContent" and request.query.get("alt") == "sse":
            return await send(request, generated_events)
        return web.json_response({"error": {"code": 404, "message": f"no {action} here",
                                            "status": "NOT_FOUND"}}, status=404)

    async def otlp(request: web.Request) -> web.Response:
        await request.read()  # an OTLP/HTTP sink for `loadgen --otel`: accept, drop
        return web.Response(content_type="application/x-protobuf", body=b"")

    app = web.Application(client_max_size=256 * 1024 * 1024)  # hostile-input bench: 60 MB
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    for version in ("v1", "v1beta"):
        app.router.add_post(f"/{version}/models/{{action}}", gemini)
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
