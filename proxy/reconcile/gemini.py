"""Gemini's bill: a Cloud Billing export (BigQuery's standard usage cost rows) as a file.

Google has no cost API for the Gemini API, so the operator exports the billing table
(JSON lines, or CSV with dotted column names such as `sku.description`) and points
`--billing-export` / `reconcile.gemini.billing_export` at it. Each row names a SKU; the
model and the token class are read from its description ("Gemini 2.5 Flash input text
tokens", "... cached input ...", "... output ..."). `cost` is before credits; credits
(negative amounts: discounts, promotions) are added, so the line is what was charged.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.config import BillingSourceConfig
from proxy.reconcile.bill import (
    BillClass,
    BillingSourceError,
    BillLine,
    day_of,
    decimal,
    in_scope,
    loads,
    number,
)

SERVICES = ("gemini api", "generative language api")
_MODEL = re.compile(r"gemini[\s-]+(\d+(?:\.\d+)?)[\s-]+(flash[\s-]+lite|flash|pro)"
                    r"(?:[\s-]+(preview|image|live|tts))?", re.I)
TOKEN_UNITS = ("count", "token", "tokens", "1 count")


def read(conf: BillingSourceConfig, path: str, since: datetime, until: datetime
         ) -> list[BillLine]:
    """The Gemini API lines of an export file for usage that started in [since, until)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BillingSourceError(f"billing export {path}: cannot read: {exc}") from None
    lines = []
    lo, hi = since.strftime("%Y-%m-%d"), until.strftime("%Y-%m-%d")
    for n, row in enumerate(_rows(text, path), 1):
        try:
            line = export_line(row, conf)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BillingSourceError(f"billing export {path}: row {n}: {exc}") from None
        if line is not None and lo <= line.day < hi:
            lines.append(line)
    return lines


def _rows(text: str, path: str) -> Iterator[dict[str, Any]]:
    """Rows as nested dicts, from JSON lines or a CSV with dotted headers."""
    if text.lstrip().startswith("{"):
        for n, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    yield loads(raw)
                except ValueError:
                    raise BillingSourceError(f"billing export {path}: line {n} is not JSON"
                                             ) from None
        return
    for flat in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for column, value in flat.items():
            node = row
            *parents, leaf = (column or "").split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        for name in ("labels", "credits"):
            if isinstance(row.get(name), str):
                row[name] = loads(row[name]) if row[name].strip() else []
        yield row


def export_line(row: dict[str, Any], conf: BillingSourceConfig) -> BillLine | None:
    """One export row as a bill line, or None when it is not Gemini API usage in USD."""
    service = str((row.get("service") or {}).get("description", "")).lower()
    if service not in SERVICES or str(row.get("currency", "USD")).upper() != "USD":
        return None
    sku = str((row.get("sku") or {}).get("description", ""))
    model, cls = sku_meaning(sku)
    usage = row.get("usage") or {}
    tokens = 0
    if cls is BillClass.GROUNDING or str(usage.get("unit", "")).lower() in TOKEN_UNITS:
        tokens = number(decimal(usage.get("amount")))
    credits = sum((decimal(c.get("amount")) for c in row.get("credits") or []), Decimal(0))
    project = (row.get("project") or {}).get("id")
    labels = {str(x.get("key")): str(x.get("value")) for x in row.get("labels") or []
              if isinstance(x, dict)}
    key = labels.get("api_key_id") or project
    return BillLine(day_of(row.get("usage_start_time")), model, cls, tokens=tokens,
                    usd=decimal(row.get("cost")) + credits, key=key,
                    in_scope=in_scope((project,), (conf.project_ids,)))


def sku_meaning(description: str) -> tuple[str, BillClass]:
    """(model, class) a SKU description names, e.g. `Gemini 2.5 Flash output tokens`."""
    m = _MODEL.search(description)
    if m is None:
        return description, BillClass.OTHER
    model = "-".join(["gemini", m.group(1), *m.group(2).lower().split(),
                      *([m.group(3).lower()] if m.group(3) else [])])
    text = description.lower()
    if "search" in text or "grounding" in text:
        return model, BillClass.GROUNDING
    if "storage" in text:
        return model, BillClass.OTHER  # context-cache storage is billed per hour, not tokens
    if "cache" in text:
        return model, BillClass.CACHED_INPUT
    if "output" in text or "thinking" in text:
        return model, BillClass.OUTPUT
    if "input" in text:
        return model, BillClass.INPUT
    return model, BillClass.OTHER
