"""What the meter logged for one provider, per UTC day and model: tokens and dollars by class.

The reconciliation's side of the log. Token counts come from the token columns (so an
unpriced call still counts its tokens); dollars per class from each row's cost breakdown,
summed exactly as Decimal. Rows are read in batches and folded here, because the per-class
split lives in the breakdown JSON, which SQLite and PostgreSQL query differently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.query import SqlFlavor
from proxy.timeparse import to_ts

BATCH_ROWS = 5000


@dataclass
class MeteredDay:
    """One day x model of one provider: tokens and USD per priced class, calls, unpriced calls."""

    tokens: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    usd: defaultdict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    calls: int = 0
    unpriced_calls: int = 0


def metered_by_day(conn: Any, flavor: SqlFlavor, provider: str, since: datetime,
                   until: datetime) -> dict[tuple[str, str], MeteredDay]:
    """{(YYYY-MM-DD, model as the provider answered it): MeteredDay} for calls in [since, until).

    Class names are the pricing breakdown's (`input`, `audio_input`, `cached_input`,
    `cache_write_5m`, `cache_write_1h`, `output`, `audio_output`, `web_search`); token
    counts of audio are inside `input` / `output` here, as in the log's columns.
    """
    p = flavor.param
    sql = ("SELECT substr(ts, 1, 10), coalesce(response_model, model), input_tokens, "
           "cached_input_tokens, cache_write_tokens, cache_write_1h_tokens, output_tokens, "
           f"cost_breakdown, priced FROM usage WHERE provider = {p} AND ts >= {p} AND ts < {p}")
    found: dict[tuple[str, str], MeteredDay] = {}
    cursor = conn.cursor()
    try:
        cursor.execute(sql, (provider, to_ts(since), to_ts(until)))
        while batch := cursor.fetchmany(BATCH_ROWS):
            for day, model, inp, cached, write, write_1h, out, breakdown, priced in batch:
                entry = found.get((day, model or ""))
                if entry is None:
                    entry = found[(day, model or "")] = MeteredDay()
                _fold(entry, inp or 0, cached or 0, write or 0, write_1h or 0, out or 0,
                      breakdown, priced)
    finally:
        cursor.close()
    return found


def _fold(entry: MeteredDay, inp: int, cached: int, write: int, write_1h: int, out: int,
          breakdown: Any, priced: Any) -> None:
    entry.calls += 1
    tokens = entry.tokens
    tokens["input"] += inp
    tokens["cached_input"] += cached
    tokens["cache_write_5m"] += write - min(write_1h, write)
    tokens["cache_write_1h"] += min(write_1h, write)
    tokens["output"] += out
    if not priced:
        entry.unpriced_calls += 1
    if not breakdown:
        return
    parsed = orjson.loads(breakdown) if isinstance(breakdown, str | bytes) else breakdown
    for name, line in (parsed.get("classes") or {}).items():
        entry.usd[name] += Decimal(str(line.get("usd", "0")))
        if name == "web_search":
            tokens["web_search"] += int(line.get("requests", 0))
