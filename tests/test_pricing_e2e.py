"""Pricing through the proxy: periods by call time, negotiated overrides, repricing the log."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import yaml

from proxy.cli import main
from proxy.pricing import bundled_tables_dir
from proxy.simulator import Scenario
from tests.conftest import VIRTUAL_KEY, Stack, http

USAGE = {"prompt_tokens": 1_000_000, "completion_tokens": 100_000, "total_tokens": 1_100_000}
ADMIN = {"Authorization": "Bearer pricing-admin"}


def ask(stack: Stack, model: str) -> dict:
    stack.sim.then(Scenario(usage=USAGE))
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    before = len(stack.rows())
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    return stack.rows(before + 1)[-1]


def test_calls_are_priced_by_the_period_in_force_at_their_time(tmp_path: Path) -> None:
    """o3 before its 2025-06-10 price cut costs $10/$40 per 1M; after it, $2/$8."""
    now = [datetime(2025, 6, 9, 23, 0, tzinfo=UTC)]
    stack = Stack(tmp_path, clock=lambda: now[0])
    try:
        last_year = ask(stack, "o3")
        now[0] = datetime.now(UTC)
        today = ask(stack, "o3")
    finally:
        stack.close()
    assert Decimal(str(last_year["cost_usd"])) == Decimal(10) + Decimal("0.1") * 40
    assert Decimal(str(today["cost_usd"])) == Decimal(2) + Decimal("0.1") * 8
    assert last_year["pricing_version"].startswith("openai.yaml@2025-04-16+")
    assert today["pricing_version"].startswith("openai.yaml@2025-06-10+")
    assert last_year["ts"].startswith("2025-06-09T23:00")


def test_negotiated_discount_applies_to_the_next_call_after_reload(tmp_path: Path) -> None:
    """A discount added to the YAML and reloaded prices the very next call, versioned."""
    os.environ["METERPROXY_TEST_PRICING_ADMIN"] = "pricing-admin"
    stack = Stack(tmp_path, {"server": {"admin_key_env": "METERPROXY_TEST_PRICING_ADMIN"}})
    try:
        list_price = Decimal(str(ask(stack, "gpt-4o-mini")["cost_usd"]))
        config = stack.config
        config["pricing"] = {"overrides": {"openai/gpt-4o-mini": {"discount_pct": 20}}}
        stack.write_config(config)
        assert http("POST", f"{stack.url}/_meter/reload", b"", ADMIN).status_code == 200
        row = ask(stack, "gpt-4o-mini")
    finally:
        stack.close()
    assert list_price == Decimal("0.15") + Decimal("0.1") * Decimal("0.60")
    assert Decimal(str(row["cost_usd"])) == list_price * Decimal("0.8")
    assert row["pricing_version"].endswith(";override:openai/gpt-4o-mini@1970-01-01")


def test_unpriced_model_listed_then_repriced_after_a_table_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """pricing check --unpriced names the model; reprice prices its rows and reports the delta."""
    stack = Stack(tmp_path)
    try:
        row = ask(stack, "gpt-4o-mini-2099-01-01-new")
    finally:
        stack.close()
    assert row["priced"] == 0 and row["cost_usd"] is None
    config = tmp_path / "cli.yaml"
    tables = tmp_path / "tables"
    shutil.copytree(bundled_tables_dir(), tables)
    config.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{stack.db}"},
                                      "pricing": {"dir": str(tables)}}))
    assert main(["pricing", "check", "--unpriced", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "gpt-4o-mini-2099-01-01-new" in out and "0 problem(s)" in out

    table = yaml.safe_load((tables / "openai.yaml").read_text())
    table["models"]["gpt-4o-mini-2099-01-01-new"] = {"prices": [
        {"effective_from": "2020-01-01", "input": 1, "output": 2}]}
    (tables / "openai.yaml").write_text(yaml.safe_dump(table))
    assert main(["reprice", "--since", "30d", "--dry-run", "--config", str(config)]) == 0
    assert "1 would change (1 newly priced)" in capsys.readouterr().out
    assert stack.rows()[-1]["priced"] == 0
    assert main(["reprice", "--since", "30d", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 changed (1 newly priced)" in out and "delta $+1.2" in out
    fixed = stack.rows()[-1]
    assert (fixed["priced"], Decimal(str(fixed["cost_usd"]))) == (1, Decimal("1.2"))
    assert fixed["pricing_version"].startswith("openai.yaml@2020-01-01+")
