"""Soak: mixed traffic through meterproxy for minutes, its memory sampled every 10 s.

    python -m bench.soak [--minutes 10] [--concurrency 8] [--out bench/results/soak.json]

A fake provider in this process answers what each call asks for in its `X-Soak-*`
headers (which meterproxy forwards like any other header): JSON answers, streams of 1 to
2,000 chunks, streams cut mid-way, 500s and 429s. `meterproxy serve` runs as its own
process with metering, pricing, tags and the SQLite log on; its resident memory (VmRSS)
is read from /proc every 10 s. At the end the usage log must hold one row per call.
Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

KEY = "mp-soak-key"
USAGE = {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def provider(request: web.Request) -> web.StreamResponse:
    """Answer as the X-Soak-* headers say."""
    await request.read()
    status = int(request.headers.get("X-Soak-Status", "200"))
    if status != 200:
        return web.json_response({"error": {"message": "soak", "type": "server_error",
                                             "param": None, "code": None}}, status=status,
                                 headers={"retry-after": "1"} if status == 429 else None)
    chunks = int(request.headers.get("X-Soak-Chunks", "0"))
    head = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini"}
    if not chunks:
        return web.json_response({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"},
             "finish_reason": "stop"}], "usage": USAGE})
    cut = request.headers.get("X-Soak-Cut") == "1"
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    event = b"data: " + orjson.dumps({**head, "choices": [
        {"index": 0, "delta": {"content": " token"}, "finish_reason": None}]}) + b"\n\n"
    for i in range(chunks):
        if cut and i == chunks // 2:
            if request.transport is not None:
                request.transport.abort()
            return out
        await out.write(event)
    await out.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": USAGE})
                    + b"\n\ndata: [DONE]\n\n")
    await out.write_eof()
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, deadline: float, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"calls": 0, "json": 0, "stream": 0, "cut": 0, "error": 0, "failed": 0}
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                "content": "soak"}]})
    stream_body = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                                "messages": [{"role": "user", "content": "soak"}]})
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            while time.monotonic() < deadline:
                roll = rng.random()
                headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                           "X-Meter-Customer": f"c{rng.randint(1, 20)}",
                           "X-Meter-Tag-Soak": "1"}
                data = body
                if roll < 0.55:
                    kind = "json"
                elif roll < 0.90:
                    kind, data = "stream", stream_body
                    headers["X-Soak-Chunks"] = str(rng.randint(1, 2000))
                elif roll < 0.95:
                    kind, data = "cut", stream_body
                    headers.update({"X-Soak-Chunks": str(rng.randint(10, 2000)),
                                    "X-Soak-Cut": "1"})
                else:
                    kind = "error"
                    headers["X-Soak-Status"] = rng.choice(("500", "429"))
                counts["calls"] += 1
                counts[kind] += 1
                try:
                    async with session.post(url, data=data, headers=headers) as resp:
                        async for _ in resp.content.iter_any():
                            pass
                except (TimeoutError, aiohttp.ClientError):
                    counts["failed"] += 1  # cut streams end this way, by design

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def soak(minutes: float, concurrency: int) -> dict[str, Any]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    fake_port, port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", fake_port).start()
    work = Path(tempfile.mkdtemp(prefix="meterproxy-soak-"))
    db = work / "soak.db"
    (work / "soak.yaml").write_text(yaml.safe_dump({
        "storage": {"usage_log": f"sqlite:///{db}"},
        "providers": {"openai": {"base_url": f"http://127.0.0.1:{fake_port}",
                                 "api_key_env": "SOAK_PROVIDER_KEY"}},
        "keys": [{"name": "soak", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "logging": {"level": "warning"}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(work / "soak.yaml"),
         "--port", str(port)], env={**os.environ, "SOAK_PROVIDER_KEY": "sk-soak"},
        stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
    async with aiohttp.ClientSession() as probe:
        for _ in range(200):
            try:
                async with probe.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    deadline = start + minutes * 60

    async def sample() -> None:
        while time.monotonic() < deadline:
            samples.append((round(time.monotonic() - start, 1), round(rss_mb(proc.pid), 1)))
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    counts = await drive(url, deadline, concurrency, seed=11)
    await sampler
    samples.append((round(time.monotonic() - start, 1), round(rss_mb(proc.pid), 1)))
    proc.terminate()
    proc.wait(60)
    await runner.cleanup()
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM usage").fetchone()[0]
    settled = [mb for t, mb in samples if t >= 60] or [mb for _, mb in samples]
    return {"minutes": minutes, "concurrency": concurrency, "counts": counts, "rows": rows,
            "rss_samples_mb": samples, "rss_max_mb": max(mb for _, mb in samples),
            "rss_after_1min_first_mb": settled[0], "rss_last_mb": settled[-1],
            "rss_growth_after_1min_mb": round(settled[-1] - settled[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    result = asyncio.run(soak(args.minutes, args.concurrency))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples_mb"}, indent=2))
    print("RSS (s, MB):", " ".join(f"{t:g}:{mb:g}" for t, mb in result["rss_samples_mb"]))


if __name__ == "__main__":
    main()
