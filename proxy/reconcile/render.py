"""The reconciliation for people: the cells, unmetered spend, and each drift explained."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from proxy.output import table
from proxy.reconcile.compare import Reconciliation, to_days
from proxy.timeparse import parse_time

MAX_RANGE = timedelta(days=366)


def reconcile_range(since: str | None, until: str | None, now: datetime) -> tuple[date, date]:
    """Whole UTC days from the options: until defaults to today 00:00 (complete days only)."""
    start = parse_time(since or "7d", now)
    end = parse_time(until, now) if until else datetime.combine(now.date(), datetime.min.time(),
                                                                now.tzinfo)
    if end <= start:
        raise ValueError("--until must be after --since")
    if end - start > MAX_RANGE:
        raise ValueError(f"reconcile at most {MAX_RANGE.days} days at a time")
    return to_days(start, end)


def render_text(result: Reconciliation) -> str:
    data = result.to_json()
    totals = data["totals"]
    out = [f"{result.provider}: {data['since']} to {data['until']} (exclusive), tolerance "
           f"{data['tolerance_pct']}%: {data['status'].upper()}, "
           f"{data['cells_outside_tolerance']} cell(s) outside",
           f"billed ${totals['provider_cost_usd']}, metered ${totals['metered_cost_usd']}, "
           f"difference ${totals['diff_cost_usd']}; unmetered spend "
           f"${totals['unmetered_cost_usd']}; metered but not billed "
           f"${totals['metered_not_billed_usd']}", ""]
    rows = [{**{k: v for k, v in r.items() if k not in ("within_tolerance", "note")},
             "ok": "yes" if r["within_tolerance"] else "NO", "note": r["note"]}
            for r in data["cells"]]
    out.append(table(rows))
    if data["unmetered"]:
        out += ["", "Unmetered spend (billed to keys or projects the proxy does not use):",
                table(data["unmetered"])]
    for drift in data["drifts"]:
        out += ["", f"Drift in {drift['model']}:"]
        for c in drift["classes"]:
            unit = "per 1,000 requests" if c["rate_unit"] == "usd_per_1000_requests" else \
                "per 1M tokens"
            out.append(f"  {c['token_class']}: the bill implies ${c['implied_rate']} {unit}, "
                       f"the meter used ${c['metered_rate']} ({len(c['days'])} day(s) from "
                       f"{c['days'][0]}{', steady' if c['steady'] else ', not steady'})")
        if drift["yaml"]:
            out += ["  To agree, add to the configuration:",
                    *("    " + line for line in drift["yaml"].splitlines()),
                    f"  then `meterproxy reprice --since {_since(drift)}` would change the "
                    f"logged cost by ${drift['reprice_change_usd']}."]
    return "\n".join(out)


def _since(drift: dict) -> str:
    return next(iter(drift["override"].values()))["effective_from"]
