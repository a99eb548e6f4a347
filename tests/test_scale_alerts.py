"""Alerts on a shared Redis ledger fire once across instances, not once per instance."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import openai

from proxy.simulator import Scenario
from tests.conftest import VIRTUAL_KEY, Stack, Webhook
from tests.scale import redis_prefix, redis_url
from tests.test_budgets import call_cost, chat, exact_usage


def test_two_instances_announce_each_threshold_once(tmp_path: Path) -> None:
    """Calls spread over two proxies cross 50% and 100%: the webhook hears each once."""
    hook = Webhook()
    cost = call_cost()
    with redis_prefix() as prefix:
        config = {"storage": {"ledger": f"{redis_url()}?prefix={prefix}"},
                  "budgets": [{"scope": {"customer": "acme"}, "period": "month",
                               "limit_usd": float(4 * cost), "enforce": "alert_only"}],
                  "alerts": {"thresholds": [0.5, 1.0], "webhook_url": hook.url}}
        a = Stack(tmp_path / "a", config)
        b = Stack(tmp_path / "b", config)
        hook.start(a)
        try:
            for i, stack in enumerate((a, b, a, b, a, b)):
                stack.sim.then(Scenario(usage=exact_usage()))
                client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY,
                                       max_retries=0)
                chat(client, **{"X-Meter-Customer": "acme"})
                stack.rows(i // 2 + 1)
            # Every claim both instances made is decided and every POST answered (the
            # hook runs on a's loop and records a body before it answers): a duplicate
            # would be in hook.received by now.
            a.settle()
            b.settle()
        finally:
            hook.stop()
            a.close()
            b.close()
    assert sorted(alert["threshold"] for alert in hook.received) == [0.5, 1.0]
    assert Decimal(hook.received[-1]["spent_usd"]) >= 4 * cost
