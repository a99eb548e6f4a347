"""`meterproxy demo`: a simulated provider, the proxy and some traffic, then the report.

Everything runs in this process on free loopback ports with a throwaway usage log, so a
newcomer sees metering, attribution and pricing in seconds without any API key.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import tempfile
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from proxy import money, query
from proxy.app import serve
from proxy.config import parse_settings
from proxy.logs import configure
from proxy.output import render
from proxy.runtime import key_digest
from proxy.simulator import Simulator
from proxy.storage.readers import open_reader

CUSTOMERS = ("acme", "globex")
FEATURES = ("search", "summarise", "chat")
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-nano")
DEMO_KEY = "mp-demo-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHOWN = ("calls", "input_tokens", "output_tokens", "cost_usd")


def _report(rows: list[dict], groups: list[str]) -> str:
    return render([{k: r[k] for k in (*groups, *SHOWN)} for r in rows], "table")


def run_demo(calls: int = 36, keep: bool = False) -> int:
    configure("warning")
    workdir = Path(tempfile.mkdtemp(prefix="meterproxy-demo-"))
    db = workdir / "demo.db"
    asyncio.run(_demo(db, calls))
    with open_reader(f"sqlite:///{db}") as log:
        print("\nSpend by customer and feature:")
        groups = ["customer", "feature"]
        print(_report(log.usage(query.UsageQuery(group_by=groups)), groups))
        print("\nSpend by model:")
        groups = ["provider", "model"]
        print(_report(log.usage(query.UsageQuery(group_by=groups)), groups))
        total = log.usage(query.UsageQuery())[0]
        print(f"\n{total['calls']} calls, {money.usd(total['cost_usd'])} in all, every one priced "
              "from the bundled tables and attributed from X-Meter-* headers.")
    if keep:
        print(f"\nThe demo's usage log: {db}\n  try: meterproxy usage --group-by "
              f"customer,model (with storage.usage_log: sqlite:///{db})")
    else:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
    return 0


async def _demo(db: Path, calls: int) -> None:
    sim = Simulator()
    sim_runner = web.AppRunner(sim.app(), access_log=None)
    await sim_runner.setup()
    sim_port, port = _free_port(), _free_port()
    await web.TCPSite(sim_runner, "127.0.0.1", sim_port).start()
    os.environ.setdefault("METERPROXY_DEMO_PROVIDER_KEY", "sk-demo-not-a-real-key")
    settings = parse_settings({
        "storage": {"usage_log": f"sqlite:///{db}", "flush_interval_ms": 50},
        "providers": {"openai": {"base_url": f"http://127.0.0.1:{sim_port}",
                                 "api_key_env": "METERPROXY_DEMO_PROVIDER_KEY"}},
        "keys": [{"name": "demo", "key_sha256": key_digest(DEMO_KEY)}],
    }, "<demo>")
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve(settings, "127.0.0.1", port, ready=ready, stop=stop))
    await ready.wait()
    print(f"simulated provider on :{sim_port}, meterproxy on :{port}; driving {calls} calls")
    rng = random.Random(7)
    base = f"http://127.0.0.1:{port}/openai/v1"
    async with aiohttp.ClientSession() as session:
        for i in range(calls):
            stream = i % 3 == 0
            body = {"model": rng.choice(MODELS), "stream": stream, "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question {i}: " + " ".join(
                    rng.choice(("cost", "tokens", "budget", "invoice", "model", "latency"))
                    for _ in range(rng.randint(5, 60)))}]}
            headers = {"Authorization": f"Bearer {DEMO_KEY}",
                       "Content-Type": "application/json",
                       "X-Meter-Customer": CUSTOMERS[i % 2],
                       "X-Meter-Feature": FEATURES[i % 3 if i % 5 else 0],
                       "X-Meter-Trace-Id": f"trace-{i // 4}"}
            async with session.post(f"{base}/chat/completions", data=orjson.dumps(body),
                                    headers=headers) as resp:
                await resp.read()
    stop.set()
    await server
    await sim_runner.cleanup()
