"""The admin API's visibility endpoints: auth, usage, explain, report, forecast, CSV export."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import openai
import pytest

from proxy.cli import main
from tests.conftest import VIRTUAL_KEY, Stack, http
from tests.usagegen import make_rows, write_log

ADMIN_KEY = "admin-key-for-visibility-tests"
ADMIN_ENV = "METERPROXY_TEST_VISIBILITY_ADMIN"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
NASTY = "<script>alert('x')</script>"
INITECH = "<b>initech</b> & co"  # a generated customer, on a plan its AI cost outgrows


def seeded_stack(tmp: Path, history_rows: int = 3000) -> Stack:
    """A proxy over a log with four weeks of history, budgets and customer plans."""
    os.environ[ADMIN_ENV] = ADMIN_KEY
    tmp.mkdir(parents=True, exist_ok=True)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) \
        - timedelta(days=28)
    write_log(tmp / "usage.db", make_rows(history_rows, seed=9, start=start, days=28,
                                          prefix="h"))
    return Stack(tmp, {
        "server": {"admin_key_env": ADMIN_ENV},
        # made-up-model runs under acme's USD budget: admitted (and flagged) only so.
        "pricing": {"unpriced": "allow"},
        "budgets": [
            {"name": "acme-monthly", "scope": {"customer": "acme"}, "period": "month",
             "limit_usd": 5},
            {"scope": {"feature": "*"}, "period": "month", "limit_usd": 20,
             "enforce": "alert_only"},
        ],
        "customers": {"acme": {"plan_usd": 20}, "globex": {"plan_usd": 500},
                      INITECH: {"plan_usd": 0.5}},
        "unit_economics": {"max_cost_share": 0.3},
    })


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = seeded_stack(tmp_path_factory.mktemp("admin"))
    client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
    for customer in ("acme", "globex", NASTY):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
            extra_headers={"X-Meter-Customer": customer, "X-Meter-Feature": "search",
                           "X-Meter-Trace-Id": "trace-1"})
    client.chat.completions.create(model="made-up-model", messages=[
        {"role": "user", "content": "hi"}], extra_headers={"X-Meter-Customer": "acme"})
    s.rows(3004)
    yield s
    s.close()


def get(stack: Stack, path: str, headers: dict[str, str] | None = None) -> Any:
    return http("GET", f"{stack.url}{path}", None, headers)


ENDPOINTS = ("/_meter/usage", "/_meter/usage/h00001", "/_meter/budgets", "/_meter/report",
             "/_meter/forecast", "/_meter/export.csv", "/metrics")


def test_every_endpoint_needs_the_admin_key(astack: Stack) -> None:
    """Without the key, or with a wrong one, every admin endpoint answers 401."""
    for path in ENDPOINTS:
        assert get(astack, path).status_code == 401, path
        assert get(astack, path, {"Authorization": "Bearer wrong"}).status_code == 401, path
        assert get(astack, path, {"Cookie": "meterproxy_admin=forged"}).status_code == 401
        assert get(astack, path, AUTH).status_code == 200, path
    page = get(astack, "/_meter/")
    assert page.status_code == 401 and b'name="key"' in page.content
    assert get(astack, "/healthz").status_code == 200


def test_usage_api_is_the_cli_json(astack: Stack, tmp_path: Path, capsys) -> None:
    """GET /_meter/usage answers what `meterproxy usage --format json` prints."""
    api = get(astack, "/_meter/usage?group_by=customer,feature&where=feature!=chat"
                      "&order_by=calls&limit=5", AUTH)
    assert api.status_code == 200
    assert main(["usage", "--config", str(astack.config_path), "--group-by",
                 "customer,feature", "--where", "feature!=chat", "--order-by", "calls",
                 "--top", "5", "--format", "json"]) == 0
    assert api.json() == json.loads(capsys.readouterr().out)
    assert all(r["feature"] != "chat" for r in api.json())
    bad = get(astack, "/_meter/usage?group_by=colour", AUTH)
    assert bad.status_code == 400 and "colour" in bad.json()["error"]


def test_usage_by_id_explains_the_cost(astack: Stack) -> None:
    """GET /_meter/usage/{id}: the row, the price period, each class x rate, the total."""
    row = next(r for r in astack.rows() if r["customer"] == "acme" and r["priced"])
    reply = get(astack, f"/_meter/usage/{row['id']}", AUTH)
    assert reply.status_code == 200
    body = reply.json()
    assert body["id"] == row["id"] and body["customer"] == "acme"
    explain = body["explain"]
    assert explain["pricing_version"] == row["pricing_version"] and explain["period"]
    lines = {line["class"]: line for line in explain["lines"]}
    assert lines["input"]["tokens"] == row["input_tokens"]
    assert lines["input"]["usd_per_mtok"] == "0.15" and lines["output"]["usd_per_mtok"] == "0.6"
    total = sum(Decimal(line["usd"]) for line in explain["lines"])
    assert Decimal(str(explain["total_usd"])) == total.quantize(Decimal("1e-10"))
    assert get(astack, "/_meter/usage/nope", AUTH).status_code == 404


def test_report_api_json_and_text(astack: Stack) -> None:
    """GET /_meter/report: every section as JSON; ?format=text is the CLI's text."""
    data = get(astack, "/_meter/report?since=60d", AUTH).json()
    for section in ("totals", "daily", "by_provider", "by_model", "by_customer", "by_feature",
                    "top_traces", "unpriced", "refusals", "forecast", "unit_economics"):
        assert section in data, section
    assert data["totals"]["calls"] == len(astack.rows())
    economics = {r["customer"]: r for r in data["unit_economics"]}
    assert set(economics) == {"acme", "globex", INITECH}
    assert data["unit_economics"][0]["customer"] == INITECH  # worst first
    assert economics[INITECH]["flagged"] and not economics["globex"]["flagged"]
    for r in economics.values():
        assert r["flagged"] is (r["cost_share"] > 0.3)
        assert Decimal(str(r["margin_usd"])) == pytest.approx(
            Decimal(str(r["price_usd"])) - Decimal(str(r["cost_usd"])))
    assert {r["model"] for r in data["unpriced"]} == {"gemini-2.5-flash", "made-up-model"}
    scopes = {b["scope"] for b in data["forecast"]["budgets"]}
    assert {"customer=acme", "feature=search", "feature=chat"} <= scopes
    text = get(astack, "/_meter/report?format=text", AUTH)
    assert text.headers["content-type"].startswith("text/plain")
    assert b"Spend by customer" in text.content and b"Forecast for" in text.content


def test_csv_export_streams_filtered_rows(astack: Stack) -> None:
    """export.csv is chunked, written a batch at a time, and holds exactly the filtered rows."""
    want = [r for r in astack.rows() if r["outcome"] != "rejected"]
    assert len(want) > 2000  # more than two export batches

    async def fetch() -> tuple[aiohttp.ClientResponse, bytes, int]:
        async with aiohttp.ClientSession() as session, session.get(
                f"{astack.url}/_meter/export.csv?where=outcome!=rejected&columns=id,customer,"
                "cost_usd", headers=AUTH) as resp:
            body, chunks = b"", 0
            async for data, end_of_chunk in resp.content.iter_chunks():
                body += data
                chunks += end_of_chunk
            return resp, body, chunks

    resp, body, chunks = asyncio.run(fetch())
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.headers
    assert chunks >= 3  # header, then one chunk per 1,000-row batch
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0] == ["id", "customer", "cost_usd"]
    assert [r[0] for r in rows[1:]] == [r["id"] for r in sorted(
        want, key=lambda r: (r["ts"], r["id"]))]
    assert NASTY in {r[1] for r in rows[1:]}
    bad = get(astack, "/_meter/export.csv?columns=id,secret", AUTH)
    assert bad.status_code == 400


def raw_get(url: str, headers: dict[str, str] | None = None) -> HTTPResponse:
    """One GET that does not follow redirects."""
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                 headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def login(stack: Stack, key: str) -> HTTPResponse:
    """The login form's POST, not following its redirect."""
    conn = HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("POST", "/_meter/login", body=urlencode({"key": key}),
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_dashboard_login_by_post_then_a_random_session(astack: Stack) -> None:
    """The key goes in a POST body, never a URL (`?key=` is refused); each login gets its
    own random HttpOnly SameSite=Strict session that opens the page and the GET API, never
    a POST; a forged or expired session opens nothing."""
    assert raw_get(f"{astack.url}/_meter/?key={ADMIN_KEY}").status == 400
    wrong = login(astack, "guess")
    assert wrong.status == 401 and wrong.getheader("Set-Cookie") is None
    first, second = login(astack, ADMIN_KEY), login(astack, ADMIN_KEY)
    assert first.status == 303 and first.getheader("Location") == "/_meter/"
    cookie = first.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/_meter" in cookie
    assert ADMIN_KEY not in cookie
    session = cookie.split(";")[0]
    assert session != second.getheader("Set-Cookie").split(";")[0]  # random, per login
    page = raw_get(f"{astack.url}/_meter/?since=7d", {"Cookie": session})
    assert page.status == 200 and page.getheader("Cache-Control") == "no-store"
    assert "script-src" not in page.getheader("Content-Security-Policy")  # none allowed
    assert get(astack, "/_meter/report", {"Cookie": session}).status_code == 200
    reload = http("POST", f"{astack.url}/_meter/reload", b"", {"Cookie": session})
    assert reload.status_code == 401
    name, _, token = session.partition("=")
    claim, _, signature = token.rpartition(".")
    rid, _, expires = claim.rpartition(".")
    stretched = f"{name}={rid}.{int(expires) + 10**6}.{signature}"
    assert raw_get(f"{astack.url}/_meter/", {"Cookie": stretched}).status == 401


def test_admin_answers_are_nosniff_and_errors_json(astack: Stack) -> None:
    """Every admin answer says nosniff; errors (401, 404, 405, 400) are JSON."""
    for method, path, headers in (("GET", "/_meter/report", AUTH), ("GET", "/metrics", AUTH),
                                  ("GET", "/_meter/export.csv", AUTH), ("GET", "/healthz", {}),
                                  ("GET", "/_meter/usage", {}), ("GET", "/_meter/nope", AUTH),
                                  ("DELETE", "/_meter/usage", AUTH),
                                  ("GET", "/_meter/usage?bogus=1", AUTH)):
        reply = http(method, f"{astack.url}{path}", None, headers)
        assert reply.headers.get("x-content-type-options") == "nosniff", path
        if reply.status_code >= 400:
            assert reply.headers["content-type"].startswith("application/json"), path
            assert "error" in reply.json(), path


def test_dashboard_html_escapes_user_input(astack: Stack) -> None:
    """Customer names are user input: the page shows them escaped, never as markup."""
    page = get(astack, "/_meter/?since=60d", AUTH).content.decode()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page
    assert "&lt;b&gt;initech&lt;/b&gt; &amp; co" in page
    for text in ("Spend per day", "acme-monthly", "By customer", "Unpriced models",
                 "gemini-2.5-flash", "Month forecast"):
        assert text in page, text


def test_grafana_dashboard_uses_only_exported_metrics(astack: Stack) -> None:
    """docs/grafana-dashboard.json parses, and each metric it queries is one /metrics has."""
    from prometheus_client.parser import text_string_to_metric_families

    board = json.loads((Path(__file__).resolve().parent.parent / "docs"
                        / "grafana-dashboard.json").read_text())
    scraped = get(astack, "/metrics", AUTH).content.decode()
    samples = {s.name for f in text_string_to_metric_families(scraped) for s in f.samples}
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = {m for expr in exprs for m in re.findall(r"\bmeterproxy_[a-z0-9_]+", expr)}
    assert len(exprs) >= 15 and used
    assert used <= samples, used - samples
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"]
               if p["type"] != "row")


def test_report_cli_text_and_json(astack: Stack, capsys) -> None:
    """`meterproxy report` prints every section; --format json is the API's report."""
    conf = str(astack.config_path)
    assert main(["report", "--config", conf, "--since", "60d", "--top", "3"]) == 0
    out = capsys.readouterr().out
    for heading in ("Spend ", "Cache hits", "Spend by provider", "Spend by model",
                    "Spend by customer", "Spend by feature", "Top traces by cost",
                    "Unit economics", "Unpriced models", "Budget refusals", "Forecast for",
                    "Budgets (current period"):
        assert heading in out, heading
    assert "OVER" in out and "made-up-model" in out and "acme-monthly" in out
    assert main(["report", "--config", conf, "--since", "60d", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    api = get(astack, "/_meter/report?since=60d", AUTH).json()
    assert data["totals"]["calls"] == api["totals"]["calls"] == len(astack.rows())
    assert data["totals"]["cost_usd"] == pytest.approx(api["totals"]["cost_usd"])
