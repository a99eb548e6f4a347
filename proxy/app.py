"""The aiohttp application factory and the server's life cycle.

Resources are created in `cleanup_ctx` and closed in reverse order: on shutdown the
in-flight calls drain first, then the upstream session, then the usage-log writer flushes
every queued row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import aiohttp
import structlog
from aiohttp import web

from proxy import admin, tokens
from proxy.config import Settings
from proxy.keys import APP_RUNTIME, APP_SESSION
from proxy.pipeline import handle
from proxy.runtime import build_runtime, rebuild_budgets, reload_from_source

log = structlog.get_logger("meterproxy")


def create_app(settings: Settings, *,
               clock: Callable[[], datetime] | None = None) -> web.Application:
    """A ready-to-run application for these settings."""
    max_body = int(settings.server.max_body_mb * 1024 * 1024)
    app = web.Application(client_max_size=max_body)
    app.cleanup_ctx.append(_runtime_ctx(settings, clock))
    app.cleanup_ctx.append(_session_ctx)
    admin.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _runtime_ctx(settings: Settings, clock: Callable[[], datetime] | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        rt = await loop.run_in_executor(None, build_runtime, settings, clock)
        await loop.run_in_executor(None, rt.writer.start)
        await rebuild_budgets(rt)
        if rt.budgets is not None:
            # Every call will be estimated: load the tokenizer now, not on the first call
            # (without budgets it loads only if a stream ends without usage: ~50 MB saved).
            await tokens.off_loop(tokens.get_encoding, "o200k_base")
        app[APP_RUNTIME] = rt
        log.info("started", config=settings.source, usage_log=settings.storage.usage_log,
                 providers=sorted(rt.upstreams), auth=settings.auth.mode,
                 keys=len(rt.keys), pricing_version=rt.prices.digest)
        yield
        if rt.background:
            await asyncio.wait(set(rt.background), timeout=settings.server.grace_s)
        await loop.run_in_executor(None, rt.writer.close)
        if rt.budgets is not None:
            await rt.budgets.ledger.close()
        log.info("stopped", rows_written=rt.writer.written)

    return ctx


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    # One pooled session for every provider: connections are kept per host, and the
    # response body is handed to us already decoded (we ask only for gzip or deflate).
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                    skip_auto_headers=("User-Agent",))
    app[APP_SESSION] = session
    rt = app[APP_RUNTIME]
    if rt.budgets is not None:
        rt.budgets.alerts.session = session
    yield
    await session.close()


async def serve(settings: Settings, host: str, port: int, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, reuse_port: bool = False) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT), then drain in-flight calls and flush.

    `reuse_port` lets several worker processes listen on one port (SO_REUSEPORT)."""
    import signal

    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.server.grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    log.info("listening", url=f"http://{host}:{port}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    rt = app[APP_RUNTIME]
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, lambda: rt.spawn(reload_from_source(rt)))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting_down")
        await runner.cleanup()
