"""Storage behind narrow interfaces: the usage log (append rows, query) and the ledger."""

from __future__ import annotations

from proxy.storage.ledger import Ledger, LocalLedger
from proxy.storage.writer import UsageLog


def open_usage_log(url: str) -> UsageLog:
    """The usage log a `storage.usage_log` URL names."""
    if url.startswith("sqlite:///"):
        from proxy.storage.sqlite import SqliteUsageLog

        return SqliteUsageLog(url)
    raise ValueError(f"storage.usage_log: unsupported URL {url!r} (use sqlite:///file.db)")


def open_ledger(url: str) -> Ledger:
    """The budget ledger a `storage.ledger` setting names."""
    if url == "local":
        return LocalLedger()
    raise ValueError(f"storage.ledger: unsupported ledger {url!r} (use local)")
