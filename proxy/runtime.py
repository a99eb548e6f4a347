"""The Runtime: an immutable snapshot of everything a call needs, built once per config.

`build_runtime` resolves a configuration (providers, keys, prices, budgets) off the event
loop, wires in the process-long services it is handed (the HTTP session, the usage-log
writer, the ledger), rebuilds budget spend from the usage log and carries the alert state
over from the previous snapshot. Nothing is patched afterwards: a reload builds a new
snapshot and `Server` swaps one reference. A call keeps the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import aiohttp
import structlog
from yarl import URL

from proxy.anomaly.guard import AnomalyGuard
from proxy.budgets import Alerts, Budget, Budgets, budgets_from, spend_from_log
from proxy.config import KeyConfig, Settings
from proxy.dialects import for_name
from proxy.dialects.base import Dialect
from proxy.metrics import Metrics
from proxy.pricing import PriceBook
from proxy.ratelimits import RateLimit, rate_limits_from
from proxy.storage import LedgerUnavailable, LogUnavailable
from proxy.storage.ledger import Ledger
from proxy.storage.readers import open_reader
from proxy.storage.writer import UsageWriter
from proxy.telemetry import Telemetry

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
    allow_unmetered: frozenset[str] = frozenset()
    # Silence longer than timeout_s while waiting or streaming is a 504; no total limit,
    # so a long stream that keeps talking is never cut.
    timeout: aiohttp.ClientTimeout = field(init=False)

    def __post_init__(self) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, connect=min(self.timeout_s, 30),
                                             sock_read=self.timeout_s)


class Tasks:
    """Work that outlives its response (settles, estimates, alerts); shutdown drains it."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait for every task, including those spawned while waiting (an alert's POST)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.running and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self.running), timeout=left)
        if self.running:
            log.error("background_unfinished", tasks=len(self.running))


@dataclass(frozen=True, slots=True)
class Services:
    """What lives as long as the process and every snapshot shares."""

    session: aiohttp.ClientSession
    writer: UsageWriter
    ledger: Ledger
    metrics: Metrics
    tasks: Tasks
    clock: Callable[[], datetime] | None = None
    telemetry: Telemetry | None = None  # OpenTelemetry, when telemetry.otlp_endpoint is set
    # Keys the stable-prefix hashes (proxy.fingerprint): one per install, never logged.
    prefix_secret: bytes = field(default=b"", repr=False)
    # Spend anomalies: the blocked scopes every call looks up, and the check that keeps them.
    anomalies: AnomalyGuard = field(default_factory=AnomalyGuard)
    # (pricing table, model) pairs already warned about, so each is logged once.
    unpriced_warned: set[tuple[str, str | None]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Runtime:
    """One configuration, fully wired; never changed once built."""

    settings: Settings
    upstreams: Mapping[str, Upstream]
    keys: Mapping[str, KeyConfig]
    prices: PriceBook
    admin_key: str | None
    budgets: Budgets | None
    services: Services

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.services.session

    @property
    def writer(self) -> UsageWriter:
        return self.services.writer

    @property
    def metrics(self) -> Metrics:
        return self.services.metrics

    @property
    def telemetry(self) -> Telemetry | None:
        return self.services.telemetry

    @property
    def clock(self) -> Callable[[], datetime] | None:
        return self.services.clock

    @property
    def unpriced_warned(self) -> set[tuple[str, str | None]]:
        return self.services.unpriced_warned

    def now(self) -> datetime:
        clock = self.services.clock
        return clock() if clock is not None else datetime.now(UTC)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine after the response; shutdown waits for it."""
        self.services.tasks.spawn(coro)

    def known_model(self, provider: str | None, model: str | None) -> bool:
        upstream = self.upstreams.get(provider or "")
        return upstream is not None and self.prices.model(upstream.pricing_table,
                                                          [model]) is not None


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a configuration resolves to without any service: the blocking part of a build."""

    upstreams: Mapping[str, Upstream]
    keys: Mapping[str, KeyConfig]
    prices: PriceBook
    admin_key: str | None
    budgets: list[Budget]
    rate_limits: list[RateLimit]


def resolve(settings: Settings) -> Resolved:
    """Read the environment and the pricing tables (blocking: run it off the loop)."""
    return Resolved(upstreams=MappingProxyType(build_upstreams(settings)),
                    keys=MappingProxyType(key_index(settings)),
                    prices=PriceBook.load(settings.pricing.dir, settings.pricing.overrides),
                    admin_key=os.environ.get(settings.server.admin_key_env) or None,
                    budgets=budgets_from(settings), rate_limits=rate_limits_from(settings))


async def build_runtime(settings: Settings, services: Services,
                        previous: Runtime | None = None) -> Runtime:
    """A new snapshot for `settings`, ready to admit calls.

    Budgets the previous snapshot did not have (new, renamed, re-scoped) get their spend
    rebuilt from the usage log before the snapshot is returned; alerts already fired stay
    fired. Raises LogUnavailable/LedgerUnavailable if that rebuild cannot run (on a reload
    the old snapshot then stays)."""
    loop = asyncio.get_running_loop()
    parts = await loop.run_in_executor(None, resolve, settings)
    budgets = None
    if parts.budgets or parts.rate_limits:
        old = previous.budgets if previous is not None else None
        alerts = Alerts(settings.alerts.thresholds, settings.alerts.webhook_url,
                        services.tasks.spawn, services.session,
                        claim=services.ledger.claim_alert if services.ledger.shared else None,
                        fired=old.alerts.fired if old is not None else None,
                        seen=old.alerts.seen if old is not None else None)
        budgets = Budgets(parts.budgets, services.ledger, parts.prices, settings, alerts,
                          services.tasks.spawn, services.clock, parts.rate_limits)
        known = {b.identity for b in old.budgets} if old is not None else set()
        seen = set(old.alerts.seen) if old is not None else set()
        fresh = [b for b in parts.budgets if b.identity not in known]
        try:
            await rebuild_spend(budgets, fresh, settings.storage.usage_log, services.writer,
                                seen)
        except (LogUnavailable, LedgerUnavailable) as exc:
            if previous is not None or not services.ledger.shared:
                raise
            # Redis keeps spend across restarts, so it rarely needs this; if it turns out
            # to have lost the ledger, the first reserve asks for the rebuild again.
            log.error("budgets_not_rebuilt", error=str(exc))
    return Runtime(settings=settings, upstreams=parts.upstreams, keys=parts.keys,
                   prices=parts.prices, admin_key=parts.admin_key, budgets=budgets,
                   services=services)


async def rebuild_spend(budgets: Budgets, which: list[Budget], usage_log: str,
                        writer: UsageWriter, seen: set[str] | frozenset[str] = frozenset()
                        ) -> None:
    """Seed the ledger for `which` budgets from the usage log (rows still queued are
    written first), so neither a restart nor a reload forgets spend."""
    loop = asyncio.get_running_loop()

    def read() -> dict:
        writer.flush()
        with open_reader(usage_log) as reader:
            return spend_from_log(reader, which, budgets.clock())

    totals = await loop.run_in_executor(None, read) if which else {}
    await budgets.rebuild(totals, seen)


async def rebuild_all(rt: Runtime) -> None:
    """Rebuild every budget of a snapshot: the shared ledger has lost its data."""
    if rt.budgets is not None:
        await rebuild_spend(rt.budgets, rt.budgets.budgets, rt.settings.storage.usage_log,
                            rt.writer)


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
            allow_unmetered=frozenset(conf.allow_unmetered),
        )
    return upstreams


def key_index(settings: Settings) -> dict[str, KeyConfig]:
    return {k.key_sha256.lower(): k for k in settings.keys}


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(key: str) -> str:
    """How passthrough mode names a provider key: its first 4 chars and a hash prefix."""
    return f"{key[:4]}…{key_digest(key)[:12]}"
