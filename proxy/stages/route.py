"""route and read_body: which provider a call is for, and its body."""

from __future__ import annotations

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
    """Read the whole request body (bounded by server.max_body_mb) and parse JSON ones."""
    try:
        x.body = await x.request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = rt.settings.server.max_body_mb
        raise MeterError(Kind.TOO_LARGE, f"request body over the {limit:g} MB limit") from None
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
