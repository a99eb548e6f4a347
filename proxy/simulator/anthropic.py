"""The simulator's Anthropic Messages API: /v1/messages (streamed or not) and count_tokens.

Streams follow the real wire format: `event:` + `data:` pairs, a ping after the first
block starts, input and cache counts in message_start and cumulative counts (input
repeated) in message_delta. A `thinking` request gets a thinking block, a web-search tool
one server-side search; a Scenario's `usage` is an Anthropic usage object.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import tokens
from proxy.simulator import Received, Scenario, Simulator, reply_text, send_events, split_text

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
                529: "overloaded_error"}
# The fields message_start carries; message_delta repeats them with the final output.
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                 "cache_creation", "service_tier")
_DELTA_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                 "output_tokens", "output_tokens_details", "server_tool_use")
SIGNATURE = "c2ltdWxhdGVkIHNpZ25hdHVyZQ=="


def add_routes(app: web.Application, sim: Simulator) -> None:
    async def messages(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        return await _messages(request, received, scenario)

    async def count_tokens(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        if (failed := _error(scenario)) is not None:
            return failed
        payload = orjson.loads(received.body)
        return web.json_response({"input_tokens": tokens.count_text(_prompt(payload))})

    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)


def _error(scenario: Scenario) -> web.Response | None:
    if scenario.body is None and scenario.status < 400:
        return None
    kind = _ERROR_TYPES.get(scenario.status,
                            "api_error" if scenario.status >= 500 else "invalid_request_error")
    body = scenario.body or orjson.dumps({"type": "error", "error": {
        "type": kind, "message": "simulated failure"}, "request_id": "req_sim_error"})
    return web.Response(status=scenario.status, body=body, headers={
        "Content-Type": "application/json", "request-id": "req_sim_error", **scenario.headers})


def _prompt(payload: dict[str, Any]) -> str:
    """Every text of the request the simulator counts as its input."""
    texts: list[str] = []
    _flatten(payload.get("system"), texts)
    for message in payload.get("messages") or ():
        _flatten(message.get("content"), texts)
    return " ".join(texts)


def _flatten(value: Any, into: list[str]) -> None:
    if isinstance(value, str):
        into.append(value)
    elif isinstance(value, list):
        for item in value:
            _flatten(item, into)
    elif isinstance(value, dict):
        _flatten(value.get("text"), into)
        _flatten(value.get("content"), into)


def _blocks(payload: dict[str, Any], prompt: str, text: str) -> list[dict[str, Any]]:
    """The answer's content blocks: thinking if asked, a web search if offered, the text."""
    blocks: list[dict[str, Any]] = []
    thinking = payload.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        blocks.append({"type": "thinking", "signature": SIGNATURE,
                       "thinking": f"The user asks about {prompt[:60]!r}. A short, plain "
                                   "answer with a few sentences will do."})
    if any(isinstance(t, dict) and str(t.get("type", "")).startswith("web_search")
           for t in payload.get("tools") or ()):
        blocks.append({"type": "server_tool_use", "id": "srvtoolu_sim", "name": "web_search",
                       "input": {"query": prompt[:40]}})
        blocks.append({"type": "web_search_tool_result", "tool_use_id": "srvtoolu_sim",
                       "content": [{"type": "web_search_result", "title": "Simulated result",
                                    "url": "https://example.com/simulated",
                                    "encrypted_content": "c2lt", "page_age": None}]})
    blocks.append({"type": "text", "text": text})
    return blocks


def _usage(prompt: str, blocks: list[dict[str, Any]], model: str | None,
           input_offset: int = 0) -> dict[str, Any]:
    thought = sum(tokens.count_text(b["thinking"], model) for b in blocks
                  if b["type"] == "thinking")
    written = sum(tokens.count_text(b.get("text", ""), model)
                  + (tokens.count_text(orjson.dumps(b["input"]).decode(), model)
                     if b["type"] == "server_tool_use" else 0) for b in blocks)
    usage: dict[str, Any] = {
        "input_tokens": tokens.count_text(prompt, model) + input_offset,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": written + thought, "service_tier": "standard",
    }
    if thought:
        usage["output_tokens_details"] = {"thinking_tokens": thought}
    searches = sum(1 for b in blocks if b["type"] == "server_tool_use")
    if searches:
        usage["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
    return usage


async def _messages(request: web.Request, received: Received,
                    scenario: Scenario) -> web.StreamResponse:
    if (failed := _error(scenario)) is not None:
        return failed
    payload = orjson.loads(received.body)
    prompt = _prompt(payload)
    model = scenario.model or payload.get("model")
    text = scenario.text if scenario.text is not None else reply_text(prompt)
    blocks = _blocks(payload, prompt, text)
    usage = scenario.usage or _usage(prompt, blocks, model, scenario.input_offset)
    ident = f"msg_sim{len(received.body):08d}"
    headers = {"request-id": f"req_sim_{len(received.body)}", **scenario.headers}
    message: dict[str, Any] = {"id": ident, "type": "message", "role": "assistant",
                               "model": model, "content": blocks, "stop_reason": "end_turn",
                               "stop_sequence": None}
    if not payload.get("stream"):
        if not scenario.omit_usage:
            message["usage"] = usage
        return web.Response(body=orjson.dumps(message), headers={
            "Content-Type": "application/json", **headers})
    start = {**message, "content": [], "stop_reason": None}
    if not scenario.omit_usage:
        start["usage"] = {**{k: usage[k] for k in _INPUT_FIELDS if k in usage},
                          "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"message": start})]
    for index, block in enumerate(blocks):
        block_events = _block_events(index, block)
        if index == 0:  # the API pings once the first block has started
            block_events.insert(1, ("ping", {}))
        events += block_events
    delta: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if not scenario.omit_usage:
        delta["usage"] = {k: usage[k] for k in _DELTA_FIELDS if k in usage}
    events += [("message_delta", delta), ("message_stop", {})]
    wire = [f"event: {name}\n".encode() + b"data: " + orjson.dumps({"type": name, **data})
            + b"\n\n" for name, data in events]
    return await send_events(request, scenario, wire, headers)


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """content_block_start, its deltas and content_block_stop for one block."""
    kind = block["type"]
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in split_text(block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": piece}
                  for piece in split_text(block["thinking"], 3)]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "server_tool_use":
        start = {**block, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": orjson.dumps(block["input"])
                   .decode()}]
    else:
        start = block  # a tool result arrives whole
    return [("content_block_start", {"index": index, "content_block": start}),
            *[("content_block_delta", {"index": index, "delta": d}) for d in deltas],
            ("content_block_stop", {"index": index})]
