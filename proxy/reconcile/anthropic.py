"""Anthropic's bill: the Admin API usage report (messages) and cost report.

The usage report counts tokens per day, model, API key and workspace; the cost report
gives dollars (a decimal string in cents) per day and description (model, token type),
with no API key. So each cost is shared among the keys in proportion to the tokens (or web
searches) each key used of that model and class that day: the proxy's keys get their
share, the rest is unmetered spend.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

import aiohttp
from yarl import URL

from proxy.config import BillingSourceConfig
from proxy.reconcile.bill import (
    BillClass,
    BillLine,
    day_of,
    decimal,
    in_scope,
    number,
    pages,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
CENTS = Decimal(100)
SHARE_QUANTUM = Decimal("1e-10")
TOKEN_TYPES: dict[str, BillClass] = {
    "uncached_input_tokens": BillClass.INPUT,
    "cache_read_input_tokens": BillClass.CACHED_INPUT,
    "cache_creation.ephemeral_5m_input_tokens": BillClass.CACHE_WRITE_5M,
    "cache_creation.ephemeral_1h_input_tokens": BillClass.CACHE_WRITE_1H,
    "output_tokens": BillClass.OUTPUT,
}


def _rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


async def fetch(session: aiohttp.ClientSession, conf: BillingSourceConfig, admin_key: str,
                since: datetime, until: datetime) -> list[BillLine]:
    """Usage and cost lines of [since, until), costs shared out by each key's usage."""
    base = URL((conf.base_url or DEFAULT_BASE_URL).rstrip("/"))
    headers = {"x-api-key": admin_key, "anthropic-version": API_VERSION}
    window = [("starting_at", _rfc3339(since)), ("ending_at", _rfc3339(until)),
              ("bucket_width", "1d"), ("limit", "31")]
    usage: list[BillLine] = []
    params = [*window, *[("group_by[]", g) for g in (
        "model", "api_key_id", "workspace_id", "service_tier")]]
    async for page in pages(session, base / "v1/organizations/usage_report/messages", params,
                            headers, "Anthropic usage report"):
        usage += usage_lines(page, conf)
    costs: list[tuple[str, str, BillClass, Decimal]] = []
    async for page in pages(session, base / "v1/organizations/cost_report",
                            [*window, ("group_by[]", "description")], headers,
                            "Anthropic cost report"):
        costs += cost_items(page)
    return usage + share_costs(usage, costs)


def usage_lines(page: dict, conf: BillingSourceConfig) -> list[BillLine]:
    """Token (and web search) lines from one page of the messages usage report."""
    lines = []
    for bucket in page["data"]:
        day = day_of(bucket.get("starting_at"))
        for r in bucket.get("results") or []:
            key = r.get("api_key_id")
            scoped = in_scope((key, r.get("workspace_id")),
                              (conf.api_key_ids, conf.workspace_ids))
            writes = r.get("cache_creation") or {}
            tools = r.get("server_tool_use") or {}
            counts = {
                BillClass.INPUT: number(r.get("uncached_input_tokens")),
                BillClass.CACHED_INPUT: number(r.get("cache_read_input_tokens")),
                BillClass.CACHE_WRITE_5M: number(writes.get("ephemeral_5m_input_tokens")),
                BillClass.CACHE_WRITE_1H: number(writes.get("ephemeral_1h_input_tokens")),
                BillClass.OUTPUT: number(r.get("output_tokens")),
                BillClass.WEB_SEARCH: number(tools.get("web_search_requests")),
            }
            lines += [BillLine(day, str(r.get("model") or ""), cls, tokens=n, key=key,
                               in_scope=scoped) for cls, n in counts.items() if n]
    return lines


def cost_items(page: dict) -> list[tuple[str, str, BillClass, Decimal]]:
    """(day, model, class, USD) from one page of the cost report (amounts are in cents)."""
    items = []
    for bucket in page["data"]:
        day = day_of(bucket.get("starting_at"))
        for r in bucket.get("results") or []:
            if str(r.get("currency") or "USD").upper() != "USD":
                continue
            if r.get("cost_type") == "web_search":
                cls = BillClass.WEB_SEARCH
            elif r.get("cost_type") == "code_execution":
                cls = BillClass.CODE_EXECUTION
            else:
                cls = TOKEN_TYPES.get(str(r.get("token_type")), BillClass.OTHER)
            model = str(r.get("model") or r.get("description") or r.get("cost_type") or "")
            items.append((day, model, cls, decimal(r.get("amount")) / CENTS))
    return items


def share_costs(usage: list[BillLine], costs: list[tuple[str, str, BillClass, Decimal]]
                ) -> list[BillLine]:
    """Each cost split over the keys by their share of that day, model and class."""
    by_key: defaultdict[tuple[str, str, BillClass], defaultdict[tuple[str | None, bool], int]]
    by_key = defaultdict(lambda: defaultdict(int))
    for line in usage:
        by_key[(line.day, line.model, line.cls)][(line.key, line.in_scope)] += line.tokens
    lines = []
    for day, model, cls, usd in costs:
        holders = by_key.get((day, model, cls))
        total = sum(holders.values()) if holders else 0
        if not total:
            # Billed, but the usage report shows no key for it: spend the proxy never saw.
            lines.append(BillLine(day, model, cls, usd=usd, key=None, in_scope=False))
            continue
        assert holders is not None
        left = usd
        shares = sorted(holders.items(), key=lambda kv: (not kv[0][1], str(kv[0][0])))
        for i, ((key, scoped), n) in enumerate(shares):
            part = left if i == len(shares) - 1 else (usd * n / total).quantize(SHARE_QUANTUM)
            left -= part
            lines.append(BillLine(day, model, cls, usd=part, key=key, in_scope=scoped))
    return lines
