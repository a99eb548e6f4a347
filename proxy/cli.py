"""The `meterproxy` command: parse arguments, call library functions, print."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.config import ConfigError, load_settings
from proxy.output import PrintableStream, printable, render
from proxy.timeparse import parse_time


class _Lazy:
    """A module imported on first use: `meterproxy --help` should not load aiohttp,
    sqlite-utils and the pricing tables (0.6 s) to print a page of text."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


query = _Lazy("proxy.query")
_pricing = _Lazy("proxy.pricing")
_runtime = _Lazy("proxy.runtime")
_readers = _Lazy("proxy.storage.readers")
_classes = _Lazy("proxy.token_classes")

FORMATS = ("table", "json", "csv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    stdout, sys.stdout = sys.stdout, PrintableStream(sys.stdout)
    try:
        return args.run(args) or 0
    except (ConfigError, ValueError, *_lazy_errors()) as exc:
        print(f"meterproxy: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout = stdout


def _lazy_errors() -> tuple[type[Exception], ...]:
    """What a command may end with, imported only while one is being handled: each is
    told in one line (a taken port, an unreadable log, a missing extra), no traceback."""
    import sqlite3

    from proxy.pricing import PricingError
    from proxy.query import QueryError
    from proxy.storage import LedgerUnavailable, LogUnavailable

    return (PricingError, QueryError, LogUnavailable, LedgerUnavailable, sqlite3.Error,
            OSError)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meterproxy")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterproxy",
        description="A cost-metering reverse proxy for LLM APIs.")
    parser.add_argument("--version", action="version", version=f"meterproxy {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML file (default: $METERPROXY_CONFIG, "
                        "else ./meterproxy.yaml, else built-in defaults)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the proxy")
    p.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: server.port, 8787)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N processes on one port (SO_REUSEPORT); N > 1 needs the Redis ledger")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("usage", parents=[common], help="aggregates from the usage log")
    p.add_argument("--since", help="ISO date or datetime, or relative 7d / 24h")
    p.add_argument("--until", help="ISO date or datetime (exclusive), or relative")
    p.add_argument("--group-by", default="", help="comma-separated: columns, day, hour, "
                   "week, month, tag:NAME")
    p.add_argument("--where", action="append", default=[], metavar="K=V",
                   help="filter on a column or tag:NAME: k=v keeps, k!=v drops, k= means "
                   "no value; repeat a name for any of several values")
    p.add_argument("--order-by", help="calls, cost_usd, a token class, errors, refusals, "
                   "cache_hit_rate, error_rate, p50_ms, p95_ms, or a group-by name")
    p.add_argument("--top", type=int, help="only the first N groups")
    p.add_argument("--durations", action="store_true",
                   help="add p50_ms and p95_ms (one more pass over the calls)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(run=cmd_usage)

    p = sub.add_parser("report", parents=[common],
                       help="a readable summary: spend by provider, model, customer, "
                       "feature; traces, unpriced calls, refusals, the forecast")
    p.add_argument("--since", default="30d", help="start (default 30d ago)")
    p.add_argument("--until", help="end, exclusive (default now)")
    p.add_argument("--top", type=int, default=10, help="rows per table (10)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("forecast", parents=[common],
                       help="month-end spend in total, per customer and per budget")
    p.add_argument("--as-of", help="forecast as if it were this time (default now)")
    p.add_argument("--top", type=int, default=10, help="customers shown (10)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(run=cmd_forecast)

    p = sub.add_parser("advise", parents=[common],
                       help="ranked savings with dollars and evidence (docs/advise.md)")
    p.add_argument("--since", default="30d", help="start (default 30d ago)")
    p.add_argument("--until", help="end, exclusive (default now)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(run=cmd_advise)

    p = sub.add_parser("whatif", parents=[common],
                       help="the window's calls repriced on another model or tier")
    p.add_argument("--map", action="append", default=[], metavar="FROM=TO",
                   help="reprice FROM's calls on TO (repeatable; * for every model)")
    p.add_argument("--tier", choices=("batch", "flex"),
                   help="at this service tier (alone: every call)")
    p.add_argument("--since", default="30d", help="start (default 30d ago)")
    p.add_argument("--until", help="end, exclusive (default now)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(run=cmd_whatif)

    p = sub.add_parser("budgets", parents=[common],
                       help="each budget: limit, spent, reserved, remaining, reset")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(run=cmd_budgets)

    p = sub.add_parser("explain", parents=[common], help="one call's row and how it was priced")
    p.add_argument("id")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_explain)

    keys = sub.add_parser("keys", help="virtual keys").add_subparsers(metavar="ACTION")
    p = keys.add_parser("new", help="print a new virtual key once, and its config line")
    p.add_argument("name")
    p.set_defaults(run=cmd_keys_new)

    pricing = sub.add_parser("pricing", help="the pricing tables").add_subparsers(
        metavar="ACTION")
    p = pricing.add_parser("show", parents=[common], help="the price in force for a model")
    p.add_argument("model")
    p.add_argument("--provider", default="openai", help="pricing table (default: openai)")
    p.add_argument("--at", help="a past or future time (default: now)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_pricing_show)
    p = pricing.add_parser("list", parents=[common], help="every priced model")
    p.add_argument("--provider", help="only this table")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(run=cmd_pricing_list)
    p = pricing.add_parser("check", parents=[common],
                           help="validate the tables; --unpriced lists unpriced models seen")
    p.add_argument("--unpriced", action="store_true",
                   help="also list models in the usage log that had no price")
    p.add_argument("--coverage", action="store_true",
                   help="fail for a model genai-prices prices that the tables lack "
                        "(and EXCEPTIONS.md does not list)")
    p.set_defaults(run=cmd_pricing_check)
    p = pricing.add_parser("sync", parents=[common],
                           help="add the models and price periods the tables lack")
    p.add_argument("--from", dest="source", choices=("genai-prices",), required=True)
    p.add_argument("--provider", help="only this table (or genai-prices provider id)")
    p.add_argument("--dry-run", action="store_true", help="report, write nothing")
    p.add_argument("--into", help="write into this overlay directory (default: pricing.dir "
                                  "if set, else the bundled tables)")
    p.set_defaults(run=cmd_pricing_sync)
    p = pricing.add_parser("diff", parents=[common],
                           help="compare the tables with another price database")
    p.add_argument("--against", choices=("genai-prices",), default="genai-prices")
    p.add_argument("--all", action="store_true", help="also show the listed exceptions")
    p.set_defaults(run=cmd_pricing_diff)

    p = sub.add_parser("reprice", parents=[common],
                       help="recompute logged costs after a pricing-table fix")
    p.add_argument("--since", required=True, help="ISO date or datetime, or relative 30d")
    p.add_argument("--until", help="ISO date or datetime (exclusive)")
    p.add_argument("--dry-run", action="store_true", help="report the change, write nothing")
    p.set_defaults(run=cmd_reprice)

    export = sub.add_parser("export", help="the usage log in a standard format").add_subparsers(
        metavar="FORMAT")
    p = export.add_parser("focus", parents=[common],
                          help="FOCUS 1.2 CostAndUsage rows for FinOps tools")
    p.add_argument("--since", help="ISO date or datetime, or relative 30d (default: all)")
    p.add_argument("--until", help="ISO date or datetime (exclusive), or relative")
    p.add_argument("--granularity", choices=("hour", "day"), default="day",
                   help="the charge period of a row (default: day)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv",
                   help="csv (default) or parquet (needs the parquet extra)")
    p.add_argument("--output", help="write here instead of stdout (required for parquet)")
    p.add_argument("--unpriced", choices=("omit", "include"), default="omit",
                   help="calls with no price: left out and counted on stderr (default; "
                   "FOCUS has no null cost), or listed with null costs and a note")
    p.set_defaults(run=cmd_export_focus)
    p = sub.add_parser("reconcile", parents=[common],
                       help="the meter against the provider's bill, per day x model x class")
    p.add_argument("--provider", required=True, help="openai, anthropic or gemini")
    p.add_argument("--since", default="7d", help="first day (default 7d ago)")
    p.add_argument("--until", help="end, exclusive, rounded up to a whole day (default: "
                   "today 00:00 UTC, so only complete days)")
    p.add_argument("--by", default="day,model", help="day and/or model (the token class is "
                   "always a dimension)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--tolerance-pct", type=Decimal, help="allowed difference in tokens and "
                   "dollars per cell (default: reconcile.tolerance_pct, 1)")
    p.add_argument("--billing-export", metavar="FILE",
                   help="gemini: a Cloud Billing export (JSON lines or CSV)")
    p.set_defaults(run=cmd_reconcile)

    p = sub.add_parser("anomalies", parents=[common],
                       help="open spend anomalies; --clear ID lifts one (and its block)")
    p.add_argument("--clear", metavar="ID", help="end this active anomaly")
    p.add_argument("--all", action="store_true",
                   help="also those that ended in the past 7 days")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(run=cmd_anomalies)

    p = sub.add_parser("demo", help="a simulated provider, the proxy and traffic; then a report")
    p.add_argument("--calls", type=int, default=36, help="how many calls to drive")
    p.add_argument("--keep", action="store_true", help="keep the demo database")
    p.set_defaults(run=cmd_demo)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve
    from proxy.logs import configure

    settings = load_settings(args.config)
    # One process: log lines are written off the event loop (workers write their own).
    configure(settings.logging.level, settings.logging.format, background=args.workers == 1)
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    if args.workers != 1:
        from proxy.workers import run_workers

        return run_workers(settings, host, port, args.workers)
    _run(serve(settings, host, port))
    return 0


def _run(coro: Any) -> None:
    """uvloop where it is installed (the `fast` extra), else asyncio's own loop;
    METERPROXY_EVENT_LOOP=asyncio chooses asyncio's anyway."""
    try:
        if os.environ.get("METERPROXY_EVENT_LOOP") == "asyncio":
            raise ImportError
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


# What `usage --format table` shows; json and csv carry every aggregate.
# (class parts other than reasoning, and unit charges, are in json and csv only).
TABLE_HIDDEN = (*(c.column for c in _classes.CLASSES if c.column != "reasoning_tokens"
                  and (c.within is not None or c.unit is _classes.Unit.REQUESTS)),
                "unpriced_calls", "errors", "refusals")


def cmd_usage(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    where, exclude = query.parse_filters(args.where)
    q = query.UsageQuery(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        group_by=[g.strip() for g in args.group_by.split(",") if g.strip()],
        where=where, exclude=exclude,
        order_by=args.order_by,
        limit=args.top,
        durations=args.durations,
    )
    with _readers.open_reader(settings.storage.usage_log) as log:
        rows = log.usage(q)
    if args.format == "table":
        rows = [{k: _rate(k, v) for k, v in r.items() if k not in TABLE_HIDDEN} for r in rows]
    print(render(rows, args.format))
    return 0


def _rate(name: str, value: Any) -> Any:
    return f"{value * 100:.1f}%" if name.endswith("_rate") and value is not None else value


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.report import build_report, render_text

    settings = load_settings(args.config)
    now = datetime.now(UTC)
    _readers.open_reader(settings.storage.usage_log).close()  # a missing log: one clear error
    data = build_report(lambda: _readers.open_reader(settings.storage.usage_log), settings,
                        parse_time(args.since, now),
                        parse_time(args.until, now) if args.until else None, now, args.top)
    if args.format == "json":
        _print_json(data)
    else:
        print(render_text(data))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    from proxy.budgets import budgets_from
    from proxy.forecast import forecast_month
    from proxy.report import budget_table, forecast_table, usd

    settings = load_settings(args.config)
    now = parse_time(args.as_of) if args.as_of else datetime.now(UTC)
    with _readers.open_reader(settings.storage.usage_log) as log:
        data = forecast_month(log, now, budgets_from(settings), args.top)
    if args.format == "json":
        _print_json(data)
        return 0
    money = ("spent_usd", "projected_usd", "forecast_usd", "low_usd", "high_usd")
    if args.format == "csv":
        # Tidy: one kind of thing per row, and a column that says which.
        tidy = [{"kind": "total", "name": "", **{k: data["total"][k] for k in money}}]
        tidy += [{"kind": "customer", "name": c["customer"], **{k: c[k] for k in money}}
                 for c in data["customers"]]
        tidy += [{"kind": "budget", "name": b["scope"], **{k: b[k] for k in money}}
                 for b in data["budgets"]]
        print(render(tidy, "csv"))
        return 0
    ft = data["total"]
    print(f"Forecast for {data['month']} (to {data['month_end']}, as of {data['as_of']}):")
    print(f"  spent so far {usd(ft['spent_usd'])}; projected rest {usd(ft['projected_usd'])}; "
          f"forecast {usd(ft['forecast_usd'])}, 90% band {usd(ft['low_usd'])} - "
          f"{usd(ft['high_usd'])}; run rate {usd(ft['daily_rate_usd'])}/day "
          f"({ft['history_days']} days of history)\n")
    print(forecast_table([("total", ft)] + [(f"customer={c['customer']}", c)
                                            for c in data["customers"]]))
    if data["budgets"]:
        print("\nBudgets (current period, projected to its end):")
        print(budget_table(data["budgets"]))
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from proxy.advise import advise
    from proxy.advise.render import advice_text, to_json

    settings = load_settings(args.config)
    now = datetime.now(UTC)
    prices = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    with _readers.open_reader(settings.storage.usage_log) as log:
        data = advise(log, settings, prices, parse_time(args.since, now),
                      parse_time(args.until, now) if args.until else None, now)
    print(to_json(data).decode() if args.format == "json" else advice_text(data))
    return 0


def cmd_whatif(args: argparse.Namespace) -> int:
    from proxy.advise import read_calls
    from proxy.advise.render import to_json, whatif_text
    from proxy.advise.repricing import parse_mapping, whatif

    if not args.map and not args.tier:
        raise ValueError("whatif needs --map FROM=TO, --tier, or both")
    settings = load_settings(args.config)
    now = datetime.now(UTC)
    prices = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    mapping = parse_mapping(args.map)
    with _readers.open_reader(settings.storage.usage_log) as log:
        calls = read_calls(log, settings, prices, parse_time(args.since, now),
                           parse_time(args.until, now) if args.until else None)
    data = whatif(calls, prices, mapping, args.tier)
    print(to_json(data).decode() if args.format == "json" else whatif_text(data))
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    """Spend per budget period from the usage log (a running proxy's holds are not in it:
    GET /_meter/budgets shows those)."""
    from proxy.budgets import budgets_from, current_periods, spend_from_log, status_row
    from proxy.storage.ledger import Balance

    settings = load_settings(args.config)
    budgets = [b for b in budgets_from(settings) if not b.per_trace]  # one per agent run
    now = datetime.now(UTC)
    with _readers.open_reader(settings.storage.usage_log) as log:
        totals = spend_from_log(log, budgets, now)
    rows = []
    for budget, scope, key, end in current_periods(budgets, {s for _, s in totals}, now):
        usd, count = totals.get((key, scope), (Decimal(0), 0))
        rows.append(status_row(budget, scope, Balance(spent_usd=usd, spent_tokens=count), end))
    print(render(rows, args.format))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from proxy import money

    settings = load_settings(args.config)
    with _readers.open_reader(settings.storage.usage_log) as log:
        found = query.explain(log, args.id)
    if found is None:
        print(f"meterproxy: no call {args.id} in the usage log", file=sys.stderr)
        return 1
    row = found.pop("row")
    if args.format == "json":
        _print_json({**row, "explain": found})
        return 0
    width = max(len(k) for k in row)
    for key, value in row.items():
        if key != "cost_breakdown":
            shown = orjson.dumps(value).decode() if isinstance(value, dict) else \
                money.exact(value) if isinstance(value, Decimal) else value
            print(f"{key.ljust(width)}  {'-' if shown is None else shown}")
    print()
    if not found["priced"]:
        print("not priced: no table price for this model at this time")
        return 0
    print(f"priced by {found['pricing_version']} "
          f"(model {found['model']}, period from {found['period']})")
    for line in found["lines"]:
        if "tokens" in line:
            print(f"  {line['class']:<15} {line['tokens']:>12,} tokens x "
                  f"${line['usd_per_mtok']}/1M = ${line['usd']}")
        else:
            print(f"  {line['class']:<15} {line['requests']:>12,} requests x "
                  f"${line['usd_per_1000']}/1000 = ${line['usd']}")
    for note, value in found["notes"].items():
        print(f"  {note}: {value}")
    print(f"  {'total':<15} {'':>12}                    = ${money.exact(row['cost_usd'])}")
    return 0


def _print_json(data: Any) -> None:
    """JSON with money as exact decimal strings (proxy.money), never floats."""
    from proxy import money

    print(money.dumps(data, indent=True).decode())


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = "mp-" + secrets.token_urlsafe(32)
    print(f"key (shown once, give it to the client): {key}")
    print("config line (add under keys:):")
    digest = _runtime.key_digest(key)
    print(f'  - {{name: {orjson.dumps(args.name).decode()}, key_sha256: "{digest}"}}')
    return 0


def cmd_pricing_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    book = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    when = parse_time(args.at) if args.at else datetime.now(UTC)
    table = settings.providers[args.provider].pricing if args.provider in settings.providers \
        and settings.providers[args.provider].pricing else args.provider
    price = book.lookup(table, [args.model], when)
    if price is None:
        print(f"meterproxy: no price for {args.model!r} in table {table!r} at "
              f"{when:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
        return 1
    period = price.period
    info: dict[str, Any] = {
        "provider": args.provider, "model": price.model.name,
        "effective_from": period.effective_from.date().isoformat(),
        "effective_until": period.effective_until.date().isoformat()
        if period.effective_until else None,
        **_pricing.rates_dict(price.rates),
        "pricing_version": price.version,
        "source": period.source,
    }
    if period.tiers:
        info["tiers"] = [{"above_input_tokens": t.above_input_tokens,
                          **_pricing.rates_dict(t.adjustment.apply(price.rates))}
                         for t in period.tiers]
    if period.service_tiers:
        info["service_tiers"] = {name: _pricing.rates_dict(adj.apply(price.rates))
                                 for name, adj in period.service_tiers.items()}
    if period.speeds:
        info["speeds"] = {name: _pricing.rates_dict(adj.apply(price.rates))
                          for name, adj in period.speeds.items()}
    if args.format == "json":
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    else:
        for key, value in info.items():
            if value is not None:
                print(f"{key:<16} {value}")
    return 0


def cmd_pricing_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    book = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    now = datetime.now(UTC)
    rows = []
    for model in book.models(args.provider):
        period = model.at(now)
        rates = period.rates if period else None
        rows.append({
            "table": model.table, "model": model.name,
            "input": rates.input if rates else None,
            "cached_input": rates.cached_input if rates else None,
            "output": rates.output if rates else None,
            "since": period.effective_from.date().isoformat() if period else "retired",
            "aliases": ", ".join(model.aliases),
        })
    print(render(rows, args.format))
    return 0


def cmd_pricing_check(args: argparse.Namespace) -> int:
    from proxy.pricing_check import check

    settings = load_settings(args.config)
    problems = check() + (check(settings.pricing.dir) if settings.pricing.dir else [])
    for problem in problems:
        print(f"error: {problem}")
    book = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    if args.coverage:
        from proxy.pricing.sync import coverage_gaps

        gaps = coverage_gaps(book, _exceptions())
        for gap in gaps:
            print(f"error: {gap}: priced by genai-prices, missing here and not in "
                  "EXCEPTIONS.md (run `meterproxy pricing sync --from genai-prices`)")
        problems += gaps
    models = sum(1 for _ in book.models())
    print(f"{len(book.tables)} tables, {models} models, version {book.digest}: "
          f"{len(problems)} problem(s)")
    if args.unpriced:
        with _readers.open_reader(settings.storage.usage_log) as log:
            rows = log.unpriced_models()
        print("\nunpriced models in the usage log:" if rows else "\nno unpriced calls logged")
        if rows:
            print(render([{"provider": r["provider"], "model": r["model"], "calls": r["calls"],
                           "first": r["first_ts"], "last": r["last_ts"]} for r in rows],
                         "table"))
    return 1 if problems else 0


def _exceptions() -> dict[str, str]:
    from proxy.pricing import bundled_tables_dir
    from proxy.pricing_check import parse_exceptions

    exceptions_file = bundled_tables_dir() / "EXCEPTIONS.md"
    return parse_exceptions(exceptions_file.read_text()) if exceptions_file.exists() else {}


def cmd_pricing_sync(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.pricing.sync import sync, write

    settings = load_settings(args.config)
    book = _pricing.PriceBook.load(settings.pricing.dir)
    report = sync(book, provider=args.provider)
    for line in report.lines():
        print(line)
    if not args.dry_run:
        into = args.into or settings.pricing.dir
        for path in write(report, Path(into) if into else None):
            print(f"wrote {path}")
    return 0


def cmd_pricing_diff(args: argparse.Namespace) -> int:
    from proxy.pricing_check import diff_against_genai_prices

    settings = load_settings(args.config)
    try:
        book = _pricing.PriceBook.load(settings.pricing.dir)
        found = diff_against_genai_prices(book)
    except ImportError:
        print("meterproxy: pricing diff needs the genai-prices package "
              "(pip install genai-prices)", file=sys.stderr)
        return 2
    kept = _exceptions()
    unlisted = [d for d in found if d.key not in kept]
    for d in found:
        if d.key not in kept:
            print(f"DIFF  {d}")
        elif args.all:
            print(f"kept  {d}  ({kept[d.key]})")
    print(f"{len(found)} disagreement(s) with genai-prices, {len(found) - len(unlisted)} "
          f"listed in EXCEPTIONS.md, {len(unlisted)} not")
    return 1 if unlisted else 0


def cmd_reprice(args: argparse.Namespace) -> int:
    from proxy.reprice import reprice

    settings = load_settings(args.config)
    book = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    with _readers.open_reader(settings.storage.usage_log, writable=not args.dry_run) as log:
        result = reprice(log, settings, book, parse_time(args.since),
                         parse_time(args.until) if args.until else None, dry_run=args.dry_run)
    for change in result.changes[:20]:
        print(f"{change['id']}  {change['model']}: {change['before_usd']} -> "
              f"{change['after_usd']}  ({change['pricing_version']})")
    if len(result.changes) > 20:
        print(f"... and {len(result.changes) - 20} more")
    verb = "would change" if args.dry_run else "changed"
    print(f"{result.rows_seen} priced rows checked, {result.rows_changed} {verb} "
          f"({result.newly_priced} newly priced); total ${result.before_usd:f} -> "
          f"${result.after_usd:f} (delta ${result.delta_usd:+f})")
    return 0


def cmd_export_focus(args: argparse.Namespace) -> int:
    from proxy import focus

    settings = load_settings(args.config)
    now = datetime.now(UTC)
    stats = focus.ExportStats()
    rows = focus.export(settings, parse_time(args.since, now) if args.since else None,
                        parse_time(args.until, now) if args.until else None,
                        args.granularity, focus.Unpriced(args.unpriced), stats)
    if args.format == "parquet":
        if not args.output:
            raise ValueError("--format parquet needs --output FILE")
        focus.write_parquet(rows, args.output)
    elif args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as out:
            focus.write_csv(rows, out)
    else:
        focus.write_csv(rows, sys.stdout)
    if stats.unpriced_calls:
        shown = "listed with null costs" if args.unpriced == "include" else (
            "not in the export (FOCUS has no null cost; --unpriced include lists them)")
        print(f"meterproxy: {stats.unpriced_calls} unpriced call(s) "
              f"({', '.join(sorted(stats.unpriced_models))}) {shown}", file=sys.stderr)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Exit 1 when any cell is outside the tolerance, 2 when the bill cannot be read."""
    from proxy.reconcile.bill import BillingSourceError
    from proxy.reconcile.render import reconcile_range, render_text
    from proxy.reconcile.run import run

    settings = load_settings(args.config)
    since, until = reconcile_range(args.since, args.until, datetime.now(UTC))
    prices = _pricing.PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
    by = tuple(b for b in args.by.split(",") if b)
    try:
        result = asyncio.run(run(settings, prices, args.provider, since, until,
                                 tolerance_pct=args.tolerance_pct, by=by,
                                 billing_export=args.billing_export))
    except BillingSourceError as exc:
        print(f"meterproxy: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        _print_json(result.to_json())
    elif args.format == "csv":
        print(render(result.rows(), "csv"))
    else:
        print(render_text(result))
    return 1 if result.outside else 0


def cmd_anomalies(args: argparse.Namespace) -> int:
    """List spend anomalies, or clear one (a running proxy lifts its block at its next
    check, within anomalies.check_every_s)."""
    from datetime import timedelta

    from proxy.storage.anomalies import open_anomalies

    settings = load_settings(args.config)
    now = datetime.now(UTC)
    with open_anomalies(settings.storage.usage_log) as store:
        if args.clear:
            cleared = store.clear(args.clear, "cli", now)
            if cleared is None:
                print(f"meterproxy: no active anomaly {args.clear}", file=sys.stderr)
                return 1
            print(f"cleared {cleared.id} ({cleared.scope_kind} {cleared.scope_value}, "
                  f"{cleared.action})")
            return 0
        found = store.recent(now - timedelta(days=7)) if args.all else store.active()
    rows = [{k: v for k, v in a.to_json().items() if k not in ("cleared_by", "ended_at")}
            if args.format == "table" else a.to_json() for a in found]
    if args.format == "table" and not rows:
        print("no open anomalies")
        return 0
    print(render(rows, args.format))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(calls=args.calls, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
