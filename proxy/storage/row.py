"""One usage-log row: the columns of the contract, in order."""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter


@dataclass(slots=True)
class UsageRow:
    """A call as the usage log stores it (DESIGN.md, section 3, "Usage log")."""

    id: str
    ts: str
    duration_ms: float | None = None
    ttfb_ms: float | None = None
    key_name: str | None = None
    provider: str | None = None
    endpoint: str | None = None
    model: str | None = None
    response_model: str | None = None
    stream: int = 0
    status: int | None = None
    outcome: str = "ok"
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: str | None = None
    cost_usd: float | None = None
    cost_breakdown: str | None = None
    pricing_version: str | None = None
    priced: int = 1
    customer: str | None = None
    feature: str | None = None
    trace_id: str | None = None
    tags: str | None = None
    upstream_request_id: str | None = None
    error: str | None = None

    def values(self) -> tuple:
        """The row in column order (astuple would deep-copy every value: ten times slower)."""
        return _values(self)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))
_values = attrgetter(*COLUMNS)
TOKEN_COLUMNS = ("input_tokens", "cached_input_tokens", "cache_write_tokens",
                 "cache_write_1h_tokens", "output_tokens", "reasoning_tokens")
