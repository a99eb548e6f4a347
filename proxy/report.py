"""The spend report: where the money went, what is wrong, and what the month will cost.

One function gathers every section from the usage log's reader (a few queries, run on a
small thread pool with a connection each); the CLI prints it as text, the admin API returns it
as JSON, and the dashboard draws it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy import forecast, money, query
from proxy.budgets import budgets_from
from proxy.config import Settings
from proxy.outcome import Outcome
from proxy.output import table
from proxy.query import UsageQuery
from proxy.storage.readers import LogReader
from proxy.timeparse import to_ts

Opener = Callable[[], LogReader]
DAYS_PER_MONTH = Decimal("30.436875")  # the Gregorian average: prorates a monthly price
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Window:
    """The report's time range, with `now` for relative ranges and the forecast."""

    since: datetime
    until: datetime | None
    now: datetime

    @property
    def days(self) -> Decimal:
        end = self.until or self.now
        return Decimal(max((end - self.since).total_seconds(), 0)) / 86400

    def q(self, **kwargs: Any) -> UsageQuery:
        return UsageQuery(since=self.since, until=self.until, **kwargs)


def _sections(window: Window, settings: Settings, top: int) -> dict[str, Callable]:
    """Each section as a function of a LogReader; they run independently."""
    customers = sorted(settings.customers)

    def usage(**kw: Any) -> Callable[[LogReader], Any]:
        return lambda log: log.usage(window.q(**kw))

    sections: dict[str, Callable[[LogReader], Any]] = {
        "totals": lambda log: log.usage(window.q(durations=True))[0],
        "daily": usage(group_by=["day"], order_by="day", spend_only=True),
        "by_provider": usage(group_by=["provider"], exclude={"provider": ""}),
        "by_model": usage(group_by=["provider", "model"], exclude={"model": ""}, limit=top),
        "by_customer": usage(group_by=["customer"], limit=top),
        "by_feature": usage(group_by=["feature"], limit=top),
        "top_traces": usage(group_by=["trace_id"], exclude={"trace_id": ""}, limit=top),
        "unpriced": lambda log: log.unpriced_models(window.since, window.until),
        "refusals": usage(group_by=["customer", "feature"],
                          where={"outcome": Outcome.BUDGET_EXCEEDED}, order_by="calls",
                          limit=top),
        "errors": usage(group_by=["provider", "outcome"],
                        where={"outcome": list(query.ERROR_OUTCOMES)}, order_by="calls"),
        "forecast": lambda log: forecast.forecast_month(
            log, window.now, budgets_from(settings), top),
    }
    if customers:
        sections["plan_customers"] = usage(group_by=["customer"],
                                           where={"customer": customers})
    return sections


def build_report(open_log: Opener, settings: Settings, since: datetime,
                 until: datetime | None = None, now: datetime | None = None, top: int = 10,
                 workers: int = 3) -> dict[str, Any]:
    """Every section of the report, as plain data (Decimals for exact money)."""
    now = now or datetime.now(UTC)
    window = Window(since, until, now)
    sections = _sections(window, settings, top)

    def run(fn: Callable[[LogReader], Any]) -> Any:
        with open_log() as log:
            return fn(log)

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        futures = {name: pool.submit(run, fn) for name, fn in sections.items()}
        data = {name: f.result() for name, f in futures.items()}
    report: dict[str, Any] = {
        "since": to_ts(since), "until": to_ts(until) if until else None,
        "generated_at": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **data,
    }
    report["unit_economics"] = unit_economics(data.pop("plan_customers", []), settings,
                                              window)
    report.pop("plan_customers", None)
    return report


def unit_economics(rows: list[dict[str, Any]], settings: Settings,
                   window: Window) -> list[dict[str, Any]]:
    """Per configured customer: AI cost, the plan price over the same days, the margin,
    and a flag when the cost is more than `unit_economics.max_cost_share` of the price."""
    cost = {r["customer"]: r["cost_usd"] for r in rows}
    limit = Decimal(str(settings.unit_economics.max_cost_share))
    out = []
    for name, conf in sorted(settings.customers.items()):
        if conf.plan_usd is None:
            continue
        price = (Decimal(str(conf.plan_usd)) * window.days / DAYS_PER_MONTH).quantize(CENT)
        spent = cost.get(name, Decimal(0))
        share = spent / price if price else None
        over = share > limit if share is not None else spent > 0  # free plan, real cost
        out.append({"customer": name, "cost_usd": spent, "price_usd": price,
                    "margin_usd": price - spent,
                    "cost_share": float(round(share, 4)) if share is not None else None,
                    "flagged": over})
    out.sort(key=lambda r: -(r["cost_share"] if r["cost_share"] is not None else 1e9))
    return out


# --- text ------------------------------------------------------------------------------

def usd(value: Any) -> str:
    """Money for people: $1,234.567890, by the one rule every view uses (proxy.money)."""
    return money.usd(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _spend_table(rows: list[dict[str, Any]], keys: list[str], total: Decimal) -> str:
    shown = []
    for r in rows:
        line = {k: r[k] if r[k] is not None else "(none)" for k in keys}
        line.update({"calls": r["calls"], "cost": usd(r["cost_usd"]),
                     "share": pct(float(r["cost_usd"] / total)) if total else "-"})
        if "model" in keys:
            line["cache hit"] = pct(r["cache_hit_rate"])
        shown.append(line)
    return table(shown)


def render_text(report: dict[str, Any]) -> str:
    """The report as a readable page of text, for a terminal or an e-mail."""
    t = report["totals"]
    total = t["cost_usd"]
    until = report["until"] or report["generated_at"]
    out = [f"meterproxy report: {report['since'][:16]} to {until[:16]} UTC", ""]
    out.append(f"Spend       {usd(total)} over {t['calls']:,} calls "
               f"({t['unpriced_calls']:,} unpriced)")
    out.append(f"Tokens      {t['input_tokens']:,} input, {t['cached_input_tokens']:,} cached, "
               f"{t['cache_write_tokens']:,} cache writes, {t['output_tokens']:,} output "
               f"({t['reasoning_tokens']:,} reasoning)")
    out.append(f"Cache hits  {pct(t['cache_hit_rate'])} of prompt tokens read from cache")
    out.append(f"Errors      {t['errors']:,} ({pct(t['error_rate'])}); budget refusals "
               f"{t['refusals']:,}")
    if t.get("p50_ms") is not None:
        out.append(f"Latency     p50 {t['p50_ms']:,.0f} ms, p95 {t['p95_ms']:,.0f} ms")
    f = report["forecast"]
    ft = f["total"]
    out.append(f"Spent so far {usd(ft['spent_usd'])} in {f['month']}")
    out.append(f"Forecast    {f['month']}: {usd(ft['forecast_usd'])} = spent so far + "
               f"{usd(ft['projected_usd'])} projected (likely {usd(ft['low_usd'])} to "
               f"{usd(ft['high_usd'])}); run rate {usd(ft['daily_rate_usd'])}/day")
    for title, key, keys in (("Spend by provider", "by_provider", ["provider"]),
                             ("Spend by model", "by_model", ["provider", "model"]),
                             ("Spend by customer", "by_customer", ["customer"]),
                             ("Spend by feature", "by_feature", ["feature"]),
                             ("Top traces by cost", "top_traces", ["trace_id"])):
        out += ["", title, _spend_table(report[key], keys, total)]
    if report["unit_economics"]:
        out += ["", "Unit economics (plan price prorated to the report's days)"]
        out.append(table([{
            "customer": r["customer"], "AI cost": usd(r["cost_usd"]),
            "price": usd(r["price_usd"]), "margin": usd(r["margin_usd"]),
            "cost/price": pct(r["cost_share"]), "flag": "OVER" if r["flagged"] else ""}
            for r in report["unit_economics"]]))
    out += ["", "Unpriced models (proxied and logged, cost unknown: add a price)"]
    out.append(table([{"provider": r["provider"], "model": r["model"], "calls": r["calls"],
                       "last seen": (r["last_ts"] or "")[:16]} for r in report["unpriced"]])
               if report["unpriced"] else "none")
    out += ["", "Budget refusals"]
    out.append(table([{"customer": r["customer"] or "(none)", "feature": r["feature"] or "(none)",
                       "refused": r["calls"]} for r in report["refusals"]])
               if report["refusals"] else "none")
    if report["errors"]:
        out += ["", "Errors"]
        out.append(table([{"provider": r["provider"] or "(none)", "outcome": r["outcome"],
                           "calls": r["calls"]} for r in report["errors"]]))
    out += ["", f"Forecast for {f['month']} (to {f['month_end']}, 90% band)"]
    out.append(forecast_table([("total", ft)] + [(f"customer={c['customer']}", c)
                                                 for c in f["customers"]]))
    if f["budgets"]:
        out += ["", "Budgets (current period, projected to its end)"]
        out.append(budget_table(f["budgets"]))
    return "\n".join(out)


def forecast_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Spent so far (exact, as every view shows it), then the projection, labelled apart."""
    return table([{"scope": scope, "spent so far": usd(r["spent_usd"]),
                   "projected rest": usd(r["projected_usd"]), "forecast": usd(r["forecast_usd"]),
                   "90% band": f"{usd(r['low_usd'])} - {usd(r['high_usd'])}"}
                  for scope, r in rows])


def budget_table(rows: list[dict[str, Any]]) -> str:
    return table([{
        "budget": (f"{b['name']}: " if b["name"] else "") + b["scope"], "period": b["period"],
        "limit": usd(b["limit_usd"]), "spent so far": usd(b["spent_usd"]),
        "projected rest": usd(b["projected_usd"]), "forecast": usd(b["forecast_usd"]),
        "runs out": b["exhausted_on"] or ("at risk" if b["at_risk"] else "-"),
        "resets": b["resets_at"][:10]} for b in rows])
