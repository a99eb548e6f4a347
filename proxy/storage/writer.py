"""The usage-log writer: one thread owns the log and drains a queue in batches.

The request path only appends to a queue, so the event loop never waits on disk. Rows are
written at least every `interval_s` or every `batch_rows`, and `close` flushes them all.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol

import structlog

from proxy.storage.row import UsageRow

log = structlog.get_logger("meterproxy.writer")


class UsageLog(Protocol):
    def open(self) -> None: ...
    def write(self, rows: list[UsageRow]) -> None: ...
    def close(self) -> None: ...


_STOP = object()


class UsageWriter:
    """Batches rows from any thread into `log.write`, off the event loop."""

    def __init__(self, log: UsageLog, *, interval_s: float = 0.25, batch_rows: int = 500) -> None:
        self.log = log
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._written = 0
        self._submitted = 0
        self._cond = threading.Condition()
        self.failures = 0

    def start(self) -> None:
        self.log.open()
        self._thread.start()

    def submit(self, row: UsageRow) -> None:
        """Queue one row; never blocks."""
        self._submitted += 1
        self._queue.put(row)

    @property
    def written(self) -> int:
        return self._written

    @property
    def pending(self) -> int:
        return self._submitted - self._written

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is written (for tests and shutdown)."""
        target = self._submitted
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Write everything queued, then stop the thread and close the log."""
        self._queue.put(_STOP)
        self._thread.join()
        self.log.close()

    def _run(self) -> None:
        batch: list[UsageRow] = []
        stopping = False
        while not stopping:
            deadline = time.monotonic() + self.interval_s
            try:
                item = self._queue.get(timeout=self.interval_s)
            except queue.Empty:
                continue
            while True:
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= self.batch_rows:
                    break
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
                batch = []

    def _write(self, batch: list[UsageRow]) -> None:
        for attempt in range(3):
            try:
                self.log.write(batch)
                break
            except Exception as exc:  # the log must never take the proxy down
                self.failures += 1
                log.error("usage_log_write_failed", rows=len(batch), attempt=attempt + 1,
                          error=str(exc))
                time.sleep(0.2 * (attempt + 1))
        with self._cond:
            self._written += len(batch)
            self._cond.notify_all()
