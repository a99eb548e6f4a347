"""Real recorded responses, replayed through the proxy, metered and priced exactly.

Each case in `fixtures/replay/manifest.json` is a response the provider really sent, cut
from a public repository's VCR cassette (repository, file, commit and interaction are in
the manifest). A replay upstream serves its bytes; the official SDK makes the call through
the proxy; the usage row must hold the token classes and cost that an independent reading
gives: genai-prices' own usage extractors and calculator (`genai_prices.extract_usage`,
`calc_price`), not our parsers or engine. Anthropic `iterations` (compaction, advisor
steps), which genai-prices does not read, are summed here from the recorded body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import genai_prices
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import types

from proxy.pricing import bundled_tables_dir
from proxy.pricing_check import parse_exceptions
from tests.conftest import VIRTUAL_KEY, Stack, free_port

REPLAY = Path(__file__).parent / "fixtures" / "replay"
CASES = json.loads((REPLAY / "manifest.json").read_text())
EXCEPTIONS = bundled_tables_dir() / "EXCEPTIONS.md"
GENAI_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}


class Replay:
    """An upstream that answers every request with the current case's recorded bytes."""

    def __init__(self) -> None:
        self.case: dict[str, Any] = {}
        self.requests: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests.append(request.path)
        body = (REPLAY / self.case["body"]).read_bytes()
        response = web.StreamResponse(headers={"Content-Type": self.case["content_type"]})
        await response.prepare(request)
        for start in range(0, len(body), 4096):  # streamed in pieces, as a provider does
            await response.write(body[start:start + 4096])
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Replay]]:
    upstream, port = Replay(), free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(tmp_path_factory.mktemp("replay"),
                  {"providers": {p: {"base_url": url} for p in ("openai", "anthropic", "gemini")}})

    async def start() -> web.AppRunner:
        runner = web.AppRunner(upstream.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = stack.call(start())
    yield stack, upstream
    stack.call(runner.cleanup())
    stack.close()


def call(stack: Stack, case: dict[str, Any]) -> None:
    """The call a client would make, through the proxy with the official SDK."""
    model, stream = case["request_model"], case["stream"]
    if case["provider"] == "openai":
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        if case["endpoint"] == "responses":
            result: Any = client.responses.create(model=model, input="hi", stream=stream)
        else:
            result = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=stream)
    elif case["provider"] == "anthropic":
        client_a = anthropic.Anthropic(base_url=stack.base("anthropic", ""),
                                       api_key=VIRTUAL_KEY, max_retries=0)
        result = client_a.messages.create(model=model, max_tokens=64, stream=stream,
                                          messages=[{"role": "user", "content": "hi"}])
    else:
        client_g = genai.Client(api_key=VIRTUAL_KEY, http_options=types.HttpOptions(
            base_url=f"{stack.url}/gemini"))
        if stream:
            result = client_g.models.generate_content_stream(model=model, contents="hi")
        else:
            result = client_g.models.generate_content(model=model, contents="hi")
    if stream:
        for _ in result:
            pass


def recorded_usage(case: dict[str, Any]) -> dict[str, Any]:
    """The final response object (for a stream, assembled from its events), as recorded."""
    text = (REPLAY / case["body"]).read_text()
    if not case["stream"]:
        return json.loads(text)
    events = [json.loads(line[5:]) for line in text.splitlines()
              if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]")]
    if case["provider"] == "anthropic":
        message = next(e["message"] for e in events if e.get("type") == "message_start")
        usage = dict(message["usage"])
        for event in events:
            if event.get("type") == "message_delta":
                usage.update({k: v for k, v in (event.get("usage") or {}).items()
                              if v is not None})
        return {**message, "usage": usage}
    if case["endpoint"] == "responses":
        return next(e["response"] for e in reversed(events) if e.get("type") in (
            "response.completed", "response.incomplete"))
    key = "usageMetadata" if case["provider"] == "gemini" else "usage"
    return next(e for e in reversed(events) if e.get(key))


def independent(case: dict[str, Any]) -> tuple[dict[str, int], Decimal]:
    """Token classes and cost as genai-prices reads and prices the recorded response."""
    body = recorded_usage(case)
    provider = GENAI_PROVIDER[case["provider"]]
    flavor = "responses" if case["endpoint"] == "responses" else (
        "chat" if case["provider"] == "openai" else "default")
    steps = (body.get("usage") or {}).get("iterations") if case["provider"] == "anthropic" \
        else None
    if steps:
        parts = [(step.get("model") if step.get("type") == "advisor_message" else None,
                  _anthropic_step(step)) for step in steps]
        main = [u for m, u in parts if m is None]
        usage = genai_prices.Usage(**{k: sum(getattr(u, k) or 0 for u in main) for k in (
            "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens")})
        total = sum((genai_prices.calc_price(u, m or body["model"], provider_id=provider)
                     .total_price for m, u in parts if m is not None), Decimal(0))
        total += genai_prices.calc_price(usage, body["model"], provider_id=provider).total_price
    else:
        usage = genai_prices.extract_usage(body, provider_id=provider, api_flavor=flavor).usage
        if case["endpoint"] == "responses":  # billed per search; genai-prices' extractor
            usage.web_searches = sum(  # does not count the calls, so count them here
                1 for item in body.get("output") or () if item.get("type") == "web_search_call")
        if case["provider"] == "gemini":  # Grounding with Google Search: Gemini 3 and later
            queries = sum(len(c.get("groundingMetadata", {}).get("webSearchQueries") or ())
                          for c in body.get("candidates") or ())  # bill each query, older
            gemini_3 = case["response_model"].split("-")[1][0] >= "3"  # models each prompt
            usage.web_searches = queries if gemini_3 else min(queries, 1)
        context = {}
        tier = body.get("service_tier")
        if isinstance(tier, str) and tier not in ("default", "auto", "standard"):
            context["service_tier"] = tier
        total = genai_prices.calc_price(usage, case["response_model"], provider_id=provider,
                                        price_context=context or None).total_price
    cached, written = usage.cache_read_tokens or 0, usage.cache_write_tokens or 0
    classes = {"input_tokens": (usage.input_tokens or 0) - cached - written,
               "cached_input_tokens": cached, "cache_write_tokens": written,
               "output_tokens": usage.output_tokens or 0}
    return classes, total.quantize(Decimal("1e-10"))


def _anthropic_step(step: dict[str, Any]) -> Any:
    read = step.get("cache_read_input_tokens") or 0
    write = step.get("cache_creation_input_tokens") or 0
    return genai_prices.Usage(input_tokens=step["input_tokens"] + read + write,
                              cache_read_tokens=read, cache_write_tokens=write,
                              output_tokens=step["output_tokens"])


def test_the_suite_covers_every_kind_of_call() -> None:
    """At least 40 real cases: each provider and endpoint, streamed and not, with cache
    reads, reasoning, tools and compaction among them."""
    assert len(CASES) >= 40
    kinds = {(c["provider"], c["endpoint"].replace("stream", "").lower(), c["stream"])
             for c in CASES}
    assert {("openai", "chat.completions", False), ("openai", "chat.completions", True),
            ("openai", "responses", False), ("openai", "responses", True),
            ("anthropic", "messages", False), ("anthropic", "messages", True),
            ("gemini", "generatecontent", False), ("gemini", "generatecontent", True)} <= kinds
    bodies = " ".join((REPLAY / c["body"]).read_text() for c in CASES)
    for marker in ("iterations", "reasoning_tokens", "thoughtsTokenCount", "tool_use",
                   "cache_read_input_tokens"):
        assert marker in bodies, marker
    for case in CASES:
        assert set(case["source"]) == {"repository", "path", "commit", "interaction"}


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_replayed_call_is_metered_and_priced_exactly(replay: tuple[Stack, Replay],
                                                      case: dict[str, Any]) -> None:
    """The row's token classes and cost equal genai-prices' reading of the recorded usage."""
    stack, upstream = replay
    upstream.case = case
    before = len(stack.rows())
    call(stack, case)
    rows = stack.rows(before + 1)
    assert len(rows) == before + 1
    row = rows[-1]
    classes, cost = independent(case)
    assert row["usage_source"] == "provider"
    assert {k: row[k] for k in classes} == classes
    assert row["priced"] == 1, row["error"]
    disagreement = case.get("genai_prices_disagrees")
    if disagreement:  # our table is right and genai-prices wrong, on record in EXCEPTIONS.md
        assert disagreement in parse_exceptions(EXCEPTIONS.read_text())
        assert Decimal(str(row["cost_usd"])) > cost
    else:
        assert Decimal(str(row["cost_usd"])).quantize(Decimal("1e-10")) == cost
