"""Backtest of the spend anomaly check: precision, recall and time to detect.

Writes a synthetic usage log (the project's SQLite schema) of six weeks of calls from 24
customers on 6 keys and 8 features, with a daily and weekly rhythm, noisy call counts and
lognormal call costs, plus injected incidents with known start and end. Then it replays
the last two weeks minute by minute, every `--step` minutes, the way the running proxy
checks: baselines rebuilt at each clock hour from the log's hourly spend
(proxy.anomaly.baseline), the trailing hour per scope compared by the proxy's own
AnomalyGuard._findings, episodes opened once and (alert mode) resolved after 30 quiet
minutes. An episode on an incident's scope between its start and an hour after its end
detects it; any other episode is a false alarm.

    python -m bench.anomalybench [--seed 7] [--step 1] [--min-usd 1,3] [--fresh] [--verbose]
"""

from __future__ import annotations

import argparse
import math
import random
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from proxy.anomaly.baseline import baselines, hour_start
from proxy.anomaly.guard import AnomalyGuard
from proxy.config import AnomaliesConfig
from proxy.storage import rollups
from proxy.storage.readers import open_reader
from proxy.storage.sqlite import migrate

START = datetime(2026, 10, 19, tzinfo=UTC)  # a Monday
WEEKS = 6
EVAL_FROM = START + timedelta(weeks=4)
WEEKDAY = (1.0, 1.05, 1.05, 1.0, 0.9, 0.35, 0.3)
HOURLY = (0.15, 0.12, 0.1, 0.1, 0.12, 0.2, 0.4, 0.8, 1.2, 1.4, 1.5, 1.5,
          1.4, 1.5, 1.5, 1.4, 1.3, 1.1, 0.9, 0.7, 0.5, 0.35, 0.25, 0.2)
KEYS = [f"team-{i}" for i in range(6)]
FEATURES = ["chat", "search", "summarize", "classify", "agent", "extract", "embed", "translate"]


@dataclass(frozen=True)
class Incident:
    name: str
    kind: str
    value: str
    start: datetime
    end: datetime
    usd_per_hour: float  # extra spend at full strength
    ramp: bool = False  # rises linearly from 0 to full strength over the first 3/4


INCIDENTS = [
    # A runaway loop at 3 am on a Wednesday: a quiet hour, a customer's agent retrying.
    Incident("3 am spike", "customer", "cust-07", EVAL_FROM + timedelta(days=2, hours=3),
             EVAL_FROM + timedelta(days=2, hours=4), 40.0),
    # A prompt that grows over half a day (a feature's context bloats with each release).
    Incident("slow ramp", "feature", "summarize", EVAL_FROM + timedelta(days=3, hours=6),
             EVAL_FROM + timedelta(days=3, hours=22), 30.0, ramp=True),
    # An agent loop in the middle of a busy Tuesday afternoon, on one key.
    Incident("daytime loop", "key", "team-3", EVAL_FROM + timedelta(days=8, hours=14),
             EVAL_FROM + timedelta(days=8, hours=15, minutes=30), 25.0),
    # A Saturday batch job run by mistake on an expensive model.
    Incident("weekend batch", "customer", "cust-15", EVAL_FROM + timedelta(days=12, hours=10),
             EVAL_FROM + timedelta(days=12, hours=12), 15.0),
    # Small: +$1.5/h for two hours on a mid-size customer; below what the check should call.
    Incident("small bump", "customer", "cust-04", EVAL_FROM + timedelta(days=9, hours=10),
             EVAL_FROM + timedelta(days=9, hours=12), 1.5),
]


def customers(rng: random.Random) -> list[tuple[str, str, float, list[str]]]:
    """Each customer: its key, its mean spend per busy hour, the features it uses."""
    found = []
    for i in range(24):
        rate = math.exp(rng.gauss(math.log(2.0), 0.9))
        found.append((f"cust-{i:02d}", KEYS[i % len(KEYS)], rate,
                      rng.sample(FEATURES, 3)))
    return found


def write_log(path: Path, seed: int) -> int:
    """The synthetic log: normal traffic plus the incidents; returns the row count."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    migrate(path)
    rows = []
    hour = START
    people = customers(rng)
    # The rows of one incident carry its customer, key or feature; the rest are drawn.
    by_name = {c[0]: c for c in people}
    while hour < START + timedelta(weeks=WEEKS):
        season = WEEKDAY[hour.weekday()] * HOURLY[hour.hour]
        for name, key, rate, features in people:
            mean_usd = rate * season * rng.lognormvariate(0, 0.25)
            per_call = 0.2 * rng.lognormvariate(0, 0.3)
            calls = _poisson(rng, mean_usd / per_call)
            for _ in range(calls):
                rows.append(_row(len(rows), hour + timedelta(seconds=rng.uniform(0, 3600)),
                                 key, name, rng.choice(features),
                                 per_call * rng.lognormvariate(0, 0.5)))
        for inc in INCIDENTS:
            if not inc.start <= hour < inc.end:
                continue
            for minute in range(60):
                at = hour + timedelta(minutes=minute)
                if at >= inc.end:
                    break
                strength = 1.0
                if inc.ramp:
                    span = (inc.end - inc.start) * 0.75
                    strength = min(1.0, (at - inc.start) / span)
                usd = inc.usd_per_hour * strength / 60
                if inc.kind == "customer":
                    name, key, _, features = by_name[inc.value]
                    feature = features[0]
                elif inc.kind == "feature":
                    name, key, feature = "cust-01", "team-1", inc.value
                else:
                    name, key, feature = "cust-03", inc.value, "agent"
                rows.append(_row(len(rows), at, key, name, feature, usd))
        hour += timedelta(hours=1)
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany("INSERT INTO usage (id, ts, key_name, customer, feature, provider, "
                         "model, outcome, cost_usd) VALUES (?, ?, ?, ?, ?, 'openai', "
                         "'gpt-4o-mini', 'ok', ?)", rows)
        for statement in rollups.fold_sql("sqlite", "usage"):  # as the writer would
            conn.execute(statement)
    conn.close()
    return len(rows)


def _row(i: int, at: datetime, key: str, customer: str, feature: str, usd: float) -> tuple:
    return (f"r{i:08d}", at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), key, customer, feature,
            round(usd, 10))


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


@dataclass
class Episode:
    kind: str
    value: str
    start: datetime
    last_seen: datetime


def replay(path: Path, confs: list[AnomaliesConfig], step_min: int
           ) -> list[list[Episode]]:
    """Every episode the check opens over the evaluation weeks, checking every step, for
    each configuration (they share the baselines: sensitivity only moves the limit)."""
    url = f"sqlite:///{path}"
    conf = confs[0]
    with open_reader(url) as reader:
        hourly = {kind: defaultdict(dict) for kind in conf.scopes}
        for kind in conf.scopes:
            for spent in reader.spend_by_hour([kind], START):
                hourly[kind][spent.attrs[kind]][spent.hour] = spent.usd
        minutes = defaultdict(list)
        for row in reader.spend_by_minute(conf.scopes, EVAL_FROM - timedelta(hours=1)):
            minutes[row.hour].append(row)
    guard = AnomalyGuard()
    episodes: list[list[Episode]] = [[] for _ in confs]
    active: list[dict[tuple[str, str], Episode]] = [{} for _ in confs]
    now = EVAL_FROM
    built_for = None
    quiet = timedelta(minutes=conf.resolve_after_minutes)
    while now < START + timedelta(weeks=WEEKS):
        hour = hour_start(now)
        if built_for != hour:  # one set of baselines per min_usd (it is their offset)
            models = {c.min_usd: {kind: baselines(hourly[kind], now, conf.weeks,
                                                  conf.min_history_hours,
                                                  Decimal(repr(c.min_usd)))
                                  for kind in conf.scopes} for c in confs}
            built_for = hour
        window = [row for m in range(61) for row in minutes.get(
            (now - timedelta(minutes=m)).replace(second=0, microsecond=0), [])]
        for i, c in enumerate(confs):
            guard._models = models[c.min_usd]
            found = guard._findings(c, now, window, {}, Decimal(repr(c.min_usd)))
            for scope in found:
                if scope in active[i]:
                    active[i][scope].last_seen = now
                else:
                    active[i][scope] = Episode(scope[0], scope[1], now, now)
                    episodes[i].append(active[i][scope])
            for scope, ep in list(active[i].items()):
                if scope not in found and now - ep.last_seen >= quiet:
                    del active[i][scope]
        now += timedelta(minutes=step_min)
    return episodes


def score(episodes: list[Episode]) -> dict:
    detected = {}
    true_eps = 0
    for ep in episodes:
        hit = next((inc for inc in INCIDENTS if (inc.kind, inc.value) == (ep.kind, ep.value)
                    and inc.start <= ep.start <= inc.end + timedelta(hours=1)), None)
        # An incident also shows in its customer's key and feature: an episode there,
        # during the incident, is the same event seen from another scope.
        related = next((inc for inc in INCIDENTS
                        if inc.start <= ep.start <= inc.end + timedelta(hours=1)), None)
        if hit is not None:
            true_eps += 1
            detected.setdefault(hit.name, ep.start - hit.start)
        elif related is not None:
            true_eps += 1
    found = len(detected)
    return {"episodes": len(episodes), "true": true_eps,
            "precision": true_eps / len(episodes) if episodes else 1.0,
            "recall": found / len(INCIDENTS), "detected": detected,
            "false": [(e.kind, e.value, e.start) for e in episodes
                      if not any(inc.start <= e.start <= inc.end + timedelta(hours=1)
                                 for inc in INCIDENTS)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fresh", action="store_true", help="rewrite the log even if --out exists")
    parser.add_argument("--verbose", action="store_true", help="list every false alarm")
    parser.add_argument("--step", type=int, default=1, help="minutes between checks")
    parser.add_argument("--min-usd", default="1,3", help="min_usd values to compare")
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "meterproxy-anomalybench.db")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if not args.out.exists() or args.fresh:
        count = write_log(args.out, args.seed)
        print(f"log: {count:,} rows, {WEEKS} weeks, in {time.perf_counter() - t0:.1f} s",
              flush=True)
    confs = [AnomaliesConfig(sensitivity=n, min_usd=float(m))
             for m in args.min_usd.split(",") for n in ("low", "medium", "high")]
    t0 = time.perf_counter()
    runs = replay(args.out, confs, args.step)
    print(f"replay: 2 weeks, a check every {args.step} min, "
          f"in {time.perf_counter() - t0:.1f} s")
    for conf, episodes in zip(confs, runs, strict=True):
        result = score(episodes)
        print(f"\nsensitivity {conf.sensitivity}, min_usd {conf.min_usd:g}: "
              f"{result['episodes']} episodes, {result['true']} true, "
              f"{len(result['false'])} false alarms ({len(result['false']) / 14:.1f}/day), "
              f"precision {result['precision']:.2f}, recall {result['recall']:.2f}",
              flush=True)
        for inc in INCIDENTS:
            took = result["detected"].get(inc.name)
            shown = f"{took.total_seconds() / 60:.0f} min" if took is not None else "missed"
            print(f"  {inc.name:<14} {inc.kind}={inc.value:<10} +${inc.usd_per_hour:g}/h  "
                  f"{shown}")
        if args.verbose:
            for kind, value, start in result["false"]:
                print(f"  false alarm: {kind}={value} at {start:%a %d %H:%M}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
