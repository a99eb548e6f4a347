"""Incremental Server-Sent Events splitting, shared by every dialect.

Bytes arrive in arbitrary pieces; `SSESplitter.feed` returns each event once it is whole,
as the raw bytes (separator included) so a relay can forward them untouched, and keeps
only the unfinished tail. Events end at a blank line: LF LF, CR LF CR LF or CR CR.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\r|\n")
MAX_PENDING = 16 * 1024 * 1024


@dataclass(slots=True)
class Event:
    """One parsed event: its `event:` name (or empty) and its joined `data:` lines."""

    name: str
    data: bytes


class SSESplitter:
    """Cuts a byte stream into whole events; see the module docstring."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""  # the unfinished tail (read it to skip a call when empty)

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.pending + chunk if self.pending else chunk
        events: list[bytes] = []
        start = 0
        if b"\r" not in buf:  # the common case: LF only, a plain find beats the regex
            while (end := buf.find(b"\n\n", start)) >= 0:
                events.append(buf[start:end + 2])
                start = end + 2
        else:
            while (m := _BOUNDARY.search(buf, start)) is not None:
                events.append(buf[start:m.end()])
                start = m.end()
        rest = buf[start:]
        # A CR at the very end may be the first half of CR LF: it stays pending either way.
        if len(rest) > MAX_PENDING:
            rest = rest[-MAX_PENDING:]  # a malformed stream with no boundary: keep memory bounded
        self.pending = rest
        return events

    def feed_plain(self, chunk: bytes, plain: Callable[[bytes], bool]) -> bytes | list[bytes]:
        """Like `feed`, but when the whole events so far are LF-only and `plain` says none
        needs reading now, they come back as ONE bytes blob (split it with `events_of`):
        a meter then does per-chunk work, not per-event. Otherwise the list `feed` gives."""
        buf = self.pending + chunk if self.pending else chunk
        # Without CR and without a run of three LFs, the last LF LF is where `feed`'s
        # left-to-right cutting would end too, so the blob holds exactly its events.
        if b"\r" not in buf and b"\n\n\n" not in buf:
            end = buf.rfind(b"\n\n") + 2
            if end == 1:  # no whole event yet
                self.pending = buf if len(buf) <= MAX_PENDING else buf[-MAX_PENDING:]
                return b""
            blob = buf[:end]
            if plain(blob):
                rest = buf[end:]
                self.pending = rest if len(rest) <= MAX_PENDING else rest[-MAX_PENDING:]
                return blob
        self.pending = b""
        return self.feed(buf)

    def tail(self) -> bytes:
        """What arrived after the last whole event (an unterminated final event)."""
        return self.pending


def events_of(blob: bytes) -> list[bytes]:
    """The raw events of a blob `feed_plain` returned (LF LF ends each), cut as `feed` cuts."""
    events: list[bytes] = []
    start = 0
    while (end := blob.find(b"\n\n", start)) >= 0:
        events.append(blob[start:end + 2])
        start = end + 2
    if start < len(blob):
        events.append(blob[start:])
    return events


def parse_event(raw: bytes) -> Event:
    """Read the `event:` and `data:` fields of one raw event; comments are ignored."""
    if b"\r" not in raw:  # the common cases: one data line, after one event line or not
        if raw[:6] == b"data: ":
            body = raw[6:].rstrip(b"\n")
            if b"\n" not in body:
                return Event("", body)
        elif raw[:7] == b"event: ":
            end = raw.find(b"\n")
            if raw[end + 1:end + 7] == b"data: ":
                body = raw[end + 7:].rstrip(b"\n")
                if b"\n" not in body:
                    return Event(raw[7:end].decode("utf-8", "replace"), body)
    name = ""
    data: list[bytes] = []
    for line in _LINE.split(raw):
        if not line or line[0] == 0x3A:  # blank, or a ":" comment
            continue
        key, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if key == b"data":
            data.append(value)
        elif key == b"event":
            name = value.decode("utf-8", "replace")
    return Event(name, b"\n".join(data))


_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})


def is_junk(raw: bytes) -> bool:
    """Whether an event holds a line that is no SSE field at all (say, an HTML error page)."""
    for line in _LINE.split(raw):
        if line and line[0] != 0x3A and line.partition(b":")[0] not in _FIELDS:
            return True
    return False
