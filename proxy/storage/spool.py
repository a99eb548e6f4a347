"""The spool: while the usage log's database is away, rows wait in a local file.

Rows that cannot be written are appended (and fsynced) to an append-only JSON-lines file,
one per process, held under an exclusive lock. Once the file has rows, later rows queue
behind them, so the log receives every row in the order it was written. A replay sends
the file in batches, oldest first; the database ignores an id it already has, so a batch
replayed twice (the process died between the commit and the bookkeeping) is still one
row per call. A file whose process died is adopted and replayed by the next one to start.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import orjson
import structlog

from proxy.storage import LogUnavailable
from proxy.storage.row import COLUMNS, UsageRow

log = structlog.get_logger("meterproxy.usage_log")

REPLAY_BATCH = 1000


class RemoteLog(Protocol):
    """A usage log on a server: raises LogUnavailable when it cannot be reached."""

    def open(self) -> None: ...
    def write(self, rows: list[UsageRow]) -> None: ...
    def close(self) -> None: ...


@dataclass
class SpoolFile:
    """One spool file, locked by this process, and how far it has been replayed."""

    path: Path
    handle: IO[bytes]
    replayed: int = 0  # byte offset: everything before it is in the database
    rows: int = 0  # rows appended and not yet replayed (as far as this process knows)
    own: bool = False

    def size(self) -> int:
        return os.fstat(self.handle.fileno()).st_size


def encode(rows: list[UsageRow]) -> bytes:
    return b"".join(orjson.dumps(dict(zip(COLUMNS, row.values(), strict=True))) + b"\n"
                    for row in rows)


def decode(line: bytes) -> UsageRow:
    data = orjson.loads(line)
    return UsageRow(**{k: v for k, v in data.items() if k in COLUMNS})


class SpooledUsageLog:
    """A RemoteLog that never loses a row while its server is unreachable."""

    def __init__(self, inner: RemoteLog, directory: Path, *, retry_s: float = 1.0) -> None:
        self.inner = inner
        self.directory = directory
        self.retry_s = retry_s
        self._files: list[SpoolFile] = []  # adopted orphans first, then this process's own
        self._own: SpoolFile | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._retry_loop, name="usage-spool",
                                        daemon=True)
        self.spooled_total = 0
        self.replayed_total = 0

    # --- the UsageLog protocol ----------------------------------------------------------

    def open(self) -> None:
        """Adopt spool files left by dead processes, then try the server (it may be away)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._adopt()
        try:
            self.inner.open()
        except LogUnavailable as exc:
            log.warning("usage_log_unavailable", error=str(exc),
                        action="spooling rows locally until it returns")
        self._thread.start()  # replays adopted files at once, without holding up start-up

    def write(self, rows: list[UsageRow]) -> None:
        with self._lock:
            if self.spooled:
                self._append(rows)
                self._replay()
                return
            try:
                self.inner.write(rows)
            except LogUnavailable as exc:
                log.warning("usage_log_unavailable", error=str(exc), rows=len(rows),
                            action="spooling rows locally until it returns")
                self._append(rows)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._replay()
            left = self.spooled
            if left:
                log.warning("usage_log_spool_kept", rows=left,
                            files=[str(f.path) for f in self._files],
                            action="replayed at the next start")
            own = [self._own] if self._own is not None and self._own not in self._files else []
            for spool in [*self._files, *own]:
                self._release(spool, delete=not spool.rows)
            self._files, self._own = [], None
        self.inner.close()

    # --- the spool ------------------------------------------------------------------------

    @property
    def spooled(self) -> int:
        """Rows waiting in spool files for the server."""
        return sum(f.rows for f in self._files)

    def _adopt(self) -> None:
        for path in sorted(self.directory.glob("spool-*.jsonl"), key=_age):
            try:
                handle = path.open("r+b")
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process owns it
                handle.close()
                continue
            spool = SpoolFile(path=path, handle=handle)
            spool.rows = sum(1 for _ in self._lines(spool))
            if spool.rows:
                log.info("usage_log_spool_adopted", file=str(path), rows=spool.rows)
                self._files.append(spool)
            else:
                self._release(spool, delete=True)

    def _append(self, rows: list[UsageRow]) -> None:
        if self._own is None:
            path = self.directory / f"spool-{time.time_ns()}-{os.getpid()}.jsonl"
            handle = path.open("a+b")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            self._own = SpoolFile(path=path, handle=handle, own=True)
            self._files.append(self._own)
        spool = self._own
        if spool not in self._files:
            self._files.append(spool)
        data = encode(rows)
        spool.handle.seek(0, os.SEEK_END)
        spool.handle.write(data)
        spool.handle.flush()
        os.fsync(spool.handle.fileno())
        spool.rows += len(rows)
        self.spooled_total += len(rows)

    def _lines(self, spool: SpoolFile):
        """(end offset, line) of each whole line after the replayed point."""
        spool.handle.seek(spool.replayed)
        offset = spool.replayed
        for line in spool.handle:
            if not line.endswith(b"\n"):  # a torn last line: its process died mid-append
                break
            offset += len(line)
            yield offset, line

    def _replay(self) -> bool:
        """Send spooled rows to the server, oldest first; False if it is still away."""
        while self._files:
            spool = self._files[0]
            batch: list[UsageRow] = []
            end = spool.replayed
            for offset, line in self._lines(spool):
                batch.append(decode(line))
                end = offset
                if len(batch) >= REPLAY_BATCH:
                    break
            if batch:
                try:
                    self.inner.write(batch)
                except LogUnavailable:
                    return False
                except Exception as exc:  # kept, and tried again: a row is never dropped
                    log.error("usage_log_replay_failed", rows=len(batch), error=str(exc))
                    return False
                spool.replayed = end
                spool.rows = max(spool.rows - len(batch), 0)
                self.replayed_total += len(batch)
                log.info("usage_log_replayed", rows=len(batch), left=self.spooled,
                         file=str(spool.path))
                continue
            # Every row of this file is in the database now.
            spool.rows = 0
            self._files.pop(0)
            if spool.own:
                spool.handle.truncate(0)
                spool.handle.flush()
                os.fsync(spool.handle.fileno())
                spool.replayed = 0
            else:
                self._release(spool, delete=True)
        return True

    def _release(self, spool: SpoolFile, *, delete: bool) -> None:
        if delete:
            # Emptied before unlinking, so a process that opened it meanwhile finds nothing.
            spool.handle.truncate(0)
            spool.path.unlink(missing_ok=True)
        spool.handle.close()
        if spool is self._own:
            self._own = None

    def _retry_loop(self) -> None:
        while True:
            if self.spooled:
                with self._lock:
                    self._replay()
            if self._stop.wait(self.retry_s):
                return


def _age(path: Path) -> tuple[int, str]:
    """Spool files in the order they were started (their name begins with a time)."""
    stem = path.stem.split("-")
    return (int(stem[1]) if len(stem) > 1 and stem[1].isdigit() else 0, path.name)
