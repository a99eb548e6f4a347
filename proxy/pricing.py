"""Pricing: versioned tables in, an exact Decimal cost out.

Tables are YAML files (one per provider, format in pricing/README.md), loaded once at
start-up into a PriceBook. On the hot path there is no I/O: `lookup` resolves a model and a
timestamp to the price period in force, and `cost` is a pure function of usage and price.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from proxy.dialects import standard_tiers
from proxy.usage import Usage

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
QUANTUM = Decimal("1e-10")
RATE_FIELDS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output",
               "audio_input", "audio_output")
PERIOD_KEYS = {*RATE_FIELDS, "effective_from", "effective_until", "tiers", "service_tiers",
               "time_windows", "request_fees", "source", "checked", "note", "uncertain"}
MODEL_KEYS = {"aliases", "prices", "max_output_tokens", "context_window", "note", "uncertain",
              "source", "checked"}
TABLE_KEYS = {"provider", "source", "checked", "note", "models"}
_DATE_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|@\d{8})$")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CACHE_LIMIT = 10_000


class PricingError(ValueError):
    """A table that does not follow the format, phrased as `file: path: problem`."""


class _DecimalLoader(yaml.SafeLoader):
    """YAML that reads numbers with a fraction as Decimal, so 0.075 stays 0.075."""


_DecimalLoader.add_constructor(
    "tag:yaml.org,2002:float", lambda loader, node: Decimal(loader.construct_scalar(node))
)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens of each class; None where the table names no price."""

    input: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None
    output: Decimal | None = None
    audio_input: Decimal | None = None
    audio_output: Decimal | None = None

    def scaled(self, input_factor: Decimal, output_factor: Decimal) -> Rates:
        def mul(value: Decimal | None, factor: Decimal) -> Decimal | None:
            return None if value is None else value * factor

        return Rates(
            input=mul(self.input, input_factor),
            cached_input=mul(self.cached_input, input_factor),
            cache_write_5m=mul(self.cache_write_5m, input_factor),
            cache_write_1h=mul(self.cache_write_1h, input_factor),
            output=mul(self.output, output_factor),
            audio_input=mul(self.audio_input, input_factor),
            audio_output=mul(self.audio_output, output_factor),
        )

    def over(self, base: Rates) -> Rates:
        """These rates, with base's where these name none."""
        return Rates(**{f: getattr(self, f) if getattr(self, f) is not None else getattr(base, f)
                        for f in RATE_FIELDS})


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A change to a period's rates: explicit prices, multipliers, or both."""

    rates: Rates = Rates()
    input_multiplier: Decimal = Decimal(1)
    output_multiplier: Decimal = Decimal(1)

    def apply(self, base: Rates) -> Rates:
        return self.rates.over(base.scaled(self.input_multiplier, self.output_multiplier))


@dataclass(frozen=True, slots=True)
class Tier:
    """Long context: above this many prompt tokens, the whole call moves to these rates."""

    above_input_tokens: int
    adjustment: Adjustment


@dataclass(frozen=True, slots=True)
class Window:
    """A time-of-day window (UTC) with its own rates, e.g. off-peak discounts."""

    start: time
    end: time
    adjustment: Adjustment

    def contains(self, at: datetime) -> bool:
        t = at.astimezone(UTC).time()
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end


@dataclass(frozen=True, slots=True)
class Period:
    """One price, in force from `effective_from` until the next period or `effective_until`."""

    effective_from: datetime
    effective_until: datetime | None
    rates: Rates
    tiers: tuple[Tier, ...] = ()
    service_tiers: dict[str, Adjustment] = field(default_factory=dict)
    windows: tuple[Window, ...] = ()
    request_fees: dict[str, Decimal] = field(default_factory=dict)
    source: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ModelPrices:
    name: str
    table: str
    aliases: tuple[str, ...]
    periods: tuple[Period, ...]
    max_output_tokens: int | None = None

    def at(self, when: datetime) -> Period | None:
        starts = [p.effective_from for p in self.periods]
        i = bisect.bisect_right(starts, when) - 1
        if i < 0:
            return None
        period = self.periods[i]
        if period.effective_until is not None and when >= period.effective_until:
            return None
        return period


@dataclass(frozen=True, slots=True)
class Price:
    """The price that applies to one call, and the version string that names it."""

    model: ModelPrices
    period: Period
    version: str
    rates: Rates


@dataclass(frozen=True, slots=True)
class Cost:
    total: Decimal
    breakdown: dict[str, Any]



USAGE_CLASSES = (
    # (breakdown name, rate field, fallback rate fields)
    ("input", "input", ()),
    ("audio_input", "audio_input", ("input",)),
    ("cached_input", "cached_input", ("input",)),
    ("cache_write_5m", "cache_write_5m", ("input",)),
    ("cache_write_1h", "cache_write_1h", ("cache_write_5m", "input")),
    ("output", "output", ()),
    ("audio_output", "audio_output", ("output",)),
)


def class_tokens(usage: Usage) -> dict[str, int]:
    """Split usage into the disjoint classes that are priced."""
    audio_in = min(usage.audio_input_tokens, usage.input_tokens)
    audio_out = min(usage.audio_output_tokens, usage.output_tokens)
    write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    return {
        "input": usage.input_tokens - audio_in,
        "audio_input": audio_in,
        "cached_input": usage.cached_input_tokens,
        "cache_write_5m": usage.cache_write_tokens - write_1h,
        "cache_write_1h": write_1h,
        "output": usage.output_tokens - audio_out,
        "audio_output": audio_out,
    }


def cost(usage: Usage, price: Price, when: datetime) -> Cost:
    """The exact cost of a call: each token class at its rate, plus per-request fees.

    Long-context tiers are cliffs (above the threshold every token moves to the tier's
    rates); service tiers and time windows apply on top of the resulting rates.
    """
    period = price.period
    rates = price.rates
    notes: dict[str, Any] = {}
    prompt = usage.prompt_tokens
    for tier in reversed(period.tiers):
        if prompt > tier.above_input_tokens:
            rates = tier.adjustment.apply(rates)
            notes["tier"] = f"above {tier.above_input_tokens} input tokens"
            break
    service = (usage.service_tier or "").lower()
    if service and service not in standard_tiers():
        adjustment = period.service_tiers.get(service)
        if adjustment is not None:
            rates = adjustment.apply(rates)
        notes["service_tier"] = service if adjustment is not None else f"{service} (no table price)"
    for window in period.windows:
        if window.contains(when):
            rates = window.adjustment.apply(rates)
            notes["window"] = f"{window.start:%H:%M}-{window.end:%H:%M} UTC"
            break
    total = Decimal(0)
    lines: dict[str, Any] = {}
    tokens = class_tokens(usage)
    for name, rate_field, fallbacks in USAGE_CLASSES:
        n = tokens[name]
        if not n:
            continue
        rate = getattr(rates, rate_field)
        for fb in fallbacks:
            if rate is not None:
                break
            rate = getattr(rates, fb)
        if rate is None:
            rate = Decimal(0)
            notes.setdefault("missing_rates", []).append(name)
        usd = n * rate / MILLION
        total += usd
        lines[name] = {"tokens": n, "usd_per_mtok": _plain(rate), "usd": _plain(usd)}
    if usage.web_search_requests:
        fee = period.request_fees.get("web_search")
        if fee is not None:
            usd = usage.web_search_requests * fee / THOUSAND
            total += usd
            lines["web_search"] = {"requests": usage.web_search_requests,
                                   "usd_per_1000": _plain(fee), "usd": _plain(usd)}
        else:
            notes.setdefault("missing_rates", []).append("web_search")
    return Cost(total, {"classes": lines, **notes})


def rounded(amount: Decimal) -> Decimal:
    """The stored form of a cost: rounded to 1e-10 USD."""
    return amount.quantize(QUANTUM)


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


class PriceBook:
    """Every loaded table plus the configured overrides, indexed for lookups."""

    def __init__(self, tables: dict[str, dict[str, ModelPrices]], digest: str,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.tables = tables
        self.digest = digest
        self._index: dict[tuple[str, str], ModelPrices] = {}
        for table, models in tables.items():
            for model in models.values():
                for name in (model.name, *model.aliases):
                    self._index[(table, name.lower())] = model
        self.overrides = _parse_overrides(overrides or {})
        # Resolved names and built prices, so a call's lookup is two dict hits.
        self._resolved: dict[tuple[str, tuple[str | None, ...]], ModelPrices | None] = {}
        self._prices: dict[tuple[int, str | None], Price] = {}

    @classmethod
    def load(cls, directory: str | Path | None = None,
             overrides: dict[str, dict[str, Any]] | None = None) -> PriceBook:
        tables: dict[str, dict[str, ModelPrices]] = {}
        hasher = hashlib.sha256()
        for name, text in sorted(_table_files(directory)):
            hasher.update(name.encode() + b"\0" + text.encode() + b"\0")
            tables[name] = parse_table(name, text)
        if overrides:
            hasher.update(repr(sorted(overrides.items())).encode())
        return cls(tables, hasher.hexdigest()[:12], overrides)

    def model(self, table: str, names: Iterable[str | None]) -> ModelPrices | None:
        """The table entry for the first of `names` it knows (exact, alias, then undated)."""
        key = (table, tuple(names))
        if key in self._resolved:
            return self._resolved[key]
        found = None
        for name in key[1]:
            for candidate in _candidates(name):
                found = self._index.get((table, candidate))
                if found is not None:
                    break
            if found is not None:
                break
        if len(self._resolved) >= _CACHE_LIMIT:  # model names come from clients: bound it
            self._resolved.clear()
        self._resolved[key] = found
        return found

    def lookup(self, table: str, names: Iterable[str | None], when: datetime) -> Price | None:
        """The price in force at `when` for the first model name this table knows."""
        model = self.model(table, names)
        if model is None:
            return None
        period = model.at(when)
        if period is None:
            return None
        applied = None
        if self.overrides:
            for key in (f"{table}/{model.name}", table):
                override = self.overrides.get(key)
                if override is not None and override.effective_from <= when:
                    applied = key
                    break
        cached = self._prices.get((id(period), applied))
        if cached is not None:
            return cached
        version = f"{table}.yaml@{period.effective_from:%Y-%m-%d}+{self.digest}"
        rates = period.rates
        if applied is not None:
            override = self.overrides[applied]
            rates = override.apply(rates)
            version = f"{version};override:{applied}@{override.effective_from:%Y-%m-%d}"
        price = self._prices[(id(period), applied)] = Price(model, period, version, rates)
        return price

    def models(self, table: str | None = None) -> Iterator[ModelPrices]:
        for name, models in sorted(self.tables.items()):
            if table is None or name == table:
                yield from models.values()


@dataclass(frozen=True, slots=True)
class Override:
    """A negotiated price from config: a discount, custom rates, or both."""

    effective_from: datetime
    discount_pct: Decimal
    rates: Rates

    def apply(self, base: Rates) -> Rates:
        factor = (Decimal(100) - self.discount_pct) / Decimal(100)
        return self.rates.over(base.scaled(factor, factor))


def _parse_overrides(raw: dict[str, dict[str, Any]]) -> dict[str, Override]:
    result = {}
    for key, spec in raw.items():
        where = f"pricing.overrides.{key}"
        unknown = set(spec) - {*RATE_FIELDS, "discount_pct", "effective_from"}
        if unknown:
            raise PricingError(f"{where}: unknown key {sorted(unknown)[0]}")
        pct = _decimal(spec.get("discount_pct", 0), f"{where}.discount_pct")
        if not Decimal(0) <= pct <= Decimal(100):
            raise PricingError(f"{where}.discount_pct: must be between 0 and 100")
        when = spec.get("effective_from")
        result[key] = Override(
            effective_from=_instant(when, f"{where}.effective_from") if when else EPOCH,
            discount_pct=pct,
            rates=_rates(spec, where),
        )
    return result


def bundled_tables_dir() -> Path:
    """The tables shipped with meterproxy: pricing/ in a checkout, proxy/tables installed."""
    checkout = Path(__file__).resolve().parent.parent / "pricing"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("proxy.tables")))


def _table_files(directory: str | Path | None) -> Iterator[tuple[str, str]]:
    if directory is not None:
        for path in sorted(Path(directory).glob("*.yaml")):
            yield path.stem, path.read_text(encoding="utf-8")
        return
    yield from _table_files(bundled_tables_dir())


def parse_table(name: str, text: str) -> dict[str, ModelPrices]:
    """One table file into model entries; raises PricingError naming the bad entry."""
    where = f"{name}.yaml"
    try:
        data = yaml.load(text, Loader=_DecimalLoader)
    except yaml.YAMLError as exc:
        raise PricingError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PricingError(f"{where}: must be a mapping with a models: key")
    _no_unknown(data, TABLE_KEYS, where)
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise PricingError(f"{where}: models: must be a mapping of model name to entry")
    default_source = data.get("source")
    result: dict[str, ModelPrices] = {}
    for model_name, entry in models.items():
        path = f"{where}: models.{model_name}"
        if not isinstance(entry, dict):
            raise PricingError(f"{path}: must be a mapping")
        _no_unknown(entry, MODEL_KEYS, path)
        raw_periods = entry.get("prices")
        if not isinstance(raw_periods, list) or not raw_periods:
            raise PricingError(f"{path}.prices: needs at least one price period")
        periods = [
            _period(p, f"{path}.prices[{i}]", entry.get("source") or default_source)
            for i, p in enumerate(raw_periods)
        ]
        periods.sort(key=lambda p: p.effective_from)
        aliases = entry.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise PricingError(f"{path}.aliases: must be a list of names")
        max_out = entry.get("max_output_tokens")
        result[str(model_name)] = ModelPrices(
            name=str(model_name),
            table=name,
            aliases=tuple(aliases),
            periods=tuple(periods),
            max_output_tokens=int(max_out) if max_out else None,
        )
    return result


def _period(raw: Any, path: str, default_source: str | None) -> Period:
    if not isinstance(raw, dict):
        raise PricingError(f"{path}: must be a mapping")
    _no_unknown(raw, PERIOD_KEYS, path)
    if "effective_from" not in raw:
        raise PricingError(f"{path}.effective_from: is required")
    until = raw.get("effective_until")
    tiers = tuple(
        sorted(
            (
                Tier(int(t.get("above_input_tokens", 0)),
                     _adjustment(t, f"{path}.tiers[{i}]", {"above_input_tokens"}))
                for i, t in enumerate(_list(raw.get("tiers"), f"{path}.tiers"))
            ),
            key=lambda t: t.above_input_tokens,
        )
    )
    services = raw.get("service_tiers") or {}
    if not isinstance(services, dict):
        raise PricingError(f"{path}.service_tiers: must be a mapping of tier name to prices")
    windows = tuple(
        Window(_clock(w.get("start"), f"{path}.time_windows[{i}].start"),
               _clock(w.get("end"), f"{path}.time_windows[{i}].end"),
               _adjustment(w, f"{path}.time_windows[{i}]", {"start", "end"}))
        for i, w in enumerate(_list(raw.get("time_windows"), f"{path}.time_windows"))
    )
    fees = raw.get("request_fees") or {}
    if not isinstance(fees, dict):
        raise PricingError(f"{path}.request_fees: must be a mapping of fee name to USD per 1000")
    return Period(
        effective_from=_instant(raw["effective_from"], f"{path}.effective_from"),
        effective_until=_instant(until, f"{path}.effective_until") if until else None,
        rates=_rates(raw, path),
        tiers=tiers,
        service_tiers={str(k).lower(): _adjustment(v, f"{path}.service_tiers.{k}", set())
                       for k, v in services.items()},
        windows=windows,
        request_fees={str(k): _decimal(v, f"{path}.request_fees.{k}") for k, v in fees.items()},
        source=raw.get("source") or default_source,
        note=raw.get("note"),
    )


def _adjustment(raw: Any, path: str, extra: set[str]) -> Adjustment:
    if not isinstance(raw, dict):
        raise PricingError(f"{path}: must be a mapping")
    _no_unknown(raw, {*RATE_FIELDS, "multiplier", "input_multiplier", "output_multiplier",
                      "note", *extra}, path)
    both = raw.get("multiplier", 1)
    return Adjustment(
        rates=_rates(raw, path),
        input_multiplier=_decimal(raw.get("input_multiplier", both), f"{path}.input_multiplier"),
        output_multiplier=_decimal(raw.get("output_multiplier", both),
                                   f"{path}.output_multiplier"),
    )


def _rates(raw: dict, path: str) -> Rates:
    values = {}
    for name in RATE_FIELDS:
        if raw.get(name) is not None:
            value = _decimal(raw[name], f"{path}.{name}")
            if value < 0:
                raise PricingError(f"{path}.{name}: a price cannot be negative")
            values[name] = value
    return Rates(**values)


def _decimal(value: Any, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | float | str):
        raise PricingError(f"{path}: must be a number, not {value!r}")
    try:
        return Decimal(str(value))
    except ArithmeticError:
        raise PricingError(f"{path}: must be a number, not {value!r}") from None


def _instant(value: Any, path: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            return _instant(datetime.fromisoformat(value.replace("Z", "+00:00")), path)
        except ValueError:
            pass
    raise PricingError(f"{path}: must be a date (YYYY-MM-DD) or datetime, not {value!r}")


def _clock(value: Any, path: str) -> time:
    if isinstance(value, int):  # YAML 1.1 reads 16:30 as a sexagesimal number
        return time(value // 60 % 24, value % 60)
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise PricingError(f"{path}: must be a time of day HH:MM, not {value!r}") from None


def _list(value: Any, path: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PricingError(f"{path}: must be a list of mappings")
    return value


def _no_unknown(raw: dict, known: set[str], path: str) -> None:
    for key in raw:
        if key not in known:
            raise PricingError(f"{path}: unknown key {key!r}")


def _candidates(name: str | None) -> Iterator[str]:
    """A model name as sent, then without a vendor prefix, then without a date suffix."""
    if not name:
        return
    lowered = name.lower()
    yield lowered
    if "/" in lowered:
        lowered = lowered.rsplit("/", 1)[1]
        yield lowered
    undated = _DATE_SUFFIX.sub("", lowered)
    if undated != lowered:
        yield undated


def rates_dict(rates: Rates) -> dict[str, str | None]:
    """Rates for display: decimal strings per million tokens."""
    return {f.name: (None if getattr(rates, f.name) is None else _plain(getattr(rates, f.name)))
            for f in fields(rates)}


__all__ = ["Cost", "Price", "PriceBook", "PricingError", "Rates", "cost", "rates_dict",
           "replace", "rounded"]
