"""The simulator's OpenAI API: chat completions, completions, responses, embeddings, models."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import orjson
from aiohttp import web

from proxy import tokens
from proxy.simulator import (
    Received,
    Scenario,
    Simulator,
    bounded_text,
    reply_text,
    send_body,
    send_events,
    split_text,
)

# A fixed creation time keeps answers byte-identical, direct or through the proxy.
CREATED = 1727346169


def add_routes(app: web.Application, sim: Simulator) -> None:
    chains: dict[str, int] = {}  # response id -> tokens of its whole chain so far

    async def chat(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        return await _chat(request, received, scenario, legacy=False)

    async def completions(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        return await _chat(request, received, scenario, legacy=True)

    async def responses(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        return await _responses(request, received, scenario, chains)

    async def embeddings(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        return await _embeddings(request, received, scenario)

    async def models(request: web.Request) -> web.StreamResponse:
        await sim.receive(request)
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
        ]})

    for prefix in ("/v1", "/openai/deployments/{deployment}"):
        app.router.add_post(f"{prefix}/chat/completions", chat)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/responses", responses)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
    app.router.add_get("/v1/models", models)


async def _canned(request: web.Request, scenario: Scenario) -> web.StreamResponse | None:
    """The scenario's own body or error instead of an answer, if it has one."""
    if scenario.body is not None or scenario.status >= 400:
        body = scenario.body or orjson.dumps({"error": {
            "message": "simulated failure", "type": "server_error", "param": None,
            "code": None}})
        return await send_body(request, scenario, body)
    return None


def _prompt(payload: dict[str, Any]) -> tuple[str, int]:
    """The prompt text and its exact token count in OpenAI's chat accounting."""
    model = payload.get("model")
    messages = payload.get("messages")
    if isinstance(messages, list):
        texts = []
        total = 3
        for message in messages:
            total += 3
            for key, value in message.items():
                text = value if isinstance(value, str) else _flatten(value)
                texts.append(text)
                total += tokens.count_text(text, model) + (1 if key == "name" else 0)
        return " ".join(t for t in texts if t), total
    prompt = payload.get("prompt", payload.get("input", ""))
    text = prompt if isinstance(prompt, str) else _flatten(prompt)
    return text, tokens.count_text(text, model)


def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_flatten(v) for k, v in value.items() if k not in ("type", "role"))
    return ""


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


async def _chat(request: web.Request, received: Received, scenario: Scenario,
                legacy: bool) -> web.StreamResponse:
    if (failed := await _canned(request, scenario)) is not None:
        return failed
    payload = orjson.loads(received.body)
    prompt, prompt_tokens = _prompt(payload)
    prompt_tokens += scenario.input_offset
    model = scenario.model or payload.get("model") or request.match_info.get("deployment")
    text = scenario.text if scenario.text is not None else reply_text(prompt)
    text = bounded_text(text, model, payload.get("max_completion_tokens")
                        or payload.get("max_tokens"))
    # `n` answers (legacy: best_of generated), each billed: the usage counts them all.
    n = payload.get("n") if isinstance(payload.get("n"), int) and payload["n"] > 0 else 1
    billed = max(n, payload.get("best_of") or 1) if legacy else n
    usage = scenario.usage or _chat_usage(prompt_tokens,
                                          billed * tokens.count_text(text, model))
    ident = ("cmpl-" if legacy else "chatcmpl-") + "SIM" + str(zlib.crc32(prompt.encode()))
    created = CREATED
    obj = "text_completion" if legacy else "chat.completion"
    headers = {"x-request-id": f"req_sim_{ident}", **scenario.headers}
    if not payload.get("stream"):
        choices: list[dict[str, Any]] = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"} if legacy else
            {"index": i, "message": {"role": "assistant", "content": text, "refusal": None,
                                     "annotations": []},
             "logprobs": None, "finish_reason": "stop"} for i in range(n)]
        body: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": model,
                                "choices": choices, "service_tier": "default",
                                "system_fingerprint": "fp_sim"}
        if not scenario.omit_usage:
            body["usage"] = usage
        return web.Response(body=orjson.dumps(body), headers={
            "Content-Type": "application/json", **headers})
    head = {"id": ident, "object": obj + ".chunk", "created": created, "model": model,
            "service_tier": "default", "system_fingerprint": "fp_sim"}
    events = []
    pieces = split_text(text)
    if not legacy:
        events.append({**head, "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": "", "refusal": None}, "logprobs": None,
            "finish_reason": None}]})
    for piece in pieces:
        choice = ({"text": piece, "index": 0, "logprobs": None, "finish_reason": None} if legacy
                  else {"index": 0, "delta": {"content": piece}, "logprobs": None,
                        "finish_reason": None})
        events.append({**head, "choices": [choice]})
    events.append({**head, "choices": [
        {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"} if legacy else
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    options = payload.get("stream_options") or {}
    if options.get("include_usage") and not scenario.omit_usage:
        for event in events:
            event["usage"] = None
        events.append({**head, "choices": [], "usage": usage})
    wire = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    return await send_events(request, scenario, wire, headers)


def _responses_usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


async def _responses(request: web.Request, received: Received, scenario: Scenario,
                     chains: dict[str, int]) -> web.StreamResponse:
    if (failed := await _canned(request, scenario)) is not None:
        return failed
    payload = orjson.loads(received.body)
    prompt, prompt_tokens = _prompt(payload)
    prompt_tokens += scenario.input_offset
    model = scenario.model or payload.get("model")
    text = scenario.text if scenario.text is not None else reply_text(prompt)
    text = bounded_text(text, model, payload.get("max_output_tokens"))
    # A continued response re-reads its whole chain: the provider bills that context.
    context = chains.get(payload.get("previous_response_id"), 0)
    output_tokens = tokens.count_text(text, model)
    usage = scenario.usage or _responses_usage(prompt_tokens + context, output_tokens)
    ident = f"resp_sim{len(chains)}"
    chains[ident] = context + prompt_tokens + output_tokens
    created = CREATED
    message = {"type": "message", "id": "msg_sim", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    response: dict[str, Any] = {
        "id": ident, "object": "response", "created_at": created, "status": "completed",
        "error": None, "incomplete_details": None, "instructions": None, "model": model,
        "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "service_tier": "default", "usage": None if scenario.omit_usage else usage,
    }
    headers = {"x-request-id": f"req_sim_{created}", **scenario.headers}
    if not payload.get("stream"):
        return web.Response(body=orjson.dumps(response), headers={
            "Content-Type": "application/json", **headers})
    start = {**response, "status": "in_progress", "output": [], "usage": None}
    seq = iter(range(1_000_000))
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": start}),
        ("response.in_progress", {"response": start}),
        ("response.output_item.added", {"output_index": 0, "item": {
            **message, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {"item_id": "msg_sim", "output_index": 0,
                                         "content_index": 0, "part": {
                                             "type": "output_text", "text": "",
                                             "annotations": []}}),
    ]
    for piece in split_text(text):
        events.append(("response.output_text.delta", {"item_id": "msg_sim", "output_index": 0,
                                                      "content_index": 0, "delta": piece}))
    events += [
        ("response.output_text.done", {"item_id": "msg_sim", "output_index": 0,
                                       "content_index": 0, "text": text}),
        ("response.output_item.done", {"output_index": 0, "item": message}),
        ("response.completed", {"response": response}),
    ]
    wire = [
        f"event: {name}\n".encode() + b"data: "
        + orjson.dumps({"type": name, **data, "sequence_number": next(seq)}) + b"\n\n"
        for name, data in events
    ]
    return await send_events(request, scenario, wire, headers)


async def _embeddings(request: web.Request, received: Received,
                      scenario: Scenario) -> web.StreamResponse:
    if (failed := await _canned(request, scenario)) is not None:
        return failed
    payload = orjson.loads(received.body)
    inputs = payload.get("input")
    items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) \
        else [inputs]
    model = payload.get("model")
    total = 0
    data = []
    for i, item in enumerate(items):
        total += len(item) if isinstance(item, list) else tokens.count_text(str(item), model)
        vector = [((i + 1) * (k + 1) % 17) / 17.0 for k in range(8)]
        if payload.get("encoding_format") == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    usage = scenario.usage or {"prompt_tokens": total, "total_tokens": total}
    body = {"object": "list", "data": data, "model": scenario.model or model, "usage": usage}
    return web.Response(body=orjson.dumps(body), headers={"Content-Type": "application/json"})
