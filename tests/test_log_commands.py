"""Every log command (usage, report, forecast, budgets, explain, reprice, pricing check
--unpriced) on both backends: the same hand-made rows give the same, hand-computed answers
from SQLite and from PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import main
from proxy.storage import open_usage_log
from proxy.storage.row import UsageRow
from tests.scale import pg_database

# gpt-4o-mini at $0.15 in / $0.60 out per 1M tokens (PROVIDERS.md):
ACME_USD = Decimal("0.00045")  # 1,000 * 0.15e-6 + 500 * 0.60e-6
GLOBEX_USD = Decimal("0.0009")  # 2,000 * 0.15e-6 + 1,000 * 0.60e-6
WRONG_USD = Decimal("0.5")  # what a broken table once charged globex


def hand_rows(now: datetime) -> list[UsageRow]:
    ts = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    common: dict[str, Any] = {"ts": ts, "duration_ms": 120.0, "key_name": "team-a",
                              "provider": "openai", "endpoint": "chat.completions",
                              "status": 200, "usage_source": "provider"}
    return [
        UsageRow(id="call-acme", model="gpt-4o-mini", input_tokens=1000, output_tokens=500,
                 cost_usd=float(ACME_USD), customer="acme", feature="search",
                 pricing_version="v1", **common),
        UsageRow(id="call-globex", model="gpt-4o-mini", input_tokens=2000, output_tokens=1000,
                 cost_usd=float(WRONG_USD), customer="globex", feature="search",
                 pricing_version="broken", **common),
        UsageRow(id="call-unpriced", model="ft:mystery-model", input_tokens=10,
                 output_tokens=10, cost_usd=None, priced=0, customer="acme", feature="chat",
                 **common),
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A config file whose usage log (of the backend under test) holds hand_rows."""
    with _log_url(request.param, tmp_path) as url:
        log = open_usage_log(url, spool_dir=str(tmp_path / "spool"))
        log.open()
        log.write(hand_rows(datetime.now(UTC)))
        log.close()
        path = tmp_path / "meterproxy.yaml"
        path.write_text(yaml.safe_dump({
            "storage": {"usage_log": url},
            "budgets": [{"name": "acme-month", "scope": {"customer": "acme"},
                         "period": "month", "limit_usd": 1}]}))
        yield str(path)


def _log_url(backend: str, tmp_path: Path) -> Any:
    if backend == "postgresql":
        return pg_database()
    from contextlib import nullcontext

    return nullcontext(f"sqlite:///{tmp_path / 'usage.db'}")


def run(capsys: pytest.CaptureFixture, *args: str) -> Any:
    assert main(list(args)) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "json" in args else out


def test_every_log_command_on_both_backends(config: str, capsys: pytest.CaptureFixture
                                           ) -> None:
    usage = run(capsys, "usage", "--config", config, "--group-by", "customer",
                "--format", "json")
    assert {r["customer"]: Decimal(str(r["cost_usd"])) for r in usage} == {
        "acme": ACME_USD, "globex": WRONG_USD}

    explained = run(capsys, "explain", "call-acme", "--config", config, "--format", "json")
    assert Decimal(str(explained["cost_usd"])) == ACME_USD
    assert explained["customer"] == "acme" and explained["input_tokens"] == 1000

    budgets = run(capsys, "budgets", "--config", config, "--format", "json")
    assert [(b["name"], b["scope"], Decimal(str(b["spent_usd"]))) for b in budgets] == [
        ("acme-month", "customer=acme", ACME_USD)]

    report = run(capsys, "report", "--config", config, "--since", "1d", "--format", "json")
    assert Decimal(str(report["totals"]["cost_usd"])) == ACME_USD + WRONG_USD
    assert [(u["model"], u["calls"]) for u in report["unpriced"]] == [("ft:mystery-model", 1)]

    forecast = run(capsys, "forecast", "--config", config, "--format", "json")
    assert [b["scope"] for b in forecast["budgets"]] == ["customer=acme"]
    # spent so far is the exact figure `budgets` shows, as a string (never a float)
    assert forecast["budgets"][0]["spent_usd"] == str(ACME_USD)

    unpriced = run(capsys, "pricing", "check", "--config", config, "--unpriced")
    assert "ft:mystery-model" in unpriced

    dry = run(capsys, "reprice", "--config", config, "--since", "1d", "--dry-run")
    change = re.search(r"call-globex  gpt-4o-mini: (\S+) -> (\S+) ", dry)
    assert change and tuple(map(Decimal, change.groups())) == (WRONG_USD, GLOBEX_USD)
    after_dry = run(capsys, "usage", "--config", config, "--group-by", "customer",
                    "--format", "json")
    assert after_dry == usage  # a dry run writes nothing

    run(capsys, "reprice", "--config", config, "--since", "1d")
    repriced = run(capsys, "usage", "--config", config, "--group-by", "customer",
                   "--format", "json")
    assert {r["customer"]: Decimal(str(r["cost_usd"])) for r in repriced} == {
        "acme": ACME_USD, "globex": GLOBEX_USD}
    row = run(capsys, "explain", "call-globex", "--config", config, "--format", "json")
    assert row["pricing_version"] not in (None, "broken") and row["priced"] == 1
    assert Decimal(str(row["explain"]["total_usd"])) == GLOBEX_USD
