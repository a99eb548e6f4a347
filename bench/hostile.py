"""Hostile-input figures for issue 13, against a real `meterproxy serve` process.

    python -m bench.hostile [--tree DIR]   # DIR: a checkout to measure (default: this one)

1. memory: the serve process's peak RSS while six clients send 60 MB bodies with a wrong
   key at once;
2. isolation: with budgets on, tenant B's 100 KB call while tenant A's 20 MB prompt is
   being estimated;
3. durability: 10 answered calls, then `kill -9` with a 60 s flush interval; rows in the
   log after a restart.

Run it on a quiet machine; figures go to the report (docs/deploy.md, issue 13).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

KEY_A, KEY_B = "mp-bench-tenant-a", "mp-bench-tenant-b"
PROVIDER_KEY = "sk-bench-provider"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Serve:
    """`meterproxy serve` from `tree` on a fresh config; the simulator is its provider."""

    def __init__(self, tree: Path, tmp: Path, sim_url: str, **storage: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "usage.db"
        config = {
            "storage": {"usage_log": f"sqlite:///{self.db}", **storage},
            "providers": {"openai": {"base_url": sim_url}},
            "keys": [{"name": n, "key_sha256": hashlib.sha256(k.encode()).hexdigest()}
                     for n, k in (("a", KEY_A), ("b", KEY_B))],
            "budgets": [{"scope": {"key": "*"}, "period": "day", "limit_usd": 10_000}],
        }
        path = tmp / f"serve-{self.port}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port",
             str(self.port)], cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(tree), "OPENAI_API_KEY": PROVIDER_KEY})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready once /healthz answers, not at bind time
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("serve did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


def start_simulator() -> str:
    """bench.fakeprovider in a thread: it answers at once without tokenizing, so what is
    timed is the proxy alone."""
    from aiohttp import web

    from bench.fakeprovider import make_app

    port = free_port()
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()

        async def start() -> None:
            runner = web.AppRunner(make_app(20, 0.0), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()

        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(30)
    return f"http://127.0.0.1:{port}"


async def wrong_key_flood(serve: Serve) -> tuple[float, float]:
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + \
        b"x" * (60 * 1024 * 1024) + b'"}]}'
    before = rss_mb(serve.proc.pid)
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(serve.proc.pid))
            await asyncio.sleep(0.02)

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(f"{serve.url}/openai/v1/chat/completions", data=body,
                                    headers={"Authorization": "Bearer mp-wrong",
                                             "Content-Type": "application/json"}) as r:
                await r.read()
        except aiohttp.ClientError:
            pass  # the proxy may close on a refused body: that is the point

    sampler = asyncio.ensure_future(sample())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session) for _ in range(6)))
    await asyncio.sleep(0.5)
    done.set()
    await sampler
    return before, peak


async def tenant_latency(serve: Serve) -> tuple[float, float]:
    # B: an ordinary long chat (100 KB); A: a 20 MB document of words.
    words = "the quick brown fox jumps over the lazy dog; "
    small = {"model": "gpt-4o-mini",
             "messages": [{"role": "user", "content": words * (100 * 1024 // len(words))}]}
    huge = {"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": words * (20 * 1024 * 1024 // len(words))}]}

    async def call(session: aiohttp.ClientSession, key: str, body: dict) -> float:
        t0 = time.perf_counter()
        async with session.post(f"{serve.url}/openai/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
        return time.perf_counter() - t0

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        alone = min([await call(session, KEY_B, small) for _ in range(5)])
        big = asyncio.ensure_future(call(session, KEY_A, huge))
        await asyncio.sleep(0.3)  # A's body is in; its estimate is under way
        during = await call(session, KEY_B, small)
        await big
    return alone, during


async def answered_then_killed(serve: Serve) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            async with session.post(f"{serve.url}/openai/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {KEY_A}"}) as r:
                await r.read()
    serve.stop(signal.SIGKILL)
    return 10


def rows(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM usage").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    sim = start_simulator()
    with tempfile.TemporaryDirectory() as tmp:
        serve = Serve(tree, Path(tmp), sim)
        try:
            before, peak = asyncio.run(wrong_key_flood(serve))
            print(f"six 60 MB bodies, wrong key: RSS {before:.0f} MB -> peak {peak:.0f} MB")
            alone, during = asyncio.run(tenant_latency(serve))
            print(f"tenant B's 100 KB call: {alone:.2f} s alone, {during:.2f} s during A's "
                  "20 MB prompt")
        finally:
            serve.stop()
    with tempfile.TemporaryDirectory() as tmp:
        serve = Serve(tree, Path(tmp), sim, flush_interval_ms=60_000)
        answered = asyncio.run(answered_then_killed(serve))
        at_kill = rows(serve.db)
        again = Serve(tree, Path(tmp), sim, flush_interval_ms=60_000)
        again.stop()
        print(f"kill -9 after {answered} answered calls: {at_kill} rows at the kill, "
              f"{rows(serve.db)} after a restart")


if __name__ == "__main__":
    main()
