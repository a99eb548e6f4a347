"""Spend anomaly guardrails through the real server: a 3 am spike fires once, blocks the
scope until an operator clears it (CLI or admin API), and a key holder cannot clear it,
read it or dodge it."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.cli import main
from proxy.config import ConfigError, parse_settings
from proxy.simulator import Scenario
from proxy.storage import rollups
from proxy.storage.sqlite import migrate
from tests.conftest import OTHER_KEY, VIRTUAL_KEY, Stack, Webhook, http

ADMIN_KEY = "admin-secret-for-anomaly-tests"
ADMIN_ENV = "METERPROXY_TEST_ANOMALY_ADMIN_KEY"
# A Wednesday, 3 am UTC; the history is the four weeks before it.
NOW = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
# One call: gpt-4o-mini at $0.15 in / $0.60 out per 1M tokens (pricing/openai.yaml):
# 1,000 x 0.15 / 1M + 1,000,000 x 0.60 / 1M = 0.00015 + 0.60 = $0.60015.
USAGE = {"prompt_tokens": 1000, "completion_tokens": 1_000_000, "total_tokens": 1_001_000}
CALL_USD = Decimal("0.60015")


HISTORY_INSERT = ("INSERT INTO usage (id, ts, key_name, provider, endpoint, model, outcome, "
                  "cost_usd, customer) VALUES ({})".format(", ".join(["{p}"] * 9)))


def history(db: Path) -> None:
    """Four weeks of hourly spend on key team-a (history_rows) in a SQLite log."""
    migrate(db)
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(HISTORY_INSERT.format(p="?"), history_rows())
        for statement in rollups.fold_sql("sqlite", "usage"):  # as the writer would
            conn.execute(statement)
    conn.close()


def history_rows() -> list[tuple[Any, ...]]:
    """Customer acme costs $3.00 an hour in office hours (weekdays 08-19 UTC) and $0.20 at
    night; customer globex, a batch job, $5.00 every hour. Every row is exact, so each
    hour equals its usual level."""
    rows = []
    hour = NOW - timedelta(weeks=4)
    while hour < NOW:
        office = hour.weekday() < 5 and 8 <= hour.hour < 20
        ts = (hour + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        for customer, usd in (("acme", 3.00 if office else 0.20), ("globex", 5.00)):
            rows.append((f"h{len(rows):06d}", ts, "team-a", "openai", "chat.completions",
                         "gpt-4o-mini", "ok", usd, customer))
        hour += timedelta(hours=1)
    return rows


def anomaly_stack(tmp: Path, now: list[datetime], hook: Webhook, action: str = "block",
                  ) -> Stack:
    tmp.mkdir(parents=True, exist_ok=True)
    history(tmp / "usage.db")
    os.environ[ADMIN_ENV] = ADMIN_KEY
    # Checks run when the test says (the loop's own first check at start aside).
    return Stack(tmp, {"server": {"admin_key_env": ADMIN_ENV},
                       "alerts": {"webhook_url": hook.url},
                       "anomalies": {"sensitivity": "medium", "action": action,
                                     "min_usd": 1, "check_every_s": 3600}},
                 clock=lambda: now[0])


def check(stack: Stack) -> list[Any]:
    return stack.call(stack.server.services.anomalies.check(stack.runtime))


def spend(stack: Stack, client: openai.OpenAI, customer: str, calls: int) -> list[Any]:
    stack.sim.then(Scenario(usage=USAGE, repeat=calls))
    replies = []
    for _ in range(calls):
        replies.append(client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=50, messages=[{"role": "user", "content": "loop"}],
            extra_headers={"X-Meter-Customer": customer}))
    return replies


def refused(client: openai.OpenAI, customer: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                       messages=[{"role": "user", "content": "again"}],
                                       extra_headers={"X-Meter-Customer": customer})
    return caught.value


def test_a_3am_spike_fires_once_blocks_and_clears(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The injected 3 am spike of customer acme opens one episode: one webhook, one log
    line, a metric; acme's calls are refused (429 anomaly_blocked, not retried, a row
    each) until the CLI clears it; a second spike is cleared through the admin API."""
    now = [NOW]
    hook = Webhook()
    stack = anomaly_stack(tmp_path, now, hook)
    hook.start(stack)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=2)
        # acme's usual 3 am hour (Wednesdays, four samples of $0.20) costs $0.20. Its
        # spread is the 0.1 floor (every hour equals its level), so at medium (k = 4) the
        # limit is max((0.20 + 1) x e^0.4 - 1, 0.20 + 1) = max(0.790, 1.20) = $1.20.
        now[0] = NOW + timedelta(minutes=5)
        spend(stack, client, "acme", 1)
        stack.rows()
        now[0] = NOW + timedelta(minutes=6)
        # The trailing hour (02:06-03:06): the 02:30 history row and one call.
        assert check(stack) == []  # 0.20 + 0.60015 = 0.80015 < 1.20
        spend(stack, client, "acme", 2)
        stack.rows()
        now[0] = NOW + timedelta(minutes=8)
        opened = check(stack)
        stack.settle()
        assert [(a.scope_kind, a.scope_value, a.state) for a in opened] == [
            ("customer", "acme", "blocked")]
        assert len(hook.received) == 1
        event = hook.received[0]
        assert (event["event"], event["scope"], event["value"], event["state"]) == (
            "anomaly", "customer", "acme", "blocked")
        assert Decimal(event["observed_usd"]) == Decimal("0.20") + 3 * CALL_USD
        assert Decimal(event["baseline_usd"]) == Decimal("0.20")
        assert Decimal(event["threshold_usd"]) == Decimal("1.20")
        assert event["method"] == "weekly"
        anomaly_id = event["id"]
        # Key team-a carries globex's $5.00 too: its limit, $6.20 or more, is not reached.
        # Later checks in the same episode announce nothing more.
        for minutes in (9, 20, 45):
            now[0] = NOW + timedelta(minutes=minutes)
            assert check(stack) == []
        stack.settle()
        assert len(hook.received) == 1
        metrics = http("GET", f"{stack.url}/metrics", headers=admin).content.decode()
        assert 'meterproxy_anomalies_total{scope="customer"} 1' in metrics
        assert 'meterproxy_anomalies_active{scope="customer",state="blocked"} 1' in metrics
        assert "acme" not in metrics  # customer values are never labels

        # Blocked: refused in OpenAI's shape, final (two retries allowed, none made).
        sent = len(stack.sim.received)
        err = refused(client, "acme")
        assert err.status_code == 429
        assert err.body["code"] == "anomaly_blocked" and err.body["type"] == "anomaly_blocked"
        assert err.response.headers["x-should-retry"] == "false"
        assert anomaly_id in err.body["message"]
        assert len(stack.sim.received) == sent
        rows = [r for r in stack.rows() if r["outcome"] == "anomaly_blocked"]
        assert [(r["customer"], r["status"], r["key_name"]) for r in rows] == [
            ("acme", 429, "team-a")]
        # Another customer of the same key is not blocked.
        assert spend(stack, client, "globex", 1)[0].status_code == 200

        # The key holder can neither read the anomalies nor clear its own block.
        for method, path in (("GET", "/_meter/anomalies"),
                             ("POST", f"/_meter/anomalies/{anomaly_id}/clear")):
            reply = http(method, stack.url + path,
                         headers={"Authorization": f"Bearer {VIRTUAL_KEY}"})
            assert reply.status_code == 401
        listed = http("GET", f"{stack.url}/_meter/anomalies", headers=admin).json()
        assert [(a["id"], a["state"]) for a in listed] == [(anomaly_id, "blocked")]

        # The CLI lists it, then clears it; the next check lifts the block.
        config = str(stack.config_path)
        assert main(["anomalies", "--config", config]) == 0
        out = capsys.readouterr().out
        assert anomaly_id in out and "blocked" in out and "acme" in out
        assert main(["anomalies", "--config", config, "--clear", anomaly_id]) == 0
        assert f"cleared {anomaly_id}" in capsys.readouterr().out
        assert main(["anomalies", "--config", config, "--clear", anomaly_id]) == 1
        now[0] = NOW + timedelta(minutes=50)
        # Spend is counted from the clear: the spike before it does not reopen anything.
        assert check(stack) == []
        assert stack.server.services.anomalies.blocked == {}
        assert spend(stack, client, "acme", 1)[0].status_code == 200

        # A second spike, cleared through the admin API: lifted at once, no check needed.
        spend(stack, client, "acme", 2)
        stack.rows()
        now[0] = NOW + timedelta(minutes=52)
        second = check(stack)
        stack.settle()
        assert [a.scope_value for a in second] == ["acme"] and len(hook.received) == 2
        refused(client, "acme")
        reply = http("POST", f"{stack.url}/_meter/anomalies/{second[0].id}/clear",
                     headers=admin)
        assert reply.status_code == 200
        assert reply.json()["anomaly"]["cleared_by"] == "admin-api"
        assert http("POST", f"{stack.url}/_meter/anomalies/{second[0].id}/clear",
                    headers=admin).status_code == 404
        assert spend(stack, client, "acme", 1)[0].status_code == 200
        every = http("GET", f"{stack.url}/_meter/anomalies?all=true", headers=admin).json()
        assert sorted(a["cleared_by"] for a in every) == ["admin-api", "cli"]
    finally:
        hook.stop()
        stack.close()


def test_alert_only_fires_once_and_never_blocks(tmp_path: Path) -> None:
    """With action: alert the spike is announced once and acme's calls keep going."""
    now = [NOW]
    hook = Webhook()
    stack = anomaly_stack(tmp_path, now, hook, action="alert")
    hook.start(stack)
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        now[0] = NOW + timedelta(minutes=5)
        spend(stack, client, "acme", 3)
        stack.rows()
        for minutes in (6, 7, 30):
            now[0] = NOW + timedelta(minutes=minutes)
            check(stack)
        stack.settle()
        assert [(e["scope"], e["state"]) for e in hook.received] == [("customer", "open")]
        assert spend(stack, client, "acme", 1)[0].status_code == 200
    finally:
        hook.stop()
        stack.close()


def test_rotating_the_customer_does_not_dodge_the_key(tmp_path: Path) -> None:
    """A caller that names a new customer on every call escapes the customer scope (no
    history, so never judged) but not its key's: team-b's spike blocks team-b whatever
    customer it names next."""
    now = [NOW]
    hook = Webhook()
    tmp_path.mkdir(parents=True, exist_ok=True)
    history(tmp_path / "usage.db")
    conn = sqlite3.connect(tmp_path / "usage.db")
    with conn:  # team-b: a quiet key, $0.10 an hour for four weeks
        conn.executemany(
            "INSERT INTO usage (id, ts, key_name, provider, outcome, cost_usd) "
            "VALUES (?, ?, 'team-b', 'openai', 'ok', 0.10)",
            [(f"b{i:05d}", (NOW - timedelta(hours=i, minutes=-30)).strftime(
                "%Y-%m-%dT%H:%M:%S.000000Z")) for i in range(1, 24 * 28 + 1)])
        for statement in rollups.fold_sql("sqlite", "usage", "id LIKE 'b%'"):
            conn.execute(statement)  # as the writer would
    conn.close()
    os.environ[ADMIN_ENV] = ADMIN_KEY
    stack = Stack(tmp_path, {"server": {"admin_key_env": ADMIN_ENV},
                             "keys": [{"name": "team-a", "key_sha256": _sha(VIRTUAL_KEY)},
                                      {"name": "team-b", "key_sha256": _sha(OTHER_KEY)}],
                             "anomalies": {"action": "block", "check_every_s": 3600}},
                  clock=lambda: now[0])
    hook.start(stack)
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=OTHER_KEY, max_retries=0)
        now[0] = NOW + timedelta(minutes=5)
        for i in range(3):
            spend(stack, client, f"rotated-{i}", 1)
        stack.rows()
        now[0] = NOW + timedelta(minutes=6)
        opened = check(stack)
        assert [(a.scope_kind, a.scope_value) for a in opened] == [("key", "team-b")]
        assert refused(client, "yet-another-name").status_code == 429
    finally:
        hook.stop()
        stack.close()


def test_instances_sharing_a_postgres_log_announce_once(tmp_path: Path) -> None:
    """Two proxies on one PostgreSQL log: both see the spike, one announces it (one
    webhook), both block acme; a clear through one reaches the other at its next check."""
    import psycopg

    from proxy.storage.postgres import connect
    from proxy.storage.postgres import migrate as pg_migrate
    from tests.scale import pg_database

    now = [NOW]
    hook = Webhook()
    os.environ[ADMIN_ENV] = ADMIN_KEY
    with pg_database() as url:
        with connect(url) as conn:
            pg_migrate(conn)
            with conn.cursor() as cur:
                cur.executemany(HISTORY_INSERT.format(p="%s"), history_rows())
                for statement in rollups.fold_sql("postgresql", "usage"):
                    cur.execute(statement)
        stacks = [Stack(tmp_path / name, {
            "server": {"admin_key_env": ADMIN_ENV}, "alerts": {"webhook_url": hook.url},
            "storage": {"usage_log": url, "spool_dir": str(tmp_path / name / "spool")},
            "anomalies": {"action": "block", "check_every_s": 3600}},
            clock=lambda: now[0]) for name in ("a", "b")]
        hook.start(stacks[0])
        try:
            client = openai.OpenAI(base_url=stacks[0].base(), api_key=VIRTUAL_KEY,
                                   max_retries=0)
            now[0] = NOW + timedelta(minutes=5)
            spend(stacks[0], client, "acme", 3)
            stacks[0].rows()
            now[0] = NOW + timedelta(minutes=6)
            opened = [check(s) for s in stacks] + [check(s) for s in reversed(stacks)]
            for s in stacks:
                s.settle()
            assert sorted(len(o) for o in opened) == [0, 0, 0, 1]
            assert [(e["scope"], e["value"]) for e in hook.received] == [("customer", "acme")]
            other = openai.OpenAI(base_url=stacks[1].base(), api_key=VIRTUAL_KEY,
                                  max_retries=0)
            assert refused(other, "acme").status_code == 429
            reply = http("POST", f"{stacks[0].url}/_meter/anomalies/{hook.received[0]['id']}"
                         "/clear", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert reply.status_code == 200
            assert refused(other, "acme").status_code == 429  # until its next check
            now[0] = NOW + timedelta(minutes=7)
            check(stacks[1])
            assert spend(stacks[1], other, "acme", 1)[0].status_code == 200
            with psycopg.connect(url) as conn:
                states = conn.execute("SELECT state, cleared_by FROM anomalies").fetchall()
            assert states == [("cleared", "admin-api")]
        finally:
            hook.stop()
            for s in stacks:
                s.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_active_episode_per_scope_whoever_opens_it(tmp_path: Path, backend: str) -> None:
    """Two instances opening the same scope's episode at once: exactly one INSERT wins
    (that one announces); once it is cleared, a new episode may open."""
    from contextlib import ExitStack

    from proxy.storage.anomalies import Anomaly, open_anomalies
    from proxy.storage.postgres import connect
    from proxy.storage.postgres import migrate as pg_migrate
    from tests.scale import pg_database

    with ExitStack() as resources:
        if backend == "sqlite":
            migrate(tmp_path / "usage.db")
            url = f"sqlite:///{tmp_path / 'usage.db'}"
        else:
            url = resources.enter_context(pg_database())
            with connect(url) as conn:
                pg_migrate(conn)
        first, second = (resources.enter_context(open_anomalies(url)) for _ in range(2))

        def episode(anomaly_id: str) -> Anomaly:
            return Anomaly(id=anomaly_id, scope_kind="key", scope_value="team-a",
                           state="blocked", action="block", started_at=NOW,
                           last_seen_at=NOW, observed_usd=Decimal("12.5"),
                           baseline_usd=Decimal("0.2"), threshold_usd=Decimal("1.2"),
                           method="weekly")

        assert [first.open(episode("an-1")), second.open(episode("an-2"))] == [True, False]
        assert [a.id for a in second.active()] == ["an-1"]
        assert second.active()[0].observed_usd == Decimal("12.5")
        assert second.clear("an-1", "cli", NOW) is not None
        assert first.clear("an-1", "cli", NOW) is None
        assert first.open(episode("an-3"))
        assert [a.id for a in first.active()] == ["an-3"]


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(("anomalies", "message"), [
    ({"sensitivity": "extreme"}, "anomalies.sensitivity: must be low, medium, high"),
    ({"sensitivity": 0.5}, "anomalies.sensitivity: a number is robust standard deviations"),
    ({"action": "page"}, "anomalies.action: must be one of alert, block"),
    ({"scopes": ["tag:team"]}, "anomalies.scopes[0]: must be one of key, customer, feature"),
    ({"scopes": []}, "anomalies.scopes: needs at least one"),
    ({"min_usd": -1}, "anomalies.min_usd: must not be negative"),
    ({"weeks": 0}, "anomalies.weeks: must be 1 to 52"),
    ({"check_every_s": 0.1}, "anomalies.check_every_s: must be 1 to 3600"),
    ({"windw": 3}, "anomalies.windw: unknown key"),
])
def test_config_errors_name_the_setting(anomalies: dict[str, Any], message: str) -> None:
    """Each bad anomalies setting is one line naming its key."""
    with pytest.raises(ConfigError) as caught:
        parse_settings({"anomalies": anomalies}, "m.yaml")
    assert f"m.yaml: {message}" in str(caught.value)


def test_config_defaults() -> None:
    """`anomalies: {}` turns the guardrail on with its defaults; no key leaves it off."""
    assert parse_settings({}, "m.yaml").anomalies is None
    conf = parse_settings({"anomalies": {}}, "m.yaml").anomalies
    assert conf is not None and conf.threshold == 6.0 and conf.action == "alert"
    assert parse_settings({"anomalies": {"sensitivity": 5}}, "m.yaml").anomalies.threshold == 5
