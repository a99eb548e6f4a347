"""forward: send the call upstream and wait for the response headers."""

from __future__ import annotations

from urllib.parse import urlencode

import aiohttp
from yarl import URL

from proxy.errors import Kind, MeterError
from proxy.exchange import Exchange


async def forward(session: aiohttp.ClientSession, x: Exchange) -> aiohttp.ClientResponse:
    """Open the upstream response; connection failures become 502, silence 504."""
    assert x.upstream is not None
    upstream = x.upstream
    body = x.dialect.edit_body(x.call, x.payload, x.body) if x.call.metered else x.body
    if x.encoded is not None:
        if body is x.body:
            body = x.encoded  # untouched: on it goes in the encoding it was sent in
        else:
            x.headers.popall("Content-Encoding", None)  # our edit went into the plain copy
    query = x.request.raw_path.partition("?")[2]
    if query and x.query != x.request.query:  # the dialect moved a key out of the query
        query = urlencode(list(x.query.items()))
    url = URL(f"{upstream.base_url}{x.path}{'?' if query else ''}{query}", encoded=True)
    x.forwarded = True
    try:
        return await session.request(
            x.request.method, url, headers=x.headers,
            data=body or None, timeout=upstream.timeout, allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise MeterError(Kind.UPSTREAM_TIMEOUT,
                         f"{upstream.name} did not answer within {upstream.timeout_s:g} s"
                         ) from None
    except aiohttp.ClientError as exc:
        raise MeterError(Kind.UPSTREAM_UNREACHABLE,
                         f"cannot reach {upstream.name}: {type(exc).__name__}") from None
