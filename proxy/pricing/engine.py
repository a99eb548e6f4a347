"""The cost engine: a call's usage and the price in force in, an exact Decimal cost out.

Pure functions of their arguments; no I/O, no table parsing. The classes priced and their
fallback rates come from `proxy.token_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from proxy.dialects import standard_tiers
from proxy.pricing.book import Price
from proxy.token_classes import BY_NAME, PRICED, Unit, priced_counts

QUANTUM = Decimal("1e-10")


@dataclass(frozen=True, slots=True)
class Cost:
    total: Decimal
    breakdown: dict[str, Any]


def cost(usage: Any, price: Price, when: datetime) -> Cost:
    """The exact cost of a call: each class at its rate (tokens per 1M, units per 1,000).

    Long-context tiers are cliffs (above the threshold every token moves to the tier's
    rates); the served speed, service tier and time windows apply on top of the result.
    """
    period = price.period
    rates = price.rates
    notes: dict[str, Any] = {}
    prompt = usage.prompt_tokens
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
    counts = priced_counts(usage.counts())
    for cls in PRICED:
        n = counts[cls.name]
        if not n:
            continue
        rate = _rate(rates, cls.name)
        if rate is None:
            rate = Decimal(0)
            notes.setdefault("missing_rates", []).append(cls.name)
        usd = n * rate / cls.per
        total += usd
        if cls.unit is Unit.TOKENS:
            lines[cls.name] = {"tokens": n, "usd_per_mtok": plain(rate), "usd": plain(usd)}
        else:
            lines[cls.name] = {"requests": n, "usd_per_1000": plain(rate), "usd": plain(usd)}
    return Cost(total, {"classes": lines, **notes})


def _rate(rates: Any, name: str) -> Decimal | None:
    cls = BY_NAME[name]
    for key in (cls.rate, *cls.fallback):
        value = getattr(rates, key)
        if value is not None:
            return value
    return None


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
