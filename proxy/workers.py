"""`meterproxy serve --workers N`: N proxy processes sharing one port (SO_REUSEPORT).

Each worker is a whole proxy (its own event loop, upstream session and usage-log writer);
the kernel spreads incoming connections across them. Budgets stay exact only if every
worker reserves against the same ledger, so more than one worker needs the Redis ledger.
The parent only supervises: it forwards SIGTERM/SIGINT (drain and stop) and SIGHUP
(reload), and replaces a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import structlog

from proxy.config import Settings
from proxy.storage import is_redis

log = structlog.get_logger("meterproxy")
METRICS_DIR_ENV = "METERPROXY_METRICS_DIR"
WORKER_ENV = "METERPROXY_WORKER"

# A worker that dies sooner than this after starting is failing to start, not crashing.
MIN_UPTIME_S = 5.0
MAX_QUICK_DEATHS = 3


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse a worker count the configuration cannot keep exact."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    ledger = settings.storage.ledger
    if workers > 1 and not is_redis(ledger):
        raise ValueError(
            f"--workers {workers} needs a shared budget ledger, but storage.ledger is "
            f"{ledger!r}: the local ledger lives in one process's memory, so each worker "
            f"would enforce every budget on its own and together they could overspend it "
            f"{workers} times. Set storage.ledger: redis://HOST:6379/0 in "
            f"{settings.source}, or run one worker.")


def run_workers(settings: Settings, host: str, port: int, workers: int) -> int:
    """Start `workers` processes on host:port and supervise them until told to stop."""
    check_workers(settings, workers)
    # Each worker publishes its counters here; a scrape adds them up (see proxy.metrics).
    shared = tempfile.mkdtemp(prefix="meterproxy-metrics-")
    os.environ[METRICS_DIR_ENV] = shared
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=sys.stderr))
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, Any] = {}
    started: dict[int, float] = {}
    quick_deaths = 0
    stopping = False

    def start(index: int) -> None:
        proc = ctx.Process(target=worker_main, args=(settings, host, port, index),
                           name=f"meterproxy-worker-{index}", daemon=False)
        proc.start()
        procs[index], started[index] = proc, time.monotonic()

    def forward(signum: int, _frame: Any = None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        # Each worker drains its in-flight calls and flushes its rows on SIGTERM.
        relay = signal.SIGTERM if signum == signal.SIGINT else signum
        for proc in procs.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, relay)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("workers_starting", workers=workers, url=f"http://{host}:{port}",
             ledger=settings.storage.ledger.split("@")[-1])
    for index in range(workers):
        start(index)
    status = 0
    while procs:
        sentinels = {proc.sentinel: index for index, proc in procs.items()}
        ready = multiprocessing.connection.wait(list(sentinels), timeout=1.0)
        for sentinel in ready:
            index = sentinels[sentinel]  # type: ignore[index]
            proc = procs.pop(index)
            proc.join()
            if stopping:
                continue
            uptime = time.monotonic() - started[index]
            log.error("worker_died", worker=index, pid=proc.pid, exitcode=proc.exitcode,
                      uptime_s=round(uptime, 1))
            quick_deaths = quick_deaths + 1 if uptime < MIN_UPTIME_S else 0
            if quick_deaths >= MAX_QUICK_DEATHS:
                log.error("workers_giving_up", reason="workers keep dying at start-up; "
                          "see the errors above")
                status = 1
                forward(signal.SIGTERM)
                continue
            start(index)
    shutil.rmtree(shared, ignore_errors=True)
    return status


def worker_main(settings: Settings, host: str, port: int, index: int) -> None:
    """One worker: the ordinary server, on a port it shares with its siblings."""
    from proxy.app import serve
    from proxy.logs import configure

    configure(settings.logging.level, settings.logging.format)
    # Workers share one stderr: each line must reach it in a single write, or the lines of
    # two workers can interleave (print() writes the line and its newline separately).
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=sys.stderr))
    structlog.contextvars.bind_contextvars(worker=index)
    os.environ[WORKER_ENV] = str(index)
    coro = serve(settings, host, port, reuse_port=True)
    try:
        if os.environ.get("METERPROXY_EVENT_LOOP") == "asyncio":
            raise ImportError
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
