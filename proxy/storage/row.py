"""One usage-log row: the columns of the contract, in the table's order."""

from __future__ import annotations

from dataclasses import field, make_dataclass
from operator import attrgetter
from typing import Any

from proxy.token_classes import CLASSES

_CALL = (("id", str), ("ts", str), ("duration_ms", float | None), ("ttfb_ms", float | None),
         ("key_name", str | None), ("provider", str | None), ("endpoint", str | None),
         ("model", str | None), ("response_model", str | None), ("stream", int, 0),
         ("status", int | None), ("outcome", str, "ok"))
_RESULT = (("usage_source", str | None), ("cost_usd", float | None),
           ("cost_breakdown", str | None), ("pricing_version", str | None),
           ("priced", int, 1), ("customer", str | None), ("feature", str | None),
           ("trace_id", str | None), ("tags", str | None),
           ("upstream_request_id", str | None), ("error", str | None))


def _spec(name: str, kind: Any, *default: Any) -> tuple[str, Any, Any] | tuple[str, Any]:
    if default:
        return name, kind, field(default=default[0])
    if name in ("id", "ts"):
        return name, kind
    return name, kind, field(default=None)


def _values(self: Any) -> tuple:
    """The row in column order (astuple would deep-copy every value: ten times slower)."""
    return _getter(self)


# The first migration's token columns sit between the call and its result; columns the
# later migrations added follow at the end, where ALTER TABLE put them.
_FIRST = tuple((c.column, int, 0) for c in CLASSES if c.since == "m001_usage")
_LATER = tuple((c.column, int, 0) for c in CLASSES if c.since != "m001_usage")
# m005_call_shape: how many identical refusals a row stands for, and the hash and token
# length of the prompt's stable prefix (never its text), for the savings advisor.
_M005 = (("repeat_count", int, 1), ("prefix_hash", str | None), ("prefix_tokens", int | None))

UsageRow = make_dataclass(
    "UsageRow",
    [_spec(*spec) for spec in (*_CALL, *_FIRST, *_RESULT, *_LATER, *_M005)],
    slots=True,
    namespace={"values": _values, "__module__": __name__,
               "__doc__": 'A call as the usage log stores it (DESIGN.md, section 3, "Usage '
                          'log"); token columns come from proxy.token_classes.'},
)

COLUMNS: tuple[str, ...] = tuple(spec[0] for spec in (*_CALL, *_FIRST, *_RESULT, *_LATER, *_M005))
_getter = attrgetter(*COLUMNS)
