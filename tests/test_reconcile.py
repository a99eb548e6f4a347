"""Reconcile: a log made by the SDKs through the proxy, set against fake billing APIs.

The fakes bill the same calls at the providers' list prices (typed in by hand in
billing_fakes.py), so every expected number here is a hand computation from the usage the
simulator returned, never a figure from the code under test.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import yaml
from google import genai
from google.genai import types

from proxy.cli import main
from proxy.simulator import Scenario
from tests.billing_fakes import (
    ADMIN_KEY,
    BILLED_NAME,
    LIST_PRICES,
    BilledCall,
    FakeBilling,
    Faults,
)
from tests.conftest import VIRTUAL_KEY, Stack, http

# The module's clock: its dates, and the servers under test, read this one instant, so a
# run that crosses midnight UTC cannot make the server's "yesterday" another day.
NOW = datetime.now(UTC)
TODAY = NOW.date()
DAYS = [TODAY - timedelta(days=n) for n in (3, 2, 1)]  # D1, D2, D3: yesterday is D3
UNTIL = TODAY.isoformat()
OPENAI_ENV, ANTHROPIC_ENV = "METERPROXY_TEST_OPENAI_ADMIN", "METERPROXY_TEST_ANTHROPIC_ADMIN"
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5",
          "gemini": "gemini-2.5-flash"}


def openai_usage(k: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The usage body the simulator returns, and its classes worked out by hand."""
    prompt, cached, out = 120_000 * k, 40_000, 9_000 * k
    body = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": cached}}
    return body, {"input": prompt - cached, "cached_input": cached, "output": out}


def anthropic_usage(k: int) -> tuple[dict[str, Any], dict[str, int]]:
    body = {"input_tokens": 20_000 * k, "cache_creation_input_tokens": 30_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 20_000,
                               "ephemeral_1h_input_tokens": 10_000},
            "cache_read_input_tokens": 60_000, "output_tokens": 4_000 * k,
            "server_tool_use": {"web_search_requests": k}}
    return body, {"input": 20_000 * k, "cached_input": 60_000, "cache_write_5m": 20_000,
                  "cache_write_1h": 10_000, "output": 4_000 * k, "web_search": k}


def gemini_usage(k: int) -> tuple[dict[str, Any], dict[str, int]]:
    body = {"promptTokenCount": 90_000 * k, "cachedContentTokenCount": 30_000,
            "candidatesTokenCount": 5_000 * k, "thoughtsTokenCount": 2_000,
            "totalTokenCount": 90_000 * k + 7_000}
    return body, {"input": 90_000 * k - 30_000, "cached_input": 30_000,
                  "output": 5_000 * k + 2_000}


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BilledCall]]:
    """Two calls per provider and day, through the proxy with the official SDKs."""
    tmp = tmp_path_factory.mktemp("reconcile")
    now = [datetime.now(UTC)]
    stack = Stack(tmp, clock=lambda: now[0])
    calls: list[BilledCall] = []
    try:
        oa = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        an = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                 max_retries=0)
        ge = genai.Client(api_key=VIRTUAL_KEY, http_options=types.HttpOptions(
            base_url=f"{stack.url}/gemini"))
        for i, day in enumerate(DAYS):
            for j in range(2):
                k = i + j + 1
                now[0] = datetime(day.year, day.month, day.day, 9 + 3 * j, 15, tzinfo=UTC)
                body, classes = openai_usage(k)
                stack.sim.then(Scenario(usage=body, model=BILLED_NAME["gpt-4o-mini"]))
                oa.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "hi"}])
                calls.append(BilledCall(now[0], "gpt-4o-mini", classes))
                body, classes = anthropic_usage(k)
                stack.sim.then(Scenario(usage=body, model=BILLED_NAME["claude-sonnet-4-5"]))
                an.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                                   messages=[{"role": "user", "content": "hi"}])
                calls.append(BilledCall(now[0], "claude-sonnet-4-5", classes))
                body, classes = gemini_usage(k)
                stack.sim.then(Scenario(usage=body))
                ge.models.generate_content(model="gemini-2.5-flash", contents="hi")
                calls.append(BilledCall(now[0], "gemini-2.5-flash", classes))
        rows = stack.rows(len(calls))
        assert len(rows) == len(calls) and all(r["priced"] == 1 for r in rows)
    finally:
        stack.close()
    return stack.db, calls


@pytest.fixture
def fake(traffic: tuple[Path, list[BilledCall]]):
    billing = FakeBilling(calls=list(traffic[1]))
    billing.start()
    os.environ[OPENAI_ENV] = ADMIN_KEY
    os.environ[ANTHROPIC_ENV] = ADMIN_KEY
    yield billing
    billing.stop()


def config(tmp: Path, db: Path, fake: FakeBilling, **extra: Any) -> dict[str, Any]:
    export = tmp / "gemini-export.jsonl"
    fake.write_gemini_export(export)
    conf = {"storage": {"usage_log": f"sqlite:///{db}"},
            "reconcile": {
                "openai": {"base_url": fake.url, "admin_key_env": OPENAI_ENV,
                           "api_key_ids": ["key_proxy"]},
                "anthropic": {"base_url": fake.url, "admin_key_env": ANTHROPIC_ENV,
                              "api_key_ids": ["key_proxy"]},
                "gemini": {"project_ids": ["proj_proxy"], "billing_export": str(export)}}}
    for key, value in extra.items():
        conf[key] = {**conf.get(key, {}), **value}
    return conf


def reconcile_cli(tmp: Path, conf: dict[str, Any], provider: str, capsys: Any,
                  *args: str) -> tuple[int, Any]:
    path = tmp / "reconcile.yaml"
    path.write_text(yaml.safe_dump(conf))
    capsys.readouterr()
    code = main(["reconcile", "--config", str(path), "--provider", provider,
                 "--since", DAYS[0].isoformat(), "--until", UNTIL, *args])
    out = capsys.readouterr().out
    return code, orjson.loads(out) if "--format" in args and "json" in args else out


def expected(calls: list[BilledCall], model: str, day: date, cls: str,
             rate: Decimal | None = None) -> tuple[int, Decimal]:
    """Tokens and list-price dollars of one cell, from the calls as the test made them."""
    n = sum(c.classes.get(cls, 0) for c in calls
            if c.model == model and c.at.date() == day)
    unit = Decimal(1000) if cls == "web_search" else Decimal(1_000_000)
    return n, n * (rate if rate is not None else LIST_PRICES[model][cls]) / unit


def cell(data: dict[str, Any], day: date, model: str, cls: str) -> dict[str, Any]:
    found = [c for c in data["cells"] if c["day"] == day.isoformat() and c["model"] == model
             and c["token_class"] == cls]
    assert len(found) == 1, (day, model, cls, data["cells"])
    return found[0]


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_zero_drift_when_the_bill_agrees(provider: str, tmp_path: Path, fake: FakeBilling,
                                         traffic: Any, capsys: Any) -> None:
    """Every day x model x class cell matches: tokens and dollars equal, exit 0."""
    db, calls = traffic
    code, data = reconcile_cli(tmp_path, config(tmp_path, db, fake), provider, capsys,
                               "--format", "json")
    assert code == 0, data
    assert data["status"] == "ok" and data["cells_outside_tolerance"] == 0
    model = MODELS[provider]
    classes = sorted(LIST_PRICES[model])
    assert len(data["cells"]) == 3 * len(classes)
    for day in DAYS:
        for cls in classes:
            tokens, usd = expected(calls, model, day, cls)
            c = cell(data, day, model, cls)
            assert (c["provider_tokens"], c["metered_tokens"]) == (tokens, tokens)
            assert Decimal(c["provider_cost_usd"]) == usd == Decimal(c["metered_cost_usd"])
            assert c["diff_cost_usd"] == "0" and c["within_tolerance"]
    assert data["unmetered"] == [] and data["drifts"] == []
    if provider != "gemini":  # several pages of each listing were followed
        assert sum(1 for _, q in fake.seen if "page" in q) >= 2


def test_missing_day_is_reported_on_its_cells(tmp_path: Path, fake: FakeBilling,
                                              traffic: Any, capsys: Any) -> None:
    """A day the bill lacks: that day's cells say "metered, not billed"; exit 1."""
    fake.faults = Faults(missing_day=DAYS[1].isoformat())
    code, data = reconcile_cli(tmp_path, config(tmp_path, traffic[0], fake), "openai", capsys,
                               "--format", "json")
    assert code == 1 and data["status"] == "drift"
    bad = {(c["day"], c["token_class"]) for c in data["cells"] if not c["within_tolerance"]}
    assert bad == {(DAYS[1].isoformat(), cls) for cls in ("input", "cached_input", "output")}
    out = cell(data, DAYS[1], "gpt-4o-mini", "output")
    tokens, usd = expected(traffic[1], "gpt-4o-mini", DAYS[1], "output")
    assert out["note"] == "metered, not billed" and out["provider_tokens"] == 0
    assert out["diff_tokens"] == tokens and Decimal(out["diff_cost_usd"]) == usd
    assert out["diff_cost_pct"] is None
    assert data["drifts"] == []  # tokens disagree: no rate to suggest


def test_seven_percent_discount_suggests_the_override(tmp_path: Path, fake: FakeBilling,
                                                      traffic: Any, capsys: Any) -> None:
    """Every Claude class billed 7% under list: a discount_pct 7 override and its reprice."""
    db, calls = traffic
    fake.faults = Faults(discount_pct=Decimal(7))
    conf = config(tmp_path, db, fake)
    code, data = reconcile_cli(tmp_path, conf, "anthropic", capsys, "--format", "json")
    assert code == 1
    model = "claude-sonnet-4-5"
    c = cell(data, DAYS[0], model, "output")
    _, usd = expected(calls, model, DAYS[0], "output")
    assert Decimal(c["provider_cost_usd"]) == usd * Decimal("0.93")
    assert c["diff_cost_pct"] == "7.53"  # 7 / 93, as a share of the bill
    (drift,) = data["drifts"]
    assert drift["override"] == {f"anthropic/{model}": {
        "discount_pct": "7", "effective_from": DAYS[0].isoformat()}}
    rates = {e["token_class"]: e["implied_rate"] for e in drift["classes"]}
    assert rates == {"input": "2.79", "cached_input": "0.279", "cache_write_5m": "3.4875",
                     "cache_write_1h": "5.58", "output": "13.95", "web_search": "9.3"}
    token_usd = sum((expected(calls, model, d, cls)[1] for d in DAYS
                     for cls in LIST_PRICES[model] if cls != "web_search"), Decimal(0))
    assert Decimal(drift["reprice_change_usd"]) == -token_usd * Decimal("0.07")
    # Applying the suggestion: reprice (dry run, on a copy) changes the log by that much.
    assert reprice_delta(tmp_path, db, drift["override"]) == Decimal(
        drift["reprice_change_usd"])
    code, text = reconcile_cli(tmp_path, conf, "anthropic", capsys)
    assert f"anthropic/{model}: {{discount_pct: 7, effective_from: {DAYS[0]}}}" in text


def test_price_change_names_the_class_and_the_day(tmp_path: Path, fake: FakeBilling,
                                                  traffic: Any, capsys: Any) -> None:
    """Gemini output billed at $2.75 from D2: those two output cells, override from D2."""
    db, calls = traffic
    fake.faults = Faults(price_change=(DAYS[1].isoformat(), "gemini-2.5-flash", "output",
                                       Decimal("2.75")))
    code, data = reconcile_cli(tmp_path, config(tmp_path, db, fake), "gemini", capsys,
                               "--format", "json")
    assert code == 1
    bad = [(c["day"], c["token_class"]) for c in data["cells"] if not c["within_tolerance"]]
    assert bad == [(DAYS[1].isoformat(), "output"), (DAYS[2].isoformat(), "output")]
    (drift,) = data["drifts"]
    assert drift["override"] == {"gemini/gemini-2.5-flash": {
        "output": "2.75", "effective_from": DAYS[1].isoformat()}}
    later = sum(expected(calls, "gemini-2.5-flash", d, "output")[0] for d in DAYS[1:])
    assert Decimal(drift["reprice_change_usd"]) == later * Decimal("0.25") / 1_000_000
    assert reprice_delta(tmp_path, db, drift["override"]) == Decimal(
        drift["reprice_change_usd"])


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_shadow_key_is_unmetered_spend_not_drift(provider: str, tmp_path: Path,
                                                 fake: FakeBilling, traffic: Any,
                                                 capsys: Any) -> None:
    """Spend on a key or project the proxy does not use is listed apart; cells still agree."""
    model = MODELS[provider]
    at = datetime.combine(DAYS[2], datetime.min.time(), UTC) + timedelta(hours=15)
    shadow = {"input": 500_000, "output": 80_000}
    fake.calls.append(BilledCall(at, model, shadow, key="key_shadow", project="proj_shadow"))
    code, data = reconcile_cli(tmp_path, config(tmp_path, traffic[0], fake), provider, capsys,
                               "--format", "json")
    assert code == 0 and data["status"] == "ok"
    key = "proj_shadow" if provider == "gemini" else "key_shadow"
    rows = {(r["token_class"], r["key"]): r for r in data["unmetered"]}
    assert set(rows) == {("input", key), ("output", key)}
    for cls, n in shadow.items():
        assert rows[(cls, key)]["tokens"] == n
        assert rows[(cls, key)]["day"] == DAYS[2].isoformat()
        assert Decimal(rows[(cls, key)]["cost_usd"]) == n * LIST_PRICES[model][cls] / 1_000_000
    assert Decimal(data["totals"]["unmetered_cost_usd"]) == (
        500_000 * LIST_PRICES[model]["input"] + 80_000 * LIST_PRICES[model]["output"]
    ) / 1_000_000


def test_gemini_export_as_csv_and_by_model(tmp_path: Path, fake: FakeBilling, traffic: Any,
                                           capsys: Any) -> None:
    """The CSV form of the export reads the same; --by model sums the days; csv output."""
    db, calls = traffic
    conf = config(tmp_path, db, fake)
    export = tmp_path / "export.csv"
    fake.write_gemini_export(export, "csv")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(conf))
    capsys.readouterr()
    code = main(["reconcile", "--config", str(path), "--provider", "gemini", "--since",
                 DAYS[0].isoformat(), "--until", UNTIL, "--billing-export", str(export),
                 "--by", "model", "--format", "csv"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith("model,token_class,provider_tokens,provider_cost_usd,")
    out = next(line for line in lines if line.startswith("gemini-2.5-flash,output,"))
    tokens = sum(expected(calls, "gemini-2.5-flash", d, "output")[0] for d in DAYS)
    usd = tokens * Decimal("2.5") / 1_000_000
    assert out.split(",")[2:6] == [str(tokens), str(usd.normalize()), str(tokens),
                                   str(usd.normalize())]


def test_bad_admin_key_is_a_clear_error_without_the_key(tmp_path: Path, fake: FakeBilling,
                                                        traffic: Any, capsys: Any) -> None:
    """A rejected admin key: exit 2, the provider's message, the key never printed."""
    os.environ[OPENAI_ENV] = "sk-admin-wrong-SECRET-0000"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, traffic[0], fake)))
    capsys.readouterr()
    code = main(["reconcile", "--config", str(path), "--provider", "openai"])
    err = capsys.readouterr().err
    assert code == 2
    assert "OpenAI usage API: HTTP 401: Invalid admin key" in err
    assert "SECRET" not in err and ADMIN_KEY not in err


def reprice_delta(tmp: Path, db: Path, override: dict[str, Any]) -> Decimal:
    """`meterproxy reprice --dry-run` on a copy of the log with the suggested override."""
    copy = tmp / "reprice.db"
    shutil.copy(db, copy)
    path = tmp / "reprice.yaml"
    path.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{copy}"},
                                    "pricing": {"overrides": override}}))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["reprice", "--config", str(path), "--since", DAYS[0].isoformat(),
                     "--dry-run"]) == 0
    m = re.search(r"\(delta \$([-+0-9.]+)\)", buf.getvalue())
    assert m, buf.getvalue()
    return Decimal(m.group(1))


def test_serve_answers_the_api_and_the_schedule_alerts(tmp_path: Path, fake: FakeBilling,
                                                       traffic: Any, capsys: Any) -> None:
    """The server with reconcile.every, on the module's clock: yesterday's drift raises a
    log line, gauges and a webhook; GET /_meter/reconcile answers what the CLI prints."""
    db = traffic[0]
    fake.faults = Faults(price_change=(DAYS[2].isoformat(), "gpt-4o-mini", "output",
                                       Decimal("0.66")))
    conf = config(tmp_path, db, fake, reconcile={"every": "24h"},
                  alerts={"webhook_url": f"{fake.url}/hook"},
                  server={"admin_key_env": "METERPROXY_TEST_RECONCILE_ADMIN"})
    os.environ["METERPROXY_TEST_RECONCILE_ADMIN"] = "rec-admin"
    served = Stack(tmp_path / "serve", conf, clock=lambda: NOW)
    logs = ""
    try:
        deadline = time.monotonic() + 30
        while not fake.hooks and time.monotonic() < deadline:
            time.sleep(0.05)
        logs += capsys.readouterr().err
        assert len(fake.hooks) == 1, logs
        (event,) = fake.hooks
        assert event["alert"] == "reconcile_drift" and event["provider"] == "openai"
        assert event["day"] == DAYS[2].isoformat() and event["cells_outside_tolerance"] == 1
        assert [(c["model"], c["token_class"]) for c in event["cells"]] == [
            ("gpt-4o-mini", "output")]
        assert event["overrides"] == [{"openai/gpt-4o-mini": {
            "output": "0.66", "effective_from": DAYS[2].isoformat()}}]
        assert '"event":"reconcile_alert"' in logs
        admin = {"Authorization": "Bearer rec-admin"}
        gemini = 'meterproxy_reconcile_cells_outside_tolerance{provider="gemini"} 0'
        while True:  # the three providers are checked one after the other
            metrics = http("GET", f"{served.url}/metrics", headers=admin).content.decode()
            if gemini in metrics or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert 'meterproxy_reconcile_cells_outside_tolerance{provider="openai"} 1' in metrics
        assert 'meterproxy_reconcile_cells_outside_tolerance{provider="anthropic"} 0' in metrics
        assert 'meterproxy_reconcile_cells_outside_tolerance{provider="gemini"} 0' in metrics
        query = f"provider=openai&since={DAYS[0]}&until={UNTIL}"
        assert http("GET", f"{served.url}/_meter/reconcile?{query}").status_code == 401
        reply = http("GET", f"{served.url}/_meter/reconcile?{query}", headers=admin)
        assert reply.status_code == 200
        code, printed = reconcile_cli(tmp_path, conf, "openai", capsys, "--format", "json")
        assert code == 1 and reply.json() == printed
        bad = http("GET", f"{served.url}/_meter/reconcile?provider=nope", headers=admin)
        assert bad.status_code == 400 and "openai, anthropic, gemini" in bad.json()["error"]
    finally:
        served.close()
    logs += capsys.readouterr().err
    assert ADMIN_KEY not in logs


def test_every_token_class_has_a_bill_class() -> None:
    """Each class of proxy/token_classes.py is compared in a class the bills show: a new
    class never lands in `other` unnoticed, and its parts fold the way the bills count."""
    from proxy.reconcile.bill import BillClass, bill_class
    from proxy.token_classes import CLASSES

    for cls in CLASSES:
        assert bill_class(cls.name) is not BillClass.OTHER, cls.name
    assert bill_class("audio_input") is BillClass.INPUT
    assert bill_class("cache_write_12h") is BillClass.CACHE_WRITE_5M
    assert bill_class("cache_write_1h") is BillClass.CACHE_WRITE_1H
    assert bill_class("cached_audio_input") is BillClass.CACHED_INPUT
    assert bill_class("image_output") is BillClass.OUTPUT


def test_the_log_side_is_the_same_on_postgresql(traffic: Any, tmp_path: Path) -> None:
    """The metered days read from the simulator's SQLite log and from the same rows in a
    real PostgreSQL log are equal: counts per class and dollars to the last digit."""
    import sqlite3

    from proxy.storage import open_usage_log
    from proxy.storage.readers import open_reader
    from proxy.storage.row import COLUMNS, UsageRow
    from tests.scale import pg_database

    db = traffic[0]
    conn = sqlite3.connect(db)
    rows = [UsageRow(**dict(zip(COLUMNS, r, strict=True)))
            for r in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage")]
    conn.close()
    since = datetime.combine(DAYS[0], datetime.min.time(), UTC)
    until = datetime.combine(TODAY, datetime.min.time(), UTC)
    with pg_database() as url:
        log = open_usage_log(url, spool_dir=str(tmp_path / "spool"))
        log.open()
        log.write(rows)
        log.close()
        found = {}
        for name, source in (("sqlite", f"sqlite:///{db}"), ("postgresql", url)):
            with open_reader(source) as reader:
                found[name] = {p: {k: (v.calls, dict(v.counts), dict(v.usd))
                                   for k, v in reader.metered_by_day(p, since, until).items()}
                               for p in MODELS}
    assert found["postgresql"] == found["sqlite"]
    day = found["sqlite"]["anthropic"][(DAYS[0].isoformat(), BILLED_NAME["claude-sonnet-4-5"])]
    assert day[0] == 2 and day[1]["web_search"] == 1 + 2  # k = 1 and k = 2 on D1


def test_instances_on_a_shared_ledger_alert_a_day_once(tmp_path: Path, fake: FakeBilling,
                                                        traffic: Any, capsys: Any) -> None:
    """Two `serve` processes on one Redis ledger both check yesterday; one webhook."""
    from tests.scale import redis_prefix, redis_url

    fake.faults = Faults(missing_day=DAYS[2].isoformat())
    with redis_prefix() as prefix:
        conf = config(tmp_path, traffic[0], fake, reconcile={"every": "24h"},
                      alerts={"webhook_url": f"{fake.url}/hook"},
                      server={"admin_key_env": "METERPROXY_TEST_RECONCILE_ADMIN"},
                      storage={"ledger": f"{redis_url()}?prefix={prefix}"})
        os.environ["METERPROXY_TEST_RECONCILE_ADMIN"] = "rec-admin"
        both = [Stack(tmp_path / name, conf, clock=lambda: NOW) for name in ("a", "b")]
        try:
            done = 'meterproxy_reconcile_cells_outside_tolerance{provider="gemini"}'
            deadline = time.monotonic() + 60
            for served in both:  # a gauge appears once that check (and its alert) is done
                while done not in http("GET", f"{served.url}/metrics", headers={
                        "Authorization": "Bearer rec-admin"}).content.decode():
                    assert time.monotonic() < deadline, capsys.readouterr().err
                    time.sleep(0.05)
        finally:
            for served in both:
                served.close()
    assert sorted((h["provider"], h["day"]) for h in fake.hooks) == [
        (p, DAYS[2].isoformat()) for p in ("anthropic", "gemini", "openai")]
