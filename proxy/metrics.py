"""Prometheus metrics, kept in plain dicts and rendered in the text exposition format.

Labels are bounded: provider, outcome, the key's name only when the configuration names it
(a passthrough fingerprint is `other`), and the model only when the pricing tables know it
(otherwise `other`), so a client cannot blow up the series count. No customer or trace id
is ever a label; budgets and rate limits are labelled by their configured name. Durations
are seconds.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from proxy.logs import Sampled
from proxy.storage.row import UsageRow
from proxy.token_classes import BY_COLUMN, TOKEN_COLUMNS, UNIT_COLUMNS, label

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Label of each token column (`class="cache_write_1h"`), from proxy.token_classes.
TOKEN_CLASSES = tuple((label(c), c) for c in TOKEN_COLUMNS)
UNIT_CLASSES = tuple((BY_COLUMN[c].name, c) for c in UNIT_COLUMNS)
Labels = tuple[tuple[str, str], ...]


_COUNTERS = ("calls", "tokens", "units", "cost", "unpriced", "refused", "rate_limited")
_HISTOGRAMS = ("duration", "ttfb")


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, value)] += 1
        self.sum += value


class Metrics:
    """Counters and histograms of calls; gauges are read from callbacks when scraped."""

    def __init__(self, known_model: Callable[[str | None, str | None], bool],
                 known_key: Callable[[str | None], bool] = lambda _: True) -> None:
        self._known_model = known_model
        self._known_key = known_key
        self.calls: defaultdict[Labels, int] = defaultdict(int)
        self.tokens: defaultdict[Labels, int] = defaultdict(int)
        self.units: defaultdict[Labels, int] = defaultdict(int)
        self.cost: defaultdict[Labels, float] = defaultdict(float)
        self.unpriced: defaultdict[Labels, int] = defaultdict(int)
        self.duration: defaultdict[Labels, Histogram] = defaultdict(Histogram)
        self.ttfb: defaultdict[Labels, Histogram] = defaultdict(Histogram)
        self.refused: defaultdict[Labels, int] = defaultdict(int)
        # Calls a rate limit refused, by the limit's configured name (never its scope).
        self.rate_limited: defaultdict[Labels, int] = defaultdict(int)
        self.refused_log = Sampled()  # a stranger's requests are counted, logged sampled
        self.gauges: list[Callable[[], Iterable[str]]] = []
        # `serve --workers N`: each worker writes its counters here and a scrape, whichever
        # worker answers it, adds up every worker's (set by `share`).
        self.shared_dir: Path | None = None
        self.worker: int = 0

    def share(self, directory: str | Path, worker: int) -> None:
        self.shared_dir, self.worker = Path(directory), worker

    def snapshot(self) -> dict[str, Any]:
        """The counters and histograms as plain lists, for the other workers' scrapes."""
        out: dict[str, Any] = {name: [[list(k), v] for k, v in getattr(self, name).items()]
                               for name in _COUNTERS}
        for name in _HISTOGRAMS:
            out[name] = [[list(k), h.counts, h.sum] for k, h in getattr(self, name).items()]
        return out

    def publish(self) -> None:
        """Write this worker's snapshot for its siblings (atomically: write, then rename)."""
        if self.shared_dir is None:
            return
        path = self.shared_dir / f"worker-{self.worker}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(self.snapshot()))
        tmp.replace(path)

    def _totals(self) -> Metrics:
        """This worker's figures plus every sibling's last published ones."""
        if self.shared_dir is None:
            return self
        total = Metrics(self._known_model, self._known_key)
        total._add(self.snapshot())
        for path in self.shared_dir.glob("worker-*.json"):
            if path.name == f"worker-{self.worker}.json":
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                total._add(orjson.loads(path.read_bytes()))
        return total

    def _add(self, snap: dict[str, Any]) -> None:
        for name in _COUNTERS:
            into = getattr(self, name)
            for key, value in snap.get(name, []):
                into[tuple(tuple(pair) for pair in key)] += value
        for name in _HISTOGRAMS:
            into = getattr(self, name)
            for key, counts, total in snap.get(name, []):
                hist = into[tuple(tuple(pair) for pair in key)]
                hist.counts = [a + b for a, b in zip(hist.counts, counts, strict=True)]
                hist.sum += total

    def observe(self, row: UsageRow) -> None:
        model = row.model if self._known_model(row.provider, row.model) else "other"
        base: Labels = (("provider", row.provider or "none"), ("model", model or "none"),
                        ("key", (row.key_name if self._known_key(row.key_name) else "other")
                                 if row.key_name else "none"))
        self.calls[(*base, ("outcome", row.outcome))] += 1
        for name, column in TOKEN_CLASSES:
            value = getattr(row, column)
            if value:
                self.tokens[(*base, ("class", name))] += value
        for name, column in UNIT_CLASSES:
            value = getattr(row, column)
            if value:
                self.units[(*base, ("class", name))] += value
        if row.cost_usd is not None:
            self.cost[base] += row.cost_usd
        elif not row.priced:
            self.unpriced[base] += 1
        timing: Labels = (("provider", row.provider or "none"), ("stream", str(row.stream)))
        if row.duration_ms is not None:
            self.duration[timing].observe(row.duration_ms / 1000)
        if row.ttfb_ms is not None:
            self.ttfb[timing].observe(row.ttfb_ms / 1000)

    def render(self) -> str:
        """The exposition text; under --workers, counters are every worker's sum (gauges
        are this worker's own)."""
        out: list[str] = []
        m = self._totals()
        _counter(out, "meterproxy_calls_total", "Calls through the proxy.", m.calls)
        _counter(out, "meterproxy_tokens_total", "Tokens by class.", m.tokens)
        _counter(out, "meterproxy_units_total",
                 "Charged units by class (web searches, grounded prompts, code runs).",
                 m.units)
        _counter(out, "meterproxy_cost_usd_total", "Cost in USD of priced calls.", m.cost)
        _counter(out, "meterproxy_unpriced_calls_total", "Calls to models with no price.",
                 m.unpriced)
        _counter(out, "meterproxy_refused_total",
                 "Requests refused before any key was known (no usage row), by status.",
                 m.refused)
        _counter(out, "meterproxy_rate_limited_total",
                 "Calls refused by a rate limit, by the limit's configured name.",
                 m.rate_limited)
        _histogram(out, "meterproxy_call_duration_seconds", "Call duration in seconds.",
                   m.duration)
        _histogram(out, "meterproxy_ttfb_seconds", "Time to the provider's first byte (s).",
                   m.ttfb)
        for gauge in self.gauges:
            out.extend(gauge())
        return "\n".join(out) + "\n"


def labels_text(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _counter(out: list[str], name: str, help_text: str, values: dict) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    out += [f"{name}{labels_text(k)} {v}" for k, v in sorted(values.items())]


def _histogram(out: list[str], name: str, help_text: str,
               values: dict[Labels, Histogram]) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for labels, hist in sorted(values.items()):
        running = 0
        for bound, count in zip((*BUCKETS_S, "+Inf"), hist.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{labels_text((*labels, ("le", str(bound))))} {running}')
        out.append(f"{name}_sum{labels_text(labels)} {hist.sum}")
        out.append(f"{name}_count{labels_text(labels)} {running}")


def gauge(name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{labels_text(k)} {v}" for k, v in samples]
    return lines
