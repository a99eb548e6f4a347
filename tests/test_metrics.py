"""GET /metrics: Prometheus text that parses, counts every call, and needs the admin key."""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PROVIDER_KEY, VIRTUAL_KEY, Stack, http

ADMIN_KEY = "metrics-admin-key"
# The labels proxy/metrics.py allows: bounded sets, never a customer, feature or trace id.
BOUNDED_LABELS = {"provider", "model", "key", "outcome", "class", "stream", "le", "budget",
                  "period"}


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    os.environ["METERPROXY_TEST_METRICS_ADMIN"] = ADMIN_KEY
    s = Stack(tmp_path_factory.mktemp("metrics"), {
        "server": {"admin_key_env": "METERPROXY_TEST_METRICS_ADMIN"},
        "pricing": {"unpriced": "allow"},  # made-up-model runs under acme's USD budget
        "budgets": [{"scope": {"customer": "*"}, "period": "month", "limit_usd": 1}]})
    yield s
    s.close()


def scrape(stack: Stack) -> dict[str, list]:
    reply = http("GET", f"{stack.url}/metrics", None, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.content.decode()
    assert PROVIDER_KEY not in text and VIRTUAL_KEY not in text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_count_calls_tokens_cost_and_budgets(mstack: Stack) -> None:
    """Counters match the usage log; unknown models are labelled `other`; budgets gauge."""
    client = openai.OpenAI(base_url=mstack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    for model in ("gpt-4o-mini", "gpt-4o-mini", "made-up-model"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"X-Meter-Customer": "acme"})
    rows = mstack.rows(3)
    families = scrape(mstack)
    calls = {(s.labels["model"], s.labels["outcome"]): s.value
             for s in families["meterproxy_calls"]}
    assert calls == {("gpt-4o-mini", "ok"): 2, ("other", "ok"): 1}
    tokens = sum(s.value for s in families["meterproxy_tokens"]
                 if s.labels["class"] == "input")
    assert tokens == sum(r["input_tokens"] for r in rows)
    cost = sum(s.value for s in families["meterproxy_cost_usd"])
    assert cost == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
    assert [s.value for s in families["meterproxy_unpriced_calls"]] == [1]
    # One series per configured budget, named by its definition, however many customers
    # its `*` covers: the worst period's share of the limit.
    (util,) = families["meterproxy_budget_utilisation"]
    assert util.labels == {"budget": "customer=*", "period": "month"}
    assert util.value == pytest.approx(cost)
    # Only the bounded labels metrics.py documents; the customer's name is in none of them.
    for family in families.values():
        for sample in family:
            assert set(sample.labels) <= BOUNDED_LABELS, sample
            assert not any("acme" in value for value in sample.labels.values()), sample
    durations = [s for s in families["meterproxy_call_duration_seconds"]
                 if s.name.endswith("_count")]
    assert sum(s.value for s in durations) == 3


def test_metrics_and_admin_need_the_key(mstack: Stack) -> None:
    """Without the admin key /metrics and /_meter/* answer 401; /healthz is open."""
    assert http("GET", f"{mstack.url}/metrics").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert http("GET", f"{mstack.url}/_meter/usage", None, wrong).status_code == 401
    health = http("GET", f"{mstack.url}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_series_stay_bounded_whoever_calls(mstack: Stack, tmp_path_factory) -> None:
    """Thirty customers under a `customer: "*"` budget make one utilisation series, not
    thirty; passthrough keys are `other`, never a label per client key; durations are
    seconds (their sum matches the rows' milliseconds / 1000)."""
    client = openai.OpenAI(base_url=mstack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    for i in range(30):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user",
                                       "content": "x"}], extra_headers={"X-Meter-Customer":
                                                                        f"cust-{i}"})
    rows = mstack.rows(33)
    families = scrape(mstack)
    assert len(families["meterproxy_budget_utilisation"]) == 1
    text = http("GET", f"{mstack.url}/metrics", None,
                {"Authorization": f"Bearer {ADMIN_KEY}"}).content.decode()
    assert "cust-" not in text
    total = sum(s.value for s in families["meterproxy_call_duration_seconds"]
                if s.name.endswith("_sum"))
    assert total == pytest.approx(sum(r["duration_ms"] for r in rows) / 1000, rel=1e-6)
    passthrough = Stack(tmp_path_factory.mktemp("passthrough-metrics"),
                        {"auth": {"mode": "passthrough"}})
    try:
        for key in ("sk-client-one-0001", "sk-client-two-0002"):
            openai.OpenAI(base_url=passthrough.base(), api_key=key, max_retries=0
                          ).chat.completions.create(model="gpt-4o-mini",
                                                    messages=[{"role": "user", "content": "x"}])
        passthrough.rows(2)
        keys = {labels for labels in passthrough.runtime.metrics.calls}
        assert {dict(labels)["key"] for labels in keys} == {"other"}
    finally:
        passthrough.close()
