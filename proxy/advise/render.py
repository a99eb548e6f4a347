"""The advisor's answers for people (text) and machines (JSON with exact decimal strings)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from proxy import money
from proxy.money import usd
from proxy.output import render


def to_json(data: Any) -> bytes:
    """JSON with every Decimal as an exact decimal string (proxy.money: never a float)."""
    return money.dumps(data, indent=True)


def _evidence(evidence: dict[str, Any]) -> str:
    parts = []
    for key, value in evidence.items():
        if isinstance(value, dict):
            money = key.endswith("usd")
            value = ", ".join(f"{k} {usd(v) if money and isinstance(v, Decimal) else v}"
                              for k, v in value.items())
        elif isinstance(value, Decimal) and key.endswith("usd"):
            value = usd(value)
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return "; ".join(parts)


def advice_text(data: dict[str, Any]) -> str:
    """Ranked recommendations with their evidence, then the calendar and the drivers."""
    w = data["window"]
    lines = [f"Savings advice for {w['since']} to {w['until']} ({w['days']:g} days, "
             f"{w['calls']:,} calls, {usd(w['cost_usd'])} spent)", ""]
    recs = data["recommendations"]
    if not recs:
        lines.append("No recommendation: nothing in this window would have cost less.")
    else:
        lines.append(f"{len(recs)} recommendation(s), {usd(data['savings_usd'])} in all:")
        for r in recs:
            lines.append(f"{r['rank']:>3}. saves {usd(r['savings_usd'])}  [{r['kind']}]  "
                         f"{r['action']}")
            lines.append(f"     evidence: {_evidence(r['evidence'])}")
    if data["anomalies"]:
        lines += ["", f"{len(data['anomalies'])} open spend anomal"
                  f"{'y' if len(data['anomalies']) == 1 else 'ies'} (meterproxy anomalies):"]
        lines += [f"  {a['id']}  {a['scope']}={a['value']}  {a['state']}, observed "
                  f"{usd(Decimal(a['observed_usd']))} against a baseline of "
                  f"{usd(Decimal(a['baseline_usd']))}" for a in data["anomalies"]]
    if data["caching"]:
        lines += ["", "Prompt caching in use:"]
        lines.append(render([{"feature": c["feature"], "model": c["model"],
                              "calls": c["calls"], "hit_rate": f"{c['hit_rate'] * 100:.1f}%",
                              "saved": usd(c["saved_usd"])} for c in data["caching"]],
                            "table"))
    if data["calendar"]:
        lines += ["", "Announced price changes (next 90 days):"]
        for c in data["calendar"]:
            lines.append(f"  {c['effective_from']}  {c['model']}: {c['change_pct']:+}% on this "
                         f"window's calls; this month {usd(c['this_month_effect_usd'])}, next "
                         f"month {usd(c['next_month_effect_usd'])}")
        f = data["forecast"]
        lines.append(f"  forecast {f['this_month']}: {usd(f['this_month_usd'])} -> "
                     f"{usd(f['this_month_with_changes_usd'])}; {f['next_month']}: "
                     f"{usd(f['next_month_usd'])} -> {usd(f['next_month_with_changes_usd'])}")
    if data["drivers"]:
        lines += ["", "Drivers by feature:"]
        lines.append(render([{"feature": d["feature"], "calls": d["calls"],
                              "cost": usd(d["cost_usd"]),
                              "prompt/call": d["prompt_tokens"] // d["calls"],
                              "output/input": d["output_per_input"],
                              "reasoning": d["reasoning_share"],
                              "failed cost": usd(d["failed_cost_usd"])}
                             for d in data["drivers"]], "table"))
    return "\n".join(lines)


def whatif_text(data: dict[str, Any]) -> str:
    """Per feature: cost as priced, cost repriced, the difference."""
    mapping = ", ".join(f"{a} -> {b}" for a, b in data["mapping"].items()) or "every model"
    tier = f" on the {data['tier']} tier" if data["tier"] else ""
    rows = [{"feature": r["feature"], "calls": r["calls"], "repriced": r["repriced"],
             "now": usd(r["before_usd"]), "what_if": usd(r["after_usd"]),
             "difference": usd(r["delta_usd"]),
             "not_repriced": ", ".join(f"{n} {k}" for k, n in r["skipped"].items()) or "-"}
            for r in (*data["features"], data["total"])]
    return f"What if {mapping}{tier}:\n" + render(rows, "table")
