"""The simulator's Gemini API: generateContent, streamGenerateContent, countTokens and
embedContent / batchEmbedContents.

Under /v1beta/ and /v1/ alike. With alt=sse a stream is `data: {json}` events ending in
CR LF CR LF; without it one JSON array. Every chunk carries usageMetadata with running
totals: the early ones only promptTokenCount and totalTokenCount, the last (with the
finishReason) all of them. A thinkingConfig gets thinking tokens (and a thought part if
includeThoughts), a googleSearch tool two grounding queries; a Scenario's `usage` is a
usageMetadata object.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import tokens
from proxy.simulator import (
    Scenario,
    Simulator,
    bounded_text,
    reply_text,
    send_events,
    split_text,
)

_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
             404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
             504: "DEADLINE_EXCEEDED"}
SEARCH_RESULT = "Simulated search result: a page about metering LLM API calls."


def add_routes(app: web.Application, sim: Simulator) -> None:
    async def model_call(request: web.Request) -> web.StreamResponse:
        received, scenario = await sim.receive(request)
        model, _, action = request.match_info["call"].rpartition(":")
        if (failed := _error(scenario)) is not None:
            return failed
        payload = orjson.loads(received.body or b"{}")
        if action == "countTokens":
            count = tokens.count_text(_prompt(payload), model)
            return web.json_response({"totalTokens": count, "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": count}]})
        if action in ("embedContent", "batchEmbedContents"):
            return _embed(payload, action)
        if action not in ("generateContent", "streamGenerateContent"):
            return _status(404, f"simulated Gemini has no method {action}")
        return await _generate(request, payload, model, action == "streamGenerateContent",
                               scenario)

    for version in ("v1", "v1beta"):
        app.router.add_post(f"/{version}/models/{{call}}", model_call)


def _status(code: int, message: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> web.Response:
    body = body or orjson.dumps({"error": {"code": code, "message": message,
                                           "status": _STATUSES.get(code, "UNKNOWN")}})
    return web.Response(status=code, body=body, headers={
        "Content-Type": "application/json; charset=UTF-8", **(headers or {})})


def _error(scenario: Scenario) -> web.Response | None:
    if scenario.body is None and scenario.status < 400:
        return None
    return _status(scenario.status, "simulated failure", scenario.headers, scenario.body)


def _prompt(payload: dict[str, Any]) -> str:
    texts = []
    contents = payload.get("contents") or []
    for content in [payload.get("systemInstruction"), *contents]:
        if isinstance(content, dict):
            texts += [p["text"] for p in content.get("parts") or ()
                      if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return " ".join(texts)


def _thinking(payload: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the request makes the model think, and whether it wants the thoughts.

    Like the real API this reads both JSON spellings (google-genai sends thinkingConfig's
    fields in snake_case).
    """
    config = (payload.get("generationConfig") or {}).get("thinkingConfig")
    if not isinstance(config, dict):
        return False, False
    if config.get("thinkingBudget", config.get("thinking_budget")) == 0:
        return False, False
    return True, config.get("includeThoughts", config.get("include_thoughts")) is True


async def _generate(request: web.Request, payload: dict[str, Any], model: str, stream: bool,
                    scenario: Scenario) -> web.StreamResponse:
    prompt = _prompt(payload)
    config = payload.get("generationConfig") or {}
    text = scenario.text if scenario.text is not None else reply_text(prompt)
    text = bounded_text(text, model, config.get("maxOutputTokens",
                                                config.get("max_output_tokens")))
    # candidateCount answers, each billed: candidatesTokenCount sums them.
    count = config.get("candidateCount", config.get("candidate_count"))
    candidates = count if isinstance(count, int) and count > 0 else 1
    thinks, show_thoughts = _thinking(payload)
    thought = f"Thinking about {prompt[:60]!r}: a short, plain answer will do." if thinks else ""
    prompt_count = tokens.count_text(prompt, model) + scenario.input_offset
    grounding = _grounding(payload, prompt)
    usage = scenario.usage or _usage(prompt_count, candidates * tokens.count_text(text, model),
                                     tokens.count_text(thought, model))
    if grounding and not scenario.usage:
        usage["toolUsePromptTokenCount"] = tokens.count_text(SEARCH_RESULT, model)
        usage["totalTokenCount"] += usage["toolUsePromptTokenCount"]
    version = scenario.model or model
    headers = {"x-request-id": f"sim-{len(prompt)}", **scenario.headers}
    thought_parts = [{"text": thought, "thought": True}] if show_thoughts else []
    if not stream:
        body = _chunk([*thought_parts, {"text": text}], version, usage, scenario, grounding)
        body["candidates"] = [{**body["candidates"][0], "index": i} for i in range(candidates)]
        return web.Response(body=orjson.dumps(body), headers={
            "Content-Type": "application/json; charset=UTF-8", **headers})
    early = {k: usage[k] for k in ("promptTokenCount",) if k in usage}
    early["totalTokenCount"] = early.get("promptTokenCount", 0)
    parts = [[p] for p in thought_parts] + [[{"text": piece}] for piece in split_text(text)]
    last = len(parts) - 1
    chunks = [_chunk(p, version, usage, scenario, grounding) if i == last else
              _chunk(p, version, early, scenario, None, final=False)
              for i, p in enumerate(parts)]
    if request.query.get("alt") == "sse":
        wire = [b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks]
        return await send_events(request, scenario, wire, headers)
    # Without alt=sse the answer is one JSON array, written a chunk at a time.
    wire = [(b"[" if i == 0 else b",\r\n") + orjson.dumps(c) for i, c in enumerate(chunks)]
    wire.append(b"]")
    return await send_events(request, scenario, wire, {
        **headers, "Content-Type": "application/json; charset=UTF-8"})


def _embed(payload: dict[str, Any], action: str) -> web.Response:
    """Embeddings, as the API returns them: vectors and no usage at all."""
    requests = payload.get("requests") if action == "batchEmbedContents" else [payload]
    vectors = [{"values": [((i + 1) * (k + 1) % 13) / 13.0 for k in range(8)]}
               for i, _ in enumerate(requests or ())]
    body = {"embeddings": vectors} if action == "batchEmbedContents" else \
        {"embedding": vectors[0]}
    return web.json_response(body)


def _usage(prompt: int, candidates: int, thoughts: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "promptTokenCount": prompt, "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _grounding(payload: dict[str, Any], prompt: str) -> dict[str, Any] | None:
    """Grounding metadata for a request that offers Google Search, as the API shapes it."""
    tools = payload.get("tools") or ()
    if not any(isinstance(t, dict) and ("googleSearch" in t or "google_search" in t)
               for t in tools):
        return None
    topic = prompt[:40] or "metering"
    return {"webSearchQueries": [topic, f"{topic} pricing"],
            "groundingChunks": [{"web": {"uri": "https://example.com/simulated",
                                         "title": "example.com"}}]}


def _chunk(parts: list[dict[str, Any]], version: str, usage: dict[str, Any],
           scenario: Scenario, grounding: dict[str, Any] | None,
           final: bool = True) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if final:
        candidate["finishReason"] = "STOP"
    if grounding:
        candidate["groundingMetadata"] = grounding
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if not scenario.omit_usage:
        chunk["usageMetadata"] = usage
    chunk["modelVersion"] = version
    chunk["responseId"] = "simResponse0001"
    return chunk
