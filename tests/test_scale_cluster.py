"""Scale-out: several `meterproxy serve` processes on one Redis ledger and one PostgreSQL log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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
from tests.conftest import KEY_ENV, VIRTUAL_KEY, free_port, http, sha
from tests.scale import (
    ADMIN_ENV,
    ROOT,
    ProxyProcess,
    SimServer,
    chat_as,
    log_events,
    pg_database,
    pg_rows,
    redis_prefix,
    redis_url,
    wait_for,
    write_config,
)
from tests.test_budgets import MAX_TOKENS, PROMPT, call_cost, exact_usage

BURST_K = 7
CRASH_K = 3
TTL_S = 3


@dataclass
class Cluster:
    sim: SimServer
    pg_url: str
    ledger_url: str
    config: Path
    shared: ProxyProcess  # `serve --workers 2`: two processes on one port
    single: ProxyProcess  # a third process, same config, another port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    cost = call_cost()
    with pg_database() as pg_url, redis_prefix() as prefix:
        sim = SimServer()
        ledger_url = f"{redis_url()}?prefix={prefix}"
        config = write_config(tmp / "meterproxy.yaml", {
            "server": {"admin_key_env": ADMIN_ENV},
            "storage": {"usage_log": pg_url, "ledger": ledger_url, "flush_interval_ms": 20,
                        "spool_dir": str(tmp / "spool")},
            "providers": {"openai": {"base_url": sim.url, "api_key_env": KEY_ENV}},
            "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}],
            "budgets": [
                {"scope": {"customer": "burst"}, "period": "day",
                 "limit_usd": float(BURST_K * cost + cost / 2)},
                {"scope": {"customer": "crash"}, "period": "day",
                 "limit_usd": float(CRASH_K * cost + cost / 2)},
            ],
            "reservations": {"ttl_s": TTL_S},
            "logging": {"format": "json"},
        })
        shared = ProxyProcess(config, free_port(), tmp / "shared.log", workers=2)
        single = ProxyProcess(config, free_port(), tmp / "single.log")
        try:
            shared.wait_ready()
            single.wait_ready()
            yield Cluster(sim, pg_url, ledger_url, config, shared, single)
        finally:
            for proc in (shared, single):
                proc.stop()
            sim.close()


async def _chat(url: str, customer: str) -> Any:
    return await chat_as(url, customer, PROMPT, MAX_TOKENS)


def _balance(c: Cluster, customer: str) -> Balance:
    settings = load_settings(str(c.config))
    budget = next(b for b in budgets_from(settings) if b.scope == (("customer", customer),))
    key = budget.key(f"customer={customer}", budget.bounds(datetime.now(UTC))[0])

    async def read() -> Balance:
        ledger = RedisLedger(c.ledger_url)
        try:
            return (await ledger.balances([key]))[key]
        finally:
            await ledger.close()

    return asyncio.run(read())


def test_burst_across_instances_admits_exactly_the_budget(cluster: Cluster) -> None:
    """60 concurrent calls spread over three processes: exactly the 7 the budget allows pass,
    and PostgreSQL holds one row for each of the 60."""
    c, calls = cluster, 60
    before = len(c.sim.sim.received)
    # Only admitted calls reach the provider, and each answers after a while, so the
    # holds of concurrent calls overlap.
    c.sim.sim.then(Scenario(usage=exact_usage(), hang_s=0.2, repeat=BURST_K))
    urls = [c.shared.url, c.single.url]

    async def burst() -> list[Any]:
        return await asyncio.gather(*(_chat(urls[i % 2], "burst") for i in range(calls)),
                                    return_exceptions=True)

    results = asyncio.run(burst())
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(admitted) == BURST_K and len(refused) == calls - BURST_K, results
    assert len(c.sim.sim.received) - before == BURST_K
    assert all(err.body["code"] == "budget_exceeded" for err in refused)

    # Identical refusals on one instance within a second are one row counting them.
    rows = wait_for(lambda: (r := pg_rows(c.pg_url, "customer = %s", ("burst",)))
                    and sum(x["repeat_count"] for x in r) >= calls and r,
                    what="rows for 60 calls in PostgreSQL")
    assert len({r["id"] for r in rows}) == len(rows)
    assert sorted(r["outcome"] for r in rows for _ in range(r["repeat_count"])) == \
        ["budget_exceeded"] * (calls - BURST_K) + ["ok"] * BURST_K
    assert sum(r["cost_usd"] for r in rows) == BURST_K * call_cost()

    balance = wait_for(lambda: (b := _balance(c, "burst")).reserved_usd == 0 and b,
                       what="every hold settled")
    assert balance.spent_usd == BURST_K * call_cost()
    assert balance.spent_tokens == BURST_K * exact_usage()["total_tokens"]


def test_cli_reads_the_shared_log(cluster: Cluster, capsys: pytest.CaptureFixture) -> None:
    """`meterproxy usage` and `meterproxy budgets` answer from PostgreSQL, exactly."""
    from proxy.cli import main

    assert main(["usage", "--config", str(cluster.config), "--where", "customer=burst",
                 "--group-by", "customer,outcome", "--format", "json"]) == 0
    groups = {g["outcome"]: g for g in json.loads(capsys.readouterr().out)}
    assert groups["ok"]["calls"] == BURST_K and groups["budget_exceeded"]["calls"] == 60 - BURST_K
    assert Decimal(str(groups["ok"]["cost_usd"])) == BURST_K * call_cost()
    assert main(["budgets", "--config", str(cluster.config), "--format", "json"]) == 0
    (burst,) = [b for b in json.loads(capsys.readouterr().out) if b["scope"] == "customer=burst"]
    assert Decimal(str(burst["spent_usd"])) == BURST_K * call_cost()


def test_a_killed_instance_holds_expire(cluster: Cluster) -> None:
    """SIGKILL an instance while its calls hold the whole budget: once the holds' TTL has
    passed, the other instances can use the budget again."""
    c = cluster
    before = len(c.sim.sim.received)
    c.sim.sim.then(Scenario(usage=exact_usage(), hang_s=15, repeat=CRASH_K))

    async def hold_the_budget() -> None:
        tasks = [asyncio.create_task(_chat(c.single.url, "crash")) for _ in range(CRASH_K)]
        deadline = asyncio.get_running_loop().time() + 15
        while len(c.sim.sim.received) - before < CRASH_K:
            assert asyncio.get_running_loop().time() < deadline, "calls did not arrive"
            await asyncio.sleep(0.02)
        with pytest.raises(openai.RateLimitError):  # the holds fill the budget
            await _chat(c.shared.url, "crash")
        c.single.kill()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(hold_the_budget())

    def usable() -> bool:
        try:
            asyncio.run(_chat(c.shared.url, "crash"))
        except openai.RateLimitError:
            return False
        return True

    wait_for(usable, TTL_S + 15, "the dead instance's holds to expire")
    balance = wait_for(lambda: (b := _balance(c, "crash")).reserved_usd == 0 and b,
                       what="no hold left")
    assert balance.spent_usd > 0  # the call made after the expiry, and nothing else
    assert balance.spent_usd <= call_cost()


def test_workers_need_the_redis_ledger(tmp_path: Path) -> None:
    """`serve --workers 2` with the in-process ledger is refused with a clear message."""
    config = write_config(tmp_path / "local.yaml", {"storage": {"ledger": "local"}})
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config",
                             str(config), "--workers", "2"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.startswith("meterproxy: --workers 2 needs a shared budget ledger")
    assert "redis://" in result.stderr and "'local'" in result.stderr
    assert not (tmp_path / "meterproxy.db").exists()  # refused before anything started


def test_both_workers_share_the_port(cluster: Cluster) -> None:
    """Both processes of `serve --workers 2` took calls on the one port (the burst above
    opened a connection per call, and the kernel spread them)."""
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json"}
    for _ in range(20):
        reply = http("POST", f"{cluster.shared.url}/openai/v1/chat/completions", body, headers)
        assert reply.status_code == 200
    workers = {e.get("worker") for e in log_events(cluster.shared) if e.get("event") == "call"}
    assert workers == {0, 1}


def test_the_compose_deployment_is_consistent() -> None:
    """deploy/'s configuration loads, may run several workers, and is what compose mounts."""
    import yaml

    from proxy.workers import check_workers

    settings = load_settings(str(ROOT / "deploy" / "meterproxy.yaml"))
    check_workers(settings, 2)
    assert settings.storage.usage_log.startswith("postgresql://")
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    service = compose["services"]["meterproxy"]
    assert "--workers" in service["command"]
    assert "./meterproxy.yaml:/etc/meterproxy/meterproxy.yaml:ro" in service["volumes"]
    assert settings.storage.spool_dir.startswith("/data/")  # on the image's own volume
