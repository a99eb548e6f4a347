"""Generated usage rows for query, report and dashboard tests: every attribute varied."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson

from proxy.storage.row import UsageRow
from proxy.storage.sqlite import SqliteUsageLog

CUSTOMERS = ("acme", "globex", "<b>initech</b> & co", None)
FEATURES = ("search", "chat", "summarise")
MODELS = (("openai", "gpt-4o-mini", "chat.completions"), ("openai", "gpt-4o", "responses"),
          ("anthropic", "claude-sonnet-4-5", "messages"),
          ("gemini", "gemini-2.5-flash", "generateContent"))
OUTCOMES = ("ok",) * 12 + ("upstream_error", "budget_exceeded", "client_disconnect",
                           "rejected")


def make_rows(n: int = 1500, seed: int = 5, start: datetime = datetime(2026, 3, 2, tzinfo=UTC),
              days: int = 21, prefix: str = "c") -> list[UsageRow]:
    """Calls over three weeks with every attribute varied, some unpriced, some untagged."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ts = start + timedelta(seconds=rng.randrange(days * 86400))
        provider, model, endpoint = rng.choice(MODELS)
        outcome = rng.choice(OUTCOMES)
        priced = 0 if model == "gemini-2.5-flash" and rng.random() < 0.5 else 1
        inp, cached, out = rng.randrange(1, 4000), rng.randrange(0, 2000), rng.randrange(500)
        cost = Decimal(rng.randrange(1, 10**7)) * Decimal("1e-10")
        tags: dict[str, str] = {"env": rng.choice(("prod", "dev"))}
        if rng.random() < 0.6:
            tags["team"] = rng.choice(("web", "data", "o'brien \"q\""))
        rows.append(UsageRow(
            id=f"{prefix}{i:05d}", ts=ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            duration_ms=round(rng.lognormvariate(5, 1), 3) if rng.random() < 0.95 else None,
            key_name=rng.choice(("team-a", "team-b")), provider=provider, endpoint=endpoint,
            model=model, response_model=model, stream=rng.randrange(2),
            status=200 if outcome == "ok" else 429, outcome=outcome, input_tokens=inp,
            cached_input_tokens=cached, cache_write_tokens=rng.randrange(100),
            cache_write_1h_tokens=rng.randrange(10), output_tokens=out,
            reasoning_tokens=out // 3, usage_source="provider",
            cost_usd=float(cost) if priced else None, priced=priced,
            pricing_version="openai.yaml@2025-01-01+abc" if priced else None,
            customer=rng.choice(CUSTOMERS), feature=rng.choice(FEATURES),
            trace_id=f"t{rng.randrange(40)}" if rng.random() < 0.7 else None,
            tags=orjson.dumps(tags).decode()))
    return rows




def write_log(path: Path, rows: list[UsageRow]) -> None:
    """A usage log file holding `rows`, made the way the proxy makes one."""
    log = SqliteUsageLog(f"sqlite:///{path}")
    log.open()
    log.write(rows)
    log.close()
