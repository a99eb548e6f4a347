"""The usage-log writer: one thread owns the log and drains a queue in batches.

The request path only appends to a deque, so the event loop never waits on disk, and the
writer is not woken per row (a thread switch per call costs more than the write): it wakes
every `interval_s`, or as soon as `batch_rows` are waiting, and `close` flushes them all.
When the log fails (disk full, read-only, database away) rows wait in a bounded backlog
and are retried every interval; past the bound they are counted as dropped and reported
loudly, never lost silently.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Protocol

import structlog

from proxy.storage.journal import Journal
from proxy.storage.row import UsageRow

log = structlog.get_logger("meterproxy.writer")


class UsageLog(Protocol):
    def open(self) -> None: ...
    def write(self, rows: list[UsageRow]) -> None: ...
    def close(self) -> None: ...



class UsageWriter:
    """Batches rows from any thread into `log.write`, off the event loop."""

    def __init__(self, log: UsageLog, *, interval_s: float = 0.25, batch_rows: int = 500,
                 max_backlog: int = 100_000, journal: Journal | None = None) -> None:
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
            batch, stopping = self._collect()
            self._hold(batch)
            if self._backlog:
                self._drain()
        for attempt in range(5):  # shutting down: a few more tries before giving up loudly
            if not self._backlog:
                break
            time.sleep(0.2 * (attempt + 1))
            self._drain()
        if self._backlog:
            log.critical("usage_rows_lost_at_shutdown", rows=len(self._backlog))
            self._resolve(dropped=len(self._backlog))
            self._backlog = []

    def _collect(self) -> tuple[list[UsageRow], bool]:
        """Wait an interval (or until a batch is waiting); take what is queued, and whether
        to stop."""
        self._wake.wait(self.interval_s)
        self._wake.clear()
        stopping = self._stopping
        batch: list[UsageRow] = []
        rows = self._rows
        while rows:
            batch.append(rows.popleft())
        return batch, stopping

    def _hold(self, batch: list[UsageRow]) -> None:
        """Queue rows for writing, within the backlog bound; beyond it, count them loudly."""
        room = self.max_backlog - len(self._backlog)
        if len(batch) > room:
            lost = len(batch) - max(room, 0)
            log.error("usage_rows_dropped", rows=lost, backlog=len(self._backlog),
                      reason="the usage log has been failing and the backlog is full")
            self._resolve(dropped=lost)
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
            if self.journal is not None:
                self.journal.committed([row.id for row in chunk])
            self.healthy = True
            self._resolve(written=len(chunk))

    def _resolve(self, written: int = 0, dropped: int = 0) -> None:
        with self._cond:
            self._written += written
            self.dropped += dropped
            self._cond.notify_all()
