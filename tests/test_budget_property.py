"""The budget property (issue 11): whatever mix of concurrent calls a key sends (streams,
cancels, several answers, unpriced models, continued responses) on whatever budget, and
across a restart, the usage log's spend never exceeds the budget's limit, the provider's
usage stays within each request's own bounds, and the ledger equals the log.

Each example starts a real proxy and simulator on loopback, so the examples are few;
hypothesis still picks budgets and call mixes no hand-written test would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import VIRTUAL_KEY, Stack, sha

ADMIN_ENV = "METERPROXY_TEST_ADMIN_KEY_PROP"

calls = st.lists(st.fixed_dictionaries({
    "api": st.sampled_from(["chat", "responses"]),
    "stream": st.booleans(),
    "cancel": st.booleans(),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 40),
    "model": st.sampled_from(["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "ft:unpriced-model"]),
    "words": st.integers(1, 30),
}), min_size=1, max_size=8)


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(limit=st.decimals(min_value=Decimal("0.00001"), max_value=Decimal("0.0004"),
                         places=6),
       first=calls, second=calls, unpriced=st.sampled_from(["refuse", "allow"]))
def test_spend_never_exceeds_a_budget_and_ledger_equals_log(
        limit: Decimal, first: list[dict[str, Any]], second: list[dict[str, Any]],
        unpriced: str) -> None:
    os.environ[ADMIN_ENV] = "prop-admin"
    tmp = Path(tempfile.mkdtemp(prefix="budget-prop-"))
    config = {"server": {"admin_key_env": ADMIN_ENV}, "pricing": {"unpriced": unpriced},
              "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY),
                        "budgets": [{"period": "day", "limit_usd": float(limit)}]}]}
    try:
        sent = 0
        for batch in (first, second):  # the second batch runs after a restart
            stack = Stack(tmp, config)
            try:
                asyncio.run(_burst(stack.base(), batch))
                sent += len(batch)
                rows = stack.rows(sent)
                assert len(rows) == sent
                _check(stack, rows, batch, limit)
            finally:
                stack.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check(stack: Stack, rows: list[dict[str, Any]], batch: list[dict[str, Any]],
           limit: Decimal) -> None:
    spent = sum((Decimal(str(r["cost_usd"])) for r in rows if r["cost_usd"] is not None),
                Decimal(0))
    assert spent <= limit
    (status,) = stack.call(stack.runtime.budgets.status())  # the key's one budget
    assert status["reserved_usd"] == 0
    assert status["spent_usd"] == spent  # the ledger equals the log
    # The provider stayed inside every admitted request's own bounds.
    for row in rows[-len(batch):]:
        call = batch[int(row["trace_id"])]
        assert row["output_tokens"] <= call["n"] * call["max_tokens"]
        if call["model"] == "ft:unpriced-model" and row["status"] == 200:
            assert row["priced"] == 0 and row["cost_usd"] is None


async def _burst(base: str, batch: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await asyncio.gather(*[_one(session, base, call, str(i))
                               for i, call in enumerate(batch)])


async def _one(session: aiohttp.ClientSession, base: str, call: dict[str, Any],
               trace: str) -> None:
    prompt = " ".join(["budget"] * call["words"])
    if call["api"] == "chat":
        url = f"{base}/chat/completions"
        body: dict[str, Any] = {"model": call["model"], "n": call["n"],
                                "max_tokens": call["max_tokens"],
                                "messages": [{"role": "user", "content": prompt}]}
    else:
        url = f"{base}/responses"
        body = {"model": call["model"], "input": prompt,
                "max_output_tokens": call["max_tokens"]}
    body["stream"] = call["stream"]
    async with session.post(url, data=orjson.dumps(body),
                            headers={"X-Meter-Trace-Id": trace}) as resp:
        if call["cancel"] and call["stream"] and resp.status == 200:
            await resp.content.readany()  # the first chunk, then the client goes away
            resp.close()
            return
        await resp.read()
