"""The scheduled check: `reconcile.every` runs the reconciliation for the previous day.

It is one of the server's resources (started and stopped by the app's cleanup context).
Drift raises the same kind of alert as a budget: a structured log event, Prometheus
gauges, and a POST to `alerts.webhook_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import structlog

from proxy.config import Settings, interval_seconds
from proxy.metrics import gauge
from proxy.pricing import PriceBook
from proxy.reconcile.bill import BillingSourceError
from proxy.reconcile.run import BillingProvider, run
from proxy.storage import LedgerUnavailable
from proxy.webhook import post_event

log = structlog.get_logger("meterproxy")
ALERT_CELLS = 20  # the first cells outside tolerance named in an alert


def configured(settings: Settings) -> list[str]:
    """The providers whose bill can be read: an admin key in the environment, or an export."""
    found = []
    for provider in BillingProvider:
        conf = getattr(settings.reconcile, provider.value)
        if provider.value not in settings.providers:
            continue
        if provider is BillingProvider.GEMINI:
            if conf.billing_export:
                found.append(provider.value)
        elif conf.admin_key_env and os.environ.get(conf.admin_key_env):
            found.append(provider.value)
    return found


@dataclass
class ReconcileSchedule:
    """Checks each configured provider's previous day, every `interval_s` from start-up."""

    current: Callable[[], tuple[Settings, PriceBook, date]]  # the live config and today
    session: aiohttp.ClientSession
    interval_s: float
    # The ledger's claim_alert: with a shared ledger, one instance of many alerts a day.
    claim: Callable[[str, Decimal], Awaitable[bool]] | None = None
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    alerted: set[tuple[str, str]] = field(default_factory=set)
    task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _loop(self) -> None:
        while True:
            await self.check_previous_day()
            await asyncio.sleep(self.interval_s)

    async def check_previous_day(self) -> None:
        settings, prices, today = self.current()
        day = today - timedelta(days=1)
        for provider in configured(settings):
            try:
                result = await run(settings, prices, provider, day, today,
                                   session=self.session)
            except (BillingSourceError, ValueError, OSError) as exc:
                self.failures[provider] = self.failures.get(provider, 0) + 1
                log.error("reconcile_failed", provider=provider, day=day.isoformat(),
                          error=str(exc))
                continue
            data = result.to_json()
            log.info("reconciled", provider=provider, day=day.isoformat(), status=data["status"],
                     diff_cost_usd=data["totals"]["diff_cost_usd"],
                     unmetered_cost_usd=data["totals"]["unmetered_cost_usd"])
            if data["status"] != "ok" and (provider, day.isoformat()) not in self.alerted:
                self.alerted.add((provider, day.isoformat()))
                if await self._claimed(provider, day):
                    await self._alert(settings, provider, day, data)
            data["checked_at"] = time.time()
            self.last[provider] = data  # after the alert: a gauge means the check is done

    async def _claimed(self, provider: str, day: date) -> bool:
        if self.claim is None:
            return True
        try:
            return await self.claim(f"reconcile:{provider}:{day.isoformat()}", Decimal(0))
        except LedgerUnavailable:
            return True  # better twice than never, as for budget alerts

    async def _alert(self, settings: Settings, provider: str, day: date,
                     data: dict[str, Any]) -> None:
        event = {"alert": "reconcile_drift", "provider": provider, "day": day.isoformat(),
                 "cells_outside_tolerance": data["cells_outside_tolerance"],
                 "tolerance_pct": data["tolerance_pct"], **data["totals"],
                 "cells": [c for c in data["cells"] if not c["within_tolerance"]][:ALERT_CELLS],
                 "overrides": [d["override"] for d in data["drifts"] if d["override"]]}
        log.warning("reconcile_alert", **{k: v for k, v in event.items() if k != "alert"})
        url = settings.alerts.webhook_url
        if url and not await post_event(self.session, url, event, "reconcile"):
            log.error("reconcile_webhook_gave_up", provider=provider)

    def gauges(self) -> list[str]:
        """meterproxy_reconcile_* for each provider checked (scraped with /metrics)."""
        def series(key: str) -> list[tuple[tuple[tuple[str, str], ...], float]]:
            return [((("provider", p),), float(d["totals"][key]))
                    for p, d in sorted(self.last.items())]

        lines = gauge("meterproxy_reconcile_cells_outside_tolerance",
                      "Day x model x class cells of the last check outside the tolerance.",
                      [((("provider", p),), d["cells_outside_tolerance"])
                       for p, d in sorted(self.last.items())])
        lines += gauge("meterproxy_reconcile_diff_usd",
                       "Metered minus billed USD, last check (the previous day).",
                       series("diff_cost_usd"))
        lines += gauge("meterproxy_reconcile_unmetered_usd",
                       "USD billed to keys the proxy does not use, last check.",
                       series("unmetered_cost_usd"))
        lines += gauge("meterproxy_reconcile_last_check_timestamp_seconds",
                       "When the last check finished.",
                       [((("provider", p),), d["checked_at"])
                        for p, d in sorted(self.last.items())])
        lines += gauge("meterproxy_reconcile_failures", "Checks that could not read the bill.",
                       [((("provider", p),), n) for p, n in sorted(self.failures.items())])
        return lines


def interval(settings: Settings) -> float | None:
    every = settings.reconcile.every
    return None if every is None else float(interval_seconds(every))
