"""Where a metered call's CPU goes, per dialect and mode: cProfile on the proxy under load.

Starts a canned upstream (OpenAI, Anthropic and Gemini answers built once, JSON and
streams of 20 content events, each with the provider's usage) and, per dialect and mode,
`meterproxy serve` with everything on (a virtual key with a month budget and a tag,
attribution headers, pricing, the SQLite usage log, JSON log lines) under cProfile.
After a warm-up the profiler runs for `--calls` calls at `--concurrency`; then each
metering step's share of the event loop's profiled time is printed, with the CPU the
process's other threads (usage-log writer, tokenizer pool) took beside it.

cProfile slows small Python functions more than C code, so shares are indicative of
where the time goes, not exact; the box is shared, so only shares are reported.

    python -m bench.profile [--calls 3000] [--concurrency 8] [--dialects openai,anthropic,gemini]
        [--modes json,stream] [--top 0] [--markdown]
    python -m bench.profile --rss [--calls 2000] [--rounds 3]   # resident set, budgets on
    python -m bench.profile --compare-loops [--uvloop-path DIR]   # CPU/call, asyncio vs uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import os
import pstats
import signal
import socket
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

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KEY = "mp-profile-virtual-key-0001"
PROVIDER_KEY_ENV = "METERPROXY_PROFILE_PROVIDER_KEY"
PIECES = [f" word{i}" for i in range(20)]
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5",
          "gemini": "gemini-2.5-flash"}

# Metering steps: (label, file suffix, function). A step's time is the function's
# cumulative time in the proxy's event-loop thread.
STEPS = [
    ("route", "stages/route.py", "route"),
    ("authenticate", "stages/authenticate.py", "authenticate"),
    ("read_body + JSON", "stages/route.py", "read_body"),
    ("attribute", "stages/attribute.py", "attribute"),
    ("inspect (dialect describe)", "stages/route.py", "inspect"),
    ("reserve (budgets, estimate)", "stages/reserve.py", "reserve"),
    ("journal began", "stages/record.py", "began"),
    ("forward (aiohttp client; the pass-through pays it too)", "stages/forward.py", "forward"),
    ("stream meter feed", "dialects/{dialect}.py", "feed"),
    ("stream meter finish", "dialects/{dialect}.py", "finish"),
    ("read_usage (JSON body)", "dialects/{dialect}.py", "read_usage"),
    ("price (lookup + Decimal cost)", "stages/record.py", "price"),
    ("row_of (usage row)", "stages/record.py", "row_of"),
    ("writer.submit", "storage/writer.py", "submit"),
    ("metrics.observe", "proxy/metrics.py", "observe"),
    ("budgets.settle", "proxy/budgets.py", "settle"),
    ("log line (structlog + write)", "structlog/_native.py", "meth"),
]
WHOLE = ("stages/record.py", "_write")  # record's part, for the record total
# Subtotals, not steps: the record stage is the row, metrics, settle and log-line steps.
RECORD = "subtotal: record (row, submit, metrics, settle, log line)"
HANDLE = "total: pipeline.handle (all stages)"


# --- the canned upstream --------------------------------------------------------------------

def _sse(events: list[tuple[str | None, dict[str, Any]]]) -> bytes:
    out = b""
    for name, obj in events:
        out += (f"event: {name}\n".encode() if name else b"") + b"data: " + orjson.dumps(
            obj) + b"\n\n"
    return out


def answers() -> dict[tuple[str, bool], bytes]:
    """The upstream's bodies by (dialect, stream)."""
    text = "".join(PIECES)
    oa_usage = {"prompt_tokens": 31, "completion_tokens": 20, "total_tokens": 51,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0}}
    head = {"id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini-2024-07-18"}
    oa_stream = [(None, {**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""}}]})]
    oa_stream += [(None, {**head, "choices": [{"index": 0, "delta": {"content": p}}]})
                  for p in PIECES]
    oa_stream += [(None, {**head, "choices": [{"index": 0, "delta": {},
                                               "finish_reason": "stop"}]}),
                  (None, {**head, "choices": [], "usage": oa_usage})]
    an_usage = {"input_tokens": 31, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, "output_tokens": 20}
    message = {"id": "msg_p", "type": "message", "role": "assistant",
               "model": "claude-haiku-4-5-20251001", "stop_reason": None, "content": []}
    an_stream = [("message_start", {"type": "message_start", "message": {
        **message, "usage": {**an_usage, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"})]
    an_stream += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": p}})
                  for p in PIECES]
    an_stream += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                  ("message_delta", {"type": "message_delta", "delta": {
                      "stop_reason": "end_turn"}, "usage": {"output_tokens": 20}}),
                  ("message_stop", {"type": "message_stop"})]

    def gm(out: int) -> dict[str, Any]:
        return {"promptTokenCount": 31, "candidatesTokenCount": out,
                "totalTokenCount": 31 + out,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 31}]}

    def chunk(piece: str, out: int, finish: bool = False) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"},
                                     "index": 0}
        if finish:
            candidate["finishReason"] = "STOP"
        return {"candidates": [candidate], "usageMetadata": gm(out),
                "modelVersion": "gemini-2.5-flash", "responseId": "resp-p"}

    ge_stream = [(None, chunk(p, i + 1, i == len(PIECES) - 1)) for i, p in enumerate(PIECES)]
    return {
        ("openai", False): orjson.dumps({
            "id": "chatcmpl-p", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-mini-2024-07-18", "usage": oa_usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}),
        ("openai", True): _sse(oa_stream) + b"data: [DONE]\n\n",
        ("anthropic", False): orjson.dumps({**message, "stop_reason": "end_turn",
                                            "content": [{"type": "text", "text": text}],
                                            "usage": an_usage}),
        ("anthropic", True): _sse(an_stream),
        ("gemini", False): orjson.dumps(chunk(text, 20, True)),
        ("gemini", True): _sse(ge_stream),
    }


def upstream_app() -> web.Application:
    bodies = answers()

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        path = request.path
        dialect = ("anthropic" if path.endswith("/messages") else
                   "gemini" if ":" in path else "openai")
        stream = path.endswith(":streamGenerateContent") or (
            dialect != "gemini" and b'"stream":true' in await request.read())
        body = bodies[(dialect, stream)]
        if not stream:
            return web.Response(body=body, content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for event in body.split(b"\n\n")[:-1]:  # one write per event, as providers send
            await out.write(event + b"\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", answer)
    return app


# --- the proxy under cProfile ---------------------------------------------------------------

def run_proxy(config: str, stats: str) -> None:
    """`serve` with a profiler that SIGUSR1 starts and SIGTERM stops (stats to `stats`)."""
    from proxy.app import serve
    from proxy.config import load_settings
    from proxy.logs import configure

    settings = load_settings(config)
    configure(settings.logging.level, settings.logging.format)
    # CPU time of the event-loop thread, not wall time: waits (epoll, the GIL while a
    # pool thread tokenizes) are not the loop's work.
    profiler = cProfile.Profile(time.thread_time)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, profiler.enable)
        await serve(settings, settings.server.host, settings.server.port)

    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    profiler.disable()
    profiler.dump_stats(stats)
    if os.environ.get("METERPROXY_PROFILE_KEEP"):
        profiler.dump_stats(os.environ["METERPROXY_PROFILE_KEEP"])


# --- the driver -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening")


def request_for(dialect: str, stream: bool, port: int) -> tuple[str, bytes, dict[str, str]]:
    base = f"http://{HOST}:{port}"
    attribution = {"X-Meter-Customer": "acme", "X-Meter-Feature": "profile",
                   "X-Meter-Tag-Env": "bench", "Content-Type": "application/json"}
    messages = [{"role": "user", "content": "Say hello to the profiler."}]
    if dialect == "openai":
        body: dict[str, Any] = {"model": MODELS[dialect], "messages": messages,
                                "max_tokens": 64}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return (f"{base}/openai/v1/chat/completions", orjson.dumps(body),
                {"Authorization": f"Bearer {KEY}", **attribution})
    if dialect == "anthropic":
        body = {"model": MODELS[dialect], "messages": messages, "max_tokens": 64,
                "stream": stream}
        return (f"{base}/anthropic/v1/messages", orjson.dumps(body),
                {"x-api-key": KEY, "anthropic-version": "2023-06-01", **attribution})
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": messages[0]["content"]}]}],
            "generationConfig": {"maxOutputTokens": 64}}
    return (f"{base}/gemini/v1beta/models/{MODELS[dialect]}:{action}", orjson.dumps(body),
            {"x-goog-api-key": KEY, **attribution})


async def drive(url: str, body: bytes, headers: dict[str, str], calls: int,
                concurrency: int) -> int:
    """`calls` calls at `concurrency`; returns how many failed."""
    failed = 0
    left = calls
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            nonlocal failed, left
            while left > 0:
                left -= 1
                async with s.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    failed += resp.status != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


def config_for(tmp: Path, port: int, upstream: int) -> Path:
    key = {"name": "profile", "tags": {"team": "bench"},
           "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
           "budgets": [{"period": "month", "limit_usd": 1_000_000}]}
    base = f"http://{HOST}:{upstream}"
    config = {"server": {"host": HOST, "port": port},
              "storage": {"usage_log": f"sqlite:///{tmp / 'usage.db'}"},
              "providers": {name: {"base_url": base, "api_key_env": PROVIDER_KEY_ENV}
                            for name in MODELS},
              "keys": [key], "logging": {"level": "info", "format": "json"}}
    path = tmp / "meterproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread name (Linux /proc), main thread as 'event loop'."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            label = "event loop" if task.name == str(pid) else name
            out[label] = out.get(label, 0.0) + seconds
    return out


def profile_one(tmp: Path, upstream: int, dialect: str, mode: str,
                args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    run = tmp / f"{dialect}-{mode}"
    run.mkdir()
    config = config_for(run, port, upstream)
    stats = run / "proxy.prof"
    env = {**os.environ, PROVIDER_KEY_ENV: "sk-profile",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    with (run / "proxy.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.profile", "--proxy",
                                 str(config), "--stats", str(stats)], cwd=ROOT, env=env,
                                stdout=log, stderr=log)
    try:
        wait_port(port, proc)
        url, body, headers = request_for(dialect, mode == "stream", port)
        failed = asyncio.run(drive(url, body, headers, args.warmup, args.concurrency))
        if failed:
            raise RuntimeError(f"{dialect} {mode}: {failed} warm-up calls failed; "
                               f"see {run / 'proxy.log'}")
        before = thread_cpu(proc.pid)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        failed = asyncio.run(drive(url, body, headers, args.calls, args.concurrency))
        time.sleep(0.6)  # the writer's last flush belongs to these calls
        after = thread_cpu(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    threads = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    return {"dialect": dialect, "mode": mode, "failed": failed,
            "shares": shares(pstats.Stats(str(stats)), dialect), "threads": threads,
            "stats": stats}


def measure_rss(tmp: Path, upstream: int, args: argparse.Namespace) -> None:
    """RSS of one `serve` with budgets on after `--calls` calls of every dialect and mode."""
    port = free_port()
    run = tmp / "rss"
    run.mkdir()
    config = config_for(run, port, upstream)
    # A soak runs on a log already migrated: the serve then never loads sqlite_utils (the
    # first start after an upgrade does, once, to run the pending migrations).
    from proxy.storage.sqlite import migrate
    migrate(run / "usage.db")
    env = {**os.environ, PROVIDER_KEY_ENV: "sk-profile",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    with (run / "proxy.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config",
                                 str(config)], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        wait_port(port, proc)
        ready = rss_mb(proc.pid)
        for rnd in range(args.rounds):
            for dialect in args.dialects.split(","):
                for mode in args.modes.split(","):
                    url, body, headers = request_for(dialect, mode == "stream", port)
                    failed = asyncio.run(drive(url, body, headers, args.calls,
                                               args.concurrency))
                    if failed:
                        raise RuntimeError(f"{dialect} {mode}: {failed} calls failed")
            print(f"RSS after round {rnd + 1} ({args.calls} calls per dialect and mode): "
                  f"{rss_mb(proc.pid):.1f} MB (at start {ready:.1f} MB)", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def compare_loops(tmp: Path, upstream: int, args: argparse.Namespace) -> None:
    """CPU per call of two `serve` processes, asyncio's loop against uvloop, driven in
    alternation (A B A B ...) with the same calls: the ratio per round, then its median."""
    env = {**os.environ, PROVIDER_KEY_ENV: "sk-profile",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), args.uvloop_path,
                                                       os.environ.get("PYTHONPATH")]))}
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    for name in ("asyncio", "uvloop"):
        port = free_port()
        run = tmp / name
        run.mkdir()
        config = config_for(run, port, upstream)
        with (run / "proxy.log").open("wb") as log:
            procs[name] = (subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)], cwd=ROOT,
                env={**env, "METERPROXY_EVENT_LOOP": name}, stdout=log, stderr=log), port)
    try:
        for proc, port in procs.values():
            wait_port(port, proc)
        for dialect in args.dialects.split(","):
            for mode in args.modes.split(","):
                ratios = []
                per_call: dict[str, list[float]] = {"asyncio": [], "uvloop": []}
                for rnd in range(args.rounds + 1):  # round 0 warms up
                    for name, (proc, port) in procs.items():
                        url, body, headers = request_for(dialect, mode == "stream", port)
                        before = sum(thread_cpu(proc.pid).values())
                        failed = asyncio.run(drive(url, body, headers, args.calls,
                                                   args.concurrency))
                        time.sleep(0.3)  # the writer's flush belongs to these calls
                        spent = sum(thread_cpu(proc.pid).values()) - before
                        if failed:
                            raise RuntimeError(f"{name} {dialect} {mode}: {failed} failed")
                        if rnd:
                            per_call[name].append(1000 * spent / args.calls)
                    if rnd:
                        ratios.append(per_call["uvloop"][-1] / per_call["asyncio"][-1])
                print(f"{dialect:9s} {mode:6s} CPU ms/call asyncio "
                      f"{statistics.median(per_call['asyncio']):.3f}, uvloop "
                      f"{statistics.median(per_call['uvloop']):.3f}; uvloop/asyncio median "
                      f"{statistics.median(ratios):.2f} (rounds: "
                      f"{', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE") / 2**20


def shares(stats: pstats.Stats, dialect: str) -> list[tuple[str, float]]:
    """Each step's cumulative time as a fraction of the profiled event-loop time."""
    table = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in table.items():
        for label, suffix, name in STEPS:
            if func == name and path.endswith(suffix.format(dialect=dialect)):
                found[label] = found.get(label, 0.0) + ct
        if func == WHOLE[1] and path.endswith(WHOLE[0]):
            found[RECORD] = found.get(RECORD, 0.0) + ct
        if func == "handle" and path.endswith("proxy/pipeline.py"):
            found[HANDLE] = ct
    return [(label, found[label] / total) for label, _, _ in STEPS if label in found] + [
        (label, found[label] / total) for label in (RECORD,
                                                    HANDLE)
        if label in found]


def report(results: list[dict[str, Any]], markdown: bool, top: int) -> None:
    for r in results:
        cpu = r["threads"]
        total = sum(cpu.values()) or 1.0
        others = ", ".join(f"{name} {100 * s / total:.0f}%" for name, s in
                           sorted(cpu.items(), key=lambda kv: -kv[1]) if s > 0)
        title = f"{r['dialect']} {r['mode']}"
        if markdown:
            print(f"\n**{title}** (process CPU by thread: {others})\n")
            print("| step | share of the event loop's profiled time |\n|---|---:|")
            for label, share in r["shares"]:
                print(f"| {label} | {100 * share:.1f}% |")
        else:
            print(f"\n== {title}  ({r['failed']} failed; CPU by thread: {others})")
            for label, share in r["shares"]:
                print(f"  {100 * share:5.1f}%  {label}")
        if top:
            stats = pstats.Stats(str(r["stats"]))
            stats.sort_stats("cumulative").print_stats(top)
            stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dialects", default="openai,anthropic,gemini")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--top", type=int, default=0, help="also print the top N functions")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rss", action="store_true",
                        help="instead: RSS of one serve (budgets on) after --calls calls of "
                             "every dialect and mode, for --rounds rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-loops", action="store_true",
                        help="instead: CPU per call with asyncio's loop and with uvloop, "
                             "paired round by round")
    parser.add_argument("--uvloop-path", default="",
                        help="a directory to import uvloop from (pip install --target)")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        web.run_app(upstream_app(), host=HOST, port=args.upstream, access_log=None, print=None)
        return
    if args.proxy:
        run_proxy(args.proxy, args.stats)
        return
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.profile", "--upstream",
                                 str(upstream_port)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = []
    try:
        wait_port(upstream_port, upstream)
        with tempfile.TemporaryDirectory(prefix="meterproxy-profile-") as tmp:
            if args.rss:
                measure_rss(Path(tmp), upstream_port, args)
                return
            if args.compare_loops:
                compare_loops(Path(tmp), upstream_port, args)
                return
            for dialect in args.dialects.split(","):
                for mode in args.modes.split(","):
                    results.append(profile_one(Path(tmp), upstream_port, dialect, mode, args))
            report(results, args.markdown, args.top)
    finally:
        upstream.terminate()
        upstream.wait(30)


if __name__ == "__main__":
    main()
