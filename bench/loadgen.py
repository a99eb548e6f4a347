"""The load benchmark: meterproxy against a bare pass-through, measured in one run.

Starts, each in its own process on loopback: a fake provider that answers at once in the
three wire formats (bench.fakeprovider), a bare aiohttp pass-through (bench.passthrough),
meterproxy with everything on (virtual key, attribution headers and tags, a key budget,
pricing, SQLite usage log, JSON logs) and the LiteLLM proxy (from its own venv, made by
bench/litellm_venv.sh). Then the same workload runs direct and through each, interleaved
in rounds (A B C D A B C D ...), for each dialect (OpenAI chat completions, Anthropic
messages, Gemini generateContent), as JSON calls and as streams, at each concurrency.
Reported: medians over rounds, and ratios against the bare pass-through paired round by
round, judged against the targets of issue 18. Absolute figures on a shared box are
noise; the ratios are the result, and the CPU other processes took during each cell says
how far to trust them.

    python -m bench.loadgen [--dialects openai,anthropic,gemini] [--duration 1.75]
                            [--rounds 3] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.fakeprovider import new_loop

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
VIRTUAL_KEY = "mp-bench-virtual-key-0001"
PROVIDER_KEY = "sk-bench-provider-key"
PROVIDER_KEY_ENV = "METERPROXY_BENCH_PROVIDER_KEY"
MODES = ("json", "stream")
DIRECT, PASSTHROUGH, METERPROXY, LITELLM = "direct", "passthrough", "meterproxy", "litellm"
DONE = b"data: [DONE]\n\n"
# The targets of issue 18 (issue 8's, now for every dialect).
MIN_THROUGHPUT_RATIO = 0.80          # x the pass-through's req/s at these concurrencies
THROUGHPUT_CONCURRENCIES = (8, 32)
MAX_CPU_RATIO = 1.25                 # x the pass-through's CPU per call, every cell
MAX_ADDED_P50_MS = 0.2               # at concurrency 1
MAX_ADDED_TTFB_MS = 0.2              # streams, at concurrency 1
LITELLM_VENV = Path(os.environ.get("METERPROXY_LITELLM_VENV") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "meterproxy" / "litellm-proxy-venv")


# --- the dialects -----------------------------------------------------------------------------

SYSTEM = "You answer in one short sentence."
PROMPT = "Say hello to the benchmark."


@dataclass(frozen=True)
class Dialect:
    """One provider wire format: where calls go, what they send, how a stream ends."""

    name: str
    title: str
    model: str
    stream_end: bytes  # found in the last bytes of every complete stream (any target)

    def path(self, mode: str) -> str:
        """The provider's path (the pass-through's and LiteLLM's too)."""
        if self.name == "anthropic":
            return "/v1/messages"
        if self.name == "gemini":
            action = "streamGenerateContent?alt=sse" if mode == "stream" else "generateContent"
            return f"/v1beta/models/{self.model}:{action}"
        return "/v1/chat/completions"

    def body(self, mode: str) -> bytes:
        stream = mode == "stream"
        if self.name == "anthropic":
            body: dict[str, Any] = {"model": self.model, "max_tokens": 64, "system": SYSTEM,
                                    "messages": [{"role": "user", "content": PROMPT}]}
            if stream:
                body["stream"] = True
        elif self.name == "gemini":
            body = {"systemInstruction": {"parts": [{"text": SYSTEM}]},
                    "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
                    "generationConfig": {"maxOutputTokens": 64}}
        else:
            body = {"model": self.model,
                    "messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": PROMPT}],
                    "max_tokens": 64}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
        return orjson.dumps(body)

    def headers(self, mode: str) -> list[dict[str, str]]:
        """Headers for successive calls: the virtual key in the dialect's own header, and
        attribution for 8 customers."""
        if self.name == "anthropic":
            auth = {"x-api-key": VIRTUAL_KEY, "anthropic-version": "2023-06-01"}
        elif self.name == "gemini":
            auth = {"x-goog-api-key": VIRTUAL_KEY}
        else:
            auth = {"Authorization": f"Bearer {VIRTUAL_KEY}"}
        return [{**auth, "Content-Type": "application/json",
                 "X-Meter-Customer": f"customer-{i}", "X-Meter-Feature": f"bench-{mode}",
                 "X-Meter-Tag-Env": "bench"} for i in range(8)]


DIALECTS = {
    "openai": Dialect("openai", "OpenAI chat completions", "gpt-4o-mini", b"[DONE]"),
    "anthropic": Dialect("anthropic", "Anthropic messages", "claude-haiku-4-5",
                         b"message_stop"),
    "gemini": Dialect("gemini", "Gemini generateContent", "gemini-2.5-flash",
                      b"finishReason"),
}
OPENAI = DIALECTS["openai"]


# --- processes ------------------------------------------------------------------------------

def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ProcessMeter:
    """CPU seconds and resident memory of one process and its children (psutil, else /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            import psutil
        except ImportError:
            self._ps = None
        else:
            self._ps = psutil.Process(pid)

    def _family(self) -> list[Any]:
        assert self._ps is not None
        family = [self._ps]
        with contextlib.suppress(Exception):
            family += self._ps.children(recursive=True)
        return family

    def cpu_s(self) -> float:
        if self._ps is None:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        total = 0.0
        for proc in self._family():
            with contextlib.suppress(Exception):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        if self._ps is None:
            pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        total = 0
        for proc in self._family():
            with contextlib.suppress(Exception):
                total += proc.memory_info().rss
        return total / 2**20


def machine_busy_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (/proc/stat), if known."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@dataclass
class Service:
    """A server in its own process on a loopback port; its output goes to a log file."""

    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    meter: ProcessMeter | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.meter = ProcessMeter(self.proc.pid)

    def wait_ready(self, timeout: float) -> None:
        """Return once the port accepts connections; raise if the process dies or stalls."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening after {timeout:g} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Target:
    """Where the load goes: a base URL and the proxy process serving it (None when direct).

    `url` is the full URL of the OpenAI chat endpoint (what bench.scale drives); `base`
    and `prefix` give every dialect's: meterproxy routes by a provider prefix (/openai),
    the others take the provider's own paths."""

    name: str
    url: str
    service: Service | None = None
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    sent: int = 0
    base: str = ""
    prefix: bool = False
    sent_by_dialect: dict[str, int] = field(default_factory=dict)

    def url_for(self, dialect: Dialect, mode: str) -> str:
        if not self.base:
            return self.url
        return self.base + (f"/{dialect.name}" if self.prefix else "") + dialect.path(mode)

    def count(self, dialect: Dialect, calls: int) -> None:
        self.sent += calls
        self.sent_by_dialect[dialect.name] = self.sent_by_dialect.get(dialect.name, 0) + calls


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def meterproxy_service(tmp: Path, provider_port: int, budget: bool = False,
                       otel: bool = False) -> tuple[Service, Path]:
    """meterproxy with everything on, and the path of its usage log."""
    port = free_port()
    db = tmp / "usage.db"
    key: dict[str, Any] = {"name": "bench", "tags": {"team": "bench"},
                           "key_sha256": hashlib.sha256(VIRTUAL_KEY.encode()).hexdigest()}
    if budget:  # never reached, but every call reserves and settles against it
        key["budgets"] = [{"period": "month", "limit_usd": 1_000_000}]
    upstream = {"base_url": f"http://{HOST}:{provider_port}", "api_key_env": PROVIDER_KEY_ENV}
    config = {
        "server": {"host": HOST, "port": port},
        "storage": {"usage_log": f"sqlite:///{db}"},
        "providers": {name: dict(upstream) for name in DIALECTS},
        "keys": [key],
        "logging": {"level": "info", "format": "json"},
    }
    if otel:  # spans and metrics to the fake provider's OTLP sink, which answers 200
        config["telemetry"] = {"otlp_endpoint": f"http://{HOST}:{provider_port}"}
    path = tmp / "meterproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    service = Service(METERPROXY, python_module("proxy.cli", "serve", "--config", str(path)),
                      port, tmp / "meterproxy.log", env={PROVIDER_KEY_ENV: PROVIDER_KEY})
    return service, db


def litellm_service(tmp: Path, provider_port: int, python: str = sys.executable) -> Service:
    """The LiteLLM proxy with each dialect's model routed to the fake provider (no database).

    `api_base` per model: OpenAI's client appends /chat/completions to .../v1, Anthropic's
    /v1/messages to the bare host, Gemini's /models/{model}:{action} to .../v1beta."""
    port = free_port()
    base = f"http://{HOST}:{provider_port}"
    routes = {"openai": ("openai/gpt-4o-mini", f"{base}/v1"),
              "anthropic": ("anthropic/claude-haiku-4-5", base),
              "gemini": ("gemini/gemini-2.5-flash", f"{base}/v1beta")}
    config = {"model_list": [
        {"model_name": DIALECTS[name].model,
         "litellm_params": {"model": model, "api_base": api_base, "api_key": PROVIDER_KEY}}
        for name, (model, api_base) in routes.items()]}
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [python, "-c", "from litellm.proxy.proxy_cli import run_server; run_server()",
            "--host", HOST, "--port", str(port), "--config", str(path), "--num_workers", "1"]
    # As the anchors measured it: one worker, no database, no key checks (which current
    # releases refuse without this switch), and its bundled price map (no network here).
    env = {"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return Service(LITELLM, argv, port, tmp / "litellm.log", env=env)


def litellm_python(choice: str) -> tuple[str | None, str]:
    """The Python to run LiteLLM's proxy with, or None and why not.

    `auto`: the venv bench/litellm_venv.sh makes, else this Python if it has the proxy."""
    if choice and choice != "auto":
        return choice, ""
    venv_python = LITELLM_VENV / "bin" / "python"
    if (LITELLM_VENV / ".complete").exists() and venv_python.exists():
        return str(venv_python), ""
    if importlib.util.find_spec("litellm") is not None and all(
            importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "backoff")):
        return sys.executable, ""
    return None, (f"no LiteLLM proxy: run bench/litellm_venv.sh (makes {LITELLM_VENV}) or "
                  "give --litellm-python")


# --- the workload ---------------------------------------------------------------------------

@dataclass
class Drive:
    """What one bout of load measured, client side."""

    latencies: list[float]
    ttfbs: list[float]
    errors: int
    seconds: float


async def drive(url: str, mode: str, concurrency: int, duration: float, max_calls: int,
                dialect: Dialect = OPENAI) -> Drive:
    """`concurrency` workers calling `url` back to back until `duration` or `max_calls`."""
    stream = mode == "stream"
    body = dialect.body(mode)
    headers = dialect.headers(mode)
    end = dialect.stream_end
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    started = 0
    deadline = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            nonlocal errors, started
            while started < max_calls and time.perf_counter() < deadline:
                started += 1
                t0 = time.perf_counter()
                t1 = t0
                try:
                    async with session.post(url, data=body,
                                            headers=headers[started % len(headers)]) as resp:
                        if stream:
                            tail = await resp.content.readany()
                            t1 = time.perf_counter()
                            async for chunk in resp.content.iter_any():
                                tail = (tail + chunk)[-256:]
                            ok = resp.status == 200 and end in tail
                        else:
                            ok = resp.status == 200 and bool(await resp.read())
                except (aiohttp.ClientError, OSError, TimeoutError):
                    ok = False
                if not ok:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if stream:
                    ttfbs.append(t1 - t0)

        begun = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - begun
    return Drive(latencies, ttfbs, errors, seconds)


async def check(target: Target, dialect: Dialect = OPENAI) -> str | None:
    """One JSON call and one stream through `target`; what is wrong, or None."""
    try:
        return await _check(target, dialect)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def _check(target: Target, dialect: Dialect) -> str | None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for mode in MODES:
            async with session.post(target.url_for(dialect, mode), data=dialect.body(mode),
                                    headers=dialect.headers(mode)[0]) as resp:
                data = await resp.read()
                target.count(dialect, 1)
                if resp.status != 200:
                    return f"{mode}: HTTP {resp.status}: {data[:200]!r}"
                if mode == "stream" and dialect.stream_end not in data[-256:]:
                    return f"stream did not end with {dialect.stream_end!r}: {data[-200:]!r}"
                if target.name == METERPROXY and mode == "json" and (
                        "X-Meter-Cost-USD" not in resp.headers):
                    return "no X-Meter-Cost-USD header: the call was not priced"
    return None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Sample:
    """One cell of one round: a target, a dialect, a mode and a concurrency."""

    target: str
    dialect: str
    mode: str
    concurrency: int
    round: int
    calls: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    ttfb_p50_ms: float | None
    proxy_cpu_ms_per_call: float | None
    provider_cpu_ms_per_call: float | None
    client_cpu_ms_per_call: float | None
    others_cpu_pct: float | None  # the machine's capacity used by processes not ours




async def measure(target: Target, provider: Service, dialect: Dialect, mode: str,
                  concurrency: int, rnd: int, args: argparse.Namespace) -> Sample:
    """Drive one cell and read the processes' CPU around it."""
    proxy = target.service.meter if target.service is not None else None
    assert provider.meter is not None
    ours = ProcessMeter(os.getpid())  # the client and, as its children, every server
    proxy0 = proxy.cpu_s() if proxy is not None else 0.0
    provider0 = provider.meter.cpu_s()
    client0 = time.process_time()
    ours0, busy0, wall0 = ours.cpu_s(), machine_busy_s(), time.perf_counter()
    d = await drive(target.url_for(dialect, mode), mode, concurrency, args.duration,
                    args.max_calls, dialect)
    # Work a proxy defers (the usage-log writer flushes every 250 ms) belongs to this cell.
    await asyncio.sleep(args.settle)
    busy1, wall = machine_busy_s(), time.perf_counter() - wall0
    others = None
    if busy0 is not None and busy1 is not None:
        foreign = max(busy1 - busy0 - (ours.cpu_s() - ours0), 0.0)
        others = round(100 * foreign / (wall * cpu_count()), 1)
    calls = len(d.latencies)
    target.count(dialect, calls + d.errors)

    def per_call(seconds: float) -> float | None:
        return round(seconds * 1000 / calls, 4) if calls else None

    def ms(value: float) -> float:
        return round(value * 1000, 4)

    return Sample(
        target=target.name, dialect=dialect.name, mode=mode, concurrency=concurrency,
        round=rnd, calls=calls,
        errors=d.errors, seconds=round(d.seconds, 3),
        rps=round(calls / d.seconds, 1) if d.seconds else 0.0,
        p50_ms=ms(percentile(d.latencies, 50)) if calls else None,
        p99_ms=ms(percentile(d.latencies, 99)) if calls else None,
        ttfb_p50_ms=ms(percentile(d.ttfbs, 50)) if d.ttfbs else None,
        proxy_cpu_ms_per_call=per_call(proxy.cpu_s() - proxy0) if proxy is not None else None,
        provider_cpu_ms_per_call=per_call(provider.meter.cpu_s() - provider0),
        client_cpu_ms_per_call=per_call(time.process_time() - client0),
        others_cpu_pct=others,
    )


# --- the report -----------------------------------------------------------------------------

METRICS = ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "proxy_cpu_ms_per_call",
           "provider_cpu_ms_per_call", "client_cpu_ms_per_call", "others_cpu_pct", "calls",
           "errors")


def _median(values: list[float | None], digits: int = 4) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Per dialect: medians over rounds per cell, and per-round paired ratios against the
    pass-through (the same dialect, mode, concurrency and round)."""
    cells: dict[tuple[str, str, str, int], dict[int, Sample]] = {}
    for s in samples:
        cells.setdefault((s.dialect, s.target, s.mode, s.concurrency), {})[s.round] = s
    medians: dict[str, Any] = {}
    for (dialect, name, mode, conc), by_round in cells.items():
        medians.setdefault(dialect, {}).setdefault(name, {}).setdefault(mode, {})[str(conc)] = {
            m: _median([getattr(s, m) for s in by_round.values()]) for m in METRICS}
    ratios: dict[str, Any] = {}
    for (dialect, name, mode, conc), by_round in cells.items():
        base = cells.get((dialect, PASSTHROUGH, mode, conc), {})
        if name == PASSTHROUGH or not base:
            continue
        pairs = [(s, base[r]) for r, s in by_round.items() if r in base]

        def paired(fn: Any, pairs: list[tuple[Sample, Sample]] = pairs) -> float | None:
            values = []
            for s, b in pairs:
                with contextlib.suppress(TypeError, ZeroDivisionError):
                    values.append(fn(s, b))
            return _median(values)

        ratios.setdefault(dialect, {}).setdefault(name, {}).setdefault(mode, {})[str(conc)] = {
            "throughput_ratio": paired(lambda s, b: s.rps / b.rps),
            "added_p50_ms": paired(lambda s, b: s.p50_ms - b.p50_ms),
            "added_p99_ms": paired(lambda s, b: s.p99_ms - b.p99_ms),
            "added_ttfb_p50_ms": paired(lambda s, b: s.ttfb_p50_ms - b.ttfb_p50_ms),
            "cpu_per_call_ratio": paired(
                lambda s, b: s.proxy_cpu_ms_per_call / b.proxy_cpu_ms_per_call),
        }
    return {"medians": medians, "ratios": ratios}


# (key in ratios, limit, at least?) per target; where it applies is in cell_targets.
TARGETS = {
    "throughput": ("throughput_ratio", MIN_THROUGHPUT_RATIO, True),
    "cpu": ("cpu_per_call_ratio", MAX_CPU_RATIO, False),
    "p50": ("added_p50_ms", MAX_ADDED_P50_MS, False),
    "ttfb": ("added_ttfb_p50_ms", MAX_ADDED_TTFB_MS, False),
}
TARGET_TEXT = {
    "throughput": f"throughput >= {MIN_THROUGHPUT_RATIO}x the pass-through's at concurrency "
                  f"{' and '.join(map(str, THROUGHPUT_CONCURRENCIES))}, JSON and streams",
    "cpu": f"CPU per call <= {MAX_CPU_RATIO}x the pass-through's",
    "p50": f"added median latency at concurrency 1 <= {MAX_ADDED_P50_MS} ms",
    "ttfb": f"added time to first byte (streams, concurrency 1) <= {MAX_ADDED_TTFB_MS} ms",
}


def cell_targets(mode: str, conc: int) -> list[str]:
    """Which of issue 18's targets judge a cell."""
    found = ["cpu"]
    if conc in THROUGHPUT_CONCURRENCIES:
        found.insert(0, "throughput")
    if conc == 1:
        found.append("p50")
        if mode == "stream":
            found.append("ttfb")
    return found


def verdicts(ratios: dict[str, Any], concurrencies: list[int]) -> list[dict[str, Any]]:
    """meterproxy against the targets of issue 18, cell by cell and dialect by dialect."""
    found = []
    for dialect, by_target in ratios.items():
        for mode, by_conc in by_target.get(METERPROXY, {}).items():
            for conc in concurrencies:
                r = by_conc.get(str(conc))
                if r is None:
                    continue
                for target in cell_targets(mode, conc):
                    key, limit, at_least = TARGETS[target]
                    value = r[key]
                    met = value is not None and (value >= limit if at_least else value <= limit)
                    found.append({"dialect": dialect, "target": target, "mode": mode,
                                  "concurrency": conc, "measured": value, "limit": limit,
                                  "met": met})
    return found


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def _yes(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def header(results: dict[str, Any]) -> str:
    """Commit, settings, machine and load, in a paragraph."""
    s, m, src = results["settings"], results["machine"], results["source"]
    dirty = " with uncommitted changes in proxy/ or pricing/" if src["proxy_dirty"] else ""
    load = m.get("loadavg_before") or []
    after = m.get("loadavg_after") or []
    others = [x["others_cpu_pct"] for x in results["samples"] if x["others_cpu_pct"] is not None]
    litellm = results.get("litellm") or {}
    return (
        f"Commit {src['commit']}{dirty}"
        + (f" (proxy/ and pricing/ as of {src['proxy_commit']})" if src.get("proxy_commit")
           else "") + f", {results.get('started_utc', '')}; "
        f"{', '.join(s['dialects'])}; budget {'on' if s['budget'] else 'off'}, tags, "
        f"SQLite log and JSON logs on"
        f"{', OpenTelemetry on' if s.get('otel') else ''}. Medians over {s['rounds']} "
        f"round{'s' if s['rounds'] != 1 else ''} of {s['duration_s']:g} s per cell; "
        f"streams of {s['chunks']} content chunks with usage. Machine: {m['nproc']} cores "
        f"({m['cpu_model']}), Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, {m['event_loop']} event loop"
        + (f", LiteLLM {litellm['version']}" if litellm.get("version") else "")
        + f". Load average (1/5/15 min) {' / '.join(map(str, load))} before, "
        f"{' / '.join(map(str, after))} after; other processes took "
        f"{_fmt(_median(others), 0)}% (median; max {_fmt(max(others, default=None), 0)}%) "
        f"of the CPU during the cells. Run time {_fmt(results.get('seconds'), 0)} s.")


def dialect_markdown(results: dict[str, Any], dialect: str, level: str = "###") -> list[str]:
    """One dialect's tables: the figures, then the ratios judged against the targets."""
    s = results["settings"]
    medians = results["medians"].get(dialect, {})
    ratios = results["ratios"].get(dialect, {})
    names = [t for t in results["target_order"] if t in medians]
    d = DIALECTS[dialect]
    paths = f"`POST {d.path('json')}`" + (
        f" and `{d.path('stream')}`" if d.path("stream") != d.path("json") else "")
    out = [f"{level} {d.title}", "", f"{paths}, model `{d.model}`.", "",
           "| mode | conc | target | req/s | p50 ms | p99 ms | TTFB p50 ms | proxy CPU ms/call "
           "| errors | others' CPU % |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in s["modes"]:
        for conc in s["concurrency"]:
            for name in names:
                m = medians[name].get(mode, {}).get(str(conc))
                if m is None:
                    continue
                out.append(f"| {mode} | {conc} | {name} | {_fmt(m['rps'], 0)} | "
                           f"{_fmt(m['p50_ms'])} | {_fmt(m['p99_ms'])} | "
                           f"{_fmt(m['ttfb_p50_ms'])} | {_fmt(m['proxy_cpu_ms_per_call'], 3)} "
                           f"| {_fmt(m['errors'], 0)} | {_fmt(m['others_cpu_pct'], 0)} |")
    out += ["", "Against the bare pass-through, paired round by round (median), with the "
            "targets of issue 18 (judged for meterproxy only):", "",
            f"| mode | conc | target | throughput × | ≥ {MIN_THROUGHPUT_RATIO} | CPU/call × "
            f"| ≤ {MAX_CPU_RATIO} | added p50 ms | ≤ {MAX_ADDED_P50_MS} | added TTFB ms "
            f"| ≤ {MAX_ADDED_TTFB_MS} |",
            "|---|---:|---|---:|---|---:|---|---:|---|---:|---|"]
    judged = {(v["mode"], v["concurrency"], v["target"]): v["met"]
              for v in results["verdicts"] if v["dialect"] == dialect}
    for mode in s["modes"]:
        for conc in s["concurrency"]:
            for name in names:
                r = ratios.get(name, {}).get(mode, {}).get(str(conc))
                if r is None or name == DIRECT:
                    continue

                def met(target: str, name: str = name, mode: str = mode,
                        conc: int = conc) -> str:
                    return _yes(judged.get((mode, conc, target))) if name == METERPROXY else ""

                out.append(f"| {mode} | {conc} | {name} | {_fmt(r['throughput_ratio'])} | "
                           f"{met('throughput')} | {_fmt(r['cpu_per_call_ratio'])} | "
                           f"{met('cpu')} | {_signed(r['added_p50_ms'])} | {met('p50')} | "
                           f"{_signed(r['added_ttfb_p50_ms'])} | {met('ttfb')} |")
    versus = litellm_comparison(results, dialect)
    if versus:
        out += ["", versus]
    why = (results.get("litellm") or {}).get("failed", {}).get(dialect)
    if why:
        out += ["", f"LiteLLM: not measured for this dialect ({why})."]
    log = (results.get("usage_log") or {}).get(dialect)
    if log:
        out += ["", f"meterproxy's usage log: {log['rows']:,} rows for {log['calls_sent']:,} "
                f"calls sent; {log['priced']:,} priced, {log['attributed']:,} with customer "
                "and tags."]
    return out


def litellm_comparison(results: dict[str, Any], dialect: str) -> str:
    """meterproxy's throughput as a multiple of LiteLLM's, cell by cell."""
    medians = results["medians"].get(dialect, {})
    ours, theirs = medians.get(METERPROXY), medians.get(LITELLM)
    if not ours or not theirs:
        return ""
    parts = []
    for mode, by_conc in ours.items():
        for conc, m in by_conc.items():
            other = theirs.get(mode, {}).get(conc)
            if other and other["rps"] and m["rps"]:
                parts.append(f"{mode} c={conc} {m['rps'] / other['rps']:.0f}×")
    return "meterproxy's throughput as a multiple of LiteLLM's: " + ", ".join(parts) + "."


def summary_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """Per target of issue 18, per dialect: the measured range and whether it was met."""
    rows = []
    for target, text in TARGET_TEXT.items():
        per: dict[str, str] = {}
        for dialect in results["settings"]["dialects"]:
            found = [v for v in results["verdicts"]
                     if v["dialect"] == dialect and v["target"] == target
                     and v["measured"] is not None]
            if not found:
                per[dialect] = "—"
                continue
            values = [v["measured"] for v in found]
            signed = target in ("p50", "ttfb")
            fmt = (lambda x: f"{x:+.2f} ms") if signed else (lambda x: f"{x:.2f}×")
            span = fmt(min(values)) if len(set(values)) == 1 else (
                f"{fmt(min(values))} to {fmt(max(values))}" if signed
                else f"{min(values):.2f}–{max(values):.2f}×")
            misses = sum(not v["met"] for v in found)
            per[dialect] = (f"{span}: yes" if not misses
                            else f"{span}: **no** ({misses} of {len(found)} cells)")
        rows.append((text, per))
    return rows


def markdown(results: dict[str, Any], level: str = "###") -> str:
    """The results as markdown, ready for docs/performance.md: a header, each dialect's
    tables, memory, and the targets across dialects."""
    out = [header(results), ""]
    for dialect in results["settings"]["dialects"]:
        if dialect in results["medians"]:
            out += [*dialect_markdown(results, dialect, level), ""]
    out += [f"{level} Targets across dialects (issue 18)", "",
            "| target | " + " | ".join(results["settings"]["dialects"]) + " |",
            "|---|" + "---|" * len(results["settings"]["dialects"])]
    for text, per in summary_rows(results):
        out.append(f"| {text} | " + " | ".join(per[d] for d in results["settings"]["dialects"])
                   + " |")
    out += ["", "| proxy process | RSS after warm-up MB | RSS at end MB |", "|---|---:|---:|"]
    for name, rss in results["rss_mb"].items():
        out.append(f"| {name} | {_fmt(rss['after_warmup'], 1)} | {_fmt(rss['end'], 1)} |")
    for name, why in results["skipped"].items():
        out.append(f"\n{name}: skipped ({why}).")
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Throughput by concurrency per target, a panel per dialect and mode; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = results["settings"]
    dialects = [d for d in s["dialects"] if d in results["medians"]]
    fig, axes = plt.subplots(len(dialects), len(s["modes"]),
                             figsize=(5 * len(s["modes"]), 3.2 * len(dialects)), squeeze=False)
    for row, dialect in zip(axes, dialects, strict=True):
        medians = results["medians"][dialect]
        names = [t for t in results["target_order"] if t in medians]
        width = 0.8 / max(len(names), 1)
        for ax, mode in zip(row, s["modes"], strict=True):
            for i, name in enumerate(names):
                values = [(medians[name].get(mode, {}).get(str(c)) or {}).get("rps") or 0
                          for c in s["concurrency"]]
                xs = [j + i * width for j in range(len(values))]
                ax.bar(xs, values, width, label=name)
            ax.set_xticks([j + width * (len(names) - 1) / 2
                           for j in range(len(s["concurrency"]))])
            ax.set_xticklabels([str(c) for c in s["concurrency"]])
            ax.set_xlabel("concurrency")
            ax.set_ylabel("requests / s")
            ax.set_title(f"{dialect} {mode} ({results['machine']['nproc']} cores, median of "
                         f"{s['rounds']} rounds)", fontsize="medium")
            ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        mem_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    return {
        "nproc": cpu_count(),
        "cpu_model": model,
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "event_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "platform": platform.platform(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],  # 1, 5 and 15 minutes
        "uptime": uptime(),
    }


def uptime() -> str:
    """`uptime`'s line (load averages included), as the run saw it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source() -> dict[str, Any]:
    """The commit measured, and whether proxy/ had uncommitted changes."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "proxy_dirty": bool(git("status", "--porcelain", "--", "proxy", "pricing")),
            # The last commit that changed what is measured: unlike HEAD, a bench-only
            # branch rebased onto main keeps pointing at a commit main has.
            "proxy_commit": git("log", "-1", "--format=%h", "--", "proxy", "pricing") or None}


def usage_log_counts(db: Path) -> dict[str, dict[str, int]]:
    """Rows meterproxy wrote per provider, and how many are priced and attributed."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        found = conn.execute(
            "SELECT provider, count(*), coalesce(sum(cost_usd > 0), 0), coalesce(sum("
            "customer IS NOT NULL AND json_extract(tags, '$.env') = 'bench' AND "
            "json_extract(tags, '$.team') = 'bench'), 0) FROM usage GROUP BY provider"
        ).fetchall()
    finally:
        conn.close()
    return {provider: {"rows": rows, "priced": priced, "attributed": attributed}
            for provider, rows, priced, attributed in found}


# --- the run --------------------------------------------------------------------------------

@contextlib.contextmanager
def services(tmp: Path, args: argparse.Namespace,
             skipped: dict[str, str]) -> Iterator[tuple[Service, list[Target], Path]]:
    """Start every process; yield the provider, the targets and meterproxy's usage log."""
    started: list[Service] = []
    try:
        provider_port = free_port()
        provider = Service("fakeprovider", python_module(
            "bench.fakeprovider", "--port", str(provider_port), "--chunks", str(args.chunks)),
            provider_port, tmp / "fakeprovider.log")
        provider_url = f"http://{HOST}:{provider.port}"
        passthrough_port = free_port()
        passthrough = Service(PASSTHROUGH, python_module(
            "bench.passthrough", "--port", str(passthrough_port), "--upstream", provider_url),
            passthrough_port, tmp / "passthrough.log")
        meterproxy, db = meterproxy_service(tmp, provider.port, args.budget, args.otel)
        path = OPENAI.path("json")

        def target(name: str, base: str, service: Service | None = None,
                   prefix: bool = False) -> Target:
            url = base + ("/openai" if prefix else "") + path
            return Target(name, url, service, base=base, prefix=prefix)

        targets = [target(DIRECT, provider_url),
                   target(PASSTHROUGH, f"http://{HOST}:{passthrough.port}", passthrough),
                   target(METERPROXY, f"http://{HOST}:{meterproxy.port}", meterproxy, True)]
        for service in (provider, passthrough, meterproxy):
            service.start()
            started.append(service)
        python, why = (None, "--no-litellm") if args.no_litellm else litellm_python(
            args.litellm_python)
        litellm = None
        if python is None:
            skipped[LITELLM] = why
        else:
            litellm = litellm_service(tmp, provider.port, python)
            litellm.start()
            started.append(litellm)
        for service in (provider, passthrough, meterproxy):
            service.wait_ready(60)
        if litellm is not None:
            try:
                litellm.wait_ready(180)
                targets.append(target(LITELLM, f"http://{HOST}:{litellm.port}", litellm))
            except RuntimeError as exc:
                skipped[LITELLM] = str(exc).splitlines()[0]
                litellm.stop()
        for service in started:
            if service.proc is not None and service.proc.poll() is None:
                print(f"  {service.name}: pid {service.proc.pid}, port {service.port}",
                      file=sys.stderr)
        yield provider, targets, db
    finally:
        for service in reversed(started):
            service.stop()


def litellm_version(python: str) -> str | None:
    try:
        return subprocess.run(
            [python, "-c", "from importlib.metadata import version; print(version('litellm'))"],
            capture_output=True, text=True, timeout=60).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    host = machine()
    started_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    skipped: dict[str, str] = {}
    samples: list[Sample] = []
    rss: dict[str, dict[str, float | None]] = {}
    dialects = [DIALECTS[d] for d in args.dialects]
    litellm: dict[str, Any] = {"failed": {}}
    with services(tmp, args, skipped) as (provider, targets, db):
        # Which dialects each target serves: all, except where LiteLLM's check fails.
        serves: dict[str, list[Dialect]] = {t.name: list(dialects) for t in targets}
        for target in list(targets):
            for dialect in dialects:
                problem = await check(target, dialect)
                if problem is None:
                    continue
                if target.name != LITELLM:
                    raise RuntimeError(f"{target.name} failed its {dialect.name} check call: "
                                       f"{problem}")
                litellm["failed"][dialect.name] = f"its check call failed: {problem[:160]}"
                serves[LITELLM].remove(dialect)
            if target.name == LITELLM:
                assert target.service is not None
                litellm["python"] = target.service.argv[0]
                litellm["version"] = litellm_version(target.service.argv[0])
                if not serves[LITELLM]:
                    skipped[LITELLM] = "no dialect passed its check call"
                    targets.remove(target)
        print(f"warming up ({args.warmup:g} s per target, dialect and mode)", file=sys.stderr)
        for target in targets:
            for dialect in serves[target.name]:
                for mode in args.modes:
                    d = await drive(target.url_for(dialect, mode), mode, 8, args.warmup,
                                    args.max_calls, dialect)
                    target.count(dialect, len(d.latencies) + d.errors)
            if target.service is not None and target.service.meter is not None:
                target.rss_start_mb = round(target.service.meter.rss_mb(), 1)
        cells = sum(len(serves[t.name]) for t in targets) * len(args.modes) * len(
            args.concurrency)
        print(f"{args.rounds} rounds x {cells} cells x {args.duration:g} s", file=sys.stderr)
        for rnd in range(args.rounds):
            for dialect in dialects:
                for mode in args.modes:
                    for conc in args.concurrency:
                        for target in targets:
                            if dialect not in serves[target.name]:
                                continue
                            s = await measure(target, provider, dialect, mode, conc, rnd, args)
                            samples.append(s)
                            print(f"  round {rnd + 1} {dialect.name:9} {mode:6} c={conc:<3} "
                                  f"{target.name:12} {s.rps:8.0f} req/s  p50 {_fmt(s.p50_ms)} "
                                  f"ms  cpu {_fmt(s.proxy_cpu_ms_per_call, 3)} ms/call  "
                                  f"others {_fmt(s.others_cpu_pct, 0)}%"
                                  + (f"  ERRORS {s.errors}" if s.errors else ""),
                                  file=sys.stderr)
        for target in targets:
            if target.service is not None and target.service.meter is not None:
                target.rss_end_mb = round(target.service.meter.rss_mb(), 1)
                rss[target.name] = {"after_warmup": target.rss_start_mb,
                                    "end": target.rss_end_mb}
        ours = next(t for t in targets if t.name == METERPROXY)
        sent = dict(ours.sent_by_dialect)
        order = [t.name for t in targets]
    # meterproxy has stopped: its writer flushed every row on the way out.
    counts = usage_log_counts(db) if db.exists() else {}
    usage_log = {d.name: {"calls_sent": sent.get(d.name, 0),
                          **counts.get(d.name, {"rows": 0, "priced": 0, "attributed": 0})}
                 for d in dialects}
    summary = summarize(samples)
    return {
        "machine": host,
        "started_utc": started_utc,
        "settings": {"dialects": args.dialects, "duration_s": args.duration,
                     "rounds": args.rounds, "concurrency": args.concurrency,
                     "modes": args.modes, "chunks": args.chunks, "warmup_s": args.warmup,
                     "settle_s": args.settle, "max_calls": args.max_calls,
                     "budget": args.budget, "otel": args.otel},
        "source": source(),
        "target_order": order,
        **summary,
        "verdicts": verdicts(summary["ratios"], args.concurrency),
        "rss_mb": rss,
        "usage_log": usage_log,
        "litellm": litellm,
        "skipped": skipped,
        "samples": [asdict(s) for s in samples],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="meterproxy against a bare aiohttp pass-through, on loopback.")
    parser.add_argument("--dialects", default=",".join(DIALECTS),
                        help=f"comma-separated ({','.join(DIALECTS)})")
    parser.add_argument("--duration", type=float, default=1.75,
                        help="seconds per cell (1.75)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell (3)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated (1,8,32)")
    parser.add_argument("--modes", default="json,stream", help="json, stream or both")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream (20)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="seconds of unmeasured load per target, dialect and mode (0.5)")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="pause after each cell before CPU is read (0.25 s)")
    parser.add_argument("--max-calls", type=int, default=100_000, help="cap per cell")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loadgen.json",
                        help="JSON results; the markdown goes beside it as .md")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "performance.png"),
                        help="PNG of throughput (needs matplotlib; '' for none)")
    parser.add_argument("--otel", action="store_true",
                        help="meterproxy exports OpenTelemetry spans and metrics (OTLP/HTTP) "
                             "to the fake provider, which accepts and drops them")
    parser.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                        help="give meterproxy's key a (never reached) monthly budget that "
                             "every call reserves and settles against (default: on)")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the processes' configs, logs and meterproxy's usage log "
                             "here (default: a temporary directory, removed)")
    parser.add_argument("--litellm-python", default="auto",
                        help="a Python with litellm[proxy] installed; auto (default): the venv "
                             "bench/litellm_venv.sh makes, else this Python if it has it")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.dialects = [d.strip() for d in args.dialects.split(",") if d.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency takes positive whole numbers")
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes takes {' and/or '.join(MODES)}")
    if not args.dialects or set(args.dialects) - set(DIALECTS):
        parser.error(f"--dialects takes {', '.join(DIALECTS)}")
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be positive")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and write its JSON and markdown; the results."""
    started = time.monotonic()
    print("starting the fake provider, the pass-through, meterproxy and LiteLLM",
          file=sys.stderr)
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            tmp = args.workdir
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="meterproxy-bench-")))
        runner = stack.enter_context(asyncio.Runner(loop_factory=new_loop))
        results = runner.run(run(args, tmp))
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = bench(args)
    print(markdown(results))
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    if args.plot and plot(results, Path(args.plot)):
        print(f"plot: {args.plot}")
    for dialect, log in results["usage_log"].items():
        if log["rows"] != log["calls_sent"]:
            print(f"warning: meterproxy logged {log['rows']} {dialect} rows for "
                  f"{log['calls_sent']} calls", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
