"""The local ledger's rate windows: a true sliding log per limit and scope.

Each admitted call is an entry (admission time, tokens, USD) kept while it is younger than
the window, with running sums, so a check is O(1) and a purge is O(entries leaving). The
wait a refused call is told is read off the entries: the time until enough of the oldest
have left for the call to fit.
"""

from __future__ import annotations

import math
from collections import deque
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.storage.ledger import Window

ZERO = Decimal(0)


class Entry:
    """One admitted call in one window; `live` until it leaves (or its window is dropped)."""

    __slots__ = ("live", "tokens", "ts", "usd")

    def __init__(self, ts: float, tokens: int, usd: Decimal) -> None:
        self.ts, self.tokens, self.usd, self.live = ts, tokens, usd, True


class SlidingLog:
    """The calls one rate limit admitted for one scope in the last `span_s` seconds."""

    __slots__ = ("entries", "span_s", "tokens", "usd")

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.entries: deque[Entry] = deque()
        self.tokens = 0
        self.usd = ZERO

    def purge(self, now: float) -> None:
        """Drop the entries admitted `span_s` or longer ago: (now - span, now] is the window."""
        entries, edge = self.entries, now - self.span_s
        while entries and entries[0].ts <= edge:
            gone = entries.popleft()
            gone.live = False
            self.tokens -= gone.tokens
            self.usd -= gone.usd

    def wait_s(self, w: Window, now: float) -> float:
        """0 if the call fits now; else the seconds until it would; inf if it never fits
        (the call alone is over a maximum)."""
        if (w.max_tokens is not None and w.tokens > w.max_tokens) or \
                (w.max_usd is not None and w.usd > w.max_usd):
            return math.inf
        need = 0  # how many of the oldest entries must leave
        if w.max_requests is not None:
            need = max(need, len(self.entries) + 1 - w.max_requests)
        if w.max_tokens is not None or w.max_usd is not None:
            tokens, usd, i = self.tokens + w.tokens, self.usd + w.usd, 0
            while (w.max_tokens is not None and tokens > w.max_tokens) or \
                    (w.max_usd is not None and usd > w.max_usd):
                tokens -= self.entries[i].tokens
                usd -= self.entries[i].usd
                i += 1
            need = max(need, i)
        if need <= 0:
            return 0.0
        return self.entries[need - 1].ts + self.span_s - now

    def enter(self, w: Window, now: float) -> Entry:
        # Entries stay in time order even if the wall clock steps back.
        ts = max(now, self.entries[-1].ts) if self.entries else now
        entry = Entry(ts, w.tokens, w.usd)
        self.entries.append(entry)
        self.tokens += w.tokens
        self.usd += w.usd
        return entry

    def settle(self, entry: Entry, tokens: int, usd: Decimal) -> None:
        """Replace a live entry's estimate by the call's actual amounts."""
        if entry.live:
            self.tokens += tokens - entry.tokens
            self.usd += usd - entry.usd
            entry.tokens, entry.usd = tokens, usd

    def idle(self, now: float) -> bool:
        return not self.entries or self.entries[-1].ts <= now - self.span_s


def retry_after(wait_s: float | None) -> int | None:
    """A `Retry-After` in whole seconds, rounded up, at least 1 (None: never)."""
    return None if wait_s is None else max(1, math.ceil(wait_s - 1e-9))
