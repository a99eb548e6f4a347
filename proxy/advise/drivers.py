"""What drives spend per feature: prompt growth, output/input ratio, reasoning share,
failed calls that still cost money, and agent traces that loop.

Prompt bloat compares the mean prompt per call in the window's first and second half;
its dollars are the second half's prompt-side cost above what the first half's mean
would have cost. A looping trace is one with at least 20 calls and five times its
feature's median calls per trace; its dollars are its cost above the feature's median
trace cost (what a per-trace budget at the typical run's size would have held back).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from statistics import median
from typing import Any

from proxy.advise.calls import ZERO, LoggedCall
from proxy.token_classes import CLASSES, Side

BLOAT_GROWTH = Decimal("0.2")  # a mean prompt 20% longer in the second half
MIN_HALF_CALLS = 5
LOOP_CALLS = 20
LOOP_FACTOR = 5
_PROMPT_SIDE = {c.column: 0 for c in CLASSES if c.side is Side.INPUT}


def _prompt_cost(call: LoggedCall) -> Decimal:
    return call.base_cost() - call.priced_as(replace(call.usage, **_PROMPT_SIDE))


def prompt_bloat(calls: list[LoggedCall], since: datetime, until: datetime
                 ) -> list[dict[str, Any]]:
    """Features whose mean prompt per call grew by 20% or more from the window's first
    half to its second."""
    middle = since + (until - since) / 2
    halves: dict[str, tuple[list[LoggedCall], list[LoggedCall]]] = defaultdict(
        lambda: ([], []))
    for call in calls:
        if call.ok and call.price is not None:
            halves[call.feature][call.ts >= middle].append(call)
    found = []
    for feature, (first, second) in halves.items():
        if len(first) < MIN_HALF_CALLS or len(second) < MIN_HALF_CALLS:
            continue
        before = Decimal(sum(c.usage.prompt_tokens for c in first)) / len(first)
        after = Decimal(sum(c.usage.prompt_tokens for c in second)) / len(second)
        if before <= 0 or after < before * (1 + BLOAT_GROWTH):
            continue
        extra = sum((_prompt_cost(c) for c in second), ZERO) * (1 - before / after)
        found.append({"feature": feature, "savings_usd": extra.quantize(Decimal("1e-10")),
                      "evidence": {"prompt_tokens_first_half": round(before),
                                   "prompt_tokens_second_half": round(after),
                                   "growth": ((after / before) - 1).quantize(Decimal("0.01")),
                                   "calls_second_half": len(second)}})
    found.sort(key=lambda r: -r["savings_usd"])
    return found


def failed_spend(calls: list[LoggedCall]) -> list[dict[str, Any]]:
    """Per feature x model: calls that failed or were cut off yet cost money."""
    groups: dict[tuple, dict[str, Any]] = {}
    for call in calls:
        if call.ok or call.cost <= 0:
            continue
        row = groups.setdefault((call.feature, call.provider, call.model), {
            "feature": call.feature, "provider": call.provider, "model": call.model,
            "savings_usd": ZERO, "evidence": {"calls": 0, "outcomes": {}}})
        row["savings_usd"] += call.cost
        row["evidence"]["calls"] += 1
        outcomes = row["evidence"]["outcomes"]
        outcomes[call.outcome] = outcomes.get(call.outcome, 0) + 1
    return sorted(groups.values(), key=lambda r: -r["savings_usd"])


def looping_traces(calls: list[LoggedCall]) -> list[dict[str, Any]]:
    """Traces far longer than their feature's typical run."""
    traces: dict[tuple[str, str], list[LoggedCall]] = defaultdict(list)
    for call in calls:
        if call.trace_id:
            traces[(call.feature, call.trace_id)].append(call)
    by_feature: dict[str, list[tuple[str, list[LoggedCall]]]] = defaultdict(list)
    for (feature, trace), group in traces.items():
        by_feature[feature].append((trace, group))
    found = []
    for feature, runs in by_feature.items():
        if len(runs) < 3:
            continue
        typical_calls = median(len(g) for _, g in runs)
        typical_usd = median(sum((c.cost for c in g), ZERO) for _, g in runs)
        for trace, group in runs:
            if len(group) < LOOP_CALLS or len(group) < LOOP_FACTOR * typical_calls:
                continue
            spent = sum((c.cost for c in group), ZERO)
            span = (max(c.ts for c in group) - min(c.ts for c in group)).total_seconds()
            found.append({
                "feature": feature, "trace_id": trace, "savings_usd": spent - typical_usd,
                "evidence": {"calls": len(group), "cost_usd": spent,
                             "typical_calls": typical_calls, "typical_cost_usd": typical_usd,
                             "span_s": round(span, 1),
                             "same_prefix_calls": _same_prefix(group)}})
    found.sort(key=lambda r: -r["savings_usd"])
    return found


def _same_prefix(group: list[LoggedCall]) -> int:
    counts: dict[str, int] = defaultdict(int)
    for call in group:
        if call.prefix_hash:
            counts[call.prefix_hash] += 1
    return max(counts.values(), default=0)


def feature_table(calls: list[LoggedCall]) -> list[dict[str, Any]]:
    """Per feature: calls, cost, mean prompt and output, output/input ratio, reasoning
    share of output, and the cost of calls that failed."""
    rows: dict[str, dict[str, Any]] = {}
    for call in calls:
        row = rows.setdefault(call.feature, {
            "feature": call.feature, "calls": 0, "cost_usd": ZERO, "prompt_tokens": 0,
            "output_tokens": 0, "reasoning_tokens": 0, "failed_cost_usd": ZERO})
        row["calls"] += 1
        row["cost_usd"] += call.cost
        row["prompt_tokens"] += call.usage.prompt_tokens
        row["output_tokens"] += call.usage.output_tokens
        row["reasoning_tokens"] += call.usage.reasoning_tokens
        if not call.ok:
            row["failed_cost_usd"] += call.cost
    out = []
    for row in sorted(rows.values(), key=lambda r: -r["cost_usd"]):
        prompt, output = row["prompt_tokens"], row["output_tokens"]
        out.append({**row,
                    "output_per_input": round(output / prompt, 3) if prompt else None,
                    "reasoning_share": round(row["reasoning_tokens"] / output, 3)
                    if output else None})
    return out
