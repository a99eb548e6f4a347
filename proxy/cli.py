"""The `meterproxy` command: parse arguments, call library functions, print."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy import query
from proxy.config import ConfigError, Settings, load_settings
from proxy.output import render
from proxy.pricing import PriceBook, PricingError, rates_dict
from proxy.runtime import key_digest
from proxy.storage.sqlite import connect, sqlite_path
from proxy.timeparse import parse_time

FORMATS = ("table", "json", "csv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ConfigError, PricingError, query.QueryError, ValueError) as exc:
        print(f"meterproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterproxy",
        description="A cost-metering reverse proxy for LLM APIs.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML file (default: $METERPROXY_CONFIG, "
                        "else ./meterproxy.yaml, else built-in defaults)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the proxy")
    p.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: server.port, 8787)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("usage", parents=[common], help="aggregates from the usage log")
    p.add_argument("--since", help="ISO date or datetime, or relative 7d / 24h")
    p.add_argument("--until", help="ISO date or datetime (exclusive), or relative")
    p.add_argument("--group-by", default="", help="comma-separated: columns, day, hour, "
                   "week, month, tag:NAME")
    p.add_argument("--where", action="append", default=[], metavar="K=V",
                   help="filter on a column or tag:NAME (repeatable)")
    p.add_argument("--order-by", help="calls, cost_usd, a token class or a group-by name")
    p.add_argument("--top", type=int, help="only the first N groups")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(run=cmd_usage)

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

    p = sub.add_parser("demo", help="a simulated provider, the proxy and traffic; then a report")
    p.add_argument("--calls", type=int, default=36, help="how many calls to drive")
    p.add_argument("--keep", action="store_true", help="keep the demo database")
    p.set_defaults(run=cmd_demo)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve
    from proxy.logs import configure

    settings = load_settings(args.config)
    configure(settings.logging.level, settings.logging.format)
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    _run(serve(settings, host, port))
    return 0


def _run(coro: Any) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _log_connection(settings: Settings):
    path = sqlite_path(settings.storage.usage_log)
    if not path.exists():
        raise ValueError(f"no usage log at {path} yet: run meterproxy serve first")
    return connect(path, readonly=True)


def cmd_usage(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    q = query.UsageQuery(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        group_by=[g.strip() for g in args.group_by.split(",") if g.strip()],
        where=query.parse_where(args.where),
        order_by=args.order_by,
        limit=args.top,
    )
    conn = _log_connection(settings)
    try:
        rows = query.usage(conn, q)
    finally:
        conn.close()
    print(render(rows, args.format))
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    """Spend per budget period from the usage log (a running proxy's holds are not in it:
    GET /_meter/budgets shows those)."""
    from proxy.budgets import budgets_from, current_periods, spend_from_log, status_row
    from proxy.storage.ledger import Balance

    settings = load_settings(args.config)
    budgets = budgets_from(settings)
    now = datetime.now(UTC)
    conn = _log_connection(settings)
    try:
        totals = spend_from_log(conn, budgets, now)
    finally:
        conn.close()
    rows = []
    for budget, scope, key, end in current_periods(budgets, {s for _, s in totals}, now):
        usd, count = totals.get((key, scope), (Decimal(0), 0))
        rows.append(status_row(budget, scope, Balance(spent_usd=usd, spent_tokens=count), end))
    print(render(rows, args.format))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    conn = _log_connection(settings)
    try:
        row = query.call(conn, args.id)
    finally:
        conn.close()
    if row is None:
        print(f"meterproxy: no call {args.id} in the usage log", file=sys.stderr)
        return 1
    breakdown = orjson.loads(row["cost_breakdown"]) if row["cost_breakdown"] else {}
    if args.format == "json":
        print(orjson.dumps({**row, "cost_breakdown": breakdown},
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    width = max(len(k) for k in row)
    for key, value in row.items():
        if key != "cost_breakdown":
            print(f"{key.ljust(width)}  {'-' if value is None else value}")
    print()
    if not row["priced"]:
        print("not priced: no table price for this model at this time")
        return 0
    print(f"priced by {row['pricing_version']} "
          f"(model {breakdown.get('model', row['model'])}, period from {breakdown.get('period')})")
    for name, line in breakdown.get("classes", {}).items():
        if "tokens" in line:
            print(f"  {name:<15} {line['tokens']:>12,} tokens x ${line['usd_per_mtok']}/1M"
                  f" = ${line['usd']}")
        else:
            print(f"  {name:<15} {line['requests']:>12,} requests x ${line['usd_per_1000']}/1000"
                  f" = ${line['usd']}")
    for note in ("tier", "service_tier", "window", "missing_rates"):
        if note in breakdown:
            print(f"  {note}: {breakdown[note]}")
    print(f"  {'total':<15} {'':>12}                    = ${row['cost_usd']}")
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = "mp-" + secrets.token_urlsafe(32)
    print(f"key (shown once, give it to the client): {key}")
    print("config line (add under keys:):")
    print(f'  - {{name: {orjson.dumps(args.name).decode()}, key_sha256: "{key_digest(key)}"}}')
    return 0


def cmd_pricing_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    book = PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
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
        **rates_dict(price.rates),
        "pricing_version": price.version,
        "source": period.source,
    }
    if period.tiers:
        info["tiers"] = [{"above_input_tokens": t.above_input_tokens,
                          **rates_dict(t.adjustment.apply(price.rates))} for t in period.tiers]
    if period.service_tiers:
        info["service_tiers"] = {name: rates_dict(adj.apply(price.rates))
                                 for name, adj in period.service_tiers.items()}
    if period.request_fees:
        info["request_fees_per_1000"] = {k: str(v) for k, v in period.request_fees.items()}
    if args.format == "json":
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    else:
        for key, value in info.items():
            if value is not None:
                print(f"{key:<16} {value}")
    return 0


def cmd_pricing_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    book = PriceBook.load(settings.pricing.dir, settings.pricing.overrides)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(calls=args.calls, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
