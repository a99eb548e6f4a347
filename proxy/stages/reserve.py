"""reserve: hold the call's maximum cost against every budget that applies, and enter it in
every rate window that applies."""

from __future__ import annotations

from proxy.dialects.base import EndpointKind
from proxy.exchange import Exchange
from proxy.ratelimits import RateLimited
from proxy.runtime import Runtime


async def reserve(rt: Runtime, x: Exchange) -> None:
    """Refuse the call (429) if any applicable budget cannot cover its estimate or any
    applicable rate limit has no room for it."""
    if rt.budgets is None or x.call.policy is EndpointKind.FREE:
        return
    try:
        await rt.budgets.reserve(x)
    except RateLimited as refused:
        rt.metrics.rate_limited[(("limit", refused.limit),)] += 1
        raise
