"""The savings advisor: ranked recommendations, each with the dollars it would have saved
over the window and the evidence, from the usage log and the pricing tables alone.

Every dollar figure is a difference between two engine prices of the same logged usage at
the call's own time (proxy.advise.calls), so it is exact and can be checked by hand.
`advise` gathers the analyses (caching, repricing, drivers, the price calendar) into
one answer for `meterproxy advise`, `GET /_meter/advise` and the dashboard.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from proxy.advise.caching import cache_use, uncached_repeats
from proxy.advise.calendar import price_calendar
from proxy.advise.calls import ZERO, LoggedCall, read_calls
from proxy.advise.drivers import failed_spend, feature_table, looping_traces, prompt_bloat
from proxy.advise.repricing import cheaper_tiers, smaller_models
from proxy.config import Settings
from proxy.pricing import PriceBook
from proxy.storage.readers import LogReader

__all__ = ["LoggedCall", "advise", "read_calls"]


def _cache(r: dict[str, Any]) -> tuple[str, str]:
    return ("prompt_cache", f"Cache the repeated prompt prefix of {r['feature']} on "
            f"{r['model']} ({r['lifetime']} lifetime): {r['evidence']['repeats']} repeats "
            "never read a cache")


def _model(r: dict[str, Any]) -> tuple[str, str]:
    return ("smaller_model", f"Try {r['target']} for {r['feature']} (now {r['model']}): "
            f"its answers average {r['evidence']['output_tokens_avg']} tokens")


def _tier(r: dict[str, Any]) -> tuple[str, str]:
    return ("cheaper_tier", f"Send {r['feature']} on {r['model']} through the {r['tier']} "
            "tier: its calls are not waited on (never streamed; long or nightly)")


def _loop(r: dict[str, Any]) -> tuple[str, str]:
    return ("looping_trace", f"Trace {r['trace_id']} of {r['feature']} ran "
            f"{r['evidence']['calls']} calls (typical: {r['evidence']['typical_calls']}): cap "
            "agent runs with a per-trace budget (budgets: scope {trace: '*'})")


def _failed(r: dict[str, Any]) -> tuple[str, str]:
    return ("failed_spend", f"{r['evidence']['calls']} failed or cut-off calls of "
            f"{r['feature']} on {r['model']} still cost money: retry less, or shorten "
            "timeouts")


def _cache_loss(r: dict[str, Any]) -> tuple[str, str]:
    return ("cache_loss", f"Caching on {r['feature']} / {r['model']} costs more in writes "
            f"than its reads save (hit rate {r['hit_rate'] * 100:.1f}%): use a shorter "
            "lifetime, or cache only prefixes that repeat")


def _bloat(r: dict[str, Any]) -> tuple[str, str]:
    e = r["evidence"]
    return ("prompt_bloat", f"Prompts of {r['feature']} grew from "
            f"{e['prompt_tokens_first_half']} to {e['prompt_tokens_second_half']} tokens per "
            "call: trim what was added")


ANALYSES: tuple[tuple[Callable[[dict[str, Any]], tuple[str, str]], str], ...] = (
    (_cache, "uncached"), (_model, "models"), (_tier, "tiers"), (_loop, "loops"),
    (_failed, "failed"), (_bloat, "bloat"), (_cache_loss, "cache_loss"))


def advise(log: LogReader, settings: Settings, prices: PriceBook, since: datetime,
           until: datetime | None, now: datetime) -> dict[str, Any]:
    """Recommendations ranked by dollars, with the caching, driver and calendar tables."""
    end = until or now
    calls = read_calls(log, settings, prices, since, until)
    caching = cache_use(calls)
    losses = [{"feature": c["feature"], "provider": c["provider"], "model": c["model"],
               "savings_usd": -c["saved_usd"], "hit_rate": c["hit_rate"],
               "evidence": {k: c[k] for k in ("calls", "prompt_tokens", "cached_tokens",
                                              "cache_write_tokens", "hit_rate", "saved_usd")}}
              for c in caching if c["saved_usd"] < 0]
    found = {"cache_loss": losses, "uncached": uncached_repeats(calls),
             "models": smaller_models(calls, prices),
             "tiers": cheaper_tiers(calls), "loops": looping_traces(calls),
             "failed": failed_spend(calls), "bloat": prompt_bloat(calls, since, end)}
    recommendations = []
    for describe, name in ANALYSES:
        for item in found[name]:
            kind, action = describe(item)
            recommendations.append({"kind": kind, "action": action, **item})
    recommendations.sort(key=lambda r: (-r["savings_usd"], r["kind"]))
    for rank, item in enumerate(recommendations, 1):
        item["rank"] = rank
    calendar = price_calendar(calls, prices, since, end, now)
    return {
        "window": {"since": _iso(since), "until": _iso(end),
                   "days": round((end - since) / timedelta(days=1), 2),
                   "calls": len(calls), "cost_usd": sum((c.cost for c in calls), ZERO)},
        "recommendations": recommendations,
        "savings_usd": sum((r["savings_usd"] for r in recommendations), ZERO),
        "caching": caching,
        "drivers": feature_table(calls),
        "calendar": calendar,
        "forecast": _forecast(log, now, calendar),
        "anomalies": _anomalies(settings.storage.usage_log),
    }


def _anomalies(usage_log: str) -> list[dict[str, Any]]:
    """Spend anomalies still open (proxy.anomaly keeps them in the usage log's database);
    none when that table is not there yet: the advice never fails for want of it."""
    from proxy.storage.anomalies import open_anomalies

    try:
        with open_anomalies(usage_log) as store:
            return [a.to_json() for a in store.active()]
    except Exception:  # an older log, or a database the advice may not write to
        return []


def _forecast(log: LogReader, now: datetime, calendar: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """This month's forecast (proxy.forecast) and next month's at the current run rate,
    each with the announced price changes applied."""
    from proxy.forecast import forecast_month, month_bounds

    total = forecast_month(log, now, [], 1)["total"]
    this = Decimal(str(total["forecast_usd"]))
    start, end = month_bounds(now)
    next_days = (month_bounds(end)[1] - end).days
    following = (Decimal(str(total["daily_rate_usd"])) * next_days).quantize(Decimal("1e-4"))
    this_effect = sum((c["this_month_effect_usd"] for c in calendar), ZERO)
    next_effect = sum((c["next_month_effect_usd"] for c in calendar), ZERO)
    return {"this_month": start.strftime("%Y-%m"), "this_month_usd": this,
            "this_month_with_changes_usd": this + this_effect,
            "next_month": end.strftime("%Y-%m"), "next_month_usd": following,
            "next_month_with_changes_usd": following + next_effect}


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
