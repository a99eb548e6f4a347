"""The cost engine: a call's usage and the price in force in, an exact Decimal cost out.

Pure functions of their arguments; no I/O, no table parsing. The classes priced and their
fallback rates come from `proxy.token_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from proxy.dialects import standard_tiers
from proxy.pricing.book import Price, resolve_rates
from proxy.token_classes import BY_COLUMN, PRICED, PRICED_PARTS

QUANTUM = Decimal("1e-10")


@dataclass(frozen=True, slots=True)
class Cost:
    total: Decimal
    breakdown: dict[str, Any]


def cost(usage: Any, price: Price, when: datetime, breakdown: bool = True) -> Cost:
    """The exact cost of a call: each class at its rate (tokens per 1M, units per 1,000).

    Long-context tiers are cliffs (above the threshold every token moves to the tier's
    rates); the served speed, service tier and time windows apply on top of the result.
    `breakdown=False` (a budget hold, which needs the total only) skips the per-class lines.
    """
    period = price.period
    rates = price.rates
    notes: dict[str, Any] = {}
    prompt = usage.prompt_tokens if period.tiers else 0
    for tier in reversed(period.tiers):
        if prompt > tier.above_input_tokens:
            rates = tier.adjustment.apply(rates)
            notes["tier"] = f"above {tier.above_input_tokens} input tokens"
            break
    speed = (usage.speed or "").lower()
    if speed and speed != "standard":
        adjustment = period.speeds.get(speed)
        if adjustment is not None:
            rates = adjustment.apply(rates)
        notes["speed"] = speed if adjustment is not None else f"{speed} (no table price)"
    service = (usage.service_tier or "").lower()
    if service and service not in standard_tiers():
        adjustment = period.service_tiers.get(service)
        if adjustment is not None:
            rates = adjustment.apply(rates)
        notes["service_tier"] = service if adjustment is not None else f"{service} (no table price)"
    for window in period.windows:
        if window.contains(when):
            rates = window.adjustment.apply(rates)
            notes["window"] = f"{window.start:%H:%M}-{window.end:%H:%M} UTC"
            break
    total = Decimal(0)
    lines: dict[str, Any] = {}
    resolved = price.resolved if rates is price.rates else resolve_rates(rates)
    for name, n in _amounts(usage):
        rate, per, is_tokens = resolved[name]
        if rate is None:
            rate = Decimal(0)
            notes.setdefault("missing_rates", []).append(name)
        usd = n * rate / per
        total += usd
        if not breakdown:
            continue
        if is_tokens:
            lines[name] = {"tokens": n, "usd_per_mtok": _plain_rate(rate), "usd": plain(usd)}
        else:
            lines[name] = {"requests": n, "usd_per_1000": _plain_rate(rate), "usd": plain(usd)}
    return Cost(total, {"classes": lines, **notes})


# Each top-level column with the parts priced apart within it, resolved once.
_SPLIT = tuple((c.column, c.name, tuple((BY_COLUMN[p].column, BY_COLUMN[p].name)
                                        for p in PRICED_PARTS[c.column]))
               for c in PRICED if c.within is None)


def _amounts(usage: Any) -> list[tuple[str, int]]:
    """priced_counts(usage.counts()) without building the counts: the disjoint amount
    each rate applies to, by class name (a part capped at what remains of its parent),
    nonzero ones only, in the classes' order."""
    found: list[tuple[str, int]] = []
    for column, name, parts in _SPLIT:
        n = getattr(usage, column)
        if not n:
            continue  # its parts are within it: none of them counts either
        at = len(found)  # the parent goes before its parts, as the classes list them
        for part_column, part_name in parts:
            taken = getattr(usage, part_column)
            if taken:
                taken = min(taken, n)
                found.append((part_name, taken))
                n -= taken
        if n:
            found.insert(at, (name, n))
    return found


@lru_cache(maxsize=4096)
def _plain_rate(rate: Decimal) -> str:
    return plain(rate)  # rates come from a few table entries: format each once


def rounded(amount: Decimal) -> Decimal:
    """The stored form of a cost: rounded to 1e-10 USD."""
    return amount.quantize(QUANTUM)


def plain(value: Decimal) -> str:
    """A Decimal as plain digits, without exponent or trailing zeros."""
    return format(value.normalize(), "f")


def rates_dict(rates: Any) -> dict[str, str | None]:
    """Rates for display: decimal strings per unit of their class."""
    return {f.name: (None if getattr(rates, f.name) is None else plain(getattr(rates, f.name)))
            for f in fields(rates)}
