"""attribute: who and what a call is for, from X-Meter-* headers and peers' headers.

Customer, feature, trace id and free-form tags come from our headers; users moving from
Helicone, Portkey or Cloudflare AI Gateway keep theirs. None of these headers is forwarded
(`proxy.headers.strip` leaves them out). Invalid values are a 400, never a silent drop. What
a key's config sets (tags, customer, feature) wins: a header that contradicts it is a 400,
and `keys[].customers` limits which customers a key may name. Anything else is asserted by
the client, and budgets on it are only as strong as that assertion.
"""

from __future__ import annotations

import re

import orjson

from proxy.errors import Kind, MeterError
from proxy.exchange import Exchange
from proxy.telemetry import trace_id_of

MAX_TAGS = 32
MAX_VALUE = 256
TAG_NAME = re.compile(r"[a-z0-9_.-]{1,64}")
_TAG_PREFIX = "x-meter-tag-"
_HELICONE_PREFIX = "helicone-property-"
_ANY_PREFIX = ("x-meter-", "helicone-", "x-portkey-metadata", "cf-aig-metadata")
_COLUMNS = {"x-meter-customer": "customer", "x-meter-feature": "feature",
            "x-meter-trace-id": "trace_id"}


def attribute(x: Exchange) -> None:
    """Fill customer, feature, trace_id and tags from the client's headers."""
    ours: dict[str, str] = {}
    theirs: dict[str, str] = {}
    for name, value in x.request.headers.items():
        lower = name.lower()
        if not lower.startswith(_ANY_PREFIX):
            continue
        if lower in _COLUMNS:
            setattr(x, _COLUMNS[lower], _value(value, name))
        elif lower.startswith(_TAG_PREFIX):
            ours[_tag_name(lower[len(_TAG_PREFIX):], name)] = _value(value, name)
        elif lower.startswith("x-meter-"):
            raise MeterError(Kind.INVALID_REQUEST, f"unknown meterproxy header {name}")
        elif lower.startswith(_HELICONE_PREFIX):
            theirs[_tag_name(lower[len(_HELICONE_PREFIX):], name)] = _value(value, name)
        elif lower == "helicone-user-id":
            theirs["user"] = _value(value, name)
        elif lower in ("x-portkey-metadata", "cf-aig-metadata"):
            for key, item in _json_object(value, name).items():
                tag = "user" if key == "_user" and lower == "x-portkey-metadata" else key
                theirs[_tag_name(tag.lower(), name)] = _value(_text(item), name)
    if x.trace_id is None:  # the caller's W3C trace (forwarded upstream unchanged)
        x.trace_id = trace_id_of(x.headers.get("traceparent"))
    tags = {**theirs, **ours}
    if x.key is not None:
        _apply_key(x, tags)
    if len(tags) > MAX_TAGS:
        raise MeterError(Kind.INVALID_REQUEST, f"{len(tags)} tags on one call; the limit is "
                         f"{MAX_TAGS}")
    x.tags = tags


def _apply_key(x: Exchange, tags: dict[str, str]) -> None:
    """The key's own attribution wins: a header may repeat it, never change it."""
    key = x.key
    assert key is not None
    for name, value in key.tags.items():
        _same(tags.get(name), value, f"tag {name!r}", key.name)
        tags[name] = value
    if key.customer is not None:
        _same(x.customer, key.customer, "customer", key.name)
        x.customer = key.customer
    elif key.customers and x.customer is not None and x.customer not in key.customers:
        raise MeterError(Kind.PERMISSION,
                         f"key {key.name!r} may not attribute calls to customer {x.customer!r}")
    if key.feature is not None:
        _same(x.feature, key.feature, "feature", key.name)
        x.feature = key.feature


def _same(sent: str | None, fixed: str, what: str, key: str) -> None:
    if sent is not None and sent != fixed:
        raise MeterError(Kind.INVALID_REQUEST,
                         f"key {key!r} sets {what} to {fixed!r} in config; a header may not "
                         f"change it to {sent!r}")


def _tag_name(name: str, header: str) -> str:
    if not TAG_NAME.fullmatch(name):
        raise MeterError(Kind.INVALID_REQUEST,
                         f"bad tag name in {header}: names are 1-64 of a-z 0-9 _ . -")
    return name


def _value(value: str, header: str) -> str:
    if not 1 <= len(value) <= MAX_VALUE or not value.isprintable():
        raise MeterError(Kind.INVALID_REQUEST,
                         f"bad value in {header}: 1-{MAX_VALUE} printable characters")
    return value


def _json_object(value: str, header: str) -> dict:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise MeterError(Kind.INVALID_REQUEST, f"{header} must be a JSON object")
    return obj


def _text(item: object) -> str:
    return item if isinstance(item, str) else orjson.dumps(item).decode()


def keep_readable(x: Exchange) -> None:
    """For a call refused before (or while) attributing it: the customer, feature and trace
    id its headers give, where valid, so its row still says whose it was. Only for a known
    key: a caller the proxy does not know must not write names into the log."""
    if x.key_name is None:
        return
    for header, column in _COLUMNS.items():
        value = x.request.headers.get(header)
        if getattr(x, column) is None and value and len(value) <= MAX_VALUE \
                and value.isprintable():
            setattr(x, column, value)
