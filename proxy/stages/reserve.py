"""reserve: hold the call's maximum cost against every budget that applies."""

from __future__ import annotations

from proxy.dialects.base import EndpointKind
from proxy.exchange import Exchange
from proxy.runtime import Runtime


async def reserve(rt: Runtime, x: Exchange) -> None:
    """Refuse the call (429) if any applicable budget cannot cover its estimate."""
    if rt.budgets is None or x.call.policy is EndpointKind.FREE:
        return
    await rt.budgets.reserve(x)
