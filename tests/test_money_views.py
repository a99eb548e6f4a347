"""Money shows the same in every view (issue 13): one spent figure, one rounding.

Two calls through the real proxy and the official SDK land in a real SQLite log; then
every view of that money is read the way an operator would: the CLI's report, budgets,
forecast and usage (text, JSON, CSV), the admin API's JSON, export.csv and the dashboard.
Text shows USD to 6 places (rounded half up once, from the exact sum); JSON and CSV carry
the exact decimal string, never a float, never an exponent.
"""

from __future__ import annotations

import csv
import io
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.cli import main
from proxy.simulator import Scenario
from tests.conftest import VIRTUAL_KEY, Stack, http

ADMIN_KEY = "admin-key-for-money-views"
ADMIN_ENV = "METERPROXY_TEST_MONEY_ADMIN"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

# gpt-4o-mini at $0.15 in / $0.60 out per 1M tokens (PROVIDERS.md), by hand:
#   call 1:  1,234 * 0.15e-6 = 0.0001851;  567 * 0.60e-6 = 0.0003402   -> 0.0005253
#   call 2: 20,003 * 0.15e-6 = 0.00300045;   8 * 0.60e-6 = 0.0000048   -> 0.00300525
#   spent:  0.0005253 + 0.00300525                                       = 0.00353055
# Shown to 6 places, rounded half up once: $0.003531 (the 7th and 8th digits are 5, 5).
# Before: the forecast rounded floats to 4 places ($0.003500) and JSON held floats.
CALLS = [({"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801},
          Decimal("0.0005253")),
         ({"prompt_tokens": 20003, "completion_tokens": 8, "total_tokens": 20011},
          Decimal("0.00300525"))]
SPENT = Decimal("0.00353055")
SPENT_TEXT = "0.003531"
assert sum(usd for _, usd in CALLS) == SPENT


def money_is_strings(data: Any, path: str = "") -> list[str]:
    """Every `*_usd` value (and the forecast's projected days) in a JSON document is an
    exact decimal string or null; returns the paths that are not."""
    bad = []
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{path}.{key}"
            if key.endswith("_usd") and value is not None and not (
                    isinstance(value, str) and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", value)):
                bad.append(here)
            if key == "projected":
                bad += [here for _, v in value if not isinstance(v, str)]
            bad += money_is_strings(value, here)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            bad += money_is_strings(value, f"{path}[{i}]")
    return bad


@pytest.fixture(scope="module")
def spent(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("money")
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_ENV, ADMIN_KEY)
    stack = Stack(tmp, {"server": {"admin_key_env": ADMIN_ENV},
                        "budgets": [{"scope": {"customer": "*"}, "period": "month",
                                     "limit_usd": 5}]})
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for usage, _ in CALLS:
            stack.sim.then(Scenario(usage=usage))
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Meter-Customer": "acme"})
        rows = stack.rows(2)
        assert [Decimal(str(r["cost_usd"])) for r in rows] == [usd for _, usd in CALLS]
        stack.settle()
        yield stack
    finally:
        stack.close()
        mp.undo()


def cli(capsys: pytest.CaptureFixture[str], stack: Stack, *args: str) -> str:
    assert main([*args, "--config", str(stack.config_path)]) == 0
    return capsys.readouterr().out


def api(stack: Stack, path: str) -> Any:
    reply = http("GET", f"{stack.url}{path}", None, AUTH)
    assert reply.status_code == 200, reply.content
    return reply


def test_spent_is_the_same_figure_in_every_json_view(spent: Stack, capsys) -> None:
    """report, budgets, forecast and usage as JSON, from the CLI and the admin API: the
    same exact string everywhere, and every money value a string."""
    docs = {
        "cli report": json.loads(cli(capsys, spent, "report", "--since", "1d",
                                     "--format", "json")),
        "cli budgets": json.loads(cli(capsys, spent, "budgets", "--format", "json")),
        "cli forecast": json.loads(cli(capsys, spent, "forecast", "--format", "json")),
        "cli usage": json.loads(cli(capsys, spent, "usage", "--group-by", "customer",
                                    "--format", "json")),
        "api report": api(spent, "/_meter/report?since=1d").json(),
        "api budgets": api(spent, "/_meter/budgets").json(),
        "api forecast": api(spent, "/_meter/forecast").json(),
        "api usage": api(spent, "/_meter/usage?group_by=customer").json(),
    }
    for name, doc in docs.items():
        assert money_is_strings(doc) == [], name
    exact = str(SPENT)
    for name in ("cli report", "api report"):
        report = docs[name]
        assert report["totals"]["cost_usd"] == exact, name
        assert report["forecast"]["total"]["spent_usd"] == exact, name
        assert [b["spent_usd"] for b in report["forecast"]["budgets"]] == [exact], name
    for name in ("cli forecast", "api forecast"):
        f = docs[name]
        assert f["total"]["spent_usd"] == exact and f["customers"][0]["spent_usd"] == exact
        for part in (f["total"], f["budgets"][0]):
            # the projection is labelled apart, and the forecast adds up from the two
            assert Decimal(part["forecast_usd"]) == SPENT + Decimal(part["projected_usd"])
    for name in ("cli budgets", "api budgets"):
        assert [(b["scope"], b["spent_usd"]) for b in docs[name]] == [("customer=acme", exact)]
    for name in ("cli usage", "api usage"):
        assert [(r["customer"], r["cost_usd"]) for r in docs[name]] == [("acme", exact)]


def test_spent_is_the_same_figure_in_every_text_view(spent: Stack, capsys) -> None:
    """The report's spend line, its forecast and budget tables, `budgets`, `forecast` and
    `usage` tables and the dashboard all print $0.003531: 6 places, one rounding."""
    report = cli(capsys, spent, "report", "--since", "1d")
    assert re.search(rf"^Spend\s+\${SPENT_TEXT} over 2 calls", report, re.M)
    assert re.search(rf"^Spent so far \${SPENT_TEXT} in ", report, re.M)
    # the forecast table's total row and the `*` budget's row: spent so far, then projected
    assert re.search(rf"^total\s+\${SPENT_TEXT}\s+\$[0-9.]+\s+\$", report, re.M)
    assert re.search(rf"^customer=acme\s+month\s+\$5\.000000\s+\${SPENT_TEXT}\s", report, re.M)
    forecast = cli(capsys, spent, "forecast")
    assert f"spent so far ${SPENT_TEXT}; projected rest $" in forecast
    assert re.search(rf"^total\s+\${SPENT_TEXT}\s", forecast, re.M)
    budgets = cli(capsys, spent, "budgets")
    assert re.search(rf"^customer=acme\s.*\s5\.000000\s+{SPENT_TEXT}\s", budgets, re.M)
    usage = cli(capsys, spent, "usage", "--group-by", "customer")
    assert re.search(rf"^acme\s.*\s{SPENT_TEXT}\s", usage, re.M)
    page = api(spent, "/_meter/?since=24h").content.decode()
    assert page.count(f"${SPENT_TEXT}") >= 4  # cards, by customer, budget bar, forecast
    for text in (budgets, usage):
        assert not re.search(r"[0-9]e-[0-9]", text)
    for text in (report, forecast, page):
        # every dollar figure has 6 places; none is in exponent form
        amounts = re.findall(r"\$(-?[0-9,]+(?:\.[0-9]+)?)", text)
        assert amounts and all(re.fullmatch(r"-?[0-9,]+\.[0-9]{6}", a) for a in amounts), \
            sorted({a for a in amounts if not re.fullmatch(r"-?[0-9,]+\.[0-9]{6}", a)})
        assert not re.search(r"[0-9]e-[0-9]", text)


def test_csv_views_are_exact_and_tidy(spent: Stack, capsys) -> None:
    """export.csv, `usage --format csv`, `budgets --format csv` and `forecast --format csv`:
    exact strings (no 1.8e-05), one kind of row per file or a `kind` column."""
    export = list(csv.DictReader(io.StringIO(
        api(spent, "/_meter/export.csv?columns=id,customer,cost_usd").content.decode())))
    assert [r["cost_usd"] for r in export] == [str(usd) for _, usd in CALLS]
    usage = list(csv.DictReader(io.StringIO(cli(capsys, spent, "usage", "--group-by",
                                                "customer", "--format", "csv"))))
    assert [(r["customer"], r["cost_usd"]) for r in usage] == [("acme", str(SPENT))]
    budgets = list(csv.DictReader(io.StringIO(cli(capsys, spent, "budgets",
                                                  "--format", "csv"))))
    assert [(r["scope"], r["spent_usd"], r["limit_usd"]) for r in budgets] == [
        ("customer=acme", str(SPENT), "5")]
    forecast = list(csv.DictReader(io.StringIO(cli(capsys, spent, "forecast",
                                                   "--format", "csv"))))
    assert [(r["kind"], r["name"], r["spent_usd"]) for r in forecast] == [
        ("total", "", str(SPENT)), ("customer", "acme", str(SPENT)),
        ("budget", "customer=acme", str(SPENT))]
    for r in forecast:
        assert Decimal(r["forecast_usd"]) == SPENT + Decimal(r["projected_usd"])


def test_reconcile_style_negative_amounts_stay_numbers_in_csv(tmp_path: Path) -> None:
    """A CSV cell holding an exact negative amount ("-0.25") is a number to a spreadsheet:
    it is not prefixed like a formula; text starting with '-' still is."""
    from proxy.output import render

    out = render([{"diff_cost_usd": "-0.25", "note": "-cmd|' /C calc'!A0"}], "csv")
    assert out.splitlines()[1] == "-0.25,'-cmd|' /C calc'!A0"


def test_focus_csv_neutralises_a_callers_formula(tmp_path: Path) -> None:
    """GET /_meter/export.focus.csv: a customer named like a formula (from the caller's
    X-Meter-Customer header) is written as text in x_Customer, as in export.csv."""
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_ENV, ADMIN_KEY)
    stack = Stack(tmp_path, {"server": {"admin_key_env": ADMIN_ENV}})
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        stack.sim.then(Scenario(usage=CALLS[0][0]))
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Meter-Customer": '=HYPERLINK("http://x.test","y")'})
        stack.rows(1)
        focus = list(csv.DictReader(io.StringIO(
            api(stack, "/_meter/export.focus.csv?since=1d").content.decode())))
        assert focus and {r["x_Customer"] for r in focus} == {
            '\'=HYPERLINK("http://x.test","y")'}
        # and the lines' costs add up to the call's exact cost, written exactly
        assert sum(Decimal(r["BilledCost"]) for r in focus) == CALLS[0][1]
    finally:
        stack.close()
        mp.undo()


def test_the_call_log_line_carries_the_exact_cost(tmp_path: Path, capsys) -> None:
    """The per-call JSON log line says "cost_usd": "0.000021" (100 * 0.15e-6 + 10 * 0.60e-6
    by hand), not the float 2.1e-05 a log pipeline would read back inexactly."""
    stack = Stack(tmp_path)
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        stack.sim.then(Scenario(usage={"prompt_tokens": 100, "completion_tokens": 10,
                                       "total_tokens": 110}))
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        stack.rows(1)
    finally:
        stack.close()
    calls = [json.loads(line) for line in capsys.readouterr().err.splitlines()
             if line.startswith("{") and '"event":"call"' in line]
    assert [c["cost_usd"] for c in calls] == ["0.000021"]
