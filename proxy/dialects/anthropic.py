"""The Anthropic Messages API.

Metered: POST /v1/messages, streamed or not. /v1/messages/count_tokens and everything
else pass through unmetered. Anthropic's `input_tokens` already excludes cache reads and
writes, so its usage maps onto ours without subtraction; in streams `message_start`
carries the input and cache counts and each `message_delta` the cumulative totals, so the
last value seen wins and nothing is ever added up.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy.dialects.base import (
    BuiltinProvider,
    Call,
    DescribedPolicy,
    DialectSpec,
    Metered,
    TextTally,
    bearer,
    listed,
    load_body,
    positive_int,
)
from proxy.dialects.sse import SSESplitter, events_of, is_junk, parse_event
from proxy.errors import Kind, MeterError
from proxy.usage import Usage, count, sub

_ERRORS = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "authentication_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "not_found_error",
    Kind.TOO_LARGE: "request_too_large",
    Kind.REQUEST_TIMEOUT: "invalid_request_error",
    Kind.BUDGET_EXCEEDED: "budget_exceeded",
    Kind.RATE_LIMITED: "rate_limited",
    Kind.ANOMALY_BLOCKED: "anomaly_blocked",
    Kind.UPSTREAM_UNREACHABLE: "api_error",
    Kind.UPSTREAM_TIMEOUT: "timeout_error",  # the SDK's type for a gateway timeout
    Kind.UNAVAILABLE: "api_error",
    Kind.INTERNAL: "api_error",
}
# Content the model wrote, by delta type; every one of them is billed as output.
_DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking",
               "input_json_delta": "partial_json"}
_TEXT_KEYS = ("text", "thinking", "content", "source")
# The events that carry no usage, by their first bytes as the API writes them (with and
# without the event line): JSON escapes quotes inside strings, so no model output can
# forge them, and any other spelling (spaces, another key first) is simply parsed.
_DELTA_EVENTS = (b'event: content_block_delta\ndata: {"type":"content_block_delta",',
                 b'data: {"type":"content_block_delta",')
_BETWEEN_DELTAS = tuple(b"\n\n" + prefix for prefix in _DELTA_EVENTS)
_DELTA_AFTER = _BETWEEN_DELTAS[0]  # a content delta after another event, as the API writes it
# Whole events that say nothing to meter, exactly as the API writes them (the data's type
# is the event's name; a text block starts empty): _read would parse them to do nothing.
# Any other spelling, or any other content, is read.
_INERT = re.compile(rb'event: (?:ping\ndata: \{"type":"ping"\}'
                    rb'|content_block_stop\ndata: \{"type":"content_block_stop","index":\d+\}'
                    rb'|message_stop\ndata: \{"type":"message_stop"\}'
                    rb'|content_block_start\ndata: \{"type":"content_block_start","index":\d+,'
                    rb'"content_block":\{"type":"text","text":""\}\})\n\n')


def _only_deltas(blob: bytes) -> bool:
    """Whether every event of a blob (LF only, no LF LF LF) is one `feed` would defer: it
    starts as a content delta and ends as JSON does. LF LF occurs only between events, so
    counting what follows and precedes each one checks every event at C speed."""
    if not blob.startswith(_DELTA_EVENTS):
        return False
    n = blob.count(b"\n\n")
    if n == 1:  # one event: the blob (which ends at LF LF)
        return blob[-3:] == b"}\n\n"
    return blob.count(b"}\n\n") == n \
        and sum(blob.count(between) for between in _BETWEEN_DELTAS) == n - 1


_PLACED = re.compile(r"/v\d+(?:/|$)")


class AnthropicDialect:
    name = "anthropic"
    request_id_header = "request-id"

    def describe(self, method: str, path: str, payload: Any) -> Call:
        parts = [p for p in path.split("/") if p]
        if parts and parts[0].startswith("v") and parts[0][1:].isdigit():
            parts = parts[1:]
        body = payload if isinstance(payload, dict) else {}
        model = body.get("model") if isinstance(body.get("model"), str) else None
        if method == "POST" and parts == ["messages"]:
            return Call(endpoint="messages", model=model, stream=body.get("stream") is True,
                        metered=True, max_output_tokens=positive_int(body.get("max_tokens")))
        if parts == ["messages", "count_tokens"]:
            return Call(endpoint="count_tokens", model=model, free=True)
        return Call(endpoint=".".join(parts[:2]) or "root", model=model,
                    free=_free(method, parts))

    def misplaced(self, path: str, base: str) -> str | None:
        if _PLACED.match(path):
            return None
        return (f"Anthropic API paths start with /v1/: set the base URL to {base} (the "
                f"anthropic SDKs, LangChain, pydantic-ai, litellm) or {base}/v1 (the Vercel AI "
                "SDK's baseURL)")

    def client_key(self, request: web.Request) -> str | None:
        headers = request.headers
        return headers.get("x-api-key") or bearer(headers.get("Authorization")) or None

    def set_upstream_key(
        self, headers: CIMultiDict[str], query: MultiDict[str], key: str, header: str | None
    ) -> None:
        headers.popall("x-api-key", None)
        headers.popall("Authorization", None)
        if header and header.lower() == "authorization":
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers[header or "x-api-key"] = key

    def edit_body(self, call: Call, payload: Any, body: bytes) -> bytes:
        return body  # streams always carry usage: nothing to ask for

    def read_usage(self, call: Call, body: bytes) -> Metered:
        obj, note = load_body(body, ("usage", "model"))
        if not isinstance(obj, dict):
            return Metered(error=note)
        metered = Metered(response_model=_str(obj.get("model")), error=note,
                          response_id=_str(obj.get("id")) if note is None else None)
        if isinstance(obj.get("usage"), dict):
            metered.usage = usage(obj["usage"])
        return metered

    def stream_meter(self, call: Call) -> _StreamMeter:
        return _StreamMeter()

    def prompt_texts(self, call: Call, payload: Any) -> tuple[list[str], int]:
        # Anthropic publishes no per-message framing cost: count the text alone.
        body = payload if isinstance(payload, dict) else {}
        texts: list[str] = []
        _collect_text(body.get("system"), texts)
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict):
                _collect_text(message.get("content"), texts)
        if body.get("tools"):
            texts.append(orjson.dumps(body["tools"]).decode())
        return texts, 0

    def split_prefix(self, call: Call, payload: Any) -> tuple[list[Any], list[Any]] | None:
        # Anthropic caches up to a breakpoint (`cache_control`) in the order tools, system,
        # messages: with breakpoints the stable part ends at the last one; without, it is
        # everything before the newest message.
        if call.endpoint != "messages" or not isinstance(payload, dict):
            return None
        system = payload.get("system")
        units: list[Any] = [["tool", t] for t in listed(payload.get("tools"))]
        units += [["system", b] for b in (system if isinstance(system, list)
                                          else [system] if system else [])]
        newest = len(units)
        for message in listed(payload.get("messages")):
            message = message if isinstance(message, dict) else {}
            newest = len(units)
            units.append(["turn", message.get("role")])
            content = message.get("content")
            units += [["block", b] for b in (content if isinstance(content, list)
                                             else [content])]
        marked = [i for i, (_, value) in enumerate(units)
                  if isinstance(value, dict) and value.get("cache_control")]
        cut = marked[-1] + 1 if marked else newest
        return units[:cut], units[cut:]

    def error_body(self, error: MeterError) -> bytes:
        return orjson.dumps({"type": "error",
                             "error": {"type": _ERRORS[error.kind], "message": error.message}})


class _StreamMeter:
    """Reads message_start, content_block_start and message_delta as they pass; content
    deltas (almost every event) are kept raw and read only if their text is ever needed
    (a stream that ends without usage). Passes every byte through."""

    __slots__ = ("_searches", "_split", "_tally", "_totals", "metered")

    def __init__(self) -> None:
        self._searches = 0  # web searches begun in the stream
        self._split = SSESplitter()
        self._tally = TextTally(reader=self._delta_text)
        self._totals: dict[str, Any] = {}  # the usage object as the stream has it so far
        self.metered = Metered(text=self._tally)

    def feed(self, chunk: bytes) -> bytes:
        if not self._split.pending and chunk[-3:] == b"}\n\n" and b"\r" not in chunk \
                and b"\n\n\n" not in chunk:
            # Whole events (one, or many when the relay fell behind): the run from the
            # first content delta to the last is one blob if nothing else is in it; the
            # events around it (message_start, message_delta, ...) are read as ever.
            first = chunk.find(_DELTA_AFTER)
            if first < 0:
                if chunk.count(b"\n\n") == 1:  # one whole event: what the splitter would cut
                    if chunk.startswith(_DELTA_EVENTS):  # most often a content delta
                        self._tally.defer(chunk)
                    elif _INERT.fullmatch(chunk) is None:
                        self._read(chunk)
                    return chunk
                return self._feed_events(chunk)
            # Whole LF-only events: events_of cuts them as the splitter would, which is
            # left with nothing pending.
            last = chunk.find(b"\n\n", chunk.rfind(_DELTA_AFTER) + 2) + 2
            self._take_events(events_of(chunk[:first + 2]))
            run = chunk[first + 2:last]
            if _only_deltas(run):
                self._tally.defer(run)
            else:
                self._take_events(events_of(run))
            if last < len(chunk):
                self._take_events(events_of(chunk[last:]))
            return chunk
        return self._feed_events(chunk)

    def _feed_events(self, chunk: bytes) -> bytes:
        events = self._split.feed_plain(chunk, _only_deltas)
        if isinstance(events, bytes):  # nothing but content deltas: kept raw, as one blob
            if events:
                self._tally.defer(events)
        else:
            self._take_events(events)
        return chunk

    def _take_events(self, events: list[bytes]) -> None:
        """Defer the content deltas among whole raw events, skip the inert, read the rest."""
        for raw in events:
            if raw.startswith(_DELTA_EVENTS) and raw.endswith(b"}\n\n"):
                # Carries no usage: read only if its text is ever needed. One that does not
                # end as JSON does (cut short) is parsed now, so the row notes it.
                self._tally.defer(raw)
            elif _INERT.fullmatch(raw) is None:
                self._read(raw)

    def finish(self) -> tuple[bytes, Metered]:
        tail = self._split.tail()
        if tail.strip():
            self._read(tail)
        if self.metered.usage is None:
            self._tally.catch_up()  # its text will be counted: read it now, noting errors
        return b"", self.metered

    def _delta_text(self, blob: bytes) -> list[Any]:
        """The text of deferred content_block_delta events (one, or a blob of them)."""
        return [text for raw in events_of(blob) for text in self._one_delta(raw)]

    def _one_delta(self, raw: bytes) -> tuple[Any, ...]:
        try:
            obj = orjson.loads(parse_event(raw).data)
        except orjson.JSONDecodeError:
            self.metered.error = "malformed event in the stream"
            return ()
        delta = sub(obj, "delta") if isinstance(obj, dict) else {}
        key = _DELTA_TEXT.get(delta.get("type"))
        return (delta.get(key),) if key is not None else ()

    def _read(self, raw: bytes) -> None:
        data = parse_event(raw).data
        if not data:
            if is_junk(raw):
                self.metered.error = "malformed event in the stream"
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.metered.error = "malformed event in the stream"
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "content_block_delta":  # one the byte check did not know (spaced JSON)
            self._tally.defer(raw)
        elif kind == "content_block_start":
            block = sub(obj, "content_block")
            self._tally.add(block.get("text"))
            self._tally.add(block.get("thinking"))
            if block.get("type") == "server_tool_use" and block.get("name") == "web_search":
                # Billed once run, even if the stream breaks before message_delta counts it.
                self._searches += 1
                if self.metered.prompt_usage is not None:
                    self.metered.prompt_usage.web_search_requests = self._searches
        elif kind == "message_start":
            message = sub(obj, "message")
            self.metered.response_model = _str(message.get("model"))
            self.metered.response_id = _str(message.get("id"))
            self._merge(sub(message, "usage"))
            self.metered.prompt_usage = usage(self._totals, output=False)
            self.metered.prompt_usage.web_search_requests = self._searches
        elif kind == "message_delta":
            self._merge(sub(obj, "usage"))
            self.metered.usage = usage(self._totals)
        elif kind == "error":
            self.metered.error = _str(sub(obj, "error").get("message")) or "error event"

    def _merge(self, counts: dict[str, Any]) -> None:
        # Cumulative totals: a later value replaces an earlier one; null means "not sent".
        for key, value in counts.items():
            if value is not None:
                self._totals[key] = value


def usage(u: dict[str, Any], output: bool = True) -> Usage:
    """Normalise an Anthropic usage object (input excludes cache reads and writes).

    `cache_creation` splits the writes by lifetime; without it every write is 5-minute.
    With `iterations` (context compaction, the advisor tool) the top level counts only the
    `message` steps: the billed usage is every step's, and `advisor_message` steps are
    another model's, kept in `nested` to be priced at that model's rate. With
    `output=False` only the input side is read (a stream that has not ended).
    """
    iterations = u.get("iterations") if output else None
    steps = [i for i in iterations if isinstance(i, dict)] if iterations else []
    own = [i for i in steps if not (i.get("type") == "advisor_message" and i.get("model"))] \
        if steps else []
    result = _counts(own[0], output) if own else _counts(u, output)
    for step in own[1:]:
        for column, n in _counts(step, output).counts().items():
            setattr(result, column, getattr(result, column) + n)
    result.service_tier = _str(u.get("service_tier"))
    result.speed = _str(u.get("speed"))
    if output:
        if steps:  # the top level's thinking count covers its message steps only
            result.reasoning_tokens = count(sub(u, "output_tokens_details").get(
                "thinking_tokens"))
        result.reasoning_tokens = min(result.reasoning_tokens, result.output_tokens)
        result.web_search_requests = count(sub(u, "server_tool_use").get("web_search_requests"))
        result.nested = [(step["model"], _counts(step, output)) for step in steps
                         if step not in own] if steps else []
    return result


def _counts(u: dict[str, Any], output: bool) -> Usage:
    """One step's token counts (the whole call's when it reports no iterations)."""
    split = sub(u, "cache_creation")
    write_1h = count(split.get("ephemeral_1h_input_tokens"))
    if u.get("cache_creation_input_tokens") is not None:
        written = count(u.get("cache_creation_input_tokens"))
    else:
        written = write_1h + count(split.get("ephemeral_5m_input_tokens"))
    result = Usage(
        input_tokens=count(u.get("input_tokens")),
        cached_input_tokens=count(u.get("cache_read_input_tokens")),
        cache_write_tokens=written,
        cache_write_1h_tokens=min(write_1h, written),
    )
    if output:
        result.output_tokens = count(u.get("output_tokens"))
        result.reasoning_tokens = count(sub(u, "output_tokens_details").get("thinking_tokens"))
    return result


def _collect_text(value: Any, into: list[str]) -> None:
    """Text of a system prompt or message content: strings, text blocks, tool data."""
    if isinstance(value, str):
        into.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_text(item, into)
    elif isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image", "redacted_thinking") or (
                kind == "document" and sub(value, "source").get("type") not in ("text", "content")):
            return  # binary or encrypted: no text to count here
        for key in _TEXT_KEYS:
            _collect_text(value.get(key), into)
        if kind == "text":  # a plain-text document source holds its text in "data"
            _collect_text(value.get("data"), into)
        if kind in ("tool_use", "server_tool_use") and value.get("input") is not None:
            into.append(orjson.dumps(value["input"]).decode())


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _free(method: str, parts: list[str]) -> bool:
    """Whether Anthropic bills nothing for this call: listing models, reading, cancelling
    or deleting batches and files. Creating a batch is billable and not metered here."""
    if method in ("GET", "HEAD", "DELETE"):
        return parts[:1] in (["models"], ["files"]) or parts[:2] == ["messages", "batches"]
    return (method == "POST" and len(parts) == 4 and parts[:2] == ["messages", "batches"]
            and parts[3] == "cancel")


_ADAPTER = AnthropicDialect()
SPEC = DialectSpec(
    name="anthropic",
    adapter=_ADAPTER,
    endpoint_policy=DescribedPolicy(_ADAPTER),
    key_headers=("x-api-key", "Authorization"),
    providers=MappingProxyType({"anthropic": BuiltinProvider("https://api.anthropic.com",
                                                             "ANTHROPIC_API_KEY")}),
    standard_tiers=frozenset({"standard", "standard_only"}),
)
