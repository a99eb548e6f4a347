"""The budget ledger: reserve, settle and read spend, atomically.

A budget's counters live under a key that names the budget's scope and its period's
start, so a new period is simply a new key: nothing has to reset at midnight. `reserve`
checks every hold of a call and adds them all, or none; `settle` replaces a call's holds
by what it really cost, once (a repeated settle changes nothing).

Rate limits live on the same ledger, in the same atomic step: a `Window` is a sliding log
of the calls admitted under one limit and scope in the last `span_ms`. A call is entered at
the moment it is admitted with its estimate (tokens, USD); its settle replaces the estimate
by the actual amounts while the entry is still in the window. A window refuses a call that
would take it over any of its maxima and says when, from its contents, it would fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from proxy.storage.window_log import Entry, SlidingLog

ZERO = Decimal(0)
SWEEP_EVERY_S = 60.0  # how often the local ledger drops idle windows and trace budgets


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
    # A period that never ends (`total`) whose counters are forgotten after this many
    # seconds without a call: per-trace budgets, one per agent run (0: kept for ever).
    idle_s: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """One call's entry in one rate limit's sliding window, with that window's maxima."""

    key: str
    span_ms: int
    tokens: int
    usd: Decimal
    max_requests: int | None
    max_tokens: int | None
    max_usd: Decimal | None


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
    # A rate limit that had no room (nothing was held), and the seconds until it would
    # have: None when the call alone is larger than the window's maximum.
    limited: Window | None = None
    retry_after_s: float | None = None


class Ledger(Protocol):
    # True when several proxy instances share the ledger: alerts are then claimed first.
    shared: bool

    async def reserve(self, call_id: str, holds: list[Hold], ttl_s: float,
                      windows: Sequence[Window] = (), now: datetime | None = None
                      ) -> Reserved:
        """Hold every budget and enter every rate window, or none of them. Budgets are
        checked first: a call no retry can admit is told so rather than to wait.
        `now` is the local ledger's clock; a shared ledger keeps its own."""

    async def settle(self, call_id: str, usd: Decimal, tokens: int) -> list[tuple[Hold, Balance]]:
        """Replace the call's holds by its actual cost; returns each budget's new balance."""

    async def balances(self, keys: list[str]) -> dict[str, Balance]: ...

    async def seed(self, totals: dict[str, tuple[Decimal, int]],
                   idle: Mapping[str, int] | None = None, now: datetime | None = None
                   ) -> None:
        """Spend rebuilt from the usage log, for periods the ledger knows nothing of;
        `idle` names the keys forgotten that many seconds after `now` without a call."""

    async def claim_alert(self, key: str, threshold: Decimal) -> bool:
        """True for exactly one caller per budget period and threshold."""

    async def close(self) -> None: ...


_NONE = Balance()  # read-only: what balance_now says of a key never held


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
        self._windows: dict[str, SlidingLog] = {}
        self._entries: dict[str, list[tuple[SlidingLog, Entry]]] = {}  # a call's, to settle
        # Budgets forgotten when idle (per-trace `total`): key -> (idle seconds, last use).
        self._idle: dict[str, tuple[int, float]] = {}
        self._sweep_at = 0.0

    def _balance(self, key: str) -> Balance:
        balance = self._balances.get(key)
        if balance is None:
            balance = self._balances[key] = Balance()
        return balance

    def balance_now(self, key: str) -> Balance:
        """A key's balance as it stands (zero for one never held): this ledger is the
        whole truth, so the budgets read it in place."""
        return self._balances.get(key) or _NONE

    async def reserve(self, call_id: str, holds: list[Hold], ttl_s: float,
                      windows: Sequence[Window] = (), now: datetime | None = None
                      ) -> Reserved:
        return self.reserve_now(call_id, holds, windows, now)

    def reserve_now(self, call_id: str, holds: list[Hold], windows: Sequence[Window] = (),
                    now: datetime | None = None) -> Reserved:
        """`reserve` without a coroutine: the budgets call it in place, on the loop."""
        t = now.timestamp() if now is not None else time.time()
        if t >= self._sweep_at:
            self._sweep(t)
        balances = [self._balance(h.key) for h in holds]
        for hold, balance in zip(holds, balances, strict=True):
            if not fits(hold, balance):
                return Reserved(refused=hold)
        logs = [self._window(w) for w in windows]
        waits = []
        for w, log in zip(windows, logs, strict=True):
            log.purge(t)
            waits.append((log.wait_s(w, t), w))
        wait, limited = max(waits, key=lambda pair: pair[0], default=(0.0, None))
        if limited is not None and wait > 0:
            return Reserved(refused=None, limited=limited,
                            retry_after_s=None if math.isinf(wait) else wait)
        for hold, balance in zip(holds, balances, strict=True):
            balance.reserved_usd += hold.usd
            balance.reserved_tokens += hold.tokens
            if hold.idle_s:
                self._idle[hold.key] = (hold.idle_s, t)
        self._calls[call_id] = holds
        if windows:
            self._entries[call_id] = [(log, log.enter(w, t))
                                      for w, log in zip(windows, logs, strict=True)]
        return Reserved(refused=None, balances=balances)

    def _window(self, w: Window) -> SlidingLog:
        log = self._windows.get(w.key)
        if log is None:
            log = self._windows[w.key] = SlidingLog(w.span_ms / 1000)
        return log

    def _sweep(self, now: float) -> None:
        """Forget windows no call entered for a whole span, and idle per-trace budgets."""
        self._sweep_at = now + SWEEP_EVERY_S
        for key in [k for k, log in self._windows.items() if log.idle(now)]:
            del self._windows[key]
        for key, (idle_s, last) in list(self._idle.items()):
            balance = self._balances.get(key)
            if last + idle_s <= now and (balance is None or (
                    balance.reserved_usd == ZERO and balance.reserved_tokens == 0)):
                self._balances.pop(key, None)
                del self._idle[key]

    async def settle(self, call_id: str, usd: Decimal, tokens: int) -> list[tuple[Hold, Balance]]:
        return self.settle_now(call_id, usd, tokens)

    def settle_now(self, call_id: str, usd: Decimal, tokens: int) -> list[tuple[Hold, Balance]]:
        """`settle` without a coroutine: the budgets call it in place, on the loop."""
        for log, entry in self._entries.pop(call_id, ()):
            log.settle(entry, tokens, usd)
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

    async def seed(self, totals: dict[str, tuple[Decimal, int]],
                   idle: Mapping[str, int] | None = None, now: datetime | None = None
                   ) -> None:
        t = now.timestamp() if now is not None else time.time()
        for key, (usd, tokens) in totals.items():
            balance = self._balance(key)
            if balance.spent_usd == ZERO and balance.spent_tokens == 0:
                balance.spent_usd, balance.spent_tokens = usd, tokens
            if idle and idle.get(key) and key not in self._idle:
                self._idle[key] = (idle[key], t)

    async def claim_alert(self, key: str, threshold: Decimal) -> bool:
        return True  # one process: the Alerts' own record is the claim

    async def close(self) -> None:
        return None
