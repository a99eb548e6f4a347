"""The budget ledger: reserve, settle and read spend, atomically.

A budget's counters live under a key that names the budget's scope and its period's
start, so a new period is simply a new key: nothing has to reset at midnight. `reserve`
checks every hold of a call and adds them all, or none; `settle` replaces a call's holds
by what it really cost, once (a repeated settle changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Hold:
    """What one call holds against one budget period until it settles."""

    key: str
    usd: Decimal
    tokens: int
    limit_usd: Decimal | None
    limit_tokens: int | None
    block: bool
    period_end: datetime | None


@dataclass(slots=True)
class Balance:
    spent_usd: Decimal = ZERO
    reserved_usd: Decimal = ZERO
    spent_tokens: int = 0
    reserved_tokens: int = 0


@dataclass(slots=True)
class Reserved:
    """The answer to a reserve: the hold that did not fit (nothing was held), or balances."""

    refused: Hold | None
    balances: list[Balance] = field(default_factory=list)


class Ledger(Protocol):
    # True when several proxy instances share the ledger: alerts are then claimed first.
    shared: bool

    async def reserve(self, call_id: str, holds: list[Hold], ttl_s: float) -> Reserved: ...

    async def settle(self, call_id: str, usd: Decimal, tokens: int) -> list[tuple[Hold, Balance]]:
        """Replace the call's holds by its actual cost; returns each budget's new balance."""

    async def balances(self, keys: list[str]) -> dict[str, Balance]: ...

    async def seed(self, totals: dict[str, tuple[Decimal, int]]) -> None:
        """Spend rebuilt from the usage log, for periods the ledger knows nothing of."""

    async def claim_alert(self, key: str, threshold: Decimal) -> bool:
        """True for exactly one caller per budget period and threshold."""

    async def close(self) -> None: ...


def fits(hold: Hold, balance: Balance) -> bool:
    """Whether a blocking hold still fits under its limits."""
    if not hold.block:
        return True
    if hold.limit_usd is not None and \
            balance.spent_usd + balance.reserved_usd + hold.usd > hold.limit_usd:
        return False
    return not (hold.limit_tokens is not None
                and balance.spent_tokens + balance.reserved_tokens + hold.tokens
                > hold.limit_tokens)


class LocalLedger:
    """The embedded ledger: counters in this process, rebuilt from the usage log at start.

    Every method runs on the event loop without awaiting inside, so each is atomic.
    """

    shared = False

    def __init__(self) -> None:
        self._balances: dict[str, Balance] = {}
        # A call's holds, until its settle: the process that made them is this one and
        # alive, so they never expire (a call may outlive reservations.ttl_s).
        self._calls: dict[str, list[Hold]] = {}

    def _balance(self, key: str) -> Balance:
        balance = self._balances.get(key)
        if balance is None:
            balance = self._balances[key] = Balance()
        return balance

    async def reserve(self, call_id: str, holds: list[Hold], ttl_s: float) -> Reserved:
        balances = [self._balance(h.key) for h in holds]
        for hold, balance in zip(holds, balances, strict=True):
            if not fits(hold, balance):
                return Reserved(refused=hold)
        for hold, balance in zip(holds, balances, strict=True):
            balance.reserved_usd += hold.usd
            balance.reserved_tokens += hold.tokens
        self._calls[call_id] = holds
        return Reserved(refused=None, balances=balances)

    async def settle(self, call_id: str, usd: Decimal, tokens: int) -> list[tuple[Hold, Balance]]:
        holds = self._calls.pop(call_id, None)
        if holds is None:
            return []
        settled = []
        for hold in holds:
            balance = self._balance(hold.key)
            balance.reserved_usd -= hold.usd
            balance.reserved_tokens -= hold.tokens
            balance.spent_usd += usd
            balance.spent_tokens += tokens
            settled.append((hold, balance))
        return settled

    async def balances(self, keys: list[str]) -> dict[str, Balance]:
        return {k: self._balances.get(k, Balance()) for k in keys}

    async def seed(self, totals: dict[str, tuple[Decimal, int]]) -> None:
        for key, (usd, tokens) in totals.items():
            balance = self._balance(key)
            if balance.spent_usd == ZERO and balance.spent_tokens == 0:
                balance.spent_usd, balance.spent_tokens = usd, tokens

    async def claim_alert(self, key: str, threshold: Decimal) -> bool:
        return True  # one process: the Alerts' own record is the claim

    async def close(self) -> None:
        return None
