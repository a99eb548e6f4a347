"""The Gemini API (generativelanguage.googleapis.com), under /v1beta/ and /v1/.

Metered: `models/{model}:generateContent`, `:streamGenerateContent`, `:embedContent` and
`:batchEmbedContents` (embeddings report no usage: their input is counted). Free:
`:countTokens` and reading models, files and batches. Everything else (batch generation,
`:predict`, cached contents...) is not metered and refused unless allowed.

Gemini's `promptTokenCount` includes the cached tokens and its thinking tokens sit outside
`candidatesTokenCount`, so both are moved into our classes here. Streams come as SSE with
`alt=sse` and as one JSON array without it; every chunk's usageMetadata holds running
totals, and the chunk that finishes the answer holds the final ones.
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
    labelled,
    load_body,
    positive_int,
    version_free,
)
from proxy.dialects.sse import SSESplitter, is_junk, parse_event
from proxy.errors import Kind, MeterError
from proxy.usage import Usage, count, sub

# /v1beta/models/gemini-2.5-flash:generateContent (tuned models live under tunedModels/).
# The version is optional here so that a client set to the wrong base URL still shows its
# model and method in the row of the 400 that `misplaced` gives it.
_METHOD = re.compile(r"(?:/v\d+(?:alpha|beta)?\d*)?/(?:models|tunedModels)/([^/:]+):(\w+)")
# Every path of the API starts with its version (uploads with /upload, then the version).
_PLACED = re.compile(r"/(?:upload/)?v\d+(?:alpha|beta)?\d*(?:/|$)")
_EMBED = frozenset({"embedContent", "batchEmbedContents"})
_METERED = frozenset({"generateContent", "streamGenerateContent"}) | _EMBED
_FREE = frozenset({"countTokens"})
# Grounding with Google Search: Gemini 3 and later bill each search query, earlier models
# each grounded request however many queries it ran.
_PER_QUERY = re.compile(r"gemini-(?:[3-9]|\d\d)")
_ERRORS = {
    Kind.INVALID_REQUEST: "INVALID_ARGUMENT",
    Kind.AUTHENTICATION: "UNAUTHENTICATED",
    Kind.PERMISSION: "PERMISSION_DENIED",
    Kind.NOT_FOUND: "NOT_FOUND",
    Kind.TOO_LARGE: "INVALID_ARGUMENT",
    Kind.REQUEST_TIMEOUT: "INVALID_ARGUMENT",
    Kind.BUDGET_EXCEEDED: "RESOURCE_EXHAUSTED",
    Kind.RATE_LIMITED: "RESOURCE_EXHAUSTED",
    Kind.ANOMALY_BLOCKED: "RESOURCE_EXHAUSTED",
    Kind.UPSTREAM_UNREACHABLE: "UNAVAILABLE",
    Kind.UPSTREAM_TIMEOUT: "DEADLINE_EXCEEDED",
    Kind.UNAVAILABLE: "UNAVAILABLE",
    Kind.INTERNAL: "INTERNAL",
}
_REASONS = {Kind.BUDGET_EXCEEDED: "budget_exceeded", Kind.RATE_LIMITED: "rate_limited"}
# The keys of a stream chunk that says more than text and running totals (one scan).
_SAYS_MORE = re.compile(
    rb'"(?:finishReason|groundingMetadata|promptFeedback|error|functionCall)"')


class GeminiDialect:
    name = "gemini"
    # Unverified: Google documents no request-id response header for this API.
    request_id_header = "x-request-id"

    def describe(self, method: str, path: str, payload: Any) -> Call:
        found = _METHOD.fullmatch(path.rstrip("/"))
        body = payload if isinstance(payload, dict) else {}
        if found is None:
            parts = version_free(path)
            free = method in ("GET", "HEAD", "DELETE") and parts[:1] in (
                ["models"], ["tunedModels"], ["files"], ["batches"], ["operations"],
                ["cachedContents"])
            return Call(endpoint=parts[0] if parts else "root", free=free)
        model, action = found.group(1), found.group(2)
        if method != "POST" or action not in _METERED:
            return Call(endpoint=action, model=model, free=action in _FREE)
        if action in _EMBED:
            return Call(endpoint=action, model=model, metered=True, max_output_tokens=0)
        config = body.get("generationConfig", body.get("generation_config"))
        config = config if isinstance(config, dict) else {}
        limit = config.get("maxOutputTokens", config.get("max_output_tokens"))
        choices = config.get("candidateCount", config.get("candidate_count"))
        return Call(endpoint=action, model=model, stream=action == "streamGenerateContent",
                    metered=True, max_output_tokens=positive_int(limit),
                    choices=positive_int(choices) or 1)

    def misplaced(self, path: str, base: str) -> str | None:
        if _PLACED.match(path):
            return None
        return (f"Gemini API paths start with a version (/v1beta/...): set the base URL to "
                f"{base} (google-genai, LangChain, pydantic-ai) or {base}/v1beta "
                "(litellm's api_base, the Vercel AI SDK's baseURL)")

    def client_key(self, request: web.Request) -> str | None:
        return request.headers.get("x-goog-api-key") or request.query.get("key") or None

    def set_upstream_key(
        self, headers: CIMultiDict[str], query: MultiDict[str], key: str, header: str | None
    ) -> None:
        headers.popall("x-goog-api-key", None)
        query.popall("key", None)
        headers[header or "x-goog-api-key"] = key

    def edit_body(self, call: Call, payload: Any, body: bytes) -> bytes:
        return body  # every response carries usageMetadata: nothing to ask for

    def read_usage(self, call: Call, body: bytes) -> Metered:
        obj, note = load_body(body, ("usageMetadata", "modelVersion", "candidates"))
        if obj is None:
            return Metered(error=note)
        # streamGenerateContent without alt=sse, read whole: a JSON array of chunks.
        chunks = obj if isinstance(obj, list) else [obj]
        reader = _ChunkReader(call.model)
        for chunk in chunks:
            reader.read(chunk, text=False)
        if reader.last is None:  # no usage at all: its text is what the estimate counts
            for chunk in chunks:
                reader.read_text(chunk)
        elif reader.metered.usage is None:
            reader.finished = True  # a whole body: its last counts are final
            reader.settle(reader.last)
        return reader.metered

    def stream_meter(self, call: Call) -> _StreamMeter:
        return _StreamMeter(call.model)

    def prompt_texts(self, call: Call, payload: Any) -> tuple[list[str], int]:
        body = payload if isinstance(payload, dict) else {}
        texts: list[str] = []
        if call.endpoint in _EMBED:
            requests = body.get("requests") if call.endpoint == "batchEmbedContents" else [body]
            for request in requests if isinstance(requests, list) else []:
                if isinstance(request, dict):
                    _collect_parts(request.get("content"), texts)
            return texts, 0
        _collect_parts(body.get("systemInstruction", body.get("system_instruction")), texts)
        contents = body.get("contents")
        for content in contents if isinstance(contents, list) else [contents]:
            _collect_parts(content, texts)
        if body.get("tools"):
            texts.append(orjson.dumps(body["tools"]).decode())
        return texts, 0

    def split_prefix(self, call: Call, payload: Any) -> tuple[list[Any], list[Any]] | None:
        # Gemini caches implicitly by prefix, or explicitly by a named cachedContent: the
        # stable part is the system instruction, tools and every turn but the newest.
        if call.endpoint in _EMBED or not isinstance(payload, dict):
            return None
        contents = payload.get("contents")
        turns = contents if isinstance(contents, list) else [contents]
        stable = labelled(
            ("system", payload.get("systemInstruction", payload.get("system_instruction"))),
            ("tools", payload.get("tools")),
            ("tool_config", payload.get("toolConfig", payload.get("tool_config"))),
            ("cached_content", payload.get("cachedContent", payload.get("cached_content"))),
            ("contents", turns[:-1]))
        return stable, turns[-1:]

    def error_body(self, error: MeterError) -> bytes:
        message = error.message
        # Both refusals are RESOURCE_EXHAUSTED here: the message's first word tells them apart.
        reason = _REASONS.get(error.kind)
        if reason is not None and reason not in message:
            message = f"{reason}: {message}"
        return orjson.dumps({"error": {"code": error.status, "message": message,
                                       "status": _ERRORS[error.kind]}})


class _ChunkReader:
    """What a sequence of GenerateContentResponse chunks says, one chunk at a time."""

    __slots__ = ("_model", "_queries", "_tally", "finished", "last", "metered")

    def __init__(self, model: str | None) -> None:
        self._model = model
        self._tally = TextTally(model, reader=self.chunk_text)
        self._queries = 0  # web search queries the grounding metadata names
        self.finished = False  # a chunk said the answer is complete
        self.last: dict[str, Any] | None = None  # the latest usageMetadata seen
        self.metered = Metered(text=self._tally)

    def read(self, obj: Any, text: bool = True) -> None:
        """Note what one chunk says; `text=False` when its text is tallied already or, for
        a whole body with usage, never needed."""
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("error"), dict):
            self.metered.error = _str(obj["error"].get("message")) or "error in the stream"
            return
        self.metered.response_model = _str(obj.get("modelVersion")) or self.metered.response_model
        self.metered.response_id = _str(obj.get("responseId")) or self.metered.response_id
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if not isinstance(candidate, dict):
                continue
            if candidate.get("finishReason"):
                self.finished = True
            queries = sub(candidate, "groundingMetadata").get("webSearchQueries")
            if isinstance(queries, list):  # repeated per chunk, never to be added up
                self._queries = max(self._queries, len(queries))
        if text:
            self.read_text(obj)
        if sub(obj, "promptFeedback").get("blockReason"):
            self.finished = True  # a refused prompt: this chunk is the whole answer
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            self.last = meta
            self.settle(meta)

    def read_text(self, obj: Any) -> None:
        """Tally one chunk's output text (none for an error chunk, as `read` reads it)."""
        if not isinstance(obj, dict) or isinstance(obj.get("error"), dict):
            return
        candidates = obj.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if isinstance(candidate, dict):
                for piece in candidate_texts(candidate):
                    self._tally.add(piece)

    def chunk_text(self, data: bytes) -> list[str]:
        """The text of a deferred chunk (TextTally's reader)."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.metered.error = "malformed event in the stream"
            return []
        candidates = obj.get("candidates") if isinstance(obj, dict) else None
        return [piece for candidate in (candidates if isinstance(candidates, list) else ())
                if isinstance(candidate, dict) for piece in candidate_texts(candidate)]

    def settle(self, meta: dict[str, Any]) -> None:
        """Running totals: input counts for now, the whole usage once the answer is done."""
        searches = self._queries
        if searches > 1 and not _PER_QUERY.search(self._model or self.metered.response_model
                                                  or ""):
            searches = 1  # before Gemini 3, one per grounded request however many ran
        inputs = _input_side(meta)  # read once for both
        self.metered.prompt_usage = Usage(**inputs, web_search_requests=searches)
        if self.finished:
            self.metered.usage = Usage(**inputs, web_search_requests=searches)
            _add_output(self.metered.usage, meta)


class _StreamMeter:
    """Meters an SSE stream (alt=sse) or a streamed JSON array; passes every byte through.

    Every chunk carries running usage totals, and only the last chunk's count: a chunk is
    kept raw (its text for an estimate, itself as the latest usage) and parsed only when
    a later one does not replace it, or the stream ends. Chunks that say more than text
    and usage (a finish, grounding, a block, an error, a function call) are read at once,
    after the held one, so everything is read in stream order.
    """

    __slots__ = ("_array", "_held", "_reader", "_split")

    def __init__(self, model: str | None) -> None:
        self._reader = _ChunkReader(model)
        self._split: SSESplitter | None = None
        self._array: ArraySplitter | None = None
        self._held: bytes | None = None  # the latest chunk with usage, not yet parsed

    def feed(self, chunk: bytes) -> bytes:
        split = self._split
        if split is None:
            if self._array is not None:
                for element in self._array.feed(chunk):
                    self._take(element)
                return chunk
            head = chunk.lstrip()
            if not head:
                return chunk
            if head[:1] == b"[":
                self._array = ArraySplitter()
                return self.feed(chunk)
            split = self._split = SSESplitter()
        if not split.pending and chunk[:6] == b"data: ":
            events = _data_events(chunk)
            if events is not None:  # the common read: no splitting, no parse_event
                self._take_events(chunk, events)
                return chunk
        for raw in split.feed(chunk):
            self._read_event(raw)
        return chunk

    def finish(self) -> tuple[bytes, Metered]:
        if self._split is not None:
            tail = self._split.tail()
            if tail.strip():
                self._read_event(tail)
        self._release()
        metered = self._reader.metered
        if metered.usage is None:
            metered.text.catch_up()  # its text will be counted: read it now, noting errors
        return b"", metered

    def _read_event(self, raw: bytes) -> None:
        data = parse_event(raw).data
        if not data:
            if is_junk(raw):
                self._reader.metered.error = "malformed event in the stream"
            return
        self._take(data)

    def _take_events(self, read: bytes, events: list[bytes]) -> None:
        """_take the data of each event of a read `_data_events` cut, in order.

        The read is scanned once for the keys that say more: the events before the first
        such key that carry running totals with their own model and id (nearly all) are
        what _take would defer and hold one after another, so they are deferred at once
        and the last one held. The rest go through _take.
        """
        says_more = _SAYS_MORE.search(read)
        # Each event ends with two LFs and holds no other: those before the key count them.
        clean = len(events) if says_more is None else read.count(b"\n", 0, says_more.start()) // 2
        run = 0
        for event in events[:clean]:
            if b'"usageMetadata"' not in event or event[-1:] != b"}" \
                    or b'"modelVersion"' not in event or b'"responseId"' not in event:
                break
            run += 1
        if run:
            held = [event[6:] for event in events[:run]]
            self._reader.metered.text.defer_all(held)
            self._held = held[-1]
        for event in events[run:]:
            data = event[6:]
            if data:  # an empty data line is no chunk (as in _read_event)
                self._take(data)

    def _take(self, data: bytes) -> None:
        # Each check is a quoted key, which JSON string escaping keeps model output from
        # forging; a chunk with a function call is parsed whole (its arguments are JSON).
        if b'"usageMetadata"' in data and data[-1:] == b"}" and _SAYS_MORE.search(data) is None:
            # Text and running totals only: the text waits in the tally, the totals until
            # a later chunk brings newer ones (one without a model or id of its own could
            # leave the held chunk's as the last seen: that one is read first).
            self._reader.metered.text.defer(data)
            if b'"modelVersion"' not in data or b'"responseId"' not in data:
                self._release()
            self._held = data
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._release()
            self._reader.metered.error = "malformed event in the stream"
            return
        chunk = isinstance(obj, dict) and not isinstance(obj.get("error"), dict)
        if chunk and isinstance(obj.get("usageMetadata"), dict) \
                and _str(obj.get("modelVersion")) and _str(obj.get("responseId")):
            self._held = None  # everything the held chunk says, this one says anew
        else:
            self._release()
        if chunk:  # its text too waits in the tally (chunk_text finds what read would)
            self._reader.metered.text.defer(data)
        self._reader.read(obj, text=False)

    def _release(self) -> None:
        """Read the held chunk (its text is in the tally already)."""
        data, self._held = self._held, None
        if data is not None:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                self._reader.metered.error = "malformed event in the stream"
                return
            self._reader.read(obj, text=False)


def _data_events(chunk: bytes) -> list[bytes] | None:
    """The events of a read that is whole events of one `data: ` line each, all ended as
    the API ends them (CR LF CR LF) or all by LF LF, without their ends; else None.

    No other CR or LF is in such a read, so each event is what SSESplitter would cut and
    its data, after `data: `, what parse_event would read: the caller skips both.
    """
    end = b"\r\n\r\n" if chunk[-4:] == b"\r\n\r\n" else b"\n\n" if chunk[-2:] == b"\n\n" else b""
    if not end or chunk[:6] != b"data: ":
        return None
    events = chunk[:-len(end)].split(end)
    n = len(events)
    if chunk.count(b"\n") != 2 * n or chunk.count(b"\r") != (2 * n if len(end) == 4 else 0) \
            or chunk.count(end + b"data: ") != n - 1:
        return None
    return events


class ArraySplitter:
    """Cuts a JSON array arriving in pieces into its top-level elements, as raw bytes.

    Only the element being read is kept; strings are tracked so that brackets inside
    them (and escaped quotes) do not count.
    """

    __slots__ = ("_depth", "_escape", "_in_string", "_pending", "_start")
    _OUTSIDE = re.compile(rb'[\[\]{}"]')
    _INSIDE = re.compile(rb'["\\]')

    def __init__(self) -> None:
        self._pending = b""
        self._depth = 0
        self._in_string = False
        self._escape = False  # the previous piece ended inside a string on a backslash
        self._start: int | None = None  # where the element being read starts in _pending

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._pending + chunk
        pos = len(self._pending)
        if self._escape and pos < len(buf):
            pos += 1
            self._escape = False
        elements: list[bytes] = []
        while True:
            m = (self._INSIDE if self._in_string else self._OUTSIDE).search(buf, pos)
            if m is None:
                break
            pos = m.end()
            char = buf[m.start()]
            if self._in_string:
                if char == 0x5C:  # backslash: skip the escaped byte
                    if pos < len(buf):
                        pos += 1
                    else:
                        self._escape = True
                else:
                    self._in_string = False
            elif char == 0x22:
                self._in_string = True
            elif char in (0x5B, 0x7B):  # [ {
                self._depth += 1
                if self._depth == 2:
                    self._start = m.start()
            else:
                self._depth -= 1
                if self._depth == 1 and self._start is not None:
                    elements.append(buf[self._start:pos])
                    self._start = None
        if self._start is None:
            self._pending = b""
        else:
            self._pending = buf[self._start:]
            self._start = 0
        return elements


def usage(meta: dict[str, Any], output: bool = True) -> Usage:
    """Normalise usageMetadata: the prompt count includes the cached tokens, tool-use
    prompt tokens are input, and thinking tokens are output beside the candidates'.

    Modalities come from `promptTokensDetails` (the whole prompt, cached part included)
    less `cacheTokensDetails` (the cached part), and `candidatesTokensDetails`. With
    `output=False` only the input side is read (a stream that has not finished).
    """
    result = Usage(**_input_side(meta))
    if output:
        _add_output(result, meta)
    return result


def _input_side(meta: dict[str, Any]) -> dict[str, int]:
    """usage()'s input counts, as Usage's keyword arguments."""
    prompt = count(meta.get("promptTokenCount"))
    cached = min(count(meta.get("cachedContentTokenCount")), prompt)
    uncached = prompt - cached + count(meta.get("toolUsePromptTokenCount"))
    whole = _modalities(meta.get("promptTokensDetails"))
    cache = _modalities(meta.get("cacheTokensDetails"))
    counts = {"input_tokens": uncached, "cached_input_tokens": cached}
    for column, modality in _INPUT_PARTS:  # one not named is 0, Usage's default
        if modality in whole:
            counts[column] = min(max(whole[modality] - cache.get(modality, 0), 0), uncached)
    if "AUDIO" in cache:
        counts["cached_audio_input_tokens"] = min(cache["AUDIO"], cached)
    return counts


def _add_output(result: Usage, meta: dict[str, Any]) -> None:
    """usage()'s output counts, set on `result`."""
    thoughts = count(meta.get("thoughtsTokenCount"))
    result.output_tokens = count(meta.get("candidatesTokenCount")) + thoughts
    result.reasoning_tokens = thoughts
    parts = _modalities(meta.get("candidatesTokensDetails"))
    result.audio_output_tokens = parts.get("AUDIO", 0)
    result.image_output_tokens = parts.get("IMAGE", 0)


_INPUT_PARTS = (("audio_input_tokens", "AUDIO"), ("image_input_tokens", "IMAGE"),
                ("video_input_tokens", "VIDEO"))


def candidate_texts(candidate: dict[str, Any]) -> list[str]:
    """A candidate's output text: text parts (thought summaries too) and function calls."""
    texts = []
    parts = sub(candidate, "content").get("parts")
    for part in parts if isinstance(parts, list) else ():
        if isinstance(part, dict):
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            if isinstance(part.get("functionCall"), dict):
                texts.append(orjson.dumps(part["functionCall"]).decode())
    return texts


def _modalities(details: Any) -> dict[str, int]:
    """The tokens of each modality in a list of {modality, tokenCount}, in one pass."""
    found: dict[str, int] = {}
    if isinstance(details, list):
        for d in details:
            if isinstance(d, dict) and isinstance(modality := d.get("modality"), str):
                found[modality] = found.get(modality, 0) + count(d.get("tokenCount"))
    return found


def _collect_parts(content: Any, into: list[str]) -> None:
    """Text of a Content (or a bare string): text parts, function calls and results."""
    if isinstance(content, str):
        into.append(content)
        return
    if not isinstance(content, dict):
        return
    parts = content.get("parts")
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            into.append(part["text"])
        for key in ("functionCall", "functionResponse", "function_call", "function_response"):
            if part.get(key) is not None:
                into.append(orjson.dumps(part[key]).decode())


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


_ADAPTER = GeminiDialect()
SPEC = DialectSpec(
    name="gemini",
    adapter=_ADAPTER,
    endpoint_policy=DescribedPolicy(_ADAPTER),
    key_headers=("x-goog-api-key",),  # or ?key= in the query
    providers=MappingProxyType({"gemini": BuiltinProvider(
        "https://generativelanguage.googleapis.com", "GEMINI_API_KEY")}),
)
