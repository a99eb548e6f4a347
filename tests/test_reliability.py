"""Nothing lost: shutdown, kills, client faults, back-pressure and a full disk."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.simulator import Scenario
from proxy.stages.relay import Tail
from tests.conftest import PROVIDER_KEY, VIRTUAL_KEY, Served, Stack, http, sha


def serve_config(stack: Stack, db: Path, **extra: Any) -> dict[str, Any]:
    return {"storage": {"usage_log": f"sqlite:///{db}", "flush_interval_ms": 50},
            "providers": {"openai": {"base_url": stack.sim_url}},
            "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}], **extra}


ENV = {"OPENAI_API_KEY": PROVIDER_KEY}
STREAM_BODY = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "stream please"}]})
HEADERS = {"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json"}
TENTH_NANO = Decimal("1e-10")  # the log's cost resolution


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack")
    yield s
    s.close()


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_sigterm_drains_50_streams_and_flushes_every_row(sim: Stack, tmp_path: Path) -> None:
    """SIGTERM with 50 streams in flight: no new connections, all 50 finish, 50 rows, exit 0."""
    db = tmp_path / "served.db"
    served = Served(tmp_path, serve_config(sim, db), env=ENV)
    sim.sim.then(Scenario(chunk_delay_s=0.1, repeat=50))
    started = asyncio.Event()
    first_bytes = 0

    async def one(session: aiohttp.ClientSession) -> bytes:
        nonlocal first_bytes
        async with session.post(f"{served.url}/openai/v1/chat/completions", data=STREAM_BODY,
                                headers=HEADERS) as resp:
            body = await resp.content.readany()
            first_bytes += 1
            if first_bytes == 50:
                started.set()
            return body + await resp.read()

    async def run() -> list[bytes]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(one(session)) for _ in range(50)]
            await asyncio.wait_for(started.wait(), 30)
            served.proc.send_signal(signal.SIGTERM)
            refused = False
            for _ in range(100):
                await asyncio.sleep(0.05)
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", served.port)
                    writer.close()
                except OSError:
                    refused = True
                    break
            assert refused, "new connections were still accepted after SIGTERM"
            return await asyncio.gather(*tasks)

    try:
        bodies = asyncio.run(run())
        assert served.proc.wait(30) == 0
    finally:
        served.kill()
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    rows = sqlite3.connect(db).execute("SELECT outcome, stream, output_tokens FROM usage")
    rows = rows.fetchall()
    assert len(rows) == 50
    assert all(r == ("ok", 1, rows[0][2]) and r[2] > 0 for r in rows)


def test_sigkill_leaves_a_consistent_log_and_a_rebuilt_ledger(sim: Stack, tmp_path: Path) -> None:
    """After SIGKILL mid-load the log passes integrity checks and a restart resumes."""
    db = tmp_path / "killed.db"
    config = serve_config(sim, db, budgets=[{"scope": {"key": "team-a"}, "period": "month",
                                             "limit_usd": 100}])
    served = Served(tmp_path, config, env=ENV)
    client = openai.OpenAI(base_url=f"{served.url}/openai/v1", api_key=VIRTUAL_KEY,
                           max_retries=0)
    try:
        for i in range(30):
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": f"q{i}"}])
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
    finally:
        served.kill()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    count, partial = conn.execute(
        "SELECT count(*), sum(outcome IS NULL OR ts IS NULL OR provider IS NULL) FROM usage"
    ).fetchone()
    assert 0 < count <= 30 and not partial
    spent = conn.execute("SELECT sum(cost_usd) FROM usage").fetchone()[0]
    conn.close()
    again = Served(tmp_path, config, env={**ENV, "METERPROXY_ADMIN_KEY": "k"})
    try:
        client = openai.OpenAI(base_url=f"{again.url}/openai/v1", api_key=VIRTUAL_KEY,
                               max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "after"}])
        status = http("GET", f"{again.url}/_meter/budgets", None,
                      {"Authorization": "Bearer k"}).json()
        assert again.stop() == 0
    finally:
        again.kill()
    costs = [Decimal(str(c)) for (c,) in sqlite3.connect(db).execute("SELECT cost_usd FROM usage")]
    # The journal brought back the answered calls the kill caught unflushed: all 30,
    # and the one after the restart.
    assert len(costs) == 31
    # The rebuilt ledger holds what the log held at the kill plus the one call since:
    # exactly the log's total now, neither lost nor counted twice.
    assert sum(costs[:count]) == Decimal(str(spent)).quantize(TENTH_NANO)
    assert Decimal(str(status[0]["spent_usd"])).quantize(TENTH_NANO) == sum(costs)


def test_client_gone_before_the_answer_cancels_upstream(sim: Stack) -> None:
    """A client that leaves before the provider answers: upstream is dropped, one row says so."""
    sim.sim.then(Scenario(hang_s=1.5))
    client = openai.OpenAI(base_url=sim.base(), api_key=VIRTUAL_KEY, max_retries=0,
                           timeout=0.3)
    before = len(sim.rows())
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "slow"}])
    row = sim.rows(before + 1)[-1]
    assert row["outcome"] == "client_disconnect" and row["status"] is None
    assert row["usage_source"] == "partial" and row["input_tokens"] > 0
    wait_for(lambda: sim.sim.abandoned == 1)


def stalled(counter: Any, quiet_s: float = 1.0, timeout: float = 60) -> int:
    """Poll `counter()` until it has stopped moving for `quiet_s`; its value then."""
    deadline = time.monotonic() + timeout
    value, since = counter(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        if (now := counter()) != value:
            value, since = now, time.monotonic()
    return value


def test_slow_reader_holds_the_upstream_back(sim: Stack) -> None:
    """A client that stops reading makes the proxy stop reading upstream (bounded memory),
    and reading again lets the provider's writes resume."""
    event = b'data: {"id":"x","choices":[],"pad":"' + b"p" * 4000 + b'"}\n\n'
    total = 25_000  # 100 MB of 4 KB events, one write each
    sim.sim.then(Scenario(raw_events=[event] * total))
    with socket.create_connection(("127.0.0.1", sim.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        request = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {VIRTUAL_KEY}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(STREAM_BODY)}\r\n\r\n").encode() + STREAM_BODY
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # This client reads nothing more: the provider's writes stop once the socket
        # buffers between them are full, far short of the whole stream.
        held = stalled(lambda: sim.sim.events_sent)
        assert held * len(event) < 32 * 1024 * 1024, f"{held} of {total} events left upstream"
        read = 0
        while read < 8 * 1024 * 1024:
            read += len(sock.recv(1 << 20))
        wait_for(lambda: sim.sim.events_sent > held)  # reading again lets the provider write
    rows = sim.rows(1)
    assert rows[-1]["outcome"] in ("client_disconnect", "upstream_error")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs to fill up (needs root, as CI and the dev machines have)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {result.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_keeps_serving_and_loses_nothing(tiny_disk: Path, tmp_path: Path) -> None:
    """With the log's disk full the proxy serves, /healthz says degraded, rows wait; then land."""
    stack = Stack(tmp_path / "stack", {"storage": {
        "usage_log": f"sqlite:///{tiny_disk / 'usage.db'}", "flush_interval_ms": 20}})
    stack.db = tiny_disk / "usage.db"
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "before"}])
        stack.rows(1)
        filler = tiny_disk / "filler"
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for i in range(40):
            out = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"full {i} " * 50}],
                extra_headers={"X-Meter-Tag-Pad": "p" * 250})
            assert out.choices[0].message.content
        wait_for(lambda: http("GET", f"{stack.url}/healthz").json()["status"] == "degraded")
        assert stack.runtime.writer.pending > 0
        filler.unlink()
        wait_for(lambda: stack.runtime.writer.pending == 0)
        assert http("GET", f"{stack.url}/healthz").json()["status"] == "ok"
        rows = stack.rows(41)
        assert len(rows) == 41 and len({r["id"] for r in rows}) == 41
        assert stack.runtime.writer.dropped == 0
    finally:
        stack.close()


def test_body_cut_short_is_a_502_not_half_a_200(sim: Stack) -> None:
    """A provider that breaks off a JSON answer: the client gets a clear 502, one row."""
    body = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y" * 5000}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1200}})
    sim.sim.then(Scenario(body=body, cut_body_at=2000))
    client = openai.OpenAI(base_url=sim.base(), api_key=VIRTUAL_KEY, max_retries=0)
    before = len(sim.rows())
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "cut"}])
    assert err.value.status_code == 502
    assert "broke off its response" in err.value.body["message"]
    row = sim.rows(before + 1)[-1]
    assert (row["status"], row["outcome"], row["usage_source"]) == (502, "upstream_error",
                                                                   "partial")
    assert row["input_tokens"] > 0


def test_hundred_megabyte_answer_streams_through_with_its_usage(sim: Stack) -> None:
    """A 100 MB JSON answer reaches the client intact; usage is read from its tail."""
    pad = "z" * (100 * 1024 * 1024)
    body = orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                     "embedding": pad}],
                         "model": "text-embedding-3-small",
                         "usage": {"prompt_tokens": 123456, "total_tokens": 123456}})
    sim.sim.then(Scenario(body=body))
    before = len(sim.rows())
    reply = http("POST", f"{sim.base()}/embeddings", orjson.dumps(
        {"model": "text-embedding-3-small", "input": "big"}), HEADERS, timeout=120)
    assert reply.status_code == 200 and reply.content == body
    assert "x-meter-cost-usd" not in reply.headers  # too large to hold before sending
    row = sim.rows(before + 1)[-1]
    assert (row["input_tokens"], row["usage_source"], row["outcome"]) == (123456, "provider",
                                                                         "ok")
    assert row["cost_usd"] == pytest.approx(123456 * 0.02 / 1e6)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=700), max_size=40),
       keep=st.integers(min_value=1, max_value=1000))
def test_tail_of_a_large_body_is_its_last_bytes(sizes: list[int], keep: int) -> None:
    """The relay's tail keeper: exactly the body's last `keep` bytes, holding whole chunks
    and never more than `keep` plus one chunk."""
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    tail = Tail(keep)
    for chunk in chunks:
        tail.add(chunk)
        assert tail._size <= keep + max(sizes)
    assert tail.bytes() == b"".join(chunks)[-keep:]
