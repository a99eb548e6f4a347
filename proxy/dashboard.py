"""The dashboard page: one server-rendered HTML document, no JavaScript, no CDN.

It draws the report (`proxy.report`) and the live budget balances: spend over time as an
inline SVG chart, spend by customer, feature and model, budgets with their bars, the
month's forecast, top traces and unpriced models. Every value from the log or the
config is escaped: customer names and tags are user input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from decimal import Decimal
from html import escape
from typing import Any
from urllib.parse import urlencode

from proxy.report import pct, usd

WINDOWS = ("24h", "7d", "30d", "90d")
BUDGETS_SHOWN = 8


def e(value: Any) -> str:
    """Text for HTML, escaped (quotes too, so it is safe in attributes)."""
    return escape("" if value is None else str(value), quote=True)


def render_page(report: dict[str, Any], budgets: list[dict[str, Any]], window: str,
                settings_source: str = "", advice: dict[str, Any] | None = None) -> str:
    """The whole page for a report, the live budget balances and the savings advice."""
    t = report["totals"]
    f = report["forecast"]
    body = [
        _header(report, window),
        _cards(t, f, window),
        _section("Spend per day", _chart(report["daily"], f), wide=True,
                 note=_chart_note(report, f)),
        '<div class="grid">',
        _section("By customer", _spend_table(report["by_customer"], "customer", t)),
        _section("By feature", _spend_table(report["by_feature"], "feature", t)),
        _section("By model", _model_table(report["by_model"], t)),
        _section("Budgets", _budgets(budgets, f["budgets"])),
        _section(f"Forecast for {month_name(f['month'])}", _forecast_table(f)),
        _section("Top traces", _spend_table(report["top_traces"], "trace_id", t, mono=True)),
        _section("Unpriced models", _unpriced(report["unpriced"])),
        _section("Unit economics", _unit_economics(report["unit_economics"])),
        "</div>",
        _section("Savings advice", _advice(advice), wide=True) if advice is not None else "",
        f'<footer>meterproxy &middot; config {e(settings_source)} &middot; '
        f'generated {e(report["generated_at"])}</footer>',
    ]
    return PAGE.format(css=CSS, body="\n".join(body))


def login_page(message: str = "") -> str:
    """Asked for when there is no session: a plain POST form (the key never goes in a URL,
    so never in an access log), no script needed."""
    note = f'<p class="error">{e(message)}</p>' if message else ""
    return PAGE.format(css=CSS, body=f"""
<div class="login"><h1>meterproxy</h1><p>Enter the admin key to open the dashboard.</p>
{note}<form method="post" action="/_meter/login"><input type="password" name="key"
 autocomplete="current-password" aria-label="admin key" autofocus>
<button type="submit">Open</button></form></div>""")


# --- parts -----------------------------------------------------------------------------

def _header(report: dict[str, Any], window: str) -> str:
    links = " ".join(
        f'<a href="?{urlencode({"since": w})}"{" class=on" if w == window else ""}>{w}</a>'
        for w in WINDOWS)
    since = e(urlencode({"since": report["since"]}))
    return f"""<header><div><h1>meterproxy</h1>
<span class="muted">spend since {e(report['since'][:16].replace('T', ' '))} UTC</span></div>
<nav>{links}<a class="plain" href="/_meter/report?{since}">report JSON</a>
<a class="plain" href="/_meter/export.csv?{since}">export CSV</a></nav></header>"""


def _cards(t: dict[str, Any], f: dict[str, Any], window: str) -> str:
    ft = f["total"]
    cards = [
        (f"Spend, last {window}" if window in WINDOWS else "Spend", usd(t["cost_usd"]),
         f"{t['calls']:,} calls"),
        (f"{month_name(f['month']).split()[0]} so far", usd(ft["spent_usd"]),
         f"run rate {usd(ft['daily_rate_usd'])}/day"),
        ("Month forecast", usd(ft["forecast_usd"]),
         f"{band(ft['low_usd'], ft['high_usd'])} (90%)"),
        ("Cache hit rate", pct(t["cache_hit_rate"]), "of prompt tokens"),
        ("Error rate", pct(t["error_rate"]), f"{t['errors']:,} failed calls"),
        ("Budget refusals", f"{t['refusals']:,}", f"{t['unpriced_calls']:,} unpriced calls"),
    ]
    items = "".join(f'<div class="card"><div class="label">{e(label)}</div>'
                    f'<div class="value">{e(value)}</div><div class="sub">{sub}</div></div>'
                    for label, value, sub in cards)
    return f'<div class="cards">{items}</div>'


def _section(title: str, content: str, wide: bool = False, note: str = "") -> str:
    cls = "panel wide" if wide else "panel"
    note_html = f'<span class="muted">{note}</span>' if note else ""
    return f'<section class="{cls}"><h2>{e(title)} {note_html}</h2>{content}</section>'


def _chart_note(report: dict[str, Any], f: dict[str, Any]) -> str:
    legend = ('<i class="key bar"></i>weekdays <i class="key weekend"></i>weekends')
    if f.get("projected"):
        legend += ' <i class="key proj"></i>forecast to the month\'s end'
    return legend


def nice_ceiling(value: float) -> float:
    """The next round number (1, 2, 2.5, 5 x 10^k) at or above value, for an axis."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def band(low: Any, high: Any) -> str:
    """A forecast band, by the same money rule as every other figure."""
    return f"{e(usd(low))} &ndash; {e(usd(high))}"


# Axis labels are 11px text: at most this wide per character in the page's sans-serif
# (digits and `$` are 0.64em in DejaVu Sans, the widest fallback: 7px; `,` and `.` half
# that), so the axis makes room for the widest label with a margin.
LABEL_PX_PER_CHAR = 7.5


def month_name(month: str) -> str:
    return date.fromisoformat(f"{month}-01").strftime("%B %Y")


def _chart(daily: Sequence[dict[str, Any]], f: dict[str, Any]) -> str:
    """Bars of spend per day, and the month's projected days as pale bars."""
    # Amounts stay Decimal for the labels; only the geometry uses floats.
    spent = [(date.fromisoformat(r["day"]), Decimal(r["cost_usd"])) for r in daily]
    projected = [(date.fromisoformat(d), Decimal(v)) for d, v in f.get("projected", [])]
    today = f["as_of"][:10]
    spent_days = {d for d, _ in spent}
    bars = [(d, v, False) for d, v in spent]
    bars += [(d, v, True) for d, v in projected if d not in spent_days or d.isoformat() == today]
    if not bars:
        return '<p class="empty">No calls in this window yet.</p>'
    first = min(d for d, _, _ in bars)
    last = max(d for d, _, _ in bars)
    ndays = (last - first).days + 1
    stacked: dict[date, list[tuple[Decimal, bool]]] = {}
    for d, v, proj in bars:
        stacked.setdefault(d, []).append((v, proj))
    top = nice_ceiling(float(max(sum(v for v, _ in parts) for parts in stacked.values())) * 1.05)
    ticks = [usd(Decimal(repr(top)) * i / 4) for i in range(5)]
    # The labels end 8px left of the axis: the axis sits where the widest one fits.
    w, h, bottom, right = 1120, 240, 26, 8
    left = math.ceil(8 + 6 + LABEL_PX_PER_CHAR * max(len(t) for t in ticks))
    plot_w, plot_h = w - left - right, h - bottom - 10
    step = plot_w / ndays
    bar_w = max(step * 0.72, 1.0)
    out = [f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
           f'aria-label="spend per day">']
    for i, tick in enumerate(ticks):
        y = 10 + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'class="{"axis" if i == 0 else "grid"}"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" class="ylabel">'
                   f'{e(tick)}</text>')
    label_every = max(1, math.ceil(ndays / 15))
    for i in range(ndays):
        d = first + timedelta(days=i)
        x = left + i * step + (step - bar_w) / 2
        base = 10 + plot_h
        for value, proj in stacked.get(d, []):
            bar_h = plot_h * float(value) / top if top else 0
            base -= bar_h
            kind = "proj" if proj else ("weekend" if d.weekday() >= 5 else "bar")
            label = "forecast" if proj else "spent"
            out.append(f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" '
                       f'height="{max(bar_h, 0):.1f}" class="{kind}"><title>{e(d.isoformat())}'
                       f' {label} {e(usd(value))}</title></rect>')
        if i % label_every == 0:
            out.append(f'<text x="{left + i * step + step / 2:.1f}" y="{h - 8}" '
                       f'class="xlabel">{e(d.strftime("%b %-d"))}</text>')
    out.append("</svg>")
    return "".join(out)


def _bar(fraction: float, kind: str = "") -> str:
    width = max(0.0, min(fraction, 1.0)) * 100
    return (f'<div class="meter {kind}"><span style="width:{width:.1f}%"></span></div>')


def _spend_table(rows: Iterable[dict[str, Any]], key: str, totals: dict[str, Any],
                 mono: bool = False) -> str:
    rows = list(rows)
    if not rows:
        return '<p class="empty">No calls in this window.</p>'
    total = totals["cost_usd"] or Decimal(0)
    top = max((r["cost_usd"] for r in rows), default=Decimal(0)) or Decimal(1)
    lines = []
    for r in rows:
        name = r[key]
        label = '<span class="none">(none)</span>' if name is None else e(name)
        cls = ' class="mono"' if mono else ""
        share = pct(float(r["cost_usd"] / total)) if total else "-"
        lines.append(f'<tr><td{cls}>{label}{_bar(float(r["cost_usd"] / top))}</td>'
                     f'<td class="num">{r["calls"]:,}</td>'
                     f'<td class="num">{e(usd(r["cost_usd"]))}</td>'
                     f'<td class="num muted">{e(share)}</td></tr>')
    return (f'<table><thead><tr><th>{e(key)}</th><th class="num">calls</th>'
            f'<th class="num">cost</th><th class="num">share</th></tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table>')


def _model_table(rows: list[dict[str, Any]], totals: dict[str, Any]) -> str:
    if not rows:
        return '<p class="empty">No calls in this window.</p>'
    top = max((r["cost_usd"] for r in rows), default=Decimal(0)) or Decimal(1)
    lines = []
    for r in rows:
        lines.append(f'<tr><td>{e(r["model"])} <span class="muted">{e(r["provider"])}</span>'
                     f'{_bar(float(r["cost_usd"] / top))}</td>'
                     f'<td class="num">{r["calls"]:,}</td>'
                     f'<td class="num">{e(pct(r["cache_hit_rate"]))}</td>'
                     f'<td class="num">{e(usd(r["cost_usd"]))}</td></tr>')
    return ('<table><thead><tr><th>model</th><th class="num">calls</th>'
            '<th class="num">cache hits</th><th class="num">cost</th></tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table>')


def _budgets(live: list[dict[str, Any]], forecasts: list[dict[str, Any]]) -> str:
    """Each budget period: spent (and held) against the limit, with the forecast marked."""
    projected = {(b["scope"], b["period"], b["name"]): b for b in forecasts}
    rows = []
    for b in live:
        limit = b.get("limit_usd")
        if limit is None:
            continue
        limit_f = float(limit)
        spent = float(b["spent_usd"])
        fc = projected.get((b["scope"], b["period"], b["name"]))
        rows.append((spent / limit_f if limit_f else 1.0, b, limit_f, fc))
    if not rows:
        return '<p class="empty">No budgets configured.</p>'
    # Most at risk first: by what is spent, or by what the forecast says will be.
    rows.sort(key=lambda r: -max(r[0], (r[3]["forecast_share"] or 0) if r[3] else 0))
    out = []
    for share, b, limit_f, fc in rows[:BUDGETS_SHOWN]:
        held_usd = b.get("reserved_usd") or Decimal(0)
        held = float(held_usd)
        forecast = float(fc["forecast_usd"]) if fc else None
        state = "over" if share >= 1 else "warn" if share >= 0.8 or (
            forecast is not None and forecast >= limit_f) else "ok"
        held_w = max(0.0, min(held / limit_f, 1 - min(share, 1))) * 100 if limit_f else 0
        marker = ""
        if forecast is not None and limit_f:
            pos = min(forecast / limit_f, 1.0) * 100
            marker = (f'<i class="marker" style="left:{pos:.1f}%" '
                      f'title="forecast {e(usd(fc["forecast_usd"]))}"></i>')
        runs_out = ""
        if fc and fc["exhausted_on"]:
            runs_out = f' &middot; <b class="over">runs out {e(fc["exhausted_on"])}</b>'
        elif fc:
            runs_out = f" &middot; forecast {e(usd(fc['forecast_usd']))}"
        title = (f"{b['name']}: " if b.get("name") else "") + b["scope"]
        out.append(
            f'<div class="budget {state}"><div class="line"><span>{e(title)}</span>'
            f'<span class="num">{e(usd(b["spent_usd"]))} / {e(usd(limit))}</span></div>'
            f'<div class="track"><span class="fill" style="width:{min(share, 1) * 100:.1f}%">'
            f'</span><span class="held" style="width:{held_w:.1f}%"></span>{marker}</div>'
            f'<div class="sub">{e(b["period"])} &middot; {e(pct(share))} used'
            f'{" &middot; " + e(usd(held_usd)) + " held" if held else ""}{runs_out}'
            f' &middot; resets {e((b.get("resets_at") or "never")[:10])}</div></div>')
    if len(rows) > BUDGETS_SHOWN:
        out.append(f'<p class="muted small">and {len(rows) - BUDGETS_SHOWN} more, less at risk '
                   '(<a href="/_meter/budgets">all budgets</a>)</p>')
    return "".join(out)


def _forecast_table(f: dict[str, Any]) -> str:
    ft = f["total"]
    rows = [("total", ft)] + [(c["customer"], c) for c in f["customers"][:8]]
    lines = "".join(
        f'<tr><td>{"<b>total</b>" if i == 0 else e(name)}</td>'
        f'<td class="num">{e(usd(r["spent_usd"]))}</td>'
        f'<td class="num"><b>{e(usd(r["forecast_usd"]))}</b></td>'
        f'<td class="num muted">{band(r["low_usd"], r["high_usd"])}</td></tr>'
        for i, (name, r) in enumerate(rows))
    return ('<table><thead><tr><th>scope</th><th class="num">spent</th>'
            f'<th class="num">forecast</th><th class="num">90% band</th></tr></thead>'
            f'<tbody>{lines}</tbody></table>'
            f'<p class="muted small">Month ends {e(f["month_end"])}; from the daily run rate '
            'with a day-of-week pattern and the last four weeks\' trend.</p>')


def _unpriced(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="empty ok">Every call was priced.</p>'
    lines = "".join(f'<tr><td>{e(r["model"])} <span class="muted">{e(r["provider"])}</span></td>'
                    f'<td class="num">{r["calls"]:,}</td>'
                    f'<td class="num muted">{e((r["last_ts"] or "")[:16].replace("T", " "))}'
                    f'</td></tr>' for r in rows)
    return ('<table><thead><tr><th>model</th><th class="num">calls</th>'
            f'<th class="num">last seen</th></tr></thead><tbody>{lines}</tbody></table>'
            '<p class="muted small">Proxied and logged with no cost: add a price '
            '(pricing.overrides) and run meterproxy reprice.</p>')


def _unit_economics(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ('<p class="empty">No customer plans configured (customers: in the '
                'config).</p>')
    lines = "".join(
        f'<tr class="{"flag" if r["flagged"] else ""}"><td>{e(r["customer"])}</td>'
        f'<td class="num">{e(usd(r["cost_usd"]))}</td>'
        f'<td class="num">{e(usd(r["price_usd"]))}</td>'
        f'<td class="num">{e(usd(r["margin_usd"]))}</td>'
        f'<td class="num">{e(pct(r["cost_share"]))}{" &#9888;" if r["flagged"] else ""}</td>'
        f'</tr>' for r in rows)
    return ('<table><thead><tr><th>customer</th><th class="num">AI cost</th>'
            '<th class="num">price</th><th class="num">margin</th>'
            f'<th class="num">cost/price</th></tr></thead><tbody>{lines}</tbody></table>')


ADVICE_SHOWN = 5


def _advice(advice: dict[str, Any]) -> str:
    """The advisor's top recommendations: dollars, kind, what to do."""
    if "too_many" in advice:
        return (f'<p class="empty">{advice["too_many"]:,} calls in this window: too many to '
                'advise on while the page loads. Run meterproxy advise, or open '
                '/_meter/advise.</p>')
    recs = advice["recommendations"][:ADVICE_SHOWN]
    if not recs:
        return '<p class="empty ok">Nothing in this window would have cost less.</p>'
    lines = "".join(f'<tr><td class="num">{e(usd(r["savings_usd"]))}</td>'
                    f'<td class="muted">{e(r["kind"])}</td><td>{e(r["action"])}</td></tr>'
                    for r in recs)
    more = len(advice["recommendations"]) - len(recs)
    note = f" and {more} more" if more > 0 else ""
    return ('<table><thead><tr><th class="num">saves</th><th>kind</th><th>what to do</th>'
            f'</tr></thead><tbody>{lines}</tbody></table>'
            f'<p class="muted small">{e(usd(advice["savings_usd"]))} in all{e(note)}: '
            'meterproxy advise (or /_meter/advise) has the evidence.</p>')


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>meterproxy</title><style>{css}</style></head>
<body><main>{body}</main></body></html>"""

CSS = """
:root{--ink:#1d2430;--muted:#6b7280;--line:#e6e8ec;--bg:#f5f6f8;--card:#fff;
--blue:#2f6fed;--blue2:#9dbcf7;--green:#1f9d55;--amber:#d98a04;--red:#d93b3b}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:20px 24px 40px}
header{display:flex;justify-content:space-between;align-items:flex-end;gap:16px;
flex-wrap:wrap;margin-bottom:16px}
h1{font-size:22px;margin:0 12px 0 0;display:inline-block;letter-spacing:-.01em}
h2{font-size:14px;margin:0 0 12px;font-weight:600;display:flex;gap:10px;align-items:baseline;
justify-content:space-between}
nav a{display:inline-block;padding:5px 11px;margin-left:4px;border:1px solid var(--line);
border-radius:999px;background:var(--card);color:var(--ink);text-decoration:none}
nav a.on{background:var(--ink);color:#fff;border-color:var(--ink)}
nav a.plain{border-color:transparent;background:none;color:var(--blue)}
.muted{color:var(--muted);font-weight:400}.small{font-size:12px;margin:8px 0 0}
.cards{display:grid;grid-template-columns:repeat(6,1fr);gap:12px;margin-bottom:12px}
.card,.panel{background:var(--card);border:1px solid var(--line);border-radius:10px}
.card{padding:12px 14px}.card .label{color:var(--muted);font-size:12px}
.card .value{font-size:22px;font-weight:650;margin:2px 0;font-variant-numeric:tabular-nums;
letter-spacing:-.01em}
.card .sub{color:var(--muted);font-size:12px}
.panel{padding:14px 16px;min-width:0}.wide{margin-bottom:12px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th{font-weight:500;color:var(--muted);font-size:12px;text-align:left;
border-bottom:1px solid var(--line);padding:4px 6px}
td{padding:5px 6px;border-bottom:1px solid #f0f1f3;vertical-align:top;
overflow-wrap:anywhere}
tr:last-child td{border-bottom:0}
.num{text-align:right;white-space:nowrap}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:12px}
.none{color:var(--muted);font-style:italic}
.meter{height:4px;background:#eef1f6;border-radius:2px;margin-top:4px}
.meter span{display:block;height:100%;background:var(--blue);border-radius:2px}
.chart{width:100%;height:auto;display:block}
.chart .bar{fill:var(--blue)}.chart .weekend{fill:#5b8ff2}
.chart .proj{fill:var(--blue2);opacity:.55}
.chart .grid{stroke:#eef0f3}.chart .axis{stroke:#c9ced6}
.chart text{fill:var(--muted);font-size:11px}.chart .ylabel{text-anchor:end}
.chart .xlabel{text-anchor:middle}
i.key{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px;
vertical-align:-1px}
i.key.bar{background:var(--blue)}i.key.weekend{background:#5b8ff2}
i.key.proj{background:var(--blue2);opacity:.8}
.budget{padding:6px 0 10px;border-bottom:1px solid #f0f1f3}.budget:last-child{border:0}
.budget .line{display:flex;justify-content:space-between;gap:10px}
.budget .sub{color:var(--muted);font-size:12px;margin-top:3px}
.track{position:relative;height:10px;background:#eef1f6;border-radius:5px;margin-top:5px;
overflow:hidden;display:flex}
.track .fill{background:var(--green);height:100%}
.track .held{height:100%;background:repeating-linear-gradient(45deg,#c7d2e4 0 4px,#e3e9f3 4px 8px)}
.budget.warn .fill{background:var(--amber)}.budget.over .fill{background:var(--red)}
.marker{position:absolute;top:0;bottom:0;width:2px;margin-left:-1px;background:var(--ink)}
b.over{color:var(--red)}
tr.flag td{background:#fff4f4}
.empty{color:var(--muted);margin:0}.empty.ok{color:var(--green)}
footer{color:var(--muted);font-size:12px;margin-top:18px;text-align:center}
.login{max-width:360px;margin:14vh auto;background:var(--card);border:1px solid var(--line);
border-radius:12px;padding:28px}
.login input{width:100%;padding:9px 10px;border:1px solid var(--line);border-radius:8px;
font:inherit;margin:8px 0 12px}
.login button{padding:8px 16px;border:0;border-radius:8px;background:var(--ink);color:#fff;
font:inherit;cursor:pointer}
.error{color:var(--red)}
@media (max-width:900px){.cards{grid-template-columns:repeat(2,1fr)}
.grid{grid-template-columns:1fr}}
"""
