"""Storage behind narrow interfaces: the usage log (append rows, query) and the ledger.

The embedded defaults are SQLite for the log and an in-process ledger; PostgreSQL (log)
and Redis (ledger) let several proxy instances share one of each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from proxy.storage.ledger import Ledger, LocalLedger
from proxy.storage.writer import UsageLog

POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_SPOOL_DIR = "meterproxy-spool"


class LedgerUnavailable(Exception):
    """The shared ledger cannot be reached; `storage.ledger_failure` says what to do."""


class LogUnavailable(Exception):
    """The usage log's database cannot be reached; rows go to the local spool meanwhile."""


def needs_extra(module: str, what: str) -> None:
    """One clear line, not a ModuleNotFoundError traceback, when an extra is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{what} needs the {module!r} package: "
                         "pip install 'meterproxy[scale]'")


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def is_redis(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def open_usage_log(url: str, *, spool_dir: str | None = None) -> UsageLog:
    """The usage log a `storage.usage_log` URL names.

    A PostgreSQL log is wrapped in a spool: while the database is unreachable, rows go to
    an append-only file under `spool_dir` and are replayed in order when it returns.
    """
    if url.startswith("sqlite:///"):
        from proxy.storage.sqlite import SqliteUsageLog

        return SqliteUsageLog(url)
    if is_postgres(url):
        needs_extra("psycopg", "a postgresql:// usage log")
        from proxy.storage.postgres import PostgresUsageLog
        from proxy.storage.spool import SpooledUsageLog

        return SpooledUsageLog(PostgresUsageLog(url), Path(spool_dir or DEFAULT_SPOOL_DIR))
    raise ValueError(f"storage.usage_log: unsupported URL {url!r} "
                     "(use sqlite:///file.db or postgresql://user@host/db)")


def journal_dir(url: str, spool_dir: str | None = None) -> Path:
    """Where the journal of open calls lives: beside a SQLite file (`usage.db.calls/`; not
    `-journal`, which is SQLite's own),
    in the spool directory for PostgreSQL (each instance keeps its own, locked, files)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///") + ".calls")
    return Path(spool_dir or DEFAULT_SPOOL_DIR)


def open_ledger(url: str, on_lost: Callable[[], Awaitable[None]] | None = None) -> Ledger:
    """The budget ledger a `storage.ledger` setting names.

    `on_lost` is awaited when a shared ledger turns out to have lost its data (Redis
    restarted empty), to rebuild spend from the usage log."""
    if url == "local":
        return LocalLedger()
    if is_redis(url):
        needs_extra("redis", "a redis:// ledger")
        from proxy.storage.redis_ledger import RedisLedger

        return RedisLedger(url, on_lost)
    raise ValueError(f"storage.ledger: unsupported ledger {url!r} "
                     "(use local or redis://host:6379/0)")
