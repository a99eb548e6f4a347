"""The Anthropic dialect end to end: the official anthropic SDK -> meterproxy -> simulator."""

from __future__ import annotations

import asyncio
import json

import anthropic
import pytest

from proxy.simulator import Scenario
from tests.conftest import OTHER_KEY, PROVIDER_KEY, VIRTUAL_KEY, Stack
from tests.expected import expected_cost, row_cost

MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Say hello to the metering proxy"}]
# docs/providers.md's recorded cache body, its writes split between the two lifetimes.
CACHED = {"cache_creation": {"ephemeral_1h_input_tokens": 1500, "ephemeral_5m_input_tokens": 456},
          "cache_creation_input_tokens": 1956, "cache_read_input_tokens": 9511,
          "input_tokens": 3, "output_tokens": 44, "service_tier": "standard"}


@pytest.fixture(scope="module")
def client(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                               max_retries=0)


def tokens(row: dict) -> tuple[int, ...]:
    return (row["input_tokens"], row["cached_input_tokens"], row["cache_write_tokens"],
            row["cache_write_1h_tokens"], row["output_tokens"], row["reasoning_tokens"])


def test_message_row_has_sdk_usage_and_exact_cost(stack: Stack, client) -> None:
    """A plain message: the row's tokens are the SDK's, its cost exact, its ids linked."""
    before = len(stack.rows())
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=256, messages=MESSAGES,
        extra_headers={"X-Meter-Customer": "acme"})
    usage = raw.parse().usage
    row = stack.rows(before + 1)[-1]
    assert tokens(row) == (usage.input_tokens, 0, 0, 0, usage.output_tokens, 0)
    cost = expected_cost(stack, "anthropic", MODEL, input=usage.input_tokens,
                         output=usage.output_tokens)
    assert row_cost(row) == cost and row["priced"] == 1
    assert raw.headers["x-meter-cost-usd"] == format(cost, "f")
    assert row["id"] == raw.headers["x-meter-request-id"]
    assert row["upstream_request_id"] == raw.headers["request-id"]
    assert row["pricing_version"].startswith("anthropic.yaml@")
    assert (row["provider"], row["endpoint"], row["model"], row["response_model"],
            row["stream"], row["status"], row["outcome"], row["usage_source"],
            row["key_name"], row["customer"]) == (
        "anthropic", "messages", MODEL, MODEL, 0, 200, "ok", "provider", "team-a", "acme")


def test_provider_gets_real_key_and_version_headers(stack: Stack, client) -> None:
    """x-api-key carries the provider key upstream; anthropic-version and -beta pass."""
    client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES,
                           extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    headers = {k.lower(): v for k, v in stack.sim.received[-1].headers.items()}
    assert headers["x-api-key"] == PROVIDER_KEY and "authorization" not in headers
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert headers["anthropic-version"]
    assert VIRTUAL_KEY not in str(headers)


def test_bearer_auth_token_is_accepted(stack: Stack) -> None:
    """An SDK configured with auth_token sends Authorization: Bearer; it works the same."""
    bearer = anthropic.Anthropic(base_url=stack.base("anthropic", ""), auth_token=VIRTUAL_KEY,
                                 max_retries=0)
    before = len(stack.rows())
    bearer.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    headers = {k.lower(): v for k, v in stack.sim.received[-1].headers.items()}
    assert headers["x-api-key"] == PROVIDER_KEY and "authorization" not in headers
    assert stack.rows(before + 1)[-1]["key_name"] == "team-a"


@pytest.mark.parametrize("stream", [False, True])
def test_cache_reads_and_both_writes(stack: Stack, client, stream: bool) -> None:
    """Reads, 5-minute and 1-hour writes land in their columns at their own rates."""
    stack.sim.then(Scenario(usage=CACHED))
    before = len(stack.rows())
    if stream:
        with client.messages.stream(model=MODEL, max_tokens=256, messages=MESSAGES) as events:
            usage = events.get_final_message().usage
    else:
        usage = client.messages.create(model=MODEL, max_tokens=256, messages=MESSAGES).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (3, 9511,
                                                                                       44)
    row = stack.rows(before + 1)[-1]
    # Streamed, message_delta repeated every count: a sum would double them.
    assert tokens(row) == (3, 9511, 1956, 1500, 44, 0)
    assert row["stream"] == int(stream) and row["usage_source"] == "provider"
    assert row_cost(row) == expected_cost(stack, "anthropic", MODEL, input=3, cached=9511,
                                          write_5m=456, write_1h=1500, output=44)
    breakdown = json.loads(row["cost_breakdown"])["classes"]
    assert (breakdown["cache_write_5m"]["tokens"], breakdown["cache_write_1h"]["tokens"]) == (
        456, 1500)


def test_cache_writes_without_split_are_five_minute(stack: Stack, client) -> None:
    """No cache_creation object: every write is billed at the 5-minute rate."""
    stack.sim.then(Scenario(usage={"cache_creation_input_tokens": 2048, "input_tokens": 12,
                                   "cache_read_input_tokens": 0, "output_tokens": 9}))
    before = len(stack.rows())
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as events:
        events.until_done()
    row = stack.rows(before + 1)[-1]
    assert tokens(row) == (12, 0, 2048, 0, 9, 0)
    assert row_cost(row) == expected_cost(stack, "anthropic", MODEL, input=12, write_5m=2048,
                                          output=9)


def test_thinking_tokens_are_reasoning_inside_output(stack: Stack, client) -> None:
    """Extended thinking: thinking_tokens go to reasoning, and are billed as output."""
    before = len(stack.rows())
    with client.messages.stream(model=MODEL, max_tokens=2048, messages=MESSAGES,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as events:
        message = events.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    usage = message.usage
    thinking = usage.output_tokens_details.thinking_tokens
    assert 0 < thinking < usage.output_tokens
    row = stack.rows(before + 1)[-1]
    assert tokens(row) == (usage.input_tokens, 0, 0, 0, usage.output_tokens, thinking)
    assert row_cost(row) == expected_cost(stack, "anthropic", MODEL, input=usage.input_tokens,
                                          output=usage.output_tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_web_search_requests_cost_their_fee(stack: Stack, client, stream: bool) -> None:
    """server_tool_use.web_search_requests are priced per search on top of the tokens."""
    tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    before = len(stack.rows())
    if stream:
        with client.messages.stream(model=MODEL, max_tokens=256, messages=MESSAGES,
                                    tools=[tool]) as events:
            usage = events.get_final_message().usage
    else:
        usage = client.messages.create(model=MODEL, max_tokens=256, messages=MESSAGES,
                                       tools=[tool]).usage
    assert usage.server_tool_use.web_search_requests == 1
    row = stack.rows(before + 1)[-1]
    assert row_cost(row) == expected_cost(stack, "anthropic", MODEL, input=usage.input_tokens,
                                          output=usage.output_tokens, searches=1)
    assert json.loads(row["cost_breakdown"])["classes"]["web_search"]["requests"] == 1


def test_async_client_stream_and_not(stack: Stack) -> None:
    """AsyncAnthropic, streamed and not, concurrently: one row each with the SDK's usage."""
    async def run() -> list[anthropic.types.Usage]:
        aclient = anthropic.AsyncAnthropic(base_url=stack.base("anthropic", ""),
                                           api_key=VIRTUAL_KEY, max_retries=0)

        async def plain(i: int) -> anthropic.types.Usage:
            message = await aclient.messages.create(
                model=MODEL, max_tokens=128, extra_headers={"X-Meter-Feature": f"plain-{i}"},
                messages=[{"role": "user", "content": f"plain call {i}"}])
            return message.usage

        async def streamed(i: int) -> anthropic.types.Usage:
            async with aclient.messages.stream(
                    model=MODEL, max_tokens=128, extra_headers={"X-Meter-Feature": f"stream-{i}"},
                    messages=[{"role": "user", "content": f"streamed call number {i}"}]) as s:
                return (await s.get_final_message()).usage

        try:
            return await asyncio.gather(*(plain(i) for i in range(3)),
                                        *(streamed(i) for i in range(3)))
        finally:
            await aclient.close()

    before = len(stack.rows())
    usages = asyncio.run(run())
    rows = {r["feature"]: r for r in stack.rows(before + 6)[before:]}
    features = [f"plain-{i}" for i in range(3)] + [f"stream-{i}" for i in range(3)]
    for feature, usage in zip(features, usages, strict=True):
        row = rows[feature]
        assert (row["input_tokens"], row["output_tokens"]) == (usage.input_tokens,
                                                               usage.output_tokens)
        assert row["stream"] == int(feature.startswith("stream")) and row["outcome"] == "ok"


def test_count_tokens_passes_through_unmetered(stack: Stack, client) -> None:
    """count_tokens is forwarded and logged at zero cost, not as a billed call."""
    before = len(stack.rows())
    counted = client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert counted.input_tokens > 0
    row = stack.rows(before + 1)[-1]
    assert (row["endpoint"], row["cost_usd"], row["input_tokens"], row["outcome"]) == (
        "count_tokens", 0.0, 0, "ok")


def test_unknown_key_is_401_in_anthropic_shape(stack: Stack) -> None:
    """An unknown virtual key never reaches the provider and gets Anthropic's 401."""
    bad = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key="mp-nope",
                              max_retries=0)
    received = len(stack.sim.received)
    before = len(stack.rows())
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "authentication_error"
    assert len(stack.sim.received) == received
    assert len(stack.rows()) == before  # no row for a stranger: counted in /metrics


def test_model_allowlist_is_403_in_anthropic_shape(stack: Stack) -> None:
    """A key limited to other models gets permission_error."""
    limited = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=OTHER_KEY,
                                  max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        limited.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "permission_error"
    assert stack.rows()[-1]["outcome"] == "rejected"
