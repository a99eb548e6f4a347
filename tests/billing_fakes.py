"""Fakes of the providers' billing APIs, written from their documented shapes (docs/reconcile.md).

A `FakeBilling` is a real aiohttp server on loopback serving OpenAI's organization usage
and costs APIs and Anthropic's usage and cost reports, from a list of billed calls and a
price sheet of its own (the providers' public list prices, typed in here by hand, not our
pricing tables). `write_gemini_export` writes a Cloud Billing export file from the same.
Faults are knobs: a discount, a price change from a day, a day missing from the bill.
"""

from __future__ import annotations

import asyncio
import csv
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import free_port

ADMIN_KEY = "sk-admin-test-DO-NOT-LEAK-9876543210"
MILLION = Decimal(1_000_000)

# USD per 1M tokens (web_search: per 1,000 requests), from the providers' pricing pages.
LIST_PRICES: dict[str, dict[str, Decimal]] = {
    "gpt-4o-mini": {"input": Decimal("0.15"), "cached_input": Decimal("0.075"),
                    "output": Decimal("0.60")},
    "claude-sonnet-4-5": {"input": Decimal(3), "cached_input": Decimal("0.30"),
                          "cache_write_5m": Decimal("3.75"), "cache_write_1h": Decimal(6),
                          "output": Decimal(15), "web_search": Decimal(10)},
    "gemini-2.5-flash": {"input": Decimal("0.30"), "cached_input": Decimal("0.03"),
                         "output": Decimal("2.50")},
}
# The model name each provider's bill uses for the model of the call (dated snapshots).
BILLED_NAME = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18",
               "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
               "gemini-2.5-flash": "gemini-2.5-flash"}
OPENAI_LINE_ITEM = {"input": "input", "cached_input": "cached input", "output": "output"}
ANTHROPIC_TOKEN_TYPE = {"input": "uncached_input_tokens",
                        "cached_input": "cache_read_input_tokens",
                        "cache_write_5m": "cache_creation.ephemeral_5m_input_tokens",
                        "cache_write_1h": "cache_creation.ephemeral_1h_input_tokens",
                        "output": "output_tokens"}
GEMINI_SKU = {"input": "Gemini 2.5 Flash input text tokens",
              "cached_input": "Gemini 2.5 Flash cached input text tokens",
              "output": "Gemini 2.5 Flash output text tokens"}


@dataclass
class BilledCall:
    """One call as the provider bills it: when, which model and key, tokens by class."""

    at: datetime
    model: str  # our name; the bill says BILLED_NAME[model]
    classes: dict[str, int]
    key: str = "key_proxy"
    project: str = "proj_proxy"


@dataclass
class Faults:
    discount_pct: Decimal = Decimal(0)
    missing_day: str | None = None  # YYYY-MM-DD absent from usage and cost
    price_change: tuple[str, str, str, Decimal] | None = None  # (from day, model, class, rate)


@dataclass
class FakeBilling:
    calls: list[BilledCall] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    buckets_per_page: int = 2  # fewer than asked, so every listing takes several pages
    seen: list[tuple[str, dict[str, list[str]]]] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)  # alert webhooks received

    # -- the bill itself -------------------------------------------------------------
    def rate(self, model: str, cls: str, day: str) -> Decimal:
        change = self.faults.price_change
        if change and change[1] == model and change[2] == cls and day >= change[0]:
            rate = change[3]
        else:
            rate = LIST_PRICES[model][cls]
        return rate * (100 - self.faults.discount_pct) / 100

    def cost(self, model: str, cls: str, day: str, n: int) -> Decimal:
        unit = Decimal(1000) if cls == "web_search" else MILLION
        return n * self.rate(model, cls, day) / unit

    def billed(self) -> list[BilledCall]:
        return [c for c in self.calls if c.at.strftime("%Y-%m-%d") != self.faults.missing_day]

    # -- the server ------------------------------------------------------------------
    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/organization/usage/completions", self._openai_usage)
        app.router.add_get("/v1/organization/costs", self._openai_costs)
        app.router.add_get("/v1/organizations/usage_report/messages", self._anthropic_usage)
        app.router.add_get("/v1/organizations/cost_report", self._anthropic_costs)
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _hook(self, request: web.Request) -> web.Response:
        self.hooks.append(await request.json())
        return web.Response(status=204)

    def _record(self, request: web.Request) -> dict[str, list[str]]:
        params: dict[str, list[str]] = defaultdict(list)
        for k, v in request.query.items():
            params[k].append(v)
        self.seen.append((request.path, dict(params)))
        return params

    def _page(self, buckets: list[dict[str, Any]], params: dict[str, list[str]]
              ) -> web.Response:
        """Buckets from the `page` cursor on, at most `limit` (and buckets_per_page)."""
        start = int(params.get("page", ["0"])[0])
        size = min(int(params.get("limit", ["7"])[0]), self.buckets_per_page)
        chunk = buckets[start:start + size]
        more = start + size < len(buckets)
        body = {"object": "page", "data": chunk, "has_more": more,
                "next_page": str(start + size) if more else None}
        return web.Response(body=orjson.dumps(body, default=_number),
                            content_type="application/json")

    # -- OpenAI ----------------------------------------------------------------------
    def _openai_auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {ADMIN_KEY}":
            raise web.HTTPUnauthorized(content_type="application/json", text=_json(
                {"error": {"message": "Invalid admin key", "type": "invalid_request_error",
                           "param": None, "code": "invalid_api_key"}}))

    def _openai_days(self, params: dict[str, list[str]]) -> list[tuple[int, int, str]]:
        start = datetime.fromtimestamp(int(params["start_time"][0]), UTC)
        end = datetime.fromtimestamp(int(params["end_time"][0]), UTC)
        width = timedelta(hours=1) if params.get("bucket_width") == ["1h"] else timedelta(1)
        out, t = [], start
        while t < end:
            out.append((int(t.timestamp()), int((t + width).timestamp()), t.isoformat()))
            t += width
        return out

    def _in(self, call: BilledCall, lo: int, hi: int) -> bool:
        return lo <= call.at.timestamp() < hi

    async def _openai_usage(self, request: web.Request) -> web.Response:
        self._openai_auth(request)
        params = self._record(request)
        groups = params.get("group_by", [])
        buckets = []
        for lo, hi, _ in self._openai_days(params):
            totals: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            for c in self.billed():
                if c.model in LIST_PRICES and c.model.startswith("gpt") and self._in(c, lo, hi):
                    t = totals[(BILLED_NAME[c.model], c.key, c.project, "default")]
                    t["input_tokens"] += sum(c.classes.get(k, 0) for k in (
                        "input", "cached_input", "cache_write_5m"))
                    t["input_cached_tokens"] += c.classes.get("cached_input", 0)
                    t["input_cache_write_tokens"] += c.classes.get("cache_write_5m", 0)
                    t["output_tokens"] += c.classes.get("output", 0)
                    t["num_model_requests"] += 1
            results = []
            for (model, key, project, tier), t in sorted(totals.items()):
                results.append({
                    "object": "organization.usage.completions.result", **t,
                    "input_audio_tokens": 0, "output_audio_tokens": 0,
                    "model": model if "model" in groups else None,
                    "api_key_id": key if "api_key_id" in groups else None,
                    "project_id": project if "project_id" in groups else None,
                    "service_tier": tier if "service_tier" in groups else None,
                    "user_id": None, "batch": None})
            buckets.append({"object": "bucket", "start_time": lo, "end_time": hi,
                            "results": results})
        return self._page(buckets, params)

    async def _openai_costs(self, request: web.Request) -> web.Response:
        self._openai_auth(request)
        params = self._record(request)
        buckets = []
        for lo, hi, _ in self._openai_days(params):
            totals: dict[tuple, Decimal] = defaultdict(Decimal)
            for c in self.billed():
                if c.model.startswith("gpt") and self._in(c, lo, hi):
                    day = c.at.strftime("%Y-%m-%d")
                    for cls, n in c.classes.items():
                        item = f"{BILLED_NAME[c.model]}, {OPENAI_LINE_ITEM[cls]}"
                        totals[(item, c.key, c.project)] += self.cost(c.model, cls, day, n)
            results = [{"object": "organization.costs.result",
                        "amount": {"value": usd, "currency": "usd"}, "line_item": item,
                        "api_key_id": key, "project_id": project, "quantity": None,
                        "quantity_unit": "tokens"}
                       for (item, key, project), usd in sorted(totals.items())]
            buckets.append({"object": "bucket", "start_time": lo, "end_time": hi,
                            "results": results})
        return self._page(buckets, params)

    # -- Anthropic -------------------------------------------------------------------
    def _anthropic_auth(self, request: web.Request) -> None:
        if request.headers.get("x-api-key") != ADMIN_KEY or \
                request.headers.get("anthropic-version") != "2023-06-01":
            raise web.HTTPUnauthorized(content_type="application/json", text=_json(
                {"type": "error", "error": {"type": "authentication_error",
                                            "message": "invalid x-api-key"}}))

    def _anthropic_days(self, params: dict[str, list[str]]) -> list[tuple[datetime, datetime]]:
        start = datetime.fromisoformat(params["starting_at"][0].replace("Z", "+00:00"))
        end = datetime.fromisoformat(params["ending_at"][0].replace("Z", "+00:00"))
        width = timedelta(hours=1) if params.get("bucket_width") == ["1h"] else timedelta(1)
        out, t = [], start
        while t < end:
            out.append((t, t + width))
            t += width
        return out

    async def _anthropic_usage(self, request: web.Request) -> web.Response:
        self._anthropic_auth(request)
        params = self._record(request)
        groups = params.get("group_by[]", [])
        buckets = []
        for lo, hi in self._anthropic_days(params):
            totals: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            for c in self.billed():
                if c.model.startswith("claude") and lo <= c.at < hi:
                    t = totals[(BILLED_NAME[c.model], c.key)]
                    for cls, n in c.classes.items():
                        t[cls] += n
            results = []
            for (model, key), t in sorted(totals.items()):
                results.append({
                    "uncached_input_tokens": t["input"],
                    "cache_creation": {"ephemeral_5m_input_tokens": t["cache_write_5m"],
                                       "ephemeral_1h_input_tokens": t["cache_write_1h"]},
                    "cache_read_input_tokens": t["cached_input"],
                    "output_tokens": t["output"],
                    "server_tool_use": {"web_search_requests": t["web_search"]},
                    "model": model if "model" in groups else None,
                    "api_key_id": key if "api_key_id" in groups else None,
                    "workspace_id": "wrkspc_default" if "workspace_id" in groups else None,
                    "service_tier": "standard" if "service_tier" in groups else None,
                    "context_window": None})
            buckets.append({"starting_at": _rfc3339(lo), "ending_at": _rfc3339(hi),
                            "results": results})
        return self._page(buckets, params)

    async def _anthropic_costs(self, request: web.Request) -> web.Response:
        self._anthropic_auth(request)
        params = self._record(request)
        buckets = []
        for lo, hi in self._anthropic_days(params):
            totals: dict[tuple, Decimal] = defaultdict(Decimal)
            for c in self.billed():
                if c.model.startswith("claude") and lo <= c.at < hi:
                    day = c.at.strftime("%Y-%m-%d")
                    for cls, n in c.classes.items():
                        totals[(c.model, cls)] += self.cost(c.model, cls, day, n)
            results = []
            for (model, cls), usd in sorted(totals.items()):
                search = cls == "web_search"
                results.append({
                    "amount": format(usd * 100, "f"), "currency": "USD",
                    "cost_type": "web_search" if search else "tokens",
                    "model": BILLED_NAME[model],
                    "token_type": None if search else ANTHROPIC_TOKEN_TYPE[cls],
                    "service_tier": "standard", "context_window": "0-200k",
                    "description": f"Claude Sonnet 4.5 {'web search' if search else cls}",
                    "workspace_id": None})
            buckets.append({"starting_at": _rfc3339(lo), "ending_at": _rfc3339(hi),
                            "results": results})
        return self._page(buckets, params)

    # -- Gemini ----------------------------------------------------------------------
    def write_gemini_export(self, path: Path, fmt: str = "jsonl") -> None:
        """The Cloud Billing export rows for the Gemini calls, one per call and SKU."""
        rows = []
        for c in self.billed():
            if not c.model.startswith("gemini"):
                continue
            day = c.at.strftime("%Y-%m-%d")
            for cls, n in c.classes.items():
                list_cost = n * LIST_PRICES[c.model][cls] / MILLION
                charged = self.cost(c.model, cls, day, n)
                rows.append({
                    "billing_account_id": "0123AB-4567CD-89EF01",
                    "service": {"id": "AEFD-7695-64FA", "description": "Gemini API"},
                    "sku": {"id": f"SKU-{cls}", "description": GEMINI_SKU[cls]},
                    "usage_start_time": c.at.strftime("%Y-%m-%d %H:00:00 UTC"),
                    "usage_end_time": (c.at + timedelta(hours=1)).strftime(
                        "%Y-%m-%d %H:00:00 UTC"),
                    "project": {"id": c.project, "name": c.project},
                    "labels": [{"key": "env", "value": "prod"}],
                    "cost": list_cost, "currency": "USD",
                    "usage": {"amount": n, "unit": "count"},
                    "credits": ([{"name": "Negotiated discount", "amount": charged - list_cost,
                                  "type": "DISCOUNT"}] if charged != list_cost else []),
                })
        if fmt == "jsonl":
            path.write_bytes(b"".join(orjson.dumps(r, default=_number) + b"\n" for r in rows))
            return
        columns = ["billing_account_id", "service.id", "service.description", "sku.id",
                   "sku.description", "usage_start_time", "usage_end_time", "project.id",
                   "project.name", "labels", "cost", "currency", "usage.amount", "usage.unit",
                   "credits"]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in rows:
                flat = []
                for col in columns:
                    node: Any = r
                    for part in col.split("."):
                        node = node[part]
                    flat.append(orjson.dumps(node, default=_number).decode()
                                if isinstance(node, list) else _text(node))
                writer.writerow(flat)


def _number(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(format(value, "f").encode())
    raise TypeError


def _text(value: Any) -> str:
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def _rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
