"""Harness for the scale-out tests: real PostgreSQL and Redis, real `meterproxy serve` processes.

The servers come from tests/services.py: the environment's (`METERPROXY_TEST_PG`,
`METERPROXY_TEST_REDIS`) or throwaway ones this session starts, or the tests skip with the
install line. Each test module gets a fresh database and each test a fresh Redis key
prefix, both removed at the end, so the tests can run again and again. A test that stops
Redis runs its own redis-server; a test that takes PostgreSQL away closes a TCP forwarder
that stands between meterproxy and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml
from aiohttp import web

from proxy.simulator import Simulator
from tests.conftest import KEY_ENV, PROVIDER_KEY, VIRTUAL_KEY, free_port, http
from tests.services import postgres_url, redis_bin, redis_url

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "admin-secret-for-scale-tests"
ADMIN_ENV = "METERPROXY_SCALE_ADMIN_KEY"


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test module; dropped afterwards."""
    admin = postgres_url()
    name = f"meterproxy_test_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_rows(url: str, where: str = "TRUE", params: tuple = ()) -> list[dict[str, Any]]:
    """Rows of the usage table, oldest id first."""
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return list(conn.execute(f"SELECT * FROM usage WHERE {where} ORDER BY id", params))


def wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; its value, or a failure naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def redis_prefix() -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    url = redis_url()
    prefix = f"mptest-{secrets.token_hex(4)}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


class RedisServer:
    """This test's own redis-server, to stop and start without touching the shared one."""

    def __init__(self, tmp: Path, *, persistent: bool = False) -> None:
        self.exe = redis_bin()
        self.port = free_port()
        self.dir = tmp
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
                str(self.dir), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent \
            else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, 10, "redis-server to start")
        client.close()

    def stop(self) -> None:
        """Shut down as on SIGTERM (an append-only file, when persistent, is kept)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class TcpForwarder:
    """A TCP forwarder in a thread: `close()` cuts every connection and refuses new ones
    (the server looks gone), `open()` lets them through again on the same port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.open()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def open(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      reuse_address=True)
        self._call(start())

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
        self._call(stop())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def shutdown(self) -> None:
        self.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class SimServer:
    """The simulated provider alone, in a thread, for proxies running as other processes."""

    def __init__(self) -> None:
        self.sim = Simulator()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.sim.app(), access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", self.port)
            self.loop.run_until_complete(site.start())
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the simulator did not start")

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            # Answers still waiting (a hang scenario whose proxy was killed) end here.
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def chat_as(url: str, customer: str, prompt: str, max_tokens: int) -> Any:
    """One chat completion through a proxy process with the test key, as `customer`,
    with no SDK retries (the scale tests count each call once)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=VIRTUAL_KEY, max_retries=0,
                                timeout=30)
    try:
        return await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}],
            extra_headers={"X-Meter-Customer": customer})
    finally:
        await client.close()


def log_events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The JSON log lines a proxy process wrote (each must parse: no interleaving)."""
    return [json.loads(line) for line in proxy.log.read_text(errors="replace").splitlines()
            if line.startswith("{")]


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


class ProxyProcess:
    """`meterproxy serve` in its own process, as a deployment runs it."""

    def __init__(self, config: Path, port: int, log: Path, *, workers: int = 1) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, KEY_ENV: PROVIDER_KEY, ADMIN_ENV: ADMIN_KEY,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config),
                "--port", str(port), "--workers", str(workers)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=config.parent, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 30) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"meterproxy exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                return http("GET", f"{self.url}/healthz", timeout=1).status_code == 200
            except OSError:
                return False

        wait_for(up, timeout, f"meterproxy on port {self.port}")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: nothing is flushed or settled."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
