"""`pricing sync --from genai-prices`: add the models and price periods our tables lack.

Reads the installed genai-prices package's bundled data (offline) and, per table, writes
what is missing as YAML appended to the table file (or to an overlay directory):

- a model genai-prices prices that no name or alias of ours resolves to becomes a new
  entry with its whole history (periods from genai-prices' start dates, long-context
  tiers, per-modality rates, batch / flex / priority / fast tiers, `speed: fast`);
- a model we have whose price genai-prices changes on a date after our latest period
  (announced future prices included) gets a new period from that date.

Nothing existing is rewritten: a difference inside our history is reported as skipped
(`pricing diff` and EXCEPTIONS.md are where it is settled). Models genai-prices marks
deprecated, and rules the format cannot say, are skipped with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.pricing.book import PriceBook
from proxy.pricing.tables import bundled_tables_dir
from proxy.token_classes import GENAI_KEYS, UNIT_RATE_KEYS

# Our table name -> genai-prices provider id (the tables of routed providers).
GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google",
                   "deepseek": "deepseek", "mistral": "mistral", "groq": "groq",
                   "together": "together", "xai": "x-ai"}
# genai-prices' price context -> where our format keeps that variant.
_VARIANTS = {("processing", "batch"): ("service_tiers", "batch"),
             ("service_tier", "flex"): ("service_tiers", "flex"),
             ("service_tier", "priority"): ("service_tiers", "priority"),
             ("service_tier", "fast"): ("service_tiers", "fast"),
             ("service_tier", "scale"): ("service_tiers", "scale"),
             ("speed", "fast"): ("speeds", "fast")}
_FROM_GENAI = {genai: ours for ours, genai in GENAI_KEYS.items()}
# A first price with no start date in genai-prices: in force from this date, marked
# uncertain, so any call logged to the model is priced.
UNDATED = date(2023, 1, 1)
# Models of genai-prices' google provider that the Gemini API does not serve.
_NOT_GEMINI_API = re.compile(r"^(claude-|gemma-\d.*-maas$)")


@dataclass
class SyncReport:
    """What a sync did (or would do, with --dry-run), per table."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # table -> YAML appended

    def lines(self) -> Iterator[str]:
        for label, items in (("added", self.added), ("changed", self.changed),
                             ("skipped", self.skipped)):
            for item in items:
                yield f"{label}: {item}"
        yield (f"{len(self.added)} added, {len(self.changed)} changed, "
               f"{len(self.skipped)} skipped")


def genai_providers() -> dict[str, Any]:
    """genai-prices' providers by id, from the package's bundled data (never the network)."""
    from genai_prices.data import providers

    return {p.id: p for p in providers}


def coverage_gaps(book: PriceBook, exceptions: dict[str, str]) -> list[str]:
    """Models genai-prices prices for a routed provider that our tables cannot price and
    EXCEPTIONS.md does not list (as `- \\`table/model missing\\` reason`)."""
    gaps = []
    by_id = genai_providers()
    for table, provider_id in GENAI_PROVIDERS.items():
        for model in by_id[provider_id].models:
            if _skip_reason(table, model) is not None:
                continue
            if book.model(table, [model.id]) is None \
                    and f"{table}/{model.id} missing" not in exceptions:
                gaps.append(f"{table}/{model.id}")
    return gaps


def sync(book: PriceBook, *, provider: str | None = None, today: date | None = None
         ) -> SyncReport:
    """What the tables lack, as YAML text per table, and a report of every decision."""
    today = today or datetime.now(UTC).date()
    report = SyncReport()
    by_id = genai_providers()
    for table, provider_id in GENAI_PROVIDERS.items():
        if provider is not None and provider not in (table, provider_id):
            continue
        theirs = by_id[provider_id]
        source = (theirs.pricing_urls or [None])[0]
        new_entries: list[str] = []
        for model in theirs.models:
            why = _skip_reason(table, model)
            if why is not None:
                report.skipped.append(f"{table}/{model.id}: {why}")
                continue
            ours = book.model(table, [model.id])
            if ours is None:
                entry, notes = _entry(table, model, source, today, book)
                new_entries.append(entry)
                report.added.append(f"{table}/{model.id}" + (f" ({'; '.join(notes)})"
                                                             if notes else ""))
            else:
                _new_periods(table, ours, model, report)
        if new_entries:
            report.texts[table] = "".join(new_entries)
    return report


def write(report: SyncReport, into: Path | None = None) -> list[Path]:
    """Append each table's new entries to its file (bundled, or an overlay in `into`)."""
    written = []
    for table, text in report.texts.items():
        path = (into or bundled_tables_dir()) / f"{table}.yaml"
        if path.exists():
            path.write_text(path.read_text(encoding="utf-8").rstrip("\n") + "\n" + text,
                            encoding="utf-8")
        else:
            path.write_text(f"provider: {table}\nsource: genai-prices\n"
                            f"checked: {datetime.now(UTC).date()}\nmodels:\n{text}",
                            encoding="utf-8")
        written.append(path)
    return written


def _skip_reason(table: str, model: Any) -> str | None:
    if model.deprecated:
        return "deprecated in genai-prices"
    if table == "gemini" and _NOT_GEMINI_API.match(model.id):
        return "served through Vertex AI, not the Gemini API this table prices"
    if not re.fullmatch(r"[A-Za-z0-9][\w.:/@-]*", model.id) or model.id.endswith(("-", ".")):
        return "a name pattern in genai-prices, not a model name a call can send"
    latest = _price_periods(model)[-1][1]
    if latest.input_mtok is None or (latest.output_mtok is None and "embed" not in model.id):
        return ("no per-token input and output price (billed per minute, page, character "
                "or image): not a token price")
    return None


def _price_periods(model: Any) -> list[tuple[date | None, Any]]:
    """(start date or None, ModelPrice) in order; time-of-day prices are not periods."""
    if not isinstance(model.prices, list):
        return [(None, model.prices)]
    periods = []
    for conditional in model.prices:
        start = getattr(conditional.constraint, "start_date", None)
        if conditional.constraint is None or start is not None:
            periods.append((start, conditional.prices))
    return periods


def _rates(price: Any) -> tuple[dict[str, Decimal], dict[int, dict[str, Decimal]], list[str]]:
    """Base rates, rates per long-context threshold, and price keys we cannot use."""
    base: dict[str, Decimal] = {}
    tiers: dict[int, dict[str, Decimal]] = {}
    unknown = []
    for key, value in vars(price).items():
        if value is None or key.startswith("_"):
            continue
        ours = _FROM_GENAI.get(key)
        if ours is None:
            unknown.append(key)
            continue
        if hasattr(value, "tiers"):
            base[ours] = value.base
            for tier in value.tiers:
                tiers.setdefault(tier.start, {})[ours] = tier.price
        else:
            base[ours] = value
    return base, tiers, unknown


def _adjustment(variant_price: Any, base: dict[str, Decimal],
                tiers: dict[int, dict[str, Decimal]]) -> tuple[dict[str, Decimal], str | None]:
    """A variant as a multiplier when it scales every rate it names alike (a rate it does
    not name keeps the standard price, as genai-prices bills it), else explicit rates."""
    vbase, vtiers, _ = _rates(variant_price)
    ratios = {vbase[k] / base[k] for k in vbase if base.get(k)}
    ratios |= {vtiers[t][k] / tiers[t][k] for t in vtiers for k in vtiers[t]
               if tiers.get(t, {}).get(k)}
    if len(ratios) == 1:
        unscaled = {k: v for k, v in base.items() if k not in vbase and k not in UNIT_RATE_KEYS}
        tiered = [k for k in unscaled if any(k in r for r in tiers.values())]
        note = (f"{', '.join(tiered)} keeps the standard rate, whose long-context rate is "
                "not modelled") if tiered else None
        return {"multiplier": ratios.pop(), **unscaled}, note
    note = "its long-context rates are not modelled" if vtiers else None
    return vbase, note


def _entry(table: str, model: Any, source: str | None, today: date,
           book: PriceBook) -> tuple[str, list[str]]:
    """The YAML text of a new model entry, and notes for the report."""
    notes: list[str] = []
    uncertain: list[str] = []
    lines = [f"  {_key(model.id)}:"]
    aliases = [a for a in _equals(model.match) if a.lower() != model.id.lower()
               and book.model(table, [a]) is None]
    if aliases:
        lines.append(f"    aliases: [{', '.join(_key(a) for a in aliases)}]")
    if model.id.startswith("ft:"):
        lines.append(f"    fine_tune_of: {model.id[3:].split(':')[0]}")
    if model.context_window:
        lines.append(f"    context_window: {model.context_window}")
    if source:
        lines.append(f"    source: {source}")
    lines.append(f"    checked: {today}")
    lines.append("    note: added by `meterproxy pricing sync --from genai-prices` "
                 "(genai-prices 0.2.3 bundled data)")
    periods = _price_periods(model)
    if any(start is None for start, _ in periods):
        uncertain.append(f"genai-prices gives no start date for the first price; "
                         f"applied from {UNDATED}")
    if isinstance(model.prices, list) and len(periods) < len(model.prices):
        uncertain.append("time-of-day prices in genai-prices are not modelled")
    body = ["    prices:"]
    variant_starts = sorted({v.constraint.start_date for v in model.price_variants or ()
                             if getattr(v.constraint, "start_date", None)})
    starts = sorted({*(s or UNDATED for s, _ in periods), *variant_starts})
    for start in starts:
        price = [p for s, p in periods if (s or UNDATED) <= start][-1]
        base, tiers, unknown = _rates(price)
        if unknown:
            uncertain.append(f"genai-prices prices {', '.join(sorted(unknown))}, "
                             "which no token class here bills")
        fees = {k: base.pop(k) for k in UNIT_RATE_KEYS if k in base}
        body.append(f"      - effective_from: {start}")
        body += [f"        {k}: {_num(v)}" for k, v in base.items()]
        if tiers:
            body.append("        tiers:")
            body += [f"          - {_flow({'above_input_tokens': Decimal(t), **r})}"
                     for t, r in sorted(tiers.items())]
        groups: dict[str, dict[str, tuple[date, str]]] = {}
        for variant in model.price_variants or ():
            vstart = getattr(variant.constraint, "start_date", None)
            if vstart is not None and vstart > start:
                continue
            if variant.constraint is not None and vstart is None:
                uncertain.append("a time-of-day variant is not modelled")
                continue
            place = _VARIANTS.get(next(iter(variant.when.items()), ("", "")))
            if place is None or len(variant.when) != 1:
                uncertain.append(f"variant {variant.when} has no place in the format")
                continue
            rates, note = _adjustment(variant.prices, base, tiers)
            if note:
                uncertain.append(f"{place[1]}: {note}")
            since = vstart or UNDATED
            kept = groups.setdefault(place[0], {})
            if place[1] not in kept or kept[place[1]][0] <= since:  # the latest in force
                kept[place[1]] = (since, f"          {place[1]}: {_flow(rates)}")
        for group, items in groups.items():
            body.append(f"        {group}:")
            body += [line for _, line in items.values()]
        if fees:
            body.append(f"        request_fees: {_flow(fees)}")
    if uncertain:
        lines.append(f"    uncertain: {_quote('; '.join(dict.fromkeys(uncertain)))}")
        notes += list(dict.fromkeys(uncertain))
    return "\n".join([*lines, *body]) + "\n", notes


def _new_periods(table: str, ours: Any, model: Any, report: SyncReport) -> None:
    """Report genai-prices price changes dated after our latest period (not yet written:
    existing entries are edited by hand, reviewed with `pricing diff`)."""
    latest = ours.periods[-1].effective_from.date()
    for start, price in _price_periods(model):
        if start is None or start <= latest:
            continue
        base, _, _ = _rates(price)
        mine = ours.periods[-1].rates
        differs = [k for k, v in base.items() if getattr(mine, k) != v]
        if differs:
            report.changed.append(f"{table}/{ours.name}: genai-prices changes "
                                  f"{', '.join(differs)} from {start} (after our latest "
                                  f"period, {latest}): add a period")


def _equals(match: Any) -> Iterator[str]:
    if hasattr(match, "equals"):
        yield match.equals
    for clause in getattr(match, "or_", None) or ():
        yield from _equals(clause)


def _flow(values: dict[str, Decimal]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in values.items()) + "}"


def _num(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) else _quote(name)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
