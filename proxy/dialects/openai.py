"""The OpenAI API family: OpenAI itself and every OpenAI-compatible provider.

Metered endpoints: chat completions, legacy completions, responses and embeddings.
Free: reading stored objects (models, files, batches, responses), moderations, token
counts. Everything else (batches, images, audio, fine-tuning, realtime, background
responses...) is not metered and refused unless `allow_unmetered` opens it.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy import tokens
from proxy.dialects.base import (
    BuiltinProvider,
    Call,
    DescribedPolicy,
    DialectSpec,
    Metered,
    TextTally,
    bearer,
    labelled,
    listed,
    load_body,
    positive_int,
    version_free,
)
from proxy.dialects.sse import SSESplitter, events_of, parse_event
from proxy.errors import Kind, MeterError
from proxy.usage import Usage, count, sub

_METERED = (
    ("/chat/completions", "chat.completions"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
)
# Stored objects whose GET or DELETE OpenAI does not bill. A background response is not
# metered at creation, so reading it back is refused there, not here.
_FREE_READS = frozenset({"models", "files", "batches", "responses", "chat", "conversations"})
_TWO_PART = frozenset({"images", "audio", "realtime", "fine_tuning", "chat", "threads"})
_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/")
_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta",
                     "response.function_call_arguments.delta"})
# Byte patterns that pick out the events worth parsing as they pass. JSON escapes quotes
# inside strings, so model output can never forge them; a provider that writes spaces in
# its JSON just gets every event parsed.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_RESPONSES_DELTA = re.compile(
    rb'"type":"response\.(?:output_text|refusal|function_call_arguments)\.delta"')
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ERRORS = {
    Kind.INVALID_REQUEST: ("invalid_request_error", None),
    Kind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    Kind.PERMISSION: ("permission_error", "permission_denied"),
    Kind.NOT_FOUND: ("invalid_request_error", "not_found"),
    Kind.TOO_LARGE: ("invalid_request_error", "request_too_large"),
    Kind.REQUEST_TIMEOUT: ("invalid_request_error", "request_timeout"),
    Kind.BUDGET_EXCEEDED: ("budget_exceeded", "budget_exceeded"),
    Kind.RATE_LIMITED: ("rate_limited", "rate_limited"),
    Kind.ANOMALY_BLOCKED: ("anomaly_blocked", "anomaly_blocked"),
    Kind.UPSTREAM_UNREACHABLE: ("server_error", "upstream_unreachable"),
    Kind.UPSTREAM_TIMEOUT: ("timeout", "upstream_timeout"),
    Kind.UNAVAILABLE: ("server_error", "service_unavailable"),
    Kind.INTERNAL: ("server_error", "proxy_error"),
}
# OpenAI's cookbook: every message costs 3 tokens of framing, a name 1 more, the reply 3.
_PER_MESSAGE, _PER_NAME, _REPLY_PRIMER = 3, 1, 3


class OpenAIDialect:
    name = "openai"
    request_id_header = "x-request-id"

    def describe(self, method: str, path: str, payload: Any) -> Call:
        trimmed = path.rstrip("/")
        endpoint = None
        if method == "POST":
            for suffix, name in _METERED:
                if trimmed.endswith(suffix):
                    endpoint = name
                    break
        body = payload if isinstance(payload, dict) else {}
        # Azure serves the deployment its path names whatever the body's `model` says, so
        # the path wins (the key's models: allow-list must check what will answer).
        found = _DEPLOYMENT.search(path)
        model = found.group(1) if found else body.get("model")
        if not isinstance(model, str):
            model = None
        if endpoint == "responses" and body.get("background") is True:
            # The answer is fetched later; its usage is not read there yet.
            return Call(endpoint="responses.background", model=model,
                        unmetered_reason="background responses are fetched later, unmetered")
        if endpoint is None:
            parts = _resource_parts(trimmed)
            return Call(endpoint=_plain_endpoint(parts), model=model,
                        free=_free(method, parts))
        stream = body.get("stream") is True
        choices = positive_int(body.get("n")) or 1
        if endpoint == "completions":
            choices = max(choices, positive_int(body.get("best_of")) or 1)
        call = Call(endpoint=endpoint, model=model, stream=stream, metered=True,
                    choices=choices)
        if endpoint == "chat.completions":
            limit = positive_int(body.get("max_completion_tokens")) or positive_int(
                body.get("max_tokens")
            )
        elif endpoint == "responses":
            limit = positive_int(body.get("max_output_tokens"))
            call.server_context = bool(body.get("previous_response_id")
                                       or body.get("conversation"))
        elif endpoint == "completions":
            limit = positive_int(body.get("max_tokens")) or 16  # the API's default
        else:
            limit = 0
        call.max_output_tokens = limit
        if stream and endpoint in ("chat.completions", "completions"):
            options = body.get("stream_options")
            asked = isinstance(options, dict) and options.get("include_usage") is True
            call.hide_usage_chunk = not asked
        return call

    def misplaced(self, path: str, base: str) -> str | None:
        return None  # OpenAI-compatible providers root their paths in too many ways to judge

    def client_key(self, request: web.Request) -> str | None:
        headers = request.headers
        return bearer(headers.get("Authorization")) or headers.get("api-key") or None

    def set_upstream_key(
        self, headers: CIMultiDict[str], query: MultiDict[str], key: str, header: str | None
    ) -> None:
        headers.popall("Authorization", None)
        headers.popall("api-key", None)
        if header and header.lower() != "authorization":
            headers[header] = key
        else:
            headers["Authorization"] = f"Bearer {key}"

    def edit_body(self, call: Call, payload: Any, body: bytes) -> bytes:
        if not call.hide_usage_chunk:
            return body
        if "stream_options" not in payload:
            # Insert the one key and leave every other byte of the client's body as sent.
            start = body.index(b"{") + 1
            return body[:start] + b'"stream_options":{"include_usage":true},' + body[start:]
        options = payload["stream_options"]
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                     "include_usage": True}
        return orjson.dumps(payload)

    def read_usage(self, call: Call, body: bytes) -> Metered:
        obj, note = load_body(body, ("usage", "model", "service_tier", "output"))
        if not isinstance(obj, dict):
            return Metered(error=note)
        metered = Metered(response_model=_str(obj.get("model")), error=note,
                          response_id=_str(obj.get("id")) if note is None else None)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            metered.usage = _usage(call.endpoint, usage, obj.get("service_tier"))
            if call.endpoint == "responses":
                metered.usage.web_search_requests = _web_searches(obj.get("output"))
        return metered

    def stream_meter(self, call: Call) -> _StreamMeter:
        return _StreamMeter(call)

    def prompt_texts(self, call: Call, payload: Any) -> tuple[list[str], int]:
        body = payload if isinstance(payload, dict) else {}
        texts: list[str] = []
        overhead = 0
        if call.endpoint == "chat.completions":
            messages = body.get("messages") or []
            for message in messages if isinstance(messages, list) else []:
                if not isinstance(message, dict):
                    continue
                overhead += _PER_MESSAGE
                for key, value in message.items():
                    _collect_text(value, texts)
                    if key == "name":
                        overhead += _PER_NAME
            overhead += _REPLY_PRIMER
            overhead += _tool_texts(body.get("tools"), call.model, texts)
        elif call.endpoint == "responses":
            _collect_text(body.get("instructions"), texts)
            _collect_text(body.get("input"), texts)
        elif call.endpoint == "completions":
            _collect_text(body.get("prompt"), texts)
        elif call.endpoint == "embeddings":
            value = body.get("input")
            if isinstance(value, list) and value and isinstance(value[0], int):
                overhead += len(value)  # already tokens
            elif isinstance(value, list) and value and isinstance(value[0], list):
                overhead += sum(len(v) for v in value if isinstance(v, list))
            else:
                _collect_text(value, texts)
        return texts, overhead

    def split_prefix(self, call: Call, payload: Any) -> tuple[list[Any], list[Any]] | None:
        # OpenAI caches the longest prompt prefix it has seen (1,024 tokens and up), with
        # no breakpoints: the stable part is the tools, the output schema and every
        # message but the newest one.
        if not isinstance(payload, dict):
            return None
        if call.endpoint == "chat.completions":
            messages = listed(payload.get("messages"))
            stable = labelled(("tools", payload.get("tools")),
                              ("response_format", payload.get("response_format")),
                              ("messages", messages[:-1]))
            return stable, messages[-1:]
        if call.endpoint == "responses":
            given = payload.get("input")
            items = listed(given)
            stable = labelled(("instructions", payload.get("instructions")),
                              ("prompt", payload.get("prompt")),
                              ("tools", payload.get("tools")),
                              ("text", payload.get("text")),
                              ("input", items[:-1]))
            return stable, items[-1:] if items else [given]
        return None

    def error_body(self, error: MeterError) -> bytes:
        kind, code = _ERRORS[error.kind]
        return orjson.dumps(
            {"error": {"message": error.message, "type": kind, "param": error.param,
                       "code": error.code or code}}
        )


def _no_usage(blob: bytes) -> bool:
    """Whether no event of a blob can carry usage or an error (the rest are deferred)."""
    return b'"error"' not in blob and _USAGE_OBJECT.search(blob) is None


class _StreamMeter:
    """Reads chat/completions chunks or responses events, hiding the usage chunk on request."""

    __slots__ = ("_fast", "_hide", "_responses", "_split", "_tally", "metered")

    def __init__(self, call: Call) -> None:
        self._split = SSESplitter()
        self._hide = call.hide_usage_chunk
        self._responses = call.endpoint == "responses"
        self._fast = not self._hide and not self._responses  # chat chunks may go as blobs
        # Content events are read only if usage never comes (their text is then estimated):
        # most streams end with usage, so most events are never parsed at all.
        self._tally = TextTally(call.model, reader=self._content_text)
        self.metered = Metered(text=self._tally)

    def feed(self, chunk: bytes) -> bytes:
        if self._fast and not self._split.pending and chunk[-2:] == b"\n\n" \
                and b"\r" not in chunk and b"\n\n\n" not in chunk:
            # Whole events (one, or many when the relay fell behind): the first event of
            # the stream is read (the model), then the run of events before the first
            # that can carry usage or an error is kept as one blob, the rest read as ever.
            if self.metered.response_model is None:
                end = chunk.find(b"\n\n") + 2
                self._feed_events(chunk[:end])
                rest = chunk[end:]
            else:
                rest = chunk
            if rest and self.metered.response_model is not None:
                cut = len(rest)
                if (found := _USAGE_OBJECT.search(rest)) is not None:
                    cut = found.start()
                if 0 <= (error := rest.find(b'"error"')) < cut:
                    cut = error
                start = rest.rfind(b"\n\n", 0, cut) + 2  # the end of the last plain event
                if start > 1:
                    self._tally.defer(rest[:start])
                    rest = rest[start:]
            if rest:
                self._feed_events(rest)
            return chunk
        return self._feed_events(chunk)

    def _feed_events(self, chunk: bytes) -> bytes:
        if not self._fast or self.metered.response_model is None:
            events: bytes | list[bytes] = self._split.feed(chunk)
        else:
            events = self._split.feed_plain(chunk, _no_usage)
            if isinstance(events, bytes):  # no usage, no error: kept raw, as one blob
                if events:
                    self._tally.defer(events)
                return chunk
        if not self._hide:
            for raw in events:
                self._read(raw)
            return chunk
        return b"".join([raw for raw in events if not self._read(raw)])

    def finish(self) -> tuple[bytes, Metered]:
        tail = self._split.tail()
        owed = tail if self._hide else b""
        if tail.strip() and self._read(tail):
            owed = b""
        if self.metered.usage is None:
            self._tally.catch_up()  # its text will be counted: read it now, noting errors
        return owed, self.metered

    def _content_text(self, blob: bytes) -> list[Any]:
        """The text of deferred content events (TextTally's reader): one raw event, or a
        blob of whole raw events from `feed`'s fast path."""
        texts: list[Any] = []
        for raw in events_of(blob):
            data = parse_event(raw).data
            if data and data != b"[DONE]":
                texts += self._one_content(data)
        return texts

    def _one_content(self, data: bytes) -> list[Any]:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.metered.error = "malformed event in the stream"
            return []
        if not isinstance(obj, dict):
            return []
        if self._responses:
            return [obj.get("delta")]
        return _choice_texts(obj.get("choices"))

    def _read(self, raw: bytes) -> bool:
        """Note what one event says; True when the client must not see it."""
        data = parse_event(raw).data
        if not data or data == b"[DONE]":
            return False
        if self._responses:
            if _RESPONSES_DELTA.search(data):
                self._tally.defer(raw)
                return False
        elif self.metered.response_model is not None and b'"error"' not in data \
                and _USAGE_OBJECT.search(data) is None:
            self._tally.defer(raw)
            return False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.metered.error = "malformed event in the stream"
            return False
        if not isinstance(obj, dict):
            return False
        if self._responses:
            self._read_responses(obj)
            return False
        if "error" in obj and isinstance(obj["error"], dict):
            self.metered.error = _str(obj["error"].get("message")) or "error event"
            return False
        if self.metered.response_model is None:
            self.metered.response_model = _str(obj.get("model"))
            self.metered.response_id = _str(obj.get("id"))
        choices = obj.get("choices")
        self._tally_choices(choices)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.metered.usage = _usage("chat.completions", usage, obj.get("service_tier"))
            return self._hide and not choices
        return False

    def _tally_choices(self, choices: Any) -> None:
        for text in _choice_texts(choices):
            self._tally.add(text)

    def _read_responses(self, obj: dict) -> None:
        kind = obj.get("type")
        if kind in _DELTAS:
            self._tally.add(obj.get("delta"))
        elif kind == "error":
            self.metered.error = _str(obj.get("message")) or "error event"
        elif kind in _TERMINAL or kind == "response.created":
            response = obj.get("response")
            if not isinstance(response, dict):
                return
            self.metered.response_model = _str(response.get("model")) or self.metered.response_model
            self.metered.response_id = _str(response.get("id")) or self.metered.response_id
            usage = response.get("usage")
            if kind in _TERMINAL and isinstance(usage, dict):
                self.metered.usage = _usage("responses", usage, response.get("service_tier"))
                self.metered.usage.web_search_requests = _web_searches(response.get("output"))
            if kind == "response.failed":
                self.metered.error = _str(sub(response, "error").get("message")) or "failed"


def _choice_texts(choices: Any) -> list[Any]:
    """The output text in a chunk's choices: content, refusals, tool-call arguments."""
    texts: list[Any] = []
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                texts.append(delta.get("content"))
                texts.append(delta.get("refusal"))
                for tool in delta.get("tool_calls") or ():
                    if isinstance(tool, dict):
                        texts.append(sub(tool, "function").get("arguments"))
            else:
                texts.append(choice.get("text"))
    return texts


def _usage(endpoint: str, u: dict, service_tier: Any) -> Usage:
    """Normalise an OpenAI usage object: prompt totals include cached and written tokens.

    Cache writes may be split by TTL (`cache_write_tokens_details.ttl_30m_tokens` /
    `ttl_12h_tokens`); the service tier is the one the response says served the call.
    """
    if endpoint == "responses" or "input_tokens" in u:
        total_in, out = count(u.get("input_tokens")), count(u.get("output_tokens"))
        in_details, out_details = sub(u, "input_tokens_details"), sub(u, "output_tokens_details")
    else:
        total_in, out = count(u.get("prompt_tokens")), count(u.get("completion_tokens"))
        in_details = sub(u, "prompt_tokens_details")
        out_details = sub(u, "completion_tokens_details")
    cached = count(in_details.get("cached_tokens"))
    if "cached_tokens" not in in_details:  # DeepSeek names its cache hits apart
        cached = count(u.get("prompt_cache_hit_tokens"))
    written = count(in_details.get("cache_write_tokens"))
    ttl = sub(in_details, "cache_write_tokens_details")
    write_12h = min(count(ttl.get("ttl_12h_tokens")), written)
    uncached = max(total_in - cached - written, 0)
    return Usage(
        input_tokens=uncached,
        audio_input_tokens=min(count(in_details.get("audio_tokens")), uncached),
        image_input_tokens=min(count(in_details.get("image_tokens")), uncached),
        cached_input_tokens=cached,
        cache_write_tokens=written,
        cache_write_12h_tokens=write_12h,
        cache_write_30m_tokens=min(count(ttl.get("ttl_30m_tokens")), written - write_12h),
        output_tokens=out,
        reasoning_tokens=count(out_details.get("reasoning_tokens")),
        audio_output_tokens=count(out_details.get("audio_tokens")),
        image_output_tokens=count(out_details.get("image_tokens")),
        service_tier=_str(service_tier),
    )


def _tool_texts(tools: Any, model: str | None, into: list[str]) -> int:
    """Function definitions as OpenAI's cookbook counts them; returns the fixed overhead.

    Per function 7 tokens (10 with cl100k_base) plus `name:description`; with properties
    3 more and per property 3 plus `key:type:description`; an enum -3, then 3 plus the
    item per item; 12 once when any tool is present. Other tool kinds count as JSON.
    """
    if not isinstance(tools, list) or not tools:
        return 0
    per_function = 10 if tokens.encoding_name(model) == "cl100k_base" else 7
    overhead = 12
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            into.append(orjson.dumps(tool).decode())
            continue
        overhead += per_function
        into.append(f"{function.get('name', '')}:{_trimmed(function.get('description'))}")
        properties = sub(function.get("parameters"), "properties")
        if properties:
            overhead += 3
        for key, spec in properties.items():
            spec = spec if isinstance(spec, dict) else {}
            overhead += 3
            enum = spec.get("enum")
            if isinstance(enum, list):
                overhead -= 3
                for item in enum:
                    overhead += 3
                    into.append(str(item))
            into.append(f"{key}:{spec.get('type', '')}:{_trimmed(spec.get('description'))}")
    return overhead


def _trimmed(description: Any) -> str:
    text = description if isinstance(description, str) else ""
    return text[:-1] if text.endswith(".") else text


def _web_searches(output: Any) -> int:
    if not isinstance(output, list):
        return 0
    return sum(1 for item in output if isinstance(item, dict)
               and item.get("type") == "web_search_call")


def _collect_text(value: Any, into: list[str]) -> None:
    """Every string inside a message value: plain content, content parts, tool calls."""
    if isinstance(value, str):
        into.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_text(item, into)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("type", "image_url", "input_audio", "file", "id", "detail"):
                continue
            _collect_text(item, into)


def _resource_parts(path: str) -> list[str]:
    """The path's segments after the version (and Azure's /openai/deployments/NAME)."""
    parts = version_free(path)
    if parts[:2] == ["openai", "deployments"]:
        parts = version_free("/".join(parts[3:]))
    return parts


def _plain_endpoint(parts: list[str]) -> str:
    """A readable name for a path not metered: /v1/models/gpt-4o -> models,
    /v1/images/generations -> images.generations (the name allow_unmetered takes)."""
    if not parts:
        return "root"
    if parts[0] in _TWO_PART and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _free(method: str, parts: list[str]) -> bool:
    """Whether OpenAI bills nothing for this call: reading or deleting stored objects,
    listing models, moderations, counting tokens, cancelling."""
    head = parts[0] if parts else ""
    if method in ("GET", "HEAD", "DELETE"):
        return head in _FREE_READS
    if method == "POST":
        return head == "moderations" or parts in (["responses", "input_tokens"],) or (
            len(parts) == 3 and head in ("batches", "responses") and parts[2] == "cancel")
    return False


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


_ADAPTER = OpenAIDialect()
SPEC = DialectSpec(
    name="openai",
    adapter=_ADAPTER,
    endpoint_policy=DescribedPolicy(_ADAPTER),
    key_headers=("Authorization", "api-key"),  # api-key: Azure OpenAI
    providers=MappingProxyType({
        name: BuiltinProvider(url, env) for name, url, env in (
            ("openai", "https://api.openai.com", "OPENAI_API_KEY"),
            ("deepseek", "https://api.deepseek.com", "DEEPSEEK_API_KEY"),
            ("mistral", "https://api.mistral.ai", "MISTRAL_API_KEY"),
            ("groq", "https://api.groq.com/openai", "GROQ_API_KEY"),
            ("together", "https://api.together.xyz", "TOGETHER_API_KEY"),
            ("xai", "https://api.x.ai", "XAI_API_KEY"),
            ("openrouter", "https://openrouter.ai/api", "OPENROUTER_API_KEY"),
        )}),
    token_families=tokens.TokenFamilies(
        exact=("gpt-", "o1", "o3", "o4", "chatgpt", "text-embedding", "davinci", "babbage"),
        # Models older than gpt-4o count with cl100k_base.
        cl100k_names=("gpt-4",),
        cl100k_prefixes=("gpt-4-", "gpt-3.5", "text-embedding-3", "text-embedding-ada",
                         "davinci", "babbage"),
        o200k_prefixes=("gpt-4o", "gpt-4.1", "gpt-4.5")),
    standard_tiers=frozenset({"default", "auto", "on_demand"}),  # on_demand: Groq
)
