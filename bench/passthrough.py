"""A bare aiohttp pass-through proxy: the practical floor for any Python proxy.

One ClientSession for the process; each request is forwarded as it came (method, path
and query, end-to-end headers, body) and the response goes back chunk by chunk as it
arrives, bytes untouched (no decompression). Nothing else: no parsing, no metering, no
logging. The load benchmark runs meterproxy against it.

    python -m bench.passthrough --port 9101 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bench.fakeprovider import new_loop

HOST = "127.0.0.1"
# RFC 9110 section 7.6.1, plus the ones the client library sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "proxy-connection",
})
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


def make_app(upstream: str) -> web.Application:
    """An application forwarding every request to `upstream` (scheme://host:port)."""
    base = upstream.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=600)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # The client sends what the caller sent: no User-Agent or Accept-Encoding of its own.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"), timeout=timeout)
        app[SESSION] = session
        yield
        await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = URL(base + request.raw_path, encoded=True)
        try:
            upstream_response = await request.app[SESSION].request(
                request.method, url, headers=_end_to_end(request.headers),
                data=body or None, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.Response(status=502, text=f"upstream failed: {type(exc).__name__}\n")
        async with upstream_response:
            out = web.StreamResponse(status=upstream_response.status,
                                     reason=upstream_response.reason,
                                     headers=_end_to_end(upstream_response.headers))
            if upstream_response.content_length is not None:
                out.content_length = upstream_response.content_length
            await out.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help=f"port on {HOST}")
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host=HOST, port=args.port, access_log=None,
                print=None, loop=new_loop())


if __name__ == "__main__":
    main()
