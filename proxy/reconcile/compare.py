"""The meter against the bill: cells per day x model x class, unmetered spend, drift.

A cell compares the provider's tokens and dollars for the proxy's own keys with what the
usage log metered. A steady difference in the cost per token of one model and class (the
tokens agree, the dollars do not, by the same rate every day) is explained: the implied
rate, the `pricing.overrides` entry that would make the two agree, and how much `reprice`
would then change the logged costs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from proxy.pricing import PriceBook
from proxy.reconcile.bill import BillClass, BillLine, bill_class, override_field, per_unit
from proxy.storage.metered import MeteredDay

BY_NAMES = ("day", "model")
PCT = Decimal("0.01")
RATE = Decimal("0.000001")


def money(value: Decimal) -> str:
    """The exact decimal string of a dollar amount (no exponent, no trailing zeros)."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


@dataclass
class Cell:
    provider_tokens: int = 0
    provider_usd: Decimal = Decimal(0)
    metered_tokens: int = 0
    metered_usd: Decimal = Decimal(0)

    def add(self, other: Cell) -> None:
        self.provider_tokens += other.provider_tokens
        self.provider_usd += other.provider_usd
        self.metered_tokens += other.metered_tokens
        self.metered_usd += other.metered_usd


def pct(diff: Decimal | int, base: Decimal | int) -> Decimal | None:
    """diff as a percentage of base; None when there is no base to compare with."""
    if not base:
        return None if diff else Decimal(0)
    return (Decimal(diff) * 100 / Decimal(base)).quantize(PCT)


def within(cell: Cell, tolerance: Decimal) -> bool:
    for diff, base in ((cell.metered_tokens - cell.provider_tokens, cell.provider_tokens),
                       (cell.metered_usd - cell.provider_usd, cell.provider_usd)):
        p = pct(diff, base)
        if p is None or abs(p) > tolerance:
            return False
    return True


@dataclass
class Reconciliation:
    """The whole comparison for one provider and range; `to_json` is the API's answer."""

    provider: str
    since: date
    until: date
    tolerance_pct: Decimal
    by: tuple[str, ...]
    cells: dict[tuple[str, str, BillClass], Cell] = field(default_factory=dict)
    unmetered: dict[tuple[str, str, BillClass, str], Cell] = field(default_factory=dict)
    drifts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outside(self) -> list[tuple[tuple[str, str, BillClass], Cell]]:
        """The fine-grained (day x model x class) cells outside the tolerance."""
        return [(k, c) for k, c in sorted(self.cells.items())
                if not within(c, self.tolerance_pct)]

    def grouped(self) -> list[tuple[tuple[str, str, BillClass], Cell]]:
        """Cells summed over the dimensions `by` leaves out (class is always kept)."""
        out: dict[tuple[str, str, BillClass], Cell] = {}
        for (day, model, cls), cell in self.cells.items():
            key = (day if "day" in self.by else "*", model if "model" in self.by else "*", cls)
            out.setdefault(key, Cell()).add(cell)
        return sorted(out.items())

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for (day, model, cls), c in self.grouped():
            row: dict[str, Any] = {}
            if "day" in self.by:
                row["day"] = day
            if "model" in self.by:
                row["model"] = model
            diff_tokens = c.metered_tokens - c.provider_tokens
            diff_usd = c.metered_usd - c.provider_usd
            cost_pct, token_pct = pct(diff_usd, c.provider_usd), pct(diff_tokens,
                                                                      c.provider_tokens)
            row.update({
                "token_class": str(cls), "provider_tokens": c.provider_tokens,
                "provider_cost_usd": money(c.provider_usd), "metered_tokens": c.metered_tokens,
                "metered_cost_usd": money(c.metered_usd), "diff_tokens": diff_tokens,
                "diff_cost_usd": money(diff_usd),
                "diff_tokens_pct": None if token_pct is None else money(token_pct),
                "diff_cost_pct": None if cost_pct is None else money(cost_pct),
                "within_tolerance": within(c, self.tolerance_pct),
                "note": _note(c)})
            rows.append(row)
        return rows

    def unmetered_rows(self) -> list[dict[str, Any]]:
        return [{"day": day, "model": model, "token_class": str(cls), "key": key,
                 "tokens": c.provider_tokens, "cost_usd": money(c.provider_usd)}
                for (day, model, cls, key), c in sorted(self.unmetered.items())]

    def to_json(self) -> dict[str, Any]:
        cells = list(self.cells.values())
        not_billed = [c for c in cells if not c.provider_tokens and not c.provider_usd]
        return {
            "provider": self.provider, "since": self.since.isoformat(),
            "until": self.until.isoformat(), "by": list(self.by),
            "tolerance_pct": money(self.tolerance_pct),
            "status": "drift" if self.outside else "ok",
            "cells_outside_tolerance": len(self.outside),
            "totals": {
                "provider_cost_usd": money(sum((c.provider_usd for c in cells), Decimal(0))),
                "metered_cost_usd": money(sum((c.metered_usd for c in cells), Decimal(0))),
                "diff_cost_usd": money(sum((c.metered_usd - c.provider_usd for c in cells),
                                           Decimal(0))),
                "unmetered_cost_usd": money(sum((c.provider_usd
                                                 for c in self.unmetered.values()), Decimal(0))),
                "metered_not_billed_usd": money(sum((c.metered_usd for c in not_billed),
                                                    Decimal(0))),
            },
            "cells": self.rows(),
            "unmetered": self.unmetered_rows(),
            "drifts": self.drifts,
        }


def _note(c: Cell) -> str:
    if not c.provider_tokens and not c.provider_usd and (c.metered_tokens or c.metered_usd):
        return "metered, not billed"
    if not c.metered_tokens and not c.metered_usd and (c.provider_tokens or c.provider_usd):
        return "billed, not metered"
    return ""


def reconcile(provider: str, table: str, prices: PriceBook, bill: list[BillLine],
              metered: dict[tuple[str, str], MeteredDay], since: date, until: date,
              tolerance_pct: Decimal, by: tuple[str, ...] = BY_NAMES) -> Reconciliation:
    """Set the bill's lines for the proxy's keys against the metered days, and explain drift."""
    unknown = [b for b in by if b not in BY_NAMES]
    if unknown:
        raise ValueError(f"--by takes day and/or model, not {unknown[0]!r}")

    def canonical(name: str) -> str:
        found = prices.model(table, [name]) if name else None
        return found.name if found is not None else name

    result = Reconciliation(provider, since, until, tolerance_pct, by)
    lo, hi = since.isoformat(), until.isoformat()
    for line in bill:
        if not lo <= line.day < hi:
            continue
        if line.in_scope:
            cell = result.cells.setdefault((line.day, canonical(line.model), line.cls), Cell())
        else:
            cell = result.unmetered.setdefault(
                (line.day, canonical(line.model), line.cls, line.key or "(none)"), Cell())
        cell.provider_tokens += line.tokens
        cell.provider_usd += line.usd
    for (day, model), m in metered.items():
        name = canonical(model)
        for cls_name, n in m.counts.items():
            result.cells.setdefault((day, name, bill_class(cls_name)), Cell()
                                    ).metered_tokens += n
        for cls_name, usd in m.usd.items():
            result.cells.setdefault((day, name, bill_class(cls_name)), Cell()
                                    ).metered_usd += usd
    result.cells = {k: c for k, c in result.cells.items()
                    if c.provider_tokens or c.provider_usd or c.metered_tokens or c.metered_usd}
    result.drifts = explain(result, table)
    return result


def explain(result: Reconciliation, table: str) -> list[dict[str, Any]]:
    """Per model, the classes whose cost per token differs from ours while tokens agree."""
    tol = result.tolerance_pct
    by_model: defaultdict[str, dict[BillClass, list[tuple[str, Cell]]]] = defaultdict(dict)
    for (day, model, cls), c in sorted(result.cells.items()):
        if cls is BillClass.OTHER or not c.provider_tokens or not c.metered_tokens:
            continue
        token_pct = pct(c.metered_tokens - c.provider_tokens, c.provider_tokens)
        cost_pct = pct(c.metered_usd - c.provider_usd, c.provider_usd)
        if token_pct is None or abs(token_pct) > tol or (cost_pct is not None
                                                         and abs(cost_pct) <= tol):
            continue
        by_model[model].setdefault(cls, []).append((day, c))
    drifts = []
    for model, classes in sorted(by_model.items()):
        entries = [_class_drift(cls, days, tol) for cls, days in sorted(classes.items())]
        drifts.append(_suggest(result, table, model, entries, tol))
    return drifts


def _class_drift(cls: BillClass, days: list[tuple[str, Cell]], tol: Decimal
                 ) -> dict[str, Any]:
    unit = per_unit(cls)
    rates = [c.provider_usd * unit / c.provider_tokens for _, c in days]
    provider_usd = sum((c.provider_usd for _, c in days), Decimal(0))
    provider_tokens = sum(c.provider_tokens for _, c in days)
    metered_usd = sum((c.metered_usd for _, c in days), Decimal(0))
    metered_tokens = sum(c.metered_tokens for _, c in days)
    implied = (provider_usd * unit / provider_tokens).quantize(RATE).normalize()
    ours = (metered_usd * unit / metered_tokens).quantize(RATE).normalize()
    mean = sum(rates, Decimal(0)) / len(rates)
    steady = bool(mean) and (max(rates) - min(rates)) * 100 / mean <= tol
    return {"token_class": str(cls), "days": [d for d, _ in days],
            "rate_unit": "usd_per_mtok" if override_field(cls) else "usd_per_1000_requests",
            "implied_rate": money(implied), "metered_rate": money(ours), "steady": steady,
            "_metered_usd": metered_usd, "_metered_tokens": metered_tokens, "_unit": unit,
            "_implied": implied}


def _suggest(result: Reconciliation, table: str, model: str, entries: list[dict[str, Any]],
             tol: Decimal) -> dict[str, Any]:
    """The override that would make the meter agree, and what `reprice` would change."""
    key = f"{table}/{model}"
    steady = [e for e in entries if e["steady"]]
    drift: dict[str, Any] = {"model": model, "override_key": key, "classes": entries,
                             "override": None, "reprice_change_usd": None, "yaml": None}
    if not steady:
        return _public(drift)
    since = min(e["days"][0] for e in steady)
    override: dict[str, Any] = {}
    change = Decimal(0)
    discount = _uniform_discount(result, model, steady, tol)
    if discount is not None:
        pct_off, priced_usd = discount
        override["discount_pct"] = money(pct_off)
        change = -(priced_usd * pct_off / 100)
    else:
        for e in steady:
            rate_field = override_field(BillClass(e["token_class"]))
            if rate_field is None:
                continue  # a per-request fee: no override field; the implied rate says it
            override[rate_field] = money(e["_implied"])
            change += e["_metered_tokens"] * e["_implied"] / e["_unit"] - e["_metered_usd"]
    if override:
        override["effective_from"] = since
        drift["override"] = {key: override}
        drift["reprice_change_usd"] = money(change.quantize(Decimal("1e-10")))
        body = ", ".join(f"{k}: {v}" for k, v in override.items())
        drift["yaml"] = f"pricing:\n  overrides:\n    {key}: {{{body}}}"
    return _public(drift)


def _uniform_discount(result: Reconciliation, model: str, steady: list[dict[str, Any]],
                      tol: Decimal) -> tuple[Decimal, Decimal] | None:
    """(percent off, metered USD it applies to) when every priced class of the model is off
    by the same factor below 1 on the drifting days: a discount, not a price change."""
    days = {d for e in steady for d in e["days"]}
    drifting = {e["token_class"] for e in steady
                if override_field(BillClass(e["token_class"]))}
    priced = {str(cls) for (day, m, cls), c in result.cells.items()
              if m == model and day in days and c.metered_tokens
              and override_field(cls)}
    if not priced or priced != drifting or len(priced) < 2:
        return None
    steady = [e for e in steady if e["token_class"] in drifting]
    factors = [e["_implied"] / (e["_metered_usd"] * e["_unit"] / e["_metered_tokens"])
               for e in steady]
    if max(factors) >= 1 or (max(factors) - min(factors)) * 100 > tol:
        return None
    provider = sum((e["_implied"] * e["_metered_tokens"] / e["_unit"] for e in steady),
                   Decimal(0))
    metered = sum((e["_metered_usd"] for e in steady), Decimal(0))
    off = ((1 - provider / metered) * 100).quantize(PCT).normalize()
    return off, metered


def _public(drift: dict[str, Any]) -> dict[str, Any]:
    drift["classes"] = [{k: v for k, v in e.items() if not k.startswith("_")}
                        for e in drift["classes"]]
    return drift


def to_days(since: datetime, until: datetime) -> tuple[date, date]:
    """Whole UTC days covering [since, until): the bills come in daily buckets."""
    first = since.date()
    last = until.date() if until.time() == datetime.min.time() else until.date().fromordinal(
        until.date().toordinal() + 1)
    return first, max(last, first.fromordinal(first.toordinal() + 1))
