"""structlog set-up: JSON lines when not on a terminal, readable console output when on one."""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import threading
import time
from collections import deque

import orjson
import structlog


def _json(event: dict, **_: object) -> str:
    """orjson: the per-call log line is on the hot path; anything odd is logged as text."""
    return orjson.dumps(event, default=str).decode()


class _Stderr:
    """Whatever sys.stderr is at the moment of writing (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Background:
    """Log lines leave the event loop at once: a line is appended to a queue and a thread
    of its own writes what has gathered every FLUSH_S (and at exit, or on `flush`), in one
    write to whatever sys.stderr is then. A slow or stalled stderr (a pipe read too
    slowly) never holds up calls, and a busy second costs a few writes, not one per call.

    For one process only: workers sharing a stderr pipe write each line on its own, as a
    batch larger than the pipe's atomic size could interleave with another worker's."""

    FLUSH_S = 0.05

    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()  # one writer at a time: the thread or a flush()
        self._thread: threading.Thread | None = None

    def write(self, text: str) -> int:
        self._queue.append(text)  # deque.append is atomic: no lock on the loop
        if self._thread is None:
            self._start()
        return len(text)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-writer",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            self.flush()

    def flush(self) -> None:
        """Write every queued line now."""
        with self._lock:
            queue = self._queue
            parts = []
            while queue:
                parts.append(queue.popleft())
            if parts:
                with contextlib.suppress(OSError, ValueError):  # stderr closed or gone
                    sys.stderr.write("".join(parts))
                    sys.stderr.flush()


_background = _Background()


def flush() -> None:
    """Write out log lines still queued (server shutdown)."""
    _background.flush()


def configure(level: str = "info", fmt: str = "auto", background: bool = False) -> None:
    """Called by `serve` and `demo`, never at import. `background`: log lines are written
    by a thread of their own, off the event loop (`serve` with one process)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (structlog.processors.JSONRenderer(serializer=_json) if use_json
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        # One write per line (PrintLogger writes the newline apart), so the lines of several
        # workers sharing stderr never interleave.
        logger_factory=structlog.WriteLoggerFactory(
            file=_background if background else _Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


class Sampled:
    """At most one line per name and interval, saying how many were held back.

    For what a stranger can make us log at will (bad keys, probes, a failing accept()):
    a flood of requests must not become a flood of log lines."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, name: str, now: float) -> int | None:
        """None while the interval runs; else how many lines were held back since the last."""
        last = self._last.get(name)
        if last is not None and now - last < self.interval_s:
            self._held[name] = self._held.get(name, 0) + 1
            return None
        self._last[name] = now
        return self._held.pop(name, 0)
