"""The SQLite usage log: schema migrations, batched inserts, WAL mode.

The file opens cleanly in `sqlite-utils` and `datasette`. Migrations are an append-only
list (`proxy.storage.sqlite_migrations`); never edit one that has shipped, add the next.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from proxy.storage import rollups
from proxy.storage.row import COLUMNS, UsageRow

# The migrations' names in order, readable without importing sqlite_utils: `migrate()`
# compares them with the `_sqlite_migrations` table and loads the registry (and
# sqlite_utils) only when one is pending.
MIGRATION_NAMES = ("m001_usage", "m002_views", "m003_query_indexes", "m004_token_classes",
                   "m005_call_shape", "m006_rollups", "m007_anomalies",
                   "m008_views_count_calls")
_MIGRATION_SET = "meterproxy"  # sqlite_utils' migration_set column


def __getattr__(name: str) -> Any:
    """`proxy.storage.sqlite.migrations`, the registry, loaded on first use."""
    if name == "migrations":
        from proxy.storage.sqlite_migrations import migrations
        return migrations
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sqlite_path(url: str) -> Path:
    """The file of a `sqlite:///relative.db` or `sqlite:////absolute.db` URL."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r} (write sqlite:///file.db)")
    return Path(url[len("sqlite:///"):])


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pragmas every user of the log wants."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    """The names of the migrations not applied to this log yet, read with plain sqlite3."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                    "AND name = '_sqlite_migrations'").fetchone() is None:
        return list(MIGRATION_NAMES)
    applied = {name for (name,) in conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (_MIGRATION_SET,))}
    return [name for name in MIGRATION_NAMES if name not in applied]


def migrate(path: Path) -> list[str]:
    """Create or upgrade the schema; returns the names of the migrations applied now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        if not pending_migrations(conn):
            return []  # up to date: sqlite_utils stays unimported
        import sqlite_utils

        from proxy.storage.sqlite_migrations import migrations

        db = sqlite_utils.Database(conn)
        pending = [m.name for m in migrations.pending(db)]
        migrations.apply(db)
        return pending
    finally:
        conn.close()


# A batch is staged in a temporary table (a replayed row twice in it stays one), rows
# already logged are dropped from it, the rest move into `usage` and are folded into
# every rollup: all in one transaction, so the rollups always equal the rows.
_STAGE_TABLE = (f"CREATE TEMP TABLE IF NOT EXISTS usage_incoming (id TEXT PRIMARY KEY, "
                f"{', '.join(c for c in COLUMNS if c != 'id')})")
_STAGE = (f"INSERT OR IGNORE INTO temp.usage_incoming ({', '.join(COLUMNS)}) "
          f"VALUES ({', '.join('?' for _ in COLUMNS)})")
_DROP_LOGGED = ("DELETE FROM temp.usage_incoming WHERE EXISTS "
                "(SELECT 1 FROM main.usage AS u WHERE u.id = usage_incoming.id)")
_MOVE = (f"INSERT INTO main.usage ({', '.join(COLUMNS)}) "
         f"SELECT {', '.join(COLUMNS)} FROM temp.usage_incoming")
_FOLD = rollups.fold_sql("sqlite", "temp.usage_incoming")
_CLEAR = "DELETE FROM temp.usage_incoming"


class SqliteUsageLog:
    """Appends rows to one SQLite file. Used from the writer thread only."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        migrate(self.path)
        self._conn = connect(self.path)
        self._conn.execute("PRAGMA temp_store=MEMORY")
        self._conn.execute(_STAGE_TABLE)

    def write(self, rows: list[UsageRow]) -> None:
        """Insert the rows not logged yet and fold them into the rollups, atomically."""
        assert self._conn is not None, "open() first"
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")  # another process's writes cannot interleave
        try:
            conn.executemany(_STAGE, [row.values() for row in rows])
            conn.execute(_DROP_LOGGED)
            conn.execute(_MOVE)
            for statement in _FOLD:
                conn.execute(statement)
            conn.execute(_CLEAR)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    def close(self) -> None:
        if self._conn is not None:
            # Refreshes the planner's statistics where they went stale (SQLite's advice).
            self._conn.execute("PRAGMA optimize")
            self._conn.close()
            self._conn = None
