"""The Runtime: everything a call needs, resolved once from the settings.

Config parsing, environment look-ups and pricing loads happen here, at start-up (and on a
reload), never per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from yarl import URL

from proxy.config import KeyConfig, Settings
from proxy.dialects import for_name
from proxy.dialects.base import Dialect
from proxy.pricing import PriceBook
from proxy.storage.writer import UsageWriter

log = structlog.get_logger("meterproxy")


@dataclass(slots=True)
class Upstream:
    """One configured provider, ready to forward to."""

    name: str
    base_url: URL
    dialect: Dialect
    api_key: str | None
    api_key_env: str | None
    auth_header: str | None
    timeout_s: float
    pricing_table: str


@dataclass
class Runtime:
    settings: Settings
    upstreams: dict[str, Upstream]
    keys: dict[str, KeyConfig]
    prices: PriceBook
    writer: UsageWriter
    admin_key: str | None
    clock: Callable[[], Any] | None = None
    unpriced_warned: set[tuple[str, str | None]] = field(default_factory=set)
    background: set[asyncio.Task] = field(default_factory=set)
    budgets: Any = None

    def spawn(self, coro: Any) -> None:
        """Run a coroutine after the response; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def build_upstreams(settings: Settings) -> dict[str, Upstream]:
    upstreams = {}
    for name, conf in settings.providers.items():
        try:
            for_name(conf.dialect)
        except ImportError:  # TEMPORARY while the anthropic/gemini dialects are written
            continue
        upstreams[name] = Upstream(
            name=name,
            base_url=URL(conf.base_url.rstrip("/")),
            dialect=for_name(conf.dialect),
            api_key=os.environ.get(conf.api_key_env) if conf.api_key_env else None,
            api_key_env=conf.api_key_env,
            auth_header=conf.auth_header,
            timeout_s=conf.timeout_s,
            pricing_table=conf.pricing or name,
        )
    return upstreams


def key_index(settings: Settings) -> dict[str, KeyConfig]:
    return {k.key_sha256.lower(): k for k in settings.keys}


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(key: str) -> str:
    """How passthrough mode names a provider key: its first 4 chars and a hash prefix."""
    return f"{key[:4]}…{key_digest(key)[:12]}"
