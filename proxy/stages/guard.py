"""guard: refuse a call whose key, customer or feature a spend anomaly has blocked."""

from __future__ import annotations

from proxy.dialects.base import EndpointKind
from proxy.errors import Kind, MeterError
from proxy.exchange import Exchange
from proxy.runtime import Runtime


def guard(rt: Runtime, x: Exchange) -> None:
    """A dict lookup per watched scope, no I/O: the anomaly check keeps `blocked` current.

    The key is the scope a caller cannot escape: customer and feature come from headers
    (unless the key pins them), so a blocked customer's caller may name another one, but
    the key's own spend, every customer included, is watched too."""
    blocked = rt.services.anomalies.blocked
    if not blocked or x.call.policy is EndpointKind.FREE:
        return
    for kind, value in (("key", x.key_name), ("customer", x.customer),
                        ("feature", x.feature)):
        anomaly_id = blocked.get((kind, value)) if value is not None else None
        if anomaly_id is not None:
            status = x.key.refusal_status if x.key is not None else None
            raise MeterError(
                Kind.ANOMALY_BLOCKED,
                f"anomaly_blocked: calls of this {kind} are blocked after a spend anomaly "
                f"({anomaly_id}); an operator clears it with `meterproxy anomalies --clear "
                f"{anomaly_id}`", headers={"x-should-retry": "false"},
                status=status or rt.settings.server.refusal_status, code="anomaly_blocked")
