"""The Redis ledger: atomic reserve, exact money, idempotent settle, expiring holds and keys."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from proxy.storage import LedgerUnavailable, open_ledger
from proxy.storage.ledger import Hold
from proxy.storage.redis_ledger import RedisLedger, from_units, to_units
from tests.scale import RedisServer, redis_prefix, redis_url, wait_for


@pytest.fixture
def ledger_url() -> Iterator[str]:
    with redis_prefix() as prefix:
        yield f"{redis_url()}?prefix={prefix}"


def hold(key: str = "k", usd: str = "0.3", tokens: int = 10, limit: str | None = "1",
         limit_tokens: int | None = None, block: bool = True,
         end: datetime | None = None) -> Hold:
    return Hold(key=key, usd=Decimal(usd), tokens=tokens,
                limit_usd=Decimal(limit) if limit is not None else None,
                limit_tokens=limit_tokens, block=block,
                period_end=end or datetime.now(UTC) + timedelta(days=1))


def run(coro):
    return asyncio.run(coro)


async def _ledger(url: str) -> RedisLedger:
    ledger = open_ledger(url)
    assert isinstance(ledger, RedisLedger)
    await ledger.seed({})
    return ledger


def test_money_is_integer_units() -> None:
    """USD converts to whole counts of 1e-10 USD and back without loss."""
    assert to_units(Decimal("0.0000123456")) == 123456
    assert from_units(123456) == Decimal("0.0000123456")
    assert from_units("0") == 0 and str(from_units(3_000_000_000)) == "0.3"
    assert from_units(to_units(Decimal("123456789.0123456789"))) == Decimal("123456789.0123456789")


def test_concurrent_reserves_admit_exactly_what_fits(ledger_url: str) -> None:
    """Two ledgers (two instances) race 300 reserves of $0.30 on a $1 limit: exactly 3 fit
    (more calls at once than a ledger has connections: they wait, none fails)."""
    async def go() -> None:
        # 300 calls open 2 × 64 connections at once: on a loaded 2-core box a connect can
        # take over the ledger's 1 s default, which is a timing fact, not this test's subject.
        slow_ok = f"{ledger_url}&socket_connect_timeout=10&socket_timeout=10"
        a, b = await _ledger(slow_ok), await _ledger(slow_ok)
        try:
            results = await asyncio.gather(*((a if i % 2 else b).reserve(f"c{i}", [hold()], 60)
                                             for i in range(300)))
            assert sum(r.refused is None for r in results) == 3
            balance = (await a.balances(["k"]))["k"]
            assert balance.reserved_usd == Decimal("0.9") and balance.reserved_tokens == 30
        finally:
            await a.close()
            await b.close()

    run(go())


def test_limits_are_exact_to_the_unit(ledger_url: str) -> None:
    """A hold that reaches the limit exactly fits; one unit (1e-10 USD) more does not."""
    async def go() -> None:
        ledger = await _ledger(ledger_url)
        try:
            limit = "12345678.0000000001"
            first = await ledger.reserve("a", [hold(usd="12345678", limit=limit)], 60)
            assert first.refused is None
            over = await ledger.reserve("b", [hold(usd="0.0000000002", limit=limit)], 60)
            assert over.refused is not None
            fits = await ledger.reserve("c", [hold(usd="0.0000000001", limit=limit)], 60)
            assert fits.refused is None
            tokens = await ledger.reserve("d", [hold(key="t", usd="0", limit=None, tokens=5,
                                                     limit_tokens=9)], 60)
            assert tokens.refused is None
            assert (await ledger.reserve("e", [hold(key="t", usd="0", limit=None, tokens=5,
                                                    limit_tokens=9)], 60)).refused is not None
        finally:
            await ledger.close()

    run(go())


def test_all_or_nothing_across_budgets(ledger_url: str) -> None:
    """If one of a call's budgets has no room, none of its holds is taken."""
    async def go() -> None:
        ledger = await _ledger(ledger_url)
        try:
            result = await ledger.reserve("c", [hold(key="roomy", limit="10"),
                                                hold(key="full", limit="0.1")], 60)
            assert result.refused is not None and result.refused.key == "full"
            balances = await ledger.balances(["roomy", "full"])
            assert all(b.reserved_usd == 0 for b in balances.values())
            alert_only = await ledger.reserve("d", [hold(key="full", limit="0.1", block=False)],
                                              60)
            assert alert_only.refused is None
        finally:
            await ledger.close()

    run(go())


def test_settle_counts_once(ledger_url: str) -> None:
    """A settle replaces the hold by the cost; retrying it changes nothing."""
    async def go() -> None:
        ledger = await _ledger(ledger_url)
        try:
            await ledger.reserve("c", [hold(key="x"), hold(key="y")], 60)
            first = await ledger.settle("c", Decimal("0.1234567891"), 7)
            assert {h.key for h, _ in first} == {"x", "y"}
            assert await ledger.settle("c", Decimal("0.1234567891"), 7) == []
            for balance in (await ledger.balances(["x", "y"])).values():
                assert balance.spent_usd == Decimal("0.1234567891")
                assert balance.reserved_usd == 0 and balance.spent_tokens == 7
            retried = await ledger.reserve("c2", [hold(key="x")], 60)
            again = await ledger.reserve("c2", [hold(key="x")], 60)  # a retried reserve
            assert retried.refused is None and again.refused is None
            assert (await ledger.balances(["x"]))["x"].reserved_usd == Decimal("0.3")
            await ledger.release("c2")
            await ledger.release("c2")
            assert (await ledger.balances(["x"]))["x"].reserved_usd == 0
        finally:
            await ledger.close()

    run(go())


def test_holds_expire_and_a_late_settle_still_counts(ledger_url: str) -> None:
    """A hold past its TTL stops counting (a crashed instance's calls); if its call settles
    after all, the cost is still spent, and the expired hold is not subtracted twice."""
    async def go() -> None:
        ledger = await _ledger(ledger_url)
        try:
            assert (await ledger.reserve("slow", [hold(usd="0.9")], 0.2)).refused is None
            assert (await ledger.reserve("next", [hold(usd="0.9")], 60)).refused is not None
            await asyncio.sleep(0.35)
            assert (await ledger.balances(["k"]))["k"].reserved_usd == 0
            await ledger.settle("slow", Decimal("0.5"), 3)
            balance = (await ledger.balances(["k"]))["k"]
            assert balance.spent_usd == Decimal("0.5") and balance.reserved_usd == 0
        finally:
            await ledger.close()

    run(go())


def test_period_keys_expire_after_the_period(ledger_url: str) -> None:
    """A budget period's keys carry a TTL ending an hour after the period; `total` none."""
    async def go() -> None:
        ledger = await _ledger(ledger_url)
        try:
            end = datetime.now(UTC) + timedelta(hours=2)
            await ledger.reserve("c", [hold(key="day", end=end)], 60)
            await ledger.reserve("d", [Hold(key="forever", usd=Decimal(1), tokens=1,
                                            limit_usd=None, limit_tokens=None, block=True,
                                            period_end=None)], 60)
            ttl = await ledger.redis.pttl(f"{ledger.prefix}b:day")
            assert 2.9 * 3600_000 < ttl <= 3 * 3600_000
            assert await ledger.redis.pttl(f"{ledger.prefix}b:forever") == -1
            assert await ledger.redis.pttl(f"{ledger.prefix}c:c") > 0
            raw = await ledger.redis.hgetall(f"{ledger.prefix}b:day")
            assert raw["rsv"] == "3000000000"  # integer units, never a float
        finally:
            await ledger.close()

    run(go())


def test_seed_only_when_redis_knows_nothing(ledger_url: str) -> None:
    """Three instances starting each seed the log's spend: it counts once, and never
    overwrites a period Redis already tracks."""
    async def go() -> None:
        ledgers = [RedisLedger(ledger_url) for _ in range(3)]
        try:
            await ledgers[0].reserve("early", [hold(key="live")], 60)  # unseeded: seeds {}
            await asyncio.gather(*(lg.seed({"k": (Decimal("2.5"), 40),
                                            "live": (Decimal("9"), 9)}) for lg in ledgers))
            balances = await ledgers[1].balances(["k", "live"])
            assert balances["k"].spent_usd == Decimal("2.5") and balances["k"].spent_tokens == 40
            assert balances["live"].spent_usd == 0  # Redis had it: the log is not added
        finally:
            for lg in ledgers:
                await lg.close()

    run(go())


def test_a_lost_ledger_is_rebuilt(ledger_url: str) -> None:
    """When Redis comes back empty, the next reserve rebuilds spend (once) before checking."""
    async def go() -> None:
        ledger = await _ledger(ledger_url)
        rebuilt = []

        async def rebuild() -> None:
            rebuilt.append(1)
            await ledger.seed({"k": (Decimal("0.8"), 1)})

        ledger.on_lost = rebuild
        try:
            keys = [k async for k in ledger.redis.scan_iter(f"{ledger.prefix}*")]
            await ledger.redis.delete(*keys)
            results = await asyncio.gather(*(ledger.reserve(f"c{i}", [hold()], 60)
                                             for i in range(3)))
            assert rebuilt == [1]
            assert [r.refused is None for r in results].count(True) == 0
        finally:
            await ledger.close()

    run(go())


def test_unreachable_redis_raises_ledger_unavailable(tmp_path: Path) -> None:
    """A stopped Redis is reported as LedgerUnavailable, promptly; it works once back."""
    server = RedisServer(tmp_path)
    server.start()

    async def attempt() -> bool:
        ledger = RedisLedger(server.url)
        try:
            await ledger.seed({})
            return (await ledger.reserve("c", [hold()], 60)).refused is None
        finally:
            await ledger.close()

    try:
        assert run(attempt())
        server.stop()
        with pytest.raises(LedgerUnavailable):
            run(attempt())
        server.start()
        assert wait_for(lambda: _ping(server.url), 10, "redis back")
        assert run(attempt())
    finally:
        server.stop()


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False


def test_an_alert_is_claimed_once_across_instances(ledger_url: str) -> None:
    """Of three instances that see a threshold crossed, exactly one may announce it."""
    async def go() -> None:
        ledgers = [RedisLedger(ledger_url) for _ in range(3)]
        try:
            claims = await asyncio.gather(*(lg.claim_alert("k", Decimal("0.8"))
                                            for lg in ledgers))
            assert sorted(claims) == [False, False, True]
            assert await ledgers[0].claim_alert("k", Decimal("1.0"))
        finally:
            for lg in ledgers:
                await lg.close()

    run(go())
