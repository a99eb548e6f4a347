"""Spend anomaly episodes, in the usage log's database (table `anomalies`, m007).

The table sits beside `usage` so that every instance sharing a PostgreSQL log, and the
CLI, see one set of episodes: opening one is an INSERT that the partial unique index on
(scope_kind, scope_value) of active episodes lets only one instance win (the winner
announces it), and a clear from any instance or the CLI is a row every instance reads at
its next check. Every method is blocking: callers run them off the event loop.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy import money
from proxy.storage import POSTGRES_SCHEMES
from proxy.timeparse import to_ts

ACTIVE = ("open", "blocked")
STATES = ("open", "blocked", "resolved", "cleared")
_COLUMNS = ("id", "scope_kind", "scope_value", "state", "action", "started_at",
            "last_seen_at", "ended_at", "observed_usd", "baseline_usd", "threshold_usd",
            "method", "cleared_by")


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One episode: a scope whose trailing hour of spend went over its threshold."""

    id: str
    scope_kind: str  # key | customer | feature
    scope_value: str
    state: str  # open | blocked (active), resolved | cleared (ended)
    action: str  # alert | block
    started_at: datetime
    last_seen_at: datetime  # the last check that found it over its threshold
    observed_usd: Decimal  # the highest trailing-hour spend seen in the episode
    baseline_usd: Decimal  # what that hour usually costs
    threshold_usd: Decimal  # what it may cost before it is an anomaly
    method: str  # weekly | daily | recent: which history the baseline came from
    ended_at: datetime | None = None
    cleared_by: str | None = None

    @property
    def scope(self) -> tuple[str, str]:
        return self.scope_kind, self.scope_value

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "scope": self.scope_kind, "value": self.scope_value,
                "state": self.state, "action": self.action,
                "started_at": to_ts(self.started_at), "last_seen_at": to_ts(self.last_seen_at),
                "ended_at": to_ts(self.ended_at) if self.ended_at else None,
                "observed_usd": money.exact(self.observed_usd),
                "baseline_usd": money.exact(self.baseline_usd),
                "threshold_usd": money.exact(self.threshold_usd), "method": self.method,
                "cleared_by": self.cleared_by}


def new_anomaly_id(now: datetime) -> str:
    """`an-` and a sortable time prefix and 8 random hex digits: short enough to type."""
    return f"an-{now.astimezone(UTC):%Y%m%d%H%M}-{secrets.token_hex(4)}"


class AnomalyStore:
    """The `anomalies` table on one connection (SQLite or PostgreSQL)."""

    def __init__(self, conn: Any, param: str, exact: bool) -> None:
        self.conn = conn
        self.p = param
        self.exact = exact  # PostgreSQL NUMERIC; SQLite keeps Decimal text

    def _execute(self, sql: str, params: list[Any]) -> int:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            count = cur.rowcount
            self.conn.commit()
            return count
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            cur.close()

    def _select(self, where: str, params: list[Any], limit: int | None = None
                ) -> list[Anomaly]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM anomalies WHERE {where} " \
              "ORDER BY started_at DESC, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            rows = cur.fetchall()
        finally:
            cur.close()
        self.conn.commit()  # end the read transaction: no snapshot lingers
        return [_anomaly(row) for row in rows]

    def _money(self, value: Decimal) -> Any:
        return value if self.exact else str(value)

    def open(self, a: Anomaly) -> bool:
        """Record a new active episode; False if the scope already has one (another
        instance opened it first)."""
        values = [a.id, a.scope_kind, a.scope_value, a.state, a.action, to_ts(a.started_at),
                  to_ts(a.last_seen_at), None, self._money(a.observed_usd),
                  self._money(a.baseline_usd), self._money(a.threshold_usd), a.method, None]
        marks = ", ".join(self.p for _ in _COLUMNS)
        return self._execute(f"INSERT INTO anomalies ({', '.join(_COLUMNS)}) VALUES ({marks}) "
                             "ON CONFLICT DO NOTHING", values) == 1

    def seen(self, anomaly_id: str, observed: Decimal, at: datetime) -> None:
        """Still over its threshold at `at`; the peak spend is kept."""
        p = self.p
        cast = "" if self.exact else "CAST(observed_usd AS REAL)"
        peak = f"CASE WHEN {cast or 'observed_usd'} < {p} THEN {p} ELSE observed_usd END"
        compare = observed if self.exact else float(observed)
        self._execute(f"UPDATE anomalies SET last_seen_at = {p}, observed_usd = {peak} "
                      f"WHERE id = {p} AND state IN ('open', 'blocked')",
                      [to_ts(at), compare, self._money(observed), anomaly_id])

    def resolve(self, anomaly_id: str, at: datetime) -> bool:
        """An alert-only episode whose spend is back to normal: it ends by itself."""
        p = self.p
        return self._execute(f"UPDATE anomalies SET state = 'resolved', ended_at = {p} "
                             f"WHERE id = {p} AND state = 'open'",
                             [to_ts(at), anomaly_id]) == 1

    def clear(self, anomaly_id: str, by: str, at: datetime) -> Anomaly | None:
        """An operator ends an active episode (a blocked scope's calls pass again).
        Returns the cleared episode, or None if no active episode has this id."""
        p = self.p
        changed = self._execute(f"UPDATE anomalies SET state = 'cleared', ended_at = {p}, "
                                f"cleared_by = {p} WHERE id = {p} AND state IN "
                                "('open', 'blocked')", [to_ts(at), by, anomaly_id])
        return self.get(anomaly_id) if changed else None

    def get(self, anomaly_id: str) -> Anomaly | None:
        found = self._select(f"id = {self.p}", [anomaly_id])
        return found[0] if found else None

    def active(self) -> list[Anomaly]:
        return self._select("state IN ('open', 'blocked')", [])

    def recent(self, since: datetime, limit: int = 1000) -> list[Anomaly]:
        """Every active episode, and those that ended since `since`, newest first."""
        p = self.p
        return self._select(f"state IN ('open', 'blocked') OR ended_at >= {p}",
                            [to_ts(since)], limit)

    def cleared_since(self, since: datetime) -> list[Anomaly]:
        """Episodes cleared since `since`: a check counts their scope's spend from then."""
        return self._select(f"state = 'cleared' AND ended_at >= {self.p}", [to_ts(since)])


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _anomaly(row: tuple[Any, ...]) -> Anomaly:
    data = dict(zip(_COLUMNS, row, strict=True))
    for name in ("observed_usd", "baseline_usd", "threshold_usd"):
        data[name] = Decimal(str(data[name]))
    for name in ("started_at", "last_seen_at", "ended_at"):
        data[name] = _when(data[name])
    return Anomaly(**data)


@contextmanager
def open_anomalies(usage_log_url: str) -> Iterator[AnomalyStore]:
    """An AnomalyStore on a fresh writable connection to the usage log's database."""
    if usage_log_url.startswith("sqlite:///"):
        from proxy.storage.sqlite import connect, sqlite_path

        path = sqlite_path(usage_log_url)
        if not path.exists():
            raise ValueError(f"no usage log at {path} yet: run meterproxy serve first")
        conn = connect(path)
        store = AnomalyStore(conn, "?", exact=False)
        try:
            try:
                conn.execute("SELECT 1 FROM anomalies LIMIT 1")
            except sqlite3.OperationalError:
                raise ValueError(f"the usage log at {path} has no anomalies table yet: "
                                 "run this version's meterproxy serve once") from None
            yield store
        finally:
            conn.close()
        return
    if usage_log_url.startswith(POSTGRES_SCHEMES):
        from proxy.storage.postgres import connect

        conn = connect(usage_log_url, autocommit=False)
        try:
            yield AnomalyStore(conn, "%s", exact=True)
        finally:
            conn.close()
        return
    raise ValueError(f"storage.usage_log: cannot read {usage_log_url!r} "
                     "(supported: sqlite:///file.db, postgresql://...)")

