"""Hostile input through the real server: strangers' bodies, slow sockets, other gateways'
credentials, encoded bodies, and the Azure deployment a key may not call."""

from __future__ import annotations

import contextlib
import gzip
import json
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import openai
import pytest
import yaml

from tests.conftest import (
    OTHER_KEY,
    PROVIDER_KEY,
    VIRTUAL_KEY,
    Reply,
    Stack,
    free_port,
    http,
)
from tests.scale import wait_for

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = "/openai/v1/chat/completions"


def _healthy(url: str) -> bool:
    """Whether /healthz answers 200 now (a refused or timed-out connect is a no)."""
    try:
        return http("GET", url, timeout=2).status_code == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("hostile"),
              {"server": {"header_timeout_s": 1, "body_timeout_s": 1, "max_body_mb": 2}})
    yield s
    s.close()


def post(stack: Stack, path: str, body: bytes, headers: dict[str, str]) -> Reply:
    """A POST with exactly these headers (urllib would overwrite Connection)."""
    conn = HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def raw(stack: Stack, head: str, body: bytes = b"", wait: float = 20) -> bytes:
    """Send a request's bytes on a plain socket; everything the server says until it closes
    (or `wait` seconds of silence)."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=wait) as sock:
        sock.sendall(head.encode() + body)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def test_wrong_key_is_refused_before_its_body_arrives(stack: Stack) -> None:
    """A wrong key announcing a 60 MB body gets its 401 at once: the body is never read."""
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer mp-wrong\r\n"
            "Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n")
    answer = raw(stack, head, b"{" + b" " * 1000, wait=10)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"invalid_api_key" in answer


def test_half_sent_headers_are_closed(stack: Stack) -> None:
    """A connection that never finishes its headers is closed after header_timeout_s."""
    answer = raw(stack, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nX-Slow: ", wait=20)
    assert answer == b""  # closed by the server, not by our 20 s wait (that raises nothing)


def test_half_sent_body_is_408_with_a_row(stack: Stack) -> None:
    """A known key whose body stalls gets a 408 in OpenAI's shape, and its row."""
    before = len(stack.rows())
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {VIRTUAL_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    answer = raw(stack, head, b'{"model": "gpt-4o-mini"', wait=10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer.replace(b" ", b"")
    row = stack.rows(before + 1)[-1]
    assert (row["key_name"], row["status"], row["outcome"]) == ("team-a", 408, "rejected")


def test_probes_without_a_key_write_no_rows(stack: Stack) -> None:
    """Scanners' probes are counted, not logged as usage: 50 probes, no rows."""
    before = len(stack.rows())
    refused = dict(stack.runtime.metrics.refused)
    for i in range(50):
        assert http("GET", f"{stack.url}/wp-login{i}.php").status_code == 404
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    rows = stack.rows(before + 1)
    assert len(rows) == before + 1 and rows[-1]["status"] == 200
    now = stack.runtime.metrics.refused
    assert now[(("status", "404"),)] - refused.get((("status", "404"),), 0) == 50


def test_known_key_on_unknown_provider_keeps_its_row(stack: Stack) -> None:
    """A known key's wrong path is still its call: a 404 and one row."""
    before = len(stack.rows())
    reply = http("POST", f"{stack.url}/nope/v1/chat/completions", b"{}",
                 {"Authorization": f"Bearer {VIRTUAL_KEY}"})
    assert reply.status_code == 404
    row = stack.rows(before + 1)[-1]
    assert (row["key_name"], row["status"]) == ("team-a", 404)


def test_other_gateways_credentials_cookies_and_hop_headers_stay_here(stack: Stack) -> None:
    """Helicone, Portkey and Cloudflare credentials, Cookie and Connection-named headers
    never reach the provider; attribution from Helicone headers still lands in tags."""
    headers = {"Authorization": f"Bearer {VIRTUAL_KEY}", "Helicone-Auth": "Bearer sk-helicone-1",
               "Helicone-Property-Team": "blue", "X-Portkey-Api-Key": "pk-secret",
               "cf-aig-authorization": "Bearer cf-secret", "Cookie": "session=abc",
               "Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "hop",
               "X-Kept": "yes"}
    before = len(stack.rows())
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    reply = post(stack, CHAT, body, {**headers, "Content-Type": "application/json"})
    assert reply.status_code == 200
    sent = {k.lower(): v for k, v in stack.sim.received[-1].headers.items()}
    for name in ("helicone-auth", "helicone-property-team", "x-portkey-api-key",
                 "cf-aig-authorization", "cookie", "x-hop-secret"):
        assert name not in sent, name
    assert sent["x-kept"] == "yes" and sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert json.loads(stack.rows(before + 1)[-1]["tags"]) == {"team": "blue"}


def test_gzip_body_goes_upstream_as_sent(stack: Stack) -> None:
    """A gzip body is forwarded gzip, with its Content-Encoding, byte for byte."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    packed = gzip.compress(body)
    before = len(stack.rows())
    reply = post(stack, CHAT, packed, {"Authorization": f"Bearer {VIRTUAL_KEY}",
                                       "Content-Type": "application/json",
                                       "Content-Encoding": "gzip"})
    assert reply.status_code == 200, reply.content
    received = stack.sim.received[-1]
    assert received.headers.get("Content-Encoding") == "gzip"
    assert received.body == body  # the simulator decoded what we sent on
    row = stack.rows(before + 1)[-1]
    assert (row["model"], row["input_tokens"]) == ("gpt-4o-mini", received_tokens(reply))


def received_tokens(reply: Reply) -> int:
    return reply.json()["usage"]["prompt_tokens"]


def test_gzip_stream_body_is_edited_and_sent_plain(stack: Stack) -> None:
    """A gzip streaming body we must edit (to ask for usage) goes on plain, correctly
    labelled, with the usage request in it."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}).encode()
    reply = post(stack, CHAT, gzip.compress(body), {"Authorization": f"Bearer {VIRTUAL_KEY}",
                                                    "Content-Type": "application/json",
                                                    "Content-Encoding": "gzip"})
    assert reply.status_code == 200 and b"data: [DONE]" in reply.content
    received = stack.sim.received[-1]
    assert "Content-Encoding" not in received.headers
    assert json.loads(received.body)["stream_options"] == {"include_usage": True}


def test_gzip_bomb_stops_at_the_body_limit(stack: Stack) -> None:
    """A small gzip body that inflates past max_body_mb is a 413, not 2 GB of memory."""
    bomb = gzip.compress(b"{" + b" " * (3 * 1024 * 1024) + b"}")
    reply = post(stack, CHAT, bomb, {"Authorization": f"Bearer {VIRTUAL_KEY}",
                                     "Content-Encoding": "gzip"})
    assert reply.status_code == 413 and b"over the 2 MB limit" in reply.content


def test_azure_allow_list_checks_the_deployment(stack: Stack) -> None:
    """Azure serves the deployment in the path: a key limited to gpt-4o-mini cannot reach
    the gpt-4o deployment by writing gpt-4o-mini in the body."""
    azure = openai.AzureOpenAI(azure_endpoint=f"{stack.url}/azure", api_key=OTHER_KEY,
                               api_version="2024-10-21", azure_deployment="gpt-4o",
                               max_retries=0)
    received = len(stack.sim.received)
    with pytest.raises(openai.PermissionDeniedError):
        azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(stack.sim.received) == received


def test_header_function_drops_connection_named_headers_on_responses() -> None:
    """The one strip function also cleans the provider's response headers."""
    from multidict import CIMultiDict

    from proxy.headers import strip

    upstream = CIMultiDict([("Connection", "X-Upstream-Hop"), ("X-Upstream-Hop", "1"),
                            ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Ok", "1")])
    kept = strip(upstream, toward_provider=False)
    assert list(kept.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Ok", "1")]




def test_connections_past_the_ceiling_get_a_503(tmp_path: Path) -> None:
    """With max_connections: 3, a fourth idle connection is told 503 and closed; once one
    goes, calls are served again."""
    s = Stack(tmp_path, {"server": {"max_connections": 3, "header_timeout_s": 60}})
    idle = [socket.create_connection(("127.0.0.1", s.port), timeout=20) for _ in range(3)]
    try:
        deadline = time.monotonic() + 20
        while len(s.runner.server.connections) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = raw(s, f"GET {CHAT} HTTP/1.1\r\nHost: x\r\n\r\n", wait=20)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        idle.pop().close()
        while len(s.runner.server.connections) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    finally:
        for sock in idle:
            sock.close()
        s.close()


def test_accept_failures_are_logged_once_per_interval(tmp_path: Path) -> None:
    """Out of file descriptors, `meterproxy serve` logs the failing accept() once, not once
    per attempt, and /healthz answers again when the clients go."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{tmp_path}/u.db"}}))
    log_path = tmp_path / "serve.log"

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config),
             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log_file,
            preexec_fn=few_descriptors)
        clients: list[socket.socket] = []
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            wait_for(lambda: _healthy(url), 30, "the proxy to start")
            for _ in range(150):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            # Let the loop run into the limit for a while: every retry would log a line.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                time.sleep(0.1)
            for sock in clients:
                sock.close()
            clients.clear()
            wait_for(lambda: _healthy(url), 30, "/healthz to come back")
        finally:
            for sock in clients:
                sock.close()
            proc.terminate()
            proc.wait(30)
    text = log_path.read_text(errors="replace")
    failures = [line for line in text.splitlines() if "accept" in line.lower()]
    assert 1 <= len(failures) <= 2, failures[:5]
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("hostile-budgets"),
              {"budgets": [{"scope": {"key": "*"}, "period": "day", "limit_usd": 1000}],
               "server": {"estimate_bytes_above_kb": 64}})
    yield s
    s.close()


def nested(depth: int) -> bytes:
    return b"[" * depth + b'"deep"' + b"]" * depth


def test_deeply_nested_prompt_is_a_clear_400(budgeted: Stack) -> None:
    """A prompt nested 990 deep (a RecursionError and a 500 before) is a 400 that says why."""
    body = (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": '
            + nested(990) + b"}]}")
    reply = http("POST", budgeted.base() + "/chat/completions", body,
                 {"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 400, reply.content[:300]
    assert "nests deeper than 100 levels" in reply.json()["error"]["message"]


def test_large_prompt_is_held_by_its_byte_length(budgeted: Stack) -> None:
    """Above estimate_bytes_above_kb the hold is the body's byte length in input tokens,
    an upper bound of the real count the provider then reports."""
    text = "word " * 40_000  # 200 KB, over the 64 KB the stack counts
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 10,
                       "messages": [{"role": "user", "content": text}]}).encode()
    held = []
    budgets = budgeted.runtime.budgets
    original = budgets.estimate

    def spy(x, now, *rest):
        result = original(x, now, *rest)
        held.append(result[1])
        return result

    budgets.estimate = spy
    try:
        reply = http("POST", budgeted.base() + "/chat/completions", body,
                     {"Authorization": f"Bearer {VIRTUAL_KEY}",
                      "Content-Type": "application/json"})
    finally:
        budgets.estimate = original
    assert reply.status_code == 200
    assert held == [len(body) + 10]
    assert reply.json()["usage"]["prompt_tokens"] < len(body)


def test_counting_takes_tenants_in_turn() -> None:
    """One tenant's queue of counting jobs does not hold another's back: with the workers
    busy and five jobs of tenant a queued, tenant b's job is next."""
    import asyncio
    import threading

    from proxy.tokens import FairPool

    pool = FairPool(workers=1)
    started, gate = threading.Event(), threading.Event()
    order: list[str] = []

    def job(name: str) -> str:
        if name == "a0":
            started.set()
            gate.wait(10)
        order.append(name)
        return name

    async def main() -> list[str]:
        first = asyncio.ensure_future(pool.run("a", job, "a0"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        queued = [asyncio.ensure_future(pool.run("a", job, f"a{i}")) for i in range(1, 6)]
        other = asyncio.ensure_future(pool.run("b", job, "b0"))
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *queued, other)

    results = asyncio.run(main())
    assert sorted(results) == sorted(["a0", "a1", "a2", "a3", "a4", "a5", "b0"])
    assert order[:3] == ["a0", "a1", "b0"]


def test_sigkill_loses_no_row_finished_or_in_flight(tmp_path: Path) -> None:
    """`kill -9` of a real `meterproxy serve` with 10 answered calls still in the writer's
    queue (a 60 s flush interval) and 3 streams mid-answer: after a restart the log holds
    all 10 rows as they were and one `proxy_error` row for each cut stream."""
    from proxy.simulator import Scenario
    from tests.conftest import Served, sha

    sim = Stack(tmp_path / "sim")
    db = tmp_path / "killed.db"
    config = {"storage": {"usage_log": f"sqlite:///{db}", "flush_interval_ms": 60_000},
              "providers": {"openai": {"base_url": sim.sim_url}},
              "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}]}
    env = {"OPENAI_API_KEY": PROVIDER_KEY}
    served = Served(tmp_path, config, env=env)
    streams: list[HTTPConnection] = []
    try:
        client = openai.OpenAI(base_url=f"{served.url}/openai/v1", api_key=VIRTUAL_KEY,
                               max_retries=0)
        for i in range(10):
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": f"q{i}"}])
        sim.sim.then(Scenario(chunk_delay_s=1, repeat=3))
        body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                           "messages": [{"role": "user", "content": "long"}]}).encode()
        for _ in range(3):
            conn = HTTPConnection("127.0.0.1", served.port, timeout=30)
            conn.request("POST", CHAT, body=body, headers={
                "Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 200 and reply.read1(64)  # the stream has begun
            streams.append(conn)
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
    finally:
        served.kill()
        for conn in streams:
            conn.close()
    killed_rows = sqlite3.connect(db).execute("SELECT count(*) FROM usage").fetchone()[0]
    assert killed_rows == 0  # nothing was flushed: the journal must bring them all back
    again = Served(tmp_path, config, env=env)
    try:
        assert again.stop() == 0  # a clean stop flushes what the start replayed
    finally:
        again.kill()
        sim.close()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT outcome, stream, upstream_request_id, error, key_name, "
                        "input_tokens FROM usage ORDER BY ts").fetchall()
    ok = [r for r in rows if r[0] == "ok"]
    cut = [r for r in rows if r[0] == "proxy_error"]
    assert len(ok) == 10 and all(r[5] > 0 and r[4] == "team-a" for r in ok)
    assert len(cut) == 3 and all(r[1] == 1 and "killed" in r[3] for r in cut)
    assert len(rows) == 13
    assert not list((tmp_path / "killed.db.calls").glob("journal-*"))  # replayed, gone


def test_csv_cells_cannot_run_formulas_and_the_cli_prints_no_escapes(tmp_path: Path) -> None:
    """A model named `=HYPERLINK(...)` or `@SUM(...)` is written as text in export.csv and
    `usage --format csv`; an ANSI escape in a model name never reaches the terminal; costs
    are plain decimals, never 1.8e-05."""
    import os

    from proxy.cli import main

    os.environ["METERPROXY_TEST_HOSTILE_ADMIN"] = "hostile-admin"
    s = Stack(tmp_path, {"server": {"admin_key_env": "METERPROXY_TEST_HOSTILE_ADMIN"}})
    try:
        client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
        for model in ('=HYPERLINK("http://evil")', "@SUM(A1)", "\x1b[31mred", "gpt-4o-mini"):
            client.chat.completions.create(model=model, messages=MESSAGES)
        s.rows(4)
        export = http("GET", f"{s.url}/_meter/export.csv", None,
                      {"Authorization": "Bearer hostile-admin"}).content.decode()
        cells = [c for line in export.splitlines() for c in line.split(",")]
        assert not [c for c in cells if c.lstrip('"').startswith(("=", "@", "+"))]
        assert '"\'=HYPERLINK(""http://evil"")"' in export and "'@SUM(A1)" in export
        assert "e-0" not in export
    finally:
        s.close()
    config = str(s.config_path)
    from contextlib import redirect_stdout
    from io import StringIO

    for fmt in ("csv", "table"):
        out = StringIO()
        with redirect_stdout(out):
            assert main(["usage", "--config", config, "--group-by", "model",
                         "--format", fmt]) == 0
        text = out.getvalue()
        assert "\x1b" not in text and "red" in text
        if fmt == "csv":
            assert "'=HYPERLINK" in text and "'@SUM(A1)" in text
            assert not [line for line in text.splitlines() if line.startswith(("=", "@"))]


def test_an_admin_crash_is_a_json_500(tmp_path: Path) -> None:
    """An admin request that fails inside (its log file turned to garbage) answers a JSON
    500 with nosniff, not aiohttp's plain-text page."""
    import os

    os.environ["METERPROXY_TEST_HOSTILE_ADMIN"] = "hostile-admin"
    s = Stack(tmp_path, {"server": {"admin_key_env": "METERPROXY_TEST_HOSTILE_ADMIN"}})
    try:
        s.db.write_bytes(b"not a database at all" * 512)
        reply = http("GET", f"{s.url}/_meter/usage", None,
                     {"Authorization": "Bearer hostile-admin"})
    finally:
        with contextlib.suppress(sqlite3.DatabaseError):  # the writer's log is garbage too
            s.close()
    assert reply.status_code == 500
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "admin request" in reply.json()["error"]


def test_metrics_under_workers_count_every_worker(tmp_path: Path) -> None:
    """`serve --workers 2`: 20 calls spread over both workers; every scrape, whichever
    worker answers it, counts all 20 (before: each scrape showed one worker's share)."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import sha
    from tests.scale import ADMIN_ENV as SCALE_ADMIN_ENV
    from tests.scale import ADMIN_KEY as SCALE_ADMIN
    from tests.scale import KEY_ENV, ProxyProcess, redis_prefix, wait_for, write_config
    from tests.services import redis_url

    sim = Stack(tmp_path / "sim")
    try:
        with redis_prefix() as prefix:
            config = write_config(tmp_path / "workers.yaml", {
                "storage": {"usage_log": f"sqlite:///{tmp_path}/w.db",
                            "ledger": f"{redis_url()}?prefix={prefix}"},
                "server": {"admin_key_env": SCALE_ADMIN_ENV},
                "providers": {"openai": {"base_url": sim.sim_url, "api_key_env": KEY_ENV}},
                "keys": [{"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)}]})
            proxy = ProxyProcess(config, free_port(), tmp_path / "workers.log", workers=2)
            try:
                proxy.wait_ready()
                for i in range(20):  # a fresh connection each: the kernel spreads them
                    reply = http("POST", f"{proxy.url}{CHAT}", json.dumps(
                        {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                               "content": f"q{i}"}]}).encode(),
                                 {"Authorization": f"Bearer {VIRTUAL_KEY}",
                                  "Content-Type": "application/json"})
                    assert reply.status_code == 200

                def calls() -> float:
                    text = http("GET", f"{proxy.url}/metrics", None,
                                {"Authorization": f"Bearer {SCALE_ADMIN}"}).content.decode()
                    return sum(s.value for f in text_string_to_metric_families(text)
                               if f.name == "meterproxy_calls" for s in f.samples
                               if s.name == "meterproxy_calls_total")

                # Workers publish every second: within one, eight scrapes in a row (spread
                # over both workers) must all count every call.
                wait_for(lambda: [calls() for _ in range(8)] == [20] * 8, 20,
                         "every scrape counting both workers' calls")
            finally:
                proxy.stop()
    finally:
        sim.close()


def test_wrong_keys_on_a_real_path_write_no_rows(stack: Stack) -> None:
    """Unauthenticated calls to a real provider path (no key, a wrong key) are refused with
    a 401 and counted in /metrics, but write no usage row: rows are for known keys."""
    before = len(stack.rows())
    refused = dict(stack.runtime.metrics.refused)
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    for i in range(20):
        auth = {"Authorization": f"Bearer mp-wrong-{i}"} if i % 2 else {}
        reply = post(stack, CHAT, body, {**auth, "Content-Type": "application/json"})
        assert reply.status_code == 401
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    rows = stack.rows(before + 1)
    assert len(rows) == before + 1 and rows[-1]["key_name"] == "team-a"
    now = stack.runtime.metrics.refused
    assert now[(("status", "401"),)] - refused.get((("status", "401"),), 0) == 20


def test_connection_named_response_headers_stop_at_the_proxy(stack: Stack) -> None:
    """Through the real server: headers the provider names in its `Connection:` answer
    header are not passed on to the client; the others are."""
    from proxy.simulator import Scenario

    stack.sim.then(Scenario(headers={"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1",
                                     "X-Upstream-Kept": "yes"}))
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    reply = post(stack, CHAT, body, {"Authorization": f"Bearer {VIRTUAL_KEY}",
                                     "Content-Type": "application/json"})
    assert reply.status_code == 200
    got = {k.lower(): v for k, v in reply.headers.items()}
    assert got.get("x-upstream-kept") == "yes" and "x-upstream-hop" not in got
