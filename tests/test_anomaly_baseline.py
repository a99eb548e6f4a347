"""The baseline: the same hour of the week, falling back while history is short, robust
to a past spike, and the limit as docs/anomalies.md computes it by hand."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from proxy.anomaly.baseline import baseline, slot

NOW = datetime(2026, 12, 2, 3, 20, tzinfo=UTC)  # a Wednesday, 03:20 UTC
HOUR = timedelta(hours=1)
ONE = Decimal(1)


def flat(hours: int, usd: str, **special: str) -> dict[datetime, Decimal]:
    """`hours` hours before NOW's hour at `usd` each; `special` maps 'hours ago' to usd."""
    end = NOW.replace(minute=0)
    series = {end - (i + 1) * HOUR: Decimal(usd) for i in range(hours)}
    for ago, value in special.items():
        series[end - int(ago[1:]) * HOUR] = Decimal(value)
    return series


def test_a_young_scope_has_no_baseline() -> None:
    """Under min_history_hours of history, nothing is judged."""
    assert baseline(flat(23, "1"), NOW, 4, 24, ONE) is None
    assert baseline(flat(24, "1"), NOW, 4, 24, ONE) is not None


def test_weekly_median_ignores_a_past_spike() -> None:
    """Four Wednesdays at 3 am: $0.20, $0.20, $50 (a past runaway), $0.20: median $0.20."""
    series = flat(4 * 168, "0.20", h168="0.20", h336="50", h504="0.20", h672="0.20")
    b = baseline(series, NOW, 4, 24, ONE)
    wed3 = slot(NOW.replace(minute=0))
    assert b.methods[wed3] == "weekly"
    assert b.levels[wed3] == Decimal("0.20")


def test_fallbacks_daily_then_recent() -> None:
    """Five days of history: 3 am has 5 daily samples (median of 0.1, 0.1, 0.3, 0.3, 0.3 is
    0.3) and no 3 weekly ones; two days: the last 24 hours' median."""
    series = flat(5 * 24, "1", h24="0.1", h48="0.1", h72="0.3", h96="0.3", h120="0.3")
    b = baseline(series, NOW, 4, 24, ONE)
    wed3 = slot(NOW.replace(minute=0))
    assert (b.methods[wed3], b.levels[wed3]) == ("daily", Decimal("0.3"))
    short = baseline(flat(2 * 24, "2", h1="7"), NOW, 4, 24, ONE)
    assert (short.methods[wed3], short.levels[wed3]) == ("recent", Decimal("2"))


def test_the_limit_by_hand() -> None:
    """Every hour costs $10 in even weeks and $20 in odd ones: each hour of the week's
    median is $15; with c = $1 the log ratios are ln(11/16) and ln(21/16), half each, so
    their median lies between them and the MAD is half the gap, ln(21/11) / 2; the spread
    is 1.4826 times that, and at k = 4 the limit is (15 + 1) x e^(4 x spread) - 1."""
    this = NOW.replace(minute=0)
    series = {this - (i + 1) * HOUR: Decimal("20" if (i // 168) % 2 else "10")
              for i in range(4 * 168)}
    b = baseline(series, NOW, 4, 24, ONE)
    assert b.levels[slot(this)] == Decimal(15)
    spread = 1.4826 * math.log(21 / 11) / 2
    assert math.isclose(b.spreads[slot(this)], spread, rel_tol=1e-9)
    limit = Decimal(16) * Decimal(repr(math.exp(4 * b.spreads[slot(this)]))) - ONE
    assert b.limit(this, 4.0, ONE) == limit.quantize(Decimal("0.000001"))
    assert Decimal("107.7") < limit < Decimal("108.0")  # 16 x e^1.9173 - 1 = 107.8...
