"""OpenTelemetry: spans and metrics of real SDK calls arrive at a real OTLP/HTTP receiver
(an aiohttp server decoding the protobuf payloads) with the GenAI attributes."""

from __future__ import annotations

import asyncio
import gzip
import os
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.simulator import Scenario
from proxy.telemetry import trace_id_of
from tests.conftest import VIRTUAL_KEY, Stack, free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


class Receiver:
    """An OTLP/HTTP collector on loopback that keeps what it is sent, decoded."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.metrics: list[Any] = []

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if request.path == "/v1/traces":
            message = ExportTraceServiceRequest.FromString(body)
            for resource in message.resource_spans:
                attrs = attributes(resource.resource.attributes)
                for scope in resource.scope_spans:
                    self.spans += [(attrs, span) for span in scope.spans]
        else:
            message = ExportMetricsServiceRequest.FromString(body)
            for resource in message.resource_metrics:
                for scope in resource.scope_metrics:
                    self.metrics += list(scope.metrics)
        return web.Response(content_type="application/x-protobuf", body=b"")

    def start(self) -> None:
        """Serve from a loop of its own, so it outlives the proxy's final flush."""
        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/v1/traces", self._receive)
            app.router.add_post("/v1/metrics", self._receive)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def attributes(items: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict of plain values."""
    out = {}
    for kv in items:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field)
    return out


def wait_for(predicate: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the receiver never got it")


@pytest.fixture(scope="module")
def otel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Receiver]]:
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "50"  # the batch span processor's flush delay
    receiver = Receiver()
    receiver.start()
    stack = Stack(tmp_path_factory.mktemp("otel"), {"telemetry": {
        "otlp_endpoint": receiver.url, "export_interval_ms": 200}})
    try:
        yield stack, receiver
    finally:
        stack.close()
        receiver.stop()
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]


def span_of(receiver: Receiver, request_id: str) -> tuple[dict[str, Any], Span, dict[str, Any]]:
    def find() -> Any:
        for resource, span in receiver.spans:
            attrs = attributes(span.attributes)
            if attrs.get("meterproxy.request_id") == request_id:
                return resource, span, attrs
        return None

    return wait_for(find)


def test_openai_call_is_a_child_span_with_genai_attributes(otel: tuple[Stack, Receiver]) -> None:
    """A chat call under the caller's traceparent: a CLIENT span in that trace, every GenAI
    usage attribute from the provider's report, the exact cost and the attribution."""
    stack, receiver = otel
    stack.sim.then(Scenario(usage={
        "prompt_tokens": 3000, "completion_tokens": 200, "total_tokens": 3200,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 50}}))
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    before = len(stack.rows())
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"traceparent": TRACEPARENT, "X-Meter-Customer": "acme",
                       "X-Meter-Feature": "search"})
    request_id = raw.headers["x-meter-request-id"]
    completion = raw.parse()
    row = stack.rows(before + 1)[-1]
    assert row["id"] == request_id and row["trace_id"] == TRACE
    resource, span, attrs = span_of(receiver, request_id)
    assert resource["service.name"] == "meterproxy"
    assert span.name == "chat gpt-4o-mini" and span.kind == Span.SPAN_KIND_CLIENT
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (TRACE, PARENT)
    # gpt-4o-mini: $0.15 uncached, $0.075 cached, $0.60 output per 1M tokens.
    cost = (1976 * Decimal("0.15") + 1024 * Decimal("0.075") + 200 * Decimal("0.6")) / 10**6
    assert attrs == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.response.id": completion.id, "gen_ai.usage.input_tokens": 3000,
        "gen_ai.usage.output_tokens": 200,
        "gen_ai.usage.cache_read.input_tokens": 1024,
        "gen_ai.usage.cache_creation.input_tokens": 0,
        "gen_ai.usage.reasoning.output_tokens": 50,
        "http.response.status_code": 200, "meterproxy.outcome": "ok",
        "meterproxy.priced": True, "meterproxy.request_id": request_id,
        "meterproxy.cost.usd": float(cost), "meterproxy.customer": "acme",
        "meterproxy.feature": "search", "meterproxy.key": "team-a",
        "meterproxy.trace_id": TRACE, "meterproxy.pricing_version": row["pricing_version"],
        "meterproxy.usage_source": "provider",
        "meterproxy.upstream_request_id": row["upstream_request_id"]}
    assert span.end_time_unix_nano - span.start_time_unix_nano == int(row["duration_ms"] * 1e6)


def test_anthropic_cache_writes_and_metrics(otel: tuple[Stack, Receiver]) -> None:
    """Cache writes count as input (as the conventions say) and as cache_creation; the
    token histogram, duration histogram and cost counter arrive too."""
    stack, receiver = otel
    stack.sim.then(Scenario(usage={
        "input_tokens": 30, "cache_read_input_tokens": 400, "cache_creation_input_tokens": 500,
        "output_tokens": 60, "cache_creation": {"ephemeral_5m_input_tokens": 500,
                                                "ephemeral_1h_input_tokens": 0}}))
    client = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                 max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "x"}])
    _, span, attrs = span_of(receiver, raw.headers["x-meter-request-id"])
    assert span.name == "chat claude-sonnet-4-5" and not span.parent_span_id
    assert attrs["gen_ai.response.id"] == raw.parse().id
    assert (attrs["gen_ai.provider.name"], attrs["gen_ai.usage.input_tokens"],
            attrs["gen_ai.usage.cache_read.input_tokens"],
            attrs["gen_ai.usage.cache_creation.input_tokens"],
            attrs["gen_ai.usage.output_tokens"]) == ("anthropic", 930, 400, 500, 60)
    assert "meterproxy.trace_id" not in attrs
    rows = stack.rows()
    total_cost = sum(r["cost_usd"] for r in rows)

    def latest(name: str) -> Any:
        found = [m for m in receiver.metrics if m.name == name]
        return found[-1] if found else None

    def settled() -> bool:
        tokens, cost = latest("gen_ai.client.token.usage"), latest("meterproxy.cost.usd")
        if tokens is None or cost is None:
            return False
        sums = {}
        for point in tokens.histogram.data_points:
            kind = attributes(point.attributes)["gen_ai.token.type"]
            sums[kind] = sums.get(kind, 0) + point.sum
        spent = sum(p.as_double for p in cost.sum.data_points)
        return sums == {"input": 3930, "output": 260} and abs(spent - total_cost) < 1e-12

    wait_for(settled)
    duration = latest("gen_ai.client.operation.duration")
    assert sum(p.count for p in duration.histogram.data_points) == len(rows) == 2
    assert duration.unit == "s" and latest("meterproxy.cost.usd").unit == "USD"


def test_traceparent_fills_the_trace_id_only_when_no_header_names_one(
        otel: tuple[Stack, Receiver]) -> None:
    """X-Meter-Trace-Id wins over traceparent; a malformed or all-zero one is ignored."""
    stack, _ = otel
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    for headers, expected in (({"traceparent": TRACEPARENT, "X-Meter-Trace-Id": "run-7"},
                               "run-7"),
                              ({"traceparent": f"00-{'0' * 32}-{PARENT}-01"}, None)):
        before = len(stack.rows())
        client.chat.completions.create(model="gpt-4o-mini", extra_headers=headers,
                                       messages=[{"role": "user", "content": "hi"}])
        assert stack.rows(before + 1)[-1]["trace_id"] == expected
    assert trace_id_of(TRACEPARENT) == TRACE
    assert trace_id_of(TRACEPARENT.upper()) == TRACE
    assert trace_id_of(f"00-{'0' * 32}-{PARENT}-01") is None
    assert trace_id_of("00-xyz") is None and trace_id_of(None) is None


def test_telemetry_off_without_endpoint(tmp_path: Path) -> None:
    """No otlp_endpoint: no telemetry object, and nothing is imported or exported."""
    stack = Stack(tmp_path)
    try:
        assert stack.runtime.telemetry is None
    finally:
        stack.close()
