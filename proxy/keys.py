"""Typed keys for what the aiohttp application holds (no module-level singletons)."""

from __future__ import annotations

from aiohttp import web

from proxy.runtime import Runtime
from proxy.server import Server

APP_SERVER = web.AppKey("server", Server)


def runtime_of(request: web.Request) -> Runtime:
    """The configuration snapshot current when the request arrived."""
    return request.app[APP_SERVER].current
