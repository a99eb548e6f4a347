"""The aiohttp application factory and the server's life cycle.

The Server (session, writer, ledger, the current Runtime) is created in `cleanup_ctx`;
on shutdown aiohttp drains the in-flight calls first, then `Server.close` finishes the
background work, closes the upstream session, flushes the writer and closes the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import structlog
from aiohttp import web

from proxy import admin, preflight
from proxy.config import Settings
from proxy.keys import APP_SERVER
from proxy.listener import GuardedSite, listen_socket, quiet_accept_errors
from proxy.logs import flush as flush_logs
from proxy.metrics import Metrics
from proxy.pipeline import handle
from proxy.server import Server
from proxy.workers import METRICS_DIR_ENV, WORKER_ENV

log = structlog.get_logger("meterproxy")


def create_app(settings: Settings, *,
               clock: Callable[[], datetime] | None = None) -> web.Application:
    """A ready-to-run application for these settings."""
    server = settings.server
    # Bodies stay as sent (we decode our own copy); an idle connection, or one that has
    # not finished its request headers, closes after header_timeout_s.
    app = web.Application(client_max_size=int(server.max_body_mb * 1024 * 1024),
                          handler_args={"auto_decompress": False,
                                        "keepalive_timeout": server.header_timeout_s})
    app.cleanup_ctx.append(_server_ctx(settings, clock))
    admin.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _server_ctx(settings: Settings, clock: Callable[[], datetime] | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[APP_SERVER] = await Server.start(settings, clock)
        yield
        # aiohttp runs this after in-flight calls have drained (or the grace has passed).
        await app[APP_SERVER].close()

    return ctx


async def serve(settings: Settings, host: str, port: int, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, reuse_port: bool = False) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT), then drain in-flight calls and flush.

    `reuse_port` lets several worker processes listen on one port (SO_REUSEPORT)."""
    import signal

    sock = listen_socket(host, port, reuse_port=reuse_port)
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.server.grace_s)
    try:
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    site = GuardedSite(runner, host, port, max_connections=settings.server.max_connections,
                       sock=sock)
    await site.start()
    quiet_accept_errors(asyncio.get_running_loop())
    for event, fields in preflight.warnings(app[APP_SERVER].current):
        log.warning(event, **fields)
    publishing = _publish_metrics(app[APP_SERVER].services.metrics)
    log.info("listening", url=f"http://{host}:{port}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    server = app[APP_SERVER]
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, lambda: server.services.tasks.spawn(
            server.reload_from_source()))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting_down")
        if publishing is not None:
            publishing.cancel()
        await runner.cleanup()
        flush_logs()


def _publish_metrics(metrics: Metrics) -> asyncio.Task | None:
    """Under `serve --workers N`: publish this worker's counters every second, so a
    scrape on any worker shows every worker's totals."""
    shared = os.environ.get(METRICS_DIR_ENV)
    if not shared:
        return None
    metrics.share(shared, int(os.environ.get(WORKER_ENV, "0")))

    async def loop() -> None:
        while True:
            with contextlib.suppress(OSError):
                metrics.publish()
            await asyncio.sleep(1)

    return asyncio.get_running_loop().create_task(loop())
