"""structlog set-up: JSON lines when not on a terminal, readable console output when on one."""

from __future__ import annotations

import logging
import sys

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


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Called by `serve` and `demo`, never at import."""
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
        logger_factory=structlog.WriteLoggerFactory(file=_Stderr()),
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
