"""The test harness: a real simulated provider and a real proxy on loopback.

Both run in one background thread with its own event loop, so the official SDKs (sync
and async) talk to them over real sockets exactly as an application would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.config import load_settings
from proxy.keys import APP_SERVER
from proxy.listener import GuardedSite
from proxy.logs import configure
from proxy.runtime import Runtime
from proxy.server import Server
from proxy.simulator import Simulator
from tests import services

# Log lines go to stderr as JSON, as in production, so stdout stays the CLI's alone.
configure("info", "json")


@pytest.fixture(scope="session", autouse=True)
def _servers() -> Iterator[None]:
    """Stop the PostgreSQL and Redis servers tests/services.py started, at the very end."""
    yield
    services.stop_all()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With METERPROXY_TEST_NO_SKIP set (.ci/run sets it) a skipped test fails the run:
    CI must run every test, not quietly leave out those whose services are missing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("METERPROXY_TEST_NO_SKIP") and skipped:
        reporter.ensure_newline()
        reporter.write_line(f"METERPROXY_TEST_NO_SKIP: {len(skipped)} test(s) skipped, "
                            "which fails this run (reasons in the summary)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

VIRTUAL_KEY = "mp-test-virtual-key-0001"
OTHER_KEY = "mp-test-virtual-key-0002"
PROVIDER_KEY = "sk-real-provider-key-DO-NOT-LEAK-1234567890"
KEY_ENV = "METERPROXY_TEST_PROVIDER_KEY"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A simulator and a proxy in front of it, with helpers to read the usage log."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None = None,
                 clock: Any = None) -> None:
        self.sim = Simulator()
        tmp.mkdir(parents=True, exist_ok=True)
        self.db = tmp / "usage.db"
        self.sim_port = free_port()
        self.port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        os.environ[KEY_ENV] = PROVIDER_KEY
        base = {
            "storage": {"usage_log": f"sqlite:///{self.db}", "flush_interval_ms": 20},
            "providers": {name: {"base_url": self.sim_url, "api_key_env": KEY_ENV}
                          for name in ("openai", "anthropic", "gemini", "azure")},
            "keys": [
                {"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)},
                {"name": "team-b", "key_sha256": sha(OTHER_KEY), "models": ["gpt-4o-mini"],
                 "tags": {"team": "b"}},
            ],
        }
        base["providers"]["azure"].update({"dialect": "openai", "auth_header": "api-key",
                                           "pricing": "openai"})
        self.config_path = tmp / "meterproxy.yaml"
        self.write_config(_merge(base, config or {}))
        self.settings = load_settings(str(self.config_path))
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test servers did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.sim_runner = web.AppRunner(self.sim.app(), access_log=None)
        await self.sim_runner.setup()
        await web.TCPSite(self.sim_runner, "127.0.0.1", self.sim_port).start()
        self.app = create_app(self.settings, clock=self.clock)
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=5)
        await self.runner.setup()
        await GuardedSite(self.runner, "127.0.0.1", self.port,
                          max_connections=self.settings.server.max_connections).start()

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))

    @property
    def server(self) -> Server:
        return self.app[APP_SERVER]

    @property
    def runtime(self) -> Runtime:
        return self.server.current

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def base(self, provider: str = "openai", suffix: str = "/v1") -> str:
        return f"{self.url}/{provider}{suffix}"

    def rows(self, expected: int | None = None, timeout: float = 15) -> list[dict[str, Any]]:
        """Every usage row so far, once `expected` rows are there (all of them are flushed)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._thread.is_alive():  # after close() everything is already on disk
                self.call(self._settle())
                self.runtime.writer.flush()
            rows = self._read()
            if expected is None or len(rows) >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def calls(self, expected: int, timeout: float = 15) -> list[dict[str, Any]]:
        """Every usage row so far, once they stand for `expected` calls (identical
        refusals are folded into one row counting them: repeat_count)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if sum(r["repeat_count"] for r in rows) >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def last_row(self) -> dict[str, Any]:
        rows = self.rows()
        assert rows, "no usage rows"
        return rows[-1]

    async def _settle(self) -> None:
        """Wait for the runtime's background work, and for the work it started, to end."""
        deadline = self.loop.time() + 10
        while ((background := set(self.server.services.tasks.running))
               and self.loop.time() < deadline):
            await asyncio.wait(background, timeout=deadline - self.loop.time())

    def settle(self) -> None:
        """Return once every background task (alert claims, webhook POSTs...) has ended."""
        self.call(self._settle())
        assert not self.server.services.tasks.running, "background work still running"

    def _read(self) -> list[dict[str, Any]]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
        finally:
            conn.close()

    def close(self, during: Any = None) -> None:
        """Stop both servers; `during()` runs on the loop once the proxy's shutdown began."""
        async def stop() -> None:
            cleanup = asyncio.ensure_future(self.runner.cleanup())
            if during is not None:
                await asyncio.sleep(0)
                during()
            await cleanup
            await self.sim_runner.cleanup()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.close()


class Reply:
    """A raw HTTP answer: status, headers, body, and the body as JSON."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.content = body

    def json(self) -> Any:
        import json

        return json.loads(self.content)


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    """One plain HTTP request with the standard library, errors returned not raised."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, dict(err.headers), err.read())


class Served:
    """`meterproxy serve` as its own process, on a config written to a file."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 port: int | None = None, args: tuple[str, ...] = ()) -> None:
        import subprocess
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / f"serve-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path),
             "--port", str(self.port), *args],
            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=self._log)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.logs()}")
            try:
                if http("GET", f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"serve did not become ready: {self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Webhook:
    """A real loopback server that records the JSON bodies POSTed to it (on a stack's loop)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[dict[str, Any]] = []

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(status=204)

    def start(self, stack: Stack) -> None:
        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/hook", self._hook)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.stack = stack
        self.runner = stack.call(start())

    def wait(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.stack.call(self.runner.cleanup())
