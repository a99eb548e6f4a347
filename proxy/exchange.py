"""The Exchange: one call's state as it moves through the pipeline's stages."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy.dialects import DEFAULT
from proxy.dialects.base import Call, Dialect, Metered
from proxy.outcome import Outcome, UsageSource
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.config import KeyConfig
    from proxy.runtime import Upstream

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now_ms: int | None = None) -> str:
    """A ULID: 48 bits of milliseconds and 80 random bits, so ids sort by time."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(slots=True)
class Exchange:
    """Everything known about one call; each stage reads what earlier stages wrote."""

    request: web.Request
    id: str
    started: datetime
    t0: float
    # route
    upstream: Upstream | None = None
    path: str = "/"
    # read_body / inspect
    body: bytes = b""
    encoded: bytes | None = None  # the body as sent, when it came with a Content-Encoding
    payload: Any = None
    call: Call = field(default_factory=lambda: Call(endpoint="unknown"))
    # authenticate
    key_name: str | None = None
    key: KeyConfig | None = None
    upstream_key: str | None = None
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    query: MultiDict[str] = field(default_factory=MultiDict)
    # attribute
    customer: str | None = None
    feature: str | None = None
    trace_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # budgets
    reservation: Any = None
    budget_remaining: Decimal | None = None
    # forward and relay
    forwarded: bool = False
    status: int | None = None
    upstream_status: int | None = None
    outcome: Outcome = Outcome.OK
    error: str | None = None
    ttfb: float | None = None
    upstream_request_id: str | None = None
    metered: Metered | None = None
    # record
    usage: Usage | None = None
    usage_source: UsageSource | None = None
    cost: Decimal | None = None
    cost_breakdown: dict[str, Any] | None = None
    pricing_version: str | None = None
    priced: bool = True
    prefix_hash: str | None = None
    prefix_tokens: int | None = None
    recorded: bool = False

    @classmethod
    def begin(cls, request: web.Request, started: datetime | None = None) -> Exchange:
        """A new call; `started` is injected by tests that need another time."""
        now = time.time()
        return cls(
            request=request,
            id=new_id(int(now * 1000)),
            started=started or datetime.fromtimestamp(now, UTC),
            t0=time.perf_counter(),
        )

    @property
    def dialect(self) -> Dialect:
        return self.upstream.dialect if self.upstream is not None else DEFAULT

    @property
    def provider(self) -> str | None:
        return self.upstream.name if self.upstream is not None else None

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000, 3)

    def mark_first_byte(self) -> None:
        if self.ttfb is None:
            self.ttfb = self.elapsed_ms()
