"""Pricing tables: YAML files (one per provider, format in pricing/README.md) read into
frozen model entries with their dated price periods. Read once at start-up, never per call.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field, make_dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from proxy.token_classes import (
    RATE_KEYS,
    SIDE_OF_RATE,
    TOKEN_RATE_KEYS,
    UNIT_RATE_KEYS,
    Side,
)

# Keys of a price period besides its rates (rates are every price key of token_classes).
PERIOD_KEYS = {*TOKEN_RATE_KEYS, "effective_from", "effective_until", "tiers",
               "service_tiers", "speeds", "time_windows", "request_fees", "source", "checked",
               "note", "uncertain"}
MODEL_KEYS = {"aliases", "prices", "max_output_tokens", "context_window", "note", "uncertain",
              "source", "checked", "fine_tune_of"}
TABLE_KEYS = {"provider", "source", "checked", "note", "models"}
ADJUSTMENT_KEYS = {*TOKEN_RATE_KEYS, "multiplier", "input_multiplier", "output_multiplier",
                   "note"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PricingError(ValueError):
    """A table that does not follow the format, phrased as `file: path: problem`."""


class DecimalLoader(yaml.SafeLoader):
    """YAML that reads numbers with a fraction as Decimal, so 0.075 stays 0.075."""


DecimalLoader.add_constructor(
    "tag:yaml.org,2002:float", lambda loader, node: Decimal(loader.construct_scalar(node))
)


def _scaled(self: Any, input_factor: Decimal, output_factor: Decimal) -> Any:
    """Token rates times the factor of their side; unit charges as they are."""
    factors = {Side.INPUT: input_factor, Side.OUTPUT: output_factor, Side.UNIT: Decimal(1)}
    return Rates(**{k: None if (v := getattr(self, k)) is None else v * factors[SIDE_OF_RATE[k]]
                    for k in RATE_KEYS})


def _over(self: Any, base: Any) -> Any:
    """These rates, with base's where these name none."""
    return Rates(**{k: getattr(self, k) if getattr(self, k) is not None else getattr(base, k)
                    for k in RATE_KEYS})


# USD per unit of each priced class (token_classes: per 1M tokens or per 1,000 requests);
# None where the table names no price.
Rates = make_dataclass(
    "Rates", [(k, Decimal | None, field(default=None)) for k in RATE_KEYS],
    frozen=True, slots=True,
    namespace={"scaled": _scaled, "over": _over, "__module__": __name__,
               "__doc__": "A period's price per class (token_classes.RATE_KEYS)."})


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A change to a period's rates: explicit prices, multipliers, or both."""

    rates: Any = field(default_factory=Rates)
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
    speeds: dict[str, Adjustment] = field(default_factory=dict)
    source: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ModelPrices:
    name: str
    table: str
    aliases: tuple[str, ...]
    periods: tuple[Period, ...]
    max_output_tokens: int | None = None
    context_window: int | None = None
    fine_tune_of: str | None = None  # names `ft:<base>:...` resolve to this entry

    def at(self, when: datetime) -> Period | None:
        starts = [p.effective_from for p in self.periods]
        i = bisect.bisect_right(starts, when) - 1
        if i < 0:
            return None
        period = self.periods[i]
        if period.effective_until is not None and when >= period.effective_until:
            return None
        return period


def bundled_tables_dir() -> Path:
    """The tables shipped with meterproxy: pricing/ in a checkout, proxy/tables installed."""
    checkout = Path(__file__).resolve().parents[2] / "pricing"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("proxy.tables")))


def table_files(directory: str | Path | None) -> Iterator[tuple[str, str]]:
    """(table name, YAML text) of every table in `directory` (default: the bundled ones)."""
    for path in sorted(Path(directory or bundled_tables_dir()).glob("*.yaml")):
        yield path.stem, path.read_text(encoding="utf-8")


def parse_table(name: str, text: str) -> dict[str, ModelPrices]:
    """One table file into model entries; raises PricingError naming the bad entry."""
    where = f"{name}.yaml"
    try:
        data = yaml.load(text, Loader=DecimalLoader)
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
        base = entry.get("fine_tune_of")
        result[str(model_name)] = ModelPrices(
            name=str(model_name),
            table=name,
            aliases=tuple(aliases),
            periods=tuple(periods),
            max_output_tokens=int(max_out) if max_out else None,
            context_window=int(entry["context_window"]) if entry.get("context_window") else None,
            fine_tune_of=str(base).lower() if base else None,
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
    _no_unknown(fees, set(UNIT_RATE_KEYS), f"{path}.request_fees")
    speeds = raw.get("speeds") or {}
    if not isinstance(speeds, dict):
        raise PricingError(f"{path}.speeds: must be a mapping of speed name to prices")
    return Period(
        effective_from=instant(raw["effective_from"], f"{path}.effective_from"),
        effective_until=instant(until, f"{path}.effective_until") if until else None,
        rates=_rates({**raw, **fees}, path),
        tiers=tiers,
        service_tiers={str(k).lower(): _adjustment(v, f"{path}.service_tiers.{k}", set())
                       for k, v in services.items()},
        windows=windows,
        speeds={str(k).lower(): _adjustment(v, f"{path}.speeds.{k}", set())
                for k, v in speeds.items()},
        source=raw.get("source") or default_source,
        note=raw.get("note"),
    )


def _adjustment(raw: Any, path: str, extra: set[str]) -> Adjustment:
    if not isinstance(raw, dict):
        raise PricingError(f"{path}: must be a mapping")
    _no_unknown(raw, ADJUSTMENT_KEYS | extra, path)
    both = raw.get("multiplier", 1)
    return Adjustment(
        rates=_rates(raw, path),
        input_multiplier=decimal(raw.get("input_multiplier", both), f"{path}.input_multiplier"),
        output_multiplier=decimal(raw.get("output_multiplier", both),
                                   f"{path}.output_multiplier"),
    )


def rates_from(raw: dict, path: str) -> Any:
    """The rates a mapping names (price keys of token_classes), checked."""
    return _rates(raw, path)


def _rates(raw: dict, path: str) -> Any:
    values = {}
    for name in RATE_KEYS:
        if raw.get(name) is not None:
            value = decimal(raw[name], f"{path}.{name}")
            if value < 0:
                raise PricingError(f"{path}.{name}: a price cannot be negative")
            values[name] = value
    return Rates(**values)


def decimal(value: Any, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | float | str):
        raise PricingError(f"{path}: must be a number, not {value!r}")
    try:
        return Decimal(str(value))
    except ArithmeticError:
        raise PricingError(f"{path}: must be a number, not {value!r}") from None


def instant(value: Any, path: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            return instant(datetime.fromisoformat(value.replace("Z", "+00:00")), path)
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


