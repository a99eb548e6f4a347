"""Times on the command line and in query strings: ISO dates, datetimes, or 7d / 24h ago."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """`2026-11-01`, `2026-11-01T12:00`, `2026-11-01T12:00:00Z`, or relative `7d`, `24h`."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 2026-11-01, 2026-11-01T12:00 or 7d)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def to_ts(value: datetime) -> str:
    """The usage log's timestamp format, which sorts as text."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
