"""What a usage question is, in domain terms: the dimensions, the query, its filters.

The SQL that answers it lives in `proxy.storage` (`LogReader.usage`, built by
`proxy.storage.sql`); this module holds no SQL, so the CLI, the admin API, the report and
the forecast speak only in these terms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from proxy.outcome import ERROR_OUTCOMES, REFUSAL_OUTCOMES
from proxy.storage.row import COLUMNS
from proxy.token_classes import COLUMNS as CLASS_COLUMNS

if TYPE_CHECKING:
    from proxy.storage.readers import LogReader

__all__ = ["COLUMNS", "ERROR_OUTCOMES", "REFUSAL_OUTCOMES"]

TAG_NAME = re.compile(r"[a-z0-9_.-]{1,64}")
# Columns that name a thing (groupable, filterable); numbers are aggregated instead.
DIMENSIONS = ("key_name", "provider", "endpoint", "model", "response_model", "stream",
              "status", "outcome", "usage_source", "pricing_version", "priced", "customer",
              "feature", "trace_id", "upstream_request_id")
INTEGER_DIMENSIONS = ("stream", "status", "priced")
TIME_BUCKETS = ("hour", "day", "week", "month")
UNITS = Decimal("1e-10")
BUCKETS_PER_E = 25  # duration histogram resolution: e^(1/25) = 4% wide buckets
COARSE_BUCKETS = ("week", "month")


class QueryError(ValueError):
    """A query that names an unknown column or has a malformed filter."""


Filter = dict[str, str | list[str]]


@dataclass
class UsageQuery:
    """What to sum, over which calls, grouped and ordered how.

    `where` keeps calls whose dimension equals the value (a list: any of them; "": no
    value); `exclude` drops them. `durations` adds p50_ms and p95_ms (a second pass).
    `spend_only` sums just calls, cost and unpriced calls: series for charts and
    forecasts read two to three times faster that way.
    """

    since: datetime | None = None
    until: datetime | None = None
    group_by: list[str] = field(default_factory=list)
    where: Filter = field(default_factory=dict)
    exclude: Filter = field(default_factory=dict)
    order_by: str | None = None
    limit: int | None = None
    durations: bool = False
    spend_only: bool = False


SUMS = (*CLASS_COLUMNS, "unpriced_calls", "errors", "refusals")
RATES = ("cache_hit_rate", "error_rate")
PERCENTILES = ("p50_ms", "p95_ms")
ORDERABLE = ("calls", "cost_usd", *SUMS, *RATES, *PERCENTILES)
KNOWN_NAMES = (*DIMENSIONS, *TIME_BUCKETS, "tag:NAME")



def parse_filters(items: Iterable[str]) -> tuple[Filter, Filter]:
    """`k=v` and `k!=v` strings (CLI --where, API where=) into (where, exclude).

    A name given twice matches any of its values; an empty value means "not set".
    """
    where: dict[str, list[str]] = {}
    exclude: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QueryError(f"a filter is key=value or key!=value, not {item!r}")
        target = where
        if key.endswith("!"):
            key, target = key[:-1], exclude
        target.setdefault(key.strip(), []).append(value)

    def simplify(found: dict[str, list[str]]) -> Filter:
        return {k: v[0] if len(v) == 1 else v for k, v in found.items()}

    return simplify(where), simplify(exclude)


def percentile(histogram: dict[int, int], fraction: float) -> float | None:
    """The nearest-rank percentile of a log-scale histogram, at its bucket's centre."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round(math.exp(bucket / BUCKETS_PER_E), 3)
    raise AssertionError("unreachable")


def explain(reader: LogReader, call_id: str) -> dict[str, Any] | None:
    """One call's row and how it was priced: the price period, each class x rate, the total.

    `lines` lists each token class (tokens, USD per 1M, USD) and each per-request fee
    (requests, USD per 1000, USD), so the total can be checked by hand.
    """
    row = reader.call(call_id)
    if row is None:
        return None
    breakdown = row["cost_breakdown"]
    if isinstance(breakdown, str | bytes):
        breakdown = orjson.loads(breakdown)
    breakdown = breakdown or {}
    if isinstance(row.get("tags"), str | bytes):
        row["tags"] = orjson.loads(row["tags"])
    row["cost_breakdown"] = breakdown
    lines = []
    for name, line in breakdown.get("classes", {}).items():
        if "tokens" in line:
            lines.append({"class": name, "tokens": line["tokens"],
                          "usd_per_mtok": line.get("usd_per_mtok"), "usd": line.get("usd")})
        else:
            lines.append({"class": name, "requests": line.get("requests"),
                          "usd_per_1000": line.get("usd_per_1000"), "usd": line.get("usd")})
    notes = {k: breakdown[k] for k in ("tier", "service_tier", "window", "missing_rates")
             if k in breakdown}
    cost = row["cost_usd"]
    total = Decimal(str(cost)).quantize(UNITS) if cost is not None else None
    return {
        "id": row["id"],
        "priced": bool(row["priced"]),
        "pricing_version": row["pricing_version"],
        "model": breakdown.get("model", row["model"]),
        "period": breakdown.get("period"),
        "lines": lines,
        "notes": notes,
        "total_usd": total,
        "row": {**row, "cost_usd": total},  # the stored REAL as the exact amount it holds
    }
