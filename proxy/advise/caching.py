"""Prompt caching: what caching saved where it is used, and what it would save where a
stable prefix repeats without a single cache read.

For a prefix seen on several calls (same `prefix_hash`, feature and model), each cache
lifetime the table prices is replayed over the calls' timestamps: a call within the
lifetime of the previous one reads the cache (the lifetime is refreshed by each read, as
Anthropic documents), any other writes it. Each read saves prefix tokens x (input -
cached input); each write costs prefix tokens x (write - input) more. Both come from the
pricing engine at the call's own time, so long-context tiers and price periods hold.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from statistics import median
from typing import Any

from proxy.advise.calls import ZERO, LoggedCall, moved, uncached

MIN_CACHEABLE_TOKENS = 1024  # the smallest prefix OpenAI, Anthropic and Gemini will cache
# (name, seconds, the rate a write at this lifetime is priced at, the columns it goes in).
# 5 minutes is every provider's default: tables without a write rate (OpenAI, Gemini
# implicit caching) price its writes as plain input, which the engine's fallback does.
LIFETIMES = (
    ("5m", 300, None, ("cache_write_tokens",)),
    ("30m", 1800, "cache_write_30m", ("cache_write_tokens", "cache_write_30m_tokens")),
    ("1h", 3600, "cache_write_1h", ("cache_write_tokens", "cache_write_1h_tokens")),
    ("12h", 43200, "cache_write_12h", ("cache_write_tokens", "cache_write_12h_tokens")),
)


@dataclass
class PrefixRun:
    """Calls that repeated one stable prefix and never read a cache."""

    feature: str
    provider: str
    model: str
    calls: list[LoggedCall] = field(default_factory=list)

    def savings(self) -> dict[str, Decimal]:
        """Dollars each lifetime the table prices would have saved (negative: lost)."""
        out = {}
        for name, seconds, rate, columns in LIFETIMES:
            if rate is not None and any(getattr(c.price.rates, rate) is None
                                        for c in self.calls):
                continue
            total = ZERO
            previous = None
            for call in self.calls:
                tokens = call.prefix_tokens or 0
                hit = previous is not None and (call.ts - previous).total_seconds() <= seconds
                target = ("cached_input_tokens",) if hit else columns
                total += call.base_cost() - call.priced_as(
                    moved(call.usage, tokens, target))
                previous = call.ts
            out[name] = total
        return out


def _cacheable(call: LoggedCall) -> bool:
    return (call.ok and call.price is not None and call.prefix_hash is not None
            and (call.prefix_tokens or 0) >= MIN_CACHEABLE_TOKENS
            and call.price.rates.cached_input is not None
            and call.usage.input_tokens >= (call.prefix_tokens or 0))


def uncached_repeats(calls: list[LoggedCall]) -> list[dict[str, Any]]:
    """Per feature x model: prefixes repeated without any cache read, the best lifetime
    and what it would have saved; ranked by dollars."""
    runs: dict[tuple, PrefixRun] = {}
    read_cache: set[tuple] = set()
    for call in calls:
        if call.prefix_hash is None:
            continue
        key = (call.feature, call.provider, call.model, call.prefix_hash)
        if call.usage.cached_input_tokens or call.usage.cache_write_tokens:
            read_cache.add(key)
        if _cacheable(call):
            runs.setdefault(key, PrefixRun(*key[:3])).calls.append(call)
    grouped: dict[tuple, list[PrefixRun]] = defaultdict(list)
    for key, run in runs.items():
        if key not in read_cache and len(run.calls) >= 2:
            grouped[key[:3]].append(run)
    found = []
    for (feature, provider, model), group in grouped.items():
        per_lifetime: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for run in group:
            for name, usd in run.savings().items():
                per_lifetime[name] += max(usd, ZERO)  # a prefix that loses is left uncached
        if not per_lifetime:
            continue
        best = max(per_lifetime, key=lambda n: (per_lifetime[n], -_seconds(n)))
        if per_lifetime[best] <= 0:
            continue
        repeated = [c for run in group for c in run.calls]
        gaps = [(b.ts - a.ts).total_seconds() for run in group
                for a, b in zip(run.calls, run.calls[1:], strict=False)]
        found.append({
            "feature": feature, "provider": provider, "model": model,
            "savings_usd": per_lifetime[best], "lifetime": best,
            "evidence": {
                "prefixes": len(group), "calls": len(repeated),
                "repeats": len(repeated) - len(group),
                "prefix_tokens_avg": sum(c.prefix_tokens or 0 for c in repeated)
                // len(repeated),
                "median_reuse_interval_s": round(median(gaps), 1),
                "cache_reads": 0,
                "savings_by_lifetime_usd": dict(per_lifetime),
            }})
    found.sort(key=lambda r: -r["savings_usd"])
    return found


def _seconds(name: str) -> int:
    return next(s for n, s, _, _ in LIFETIMES if n == name)


def cache_use(calls: list[LoggedCall]) -> list[dict[str, Any]]:
    """Per feature x model: prompt tokens, cache reads and writes, the hit rate and what
    caching saved net of the write premiums (the same calls priced as if uncached)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for call in calls:
        if call.price is None:
            continue
        row = rows.setdefault((call.feature, call.provider, call.model), {
            "feature": call.feature, "provider": call.provider, "model": call.model,
            "calls": 0, "prompt_tokens": 0, "cached_tokens": 0, "cache_write_tokens": 0,
            "saved_usd": ZERO})
        usage = call.usage
        row["calls"] += 1
        row["prompt_tokens"] += usage.prompt_tokens
        row["cached_tokens"] += usage.cached_input_tokens
        row["cache_write_tokens"] += usage.cache_write_tokens
        if usage.cached_input_tokens or usage.cache_write_tokens:
            row["saved_usd"] += call.priced_as(uncached(usage)) - call.base_cost()
    out = []
    for row in rows.values():
        if not (row["cached_tokens"] or row["cache_write_tokens"]):
            continue
        row["hit_rate"] = (Decimal(row["cached_tokens"]) / row["prompt_tokens"]).quantize(
            Decimal("0.0001")) if row["prompt_tokens"] else ZERO
        out.append(row)
    out.sort(key=lambda r: -r["saved_usd"])
    return out
