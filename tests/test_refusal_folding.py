"""Identical refusals from one key are counted in one row (repeat_count), never lost.

Through the real server with the official openai SDK (no retries and its default
retries) and the Vercel AI SDK (which retries every 429): the log holds one row per
identical refusal run with repeat_count = the attempts, and every reader (`meterproxy
usage`, the report, /metrics) counts each attempt. Nothing forwarded or charged folds,
and one key's refusals never fold into another's.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main
from proxy.storage import journal as journal_mod
from proxy.storage.journal import Journal
from proxy.storage.row import UsageRow
from tests.client_matrix import MATRIX, ClientFailed, Request
from tests.conftest import OTHER_KEY, PROVIDER_KEY, VIRTUAL_KEY, Served, Stack, http, sha
from tests.test_journal import die as _die

BROKE, BROKE_TOO = "mp-test-fold-broke", "mp-test-fold-broke-too"
ADMIN = "fold-admin-key"
_TINY = [{"period": "day", "limit_usd": 0.000001}]
# A wide window, so the test does not depend on how fast a loaded box sends the calls;
# the default (one second) is the same code with a shorter hold.
CONFIG = {
    "server": {"admin_key_env": "METERPROXY_TEST_FOLD_ADMIN"},
    "storage": {"fold_refusals_ms": 60_000},
    "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)},
             {"name": "broke", "key_sha256": sha(BROKE), "budgets": _TINY},
             {"name": "broke-too", "key_sha256": sha(BROKE_TOO), "budgets": _TINY},
             {"name": "team-b", "key_sha256": sha(OTHER_KEY)}],
}
CHAT = [{"role": "user", "content": "refuse me"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    os.environ["METERPROXY_TEST_FOLD_ADMIN"] = ADMIN
    s = Stack(tmp_path_factory.mktemp("fold"), CONFIG)
    yield s
    s.close()


def refuse(stack: Stack, key: str, times: int, retries: int = 0,
           customer: str = "acme") -> None:
    client = openai.OpenAI(base_url=stack.base(), api_key=key, max_retries=retries,
                           default_headers={"X-Meter-Customer": customer})
    for _ in range(times):
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)


def new_rows(stack: Stack, before: set[str], calls: int) -> list[dict[str, Any]]:
    """Rows not in `before`, once they stand for `calls` calls (flushing releases holds)."""
    rows: list[dict[str, Any]] = []
    for _ in range(200):
        rows = [r for r in stack.rows() if r["id"] not in before]
        if sum(r["repeat_count"] for r in rows) >= calls:
            break
    return rows


def usage_cli(stack: Stack, tmp: Path, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    conf = tmp / "usage.yaml"
    conf.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{stack.db}"}}))
    capsys.readouterr()
    assert main(["usage", "--config", str(conf), "--group-by", "key_name,outcome",
                 "--format", "json"]) == 0
    usage = json.loads(capsys.readouterr().out)
    assert main(["report", "--config", str(conf), "--format", "json"]) == 0
    return [usage, json.loads(capsys.readouterr().out)]


def test_identical_refusals_are_one_row_counted_everywhere(stack: Stack, tmp_path: Path,
                                                           capsys) -> None:
    """Six refusals of one key and customer are one row with repeat_count 6; another key's
    refusal, another customer's, an answered call and bad-header rejections stay apart."""
    before = {r["id"] for r in stack.rows()}
    refuse(stack, BROKE, 2)  # openai SDK, max_retries=0
    refuse(stack, BROKE_TOO, 1)  # another key in between: never folded into broke's
    refuse(stack, BROKE, 1, customer="globex")  # another customer: another row
    ok = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    for _ in range(2):  # answered calls are never folded, however alike
        ok.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    refuse(stack, BROKE, 4, retries=2)  # default retries: x-should-retry false, one each
    body = json.dumps({"model": "gpt-4o-mini", "messages": CHAT}).encode()
    for _ in range(3):  # rejected for a header it may not send: folded too
        reply = http("POST", stack.base() + "/chat/completions", body,
                     {"Authorization": f"Bearer {OTHER_KEY}", "X-Meter-Colour": "blue",
                      "Content-Type": "application/json"})
        assert reply.status_code == 400
    rows = new_rows(stack, before, 2 + 1 + 1 + 2 + 4 + 3)
    shapes = Counter((r["key_name"], r["outcome"], r["customer"], r["repeat_count"])
                     for r in rows)
    assert shapes == Counter({("broke", "budget_exceeded", "acme", 6): 1,
                              ("broke-too", "budget_exceeded", "acme", 1): 1,
                              ("broke", "budget_exceeded", "globex", 1): 1,
                              ("team-a", "ok", None, 1): 2,
                              ("team-b", "rejected", None, 3): 1})
    folded = next(r for r in rows if r["repeat_count"] == 6)
    assert (folded["status"], folded["endpoint"], folded["model"], folded["cost_usd"]) == (
        429, "chat.completions", "gpt-4o-mini", 0)

    # Every reader counts calls, not rows: 6 + 1 + 1 refusals, 3 rejections, 2 answers.
    usage, report = usage_cli(stack, tmp_path, capsys)
    calls = {(g["key_name"], g["outcome"]): (g["calls"], g["refusals"], g["errors"])
             for g in usage}
    assert calls == {("broke", "budget_exceeded"): (7, 7, 0),
                     ("broke-too", "budget_exceeded"): (1, 1, 0),
                     ("team-a", "ok"): (2, 0, 0), ("team-b", "rejected"): (3, 0, 3)}
    assert report["totals"]["calls"] == 13 and report["totals"]["refusals"] == 8
    assert sum(r["calls"] for r in report["refusals"]) == 8
    # /metrics counts each attempt as it happens, folded or not.
    reply = http("GET", f"{stack.url}/metrics", None, {"Authorization": f"Bearer {ADMIN}"})
    families = {f.name: f.samples for f in text_string_to_metric_families(reply.content.decode())}
    refused = Counter()
    for s in families["meterproxy_calls"]:
        refused[(s.labels["key"], s.labels["outcome"])] += s.value
    assert (refused[("broke", "budget_exceeded")], refused[("broke-too", "budget_exceeded")],
            refused[("team-b", "rejected")]) == (7, 1, 3)


def test_vercel_ai_sdk_retries_are_one_row(stack: Stack) -> None:
    """The Vercel AI SDK retries a 429 refusal three times in all (~6 s): one row, 3."""
    client = next(c for c in MATRIX if c.name == "ai + @ai-sdk/openai")
    from tests.test_clients import ready

    ready(client)
    before = {r["id"] for r in stack.rows()}
    with pytest.raises(ClientFailed) as caught:
        client.run(Request(stack.url, BROKE, False, "Refuse me", {"X-Meter-Feature": "v"}))
    assert "RetryError" in caught.value.name
    rows = new_rows(stack, before, 3)
    assert [(r["key_name"], r["status"], r["feature"], r["repeat_count"]) for r in rows] == [
        ("broke", 429, "v", 3)]


def _row(call_id: str, repeat: int = 1) -> UsageRow:
    return UsageRow(id=call_id, ts="2026-12-04T00:00:00.000000Z", key_name="broke",
                    outcome="budget_exceeded", status=429, repeat_count=repeat)


@pytest.mark.parametrize(("folded", "committed", "expected"), [
    (False, False, [("a", 1), ("b", 1), ("c", 1)]),  # killed before the fold: three rows
    (True, False, [("a", 3)]),  # after the fold, before the log had it: the folded row
    (True, True, []),  # after the commit: nothing to replay
])
def test_a_kill_replays_the_fold_whole_or_not_at_all(tmp_path: Path, folded: bool,
                                                     committed: bool,
                                                     expected: list[tuple[str, int]]) -> None:
    """The journal's fold line replaces the absorbed rows in one append."""
    j = Journal(tmp_path)
    for call_id in "abc":
        j.finished(_row(call_id))
    if folded:
        j.folded(_row("a", 3), ["b", "c"])
    if committed:
        j.committed(["a", "b", "c"])
    _die(j)
    rows = journal_mod.recover(tmp_path)
    assert sorted((r.id, r.repeat_count) for r in rows) == expected


def test_sigkill_while_refusals_are_held_loses_none(tmp_path: Path) -> None:
    """kill -9 while the writer holds a refusal run: the restart writes every attempt."""
    sim = Stack(tmp_path / "sim")
    db = tmp_path / "held.db"
    config = {"storage": {"usage_log": f"sqlite:///{db}", "flush_interval_ms": 50,
                          "fold_refusals_ms": 600_000},
              "providers": {"openai": {"base_url": sim.sim_url}},
              "keys": [{"name": "broke", "key_sha256": sha(BROKE), "budgets": _TINY}]}
    env = {"OPENAI_API_KEY": PROVIDER_KEY}
    try:
        served = Served(tmp_path, config, env=env)
        try:
            client = openai.OpenAI(base_url=f"{served.url}/openai/v1", api_key=BROKE,
                                   max_retries=0)
            for _ in range(4):
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
            served.proc.send_signal(signal.SIGKILL)
            served.proc.wait(10)
        finally:
            served.kill()
        again = Served(tmp_path, config, env=env)
        try:
            assert again.stop() == 0  # a clean stop writes what the restart replayed
        finally:
            again.kill()
    finally:
        sim.close()
    with sqlite3.connect(db) as conn:
        got = conn.execute("SELECT count(*), sum(repeat_count), min(outcome), max(outcome) "
                           "FROM usage").fetchone()
    assert got[1:] == (4, "budget_exceeded", "budget_exceeded") and 1 <= got[0] <= 4


def test_window_counts_from_the_first_refusal_and_forwarded_calls_never_fold(
        tmp_path: Path) -> None:
    """Refusals starting 0, 0.5 and 0.9 s after the first fold; one at 1.2 s starts a new
    row. A row with the same outcome that was forwarded (it has a usage source) or cost
    something is never folded, nor is a row without a key."""
    from proxy.storage.sqlite import SqliteUsageLog
    from proxy.storage.writer import UsageWriter

    writer = UsageWriter(SqliteUsageLog(f"sqlite:///{tmp_path / 'log.db'}"), interval_s=0.05,
                         fold_s=1.0)
    writer.start()

    def row(call_id: str, second: str, **extra: Any) -> UsageRow:
        fields = {"key_name": "broke", "outcome": "rejected", "status": 400,
                  "error": "bad header", **extra}
        return UsageRow(id=call_id, ts=f"2026-12-04T00:00:0{second}Z", **fields)

    for call_id, second in (("a", "0.000000"), ("b", "0.500000"), ("c", "0.900000"),
                            ("d", "1.200000"), ("e", "1.300000")):
        writer.submit(row(call_id, second))
    writer.submit(row("f", "0.100000", usage_source="provider"))
    writer.submit(row("g", "0.200000", usage_source="provider"))
    writer.submit(row("h", "0.300000", cost_usd=0.5))
    writer.submit(row("i", "0.400000", cost_usd=0.5))
    writer.submit(row("j", "0.100000", key_name=None))
    writer.submit(row("k", "0.200000", key_name=None))
    assert writer.flush(10)
    writer.close()
    with sqlite3.connect(tmp_path / "log.db") as conn:
        got = dict(conn.execute("SELECT id, repeat_count FROM usage").fetchall())
    assert got == {"a": 3, "d": 2, "f": 1, "g": 1, "h": 1, "i": 1, "j": 1, "k": 1}
