"""A synthetic usage log: N rows in the project's SQLite schema, for query benchmarks.

The distributions are shaped like a real deployment's: a few hundred customers with a
long tail, a dozen features tied to their endpoints and models, three providers,
streams, cache hits and reasoning tokens, a few errors, tags as JSON, and 60 days of
timestamps with a weekly pattern, office hours and a growth trend. The same seed gives
the same file.

    python -m bench.loggen [--rows 5000000] [--out /tmp/meterproxy-synthetic-usage.db]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from proxy.storage import rollups
from proxy.storage.row import COLUMNS
from proxy.storage.sqlite import migrate

DEFAULT_OUT = Path(tempfile.gettempdir()) / "meterproxy-synthetic-usage.db"
DAYS = 60
BATCH = 50_000
# Relative traffic per weekday (Monday first) and per UTC hour, and growth over the span.
WEEKDAY = (1.0, 1.05, 1.05, 1.0, 0.9, 0.4, 0.3)
HOURLY = (0.25, 0.2, 0.2, 0.2, 0.25, 0.35, 0.6, 0.9, 1.2, 1.4, 1.5, 1.5,
          1.4, 1.5, 1.5, 1.4, 1.3, 1.1, 0.9, 0.7, 0.55, 0.45, 0.35, 0.3)
GROWTH = 0.6  # the last day sees 60% more traffic than the first

# provider, model, $/Mtok input, cached input, output, reasoning model?
MODELS: dict[str, tuple[str, float, float, float, bool]] = {
    "gpt-4o-mini": ("openai", 0.15, 0.075, 0.60, False),
    "gpt-4o": ("openai", 2.50, 1.25, 10.0, False),
    "gpt-4.1-mini": ("openai", 0.40, 0.10, 1.60, False),
    "gpt-4.1-nano": ("openai", 0.10, 0.025, 0.40, False),
    "o4-mini": ("openai", 1.10, 0.275, 4.40, True),
    "gpt-5-mini": ("openai", 0.25, 0.025, 2.0, True),
    "text-embedding-3-small": ("openai", 0.02, 0.02, 0.0, False),
    "claude-3-5-haiku-20241022": ("anthropic", 0.80, 0.08, 4.0, False),
    "claude-sonnet-4-20250514": ("anthropic", 3.0, 0.30, 15.0, False),
    "gemini-2.0-flash": ("gemini", 0.10, 0.025, 0.40, False),
    "gemini-2.5-pro": ("gemini", 1.25, 0.31, 10.0, True),
}
ENDPOINTS = {"openai": "chat.completions", "anthropic": "messages",
             "gemini": "generateContent"}
# feature: weight, endpoint kind, {model: weight}, median input tokens, median output tokens
FEATURES: dict[str, tuple[float, str, dict[str, float], int, int]] = {
    "chat": (30, "chat", {"gpt-4o-mini": 5, "gpt-4o": 2, "claude-sonnet-4-20250514": 2,
                          "gemini-2.0-flash": 1}, 1200, 250),
    "search": (12, "chat", {"gpt-4.1-mini": 3, "gemini-2.0-flash": 2}, 2500, 180),
    "summarize": (10, "chat", {"gpt-4o-mini": 3, "claude-3-5-haiku-20241022": 2}, 4000, 300),
    "classify": (9, "chat", {"gpt-4.1-nano": 4, "gpt-4o-mini": 1}, 400, 8),
    "extract": (8, "chat", {"gpt-4o-mini": 2, "gpt-4.1-mini": 2}, 1800, 220),
    "embed-docs": (10, "embeddings", {"text-embedding-3-small": 1}, 600, 0),
    "agent": (6, "chat", {"o4-mini": 2, "gpt-5-mini": 2, "claude-sonnet-4-20250514": 2,
                          "gemini-2.5-pro": 1}, 6000, 900),
    "autocomplete": (7, "chat", {"gpt-4.1-nano": 3, "gemini-2.0-flash": 1}, 300, 30),
    "translate": (4, "chat", {"gpt-4o-mini": 1, "gemini-2.0-flash": 1}, 700, 700),
    "report": (2, "chat", {"gpt-4o": 1, "gemini-2.5-pro": 1}, 9000, 1500),
    "moderation": (2, "chat", {"gpt-4.1-nano": 1}, 250, 4),
}
KEYS = {"prod-web": 50, "prod-api": 25, "prod-batch": 15, "staging": 6, "dev-alice": 2,
        "dev-bob": 1, "ci": 1}
TEAMS = {"prod-web": "web", "prod-api": "platform", "prod-batch": "data", "staging": "web",
         "dev-alice": "platform", "dev-bob": "data", "ci": "platform"}
REGIONS = {"eu-west": 4, "us-east": 5, "ap-south": 1}
CUSTOMERS = 500
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two Crockford characters: a ULID is 13 look-ups, not 26 steps.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = tuple(range(120, -1, -10))


def ulid(ms: int, rng: random.Random) -> str:
    """A ULID (as proxy.exchange.new_id makes them) for time `ms` with random bits from `rng`."""
    value = (ms << 80) | rng.getrandbits(80)
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def day_counts(rows: int, rng: random.Random, start: datetime) -> list[int]:
    """How many calls fall on each day: weekday pattern, growth and a little noise."""
    weights = []
    for d in range(DAYS):
        day = start + timedelta(days=d)
        weights.append(WEEKDAY[day.weekday()] * (1 + GROWTH * d / (DAYS - 1))
                       * rng.uniform(0.93, 1.07))
    total = sum(weights)
    counts = [int(rows * w / total) for w in weights]
    for i in range(rows - sum(counts)):
        counts[i % DAYS] += 1
    return counts


def timestamps(rows: int, rng: random.Random, start: datetime) -> list[int]:
    """`rows` times in microseconds since `start` (a midnight), over DAYS days, in order."""
    hours = range(24)
    out: list[int] = []
    for d, n in enumerate(day_counts(rows, rng, start)):
        picked = rng.choices(hours, weights=HOURLY, k=n)
        out += sorted((d * 24 + h) * 3_600_000_000 + rng.randrange(3_600_000_000)
                      for h in picked)
    return out


def lognormal(rng: random.Random, median: float, sigma: float = 0.8) -> int:
    return max(1, int(rng.lognormvariate(0, sigma) * median))


class Generator:
    """Draws rows; every choice is weighted the way real traffic leans."""

    def __init__(self, rng: random.Random, start: datetime) -> None:
        self.rng = rng
        self.start_ms = int(start.timestamp() * 1000)
        self.days = [(start + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(DAYS)]
        self.models = {f: (list(m), list(m.values())) for f, (_, _, m, _, _) in FEATURES.items()}
        self.customers = [f"customer-{i:04d}" for i in range(CUSTOMERS)]
        self.customer_weights = [1 / (rank + 1) ** 1.1 for rank in range(CUSTOMERS)]
        self.features = list(FEATURES)
        self.feature_weights = [FEATURES[f][0] for f in self.features]
        self.keys = list(KEYS)
        self.key_weights = list(KEYS.values())
        self.regions = list(REGIONS)
        self.region_weights = list(REGIONS.values())

    def batch(self, times: list[int]) -> list[tuple[Any, ...]]:
        rng = self.rng
        k = len(times)
        customers = rng.choices(self.customers, self.customer_weights, k=k)
        features = rng.choices(self.features, self.feature_weights, k=k)
        keys = rng.choices(self.keys, self.key_weights, k=k)
        regions = rng.choices(self.regions, self.region_weights, k=k)
        return [self.row(t, c, f, key, r)
                for t, c, f, key, r in zip(times, customers, features, keys, regions,
                                           strict=True)]

    def row(self, us: int, customer: str, feature: str, key: str, region: str
            ) -> tuple[Any, ...]:
        rng = self.rng
        _, kind, _, median_in, median_out = FEATURES[feature]
        model = rng.choices(*self.models[feature])[0]
        provider, p_in, p_cached, p_out, reasoning_model = MODELS[model]
        endpoint = "embeddings" if kind == "embeddings" else ENDPOINTS[provider]
        stream = kind == "chat" and rng.random() < 0.45
        prompt = lognormal(rng, median_in)
        cached = int(prompt * rng.uniform(0.3, 0.9)) if kind == "chat" and (
            rng.random() < 0.35) else 0
        out = lognormal(rng, median_out, 0.9) if median_out else 0
        reasoning = int(out * rng.uniform(0.3, 0.8)) if reasoning_model else 0
        out += reasoning
        status, outcome, error, usage_source = 200, "ok", None, "provider"
        roll = rng.random()
        if roll < 0.004:
            status, outcome, error = 429, "upstream_error", "rate limit reached"
            prompt = cached = out = reasoning = 0
        elif roll < 0.006:
            status, outcome, error = 500, "upstream_error", "upstream server error"
            prompt = cached = out = reasoning = 0
        elif roll < 0.008:
            status, outcome, error = 429, "budget_exceeded", "monthly budget reached"
            prompt = cached = out = reasoning = 0
        elif roll < 0.011 and stream:
            outcome, error, usage_source = "client_disconnect", "client went away", "partial"
            out //= 3
        elif roll < 0.014:
            usage_source = "estimated"
        uncached = prompt - cached
        cost = round((uncached * p_in + cached * p_cached + out * p_out) / 1e6, 10)
        forwarded = outcome != "budget_exceeded"
        breakdown = orjson.dumps({"model": model, "period": "2025-01-01", "classes": {
            "input": {"tokens": uncached, "usd_per_mtok": str(p_in)},
            "output": {"tokens": out, "usd_per_mtok": str(p_out)}}}).decode() if cost else None
        duration = lognormal(rng, 350 + out * 12, 0.5) if forwarded else rng.uniform(0.2, 2)
        tags: dict[str, str] = {"team": TEAMS[key], "env": "staging" if key == "staging"
                                else "dev" if key.startswith(("dev", "ci")) else "prod",
                                "region": region}
        if rng.random() < 0.3:
            tags["user"] = f"u{rng.randrange(20_000)}"
        has_customer = rng.random() < 0.92
        day, rest = divmod(us, 86_400_000_000)
        hour, rest = divmod(rest, 3_600_000_000)
        minute, rest = divmod(rest, 60_000_000)
        second, micro = divmod(rest, 1_000_000)
        ts = f"{self.days[day]}T{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}Z"
        return (
            ulid(self.start_ms + us // 1000, rng), ts, round(duration, 3),
            round(min(duration, rng.uniform(150, 600)), 3) if stream else None,
            key, provider, endpoint, model, model if forwarded else None, int(stream), status,
            outcome, uncached, cached, 0, 0, out, reasoning,
            usage_source if forwarded else None, cost if forwarded else 0.0, breakdown,
            f"{provider}.yaml@2025-01-01+3f2a9c1b7d4e" if cost else None, 1,
            customer if has_customer else None, feature,
            f"{rng.getrandbits(64):016x}" if rng.random() < 0.5 else None,
            orjson.dumps(tags).decode(),
            f"req_{rng.getrandbits(96):024x}" if forwarded else None, error,
        )


def generate(path: Path, rows: int, seed: int = 7, end: datetime | None = None) -> float:
    """Write `rows` synthetic rows into the usage log at `path`; returns seconds taken."""
    began = time.perf_counter()
    migrate(path)
    rng = random.Random(seed)
    end = end or datetime.now(UTC)
    start = (end - timedelta(days=DAYS)).replace(hour=0, minute=0, second=0, microsecond=0)
    times = timestamps(rows, rng, start)
    gen = Generator(rng, start)
    # Rows carry the columns up to `error`; the class columns after it keep their 0 default.
    written = COLUMNS[:COLUMNS.index("error") + 1]
    insert = (f"INSERT INTO usage ({', '.join(written)}) "
              f"VALUES ({', '.join('?' for _ in written)})")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        # Indexes are faster built once at the end; the schema's own definitions come back.
        indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                               "AND tbl_name = 'usage' AND sql IS NOT NULL").fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        for first in range(0, rows, BATCH):
            with conn:
                conn.executemany(insert, gen.batch(times[first:first + BATCH]))
            if sys.stderr.isatty():
                print(f"\r{min(first + BATCH, rows):,} rows", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(", indexing", file=sys.stderr)
        for _, sql in indexes:
            conn.execute(sql)
        if sys.stderr.isatty():
            print("rolling up", file=sys.stderr)
        with conn:  # the hourly rollups the writer keeps, built as the migration backfills
            for rollup in rollups.ROLLUPS:
                conn.execute(f"DELETE FROM {rollup.table}")
                conn.execute(rollup.fold("sqlite", "usage"))
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loggen",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="how many (5,000,000)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"({DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args()
    if args.out.exists():
        if not args.force:
            parser.error(f"{args.out} exists (add --force to replace it)")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.out}{suffix}").unlink(missing_ok=True)
    seconds = generate(args.out, args.rows, args.seed)
    size = args.out.stat().st_size / 2**20
    print(f"{args.rows:,} rows in {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s) -> "
          f"{args.out} ({size:,.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
