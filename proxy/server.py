"""The running proxy: process-long services and the current Runtime snapshot.

`Server.start` opens the services once (HTTP session, usage-log writer, ledger) and builds
the first snapshot; `reload` builds a new one off the event loop and swaps `current`;
`close` shuts down in an explicit order (see its docstring).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import aiohttp
import structlog

from proxy.config import Settings
from proxy.fingerprint import load_secret, secret_path
from proxy.metrics import Metrics, gauge
from proxy.reconcile.schedule import ReconcileSchedule
from proxy.reconcile.schedule import interval as reconcile_interval
from proxy.runtime import Runtime, Services, Tasks, build_runtime, rebuild_all
from proxy.storage import (
    LedgerUnavailable,
    LogUnavailable,
    journal,
    journal_dir,
    open_ledger,
    open_usage_log,
)
from proxy.storage.ledger import Ledger
from proxy.storage.writer import UsageWriter
from proxy.telemetry import open_telemetry

log = structlog.get_logger("meterproxy")


class Server:
    """Owns what outlives a configuration; `current` is the one reference a reload swaps."""

    def __init__(self, services: Services, current: Runtime) -> None:
        self.services = services
        self.current = current
        self._reloading = asyncio.Lock()
        # The scheduled bill check (`reconcile.every`), reading `current` at each run.
        self.reconcile: ReconcileSchedule | None = None

    @classmethod
    async def start(cls, settings: Settings,
                    clock: Callable[[], datetime] | None = None) -> Server:
        loop = asyncio.get_running_loop()
        storage = settings.storage
        server: Server | None = None  # bound below; the callbacks read it when called

        async def ledger_lost() -> None:
            if server is not None:
                await rebuild_all(server.current)

        def known_model(provider: str | None, model: str | None) -> bool:
            return server is not None and server.current.known_model(provider, model)

        def open_storage() -> tuple[UsageWriter, Ledger]:
            journal_at = journal_dir(storage.usage_log, storage.spool_dir)
            orphans = journal.recover(journal_at)  # rows a kill -9 left behind
            writer = UsageWriter(open_usage_log(storage.usage_log, spool_dir=storage.spool_dir),
                                 interval_s=storage.flush_interval_ms / 1000,
                                 batch_rows=storage.batch_rows,
                                 max_backlog=storage.max_backlog_rows,
                                 fold_s=storage.fold_refusals_ms / 1000,
                                 journal=journal.Journal(journal_at))
            writer.start()
            for row in orphans:
                writer.submit(row)
            return writer, open_ledger(storage.ledger, ledger_lost)

        writer, ledger = await loop.run_in_executor(None, open_storage)
        try:
            prefix_secret = await loop.run_in_executor(
                None, load_secret, os.environ.get(storage.prefix_secret_env),
                secret_path(storage.usage_log, storage.spool_dir))
        except BaseException:
            await loop.run_in_executor(None, writer.close)
            await ledger.close()
            raise
        try:
            telemetry = await loop.run_in_executor(None, open_telemetry, settings.telemetry)
        except BaseException:
            await loop.run_in_executor(None, writer.close)
            await ledger.close()
            raise
        # One pooled session for every provider: connections are kept per host, and the
        # response body is handed to us already decoded (we ask only for gzip or deflate).
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
            auto_decompress=True, skip_auto_headers=("User-Agent",))
        names: list[Any] = [None, frozenset()]  # the snapshot they were read from, names

        def known_key(name: str | None) -> bool:
            if server is None:
                return False
            if names[0] is not server.current:
                names[:] = [server.current, frozenset(k.name for k in server.current.keys.values())]
            return name in names[1]

        metrics = Metrics(known_model, known_key)
        services = Services(session=session, writer=writer, ledger=ledger, metrics=metrics,
                            tasks=Tasks(), clock=clock, telemetry=telemetry,
                            prefix_secret=prefix_secret)
        try:
            first = await build_runtime(settings, services)
        except BaseException:
            await _close_services(services)
            raise
        server = cls(services, first)
        metrics.gauges.append(server._gauges)
        metrics.gauges.append(services.anomalies.gauges)
        server._start_reconcile(settings)
        services.anomalies.start(lambda: server.current)
        log.info("started", config=settings.source, usage_log=storage.usage_log,
                 providers=sorted(first.upstreams), auth=settings.auth.mode,
                 keys=len(first.keys), pricing_version=first.prices.digest)
        return server

    async def reload(self, settings: Settings) -> None:
        """Swap in a new configuration: keys, providers, prices, budgets. Storage and the
        listen address need a restart. Raises (and keeps the old one) on any error."""
        async with self._reloading:
            fresh = await build_runtime(settings, self.services, previous=self.current)
            self.current = fresh
        log.info("reloaded", config=settings.source, keys=len(fresh.keys),
                 budgets=len(fresh.budgets.budgets) if fresh.budgets else 0)

    async def reload_from_source(self) -> str | None:
        """Re-read the configuration file; on any error keep the old one and say why."""
        from proxy.config import ConfigError, load_settings
        from proxy.pricing import PricingError

        source = self.current.settings.source
        if source.startswith("<"):
            return f"nothing to reload: the configuration came from {source}, not a file"
        loop = asyncio.get_running_loop()
        try:
            settings = await loop.run_in_executor(None, load_settings, source)
            await self.reload(settings)
        except (ConfigError, PricingError, ValueError, OSError, LogUnavailable,
                LedgerUnavailable) as exc:
            log.error("reload_refused", error=str(exc))
            return str(exc)
        return None

    async def close(self) -> None:
        """Shut down in order: in-flight calls have drained (the HTTP server did that);
        background work (settles, final webhook alerts) finishes while the HTTP session is
        still open; then the session closes, the writer flushes every row, the ledger
        closes."""
        if self.reconcile is not None:
            await self.reconcile.stop()
        await self.services.anomalies.stop()
        await self.services.tasks.drain(self.current.settings.server.grace_s)
        await _close_services(self.services)
        log.info("stopped", rows_written=self.services.writer.written)

    def _start_reconcile(self, settings: Settings) -> None:
        every = reconcile_interval(settings)
        if every is None:
            return
        self.reconcile = ReconcileSchedule(
            lambda: (self.current.settings, self.current.prices, self.current.now().date()),
            self.services.session, every,
            claim=self.services.ledger.claim_alert if self.services.ledger.shared else None)
        self.services.metrics.gauges.append(self.reconcile.gauges)
        self.reconcile.start()

    def _gauges(self) -> Iterable[str]:
        writer = self.services.writer
        lines = gauge("meterproxy_usage_log_pending_rows", "Rows queued, not yet written.",
                      [((), writer.pending)])
        lines += gauge("meterproxy_usage_log_write_failures", "Failed usage-log writes.",
                       [((), writer.failures)])
        lines += gauge("meterproxy_usage_log_dropped_rows",
                       "Rows dropped because the log kept failing and the backlog was full.",
                       [((), writer.dropped)])
        budgets = self.current.budgets
        if budgets is not None:
            # One series per configured budget (its name, else its scope as written, `*`
            # and all), however many customers it covers: the worst period's share.
            worst: dict[tuple[str, str], float] = {}
            for b, _, ratio in budgets.alerts.utilisation.values():
                label = (b.name or ",".join(f"{d}={v}" for d, v in b.scope), b.period)
                worst[label] = max(worst.get(label, 0.0), ratio)
            lines += gauge(
                "meterproxy_budget_utilisation",
                "Spent share of the limit in each budget's fullest current period.",
                [((("budget", name), ("period", period)), ratio)
                 for (name, period), ratio in sorted(worst.items())])
        return lines


async def _close_services(services: Services) -> None:
    await services.session.close()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, services.writer.close)
    await services.ledger.close()
    if services.telemetry is not None:  # after the writer: the last rows' spans are out
        await loop.run_in_executor(None, services.telemetry.close)
