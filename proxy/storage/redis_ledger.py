"""The shared ledger on Redis: several proxy instances, one set of budgets, still exact.

Each operation is one Lua script, so a budget's check and its increment are a single atomic
step on the server, whichever instance sends it. Money is held as integer counts of 1e-10
USD (HINCRBY, compared as decimal strings in Lua), never as floats. Keys, under a prefix:

    {prefix}b:{budget key}   hash: spent, stok (settled usd units, tokens), rsv, rtok (held)
    {prefix}r:{budget key}   sorted set: `call|n|usd|tokens` per live hold, scored by expiry
    {prefix}c:{call id}      the call's holds, so a settle knows them and happens only once
    {prefix}w:{window key}   sorted set: `call|n|tokens|usd` per call a rate limit admitted,
                             scored by its admission time (ms, Redis server clock)
    {prefix}ws:{window key}  hash: tok, usd: the sums of that set's entries
    {prefix}cw:{call id}     the call's window entries, so its settle can correct them
    {prefix}seeded           set once spend has been rebuilt from the usage log
    {prefix}a:{key}:{t}      an alert threshold already announced (claim_alert)

A budget period's keys expire an hour after the period ends (a per-trace `total` budget's
after its idle time); a hold expires after its TTL (server time), so a crashed instance's
holds stop counting on their own. A rate window's keys expire a minute after its last
entry has left the window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from proxy.storage import LedgerUnavailable
from proxy.storage.ledger import Balance, Hold, Reserved, Window

log = structlog.get_logger("meterproxy.ledger")

UNIT = Decimal("1e-10")  # one count of the integer money fields, in USD
PERIOD_GRACE_MS = 3_600_000  # a period's keys outlive its end by an hour (late settles)
SEED_TTL_MS = 40 * 86_400_000  # seeded keys expire unless a reserve sets the period's end
WINDOW_GRACE_MS = 60_000  # a rate window's keys outlive its last entry by a minute
RECORD_GRACE_MS = 86_400_000  # a call's record outlives its hold, so a late settle counts
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_MAX_CONNECTIONS = 64  # per process; ?max_connections=N in the URL changes it
POOL_WAIT_S = 5.0  # a call waits this long for a free connection, then counts as unavailable

# Shared Lua: exact arithmetic on non-negative decimal integer strings, and the purge of
# holds whose time-to-live has passed.
_LIB = """
local function nn(s)
  if not s or s == '' or string.sub(s, 1, 1) == '-' then return '0' end
  return s
end
local function add(a, b)
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + string.byte(a, i) - 48; i = i - 1 end
    if j > 0 then d = d + string.byte(b, j) - 48; j = j - 1 end
    out[#out + 1] = string.char(48 + d % 10)
    carry = math.floor(d / 10)
  end
  return string.reverse(table.concat(out))
end
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function neg(s)
  if s == '0' then return '0' end
  return '-' .. s
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function purge(b, r, now)
  local stale = redis.call('ZRANGEBYSCORE', r, '-inf', now)
  for _, m in ipairs(stale) do
    local usd, tok = string.match(m, '|(%d+)|(%d+)$')
    redis.call('HINCRBY', b, 'rsv', neg(usd))
    redis.call('HINCRBY', b, 'rtok', neg(tok))
  end
  if #stale > 0 then redis.call('ZREMRANGEBYSCORE', r, '-inf', now) end
end
local function balance(b)
  local v = redis.call('HMGET', b, 'spent', 'rsv', 'stok', 'rtok')
  return {nn(v[1]), nn(v[2]), nn(v[3]), nn(v[4])}
end
local function expire(b, r, at, idle)
  if at > 0 then
    redis.call('PEXPIREAT', b, at + GRACE)
    redis.call('PEXPIREAT', r, at + GRACE)
  elseif idle and idle > 0 then
    redis.call('PEXPIRE', b, idle)
    redis.call('PEXPIRE', r, idle)
  else
    redis.call('PERSIST', b)
    redis.call('PERSIST', r)
  end
end
-- Rate windows: entries admitted `span` ms or longer ago leave the window.
local function wpurge(w, s, now, span)
  local stale = redis.call('ZRANGEBYSCORE', w, '-inf', now - span)
  for _, m in ipairs(stale) do
    local tok, usd = string.match(m, '|(%d+)|(%d+)$')
    redis.call('HINCRBY', s, 'tok', neg(tok))
    redis.call('HINCRBY', s, 'usd', neg(usd))
  end
  if #stale > 0 then redis.call('ZREMRANGEBYSCORE', w, '-inf', now - span) end
end
-- 0 if the call fits window (w, s) now, else the ms until it would, -1 if it never does.
-- ARGV[a..a+6]: window key, span ms, tokens, usd units, max requests, tokens, usd ('' none).
local function wwait(w, s, a, now)
  local span, tok, usd = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local mreq, mtok, musd = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  if (mtok ~= '' and tok > tonumber(mtok)) or (musd ~= '' and gt(usd, musd)) then
    return -1
  end
  local need = 0
  if mreq ~= '' then need = redis.call('ZCARD', w) + 1 - tonumber(mreq) end
  if mtok ~= '' or musd ~= '' then
    local v = redis.call('HMGET', s, 'tok', 'usd')
    local stok, susd = tonumber(nn(v[1])) + tok, add(nn(v[2]), usd)
    local ftok, fusd, i = 0, '0', 0
    local entries = nil
    while (mtok ~= '' and stok - ftok > tonumber(mtok)) or
          (musd ~= '' and gt(susd, add(musd, fusd))) do
      if entries == nil then entries = redis.call('ZRANGE', w, 0, -1) end
      i = i + 1
      local etok, eusd = string.match(entries[i], '|(%d+)|(%d+)$')
      ftok, fusd = ftok + tonumber(etok), add(fusd, eusd)
    end
    if i > need then need = i end
  end
  if need <= 0 then return 0 end
  local e = redis.call('ZRANGE', w, need - 1, need - 1, 'WITHSCORES')
  return tonumber(e[2]) + span - now
end
""".replace("GRACE", str(PERIOD_GRACE_MS))

# KEYS: seeded marker, call record, window record, then (budget hash, hold set) per hold,
#       then (window set, window sums) per rate window.
# ARGV: call id, hold ttl ms, record ttl ms, number of holds, then per hold: ledger key, usd
#       units, tokens, usd limit units or '', token limit or '', block 1|0, period end ms
#       or 0, idle ms or 0; then per window the 7 values wwait reads.
_RESERVE = _LIB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unseeded'} end
local n = tonumber(ARGV[4])
local m = (#KEYS - 3 - 2 * n) / 2
local out = {'ok'}
if redis.call('EXISTS', KEYS[2]) == 1 then
  for i = 1, n do
    for _, v in ipairs(balance(KEYS[2 + 2 * i])) do out[#out + 1] = v end
  end
  return out
end
local now = now_ms()
for i = 1, n do purge(KEYS[2 + 2 * i], KEYS[3 + 2 * i], now) end
for i = 1, n do
  local a = 5 + (i - 1) * 8
  if ARGV[a + 5] == '1' then
    local bal = balance(KEYS[2 + 2 * i])
    if ARGV[a + 3] ~= '' and gt(add(add(bal[1], bal[2]), ARGV[a + 1]), ARGV[a + 3]) then
      return {'refused', tostring(i)}
    end
    if ARGV[a + 4] ~= '' and
        tonumber(bal[3]) + tonumber(bal[4]) + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 4]) then
      return {'refused', tostring(i)}
    end
  end
end
local wk, wa = 3 + 2 * n, 5 + 8 * n
local worst, which = 0, 0
for j = 1, m do
  local w, s, a = KEYS[wk + 2 * j - 1], KEYS[wk + 2 * j], wa + (j - 1) * 7
  wpurge(w, s, now, tonumber(ARGV[a + 1]))
  local wait = wwait(w, s, a, now)
  if wait ~= 0 and worst ~= -1 and (wait == -1 or wait > worst) then
    worst, which = wait, j
  end
end
if which > 0 then return {'limited', tostring(which), tostring(worst)} end
local deadline = now + tonumber(ARGV[2])
local record = {}
for i = 1, n do
  local a = 5 + (i - 1) * 8
  local b, r = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  redis.call('HINCRBY', b, 'rsv', ARGV[a + 1])
  redis.call('HINCRBY', b, 'rtok', ARGV[a + 2])
  redis.call('ZADD', r, deadline, ARGV[1] .. '|' .. i .. '|' .. ARGV[a + 1] .. '|' .. ARGV[a + 2])
  expire(b, r, tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]))
  record[i] = {ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 6], ARGV[a + 7]}
  for _, v in ipairs(balance(b)) do out[#out + 1] = v end
end
redis.call('SET', KEYS[2], cjson.encode(record), 'PX', ARGV[3])
if m > 0 then
  local entered = {}
  for j = 1, m do
    local w, s, a = KEYS[wk + 2 * j - 1], KEYS[wk + 2 * j], wa + (j - 1) * 7
    local member = ARGV[1] .. '|' .. j .. '|' .. ARGV[a + 2] .. '|' .. ARGV[a + 3]
    redis.call('ZADD', w, now, member)
    redis.call('HINCRBY', s, 'tok', ARGV[a + 2])
    redis.call('HINCRBY', s, 'usd', ARGV[a + 3])
    local keep = tonumber(ARGV[a + 1]) + WINDOW_GRACE
    redis.call('PEXPIRE', w, keep)
    redis.call('PEXPIRE', s, keep)
    entered[j] = {w, s, member}
  end
  redis.call('SET', KEYS[3], cjson.encode(entered), 'PX', ARGV[3])
end
return out
""".replace("WINDOW_GRACE", str(WINDOW_GRACE_MS))

# KEYS: call record, window record. ARGV: call id, usd units, tokens, key prefix.
# The records are deleted in the same step, so a retried settle finds nothing to count.
# A window entry still in its window trades its estimate for the actual amounts.
_SETTLE = _LIB + """
local entered = redis.call('GET', KEYS[2])
if entered then
  redis.call('DEL', KEYS[2])
  for j, e in ipairs(cjson.decode(entered)) do
    local w, s, member = e[1], e[2], e[3]
    local at = redis.call('ZSCORE', w, member)
    if at then
      local tok, usd = string.match(member, '|(%d+)|(%d+)$')
      redis.call('ZREM', w, member)
      redis.call('HINCRBY', s, 'tok', tonumber(ARGV[3]) - tonumber(tok))
      redis.call('HINCRBY', s, 'usd', neg(usd))
      redis.call('HINCRBY', s, 'usd', ARGV[2])
      redis.call('ZADD', w, at, ARGV[1] .. '|' .. j .. '|' .. ARGV[3] .. '|' .. ARGV[2])
    end
  end
end
local raw = redis.call('GET', KEYS[1])
if not raw then return {} end
redis.call('DEL', KEYS[1])
local out = {}
for i, h in ipairs(cjson.decode(raw)) do
  local key, usd, tok, at, idle = h[1], h[2], h[3], tonumber(h[4]), tonumber(h[5])
  local b, r = ARGV[4] .. 'b:' .. key, ARGV[4] .. 'r:' .. key
  if redis.call('ZREM', r, ARGV[1] .. '|' .. i .. '|' .. usd .. '|' .. tok) == 1 then
    redis.call('HINCRBY', b, 'rsv', neg(usd))
    redis.call('HINCRBY', b, 'rtok', neg(tok))
  end
  if ARGV[2] ~= '0' then redis.call('HINCRBY', b, 'spent', ARGV[2]) end
  if ARGV[3] ~= '0' then redis.call('HINCRBY', b, 'stok', ARGV[3]) end
  expire(b, r, at, idle)
  out[#out + 1] = key
  for _, v in ipairs(balance(b)) do out[#out + 1] = v end
end
return out
"""

# KEYS: (budget hash, hold set) pairs. Expired holds are dropped before reading.
_BALANCES = _LIB + """
local now = now_ms()
local out = {}
for i = 1, #KEYS / 2 do
  purge(KEYS[2 * i - 1], KEYS[2 * i], now)
  for _, v in ipairs(balance(KEYS[2 * i - 1])) do out[#out + 1] = v end
end
return out
"""

# KEYS: seeded marker, then budget hashes. ARGV: (usd units, tokens, ttl ms) per hash.
# Only a period Redis knows nothing of is seeded, so N instances starting seed it once.
_SEED = """
local seeded = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'spent', ARGV[3 * i - 5], 'stok', ARGV[3 * i - 4],
               'rsv', '0', 'rtok', '0')
    redis.call('PEXPIRE', KEYS[i], ARGV[3 * i - 3])
    seeded = seeded + 1
  end
end
redis.call('SET', KEYS[1], '1')
return seeded
"""


def to_units(usd: Decimal, rounding: str = ROUND_HALF_EVEN) -> int:
    """USD as a whole count of 1e-10 USD."""
    return int((usd / UNIT).to_integral_value(rounding=rounding))


def from_units(units: str | int) -> Decimal:
    """A whole count of 1e-10 USD as USD (exact: the quotient keeps no spare zeros)."""
    return Decimal(int(units)) / Decimal(10**10)


def split_url(url: str) -> tuple[str, str]:
    """The Redis URL without meterproxy's own `prefix` parameter, and the key prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "meterproxy:")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisLedger:
    """The Ledger protocol on one Redis server (a primary; Redis Cluster is not supported).

    `on_lost` is awaited when Redis has lost the ledger (restarted empty): the runtime
    rebuilds spend from the usage log, then reserves carry on.
    """

    shared = True

    def __init__(self, url: str, on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        clean, self.prefix = split_url(url)
        options = dict(parse_qsl(urlsplit(clean).query))
        kwargs: dict[str, Any] = {}
        if "socket_timeout" not in options:
            kwargs["socket_timeout"] = DEFAULT_TIMEOUT_S
        if "socket_connect_timeout" not in options:
            kwargs["socket_connect_timeout"] = DEFAULT_TIMEOUT_S
        if "max_connections" not in options:
            kwargs["max_connections"] = DEFAULT_MAX_CONNECTIONS
        # Calls beyond the pool's size wait for a connection rather than fail.
        pool = aioredis.BlockingConnectionPool.from_url(
            clean, decode_responses=True, timeout=POOL_WAIT_S,
            # One quick retry on a fresh connection (a pooled one may predate a Redis
            # restart); every script is idempotent, so a retry never counts twice.
            retry=Retry(NoBackoff(), 1), **kwargs)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.url = url
        self.on_lost = on_lost
        self._reserve = self.redis.register_script(_RESERVE)
        self._settle = self.redis.register_script(_SETTLE)
        self._balances = self.redis.register_script(_BALANCES)
        self._seed = self.redis.register_script(_SEED)
        self._reseeding: asyncio.Lock | None = None

    def _b(self, key: str) -> str:
        return f"{self.prefix}b:{key}"

    def _r(self, key: str) -> str:
        return f"{self.prefix}r:{key}"

    def _c(self, call_id: str) -> str:
        return f"{self.prefix}c:{call_id}"

    def _cw(self, call_id: str) -> str:
        return f"{self.prefix}cw:{call_id}"

    @property
    def _marker(self) -> str:
        return f"{self.prefix}seeded"

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise LedgerUnavailable(f"redis ledger unreachable: {exc}") from exc

    async def reserve(self, call_id: str, holds: list[Hold], ttl_s: float,
                      windows: Sequence[Window] = (), now: datetime | None = None
                      ) -> Reserved:
        """As the Ledger protocol says; rate windows run on the Redis server's clock, so
        instances whose clocks differ still share one window (`now` is not used)."""
        keys = [self._marker, self._c(call_id), self._cw(call_id)]
        args: list[Any] = [call_id, max(1, int(ttl_s * 1000)),
                           int(ttl_s * 1000) + RECORD_GRACE_MS, len(holds)]
        for hold in holds:
            keys += [self._b(hold.key), self._r(hold.key)]
            args += [hold.key, to_units(hold.usd, ROUND_CEILING), hold.tokens,
                     "" if hold.limit_usd is None else to_units(hold.limit_usd, ROUND_FLOOR),
                     "" if hold.limit_tokens is None else hold.limit_tokens,
                     1 if hold.block else 0, _epoch_ms(hold.period_end), hold.idle_s * 1000]
        for w in windows:
            keys += [f"{self.prefix}w:{w.key}", f"{self.prefix}ws:{w.key}"]
            args += [w.key, w.span_ms, w.tokens, to_units(w.usd, ROUND_CEILING),
                     "" if w.max_requests is None else w.max_requests,
                     "" if w.max_tokens is None else w.max_tokens,
                     "" if w.max_usd is None else to_units(w.max_usd, ROUND_FLOOR)]
        for _ in range(3):
            reply = await self._run(self._reserve, keys, args)
            if reply[0] != "unseeded":
                break
            await self._reseed()
        if reply[0] == "refused":
            return Reserved(refused=holds[int(reply[1]) - 1])
        if reply[0] == "limited":
            wait_ms = int(reply[2])
            return Reserved(refused=None, limited=windows[int(reply[1]) - 1],
                            retry_after_s=None if wait_ms < 0 else wait_ms / 1000)
        if reply[0] != "ok":
            raise LedgerUnavailable("redis ledger: the spend rebuild did not take")
        return Reserved(refused=None, balances=_balances(reply[1:]))

    async def settle(self, call_id: str, usd: Decimal, tokens: int
                     ) -> list[tuple[Hold, Balance]]:
        reply = await self._run(self._settle, [self._c(call_id), self._cw(call_id)],
                                [call_id, to_units(usd), tokens, self.prefix])
        settled = []
        for i in range(0, len(reply), 5):
            hold = Hold(key=reply[i], usd=usd, tokens=tokens, limit_usd=None,
                        limit_tokens=None, block=False, period_end=None)
            settled.append((hold, _balances(reply[i + 1:i + 5])[0]))
        return settled

    async def release(self, call_id: str) -> None:
        """Drop a call's holds without spending anything (idempotent)."""
        await self.settle(call_id, Decimal(0), 0)

    async def balances(self, keys: list[str]) -> dict[str, Balance]:
        if not keys:
            return {}
        unique = list(dict.fromkeys(keys))
        redis_keys = [k for key in unique for k in (self._b(key), self._r(key))]
        reply = await self._run(self._balances, redis_keys, [])
        return dict(zip(unique, _balances(reply), strict=True))

    async def seed(self, totals: dict[str, tuple[Decimal, int]],
                   idle: Mapping[str, int] | None = None, now: datetime | None = None
                   ) -> None:
        """Seeded keys expire unless a reserve sets their period's end; a per-trace
        `total` budget's after its idle time (from now: Redis's clock)."""
        idle = idle or {}
        keys = [self._marker] + [self._b(k) for k in totals]
        args = [v for k, (usd, count) in totals.items()
                for v in (to_units(usd), count, idle.get(k, 0) * 1000 or SEED_TTL_MS)]
        seeded = await self._run(self._seed, keys, args)
        if seeded:
            log.info("ledger_seeded", budgets=seeded)

    async def claim_alert(self, key: str, threshold: Decimal) -> bool:
        """True for exactly one caller per budget period and threshold, across instances
        (so a threshold alert fires once however many instances see it crossed)."""
        try:
            return bool(await self.redis.set(f"{self.prefix}a:{key}:{threshold}", "1",
                                             nx=True, px=SEED_TTL_MS))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise LedgerUnavailable(f"redis ledger unreachable: {exc}") from exc

    async def _reseed(self) -> None:
        """Redis has no ledger (restarted empty): rebuild it from the usage log, once."""
        if self._reseeding is None:
            self._reseeding = asyncio.Lock()
        async with self._reseeding:
            try:
                if await self.redis.exists(self._marker):
                    return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                raise LedgerUnavailable(f"redis ledger unreachable: {exc}") from exc
            log.warning("ledger_lost", url=_redacted(self.url),
                        action="rebuilding spend from the usage log")
            if self.on_lost is not None:
                try:
                    await self.on_lost()
                except LedgerUnavailable:
                    raise
                except Exception as exc:
                    log.error("ledger_rebuild_failed", error=str(exc))
            await self.seed({})  # sets the marker even when the rebuild could not run

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()


def _epoch_ms(when: datetime | None) -> int:
    return int(when.timestamp() * 1000) if when is not None else 0


def _balances(flat: list[str]) -> list[Balance]:
    return [Balance(spent_usd=from_units(flat[i]), reserved_usd=from_units(flat[i + 1]),
                    spent_tokens=int(flat[i + 2]), reserved_tokens=int(flat[i + 3]))
            for i in range(0, len(flat), 4)]


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url

