"""OpenAI-compatible providers by configuration alone, and one log for every provider."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import types

from proxy.pricing import bundled_tables_dir
from proxy.simulator import Scenario
from proxy.storage.row import COLUMNS
from tests.conftest import KEY_ENV, PROVIDER_KEY, VIRTUAL_KEY, Stack, http
from tests.expected import expected_cost, row_cost

MESSAGES = [{"role": "user", "content": "Say hello to the metering proxy"}]
NOW: list[datetime | None] = [None]  # the stack's clock: a fixed time while set, else now
# A user's own table for models that run on their own hardware: zero price, still priced.
LOCAL_TABLE = """\
provider: local
models:
  llama3.1:8b:
    prices:
      - {effective_from: 2024-07-23, input: 0, output: 0}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The bundled tables plus local.yaml, and providers added by a config reload."""
    tmp = tmp_path_factory.mktemp("compat")
    tables = tmp / "pricing"
    shutil.copytree(bundled_tables_dir(), tables,
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (tables / "local.yaml").write_text(LOCAL_TABLE)
    s = Stack(tmp, {"pricing": {"dir": str(tables)}},
              clock=lambda: NOW[0] or datetime.now(UTC))
    sim = {"base_url": s.sim_url, "api_key_env": KEY_ENV}
    providers = {
        "ollama": {"base_url": s.sim_url, "dialect": "openai", "api_key_env": None,
                   "pricing": "local"},
        "openrouter": {**sim, "pricing": "openai"},
        **{name: sim for name in ("deepseek", "mistral", "groq", "together", "xai")},
    }
    s.write_config({**s.config, "providers": {**s.config["providers"], **providers}})
    assert s.call(s.server.reload_from_source()) is None
    yield s
    s.close()


def client_for(stack: Stack, provider: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base(provider), api_key=VIRTUAL_KEY, max_retries=0)


def test_azure_api_key_header_and_model_from_deployment(stack: Stack) -> None:
    """Azure: api-key in and out, the deployment in the path names the model."""
    before = len(stack.rows())
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    reply = http("POST", f"{stack.url}/azure{path}", orjson.dumps({"messages": MESSAGES}),
                 headers={"api-key": VIRTUAL_KEY, "Content-Type": "application/json"})
    assert reply.status_code == 200
    received = stack.sim.received[-1]
    assert (received.path, received.query) == ("/openai/deployments/gpt-4o-mini/chat/completions",
                                               {"api-version": "2024-10-21"})
    headers = {k.lower(): v for k, v in received.headers.items()}
    assert headers["api-key"] == PROVIDER_KEY and "authorization" not in headers
    usage = reply.json()["usage"]
    row = stack.rows(before + 1)[-1]
    assert (row["provider"], row["model"], row["endpoint"]) == ("azure", "gpt-4o-mini",
                                                                "chat.completions")
    assert row["pricing_version"].startswith("openai.yaml@")
    assert row_cost(row) == expected_cost(stack, "openai", "gpt-4o-mini",
                                          input=usage["prompt_tokens"],
                                          output=usage["completion_tokens"])


def test_local_provider_sends_no_key_and_costs_zero(stack: Stack) -> None:
    """A local model server: no provider key upstream, priced at 0 (not unpriced)."""
    before = len(stack.rows())
    out = client_for(stack, "ollama").chat.completions.create(model="llama3.1:8b",
                                                              messages=MESSAGES)
    assert out.usage.prompt_tokens > 0
    headers = {k.lower() for k in stack.sim.received[-1].headers}
    assert not headers & {"authorization", "api-key", "x-api-key"}
    row = stack.rows(before + 1)[-1]
    assert (row["provider"], row["priced"], row["cost_usd"]) == ("ollama", 1, 0.0)
    assert row["pricing_version"].startswith("local.yaml@")
    assert row["input_tokens"] == out.usage.prompt_tokens


# deepseek-flash since 2026-09-10 (docs/providers.md): $0.15 cache miss, $0.003 cache hit,
# $0.60 output per 1M tokens, twice that from 01:00 to 04:00 and 06:00 to 10:00 UTC. The call
# below: 200 misses, 1,000 hits, 80 output tokens.
DEEPSEEK_CALLS = [
    # 200 x 0.15 + 1,000 x 0.003 + 80 x 0.60 = 81 USD per 1M calls like it
    (datetime(2026, 11, 25, 12, 0, tzinfo=UTC), Decimal("0.000081")),
    (datetime(2026, 11, 25, 7, 30, tzinfo=UTC), Decimal("0.000162")),  # a peak hour: x2
]


@pytest.mark.parametrize(("when", "cost"), DEEPSEEK_CALLS)
def test_deepseek_own_table_and_cache_hit_fields(stack: Stack, when: datetime,
                                                 cost: Decimal) -> None:
    """DeepSeek prices from deepseek.yaml, peak hours included, and names its cache hits
    prompt_cache_hit_tokens."""
    stack.sim.then(Scenario(usage={"prompt_tokens": 1200, "completion_tokens": 80,
                                   "total_tokens": 1280, "prompt_cache_hit_tokens": 1000,
                                   "prompt_cache_miss_tokens": 200}))
    before = len(stack.rows())
    NOW[0] = when
    try:
        client_for(stack, "deepseek").chat.completions.create(model="deepseek-flash",
                                                              messages=MESSAGES)
    finally:
        NOW[0] = None
    row = stack.rows(before + 1)[-1]
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (200, 1000,
                                                                                       80)
    assert row["pricing_version"].startswith("deepseek.yaml@")
    assert row["ts"].startswith(when.strftime("%Y-%m-%dT%H:%M"))
    assert row_cost(row) == cost


def test_openrouter_vendor_prefixed_model_priced_from_named_table(stack: Stack) -> None:
    """`pricing: openai` on another provider: openai/gpt-4o-mini costs what gpt-4o-mini does."""
    before = len(stack.rows())
    out = client_for(stack, "openrouter").chat.completions.create(model="openai/gpt-4o-mini",
                                                                  messages=MESSAGES)
    row = stack.rows(before + 1)[-1]
    assert (row["provider"], row["model"]) == ("openrouter", "openai/gpt-4o-mini")
    assert row["pricing_version"].startswith("openai.yaml@")
    assert row_cost(row) == expected_cost(stack, "openai", "gpt-4o-mini",
                                          input=out.usage.prompt_tokens,
                                          output=out.usage.completion_tokens)


@pytest.mark.parametrize("provider", ["mistral", "groq", "together", "xai"])
def test_builtin_compatible_providers_price_from_their_tables(stack: Stack,
                                                              provider: str) -> None:
    """Each built-in OpenAI-compatible provider needs only a base URL and a key."""
    now = datetime.now(UTC)
    model = next((m.name for m in stack.runtime.prices.models(provider)
                  if (p := m.at(now)) and not p.windows and p.rates.output), None)
    if model is None:
        pytest.skip(f"{provider}.yaml prices no plain model today")
    before = len(stack.rows())
    out = client_for(stack, provider).chat.completions.create(model=model, messages=MESSAGES)
    row = stack.rows(before + 1)[-1]
    assert (row["provider"], row["priced"]) == (provider, 1)
    assert row["pricing_version"].startswith(f"{provider}.yaml@")
    assert row_cost(row) == expected_cost(stack, provider, model, input=out.usage.prompt_tokens,
                                          output=out.usage.completion_tokens)


def test_one_log_holds_every_provider_side_by_side(stack: Stack) -> None:
    """OpenAI, Anthropic and Gemini calls land in one table with the same columns."""
    before = len(stack.rows())
    client_for(stack, "openai").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                        extra_headers={"X-Meter-Trace-Id": "t1"})
    anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                        max_retries=0).messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES,
        extra_headers={"X-Meter-Trace-Id": "t1"})
    google = genai.Client(api_key=VIRTUAL_KEY, http_options=types.HttpOptions(
        base_url=f"{stack.url}/gemini", headers={"X-Meter-Trace-Id": "t1"}))
    google.models.generate_content(model="gemini-2.5-flash", contents="Say hello")
    rows = stack.rows(before + 3)[before:]
    assert [r["provider"] for r in rows] == ["openai", "anthropic", "gemini"]
    assert all(list(r) == list(COLUMNS) for r in rows)
    for r in rows:
        assert (r["trace_id"], r["outcome"], r["usage_source"], r["priced"]) == (
            "t1", "ok", "provider", 1)
        assert r["input_tokens"] > 0 and r["output_tokens"] > 0 and r["cost_usd"] > 0
        assert json.loads(r["cost_breakdown"])["classes"]["input"]["tokens"] == r["input_tokens"]
