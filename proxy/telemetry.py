"""OpenTelemetry: one span per call by the GenAI semantic conventions, plus token, duration
and cost metrics, sent over OTLP/HTTP (optional extra `otel`; off unless
`telemetry.otlp_endpoint` is set).

`observe` runs once per call when its row is written; it only builds the span and records
the metrics. The SDK's batch span processor and periodic metric reader export from their
own threads, so the event loop never waits on the collector.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config import TelemetryConfig
    from proxy.exchange import Exchange
    from proxy.storage.row import UsageRow

# W3C trace context: version 00, a 32-hex trace id and a 16-hex parent id, not all zeros.
TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# gen_ai.operation.name for each endpoint the dialects name.
OPERATIONS = {"chat.completions": "chat", "responses": "chat", "messages": "chat",
              "completions": "text_completion", "embeddings": "embeddings",
              "embedContent": "embeddings", "batchEmbedContents": "embeddings",
              "generateContent": "generate_content",
              "streamGenerateContent": "generate_content"}
# gen_ai.provider.name where the conventions' name differs from our provider's.
PROVIDER_NAMES = {"gemini": "gcp.gemini", "azure": "azure.ai.openai", "xai": "x_ai",
                  "mistral": "mistral_ai"}


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header, or None when it is absent or malformed."""
    if not traceparent:
        return None
    found = TRACEPARENT.fullmatch(traceparent.strip().lower())
    return found.group(1) if found else None


class Telemetry:
    """The tracer and instruments, built once at start and shut down (flushed) at the end."""

    def __init__(self, config: TelemetryConfig) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ValueError("telemetry.otlp_endpoint needs OpenTelemetry: "
                             "pip install 'meterproxy[otel]'") from None
        base = (config.otlp_endpoint or "").rstrip("/")
        resource = Resource.create({"service.name": config.service_name})
        # Providers of our own, not the global ones: an embedding app keeps its own.
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
            export_interval_millis=config.export_interval_ms)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self.tracer = self.tracer_provider.get_tracer("meterproxy")
        meter = self.meter_provider.get_meter("meterproxy")
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per call, by gen_ai.token.type (input, output).")
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Time from the call's arrival to its last byte.")
        self.cost = meter.create_counter(
            "meterproxy.cost.usd", unit="USD", description="What the calls cost, priced.")
        self._propagator = TraceContextTextMapPropagator()
        self._kind, self._status, self._error = SpanKind.CLIENT, Status, StatusCode.ERROR

    def observe(self, x: Exchange, row: UsageRow) -> None:
        """Emit the call's span and metrics (the row is the one the usage log gets)."""
        operation = OPERATIONS.get(row.endpoint or "", row.endpoint or "unknown")
        provider = PROVIDER_NAMES.get(row.provider or "", row.provider or "unknown")
        common: dict[str, Any] = {"gen_ai.operation.name": operation,
                                  "gen_ai.provider.name": provider}
        if row.model:
            common["gen_ai.request.model"] = row.model
        if row.response_model:
            common["gen_ai.response.model"] = row.response_model
        usage = x.usage
        response_id = x.metered.response_id if x.metered is not None else None
        input_tokens = usage.prompt_tokens if usage is not None else 0
        attributes: dict[str, Any] = {
            **common,
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": row.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": row.cached_input_tokens,
            "gen_ai.usage.cache_creation.input_tokens": row.cache_write_tokens,
            "gen_ai.usage.reasoning.output_tokens": row.reasoning_tokens,
            "http.response.status_code": row.status or 0,
            "meterproxy.request_id": row.id,
            "meterproxy.outcome": row.outcome,
            "meterproxy.priced": bool(row.priced),
        }
        if response_id:
            attributes["gen_ai.response.id"] = response_id
        extra = {"meterproxy.cost.usd": row.cost_usd, "meterproxy.customer": row.customer,
                 "meterproxy.feature": row.feature, "meterproxy.key": row.key_name,
                 "meterproxy.trace_id": row.trace_id,
                 "meterproxy.pricing_version": row.pricing_version,
                 "meterproxy.usage_source": row.usage_source,
                 "meterproxy.upstream_request_id": row.upstream_request_id}
        attributes.update({k: v for k, v in extra.items() if v is not None})
        start = int(x.started.timestamp() * 1e9)
        end = start + int((row.duration_ms or 0) * 1e6)
        parent = self._propagator.extract({"traceparent": x.request.headers.get(
            "traceparent", "")}) if "traceparent" in x.request.headers else None
        span = self.tracer.start_span(f"{operation} {row.model or ''}".strip(), context=parent,
                                      kind=self._kind, attributes=attributes, start_time=start)
        if row.outcome != "ok" or (row.status or 0) >= 400:
            span.set_attribute("error.type", row.outcome if row.outcome != "ok"
                               else str(row.status))
            span.set_status(self._status(self._error, row.error or row.outcome))
        span.end(end_time=end)
        self.duration.record((row.duration_ms or 0) / 1000, common)
        if input_tokens:
            self.tokens.record(input_tokens, {**common, "gen_ai.token.type": "input"})
        if row.output_tokens:
            self.tokens.record(row.output_tokens, {**common, "gen_ai.token.type": "output"})
        if row.cost_usd:
            self.cost.add(row.cost_usd, {**common, **{k: v for k, v in (
                ("meterproxy.customer", row.customer), ("meterproxy.feature", row.feature),
                ("meterproxy.key", row.key_name)) if v is not None}})

    def close(self) -> None:
        """Flush what is batched and stop the exporters (blocking: call off the loop)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def open_telemetry(config: TelemetryConfig) -> Telemetry | None:
    """The telemetry a config asks for, or None when `otlp_endpoint` is not set."""
    return Telemetry(config) if config.otlp_endpoint else None
