"""The price book: every table, indexed, and the price in force for a model at a moment.

The bundled tables come first; each table in `pricing.dir` is an overlay on top of them
(its models are added to the table of the same name, replacing a bundled entry of the
same name; a file with a new name is a new table). Negotiated prices from
`pricing.overrides` apply last.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.pricing.tables import (
    EPOCH,
    ModelPrices,
    Period,
    PricingError,
    Rates,
    bundled_tables_dir,
    decimal,
    instant,
    parse_table,
    rates_from,
    table_files,
)
from proxy.token_classes import PRICED, RATE_KEYS, Unit

_DATE_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|@\d{8})$")
_LATEST = re.compile(r"-latest$")
_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Price:
    """The price that applies to one call, and the version string that names it."""

    model: ModelPrices
    period: Period
    version: str
    rates: Any
    # Each class's rate, resolved once (the cost engine's, per call otherwise).
    resolved: dict[str, tuple[Decimal | None, int, bool]] = field(init=False, compare=False,
                                                                  repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolved", resolve_rates(self.rates))


# Each priced class's rate keys in fallback order, unit size and kind.
_CLASSES = tuple((c.name, (c.rate, *c.fallback), c.per, c.unit is Unit.TOKENS) for c in PRICED)


def resolve_rates(rates: Any) -> dict[str, tuple[Decimal | None, int, bool]]:
    """Each priced class's rate (the first of its keys the rates name), unit size and
    kind. A table's are resolved once, when its Price is built (Price.resolved)."""
    resolved = {}
    for name, keys, per, is_tokens in _CLASSES:
        rate = None
        for key in keys:
            rate = getattr(rates, key)
            if rate is not None:
                break
        resolved[name] = (rate, per, is_tokens)
    return resolved


@dataclass(frozen=True, slots=True)
class Override:
    """A negotiated price from config: a discount, custom rates, or both."""

    effective_from: datetime
    discount_pct: Decimal
    rates: Any

    def apply(self, base: Any) -> Any:
        factor = (Decimal(100) - self.discount_pct) / Decimal(100)
        return self.rates.over(base.scaled(factor, factor))


class PriceBook:
    """Every loaded table plus the configured overrides, indexed for lookups."""

    def __init__(self, tables: dict[str, dict[str, ModelPrices]], digest: str,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.tables = tables
        self.digest = digest
        self._index: dict[tuple[str, str], ModelPrices] = {}
        self._fine_tunes: dict[tuple[str, str], ModelPrices] = {}
        for table, models in tables.items():
            for model in models.values():
                for name in (model.name, *model.aliases):
                    self._index[(table, name.lower())] = model
                if model.fine_tune_of:
                    self._fine_tunes[(table, model.fine_tune_of)] = model
        self.overrides = _parse_overrides(overrides or {})
        # Resolved names and built prices, so a call's lookup is two dict hits.
        self._resolved: dict[tuple[str, tuple[str | None, ...]], ModelPrices | None] = {}
        self._prices: dict[tuple[int, str | None], Price] = {}

    @classmethod
    def load(cls, directory: str | Path | None = None,
             overrides: dict[str, dict[str, Any]] | None = None) -> PriceBook:
        """The bundled tables with `directory`'s tables laid over them (blocking I/O)."""
        tables: dict[str, dict[str, ModelPrices]] = {}
        hasher = hashlib.sha256()
        sources = [bundled_tables_dir()]
        if directory is not None and Path(directory).resolve() != sources[0].resolve():
            sources.append(Path(directory))
        for layer, source in enumerate(sources):
            for name, text in table_files(source):
                hasher.update(f"{layer}:{name}".encode() + b"\0" + text.encode() + b"\0")
                tables.setdefault(name, {}).update(parse_table(name, text))
        if overrides:
            hasher.update(repr(sorted(overrides.items())).encode())
        return cls(tables, hasher.hexdigest()[:12], overrides)

    def model(self, table: str, names: Iterable[str | None]) -> ModelPrices | None:
        """The entry for the first of `names` the table knows: exact or alias, then without
        a vendor prefix, a date suffix or `-latest`; `ft:<base>:...` is the base's fine-tune."""
        key = (table, names if type(names) is tuple else tuple(names))
        if key in self._resolved:
            return self._resolved[key]
        found = None
        for name in key[1]:
            found = self._find(table, name)
            if found is not None:
                break
        if len(self._resolved) >= _CACHE_LIMIT:  # model names come from clients: bound it
            self._resolved.clear()
        self._resolved[key] = found
        return found

    def _find(self, table: str, name: str | None) -> ModelPrices | None:
        if name and name.lower().startswith("ft:"):
            base = name.split(":")[1].lower()
            for candidate in _candidates(base):
                tuned = self._fine_tunes.get((table, candidate))
                if tuned is not None:
                    return tuned
            return None
        for candidate in _candidates(name):
            found = self._index.get((table, candidate))
            if found is not None:
                return found
        return None

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


def _parse_overrides(raw: dict[str, dict[str, Any]]) -> dict[str, Override]:
    result = {}
    for key, spec in raw.items():
        where = f"pricing.overrides.{key}"
        unknown = set(spec) - {*RATE_KEYS, "discount_pct", "effective_from"}
        if unknown:
            raise PricingError(f"{where}: unknown key {sorted(unknown)[0]}")
        pct = decimal(spec.get("discount_pct", 0), f"{where}.discount_pct")
        if not Decimal(0) <= pct <= Decimal(100):
            raise PricingError(f"{where}.discount_pct: must be between 0 and 100")
        when = spec.get("effective_from")
        result[key] = Override(
            effective_from=instant(when, f"{where}.effective_from") if when else EPOCH,
            discount_pct=pct,
            rates=rates_from(spec, where),
        )
    return result


def _candidates(name: str | None) -> Iterator[str]:
    """A model name as sent, then without a vendor prefix, a date suffix or `-latest`."""
    if not name:
        return
    lowered = name.lower()
    yield lowered
    if "/" in lowered:
        lowered = lowered.rsplit("/", 1)[1]
        yield lowered
    undated = _LATEST.sub("", _DATE_SUFFIX.sub("", lowered))
    if undated != lowered:
        yield undated


__all__ = ["Override", "Price", "PriceBook", "Rates"]
