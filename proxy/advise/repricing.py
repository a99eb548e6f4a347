"""What the window's calls would have cost on another model or service tier.

`whatif` reprices each call the mapping names with the same token counts on the target
model (the price period in force at the call's time) and, with a tier, at that tier's
rates; the advisor uses the same repricing to propose a smaller model for features with
short answers and the batch or flex tier for features that are not latency-bound.
Token counts are kept as logged: another provider's tokenizer would count differently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from decimal import Decimal
from statistics import median
from typing import Any

from proxy.advise.calls import ZERO, LoggedCall
from proxy.pricing import PriceBook
from proxy.pricing.book import Price

TIERS = ("batch", "flex")
MIN_CALLS = 10  # fewer calls of a feature x model say too little to advise on
SHORT_OUTPUT_TOKENS = 300  # mean output per call at or under which answers are "short"
LONG_CALL_MS = 30_000  # a median duration this long means nobody waits on the answer
NIGHT_HOURS = range(0, 6)  # UTC hours of scheduled work
NIGHT_SHARE = Decimal("0.8")


class WhatIfError(ValueError):
    """A mapping that names no model the tables know, or a tier they do not price."""


def parse_mapping(items: list[str]) -> dict[str, str]:
    """`A=B` strings into {A: B} (model names as logged or as the tables name them)."""
    out = {}
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise WhatIfError(f"--map takes FROM=TO (a model name each), not {item!r}")
        out[source.strip()] = target.strip()
    return out


@dataclass
class FeatureDelta:
    feature: str
    calls: int = 0
    repriced: int = 0
    before_usd: Decimal = ZERO
    after_usd: Decimal = ZERO
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def delta_usd(self) -> Decimal:
        return self.after_usd - self.before_usd

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "calls": self.calls, "repriced": self.repriced,
                "before_usd": self.before_usd, "after_usd": self.after_usd,
                "delta_usd": self.delta_usd, "skipped": self.skipped}


def target_price(prices: PriceBook, call: LoggedCall, model: str | None) -> Price | None:
    """The price of `model` (None: the call's own) at the call's time, in the call's table
    or else any table that knows it."""
    if model is None:
        return call.price
    found = prices.lookup(call.table, (model,), call.ts)
    if found is None:
        for table in sorted(prices.tables):
            found = prices.lookup(table, (model,), call.ts)
            if found is not None:
                break
    return found


def repriced(call: LoggedCall, price: Price, tier: str | None) -> Decimal | None:
    """The call on `price` (and `tier`): None when the tier has no price there."""
    usage = call.usage
    if tier is not None:
        if tier not in price.period.service_tiers:
            return None
        usage = replace(usage, service_tier=tier)
    return call.priced_as(usage, price)


def _matches(call: LoggedCall, source: str, prices: PriceBook) -> bool:
    if source in (call.model, "*"):
        return True
    entry = prices.model(call.table, (source,))
    return entry is not None and entry.name == call.model


def whatif(calls: list[LoggedCall], prices: PriceBook, mapping: dict[str, str],
           tier: str | None) -> dict[str, Any]:
    """Per feature: calls, those repriced, their cost as priced and on the mapped model or
    tier, and the difference; calls no mapping names keep their cost on both sides."""
    if tier is not None and tier not in TIERS:
        raise WhatIfError(f"--tier takes one of {', '.join(TIERS)}")
    for source, target in mapping.items():
        if not any(prices.model(t, (target,)) for t in prices.tables):
            raise WhatIfError(f"no pricing table knows the model {target!r} (of {source}="
                              f"{target})")
    features: dict[str, FeatureDelta] = {}
    for call in calls:
        if call.price is None:
            continue
        row = features.setdefault(call.feature, FeatureDelta(call.feature))
        row.calls += 1
        before = call.base_cost()
        row.before_usd += before
        target = next((t for s, t in mapping.items() if _matches(call, s, prices)), None)
        if target is None and (mapping or tier is None):
            row.after_usd += before
            continue
        price = target_price(prices, call, target)
        after = repriced(call, price, tier) if price is not None else None
        if after is None:
            why = f"no {tier} price" if price is not None else f"{target} not priced then"
            row.skipped[why] = row.skipped.get(why, 0) + 1
            row.after_usd += before
            continue
        row.repriced += 1
        row.after_usd += after
    rows = sorted(features.values(), key=lambda r: r.delta_usd)
    total = FeatureDelta("(total)")
    for r in rows:
        total.calls += r.calls
        total.repriced += r.repriced
        total.before_usd += r.before_usd
        total.after_usd += r.after_usd
    return {"mapping": mapping, "tier": tier, "features": [r.as_dict() for r in rows],
            "total": total.as_dict()}


def smaller_sibling(prices: PriceBook, call: LoggedCall) -> Price | None:
    """The same family's smaller model, by the providers' naming (gpt-4o -> gpt-4o-mini,
    *-pro -> *-flash, opus -> sonnet -> haiku), priced at the call's time."""
    name = call.model
    candidates = [f"{name}-mini", name.replace("-pro", "-flash"),
                  name.replace("opus", "sonnet"), name.replace("sonnet", "haiku")]
    for candidate in candidates:
        if candidate == name:
            continue
        found = prices.lookup(call.table, (candidate,), call.ts)
        if found is not None and found.model.name != name:
            return found
    return None


def _groups(calls: list[LoggedCall]) -> dict[tuple, list[LoggedCall]]:
    out: dict[tuple, list[LoggedCall]] = defaultdict(list)
    for call in calls:
        if call.ok and call.price is not None:
            out[(call.feature, call.provider, call.model)].append(call)
    return out


def smaller_models(calls: list[LoggedCall], prices: PriceBook) -> list[dict[str, Any]]:
    """Features whose answers are short on a model with a smaller sibling: the same calls
    on the sibling (quality is the user's to check; the dollars are exact)."""
    found = []
    for (feature, provider, model), group in _groups(calls).items():
        if len(group) < MIN_CALLS:
            continue
        output = sum(c.usage.output_tokens for c in group) // len(group)
        if output > SHORT_OUTPUT_TOKENS:
            continue
        before = after = ZERO
        target = None
        for call in group:
            sibling = smaller_sibling(prices, call)
            if sibling is None:
                break
            target = sibling.model.name
            before += call.base_cost()
            after += call.priced_as(call.usage, sibling)
        else:
            if target is not None and after < before:
                found.append({
                    "feature": feature, "provider": provider, "model": model,
                    "target": target, "savings_usd": before - after,
                    "evidence": {"calls": len(group), "output_tokens_avg": output,
                                 "prompt_tokens_avg": sum(c.usage.prompt_tokens
                                                          for c in group) // len(group),
                                 "cost_usd": before, "cost_on_target_usd": after}})
    found.sort(key=lambda r: -r["savings_usd"])
    return found


def cheaper_tiers(calls: list[LoggedCall]) -> list[dict[str, Any]]:
    """Features that are not latency-bound (never streamed, and a median call of 30 s or
    more, or 80% of calls between 00:00 and 06:00 UTC) on the cheapest tier priced for
    every one of their calls (batch or flex)."""
    found = []
    for (feature, provider, model), group in _groups(calls).items():
        group = [c for c in group if (c.usage.service_tier or "") not in TIERS]
        if len(group) < MIN_CALLS or any(c.stream for c in group):
            continue
        durations = [c.duration_ms for c in group if c.duration_ms is not None]
        long_ms = median(durations) if durations else 0
        night = Decimal(sum(c.ts.hour in NIGHT_HOURS for c in group)) / len(group)
        if long_ms < LONG_CALL_MS and night < NIGHT_SHARE:
            continue
        before = sum((c.base_cost() for c in group), ZERO)
        best = None
        for tier in TIERS:
            costs = [repriced(c, c.price, tier) for c in group]
            if any(x is None for x in costs):
                continue
            total = sum(costs, ZERO)
            if best is None or total < best[1]:
                best = (tier, total)
        if best is None or best[1] >= before:
            continue
        found.append({
            "feature": feature, "provider": provider, "model": model, "tier": best[0],
            "savings_usd": before - best[1],
            "evidence": {"calls": len(group), "streamed": 0,
                         "median_duration_ms": round(long_ms),
                         "night_share": night.quantize(Decimal("0.01")),
                         "cost_usd": before, "cost_on_tier_usd": best[1]}})
    found.sort(key=lambda r: -r["savings_usd"])
    return found
