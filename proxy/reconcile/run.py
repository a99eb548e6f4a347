"""One reconciliation: read the bill, read the log, compare. Shared by CLI, API and schedule."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, date, datetime, time
from decimal import Decimal
from enum import StrEnum

import aiohttp

from proxy.config import Settings
from proxy.pricing import PriceBook
from proxy.reconcile import anthropic, gemini, openai
from proxy.reconcile.bill import BillingNotConfigured, BillLine
from proxy.reconcile.compare import BY_NAMES, Reconciliation, reconcile
from proxy.storage.metered import MeteredDay
from proxy.storage.readers import open_reader

TIMEOUT = aiohttp.ClientTimeout(total=120, connect=15)


class BillingProvider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


def midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, UTC)


async def read_bill(settings: Settings, provider: BillingProvider, since: date, until: date,
                    session: aiohttp.ClientSession, billing_export: str | None = None
                    ) -> list[BillLine]:
    """The provider's lines for whole UTC days [since, until)."""
    conf = getattr(settings.reconcile, provider.value)
    start, end = midnight(since), midnight(until)
    if provider is BillingProvider.GEMINI:
        path = billing_export or conf.billing_export
        if not path:
            raise BillingNotConfigured("gemini: give --billing-export FILE or set "
                                     "reconcile.gemini.billing_export (a Cloud Billing export)")
        return await asyncio.get_running_loop().run_in_executor(
            None, gemini.read, conf, path, start, end)
    env = conf.admin_key_env
    admin_key = os.environ.get(env) if env else None
    if not admin_key:
        raise BillingNotConfigured(f"{provider}: reconcile.{provider}.admin_key_env names "
                                 f"${env or '(unset)'}, which holds no admin key")
    source = openai if provider is BillingProvider.OPENAI else anthropic
    return await source.fetch(session, conf, admin_key, start, end)


def read_metered(settings: Settings, provider: str, since: date, until: date
                 ) -> dict[tuple[str, str], MeteredDay]:
    """The log's side (blocking: run it off the event loop)."""
    with open_reader(settings.storage.usage_log) as log:
        return log.metered_by_day(provider, midnight(since), midnight(until))


async def run(settings: Settings, prices: PriceBook, provider: str, since: date, until: date,
              *, tolerance_pct: Decimal | None = None, by: tuple[str, ...] = BY_NAMES,
              billing_export: str | None = None,
              session: aiohttp.ClientSession | None = None) -> Reconciliation:
    """Reconcile one provider's bill with the usage log over whole days [since, until)."""
    try:
        which = BillingProvider(provider)
    except ValueError:
        raise ValueError(f"--provider takes {', '.join(BillingProvider)}, not {provider!r}"
                         ) from None
    if provider not in settings.providers:
        raise ValueError(f"no provider {provider!r} in the configuration")
    tolerance = Decimal(str(settings.reconcile.tolerance_pct if tolerance_pct is None
                            else tolerance_pct))
    own = session is None
    session = session or aiohttp.ClientSession(timeout=TIMEOUT)
    try:
        bill = await read_bill(settings, which, since, until, session, billing_export)
    finally:
        if own:
            await session.close()
    metered = await asyncio.get_running_loop().run_in_executor(
        None, read_metered, settings, provider, since, until)
    return reconcile(provider, settings.pricing_table(provider), prices, bill, metered, since,
                     until, tolerance, by)
