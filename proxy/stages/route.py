"""route and read_body: which provider a call is for, and its body."""

from __future__ import annotations

import asyncio
import zlib

import orjson
from aiohttp import web

from proxy.errors import Kind, MeterError
from proxy.exchange import Exchange
from proxy.paths import AmbiguousPath, canonical
from proxy.runtime import Runtime


def route(rt: Runtime, x: Exchange) -> None:
    """The first path segment names the provider; the rest, in its canonical form
    (proxy.paths), is what the dialect matches and what goes upstream."""
    raw = x.request.raw_path.split("?", 1)[0]
    first, _, rest = raw.lstrip("/").partition("/")
    try:
        name = canonical("/" + first)[1:]
    except AmbiguousPath:
        name = first
    upstream = rt.upstreams.get(name)
    if upstream is None:
        known = ", ".join(sorted(rt.upstreams))
        raise MeterError(Kind.NOT_FOUND,
                         f"no provider named {name!r} here: paths start with one of {known}")
    x.upstream = upstream
    try:
        x.path = canonical("/" + rest)
    except AmbiguousPath as exc:
        raise MeterError(Kind.INVALID_REQUEST,
                         f"ambiguous path: {exc}; send the plain path") from None


async def read_body(rt: Runtime, x: Exchange) -> None:
    """Read the whole request body within server.body_timeout_s and server.max_body_mb
    (compressed and decoded), and parse JSON ones.

    The server does not decode bodies itself, so the provider gets them as they were sent
    (`x.encoded`); only we read the decoded copy, and a gzip bomb stops at the limit."""
    server = rt.settings.server
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await x.request.read()
    except web.HTTPRequestEntityTooLarge:
        raise MeterError(Kind.TOO_LARGE,
                         f"request body over the {server.max_body_mb:g} MB limit") from None
    except TimeoutError:
        raise MeterError(Kind.REQUEST_TIMEOUT, f"the request body did not arrive within "
                         f"{server.body_timeout_s:g} s") from None
    encoding = x.request.headers.get("Content-Encoding", "").strip().lower()
    if raw and encoding not in ("", "identity"):
        x.encoded = raw
        limit = int(server.max_body_mb * 1024 * 1024)
        x.body = await asyncio.to_thread(decode, raw, encoding, limit)
    else:
        x.body = raw
    if x.body and x.body.lstrip()[:1] in (b"{", b"["):
        try:
            x.payload = orjson.loads(x.body)
        except orjson.JSONDecodeError:
            x.payload = None


def inspect(x: Exchange) -> None:
    """Let the dialect read endpoint, model, stream flag and output limit; refuse a path
    the provider's API cannot have (a client set to the wrong base URL) with the right one."""
    x.call = x.dialect.describe(x.request.method, x.path, x.payload)
    advice = x.dialect.misplaced(x.path, f"{x.request.scheme}://{x.request.host}/{x.provider}")
    if advice is not None:
        raise MeterError(Kind.INVALID_REQUEST,
                         f"{x.request.method} {x.path} is not a {x.dialect.name} API path. "
                         f"{advice}")
    if x.call.metered and not isinstance(x.payload, dict):
        raise MeterError(Kind.INVALID_REQUEST,
                         "the request body is not a JSON object (malformed JSON?)")


def decode(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body decoded, refused past `limit` bytes (a decompression bomb)."""
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise MeterError(Kind.INVALID_REQUEST, f"Content-Encoding {encoding!r} is not supported "
                         "here: send the body plain, gzip or deflate")
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise MeterError(Kind.INVALID_REQUEST,
                         f"the request body is not valid {encoding} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise MeterError(Kind.TOO_LARGE, f"the decoded request body is over the "
                         f"{limit / 1024 / 1024:g} MB limit")
    return out
