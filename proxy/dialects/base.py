"""What every dialect adapter provides, and the pieces they share.

A dialect knows one API family's wire format: where the model, stream flag and output
limit sit in a request, where the client put its key, how usage reads from a JSON body or
an event stream, and how an error looks. Nothing outside `dialects/` knows any of that.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy import tokens
from proxy.errors import MeterError
from proxy.usage import Usage


@dataclass(slots=True)
class Call:
    """What a dialect read from one request."""

    endpoint: str
    model: str | None = None
    stream: bool = False
    metered: bool = False
    max_output_tokens: int | None = None
    # OpenAI chat streams: the proxy asked for the usage chunk and must hide it.
    hide_usage_chunk: bool = False
    # A call the provider bills nothing for; neither metered nor free means not metered.
    free: bool = False
    # Answers generated at once (`n`, `candidateCount`): each may use the whole output bound.
    choices: int = 1
    # The prompt continues context the provider keeps (previous_response_id, conversation).
    server_context: bool = False
    # Why a not-metered call is not metered, when it is a flag in the body, not the path.
    unmetered_reason: str | None = None

    @property
    def policy(self) -> EndpointKind:
        if self.metered:
            return EndpointKind.METERED
        return EndpointKind.FREE if self.free else EndpointKind.NOT_METERED


@dataclass(slots=True)
class Metered:
    """What the response said about usage, once it has ended."""

    usage: Usage | None = None
    response_model: str | None = None
    # The provider's id for this answer (chatcmpl-..., resp_..., msg_..., a Gemini
    # responseId), read only from a whole body or a stream's own events.
    response_id: str | None = None
    # Output text seen so far, for an estimate when usage never came.
    text: TextTally = field(default_factory=lambda: TextTally())
    # An error event inside an otherwise successful stream.
    error: str | None = None
    # Input counts a stream reported before its final usage (Anthropic's message_start,
    # Gemini's early chunks): exact where only the output must be estimated after a cut.
    prompt_usage: Usage | None = None


class StreamMeter(Protocol):
    """Reads usage from an event stream as it passes: feed per chunk, finish once."""

    def feed(self, chunk: bytes) -> bytes:
        """Take one chunk from upstream; return the bytes to send on to the client."""

    def finish(self) -> tuple[bytes, Metered]:
        """The stream ended: any bytes still owed to the client, and what was metered."""


class Dialect(Protocol):
    name: str
    request_id_header: str

    def describe(self, method: str, path: str, payload: Any) -> Call:
        """Read endpoint, model, stream flag and output limit from a request."""

    def misplaced(self, path: str, base: str) -> str | None:
        """None for a path this API can have; else which base URL (the provider's one on
        this proxy is `base`) the client should be set to, since the provider would 404."""

    def client_key(self, request: web.Request) -> str | None:
        """The key the client sent, wherever its SDK puts it."""

    def set_upstream_key(
        self, headers: CIMultiDict[str], query: MultiDict[str], key: str, header: str | None
    ) -> None:
        """Remove the client's key from headers and query, put the provider key in."""

    def edit_body(self, call: Call, payload: Any, body: bytes) -> bytes:
        """The documented edits to the request body (e.g. ask for usage on streams)."""

    def read_usage(self, call: Call, body: bytes) -> Metered:
        """Usage from a whole JSON response body."""

    def stream_meter(self, call: Call) -> StreamMeter:
        """A fresh meter for one streamed response."""

    def prompt_texts(self, call: Call, payload: Any) -> tuple[list[str], int]:
        """The prompt's text pieces and the fixed per-message token overhead to add."""

    def split_prefix(self, call: Call, payload: Any) -> tuple[list[Any], list[Any]] | None:
        """The request's stable prefix (what a prompt cache could serve again: system
        prompt, tools, leading messages) and the rest, as JSON values in prompt order;
        None for a call with no prompt to cache (docs/advise.md, "Stable prefix")."""

    def error_body(self, error: MeterError) -> bytes:
        """The provider's own error shape, so SDKs raise their usual exceptions."""


@dataclass(frozen=True, slots=True)
class BuiltinProvider:
    """A provider usable with no `providers:` entry in the config (its dialect's)."""

    base_url: str
    api_key_env: str


class EndpointKind(StrEnum):
    """How the proxy treats a call to one endpoint (docs/budgets.md)."""

    METERED = "metered"  # priced from the response, held against budgets
    FREE = "free"  # costs nothing (model lists, token counting, reads)
    NOT_METERED = "not_metered"  # billable but not priced by the proxy: refused by default


class EndpointPolicy(Protocol):
    """What each path under a provider of this dialect is; see issue 11."""

    def classify(self, method: str, path: str) -> EndpointKind: ...


@dataclass(frozen=True, slots=True)
class DescribedPolicy:
    """A dialect's endpoint policy as its adapter's describe() states it for a request
    without a body: one place decides, for the registry and for each call (where a body
    flag such as `background: true` can still make a metered endpoint not metered)."""

    adapter: Dialect

    def classify(self, method: str, path: str) -> EndpointKind:
        return self.adapter.describe(method, path, None).policy


@dataclass(frozen=True, slots=True)
class DialectSpec:
    """Everything the rest of the proxy knows about one API family, declared in its module
    as `SPEC`; `proxy.dialects.registry()` finds it there."""

    name: str  # what `providers.<name>.dialect` says
    adapter: Dialect  # the wire format (stateless, shared)
    key_headers: tuple[str, ...]  # request headers that may carry a client or provider key
    providers: Mapping[str, BuiltinProvider] = field(
        default_factory=lambda: MappingProxyType({}))
    token_families: tokens.TokenFamilies = field(default_factory=tokens.TokenFamilies)
    # Service-tier names that mean the standard price in this provider family's vocabulary.
    standard_tiers: frozenset[str] = frozenset()
    # Which endpoints are metered, free or refused; None: the adapter's describe() decides.
    endpoint_policy: EndpointPolicy | None = None


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header value."""
    if value and value[:7].lower() == "bearer ":
        token = value[7:].strip()
        return token or None
    return None


def version_free(path: str) -> list[str]:
    """The path's segments without a leading API version (`v1`, `v1beta`)."""
    parts = [p for p in path.split("/") if p]
    if parts and re.fullmatch(r"v\d+\w*", parts[0]):
        parts = parts[1:]
    return parts


def listed(value: Any) -> list[Any]:
    """A JSON array, or an empty one for anything else."""
    return value if isinstance(value, list) else []


def labelled(*pairs: tuple[str, Any]) -> list[Any]:
    """Prefix parts with their names ([name, value]), leaving out empty ones, so a tool and
    a message with the same JSON never hash alike."""
    return [[name, value] for name, value in pairs if value not in (None, "", [], {})]


def positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


_COLON = re.compile(r"\s*:\s*")


def load_body(body: bytes, keys: tuple[str, ...]) -> tuple[Any, str | None]:
    """A response body as JSON; when it is not whole (cut short, or only the tail of a body
    too large to hold), the last complete value of each of `keys` found in it, and a note."""
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError:
        pass
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    found: dict[str, Any] = {}
    for key in keys:
        needle = f'"{key}"'
        at = text.rfind(needle)
        while at != -1 and key not in found:
            colon = _COLON.match(text, at + len(needle))
            if colon is not None:
                with contextlib.suppress(ValueError):
                    found[key] = decoder.raw_decode(text, colon.end())[0]
            at = text.rfind(needle, 0, at)
    note = "response body is not whole JSON" + ("; usage read from its tail" if found else "")
    return (found or None), note


class TextTally:
    """Streamed output text, kept for a token estimate should usage never come.

    Usage nearly always comes, so nothing is tokenized while a stream passes, and content
    events need not even be parsed: a meter hands them over raw (`defer`) with a `reader`
    that finds their text, and only `text()` and `count()` read them (`count()` on the
    tokenizer pool, for a stream that ended without usage). Memory stays bounded: past
    FOLD_CHARS the held events are read into text, and past FOLD_CHARS of text that text
    is counted on the tokenizer pool, off the event loop, and only the number kept.
    """

    __slots__ = ("_deferred", "_folds", "_held", "_items", "_reader", "model")
    FOLD_CHARS = 256 * 1024

    def __init__(self, model: str | None = None,
                 reader: Callable[[bytes], Iterable[Any]] | None = None) -> None:
        self.model = model
        self._reader = reader
        self._items: list[str | bytes] = []  # text and raw events, in stream order
        self._held = 0  # characters and bytes in _items
        self._deferred = 0  # raw events in _items
        self._folds: list[_Fold] = []

    def add(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self._items.append(text)
            self._held += len(text)
            if self._held > self.FOLD_CHARS:
                self._fold()

    def defer(self, data: bytes) -> None:
        """Keep a raw event whose text the reader can find, should it ever be needed."""
        self._items.append(data)
        self._held += len(data)
        self._deferred += 1
        if self._held > self.FOLD_CHARS:
            self._fold()

    def defer_all(self, events: list[bytes]) -> None:
        """`defer` each of `events`, in order (a meter's many events of one read)."""
        size = sum(map(len, events))
        if self._held + size > self.FOLD_CHARS:
            for event in events:  # folds where one at a time would
                self.defer(event)
            return
        self._items += events
        self._held += size
        self._deferred += len(events)

    def catch_up(self) -> None:
        """Read every deferred event into text, in order (the reader may note errors)."""
        if not self._deferred:
            return
        assert self._reader is not None
        items: list[str | bytes] = []
        for item in self._items:
            if isinstance(item, bytes):
                items += [t for t in self._reader(item) if isinstance(t, str) and t]
            else:
                items.append(item)
        self._items = items
        self._held = sum(map(len, items))
        self._deferred = 0

    def _fold(self) -> None:
        self.catch_up()
        if self._held <= self.FOLD_CHARS:  # the events were mostly JSON around little text
            return
        self._folds.append(_Fold("".join(self._items), self.model))  # type: ignore[arg-type]
        self._items = []
        self._held = 0

    @property
    def folds(self) -> int:
        """How many stretches of text went to the tokenizer pool so far."""
        return len(self._folds)

    @property
    def held(self) -> int:
        """Characters and bytes held now (bounded by about FOLD_CHARS)."""
        return self._held

    def text(self) -> str:
        """The text not yet folded into a count."""
        self.catch_up()
        return "".join(self._items)  # type: ignore[arg-type]

    def count(self) -> int:
        """Tokens of everything streamed: the folds plus what is held. CPU work: call it
        on the tokenizer pool (tokens.off_loop), never on the event loop."""
        return sum(f.result() for f in self._folds) + tokens.count_text(self.text(), self.model)


class _Fold:
    """A stretch of streamed text being counted on the tokenizer pool."""

    __slots__ = ("future", "model", "text")

    def __init__(self, text: str, model: str | None) -> None:
        self.text = text
        self.model = model
        self.future = tokens.pool.submit("", self._run)

    def _run(self) -> int:
        text, self.text = self.text, ""
        return tokens.count_text(text, self.model)

    def result(self) -> int:
        # Not started yet: count it here (this may be a pool worker; none waits on a
        # job queued behind it).
        return self._run() if self.future.cancel() else self.future.result()
