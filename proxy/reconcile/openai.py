"""OpenAI's bill: the organization usage (completions) and costs APIs, with an admin key.

Usage gives tokens per day, model, API key and project; costs give dollars per day, line
item ("<model>, <class>") and API key. `input_tokens` includes cached reads and cache
writes, so the uncached class is input minus both.
"""

from __future__ import annotations

from datetime import datetime

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

DEFAULT_BASE_URL = "https://api.openai.com"
DAYS_PER_PAGE = "31"  # the usage API's maximum for 1d buckets (costs allow 180)
# The class half of a cost line item; the spellings seen in the costs API and its docs.
LINE_ITEM_CLASSES: dict[str, BillClass] = {
    "input": BillClass.INPUT, "input_tokens": BillClass.INPUT,
    "uncached input": BillClass.INPUT, "input_uncached_tokens": BillClass.INPUT,
    "input_audio_tokens": BillClass.INPUT, "audio input": BillClass.INPUT,
    "cached input": BillClass.CACHED_INPUT, "cached_input_tokens": BillClass.CACHED_INPUT,
    "input_cached_tokens": BillClass.CACHED_INPUT,
    "cache write": BillClass.CACHE_WRITE_5M, "cache_write_tokens": BillClass.CACHE_WRITE_5M,
    "input_cache_write_tokens": BillClass.CACHE_WRITE_5M,
    "output": BillClass.OUTPUT, "output_tokens": BillClass.OUTPUT,
    "output_audio_tokens": BillClass.OUTPUT, "audio output": BillClass.OUTPUT,
}


async def fetch(session: aiohttp.ClientSession, conf: BillingSourceConfig, admin_key: str,
                since: datetime, until: datetime) -> list[BillLine]:
    """Every usage and cost line of [since, until) from the two APIs, all pages."""
    base = URL((conf.base_url or DEFAULT_BASE_URL).rstrip("/"))
    headers = {"Authorization": f"Bearer {admin_key}"}
    window = [("start_time", str(int(since.timestamp()))),
              ("end_time", str(int(until.timestamp()))), ("bucket_width", "1d")]
    lines: list[BillLine] = []
    usage_params = [*window, ("limit", DAYS_PER_PAGE), *[("group_by", g) for g in (
        "model", "api_key_id", "project_id", "service_tier")]]
    async for page in pages(session, base / "v1/organization/usage/completions",
                            usage_params, headers, "OpenAI usage API"):
        lines += usage_lines(page, conf)
    cost_params = [*window, ("limit", DAYS_PER_PAGE),
                   *[("group_by", g) for g in ("line_item", "api_key_id", "project_id")]]
    async for page in pages(session, base / "v1/organization/costs", cost_params, headers,
                            "OpenAI costs API"):
        lines += cost_lines(page, conf)
    return lines


def usage_lines(page: dict, conf: BillingSourceConfig) -> list[BillLine]:
    """Token lines from one page of /v1/organization/usage/completions."""
    lines = []
    for bucket in page["data"]:
        day = day_of(bucket.get("start_time"))
        for r in bucket.get("results") or []:
            model = str(r.get("model") or "")
            key = r.get("api_key_id")
            scoped = in_scope((key, r.get("project_id")), (conf.api_key_ids, conf.project_ids))
            cached = number(r.get("input_cached_tokens"))
            written = number(r.get("input_cache_write_tokens"))
            counts = {
                BillClass.INPUT: number(r.get("input_tokens")) - cached - written,
                BillClass.CACHED_INPUT: cached,
                BillClass.CACHE_WRITE_5M: written,
                BillClass.OUTPUT: number(r.get("output_tokens")),
            }
            lines += [BillLine(day, model, cls, tokens=n, key=key, in_scope=scoped)
                      for cls, n in counts.items() if n]
    return lines


def cost_lines(page: dict, conf: BillingSourceConfig) -> list[BillLine]:
    """Dollar lines from one page of /v1/organization/costs (group_by line_item)."""
    lines = []
    for bucket in page["data"]:
        day = day_of(bucket.get("start_time"))
        for r in bucket.get("results") or []:
            amount = r.get("amount") or {}
            if str(amount.get("currency", "usd")).lower() != "usd":
                continue
            model, _, kind = str(r.get("line_item") or "").rpartition(",")
            cls = LINE_ITEM_CLASSES.get(kind.strip().lower(), BillClass.OTHER)
            key = r.get("api_key_id")
            scoped = in_scope((key, r.get("project_id")), (conf.api_key_ids, conf.project_ids))
            lines.append(BillLine(day, model.strip() or kind.strip(), cls,
                                  usd=decimal(amount.get("value")), key=key, in_scope=scoped))
    return lines
