"""price and record: what the call cost, and its one row in the usage log.

`record` runs from the pipeline's `finally`, so every call that reached the proxy yields
exactly one row whatever happened. When the provider reported no usage, the tokens are
counted with tiktoken off the event loop, then the row is written.
"""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal

import orjson
import structlog

from proxy import money, tokens
from proxy.exchange import Exchange
from proxy.fingerprint import fingerprint
from proxy.outcome import Outcome, UsageSource
from proxy.pricing import cost, rounded
from proxy.runtime import Runtime
from proxy.storage.row import UsageRow
from proxy.token_classes import PARTS
from proxy.usage import Usage

log = structlog.get_logger("meterproxy")

ZERO = rounded(Decimal(0))
# Outcomes whose calls used provider capacity and are metered even without a usage report.
_BILLABLE = frozenset({Outcome.OK, Outcome.CLIENT_DISCONNECT, Outcome.UPSTREAM_ERROR})


def price(rt: Runtime, x: Exchange) -> None:
    """Settle x.usage and x.cost from what the relay metered; idempotent."""
    if x.cost is not None or not x.priced:
        return
    metered = x.metered
    if x.usage is None and metered is not None and metered.usage is not None:
        x.usage, x.usage_source = metered.usage, UsageSource.PROVIDER
    if x.usage is None:
        if x.forwarded and x.call.metered and _needs_estimate(x):
            return  # record() counts the tokens off the loop and comes back here
        x.usage = Usage()
        x.usage_source = UsageSource.PROVIDER if x.forwarded else None
    if not x.call.metered or not x.usage.billable:
        x.cost = ZERO
        return
    assert x.upstream is not None
    response_model = metered.response_model if metered is not None else None
    found = rt.prices.lookup(x.upstream.pricing_table, (response_model, x.call.model), x.started)
    if found is None:
        x.priced = False
        key = (x.upstream.pricing_table, x.call.model)
        if key not in rt.unpriced_warned:
            rt.unpriced_warned.add(key)
            log.warning("model_unpriced", provider=x.provider, table=key[0], model=x.call.model,
                        response_model=response_model)
        return
    result = cost(x.usage, found, x.started)
    total, breakdown = result.total, result.breakdown
    # Steps another model ran inside the call (Anthropic's advisor), at that model's rate.
    for model, usage in x.usage.nested:
        inner = rt.prices.lookup(x.upstream.pricing_table, (model,), x.started)
        if inner is None:
            breakdown.setdefault("missing_rates", []).append(f"model {model}")
            continue
        part = cost(usage, inner, x.started)
        total += part.total
        breakdown.setdefault("nested", []).append(
            {"model": inner.model.name, "pricing_version": inner.version,
             "usd": str(part.total), **part.breakdown})
    x.cost = rounded(total)
    x.cost_breakdown = {"model": found.model.name, "period": found.period.effective_from
                        .date().isoformat(), **breakdown}
    x.pricing_version = found.version


def record(rt: Runtime, x: Exchange) -> None:
    """Write the call's one row now, or after its tokens are counted.

    Rows are for calls of known keys: a request refused before any key was known (a
    probe, a wrong key) is counted in /metrics and logged, sampled, but never a row."""
    if x.recorded:
        return
    x.recorded = True
    if x.key_name is None:
        _refused_stranger(rt, x)
        return
    duration = x.elapsed_ms()
    price(rt, x)
    if x.cost is None and x.priced:
        rt.spawn(_estimate_then_write(rt, x, duration))
    else:
        _write(rt, x, duration)


def _refused_stranger(rt: Runtime, x: Exchange) -> None:
    status = str(x.status or 0)
    rt.metrics.refused[(("status", status),)] += 1
    held = rt.metrics.refused_log.due(f"refused:{status}", time.monotonic())
    if held is not None:
        log.warning("refused_without_key", request_id=x.id, status=x.status, error=x.error,
                    method=x.request.method, path=x.request.path[:200],
                    peer=x.request.remote, similar_since_last=held)


def _needs_estimate(x: Exchange) -> bool:
    if x.outcome not in _BILLABLE:
        return False
    # A provider that refused the call (error status) or never answered it bills nothing;
    # one that accepted it and then broke off may have: estimate what was used.
    if x.outcome == Outcome.UPSTREAM_ERROR:
        return x.upstream_status is not None and x.upstream_status < 400
    return True


async def _estimate_then_write(rt: Runtime, x: Exchange, duration: float) -> None:
    try:
        x.usage = await tokens.off_loop(estimate, x, rt.settings.server.estimate_bytes_above_kb
                                        * 1024, tenant=x.key_name or "")
        # partial: the answer was cut short; estimated: it ended but no usage came.
        whole = x.outcome == Outcome.OK and x.status is not None and x.status < 400
        x.usage_source = UsageSource.ESTIMATED if whole else UsageSource.PARTIAL
        if not tokens.is_exact_for(x.call.model):
            note = "estimated with o200k_base; this model has its own tokenizer"
            x.error = f"{x.error}; {note}" if x.error else note
        price(rt, x)
    except Exception as exc:  # the row must be written whatever the estimate does
        log.exception("estimate_failed", request_id=x.id)
        x.usage, x.usage_source = x.usage or Usage(), UsageSource.PARTIAL
        x.error = f"{x.error or ''} estimate failed: {exc}".strip()
    finally:
        _write(rt, x, duration)


def estimate(x: Exchange, count_up_to: int) -> Usage:
    """Count the prompt and the output streamed so far with tiktoken (CPU, on the pool).

    Input counts the provider already reported in the stream are kept as they are: they
    are exact, and they say which tokens were cache reads and writes. A body larger than
    `count_up_to` bytes is not tokenized: its byte length bounds its tokens.
    """
    model = x.call.model
    output = x.metered.text.count() if x.metered is not None else 0
    known = x.metered.prompt_usage if x.metered is not None else None
    if known is not None:
        return replace(known, output_tokens=output, **dict.fromkeys(PARTS["output_tokens"], 0))
    if len(x.body) > count_up_to:
        return Usage(input_tokens=tokens.utf8_bound(x.body), output_tokens=output)
    tokens.check_depth(x.payload)
    texts, overhead = x.dialect.prompt_texts(x.call, x.payload)
    prompt = tokens.count_texts(texts, model) + overhead
    return Usage(input_tokens=prompt, output_tokens=output)


def began(rt: Runtime, x: Exchange) -> None:
    """Journal the call as it goes upstream, so a kill -9 mid-call still leaves its row."""
    if rt.writer.journal is not None:
        rt.writer.journal.began(row_of(x, None))


def row_of(x: Exchange, duration: float | None) -> UsageRow:
    """The call's usage-log row as it stands."""
    usage = x.usage or Usage()
    metered = x.metered
    return UsageRow(
        id=x.id,
        ts=x.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        duration_ms=duration,
        ttfb_ms=x.ttfb,
        key_name=x.key_name,
        provider=x.provider,
        endpoint=x.call.endpoint,
        model=x.call.model,
        response_model=metered.response_model if metered is not None else None,
        stream=int(x.call.stream),
        status=x.status,
        outcome=x.outcome,
        **usage.counts(),
        usage_source=x.usage_source,
        cost_usd=float(x.cost) if x.cost is not None else None,
        cost_breakdown=orjson.dumps(x.cost_breakdown).decode() if x.cost_breakdown else None,
        pricing_version=x.pricing_version,
        priced=int(x.priced),
        customer=x.customer,
        feature=x.feature,
        trace_id=x.trace_id,
        tags=orjson.dumps(x.tags).decode() if x.tags else None,
        upstream_request_id=x.upstream_request_id,
        error=x.error,
        prefix_hash=x.prefix_hash,
        prefix_tokens=x.prefix_tokens,
    )


def fingerprint_prefix(rt: Runtime, x: Exchange) -> None:
    """The hash and token share of the call's stable prompt prefix (proxy.fingerprint),
    for the advisor; bounded work, after the answer has gone, never failing the row."""
    if not (x.call.metered and x.forwarded and isinstance(x.payload, dict)):
        return
    try:
        split = x.dialect.split_prefix(x.call, x.payload)
        found = fingerprint(*split, rt.services.prefix_secret) if split else None
    except Exception:  # a shape no dialect foresaw: no fingerprint, the row stands
        log.exception("prefix_fingerprint_failed", request_id=x.id)
        return
    if found is not None:
        x.prefix_hash = found.hash
        x.prefix_tokens = found.tokens(x.usage.prompt_tokens if x.usage is not None else 0)


def _write(rt: Runtime, x: Exchange, duration: float) -> None:
    fingerprint_prefix(rt, x)
    row = row_of(x, duration)
    usage = x.usage or Usage()
    rt.writer.submit(row)
    rt.metrics.observe(row)
    if rt.telemetry is not None:
        rt.telemetry.observe(x, row)
    if rt.budgets is not None:
        rt.budgets.settle(x)
    log.info("call", request_id=x.id, provider=x.provider, model=x.call.model,
             endpoint=x.call.endpoint, status=x.status, outcome=x.outcome,
             key=x.key_name, customer=x.customer, feature=x.feature,
             input_tokens=usage.input_tokens, cached_input_tokens=usage.cached_input_tokens,
             output_tokens=usage.output_tokens,
             cost_usd=money.exact(x.cost) if x.cost is not None else None,
             usage_source=x.usage_source, duration_ms=duration, ttfb_ms=x.ttfb)

