"""The listening socket: a ceiling on client connections, and accept() failures logged
once per interval.

Past `server.max_connections` a new connection gets a one-line 503 and is closed, so
the process keeps file descriptors for its upstream calls, /healthz and the usage log.
Out of descriptors all the same, asyncio reports every failed accept(); we log one line
per interval, with a count, not a line per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy.logs import Sampled

log = structlog.get_logger("meterproxy")

_BUSY_BODY = orjson.dumps({"error": {
    "message": "meterproxy is at its connection limit (server.max_connections); retry shortly",
    "type": "server_error", "code": "too_many_connections"}})
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\n"
                 b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _Busy(asyncio.Protocol):
    """A connection over the ceiling: told so, then closed (after the client's own close or
    a second, so its unread request does not turn our answer into a reset)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(BUSY_RESPONSE)
        transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.abort)

    def eof_received(self) -> bool:
        return False  # the client is done too: close


class ListenError(OSError):
    """The address cannot be listened on; said in one line."""


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind the listening socket before anything else is opened, so a taken port fails
    at once and leaves no new database behind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is already in use: stop what runs "
                              "there or choose another with --port") from None
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class GuardedSite(web.TCPSite):
    """A TCPSite that turns away connections past `max_connections`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 max_connections: int, sock: socket.socket | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.max_connections = max_connections
        self.sock = sock  # already bound (listen_socket), or None to bind host:port
        self.turned_away = 0
        self._sampled = Sampled()

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) < self.max_connections:
            return server()
        self.turned_away += 1
        held = self._sampled.due("busy", time.monotonic())
        if held is not None:
            log.warning("connection_limit", max_connections=self.max_connections,
                        similar_since_last=held)
        return _Busy()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self._server = await loop.create_server(self._protocol, sock=self.sock,
                                                    backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                self._protocol, self._host, self._port, backlog=self._backlog,
                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1]


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval_s: float = 10) -> None:
    """Log failing accept() calls (out of file descriptors) once per interval."""
    sampled = Sampled(interval_s)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio retries a failed accept() on a timer; after shutdown those timers fail
        # on the closed socket: the same story, told once.
        about_accept = ("accept" in str(context.get("message", ""))
                        or "_start_serving" in repr(context.get("handle")))
        if not about_accept:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        held = sampled.due("accept", time.monotonic())
        if held is not None:
            log.error("accept_failed", error=str(context.get("exception")),
                      similar_since_last=held)

    loop.set_exception_handler(handler)
