"""Errors the proxy itself raises; a dialect turns each into its provider's error shape."""

from __future__ import annotations

from enum import Enum

from proxy.outcome import Outcome


class Kind(Enum):
    """What went wrong, independent of any provider's vocabulary."""

    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    REQUEST_TIMEOUT = "request_timeout"
    BUDGET_EXCEEDED = "budget_exceeded"
    RATE_LIMITED = "rate_limited"
    ANOMALY_BLOCKED = "anomaly_blocked"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


STATUS = {
    Kind.INVALID_REQUEST: 400,
    Kind.AUTHENTICATION: 401,
    Kind.PERMISSION: 403,
    Kind.NOT_FOUND: 404,
    Kind.TOO_LARGE: 413,
    Kind.REQUEST_TIMEOUT: 408,
    Kind.BUDGET_EXCEEDED: 429,
    Kind.RATE_LIMITED: 429,
    Kind.ANOMALY_BLOCKED: 429,
    Kind.UPSTREAM_UNREACHABLE: 502,
    Kind.UPSTREAM_TIMEOUT: 504,
    Kind.UNAVAILABLE: 503,
    Kind.INTERNAL: 500,
}

# The usage-log outcome of a call the proxy ended with this kind of error.
OUTCOME = {
    Kind.BUDGET_EXCEEDED: Outcome.BUDGET_EXCEEDED,
    Kind.RATE_LIMITED: Outcome.RATE_LIMITED,
    Kind.ANOMALY_BLOCKED: Outcome.ANOMALY_BLOCKED,
    Kind.UPSTREAM_UNREACHABLE: Outcome.UPSTREAM_ERROR,
    Kind.UPSTREAM_TIMEOUT: Outcome.UPSTREAM_ERROR,
    Kind.INTERNAL: Outcome.PROXY_ERROR,
    Kind.UNAVAILABLE: Outcome.PROXY_ERROR,
}


# Refusals a retry cannot change: SDKs retry 429 and 5xx unless told `x-should-retry: false`.
# A rate limit is not one of them: waiting `Retry-After` admits the call.
FINAL = frozenset({Kind.BUDGET_EXCEEDED, Kind.ANOMALY_BLOCKED, Kind.INVALID_REQUEST,
                   Kind.AUTHENTICATION, Kind.PERMISSION, Kind.NOT_FOUND, Kind.TOO_LARGE})


class MeterError(Exception):
    """A call the proxy ends itself, with a message safe to show the client."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        # A machine-readable reason more precise than the kind (e.g. model_unpriced).
        self.code = code
        self.headers = headers or {}
        # A kind's usual status, unless configured otherwise (budgets' refusal_status).
        self._status = status

    @property
    def status(self) -> int:
        return self._status or STATUS[self.kind]

    @property
    def outcome(self) -> Outcome:
        return OUTCOME.get(self.kind, Outcome.REJECTED)
