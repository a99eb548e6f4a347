"""Failures of the shared services: Redis stopped (ledger_failure closed or open) and
PostgreSQL unreachable (rows spooled, then replayed with no loss and no duplicate)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.budgets import budgets_from
from proxy.config import load_settings
from proxy.simulator import Scenario
from proxy.storage.ledger import Balance
from proxy.storage.redis_ledger import RedisLedger
from tests.conftest import KEY_ENV, VIRTUAL_KEY, free_port, sha
from tests.scale import (
    ADMIN_ENV,
    ProxyProcess,
    RedisServer,
    SimServer,
    TcpForwarder,
    log_events,
    pg_database,
    pg_rows,
    wait_for,
    write_config,
)
from tests.test_budgets import MAX_TOKENS, PROMPT, call_cost, exact_usage


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = SimServer()
    yield server
    server.close()


def config(tmp: Path, sim: SimServer, storage: dict[str, Any]) -> Path:
    return write_config(tmp / "meterproxy.yaml", {
        "server": {"admin_key_env": ADMIN_ENV},
        "storage": {"usage_log": f"sqlite:///{tmp / 'usage.db'}", "flush_interval_ms": 20,
                    "spool_dir": str(tmp / "spool"), **storage},
        "providers": {"openai": {"base_url": sim.url, "api_key_env": KEY_ENV}},
        "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}],
        "budgets": [{"scope": {"customer": "acme"}, "period": "month", "limit_usd": 1.0}],
        "logging": {"format": "json"},
    })


def chat(proxy: ProxyProcess) -> Any:
    client = openai.OpenAI(base_url=f"{proxy.url}/openai/v1", api_key=VIRTUAL_KEY,
                           max_retries=0, timeout=30)
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers={"X-Meter-Customer": "acme"})


def balance(config_path: Path, ledger_url: str) -> Balance:
    budget = budgets_from(load_settings(str(config_path)))[0]
    key = budget.key("customer=acme", budget.bounds(datetime.now(UTC))[0])

    async def read() -> Balance:
        ledger = RedisLedger(ledger_url)
        try:
            return (await ledger.balances([key]))[key]
        finally:
            await ledger.close()

    return asyncio.run(read())


def sqlite_rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


def events(proxy: ProxyProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in log_events(proxy) if event.get("event") == name]


def test_redis_down_closed_refuses_with_503(tmp_path: Path, sim: SimServer) -> None:
    """ledger_failure: closed. With Redis stopped a metered call is refused with a 503 in the
    provider's shape and nothing is forwarded; when Redis returns empty, spend is rebuilt
    from the usage log and calls pass again."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    path = config(tmp_path, sim, {"ledger": redis_server.url, "ledger_failure": "closed"})
    proxy = ProxyProcess(path, free_port(), tmp_path / "proxy.log")
    try:
        proxy.wait_ready()
        sim.sim.then(Scenario(usage=exact_usage(), repeat=2))
        chat(proxy)
        redis_server.stop()
        received = len(sim.sim.received)
        with pytest.raises(openai.InternalServerError) as err:
            chat(proxy)
        assert err.value.status_code == 503
        assert err.value.body["type"] == "server_error"
        assert err.value.body["code"] == "service_unavailable"
        assert "budget ledger" in err.value.body["message"]
        assert err.value.response.headers["retry-after"] == "1"
        assert len(sim.sim.received) == received
        assert events(proxy, "ledger_unavailable")[0]["policy"] == "closed"

        redis_server.start()  # no persistence: it comes back with nothing
        chat(proxy)
        rows = wait_for(lambda: len(r := sqlite_rows(tmp_path / "usage.db")) >= 3 and r,
                        what="three rows")
        assert [(r["status"], r["outcome"]) for r in rows] == \
            [(200, "ok"), (503, "proxy_error"), (200, "ok")]
        spent = wait_for(lambda: (b := balance(path, redis_server.url)).reserved_usd == 0 and b,
                         what="the hold settled")
        assert spent.spent_usd == 2 * call_cost()  # one rebuilt from the log, one settled
        assert events(proxy, "ledger_lost")
    finally:
        proxy.stop()
        redis_server.stop()


def test_redis_down_open_admits_and_charges_later(tmp_path: Path, sim: SimServer) -> None:
    """ledger_failure: open. With Redis stopped the call is admitted and ledger_unavailable
    logged; once Redis is back (with its data) the call's cost reaches the ledger, once."""
    redis_server = RedisServer(tmp_path, persistent=True)
    redis_server.start()
    path = config(tmp_path, sim, {"ledger": redis_server.url, "ledger_failure": "open"})
    proxy = ProxyProcess(path, free_port(), tmp_path / "proxy.log")
    try:
        proxy.wait_ready()
        sim.sim.then(Scenario(usage=exact_usage(), repeat=2))
        chat(proxy)
        redis_server.stop()
        received = len(sim.sim.received)
        chat(proxy)  # admitted
        assert len(sim.sim.received) == received + 1
        (event,) = wait_for(lambda: events(proxy, "ledger_unavailable"), what="the log line")
        assert event["policy"] == "open" and event["level"] == "error"
        redis_server.start()
        spent = wait_for(lambda: (b := balance(path, redis_server.url)).spent_usd
                         == 2 * call_cost() and b, what="the admitted call charged")
        assert spent.reserved_usd == 0
        rows = sqlite_rows(tmp_path / "usage.db")
        assert [r["outcome"] for r in rows] == ["ok", "ok"]
        assert not events(proxy, "ledger_lost")
    finally:
        proxy.stop()
        redis_server.stop()


def test_postgres_away_mid_run_loses_nothing(tmp_path: Path, sim: SimServer) -> None:
    """PostgreSQL unreachable mid-run: calls go on, rows wait in the spool file, and once it
    is back every call has exactly one row."""
    with pg_database() as pg_url:
        port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
        fwd = TcpForwarder(port)
        via = pg_url.replace(f":{port}/", f":{fwd.port}/")
        path = write_config(tmp_path / "meterproxy.yaml", {
            "storage": {"usage_log": via, "flush_interval_ms": 20,
                        "spool_dir": str(tmp_path / "spool")},
            "providers": {"openai": {"base_url": sim.url, "api_key_env": KEY_ENV}},
            "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}],
            "logging": {"format": "json"},
        })
        proxy = ProxyProcess(path, free_port(), tmp_path / "proxy.log")
        try:
            proxy.wait_ready()
            for _ in range(10):
                chat(proxy)
            wait_for(lambda: len(pg_rows(pg_url)) == 10, what="10 rows")
            fwd.close()
            for _ in range(15):
                chat(proxy)

            def spooled() -> int:
                return sum(len(f.read_bytes().splitlines())
                           for f in (tmp_path / "spool").glob("spool-*.jsonl"))

            wait_for(lambda: spooled() == 15, what="15 rows in the spool file")
            assert len(pg_rows(pg_url)) == 10
            fwd.open()
            wait_for(lambda: len(pg_rows(pg_url)) >= 25, what="the spool replayed")
            proxy.stop()
            rows = pg_rows(pg_url)
            assert len(rows) == 25 and len({r["id"] for r in rows}) == 25
            assert all(r["outcome"] == "ok" and r["cost_usd"] > Decimal(0) for r in rows)
            assert spooled() == 0
            assert events(proxy, "usage_log_unavailable")
        finally:
            proxy.stop()
            fwd.shutdown()
