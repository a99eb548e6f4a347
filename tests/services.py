"""PostgreSQL, Redis and Chromium for the tests that need them: given, started, or skipped.

Each server comes from, in this order: a URL in the environment (`METERPROXY_TEST_PG`,
`METERPROXY_TEST_REDIS`); else a throwaway server this test session starts from the
installed binaries on a free loopback port, on first use, and stops and deletes at the
end (PostgreSQL from a cluster made once by `initdb` and cached, copied per session);
else a skip that says what to install. `.ci/run` installs them and fails on any skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

INSTALL = "apt-get install -y postgresql redis-server chromium"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meterproxy-tests"

_procs: list[subprocess.Popen[bytes]] = []
_dirs: list[Path] = []
_urls: dict[str, str] = {}


def _missing(what: str, env: str | None = None) -> None:
    instead = f", or set {env} to a server's URL" if env else ""
    pytest.skip(f"{what} is not installed: {INSTALL} (.ci/run does this){instead}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str,
          timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout:.0f} s")
        time.sleep(0.05)


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name))
    return Path(versions[-1]).parent if versions else None


def _as_postgres() -> dict[str, str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no `postgres` user to run PostgreSQL as")
    return {"user": "postgres", "group": "postgres"}


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


def _template(bindir: Path) -> Path:
    """A fresh cluster made by initdb, once per PostgreSQL version, cached for later runs."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, check=True).stdout  # "postgres (PostgreSQL) 15.20 (...)"
    version = out.split(")", 1)[-1].split()[0]
    template = CACHE / f"postgres-{version}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "postgres.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            work = Path(tempfile.mkdtemp(prefix="meterproxy-initdb-"))
            _chown(work)
            subprocess.run([str(bindir / "initdb"), "-D", str(work / "data"), "-U", "postgres",
                            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                           check=True, capture_output=True, **_as_postgres())
            shutil.move(str(work / "data"), template)
            shutil.rmtree(work, ignore_errors=True)
    return template


def _given_or_started(name: str, env: str, start: Callable[[], str]) -> str:
    """The URL in `env`, else that of a server `start` launches: once per session."""
    if name not in _urls:
        _urls[name] = os.environ.get(env) or start()
    return _urls[name]


def _scratch(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    _dirs.append(root)
    return root


def _launch(argv: list[str], log: Path, what: str, ready: Callable[[], bool],
            **popen: Any) -> None:
    """Start a server in its own session (its log in `log`) and wait until it answers."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            start_new_session=True, **popen)
    _procs.append(proc)
    _wait(ready, proc, what)


def postgres_url() -> str:
    """An admin URL (trust auth, user postgres) of a server the tests may create databases on."""
    return _given_or_started("pg", "METERPROXY_TEST_PG", _start_postgres)


def _start_postgres() -> str:
    bindir = postgres_bin()
    if bindir is None:
        _missing("PostgreSQL", "METERPROXY_TEST_PG")
    assert bindir is not None
    root = _scratch("meterproxy-pg-")
    shutil.copytree(_template(bindir), root / "data", symlinks=True)
    os.chmod(root / "data", 0o700)
    _chown(root)
    port = _free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def up() -> bool:
        import psycopg

        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    _launch([str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300"], root / "postgres.log", "postgres", up,
            **_as_postgres())
    return url


def redis_bin() -> str:
    found = shutil.which("redis-server")
    if found is None:
        _missing("redis-server", "METERPROXY_TEST_REDIS")
    assert found is not None
    return found


def redis_url() -> str:
    """A Redis the tests share, each under its own key prefix."""
    return _given_or_started("redis", "METERPROXY_TEST_REDIS", _start_redis)


def _start_redis() -> str:
    exe = redis_bin()
    root = _scratch("meterproxy-redis-")
    port = _free_port()

    def up() -> bool:
        import redis

        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    _launch([exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root), "--save", "",
             "--appendonly", "no"], root / "redis.log", "redis-server", up)
    return f"redis://127.0.0.1:{port}/0"


def chromium() -> str:
    """The system's headless-capable Chromium."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    _missing("Chromium")
    return ""


def stop_all() -> None:
    """Stop every server this session started and delete its files."""
    for proc in _procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown; Redis quits too
    for proc in _procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for root in _dirs:
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
    _procs.clear()
    _dirs.clear()
    _urls.clear()
