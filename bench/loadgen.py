"""The load benchmark: meterproxy against a bare pass-through, measured in one run.

Starts, each in its own process on loopback: a fake provider that answers at once
(bench.fakeprovider), a bare aiohttp pass-through (bench.passthrough), meterproxy with
everything on (virtual key, attribution headers and tags, pricing, SQLite usage log, JSON
logs) and, when `litellm` is importable, the LiteLLM proxy. Then the same workload runs
direct and through each, interleaved in rounds (A B C A B C ...), at each concurrency, as
JSON calls and as streams. Reported: medians over rounds, and ratios against the bare
pass-through paired round by round. Absolute figures on a shared box are noise; the
ratios are the result, and the CPU other processes took during each cell says how far
to trust them.

    python -m bench.loadgen [--duration 3] [--rounds 3] [--concurrency 1,8,32]
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
# The targets of issue 2.
MIN_THROUGHPUT_RATIO = 0.70
THROUGHPUT_CONCURRENCIES = (8, 32)
MAX_ADDED_P50_MS = 0.3


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
    """Where the load goes: a URL and the proxy process serving it (None when direct)."""

    name: str
    url: str
    service: Service | None = None
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    sent: int = 0


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
    config = {
        "server": {"host": HOST, "port": port},
        "storage": {"usage_log": f"sqlite:///{db}"},
        "providers": {"openai": {"base_url": f"http://{HOST}:{provider_port}",
                                 "api_key_env": PROVIDER_KEY_ENV}},
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
    """The LiteLLM proxy with one model routed to the fake provider (no database)."""
    port = free_port()
    config = {"model_list": [{"model_name": "gpt-4o-mini", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": f"http://{HOST}:{provider_port}/v1",
        "api_key": PROVIDER_KEY}}]}
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [python, "-c", "from litellm.proxy.proxy_cli import run_server; run_server()",
            "--host", HOST, "--port", str(port), "--config", str(path), "--num_workers", "1"]
    # As the anchors measured it: one worker, no database, no key checks (which current
    # releases refuse without this switch), and its bundled price map (no network here).
    env = {"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return Service(LITELLM, argv, port, tmp / "litellm.log", env=env)


# --- the workload ---------------------------------------------------------------------------

def request_body(stream: bool) -> bytes:
    """The chat completion every target is asked for."""
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You answer in one short sentence."},
                     {"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 64,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(body)


def request_headers(mode: str) -> list[dict[str, str]]:
    """Headers for successive calls: the virtual key and attribution for 8 customers."""
    return [{"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json",
             "X-Meter-Customer": f"customer-{i}", "X-Meter-Feature": f"bench-{mode}",
             "X-Meter-Tag-Env": "bench"} for i in range(8)]


@dataclass
class Drive:
    """What one bout of load measured, client side."""

    latencies: list[float]
    ttfbs: list[float]
    errors: int
    seconds: float


async def drive(url: str, mode: str, concurrency: int, duration: float, max_calls: int) -> Drive:
    """`concurrency` workers calling `url` back to back until `duration` or `max_calls`."""
    stream = mode == "stream"
    body = request_body(stream)
    headers = request_headers(mode)
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
                                tail = (tail + chunk)[-64:]
                            ok = resp.status == 200 and tail.endswith(DONE)
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


async def check(target: Target) -> str | None:
    """One JSON call and one stream through `target`; what is wrong, or None."""
    try:
        return await _check(target)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def _check(target: Target) -> str | None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for mode in MODES:
            async with session.post(target.url, data=request_body(mode == "stream"),
                                    headers=request_headers(mode)[0]) as resp:
                data = await resp.read()
                target.sent += 1
                if resp.status != 200:
                    return f"{mode}: HTTP {resp.status}: {data[:200]!r}"
                if mode == "stream" and not data.endswith(DONE):
                    return f"stream did not end with [DONE]: {data[-200:]!r}"
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
    """One cell of one round: a target, a mode and a concurrency."""

    target: str
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




async def measure(target: Target, provider: Service, mode: str, concurrency: int,
                  rnd: int, args: argparse.Namespace) -> Sample:
    """Drive one cell and read the processes' CPU around it."""
    proxy = target.service.meter if target.service is not None else None
    assert provider.meter is not None
    ours = ProcessMeter(os.getpid())  # the client and, as its children, every server
    proxy0 = proxy.cpu_s() if proxy is not None else 0.0
    provider0 = provider.meter.cpu_s()
    client0 = time.process_time()
    ours0, busy0, wall0 = ours.cpu_s(), machine_busy_s(), time.perf_counter()
    d = await drive(target.url, mode, concurrency, args.duration, args.max_calls)
    # Work a proxy defers (the usage-log writer flushes every 250 ms) belongs to this cell.
    await asyncio.sleep(args.settle)
    busy1, wall = machine_busy_s(), time.perf_counter() - wall0
    others = None
    if busy0 is not None and busy1 is not None:
        foreign = max(busy1 - busy0 - (ours.cpu_s() - ours0), 0.0)
        others = round(100 * foreign / (wall * cpu_count()), 1)
    calls = len(d.latencies)
    target.sent += calls + d.errors

    def per_call(seconds: float) -> float | None:
        return round(seconds * 1000 / calls, 4) if calls else None

    def ms(value: float) -> float:
        return round(value * 1000, 4)

    return Sample(
        target=target.name, mode=mode, concurrency=concurrency, round=rnd, calls=calls,
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
    """Medians over rounds per cell, and per-round paired ratios against the pass-through."""
    cells: dict[tuple[str, str, int], dict[int, Sample]] = {}
    for s in samples:
        cells.setdefault((s.target, s.mode, s.concurrency), {})[s.round] = s
    medians: dict[str, Any] = {}
    for (name, mode, conc), by_round in cells.items():
        medians.setdefault(name, {}).setdefault(mode, {})[str(conc)] = {
            m: _median([getattr(s, m) for s in by_round.values()]) for m in METRICS}
    ratios: dict[str, Any] = {}
    for (name, mode, conc), by_round in cells.items():
        base = cells.get((PASSTHROUGH, mode, conc), {})
        if name == PASSTHROUGH or not base:
            continue
        pairs = [(s, base[r]) for r, s in by_round.items() if r in base]

        def paired(fn: Any, pairs: list[tuple[Sample, Sample]] = pairs) -> float | None:
            values = []
            for s, b in pairs:
                with contextlib.suppress(TypeError, ZeroDivisionError):
                    values.append(fn(s, b))
            return _median(values)

        ratios.setdefault(name, {}).setdefault(mode, {})[str(conc)] = {
            "throughput_ratio": paired(lambda s, b: s.rps / b.rps),
            "added_p50_ms": paired(lambda s, b: s.p50_ms - b.p50_ms),
            "added_p99_ms": paired(lambda s, b: s.p99_ms - b.p99_ms),
            "added_ttfb_p50_ms": paired(lambda s, b: s.ttfb_p50_ms - b.ttfb_p50_ms),
            "cpu_per_call_ratio": paired(
                lambda s, b: s.proxy_cpu_ms_per_call / b.proxy_cpu_ms_per_call),
        }
    return {"medians": medians, "ratios": ratios}


def verdicts(ratios: dict[str, Any], concurrencies: list[int]) -> list[dict[str, Any]]:
    """meterproxy against the targets of issue 2, each measured and judged."""
    ours = ratios.get(METERPROXY, {})
    found = []
    for mode in MODES:
        for conc in THROUGHPUT_CONCURRENCIES:
            if conc in concurrencies and mode in ours:
                value = ours[mode][str(conc)]["throughput_ratio"]
                found.append({"target": f"throughput >= {MIN_THROUGHPUT_RATIO:.0%} of the "
                              f"pass-through's, {mode}, concurrency {conc}",
                              "measured": value,
                              "met": value is not None and value >= MIN_THROUGHPUT_RATIO})
    for mode in MODES:
        if 1 in concurrencies and mode in ours:
            value = ours[mode]["1"]["added_p50_ms"]
            found.append({"target": f"median latency within {MAX_ADDED_P50_MS} ms of the "
                          f"pass-through's, {mode}, concurrency 1",
                          "measured": value,
                          "met": value is not None and value <= MAX_ADDED_P50_MS})
    return found


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables, ready for docs/performance.md."""
    s = results["settings"]
    medians, ratios = results["medians"], results["ratios"]
    names = [t for t in results["target_order"] if t in medians]
    src = results["source"]
    dirty = " with uncommitted changes in proxy/ or pricing/" if src["proxy_dirty"] else ""
    out = [f"Commit {src['commit']}{dirty}"
           f"{', key budget on' if s['budget'] else ''}"
           f"{', OpenTelemetry on' if s.get('otel') else ''}. Medians over {s['rounds']} rounds of "
           f"{s['duration_s']:g} s per cell; stream = {s['chunks']} content chunks with a usage "
           "chunk. CPU is the proxy process's (user + system) per call.", "",
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
    out += ["", "Against the bare pass-through (paired round by round, median):", "",
            "| mode | conc | target | throughput × | added p50 ms | added p99 ms "
            "| added TTFB p50 ms | CPU/call × |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for mode in s["modes"]:
        for conc in s["concurrency"]:
            for name in names:
                r = ratios.get(name, {}).get(mode, {}).get(str(conc))
                if r is None:
                    continue
                out.append(f"| {mode} | {conc} | {name} | {_fmt(r['throughput_ratio'])} | "
                           f"{_fmt(r['added_p50_ms'], 3)} | {_fmt(r['added_p99_ms'], 3)} | "
                           f"{_fmt(r['added_ttfb_p50_ms'], 3)} | "
                           f"{_fmt(r['cpu_per_call_ratio'])} |")
    out += ["", "| proxy process | RSS after warm-up MB | RSS at end MB |", "|---|---:|---:|"]
    for name, rss in results["rss_mb"].items():
        out.append(f"| {name} | {_fmt(rss['after_warmup'], 1)} | {_fmt(rss['end'], 1)} |")
    out += ["", "| target (issue 2) | measured | met |", "|---|---:|---|"]
    for v in results["verdicts"]:
        unit = "×" if "throughput" in v["target"] else " ms"
        out.append(f"| {v['target']} | {_fmt(v['measured'], 3)}{unit} | "
                   f"{'yes' if v['met'] else '**no**'} |")
    log = results.get("usage_log")
    if log:
        out += ["", f"meterproxy's usage log: {log['rows']} rows for {log['calls_sent']} calls "
                f"sent; {log['priced']} priced, {log['attributed']} with customer and tags."]
    for name, why in results["skipped"].items():
        out.append(f"\n{name}: skipped ({why}).")
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Throughput by concurrency per target, JSON and streams; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s, medians = results["settings"], results["medians"]
    names = [t for t in results["target_order"] if t in medians]
    fig, axes = plt.subplots(1, len(s["modes"]), figsize=(5 * len(s["modes"]), 3.6),
                             squeeze=False)
    width = 0.8 / max(len(names), 1)
    for ax, mode in zip(axes[0], s["modes"], strict=True):
        for i, name in enumerate(names):
            values = [medians[name][mode][str(c)]["rps"] or 0 for c in s["concurrency"]]
            xs = [j + i * width for j in range(len(values))]
            ax.bar(xs, values, width, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(s["concurrency"]))])
        ax.set_xticklabels([str(c) for c in s["concurrency"]])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("requests / s")
        ax.set_title(f"{mode} ({results['machine']['nproc']} cores, median of "
                     f"{s['rounds']} rounds)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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
    }


def source() -> dict[str, Any]:
    """The commit measured, and whether proxy/ had uncommitted changes."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "proxy_dirty": bool(git("status", "--porcelain", "--", "proxy", "pricing"))}


def usage_log_counts(db: Path) -> dict[str, int]:
    """Rows meterproxy wrote, and how many are priced and attributed."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows, priced, attributed = conn.execute(
            "SELECT count(*), coalesce(sum(cost_usd > 0), 0), coalesce(sum(customer IS NOT NULL "
            "AND json_extract(tags, '$.env') = 'bench' AND json_extract(tags, '$.team') = "
            "'bench'), 0) FROM usage").fetchone()
    finally:
        conn.close()
    return {"rows": rows, "priced": priced, "attributed": attributed}


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
        path = "/v1/chat/completions"
        targets = [Target(DIRECT, provider_url + path),
                   Target(PASSTHROUGH, f"http://{HOST}:{passthrough.port}{path}", passthrough),
                   Target(METERPROXY, f"http://{HOST}:{meterproxy.port}/openai{path}",
                          meterproxy)]
        for service in (provider, passthrough, meterproxy):
            service.start()
            started.append(service)
        for service in (provider, passthrough, meterproxy):
            service.wait_ready(60)
        if args.no_litellm:
            skipped[LITELLM] = "--no-litellm"
        elif not args.litellm_python and importlib.util.find_spec("litellm") is None:
            skipped[LITELLM] = "litellm is not installed"
        else:
            litellm = litellm_service(tmp, provider.port, args.litellm_python or sys.executable)
            litellm.start()
            started.append(litellm)
            try:
                litellm.wait_ready(120)
                targets.append(Target(LITELLM, f"http://{HOST}:{litellm.port}{path}", litellm))
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


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    host = machine()
    skipped: dict[str, str] = {}
    samples: list[Sample] = []
    rss: dict[str, dict[str, float | None]] = {}
    with services(tmp, args, skipped) as (provider, targets, db):
        for target in list(targets):
            problem = await check(target)
            if problem is None:
                continue
            if target.name == LITELLM:
                skipped[LITELLM] = f"its check call failed: {problem}"
                targets.remove(target)
            else:
                raise RuntimeError(f"{target.name} failed its check call: {problem}")
        print(f"warming up ({args.warmup:g} s per target and mode)", file=sys.stderr)
        for target in targets:
            for mode in args.modes:
                d = await drive(target.url, mode, 8, args.warmup, args.max_calls)
                target.sent += len(d.latencies) + d.errors
            if target.service is not None and target.service.meter is not None:
                target.rss_start_mb = round(target.service.meter.rss_mb(), 1)
        cells = len(args.modes) * len(args.concurrency) * len(targets)
        print(f"{args.rounds} rounds x {cells} cells x {args.duration:g} s", file=sys.stderr)
        for rnd in range(args.rounds):
            for mode in args.modes:
                for conc in args.concurrency:
                    for target in targets:
                        s = await measure(target, provider, mode, conc, rnd, args)
                        samples.append(s)
                        print(f"  round {rnd + 1} {mode:6} c={conc:<3} {target.name:12} "
                              f"{s.rps:8.0f} req/s  p50 {_fmt(s.p50_ms)} ms  "
                              f"cpu {_fmt(s.proxy_cpu_ms_per_call, 3)} ms/call  "
                              f"others {_fmt(s.others_cpu_pct, 0)}%"
                              + (f"  ERRORS {s.errors}" if s.errors else ""), file=sys.stderr)
        for target in targets:
            if target.service is not None and target.service.meter is not None:
                target.rss_end_mb = round(target.service.meter.rss_mb(), 1)
                rss[target.name] = {"after_warmup": target.rss_start_mb,
                                    "end": target.rss_end_mb}
        sent = {t.name: t.sent for t in targets}
        order = [t.name for t in targets]
    # meterproxy has stopped: its writer flushed every row on the way out.
    usage_log = {"calls_sent": sent[METERPROXY], **usage_log_counts(db)} if db.exists() else None
    summary = summarize(samples)
    return {
        "machine": host,
        "settings": {"duration_s": args.duration, "rounds": args.rounds,
                     "concurrency": args.concurrency, "modes": args.modes,
                     "chunks": args.chunks, "warmup_s": args.warmup, "settle_s": args.settle,
                     "max_calls": args.max_calls, "budget": args.budget, "otel": args.otel},
        "source": source(),
        "target_order": order,
        **summary,
        "verdicts": verdicts(summary["ratios"], args.concurrency),
        "rss_mb": rss,
        "usage_log": usage_log,
        "skipped": skipped,
        "samples": [asdict(s) for s in samples],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="meterproxy against a bare aiohttp pass-through, on loopback.")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per cell (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell (3)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated (1,8,32)")
    parser.add_argument("--modes", default="json,stream", help="json, stream or both")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream (20)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unmeasured load per target and mode first (1)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="pause after each cell before CPU is read (0.3 s)")
    parser.add_argument("--max-calls", type=int, default=100_000, help="cap per cell")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                        help="JSON results; the markdown goes beside it as .md")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "performance.png"),
                        help="PNG of throughput (needs matplotlib; '' for none)")
    parser.add_argument("--otel", action="store_true",
                        help="meterproxy exports OpenTelemetry spans and metrics (OTLP/HTTP) "
                             "to the fake provider, which accepts and drops them")
    parser.add_argument("--budget", action="store_true",
                        help="give meterproxy's key a (never reached) monthly budget")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM even if installed")
    parser.add_argument("--litellm-python", default="",
                        help="a Python with litellm[proxy] installed (e.g. in its own venv, "
                             "as its dependencies clash with the test extras)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency takes positive whole numbers")
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes takes {' and/or '.join(MODES)}")
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("starting the fake provider, the pass-through and meterproxy", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="meterproxy-bench-") as tmp, \
            asyncio.Runner(loop_factory=new_loop) as runner:
        results = runner.run(run(args, Path(tmp)))
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    if args.plot and plot(results, Path(args.plot)):
        print(f"plot: {args.plot}")
    log = results["usage_log"]
    if log is not None and log["rows"] != log["calls_sent"]:
        print(f"warning: meterproxy logged {log['rows']} rows for {log['calls_sent']} calls",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
