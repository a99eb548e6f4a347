"""Rate limits: requests, tokens and dollars per sliding second, minute or hour, per scope.

A limit uses the budgets' scope syntax (`{key: x}`, `{customer: "*"}`: each value its own
window) and lives on the budgets' ledger, checked in the same atomic step as the budgets
(proxy.budgets). Unlike a budget refusal, a rate-limited call is worth retrying: its 429
says when the window will admit it (`Retry-After`) and carries no `x-should-retry: false`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from proxy.config import PER_SECONDS, Per, Settings
from proxy.errors import Kind, MeterError
from proxy.storage.ledger import Window
from proxy.storage.window_log import retry_after


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One configured rate limit; `name` labels its metrics and names its windows."""

    name: str
    scope: tuple[tuple[str, str], ...]
    per: Per
    requests: int | None
    tokens: int | None
    usd: Decimal | None

    @property
    def span_ms(self) -> int:
        return PER_SECONDS[self.per] * 1000

    @property
    def counts_amounts(self) -> bool:
        """Whether the call's estimate matters (a requests-only limit needs none)."""
        return self.tokens is not None or self.usd is not None

    def window(self, scope: str, tokens: int, usd: Decimal) -> Window:
        return Window(key=f"rl:{self.name}:{scope}/{self.per}", span_ms=self.span_ms,
                      tokens=tokens, usd=usd, max_requests=self.requests,
                      max_tokens=self.tokens, max_usd=self.usd)

    def describe(self, scope: str | None = None) -> str:
        limits = []
        if self.requests is not None:
            limits.append(f"{self.requests:,} requests")
        if self.tokens is not None:
            limits.append(f"{self.tokens:,} tokens")
        if self.usd is not None:
            limits.append(f"${self.usd:f}")
        where = f" for {scope}" if scope else ""
        return f"the rate limit {self.name!r} ({' and '.join(limits)} per {self.per}){where}"


def rate_limits_from(settings: Settings) -> list[RateLimit]:
    """The configured limits; an unnamed one is named by its place in the list."""
    return [RateLimit(name=conf.name or f"rate_limits[{i}]",
                      scope=tuple(sorted(conf.scope.items())), per=conf.per,
                      requests=conf.requests, tokens=conf.tokens,
                      usd=Decimal(str(conf.usd)) if conf.usd is not None else None)
            for i, conf in enumerate(settings.rate_limits)]


class RateLimited(MeterError):
    """A call refused by a rate limit: 429, retryable, `Retry-After` from the window."""

    def __init__(self, limit: RateLimit, scope: str, wait_s: float | None) -> None:
        seconds = retry_after(wait_s)
        if seconds is None:
            # Larger than the window holds: no wait admits it, so say so and do not
            # invite retries (the one rate-limited answer that is final).
            super().__init__(Kind.RATE_LIMITED,
                             f"rate_limited: this call alone is more than {limit.describe(scope)} "
                             "allows; it cannot be admitted",
                             headers={"x-should-retry": "false"})
        else:
            super().__init__(Kind.RATE_LIMITED,
                             f"rate_limited: {limit.describe(scope)} is reached; "
                             f"retry in {seconds} s", headers={"Retry-After": str(seconds)})
        self.limit = limit.name
