"""Checks on the pricing tables: are they well formed, and do they agree with genai-prices?

Both are pure functions returning lists, so `meterproxy pricing check` / `pricing diff`, the
dashboard and the tests share them. The diff measures rates through `proxy.pricing.cost`
and genai-prices' own calculator, so it compares what each side would bill, fallbacks
included, not how each side happens to spell a price. It reads genai-prices' bundled data
only; it never asks the network for newer prices.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from proxy.pricing import Price, PriceBook, PricingError, cost
from proxy.pricing.tables import (
    Adjustment,
    DecimalLoader,
    ModelPrices,
    Period,
    parse_table,
    table_files,
)
from proxy.token_classes import GENAI_KEYS, MILLION
from proxy.usage import Usage

# Our table name -> genai-prices provider id.
GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google",
                   "deepseek": "deepseek", "mistral": "mistral", "groq": "groq",
                   "together": "together", "xai": "x-ai", "openrouter": "openrouter"}
# Our service tier -> the genai-prices price context that selects it.
GENAI_SERVICE_TIERS = {"batch": {"processing": "batch"}, "flex": {"service_tier": "flex"},
                       "priority": {"service_tier": "priority"}}
RATES = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "audio_input",
         "output", "audio_output")
# Our rate -> genai-prices price key. A rate neither side names is billed at its fallback
# (input or output), which is compared anyway, so the diff skips it rather than repeat it.
GENAI_PRICE_KEYS = {rate: GENAI_KEYS[rate] for rate in RATES}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one table, phrased as `file: where: what`."""

    table: str
    message: str

    def __str__(self) -> str:
        return f"{self.table}.yaml: {self.message}"


def check(book_dir: str | Path | None = None) -> list[Problem]:
    """Every problem in every table of `book_dir` (default: the bundled tables)."""
    problems: list[Problem] = []
    for name, text in sorted(table_files(book_dir)):
        problems += check_table(name, text)
    return problems


def check_table(name: str, text: str) -> list[Problem]:
    """The problems of one table: schema, provenance, periods, prices and names."""
    found = [Problem(name, f"{key}: duplicate key (YAML keeps only the last)")
             for key in _duplicate_keys(text)]
    try:
        models = parse_table(name, text)
    except PricingError as exc:
        return [*found, Problem(name, str(exc).removeprefix(f"{name}.yaml: "))]
    raw = yaml.load(text, Loader=DecimalLoader)  # a SafeLoader subclass
    if raw.get("provider") != name:
        found.append(Problem(name, f"provider: must be {name!r}, the file's name"))
    for model_name, entry in (raw.get("models") or {}).items():
        for key in ("source", "checked"):
            if not entry.get(key) and not raw.get(key):
                found.append(Problem(name, f"models.{model_name}: needs a {key}: (or a table one)"))
        if "uncertain" in entry and not str(entry["uncertain"] or "").strip():
            found.append(Problem(name, f"models.{model_name}.uncertain: say what is uncertain"))
    for model in models.values():
        found += [Problem(name, f"models.{model.name}: {m}") for m in _model_problems(model)]
    found += [Problem(name, m) for m in _name_problems(models)]
    return found


def _model_problems(model: ModelPrices) -> Iterator[str]:
    """Periods in order without overlaps, every period priced, no negative multiplier.

    A period runs until the next one starts, so periods cannot leave gaps unless a period
    sets effective_until; what remains to catch is a period ending after the next begins.
    """
    periods = model.periods
    for before, after in pairwise(periods):
        if before.effective_from == after.effective_from:
            yield f"two periods start on {after.effective_from:%Y-%m-%d %H:%M}"
        elif before.effective_until and before.effective_until > after.effective_from:
            yield (f"period from {before.effective_from:%Y-%m-%d} runs until "
                   f"{before.effective_until:%Y-%m-%d}, after the next one starts")
    for period in periods:
        when = f"period from {period.effective_from:%Y-%m-%d}"
        if period.effective_until and period.effective_until <= period.effective_from:
            yield f"{when} ends before it starts"
        if period.rates.input is None:
            yield f"{when} has no input price"
        if period.rates.output is None and "embed" not in model.name.lower():
            yield f"{when} has no output price (only embedding models may omit it)"
        for label, adjustment in _adjustments(period):
            if adjustment.input_multiplier < 0 or adjustment.output_multiplier < 0:
                yield f"{when}: {label} has a negative multiplier"
        if any(tier.above_input_tokens <= 0 for tier in period.tiers):
            yield f"{when}: a tier needs above_input_tokens greater than 0"


def _adjustments(period: Period) -> Iterator[tuple[str, Adjustment]]:
    """Every adjustment of a period, labelled for messages."""
    for tier in period.tiers:
        yield f"tier above {tier.above_input_tokens}", tier.adjustment
    for service, adjustment in period.service_tiers.items():
        yield f"service tier {service}", adjustment
    for window in period.windows:
        yield f"time window {window.start:%H:%M}", window.adjustment


def _name_problems(models: dict[str, ModelPrices]) -> Iterator[str]:
    """A name must resolve to one model: lookups lower-case, so collisions are too."""
    owner = {name.lower(): name for name in models}
    for model in models.values():
        for alias in model.aliases:
            claimed = owner.setdefault(alias.lower(), model.name)
            if claimed == model.name:
                continue
            kind = "the name of" if claimed.lower() == alias.lower() else "also an alias of"
            yield f"models.{model.name}.aliases: {alias} is {kind} {claimed}"


def _duplicate_keys(text: str) -> list[str]:
    """Keys repeated in one mapping, which yaml.load would silently merge."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []  # parse_table reports it
    found: list[str] = []

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if key.value in seen:
                    found.append(f"{path}{key.value}")
                seen.add(key.value)
                walk(value, f"{path}{key.value}.")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path.rstrip('.')}[{i}].")

    if root is not None:
        walk(root, "")
    return found


# --- the diff against genai-prices ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Disagreement:
    """A rate we bill differently from genai-prices, for one of our price periods.

    `what` names the rate (`input`, `web_search`), prefixed by a service tier
    (`batch.input`) and suffixed by the long-context tier it applies in (`output>200000`).
    """

    table: str
    model: str
    period: date
    what: str
    ours: Decimal
    theirs: Decimal
    at: datetime

    @property
    def key(self) -> str:
        return f"{self.table}/{self.model}@{self.period:%Y-%m-%d} {self.what}"

    def __str__(self) -> str:
        return (f"{self.key}: ours {_plain(self.ours)}, genai-prices {_plain(self.theirs)} "
                f"(at {self.at:%Y-%m-%d %H:%M} UTC)")


def diff_against_genai_prices(book: PriceBook, as_of: datetime | None = None) -> list[Disagreement]:
    """Every rate where our tables and genai-prices' bundled data would bill differently.

    A model is shared when genai-prices resolves its name (or failing that an alias) for the
    same provider. Where genai-prices has price history, each of our periods is compared at
    its start and at genai-prices' own change dates and times of day; otherwise only our
    latest period is. Service tiers are compared at `as_of` (default: now), and only where
    genai-prices prices that tier. Config overrides are not applied: this checks the tables.
    """
    from genai_prices.data import providers  # test-only dependency, bundled data, offline

    as_of = as_of or datetime.now(UTC)
    by_id = {p.id: p for p in providers}
    found: dict[str, Disagreement] = {}
    for table, models in sorted(book.tables.items()):
        provider = by_id.get(GENAI_PROVIDERS.get(table, ""))
        if provider is None:
            continue
        for model in models.values():
            theirs = next(filter(None, map(provider.find_model, (model.name, *model.aliases))),
                          None)
            if theirs is None:
                continue
            for d in _compare_model(table, model, provider, theirs, as_of):
                found.setdefault(d.key, d)
    return list(found.values())


def _compare_model(table: str, model: ModelPrices, provider: Any, theirs: Any,
                   as_of: datetime) -> Iterator[Disagreement]:
    """Standard rates per period (all periods where genai-prices has history, else the
    latest), then the service tiers genai-prices prices, in the period in force at as_of."""
    has_history = isinstance(theirs.prices, list) and len(theirs.prices) > 1
    starts = [p.effective_from for p in model.periods[1:]]
    for period, next_start in zip(model.periods, [*starts, None], strict=True):
        if not has_history and next_start is not None:
            continue
        end = min(filter(None, (period.effective_until, next_start)), default=None)
        for at in _instants(period, end, theirs):
            yield from _compare_at(table, model, period, provider, theirs, at, None)
    period = model.at(as_of)
    if period is None:
        return
    for service, context in GENAI_SERVICE_TIERS.items():
        if any(v.when == context for v in theirs.price_variants or ()):
            yield from _compare_at(table, model, period, provider, theirs, as_of, service)


def _compare_at(table: str, model: ModelPrices, period: Period, provider: Any, theirs: Any,
                at: datetime, service: str | None) -> Iterator[Disagreement]:
    price = Price(model, period, "", period.rates)
    context = GENAI_SERVICE_TIERS.get(service or "")
    prefix = f"{service}." if service else ""
    model_price = theirs.get_prices(at, context)
    thresholds = {t.above_input_tokens for t in period.tiers}
    thresholds |= {tier.start for value in vars(model_price).values()
                   for tier in getattr(value, "tiers", ())}
    named = [rate for rate in RATES
             if rate in ("input", "output") or _we_name(period, rate)
             or getattr(model_price, GENAI_PRICE_KEYS[rate]) is not None]
    checks = [(rate, prompt) for prompt in [1, *sorted(t + 1 for t in thresholds)]
              for rate in named]
    if service is None:
        checks.append(("web_search", 0))
    for rate, prompt in checks:
        ours = _our_rate(price, rate, prompt, at, service)
        genai = _genai_rate(theirs, provider, rate, prompt, at, context)
        if ours != genai:
            suffix = f">{prompt - 1}" if prompt > 1 else ""
            yield Disagreement(table, model.name, period.effective_from.date(),
                               f"{prefix}{rate}{suffix}", ours, genai, at)


def _we_name(period: Period, rate: str) -> bool:
    """Whether the period, or any tier, service tier or window of it, sets this rate."""
    adjustments = (a.rates for _, a in _adjustments(period))
    return any(getattr(rates, rate) is not None for rates in (period.rates, *adjustments))


def _instants(period: Period, end: datetime | None, theirs: Any) -> list[datetime]:
    """When to compare one of our periods (it ends at `end`): its start and genai-prices'
    change dates, each at midnight and at every time-of-day boundary either side knows."""
    days = {period.effective_from.date()}
    clocks = {time(0), period.effective_from.time()}
    for window in period.windows:
        clocks |= {window.start, window.end}
    for conditional in theirs.prices if isinstance(theirs.prices, list) else ():
        constraint = conditional.constraint  # a StartDate- or TimeOfDateConstraint, or None
        if hasattr(constraint, "start_date"):
            days.add(constraint.start_date)
        elif constraint is not None:
            clocks |= {constraint.start_time.replace(tzinfo=None),
                       constraint.end_time.replace(tzinfo=None)}
    instants = set()
    for day in (d for d in days if d >= period.effective_from.date()):
        for clock in clocks:
            at = datetime.combine(day, clock, UTC)
            if at < period.effective_from:
                at += timedelta(days=1)
            if end is None or at < end:
                instants.add(at)
    return sorted(instants)


def _our_rate(price: Price, rate: str, prompt: int, at: datetime, service: str | None) -> Decimal:
    """USD per 1M tokens (per 1,000 searches) that `cost` bills for one rate, in a call
    with `prompt` input tokens: missing rates fall back the way billing does."""
    def billed(**counts: int) -> Decimal:
        return cost(Usage(service_tier=service, **counts), price, at).total

    if rate == "web_search":
        return billed(web_search_requests=1000)
    if rate in ("output", "audio_output"):
        audio = int(MILLION) if rate == "audio_output" else 0
        return (billed(input_tokens=prompt, output_tokens=int(MILLION), audio_output_tokens=audio)
                - billed(input_tokens=prompt))
    counts = {"input": {"input_tokens": prompt},
              "cached_input": {"cached_input_tokens": prompt},
              "cache_write_5m": {"cache_write_tokens": prompt},
              "cache_write_1h": {"cache_write_tokens": prompt, "cache_write_1h_tokens": prompt},
              "audio_input": {"input_tokens": prompt, "audio_input_tokens": prompt}}[rate]
    return billed(**counts) * MILLION / prompt


def _genai_rate(theirs: Any, provider: Any, rate: str, prompt: int, at: datetime,
                context: dict[str, str] | None) -> Decimal:
    """The same measurement through genai-prices' calculator (its input counts include
    cache reads and writes, ours do not)."""
    from genai_prices.types import Usage as GenaiUsage

    def billed(**counts: int) -> Decimal:
        calc = theirs.calc_price(GenaiUsage(**counts), provider, genai_request_timestamp=at,
                                 price_context=context)
        return calc.total_price

    if rate == "web_search":
        return billed(web_searches=1000)
    if rate in ("output", "audio_output"):
        extra = {"output_audio_tokens": int(MILLION)} if rate == "audio_output" else {}
        return (billed(input_tokens=prompt, output_tokens=int(MILLION), **extra)
                - billed(input_tokens=prompt))
    counts = {"input": {},
              "cached_input": {"cache_read_tokens": prompt},
              "cache_write_5m": {"cache_write_tokens": prompt},
              "cache_write_1h": {"cache_write_tokens": prompt, "cache_write_1h_tokens": prompt},
              "audio_input": {"input_audio_tokens": prompt}}[rate]
    return billed(input_tokens=prompt, **counts) * MILLION / prompt


_EXCEPTION_LINE = re.compile(r"^- `(?P<target>[^`\s]+) (?P<whats>[^`\s]+)`\s*(?P<reason>.*)$")


def parse_exceptions(text: str) -> dict[str, str]:
    """Disagreement keys kept on purpose, from EXCEPTIONS.md, each with its reason.

    A line reads "- `table/model@YYYY-MM-DD what[,what...]` reason"; other lines are prose.
    """
    kept: dict[str, str] = {}
    for line in text.splitlines():
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            for what in match["whats"].split(","):
                kept[f"{match['target']} {what}"] = match["reason"].lstrip("—-: ").strip()
    return kept


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


__all__ = ["Disagreement", "Problem", "check", "check_table", "diff_against_genai_prices",
           "parse_exceptions"]
