"""The running anomaly check, and the set of blocked scopes every call looks up.

Once a minute (`anomalies.check_every_s`) a background task reads, in a thread, the
trailing hour of spend per key, customer and feature from the usage log (rows of every
instance sharing it) and the active episodes, compares each scope with its baseline
(recomputed once per clock hour, see proxy.anomaly.baseline), and opens, refreshes or
resolves episodes in the `anomalies` table. A new episode is announced (log line, metric,
webhook) only by the instance whose INSERT opened it, so once per episode however many
instances run. The call path only reads `blocked`, a dict swapped whole by each check:
no I/O and no statistics per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from proxy.anomaly.baseline import Baseline, Finding, baselines, hour_start, judge
from proxy.config import AnomaliesConfig, AnomalyAction
from proxy.metrics import gauge, labels_text
from proxy.storage.anomalies import Anomaly, new_anomaly_id, open_anomalies
from proxy.storage.readers import open_reader
from proxy.webhook import post_event

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = structlog.get_logger("meterproxy.anomalies")
WINDOW = timedelta(hours=1)
Scope = tuple[str, str]


class AnomalyGuard:
    """Process-long: the blocked scopes, the baselines of this hour, the check loop."""

    def __init__(self) -> None:
        # (kind, value) -> id of the blocking episode; replaced whole, never edited.
        self.blocked: dict[Scope, str] = {}
        self.active: dict[Scope, Anomaly] = {}
        self.announced: defaultdict[str, int] = defaultdict(int)  # episodes, by kind
        self._models: dict[str, dict[str, Baseline]] = {}
        self._models_for: tuple[datetime, AnomaliesConfig] | None = None
        # Cleared episode id -> (scope, when its spend starts counting again).
        self._clears: dict[str, tuple[Scope, datetime]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self, current: Callable[[], Runtime]) -> None:
        """Check now (so blocks survive a restart at once), then every check_every_s."""
        async def loop() -> None:
            while True:
                rt = current()
                try:
                    await self.check(rt)
                except Exception:
                    log.exception("anomaly_check_failed")
                conf = rt.settings.anomalies
                await asyncio.sleep(conf.check_every_s if conf is not None else 60)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self, rt: Runtime) -> list[Anomaly]:
        """One pass over every watched scope; returns the episodes this instance opened."""
        conf = rt.settings.anomalies
        if conf is None:
            self.blocked, self.active = {}, {}
            return []
        async with self._lock:
            return await self._check(rt, conf)

    async def _check(self, rt: Runtime, conf: AnomaliesConfig) -> list[Anomaly]:
        loop = asyncio.get_running_loop()
        now = rt.now()
        url = rt.settings.storage.usage_log
        min_usd = Decimal(repr(conf.min_usd))
        hour = hour_start(now)
        stale = self._models_for is None or self._models_for != (hour, conf)

        def read() -> tuple[dict[str, dict[str, Baseline]] | None, Any, list[Anomaly],
                            list[Anomaly]]:
            rt.writer.flush()
            with open_reader(url) as reader:
                models = None
                if stale:
                    models = {}
                    for kind in conf.scopes:
                        hourly: dict[str, dict[datetime, Decimal]] = defaultdict(dict)
                        for spent in reader.spend_by_hour(
                                [kind], hour - timedelta(weeks=conf.weeks)):
                            value = spent.attrs[kind]
                            if value is not None:
                                hourly[value][spent.hour] = spent.usd
                        models[kind] = baselines(hourly, now, conf.weeks,
                                                 conf.min_history_hours, min_usd)
                minutes = reader.spend_by_minute(conf.scopes, now - WINDOW)
            with open_anomalies(url) as store:
                return models, minutes, store.active(), store.cleared_since(now - WINDOW)

        models, minutes, active, cleared = await loop.run_in_executor(None, read)
        if models is not None:
            self._models, self._models_for = models, (hour, conf)
        findings = self._findings(conf, now, minutes, self._cleared(cleared, now), min_usd)
        current = {a.scope: a for a in active}
        fresh = [self._episode(f, conf, now) for scope, f in findings.items()
                 if scope not in current]
        seen = [(current[scope].id, f.observed) for scope, f in findings.items()
                if scope in current]
        quiet = timedelta(minutes=conf.resolve_after_minutes)
        ended = [a.id for scope, a in current.items() if a.state == "open"
                 and scope not in findings and now - a.last_seen_at >= quiet]

        def write() -> tuple[list[Anomaly], list[Anomaly]]:
            with open_anomalies(url) as store:
                won = [a for a in fresh if store.open(a)]
                for anomaly_id, observed in seen:
                    store.seen(anomaly_id, observed, now)
                for anomaly_id in ended:
                    store.resolve(anomaly_id, now)
                return won, store.active()

        won, active = await loop.run_in_executor(None, write)
        self._adopt(active)
        for anomaly_id in ended:
            log.info("anomaly_resolved", id=anomaly_id)
        for anomaly in won:
            self._announce(rt, anomaly)
        return won

    def _cleared(self, cleared: list[Anomaly], now: datetime) -> dict[Scope, datetime]:
        """When each recently cleared scope's spend starts counting again. A clear stamped
        by a clock ahead of ours (the CLI on another host) counts from when we first
        see it, never from the future."""
        for a in cleared:
            if a.id not in self._clears and a.ended_at is not None:
                self._clears[a.id] = (a.scope, min(a.ended_at, now))
        self._clears = {i: c for i, c in self._clears.items() if c[1] >= now - WINDOW}
        latest: dict[Scope, datetime] = {}
        for scope, at in self._clears.values():
            latest[scope] = max(at, latest.get(scope, at))
        return latest

    def _findings(self, conf: AnomaliesConfig, now: datetime, minutes: Iterable[Any],
                  cleared: dict[Scope, datetime], min_usd: Decimal) -> dict[Scope, Finding]:
        """The trailing hour of each scope (from its last clear, if later) over its limit."""
        start = now - WINDOW
        spent: dict[str, dict[str, Decimal]] = {kind: defaultdict(Decimal)
                                                for kind in conf.scopes}
        for row in minutes:
            if row.hour > now:
                continue
            for kind in conf.scopes:
                value = row.attrs.get(kind)
                if value is None:
                    continue
                since = max(start, cleared.get((kind, value), start))
                if row.hour >= since.replace(second=0, microsecond=0):
                    spent[kind][value] += row.usd
        found: dict[Scope, Finding] = {}
        for kind in conf.scopes:
            for f in judge(kind, self._models.get(kind, {}), spent[kind], now,
                           conf.threshold, min_usd):
                found[(kind, f.value)] = f
        return found

    @staticmethod
    def _episode(f: Finding, conf: AnomaliesConfig, now: datetime) -> Anomaly:
        block = conf.action is AnomalyAction.BLOCK
        return Anomaly(id=new_anomaly_id(now), scope_kind=f.kind, scope_value=f.value,
                       state="blocked" if block else "open", action=conf.action.value,
                       started_at=now, last_seen_at=now, observed_usd=f.observed,
                       baseline_usd=f.usual, threshold_usd=f.limit, method=f.method)

    def _adopt(self, active: list[Anomaly]) -> None:
        self.active = {a.scope: a for a in active}
        self.blocked = {a.scope: a.id for a in active if a.state == "blocked"}

    def _announce(self, rt: Runtime, anomaly: Anomaly) -> None:
        event = {"event": "anomaly", **anomaly.to_json()}
        self.announced[anomaly.scope_kind] += 1
        log.warning("anomaly_detected", **anomaly.to_json())
        url = rt.settings.alerts.webhook_url
        if url:
            rt.spawn(self._post(rt, url, event))

    @staticmethod
    async def _post(rt: Runtime, url: str, event: dict[str, Any]) -> None:
        if not await post_event(rt.session, url, event, "anomaly"):
            log.error("anomaly_webhook_gave_up", id=event["id"])

    async def clear(self, rt: Runtime, anomaly_id: str, by: str) -> Anomaly | None:
        """An operator ends an active episode: here at once, elsewhere at the next check.
        Spend is then counted from this moment, so the same spike does not reopen it."""
        loop = asyncio.get_running_loop()
        now = rt.now()

        def run() -> Anomaly | None:
            with open_anomalies(rt.settings.storage.usage_log) as store:
                return store.clear(anomaly_id, by, now)

        async with self._lock:
            cleared = await loop.run_in_executor(None, run)
            if cleared is not None:
                self._adopt([a for a in self.active.values() if a.id != anomaly_id])
                self._clears[anomaly_id] = (cleared.scope, now)
        if cleared is not None:
            log.warning("anomaly_cleared", id=anomaly_id, scope=cleared.scope_kind,
                        by=by, action=cleared.action)
        return cleared

    def gauges(self) -> list[str]:
        """Active episodes by scope kind and state, and episodes announced here."""
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for a in self.active.values():
            counts[(a.scope_kind, a.state)] += 1
        lines = gauge("meterproxy_anomalies_active",
                      "Spend anomaly episodes open now, by scope kind and state.",
                      [((("scope", kind), ("state", state)), n)
                       for (kind, state), n in sorted(counts.items())])
        name = "meterproxy_anomalies_total"
        lines += [f"# HELP {name} Spend anomaly episodes this instance announced.",
                  f"# TYPE {name} counter"]
        lines += [f"{name}{labels_text((('scope', kind),))} {n}"
                  for kind, n in sorted(self.announced.items())]
        return lines
