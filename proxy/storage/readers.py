"""Read access to the usage log, whatever holds it: a connection and its SQL flavor.

Every reader of the log (CLI, admin API, report, dashboard) opens it here, so a new
backend adds one branch to `open_reader` and a `SqlFlavor` in `proxy.query`.
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

from proxy.query import SQLITE, SqlFlavor
from proxy.storage import POSTGRES_SCHEMES


def open_reader(usage_log_url: str) -> tuple[Any, SqlFlavor]:
    """A read-only DB-API connection to the usage log and the flavor of its SQL."""
    if usage_log_url.startswith("sqlite:///"):
        from proxy.storage.sqlite import connect, sqlite_path

        path = sqlite_path(usage_log_url)
        if not path.exists():
            raise ValueError(f"no usage log at {path} yet: run meterproxy serve first")
        conn = connect(path, readonly=True)
        _ensure_math(conn)
        return conn, SQLITE
    if usage_log_url.startswith(POSTGRES_SCHEMES):
        from proxy.query import POSTGRES
        from proxy.storage.postgres import connect_reader

        return connect_reader(usage_log_url), POSTGRES
    raise ValueError(f"storage.usage_log: cannot read {usage_log_url!r} "
                     "(supported: sqlite:///file.db, postgresql://...)")


def _ensure_math(conn: sqlite3.Connection) -> None:
    """SQLite builds without its math functions still get `ln` (for duration percentiles)."""
    try:
        conn.execute("SELECT ln(2)").fetchone()
    except sqlite3.OperationalError:
        conn.create_function("ln", 1, lambda x: math.log(x) if x and x > 0 else None,
                             deterministic=True)
