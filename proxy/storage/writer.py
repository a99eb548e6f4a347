"""The usage-log writer: one thread owns the log and drains a queue in batches.

The request path only appends to a deque, so the event loop never waits on disk, and the
writer is not woken per row (a thread switch per call costs more than the write): it wakes
every `interval_s`, or as soon as `batch_rows` are waiting, and `close` flushes them all.
When the log fails (disk full, read-only, database away) rows wait in a bounded backlog
and are retried every interval; past the bound they are counted as dropped and reported
loudly, never lost silently.

Identical refusals are folded here, off the request path (`RefusalFolder`): the writer
holds a refused call's row for up to `fold_s`, and the identical refusals of the same key
that started within that time are counted into it (`repeat_count`) instead of becoming
rows of their own. Every refusal is journaled as its own row when submitted, and a fold
is journaled as one line before its row is written, so a kill -9 replays either the
separate rows or the folded one, never both; a clean stop or `flush` writes held rows.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import replace
from datetime import datetime
from operator import attrgetter
from typing import Protocol

import structlog

from proxy.outcome import FOLDABLE_OUTCOMES
from proxy.storage.journal import Journal
from proxy.storage.row import COLUMNS, UsageRow

log = structlog.get_logger("meterproxy.writer")


class UsageLog(Protocol):
    def open(self) -> None: ...
    def write(self, rows: list[UsageRow]) -> None: ...
    def close(self) -> None: ...


# What may differ between two refusals folded into one row: when each happened and its id.
# Everything else (key, outcome, status, error text, provider, endpoint, model, stream,
# customer, feature, trace, tags, and the zero tokens and cost) must be equal.
FOLD_VARIES = frozenset({"id", "ts", "duration_ms", "ttfb_ms", "repeat_count"})
_identity = attrgetter(*(c for c in COLUMNS if c not in FOLD_VARIES))
MAX_HELD = 10_000  # distinct refusals held at once; past it a refusal is written unfolded


def foldable(row: UsageRow) -> bool:
    """A refusal of a known key that was never forwarded nor charged."""
    return (row.outcome in FOLDABLE_OUTCOMES and row.key_name is not None
            and row.usage_source is None and not row.cost_usd
            and row.upstream_request_id is None)


def _seconds(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


class _Fold:
    __slots__ = ("absorbed", "count", "row", "start", "until")

    def __init__(self, row: UsageRow, start: float, until: float) -> None:
        self.row, self.start, self.until = row, start, until
        self.count = row.repeat_count
        self.absorbed: list[str] = []


class RefusalFolder:
    """Identical refusals from one key within `fold_s` of the first: one row, counted.

    Used by the writer thread only. `take` returns the rows to write now; a refusal's row
    is held until its window closes (or `release_all`), absorbing identical later ones."""

    def __init__(self, fold_s: float) -> None:
        self.fold_s = fold_s
        self._held: dict[tuple, _Fold] = {}
        self.covers: dict[str, list[str]] = {}  # folded row id -> the ids it absorbed

    def take(self, batch: list[UsageRow], now: float, release_all: bool,
             journal: Journal | None) -> list[UsageRow]:
        out: list[UsageRow] = []
        held = self._held
        for row in batch:
            if self.fold_s <= 0 or not foldable(row):
                out.append(row)
                continue
            key = (row.key_name, _identity(row))
            start = _seconds(row.ts)
            fold = held.get(key)
            if fold is not None and abs(start - fold.start) < self.fold_s:
                fold.count += row.repeat_count
                fold.absorbed.append(row.id)
                continue
            if fold is not None:
                out.append(self._release(held.pop(key), journal))
            if len(held) >= MAX_HELD:
                out.append(row)
                continue
            held[key] = _Fold(row, start, now + self.fold_s)
        if held:
            for key in [k for k, f in held.items() if release_all or f.until <= now]:
                out.append(self._release(held.pop(key), journal))
        return out

    def _release(self, fold: _Fold, journal: Journal | None) -> UsageRow:
        if not fold.absorbed:
            return fold.row
        # A copy: the submitted row may still be read on the event loop's side.
        row = replace(fold.row, repeat_count=fold.count)
        if journal is not None:
            journal.folded(row, fold.absorbed)
        self.covers[row.id] = fold.absorbed
        return row

    @property
    def held(self) -> int:
        return len(self._held)


class UsageWriter:
    """Batches rows from any thread into `log.write`, off the event loop."""

    def __init__(self, log: UsageLog, *, interval_s: float = 0.25, batch_rows: int = 500,
                 max_backlog: int = 100_000, journal: Journal | None = None,
                 fold_s: float = 1.0) -> None:
        self.log = log
        self.journal = journal  # rows queued here survive a kill -9 in it
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self.max_backlog = max_backlog
        self._backlog: list[UsageRow] = []
        self.dropped = 0
        self.healthy = True
        self._rows: deque[UsageRow] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._written = 0
        self._count = itertools.count(1)  # next() on it is atomic: submit from any thread
        self._submitted = 0
        self._cond = threading.Condition()
        self.failures = 0
        self._folder = RefusalFolder(fold_s)
        # flush() asks for held refusals to be written now: a count, so an ask made while
        # the writer reads it is seen on its next round, never lost.
        self._release_asked = 0
        self._release_seen = 0

    def start(self) -> None:
        self.log.open()
        self._thread.start()

    def submit(self, row: UsageRow) -> None:
        """Queue one row; never blocks."""
        if self.journal is not None:
            self.journal.finished(row)
        self._rows.append(row)
        self._submitted = next(self._count)
        if len(self._rows) >= self.batch_rows:
            self._wake.set()

    @property
    def written(self) -> int:
        return self._written

    @property
    def pending(self) -> int:
        """Rows submitted and neither written nor (at the backlog bound) dropped."""
        return self._submitted - self._written - self.dropped

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is written (for tests and shutdown)."""
        target = self._submitted
        self._release_asked += 1
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._written + self.dropped < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Write everything queued, then stop the thread and close the log."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self.log.close()
        if self.journal is not None:
            self.journal.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping, release = self._collect()
            self._hold(self._folder.take(batch, time.monotonic(), release, self.journal))
            if self._backlog:
                self._drain()
        for attempt in range(5):  # shutting down: a few more tries before giving up loudly
            if not self._backlog:
                break
            time.sleep(0.2 * (attempt + 1))
            self._drain()
        if self._backlog:
            log.critical("usage_rows_lost_at_shutdown", rows=len(self._backlog))
            self._resolve(dropped=len(self._ids(self._backlog)))
            self._backlog = []

    def _collect(self) -> tuple[list[UsageRow], bool, bool]:
        """Wait an interval (or until a batch is waiting); take what is queued, whether to
        stop, and whether to write held refusals now."""
        self._wake.wait(self.interval_s)
        self._wake.clear()
        stopping = self._stopping
        asked = self._release_asked
        release = stopping or asked != self._release_seen
        self._release_seen = asked
        batch: list[UsageRow] = []
        rows = self._rows
        while rows:
            batch.append(rows.popleft())
        return batch, stopping, release

    def _hold(self, batch: list[UsageRow]) -> None:
        """Queue rows for writing, within the backlog bound; beyond it, count them loudly."""
        room = self.max_backlog - len(self._backlog)
        if len(batch) > room:
            lost = len(batch) - max(room, 0)
            log.error("usage_rows_dropped", rows=lost, backlog=len(self._backlog),
                      reason="the usage log has been failing and the backlog is full")
            self._resolve(dropped=len(self._ids(batch[max(room, 0):])))
            batch = batch[:max(room, 0)]
        self._backlog.extend(batch)

    def _drain(self) -> None:
        """Write the backlog oldest first; on failure keep it and retry next interval."""
        while self._backlog:
            chunk = self._backlog[: self.batch_rows]
            try:
                self.log.write(chunk)
            except Exception as exc:  # the log must never take the proxy down
                self.failures += 1
                self.healthy = False
                log.error("usage_log_write_failed", rows=len(chunk), backlog=len(self._backlog),
                          error=str(exc))
                return
            del self._backlog[: len(chunk)]
            ids = self._ids(chunk)
            if self.journal is not None:
                self.journal.committed(ids)
            self.healthy = True
            self._resolve(written=len(ids))

    def _ids(self, rows: list[UsageRow]) -> list[str]:
        """The submitted rows these rows stand for (a folded row: its own and the absorbed),
        forgotten once asked: the rows are written or dropped."""
        covers = self._folder.covers
        if not covers:
            return [row.id for row in rows]
        ids = []
        for row in rows:
            ids.append(row.id)
            ids.extend(covers.pop(row.id, ()))
        return ids

    def _resolve(self, written: int = 0, dropped: int = 0) -> None:
        with self._cond:
            self._written += written
            self.dropped += dropped
            self._cond.notify_all()
