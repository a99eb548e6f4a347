"""The usage log as a FOCUS 1.2 CostAndUsage dataset (FinOps Open Cost and Usage Spec).

One row per charge period x provider x model x key x customer x feature x tags x SKU
price, where a SKU is a model's token class (input, cached input, cache writes, output,
...) and its price names the pricing version that set it. Money is Decimal throughout:
ListUnitPrice x PricingQuantity is ListCost to the last digit, and the same for the
contracted (negotiated, after `pricing.overrides`) price.

FOCUS has no null cost, so a call meterproxy could not price cannot be a valid row: by
default such calls are counted and left out (`Unpriced.OMIT`); `Unpriced.INCLUDE` lists
them with null costs and a note, for a reader that prefers seeing them to a valid file.
"""

from __future__ import annotations

import csv
import decimal
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import IO, TYPE_CHECKING, Any

import orjson

from proxy.output import neutralise
from proxy.pricing import PriceBook, cost
from proxy.storage.readers import open_reader
from proxy.token_classes import BY_COLUMN, BY_NAME, Unit, priced_counts
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.config import Settings


class Unpriced(StrEnum):
    """What the export does with calls that have no price."""

    OMIT = "omit"
    INCLUDE = "include"


class Granularity(StrEnum):
    HOUR = "hour"
    DAY = "day"


# Every FOCUS 1.2 CostAndUsage column, then ours (custom columns start with x_).
FOCUS_COLUMNS: tuple[str, ...] = (
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName",
    "BillingAccountType", "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart",
    "CapacityReservationId", "CapacityReservationStatus", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart",
    "CommitmentDiscountCategory", "CommitmentDiscountId", "CommitmentDiscountName",
    "CommitmentDiscountQuantity", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "CommitmentDiscountUnit", "ConsumedQuantity", "ConsumedUnit", "ContractedCost",
    "ContractedUnitPrice", "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost",
    "ListUnitPrice", "PricingCategory", "PricingCurrency",
    "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice", "PricingQuantity", "PricingUnit", "ProviderName",
    "PublisherName", "RegionId", "RegionName", "ResourceId", "ResourceName", "ResourceType",
    "ServiceCategory", "ServiceName", "ServiceSubcategory", "SkuId", "SkuMeter",
    "SkuPriceDetails", "SkuPriceId", "SubAccountId", "SubAccountName", "SubAccountType",
    "Tags",
)
CUSTOM_COLUMNS: tuple[str, ...] = (
    "x_Customer", "x_Feature", "x_TraceCount", "x_PricingVersion", "x_Calls", "x_TokenClass",
    "x_ServiceTier", "x_Note",
)
COLUMNS = FOCUS_COLUMNS + CUSTOM_COLUMNS
DECIMAL_COLUMNS = frozenset({
    "BilledCost", "CommitmentDiscountQuantity", "ConsumedQuantity", "ContractedCost",
    "ContractedUnitPrice", "EffectiveCost", "ListCost", "ListUnitPrice",
    "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice", "PricingQuantity"})
DATETIME_COLUMNS = frozenset({"BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd",
                              "ChargePeriodStart"})
INTEGER_COLUMNS = frozenset({"x_TraceCount", "x_Calls"})

CURRENCY = "USD"
# Tag keys meterproxy itself sets carry this prefix (FOCUS: provider-defined tags are
# prefixed); tag names from headers cannot contain "/", so they can never collide.
TAG_PREFIX = "meterproxy/"
_MILLION = Decimal(1_000_000)
_THOUSAND = Decimal(1000)
# Wide enough that no product of a quantity and a unit price is ever rounded.
_EXACT = decimal.Context(prec=60, traps=[decimal.Inexact, decimal.InvalidOperation])


@dataclass
class ExportStats:
    """What an export wrote and what it left out, for the caller to report."""

    rows: int = 0
    unpriced_calls: int = 0
    unpriced_models: set[str] = field(default_factory=set)


@dataclass
class _Line:
    """One SKU price within a group: the calls' units of one class at one rate."""

    token_class: str
    per: Decimal  # units one table price is for: 1M tokens or 1,000 requests
    unit: str  # Tokens or Requests
    sku_id: str
    sku_price_id: str | None
    details: dict[str, str]
    version: str | None
    service_tier: str | None
    contracted: Decimal | None  # unit price per `per` units, after overrides
    listed: Decimal | None
    note: str | None = None
    units: int = 0
    calls: int = 0


class ListPrices:
    """Public (list) unit prices, for calls priced under a negotiated override.

    A row priced without an override already holds its list price. One priced with an
    override is priced again from the tables without overrides, with the same tiers.
    """

    def __init__(self, book: PriceBook) -> None:
        self.book = book

    def rates(self, row: dict[str, Any], breakdown: dict[str, Any]) -> dict[str, Decimal]:
        """List rates by class name for a row, or {} when the tables no longer price it."""
        when = datetime.fromisoformat(row["ts"].replace("Z", "+00:00"))
        price = self.book.lookup(table_of(row["pricing_version"]), [breakdown.get("model")],
                                 when)
        if price is None:
            return {}
        listed = cost(usage_of(row, breakdown), price, when).breakdown
        return {name: rate for name, line in listed["classes"].items()
                if (rate := line_rate(line)[1]) is not None}


def export(settings: Settings, since: datetime | None = None, until: datetime | None = None,
           granularity: str = "day", unpriced: Unpriced = Unpriced.OMIT,
           stats: ExportStats | None = None) -> Iterator[tuple[Any, ...]]:
    """The FOCUS rows for a time range of the configured usage log, streamed from a cursor."""
    Granularity(granularity)
    prices = ListPrices(PriceBook.load(settings.pricing.dir))
    with open_reader(settings.storage.usage_log) as log:
        yield from focus_rows(log.charges(since, until, granularity), prices, granularity,
                              unpriced, stats)


def table_of(version: str) -> str:
    """The pricing table a version string names: `openai.yaml@2025-01-01+abc` -> openai."""
    return version.split(".yaml@", 1)[0]


def noted(breakdown: dict[str, Any], name: str) -> str | None:
    """A tier a breakdown notes, e.g. `service_tier`: `flex (no table price)` -> `flex`."""
    note = breakdown.get(name)
    return str(note).split(" ", 1)[0] if note else None


def usage_of(row: dict[str, Any], breakdown: dict[str, Any] | None = None) -> Usage:
    """The Usage a logged row's count columns (and its breakdown's tier notes) describe."""
    counts = {c: row.get(c) or 0 for c in BY_COLUMN}
    notes = breakdown or {}
    return Usage(**counts, service_tier=noted(notes, "service_tier"),
                 speed=noted(notes, "speed"))


def line_rate(line: dict[str, Any]) -> tuple[int, Decimal | None]:
    """A breakdown line's units (tokens or requests) and unit price (per 1M or per 1,000)."""
    units = line.get("tokens", line.get("requests", 0))
    rate = line.get("usd_per_mtok", line.get("usd_per_1000"))
    return int(units), Decimal(rate) if rate is not None else None


def unit_of(name: str) -> tuple[Decimal, str]:
    """How many units one price is for, and the unit's name, for a class."""
    requests = name in BY_NAME and BY_NAME[name].unit is Unit.REQUESTS
    return (_THOUSAND, "Requests") if requests else (_MILLION, "Tokens")


def focus_rows(charges: Iterable[dict[str, Any]], list_prices: ListPrices,
               granularity: str = "day", unpriced: Unpriced = Unpriced.OMIT,
               stats: ExportStats | None = None) -> Iterator[tuple[Any, ...]]:
    """FOCUS rows (tuples in COLUMNS order) from charges sorted by group, then trace id.

    Holds one group at a time: its SKU lines and the trace id last seen.
    """
    stats = stats if stats is not None else ExportStats()
    step = timedelta(hours=1) if Granularity(granularity) is Granularity.HOUR \
        else timedelta(days=1)
    key: tuple | None = None
    first: dict[str, Any] = {}
    lines: dict[tuple, _Line] = {}
    traces, last_trace = 0, None
    for row in charges:
        row_key = (row["period"], row["provider"], row["model"], row["key_name"],
                   row["customer"], row["feature"], _tags_key(row["tags"]))
        if row_key != key:
            if key is not None:
                yield from _emit(first, lines, traces, step, stats)
            key, first, lines, traces, last_trace = row_key, row, {}, 0, None
        trace = row["trace_id"]
        if trace is not None and trace != last_trace:
            traces, last_trace = traces + 1, trace
        if row["priced"]:
            _add_priced(lines, row, list_prices)
        else:
            stats.unpriced_calls += row.get("repeat_count") or 1
            stats.unpriced_models.add(f"{row['provider']}/{row['model']}")
            if unpriced is Unpriced.INCLUDE:
                _add_unpriced(lines, row)
    if key is not None:
        yield from _emit(first, lines, traces, step, stats)


def _tags_key(tags: Any) -> Any:
    return tags if not isinstance(tags, dict) else tuple(sorted(tags.items()))


def _json(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return value if isinstance(value, dict) else orjson.loads(value)


def _add_priced(lines: dict[tuple, _Line], row: dict[str, Any], prices: ListPrices) -> None:
    breakdown = _json(row["cost_breakdown"])
    version = row["pricing_version"]
    table, model = table_of(version), breakdown.get("model") or row["model"]
    tier = noted(breakdown, "service_tier")
    qualifiers = {"x_ServiceTier": tier, "x_Speed": noted(breakdown, "speed"),
                  "x_ContextTier": breakdown.get("tier"), "x_TimeWindow": breakdown.get("window")}
    qualifiers = {k: str(v) for k, v in qualifiers.items() if v}
    listed = prices.rates(row, breakdown) if ";override:" in version else None
    missing = set(breakdown.get("missing_rates") or ())
    for name, raw in (breakdown.get("classes") or {}).items():
        units, rate = line_rate(raw)
        if not units or rate is None:
            continue
        per, unit = unit_of(name)
        list_rate = rate if listed is None else listed.get(name, rate)
        sku_id = f"{table}/{model}/{name}"
        price_id = f"{sku_id}@{version}" + "".join(f";{k[2:]}={v}"
                                                   for k, v in qualifiers.items())
        note = None
        if name in missing:
            note = "the table names no price for this class: the meter charged 0"
        elif listed is not None and name not in listed:
            note = "no list price in the current tables: the contracted price is shown"
        line = lines.get((price_id, rate, list_rate))
        if line is None:
            details = {"x_TokenClass": name, "x_PricingVersion": version, **qualifiers}
            line = lines[(price_id, rate, list_rate)] = _Line(
                name, per, unit, sku_id, price_id, details, version, tier, rate, list_rate,
                note)
        line.units += units
        line.calls += row.get("repeat_count") or 1


def _add_unpriced(lines: dict[tuple, _Line], row: dict[str, Any]) -> None:
    for name, units in priced_counts(usage_of(row).counts()).items():
        if not units:
            continue
        line = lines.get((name, None, None))
        if line is None:
            line = lines[(name, None, None)] = _Line(
                name, *unit_of(name), f"{row['provider']}/{row['model']}/{name}", None, {},
                None, None, None, None,
                f"unpriced: no price for {row['model']!r} in the {row['provider']} table")
        line.units += units
        line.calls += row.get("repeat_count") or 1


def _emit(first: dict[str, Any], lines: dict[tuple, _Line], traces: int, step: timedelta,
          stats: ExportStats) -> Iterator[tuple[Any, ...]]:
    start = _period_start(first["period"])
    month = start.replace(day=1, hour=0)
    next_month = (month + timedelta(days=32)).replace(day=1)
    provider, model, key = first["provider"], first["model"], first["key_name"]
    customer, feature = first["customer"], first["feature"]
    tags = {**({f"{TAG_PREFIX}key": key} if key else {}),
            **({f"{TAG_PREFIX}customer": customer} if customer else {}),
            **({f"{TAG_PREFIX}feature": feature} if feature else {}),
            **_json(first["tags"])}
    common = {
        "BillingAccountId": provider, "BillingAccountName": provider,
        "BillingAccountType": "Provider Account", "BillingCurrency": CURRENCY,
        "BillingPeriodStart": _stamp(month), "BillingPeriodEnd": _stamp(next_month),
        "ChargeCategory": "Usage", "ChargeFrequency": "Usage-Based",
        "ChargePeriodStart": _stamp(start), "ChargePeriodEnd": _stamp(start + step),
        "InvoiceIssuerName": provider, "ProviderName": provider, "PublisherName": provider,
        "ServiceCategory": "AI and Machine Learning", "ServiceName": provider,
        "ServiceSubcategory": "Generative AI",
        "SubAccountId": key, "SubAccountName": key, "SubAccountType": "API Key" if key else None,
        "Tags": orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode() if tags else None,
        "x_Customer": customer, "x_Feature": feature, "x_TraceCount": traces,
    }
    for line in lines.values():
        quantity = _EXACT.divide(Decimal(line.units), line.per)
        label = line.token_class.replace("_", " ")
        row = {**common,
               "ChargeDescription": f"{model}: {label} {line.unit.lower()}",
               "ConsumedQuantity": Decimal(line.units), "ConsumedUnit": line.unit,
               "PricingQuantity": quantity, "PricingUnit": f"{line.per:f} {line.unit}",
               "SkuId": line.sku_id, "SkuMeter": f"{label.title()} {line.unit}",
               "SkuPriceId": line.sku_price_id,
               "SkuPriceDetails": orjson.dumps(line.details).decode() if line.details else None,
               "x_PricingVersion": line.version, "x_Calls": line.calls,
               "x_TokenClass": line.token_class, "x_ServiceTier": line.service_tier,
               "x_Note": line.note}
        if line.contracted is not None and line.listed is not None:
            contracted = _EXACT.multiply(line.contracted, quantity)
            row |= {"PricingCategory": "Standard", "PricingCurrency": CURRENCY,
                    "ListUnitPrice": line.listed, "PricingCurrencyListUnitPrice": line.listed,
                    "ListCost": _EXACT.multiply(line.listed, quantity),
                    "ContractedUnitPrice": line.contracted,
                    "PricingCurrencyContractedUnitPrice": line.contracted,
                    "ContractedCost": contracted, "EffectiveCost": contracted,
                    "PricingCurrencyEffectiveCost": contracted, "BilledCost": contracted}
        stats.rows += 1
        yield tuple(row.get(c) for c in COLUMNS)


def _period_start(period: str) -> datetime:
    if len(period) == 10:
        return datetime.fromisoformat(period).replace(tzinfo=UTC)
    return datetime.fromisoformat(period + ":00:00").replace(tzinfo=UTC)


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(value: Any) -> Any:
    """A cell as CSV text: None as empty, decimals in plain notation with a decimal point,
    text that a spreadsheet would run as a formula neutralised (proxy.output).

    The point matters: a reader that infers column types (as focus-validator's does) takes
    a column of whole token counts for integers, and FOCUS wants them Decimal.
    """
    if value is None:
        return ""
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return text if "." in text else f"{text}.0"
    if isinstance(value, str):
        return neutralise(value)  # x_Customer, x_Feature, tags: a caller's header values
    return value


def write_csv(rows: Iterable[tuple[Any, ...]], out: IO[str]) -> None:
    """CSV with a header row; empty cells are nulls."""
    for chunk in csv_chunks(rows):
        out.write(chunk)


def csv_chunks(rows: Iterable[tuple[Any, ...]], size: int = 500) -> Iterator[str]:
    """The CSV `size` rows at a time (the header with the first), for streaming."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for n, row in enumerate(rows, 1):
        writer.writerow([plain(v) for v in row])
        if n % size == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def write_parquet(rows: Iterable[tuple[Any, ...]], path: str, batch_rows: int = 10_000,
                  progress: Callable[[int], None] | None = None) -> None:
    """Parquet (needs the `parquet` extra: pyarrow), written a batch at a time.

    Money and quantities are decimal128(38, 24): exact, as in the CSV. A value with more
    fractional digits than that raises rather than being rounded.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("parquet output needs pyarrow: pip install 'meterproxy[parquet]'") \
            from None
    scale = Decimal("1e-24")

    def kind(column: str) -> Any:
        if column in DECIMAL_COLUMNS:
            return pa.decimal128(38, 24)
        if column in DATETIME_COLUMNS:
            return pa.timestamp("s", tz="UTC")
        if column in INTEGER_COLUMNS:
            return pa.int64()
        return pa.string()

    schema = pa.schema([(c, kind(c)) for c in COLUMNS])
    converters: list[Callable[[Any], Any]] = []
    for column in COLUMNS:
        if column in DECIMAL_COLUMNS:
            converters.append(lambda v: None if v is None else v.quantize(scale, context=_EXACT))
        elif column in DATETIME_COLUMNS:
            converters.append(lambda v: None if v is None else datetime.fromisoformat(
                v.replace("Z", "+00:00")))
        else:
            converters.append(lambda v: v)
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[tuple[Any, ...]] = []
        written = 0

        def flush() -> None:
            nonlocal written
            columns = list(zip(*batch, strict=True)) if batch else [[] for _ in COLUMNS]
            arrays = [pa.array([convert(v) for v in values], type=schema.field(i).type)
                      for i, (convert, values) in enumerate(zip(converters, columns,
                                                                strict=True))]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            written += len(batch)
            if progress is not None:
                progress(written)
            batch.clear()

        for row in rows:
            batch.append(row)
            if len(batch) >= batch_rows:
                flush()
        if batch or not written:
            flush()
