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
    ANOMALY_BLOCKED = "anomaly_blocked"  # its scope is blocked by a spend anomaly
    REJECTED = "rejected"
    PROXY_ERROR = "proxy_error"


# Outcomes counted as errors (the call failed) and as refusals (a budget, a rate limit
# or an anomaly guardrail said no).
ERROR_OUTCOMES = (Outcome.UPSTREAM_ERROR, Outcome.PROXY_ERROR, Outcome.REJECTED)
REFUSAL_OUTCOMES = (Outcome.BUDGET_EXCEEDED, Outcome.RATE_LIMITED, Outcome.ANOMALY_BLOCKED)
# Calls the proxy refused itself, before anything was forwarded or charged: the only rows
# the writer may fold (identical ones from one key within a second become one row with
# repeat_count N). A rate limit's refusals fold too: a client retrying into a closed
# window must not write a row per attempt either, nor an agent looping into an anomaly block.
FOLDABLE_OUTCOMES = frozenset({Outcome.BUDGET_EXCEEDED.value, Outcome.RATE_LIMITED.value,
                               Outcome.ANOMALY_BLOCKED.value, Outcome.REJECTED.value})


class UsageSource(StrEnum):
    """Where a row's token counts came from."""

    PROVIDER = "provider"  # the provider reported them
    ESTIMATED = "estimated"  # the answer ended whole but without usage: counted locally
    PARTIAL = "partial"  # the answer was cut short: counted up to the cut
