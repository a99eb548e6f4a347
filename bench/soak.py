"""Soak: mixed traffic in all three dialects through meterproxy, its memory sampled.

    python -m bench.soak [--minutes 10] [--concurrency 8] [--interval 10] [--cut-share 0.05]
                         [--dialects openai,anthropic,gemini] [--out bench/results/soak.json]

A fake provider in this process answers what each call asks for in its `X-Soak-*`
headers (which meterproxy forwards like any other header), in the dialect the call
speaks (OpenAI chat completions, Anthropic messages, Gemini generateContent): JSON
answers (55%), streams of 1 to 2,000 chunks (35%), streams cut mid-way (5%: their usage
is estimated, which loads the tokenizer; `--cut-share 0` gives them to JSON), 500s and
429s in the provider's own error shape (5%). `meterproxy serve` runs as its own process
with metering, pricing, tags, a key budget every call reserves against and the SQLite
log on; its resident memory (VmRSS) is read from /proc every `--interval` seconds.
Reported: RSS at start, after a minute, max and end, and its slope after the first
minute (MB per minute, least squares); at the end the usage log
must hold one row per call. Loopback only; it stops by itself.
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
import statistics
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
DIALECTS = ("openai", "anthropic", "gemini")
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5",
          "gemini": "gemini-2.5-flash"}
RSS_LIMIT_MB = 100.0  # issue 18: RSS < 100 MB over the soak, budgets on
USAGE = {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}
ANTHROPIC_USAGE = {"input_tokens": 120, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0, "output_tokens": 40}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(dialect: str, status: int) -> web.Response:
    """An error in the provider's own shape."""
    headers = {"retry-after": "1"} if status == 429 else None
    if dialect == "anthropic":
        kind = "rate_limit_error" if status == 429 else "api_error"
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": "soak"}}
    elif dialect == "gemini":
        state = "RESOURCE_EXHAUSTED" if status == 429 else "INTERNAL"
        body = {"error": {"code": status, "message": "soak", "status": state}}
    else:
        body = {"error": {"message": "soak", "type": "server_error", "param": None,
                          "code": None}}
    return web.json_response(body, status=status, headers=headers)


def _events(dialect: str, chunks: int) -> tuple[bytes, bytes, bytes]:
    """(head, one content event, tail) of a stream in the dialect's wire format."""
    if dialect == "anthropic":
        def ev(name: str, data: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        head = ev("message_start", {"type": "message_start", "message": {
            "id": "msg_soak", "type": "message", "role": "assistant",
            "model": "claude-haiku-4-5-20251001", "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}}) + ev(
            "content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})
        event = ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": " token"}})
        tail = ev("content_block_stop", {"type": "content_block_stop", "index": 0}) + ev(
            "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                 "stop_sequence": None},
                              "usage": {"output_tokens": 40}}) + ev(
            "message_stop", {"type": "message_stop"})
        return head, event, tail
    if dialect == "gemini":
        def chunk(text: str, usage: dict[str, int], finish: bool = False) -> bytes:
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}],
                                                     "role": "model"}}
            if finish:
                candidate["finishReason"] = "STOP"
            return b"data: " + orjson.dumps({"candidates": [candidate], "usageMetadata": usage,
                                             "modelVersion": "gemini-2.5-flash"}) + b"\r\n\r\n"
        running = {"promptTokenCount": 120, "totalTokenCount": 120}
        return b"", chunk(" token", running), chunk(
            "", {"promptTokenCount": 120, "candidatesTokenCount": 40, "totalTokenCount": 160},
            finish=True)
    head_obj = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini"}
    event = b"data: " + orjson.dumps({**head_obj, "choices": [
        {"index": 0, "delta": {"content": " token"}, "finish_reason": None}]}) + b"\n\n"
    tail = (b"data: " + orjson.dumps({**head_obj, "choices": [], "usage": USAGE})
            + b"\n\ndata: [DONE]\n\n")
    return b"", event, tail


def _answer(dialect: str) -> dict[str, Any]:
    if dialect == "anthropic":
        return {"id": "msg_soak", "type": "message", "role": "assistant",
                "model": "claude-haiku-4-5-20251001",
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": ANTHROPIC_USAGE}
    if dialect == "gemini":
        return {"candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"},
                                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 40,
                                  "totalTokenCount": 160},
                "modelVersion": "gemini-2.5-flash"}
    return {"id": "chatcmpl-soak", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-mini", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}], "usage": USAGE}


def make_provider() -> web.Application:
    """The soak's provider: every dialect's chat endpoint, answering as X-Soak-* say."""
    answers = {d: orjson.dumps(_answer(d)) for d in DIALECTS}

    def handler(dialect: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            status = int(request.headers.get("X-Soak-Status", "200"))
            if status != 200:
                return _error(dialect, status)
            chunks = int(request.headers.get("X-Soak-Chunks", "0"))
            if not chunks:
                return web.Response(body=answers[dialect], content_type="application/json")
            cut = request.headers.get("X-Soak-Cut") == "1"
            head, event, tail = _events(dialect, chunks)
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            if head:
                await out.write(head)
            for i in range(chunks):
                if cut and i == chunks // 2:
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                await out.write(event)
            await out.write(tail)
            await out.write_eof()
            return out
        return handle

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler("openai"))
    app.router.add_post("/v1/messages", handler("anthropic"))
    app.router.add_post("/v1beta/models/{action}", handler("gemini"))
    return app


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request_for(dialect: str, stream: bool) -> tuple[str, bytes, dict[str, str]]:
    """(path under meterproxy, body, auth headers) of a call in `dialect`."""
    text = "soak"
    if dialect == "anthropic":
        body: dict[str, Any] = {"model": MODELS[dialect], "max_tokens": 64,
                                "messages": [{"role": "user", "content": text}]}
        if stream:
            body["stream"] = True
        return ("/anthropic/v1/messages", orjson.dumps(body),
                {"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    if dialect == "gemini":
        action = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return (f"/gemini/v1beta/models/{MODELS[dialect]}:{action}",
                orjson.dumps({"contents": [{"role": "user", "parts": [{"text": text}]}]}),
                {"x-goog-api-key": KEY})
    body = {"model": MODELS[dialect], "messages": [{"role": "user", "content": text}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return "/openai/v1/chat/completions", orjson.dumps(body), {"Authorization": f"Bearer {KEY}"}


async def drive(base: str, deadline: float, concurrency: int, seed: int,
                dialects: list[str], cut_share: float = 0.05) -> dict[str, Any]:
    rng = random.Random(seed)
    counts: dict[str, Any] = {"calls": 0, "json": 0, "stream": 0, "cut": 0, "error": 0,
                              "failed": 0, "by_dialect": {d: 0 for d in dialects}}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            while time.monotonic() < deadline:
                dialect = rng.choice(dialects)
                roll = rng.random()
                headers = {"Content-Type": "application/json",
                           "X-Meter-Customer": f"c{rng.randint(1, 20)}",
                           "X-Meter-Tag-Soak": "1"}
                stream = False
                if roll < 0.60 - cut_share:
                    kind = "json"
                elif roll < 0.95 - cut_share:
                    kind, stream = "stream", True
                    headers["X-Soak-Chunks"] = str(rng.randint(1, 2000))
                elif roll < 0.95:
                    kind, stream = "cut", True
                    headers.update({"X-Soak-Chunks": str(rng.randint(10, 2000)),
                                    "X-Soak-Cut": "1"})
                else:
                    kind = "error"
                    headers["X-Soak-Status"] = rng.choice(("500", "429"))
                path, body, auth = request_for(dialect, stream)
                counts["calls"] += 1
                counts[kind] += 1
                counts["by_dialect"][dialect] += 1
                try:
                    async with session.post(base + path, data=body,
                                            headers={**headers, **auth}) as resp:
                        async for _ in resp.content.iter_any():
                            pass
                except (TimeoutError, aiohttp.ClientError):
                    counts["failed"] += 1  # cut streams end this way, by design

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of RSS against time, MB per minute."""
    if len(samples) < 2:
        return None
    ts = [t / 60 for t, _ in samples]
    mbs = [mb for _, mb in samples]
    mean_t, mean_mb = statistics.fmean(ts), statistics.fmean(mbs)
    var = sum((t - mean_t) ** 2 for t in ts)
    if not var:
        return None
    return round(sum((t - mean_t) * (mb - mean_mb) for t, mb in zip(ts, mbs, strict=True))
                 / var, 3)


def flatness(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """Start, after a minute, max, end and slope of the RSS samples; the verdict."""
    settled = [s for s in samples if s[0] >= 60] or samples
    peak = max(mb for _, mb in samples)
    slope = slope_mb_per_min(settled)
    return {"rss_start_mb": samples[0][1], "rss_after_1min_mb": settled[0][1],
            "rss_max_mb": peak, "rss_end_mb": samples[-1][1],
            "rss_slope_mb_per_min_after_1min": slope,
            "rss_limit_mb": RSS_LIMIT_MB, "rss_under_limit": peak < RSS_LIMIT_MB,
            # flat: less than 1 MB a minute of growth once warm (what a leak would show)
            "rss_flat": slope is not None and slope < 1.0}


async def soak(minutes: float, concurrency: int, interval: float = 10.0,
               dialects: list[str] | None = None, budget: bool = True,
               cut_share: float = 0.05) -> dict[str, Any]:
    dialects = list(dialects or DIALECTS)
    runner = web.AppRunner(make_provider(), access_log=None)
    await runner.setup()
    fake_port, port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", fake_port).start()
    work = Path(tempfile.mkdtemp(prefix="meterproxy-soak-"))
    db = work / "soak.db"
    # As after any restart on an existing log: migrated already, so the serve never loads
    # sqlite_utils (the first start after an upgrade does, once, to run the migrations).
    from proxy.storage.sqlite import migrate
    migrate(db)
    key: dict[str, Any] = {"name": "soak", "tags": {"team": "soak"},
                           "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    if budget:  # never reached; every call reserves and settles against it
        key["budgets"] = [{"period": "month", "limit_usd": 1_000_000}]
    upstream = {"base_url": f"http://127.0.0.1:{fake_port}", "api_key_env": "SOAK_PROVIDER_KEY"}
    (work / "soak.yaml").write_text(yaml.safe_dump({
        "storage": {"usage_log": f"sqlite:///{db}"},
        "providers": {d: dict(upstream) for d in DIALECTS},
        "keys": [key],
        "logging": {"level": "warning"}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(work / "soak.yaml"),
         "--port", str(port)], env={**os.environ, "SOAK_PROVIDER_KEY": "sk-soak"},
        stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as probe:
        for _ in range(600):
            try:
                async with probe.get(f"{base}/healthz") as r:
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
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))

    sampler = asyncio.create_task(sample())
    counts = await drive(base, deadline, concurrency, 11, dialects, cut_share)
    await sampler
    samples.append((round(time.monotonic() - start, 1), round(rss_mb(proc.pid), 1)))
    proc.terminate()
    proc.wait(60)
    await runner.cleanup()
    conn = sqlite3.connect(db)
    by_provider = dict(conn.execute("SELECT provider, count(*) FROM usage GROUP BY provider"))
    conn.close()
    return {"minutes": minutes, "concurrency": concurrency, "interval_s": interval,
            "dialects": dialects, "budget": budget, "cut_share": cut_share, "counts": counts,
            "rows": sum(by_provider.values()), "rows_by_dialect": by_provider,
            "rss_samples_mb": samples, **flatness(samples)}


def markdown(result: dict[str, Any]) -> str:
    """The soak's table for docs/performance.md."""
    c = result["counts"]
    src = result.get("source") or {}
    m = result.get("machine") or {}
    slope = result.get("rss_slope_mb_per_min_after_1min")
    share = result.get("cut_share", 0.05)
    cuts = "" if share == 0.05 else f" --cut-share {share:g}"
    verdict = ("yes" if result.get("rss_under_limit") else "**no**") + (
        ", flat" if result.get("rss_flat") else ", **not flat**")
    return "\n".join([
        f"`python -m bench.soak --minutes {result['minutes']:g}{cuts}`, commit "
        f"{src.get('commit', '?')}, {result.get('started_utc', '')}: "
        f"{', '.join(result.get('dialects', ['openai']))} at random, concurrency "
        f"{result['concurrency']}, key budget {'on' if result.get('budget') else 'off'}; RSS "
        f"every {result.get('interval_s', 10):g} s. Load average before "
        f"{' / '.join(map(str, m.get('loadavg_before', [])))}.",
        "",
        "| calls | JSON | streams | cut streams | errors | usage rows | RSS start MB "
        "| after 1 min | max | end | slope after 1 min MB/min | < 100 MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {c['calls']:,} | {c['json']:,} | {c['stream']:,} | {c['cut']:,} | {c['error']:,} "
        f"| {result['rows']:,} | {result['rss_start_mb']} | {result['rss_after_1min_mb']} "
        f"| {result['rss_max_mb']} | {result['rss_end_mb']} | "
        f"{'—' if slope is None else f'{slope:+.2f}'} | {verdict} |",
        "",
        "Rows by dialect: " + ", ".join(f"{d} {n:,} of {c['by_dialect'].get(d, 0):,} calls"
                                        for d, n in sorted(result["rows_by_dialect"].items()))
        + ".", ""])


def main(argv: list[str] | None = None) -> int:
    from bench.loadgen import machine, source

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--dialects", default=",".join(DIALECTS))
    parser.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                        help="a key budget every call reserves against (default: on)")
    parser.add_argument("--cut-share", type=float, default=0.05,
                        help="share of streams cut mid-way (their usage is estimated, which "
                             "loads the tokenizer); 0 gives their share to JSON answers")
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args(argv)
    if not 0 <= args.cut_share <= 0.35:
        parser.error("--cut-share takes 0 to 0.35")
    dialects = [d.strip() for d in args.dialects.split(",") if d.strip()]
    if not dialects or set(dialects) - set(DIALECTS):
        parser.error(f"--dialects takes {', '.join(DIALECTS)}")
    host = machine()
    started_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = asyncio.run(soak(args.minutes, args.concurrency, args.interval, dialects,
                              args.budget, args.cut_share))
    result = {"machine": host, "source": source(), "started_utc": started_utc, **result}
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print("RSS (s, MB):", " ".join(f"{t:g}:{mb:g}" for t, mb in result["rss_samples_mb"]))
    return 0 if result["rows"] == result["counts"]["calls"] else 1


if __name__ == "__main__":
    sys.exit(main())
