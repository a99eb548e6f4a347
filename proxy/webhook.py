"""Alert webhooks: one JSON POST, retried on 5xx and network errors, never raising."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import structlog

log = structlog.get_logger("meterproxy")
ATTEMPTS = 4


async def post_event(session: aiohttp.ClientSession, url: str, event: dict[str, Any],
                     name: str) -> bool:
    """POST `event` to `url`; `name` prefixes the log events (`<name>_webhook_failed`)."""
    body = orjson.dumps(event)
    for attempt in range(ATTEMPTS):
        try:
            async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=10),
                                    headers={"Content-Type": "application/json"}) as resp:
                if resp.status < 500:
                    return True
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning(f"{name}_webhook_failed", attempt=attempt + 1, error=str(exc))
        if attempt + 1 < ATTEMPTS:
            await asyncio.sleep(0.5 * 2 ** attempt)
    return False
