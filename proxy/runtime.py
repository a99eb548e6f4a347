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
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from yarl import URL

from proxy.budgets import Budgets, budgets_from, spend_from_log
from proxy.config import KeyConfig, Settings
from proxy.dialects import for_name
from proxy.dialects.base import Dialect
from proxy.metrics import Metrics, gauge
from proxy.pricing import PriceBook
from proxy.storage import (
    LedgerUnavailable,
    LogUnavailable,
    is_redis,
    open_ledger,
    open_usage_log,
)
from proxy.storage.ledger import Ledger
from proxy.storage.readers import open_reader
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
    # Silence longer than timeout_s while waiting or streaming is a 504; no total limit,
    # so a long stream that keeps talking is never cut.
    timeout: aiohttp.ClientTimeout = field(init=False)

    def __post_init__(self) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, connect=min(self.timeout_s, 30),
                                             sock_read=self.timeout_s)


@dataclass
class Runtime:
    settings: Settings
    upstreams: dict[str, Upstream]
    keys: dict[str, KeyConfig]
    prices: PriceBook
    writer: UsageWriter
    admin_key: str | None
    clock: Callable[[], datetime] | None = None
    unpriced_warned: set[tuple[str, str | None]] = field(default_factory=set)
    background: set[asyncio.Task] = field(default_factory=set)
    budgets: Budgets | None = None
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.known_model)
        self.metrics.gauges.append(self._gauges)

    def known_model(self, provider: str | None, model: str | None) -> bool:
        upstream = self.upstreams.get(provider or "")
        return upstream is not None and self.prices.model(upstream.pricing_table,
                                                          [model]) is not None

    def _gauges(self) -> list[str]:
        lines = gauge("meterproxy_usage_log_pending_rows", "Rows queued, not yet written.",
                      [((), self.writer.pending)])
        lines += gauge("meterproxy_usage_log_write_failures", "Failed usage-log writes.",
                       [((), self.writer.failures)])
        lines += gauge("meterproxy_usage_log_dropped_rows",
                       "Rows dropped because the log kept failing and the backlog was full.",
                       [((), self.writer.dropped)])
        if self.budgets is not None:
            lines += gauge(
                "meterproxy_budget_utilisation", "Spent share of each budget period's limit.",
                [((("budget", key), ("period", b.period)), ratio)
                 for key, (b, _, ratio) in sorted(self.budgets.alerts.utilisation.items())])
        return lines

    def now(self) -> datetime:
        return self.clock() if self.clock is not None else datetime.now(UTC)

    def spawn(self, coro: Any) -> None:
        """Run a coroutine after the response; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def build_upstreams(settings: Settings) -> dict[str, Upstream]:
    upstreams = {}
    for name, conf in settings.providers.items():
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


def build_runtime(settings: Settings, clock: Callable[[], datetime] | None = None) -> Runtime:
    storage = settings.storage
    writer = UsageWriter(open_usage_log(storage.usage_log, spool_dir=storage.spool_dir),
                         interval_s=storage.flush_interval_ms / 1000,
                         batch_rows=storage.batch_rows,
                         max_backlog=storage.max_backlog_rows)
    upstreams, keys, prices, admin_key = build_runtime_parts(settings)
    rt = Runtime(settings=settings, upstreams=upstreams, keys=keys, prices=prices,
                 writer=writer, admin_key=admin_key, clock=clock)
    rt.budgets = build_budgets(rt, open_ledger(storage.ledger))
    return rt


def build_runtime_parts(settings: Settings) -> tuple[dict, dict, PriceBook, str | None]:
    """What a configuration resolves to: upstreams, the key index, prices, the admin key."""
    return (build_upstreams(settings), key_index(settings),
            PriceBook.load(settings.pricing.dir, settings.pricing.overrides),
            os.environ.get(settings.server.admin_key_env) or None)


def build_budgets(rt: Runtime, ledger: Ledger) -> Budgets | None:
    """The budget service for the runtime's settings, or None when no budget is configured."""
    found = budgets_from(rt.settings)
    if not found:
        return None
    if hasattr(ledger, "on_lost"):  # a shared ledger that restarted empty asks for a rebuild
        ledger.on_lost = lambda: rebuild_budgets(rt)
    budgets = Budgets(found, ledger, rt.prices, rt.settings, rt.spawn, rt.now)
    budgets.alerts.claim = getattr(ledger, "claim_alert", None)
    return budgets


async def rebuild_budgets(rt: Runtime) -> None:
    """Seed the ledger from the usage log, so a restart forgets no spend."""
    if rt.budgets is None:
        return
    budgets, storage = rt.budgets, rt.settings.storage

    def read() -> dict:
        conn, flavor = open_reader(storage.usage_log)
        try:
            return spend_from_log(conn, budgets.budgets, rt.now(), flavor)
        finally:
            conn.close()

    try:
        totals = await asyncio.get_running_loop().run_in_executor(None, read)
        await budgets.rebuild(totals)
    except (LogUnavailable, LedgerUnavailable) as exc:
        if not is_redis(storage.ledger):
            raise
        # Redis keeps spend across restarts, so it rarely needs this; if it turns out to
        # have lost the ledger, the first reserve asks for the rebuild again.
        log.error("budgets_not_rebuilt", error=str(exc))


def reload_settings(rt: Runtime, settings: Settings) -> None:
    """Swap in a new configuration: keys, providers, prices, budgets (the ledger and the
    alerts already fired carry over). Storage and listen address need a restart."""
    fresh = build_runtime_parts(settings)
    old_budgets = rt.budgets
    rt.settings = settings
    rt.upstreams, rt.keys, rt.prices, rt.admin_key = fresh
    rt.budgets = None
    if old_budgets is not None or budgets_from(settings):
        ledger = old_budgets.ledger if old_budgets is not None else open_ledger(
            settings.storage.ledger)
        rt.budgets = build_budgets(rt, ledger)
        if rt.budgets is not None and old_budgets is not None:
            rt.budgets.alerts.fired = old_budgets.alerts.fired
            rt.budgets.alerts.session = old_budgets.alerts.session
    log.info("reloaded", config=settings.source, keys=len(rt.keys),
             budgets=len(rt.budgets.budgets) if rt.budgets else 0)


async def reload_from_source(rt: Runtime) -> str | None:
    """Re-read the configuration file; on any error keep the old one and say why."""
    from proxy.config import ConfigError, load_settings
    from proxy.pricing import PricingError

    source = rt.settings.source
    if source.startswith("<"):
        return f"nothing to reload: the configuration came from {source}, not a file"
    loop = asyncio.get_running_loop()
    try:
        settings = await loop.run_in_executor(None, load_settings, source)
        reload_settings(rt, settings)
    except (ConfigError, PricingError, ValueError, OSError) as exc:
        log.error("reload_refused", error=str(exc))
        return str(exc)
    return None
