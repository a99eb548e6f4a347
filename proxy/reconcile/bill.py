"""A provider's bill in one shape: lines of tokens and dollars per day, model, class, key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import aiohttp
from yarl import URL

from proxy import token_classes

MAX_PAGES = 1000  # a billing API that never stops paging is broken, not infinite


class BillClass(StrEnum):
    """The classes a bill and the meter are compared by: the billing classes of
    `proxy.token_classes` that providers' bills show apart (each member but `other` is a
    class name there; finer classes fold into these, see `bill_class`)."""

    INPUT = "input"
    CACHED_INPUT = "cached_input"
    CACHE_WRITE_5M = "cache_write_5m"
    CACHE_WRITE_1H = "cache_write_1h"
    OUTPUT = "output"
    WEB_SEARCH = "web_search"
    GROUNDING = "grounding"
    CODE_EXECUTION = "code_execution"
    OTHER = "other"  # billed items the meter has no class for (kept, never dropped)


def bill_class(name: str) -> BillClass:
    """The bill class a token class (by name) is counted in: itself when bills show it
    apart, else the class of the column that includes it (audio input in input, 30-minute
    cache writes in cache writes); unknown names are `other`."""
    cls = token_classes.BY_NAME.get(name)
    while cls is not None:
        if cls.name in BillClass.__members__.values():
            return BillClass(cls.name)
        cls = token_classes.BY_COLUMN.get(cls.within) if cls.within else None
    return BillClass.OTHER


def per_unit(cls: BillClass) -> Decimal:
    """How many tokens (or requests) one table price is for: 1M, or 1,000."""
    found = token_classes.BY_NAME.get(cls.value)
    return found.per if found is not None else token_classes.MILLION


def override_field(cls: BillClass) -> str | None:
    """The `pricing.overrides` key for a class's rate; None for per-request fees, which
    an override cannot set."""
    found = token_classes.BY_NAME.get(cls.value)
    if found is None or found.unit is not token_classes.Unit.TOKENS:
        return None
    return found.rate


@dataclass(frozen=True, slots=True)
class BillLine:
    """Tokens or dollars the provider reports for one day (UTC), model, class and key.

    `in_scope` says whether the key/project is one the proxy uses (config); the rest is
    spend that never passed through the proxy.
    """

    day: str
    model: str
    cls: BillClass
    tokens: int = 0
    usd: Decimal = Decimal(0)
    key: str | None = None
    in_scope: bool = True


class BillingSourceError(Exception):
    """A billing API or export could not be read; the message names which and why."""


class BillingNotConfigured(BillingSourceError):
    """No admin key in the environment, or no export file named: nothing to read."""


def in_scope(values: tuple[str | None, ...], allowed: tuple[list[str], ...]) -> bool:
    """Whether a usage group belongs to the proxy: any id in its allow-list (none set: all)."""
    if not any(allowed):
        return True
    return any(v is not None and v in ids for v, ids in zip(values, allowed, strict=True))


def loads(text: str | bytes) -> Any:
    """JSON with every fraction as Decimal, so `0.1` dollars stay exactly 0.1."""
    return json.loads(text, parse_float=Decimal)


async def pages(session: aiohttp.ClientSession, url: URL, params: list[tuple[str, str]],
                headers: dict[str, str], what: str) -> AsyncIterator[dict[str, Any]]:
    """Each page of a `{data, has_more, next_page}` listing, following `page=` cursors."""
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        query = params + ([("page", cursor)] if cursor else [])
        try:
            async with session.get(url, params=query, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BillingSourceError(f"{what}: cannot reach {url.host}: {exc!s:.200}") from None
        if status != 200:
            raise BillingSourceError(f"{what}: HTTP {status}: {_message(body)}")
        try:
            page = loads(body)
        except ValueError:
            raise BillingSourceError(f"{what}: the answer is not JSON") from None
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            raise BillingSourceError(f"{what}: the answer has no data list")
        yield page
        cursor = page.get("next_page")
        if not page.get("has_more") or not cursor:
            return
        if cursor in seen:
            raise BillingSourceError(f"{what}: the next_page cursor repeats")
        seen.add(cursor)
    raise BillingSourceError(f"{what}: more than {MAX_PAGES} pages")


def _message(body: bytes) -> str:
    """The provider's error message, short; never the request (it carried the admin key)."""
    try:
        error = loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        text = body[:200].decode("utf-8", "replace")
    return f"{str(text or 'no message')[:200]}"


def number(value: Any) -> int:
    """A token count from a billing body: absent, null and junk are zero."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | float):
        return 0
    return max(int(value), 0)


def decimal(value: Any) -> Decimal:
    """A money amount from a billing body (number or decimal string); junk is zero."""
    if isinstance(value, bool) or value is None:
        return Decimal(0)
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return Decimal(0)


def day_of(unix_s: Any) -> str:
    """The UTC day of a bucket's start (unix seconds, RFC 3339 or BigQuery's `... UTC`)."""
    from datetime import UTC, datetime

    if isinstance(unix_s, int | Decimal):
        return datetime.fromtimestamp(int(unix_s), UTC).strftime("%Y-%m-%d")
    text = str(unix_s).replace(" UTC", "+00:00").replace("Z", "+00:00")
    return datetime.fromisoformat(text).astimezone(UTC).strftime(
        "%Y-%m-%d")
