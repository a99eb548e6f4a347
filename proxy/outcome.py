"""The closed sets a usage row's `outcome` and `usage_source` come from (DESIGN.md)."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a call ended, as its usage row says."""

    OK = "ok"
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_DISCONNECT = "client_disconnect"
    BUDGET_EXCEEDED = "budget_exceeded"
    RATE_LIMITED = "rate_limited"
    REJECTED = "rejected"
    PROXY_ERROR = "proxy_error"


# Outcomes counted as errors (the call failed) and as refusals (a budget or rate limit
# said no).
ERROR_OUTCOMES = (Outcome.UPSTREAM_ERROR, Outcome.PROXY_ERROR, Outcome.REJECTED)
REFUSAL_OUTCOMES = (Outcome.BUDGET_EXCEEDED, Outcome.RATE_LIMITED)


class UsageSource(StrEnum):
    """Where a row's token counts came from."""

    PROVIDER = "provider"  # the provider reported them
    ESTIMATED = "estimated"  # the answer ended whole but without usage: counted locally
    PARTIAL = "partial"  # the answer was cut short: counted up to the cut
