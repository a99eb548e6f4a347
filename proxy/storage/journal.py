"""The journal of calls whose rows are not yet in the usage log, so `kill -9` loses none.

Four kinds of line, appended (one `write` each, O_APPEND) to a file this process holds
locked: `+` a call went upstream (a stand-in row), `=` its real row was queued for the
writer, `~` the writer folded identical refusals into one row (that row, and the ids it
absorbed: one line, so a replay sees the fold whole or not at all), `-` the writer
committed these ids. A process that dies leaves its file unlocked;
the next one to start reads it and queues, for every id never committed, its real row if
it had one, else the stand-in marked `proxy_error` (a stream cut off by the kill). The log
ignores ids it already holds, so a replay can never double a row.

Files roll over at SEGMENT_BYTES; an old one is deleted once every call with a line in
it is committed (a call can begin in one and finish in the next). The cost on the request
path is two small appends to the page cache per call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid
from pathlib import Path

import orjson
import structlog

from proxy.storage.row import COLUMNS, UsageRow

log = structlog.get_logger("meterproxy.journal")

SEGMENT_BYTES = 16 * 1024 * 1024
KILLED = "meterproxy stopped (killed) before this call ended; row replayed from its journal"


class _Segment:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.size = 0
        self.open_ids = 0


class Journal:
    """This process's journal in `directory` (shared with other processes' journals)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._name = uuid.uuid4().hex[:12]
        self._n = 0
        self._lock = threading.Lock()
        # Each uncommitted id -> the segments holding its lines (which stay until it is).
        self._of: dict[str, list[_Segment]] = {}
        self._segments: list[_Segment] = []
        self.failures = 0
        self._current = self._roll()

    def _roll(self) -> _Segment:
        self._n += 1
        segment = _Segment(self.directory / f"journal-{self._name}-{self._n}.log")
        self._segments.append(segment)
        return segment

    def _append(self, line: bytes, call_id: str | None = None) -> None:
        """Append one line (a call's, if `call_id`: the segment that holds it stays until
        the call is committed); a full or failing disk costs durability, never the call."""
        with self._lock:
            segment = self._current
            try:
                os.write(segment.fd, line)
            except OSError as exc:
                self.failures += 1
                if self.failures == 1 or self.failures % 1000 == 0:
                    log.error("journal_write_failed", error=str(exc), failures=self.failures)
                return
            if call_id is not None:
                held = self._of.setdefault(call_id, [])
                if not held or held[-1] is not segment:
                    held.append(segment)
                    segment.open_ids += 1
            segment.size += len(line)
            if segment.size > SEGMENT_BYTES:
                with contextlib.suppress(OSError):
                    self._current = self._roll()
                    self._retire()

    def began(self, row: UsageRow) -> None:
        """A call went upstream: its stand-in row, should the process die mid-call."""
        self._append(b"+" + orjson.dumps(row.values()) + b"\n", row.id)

    def finished(self, row: UsageRow) -> None:
        """The call's real row is queued for the writer."""
        self._append(b"=" + orjson.dumps(row.values()) + b"\n", row.id)

    def folded(self, row: UsageRow, absorbed: list[str]) -> None:
        """`row` (its repeat_count now counting them) stands for the `absorbed` rows too."""
        self._append(b"~" + orjson.dumps([row.values(), absorbed]) + b"\n", row.id)

    def committed(self, ids: list[str]) -> None:
        """These rows are in the usage log (called by the writer thread)."""
        self._append(b"-" + orjson.dumps(ids) + b"\n")
        with self._lock:
            for call_id in ids:
                for segment in self._of.pop(call_id, ()):
                    segment.open_ids -= 1
            self._retire()

    def _retire(self) -> None:
        for segment in [s for s in self._segments[:-1] if s.open_ids <= 0]:
            self._segments.remove(segment)
            segment.path.unlink(missing_ok=True)
            os.close(segment.fd)

    def close(self) -> None:
        """A clean shutdown: every row was written, nothing to replay."""
        with self._lock:
            for segment in self._segments:
                if not self._of:
                    segment.path.unlink(missing_ok=True)
                os.close(segment.fd)
            self._segments = []


def recover(directory: str | Path) -> list[UsageRow]:
    """Rows of calls that dead processes' journals never saw committed; their files go.

    Files still locked belong to live processes (other workers) and are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    states: dict[str, tuple[str, list]] = {}
    claimed: list[tuple[Path, int]] = []
    for path in sorted(directory.glob("journal-*.log"), key=_order):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        claimed.append((path, fd))
        for line in path.read_bytes().splitlines():
            kind, data = line[:1], line[1:]
            try:
                value = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # the last line of a killed process may be cut short
            if kind == b"-":
                for call_id in value:
                    states.pop(call_id, None)
            elif kind == b"~":
                values, absorbed = value
                for call_id in absorbed:
                    states.pop(call_id, None)
                states[values[0]] = ("=", values)
            elif kind == b"=" or (kind == b"+" and value[0] not in states):
                states[value[0]] = (kind.decode(), value)
    rows = []
    for kind, values in states.values():
        row = UsageRow(**dict(zip(COLUMNS, values, strict=True)))
        if kind == "+":
            row.outcome, row.error = "proxy_error", KILLED
        rows.append(row)
    for path, fd in claimed:
        path.unlink(missing_ok=True)
        os.close(fd)
    if rows:
        log.warning("journal_replayed", rows=len(rows),
                    cut_off=sum(1 for kind, _ in states.values() if kind == "+"))
    return rows


def _order(path: Path) -> tuple[str, int]:
    name, _, n = path.stem.rpartition("-")
    return name, int(n) if n.isdigit() else 0
