"""Typed keys for what the aiohttp application holds (no module-level singletons)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.runtime import Runtime

APP_RUNTIME = web.AppKey("runtime", Runtime)
APP_SESSION = web.AppKey("session", aiohttp.ClientSession)
