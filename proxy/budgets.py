"""Budgets: which apply to a call, what it may cost at most, and the alerts they raise.

Before forwarding, a call's maximum cost (the prompt counted with tiktoken, plus its
output limit at the output price) is held against every budget that applies, in one
atomic ledger step; if any would go over, nothing is forwarded. When the call ends, the
hold is replaced by the actual cost. So concurrent calls cannot together overspend a
budget by more than the estimation error.

Rate limits (proxy.ratelimits) are checked in that same ledger step, and a budget scoped on
`trace` gives each agent run its own budget (`{trace: "*"}`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote
from zoneinfo import ZoneInfo

import aiohttp
import structlog

from proxy import money, tokens
from proxy.config import BudgetConfig, Enforce, LedgerFailure, Period, Settings, Unpriced
from proxy.errors import Kind, MeterError
from proxy.pricing import PriceBook, cost
from proxy.ratelimits import RateLimit, RateLimited
from proxy.storage import LedgerUnavailable
from proxy.storage.ledger import ZERO, Balance, Hold, Ledger, Reserved
from proxy.storage.readers import LogReader
from proxy.usage import Usage
from proxy.webhook import post_event

if TYPE_CHECKING:
    from proxy.exchange import Exchange

log = structlog.get_logger("meterproxy.budgets")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Prompts longer than this are counted in a thread so the event loop keeps moving.
# Held for context a provider keeps (previous_response_id) when the table has no window.
DEFAULT_CONTEXT_WINDOW = 200_000
# A per-trace budget of period `total` is forgotten this long after its trace's last call:
# trace ids are per run, so their counters would otherwise pile up for ever.
TRACE_IDLE_S = 86_400
_KEY_CACHE_LIMIT = 10_000  # ledger keys kept between calls, per budget and scope
NEAR = 64  # a budget with room for fewer holds than this counts each prompt exactly


def scope_of(scope: tuple[tuple[str, str], ...], attrs: dict[str, str | None]) -> str | None:
    """`customer=acme,feature=search` for a call a scope covers, else None (budgets and rate
    limits share it).

    Values are percent-encoded, so any value (commas, `=`, `/`, `@`, quotes, non-ASCII)
    keeps the scope and the ledger key built from it unambiguous (_attrs_of)."""
    values = []
    for dim, want in scope:
        got = attrs.get(dim)
        if got is None or (want != "*" and got != want):
            return None
        values.append(got)
    return _encoded(scope, tuple(values))


@lru_cache(maxsize=_KEY_CACHE_LIMIT)
def _encoded(scope: tuple[tuple[str, str], ...], values: tuple[str, ...]) -> str:
    """scope_of's string, built once per scope and values (quoting is slow per call)."""
    return ",".join(f"{dim}={quote(str(got), safe='')}"
                    for (dim, _), got in zip(scope, values, strict=True))


@dataclass(frozen=True, slots=True)
class Budget:
    """One configured budget; a `*` in its scope stands for each value separately."""

    name: str | None
    scope: tuple[tuple[str, str], ...]
    period: Period
    tz: ZoneInfo
    limit_usd: Decimal | None
    limit_tokens: int | None
    block: bool

    def concrete_scope(self, attrs: dict[str, str | None]) -> str | None:
        """`customer=acme,feature=search` for a call this budget covers, else None."""
        return scope_of(self.scope, attrs)

    @property
    def per_trace(self) -> bool:
        """One budget per agent run: no threshold alerts, no listing (one per trace id)."""
        return any(dim == "trace" for dim, _ in self.scope)

    @property
    def idle_s(self) -> int:
        """Seconds without a call after which the ledger forgets a scope (0: never)."""
        return TRACE_IDLE_S if self.per_trace and self.period == "total" else 0

    def rebuild_since(self, now: datetime) -> datetime:
        """Where the usage-log rebuild of this budget starts: its period's start, or for an
        expiring per-trace budget the idle time ago (an older run is forgotten anyway)."""
        start = self.bounds(now)[0]
        if not self.idle_s:
            return start
        idle_from = now - timedelta(seconds=self.idle_s)  # from its hour: the log's grain
        return max(start, idle_from.replace(minute=0, second=0, microsecond=0))

    def bounds(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The start and end (UTC) of the period containing `now`; `total` never ends."""
        if self.period == "total":
            return EPOCH, None
        local = now.astimezone(self.tz)
        day = local.date()
        if self.period == "week":
            day -= timedelta(days=day.weekday())
        elif self.period == "month":
            day = day.replace(day=1)
        start = datetime(day.year, day.month, day.day, tzinfo=self.tz)
        if self.period == "day":
            nxt = day + timedelta(days=1)
        elif self.period == "week":
            nxt = day + timedelta(days=7)
        else:
            nxt = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=self.tz)
        return start.astimezone(UTC), end.astimezone(UTC)

    @property
    def identity(self) -> tuple[str | None, tuple[tuple[str, str], ...], str, str]:
        """What names the budget's ledger counters; a reload that changes it rebuilds them."""
        return self.name, self.scope, self.period, self.tz.key

    def key(self, scope: str, start: datetime) -> str:
        label = f"{self.name}:" if self.name else ""
        return f"{label}{scope}/{self.period}@{start:%Y-%m-%dT%H:%MZ}"

    def describe(self, scope: str) -> str:
        limits = []
        if self.limit_usd is not None:
            limits.append(f"${self.limit_usd:f}")
        if self.limit_tokens is not None:
            limits.append(f"{self.limit_tokens:,} tokens")
        name = f"{self.name!r} " if self.name else ""
        return f"the {self.period} budget {name}for {scope} (limit {' and '.join(limits)})"


def budgets_from(settings: Settings) -> list[Budget]:
    def one(conf: BudgetConfig, scope: dict[str, str]) -> Budget:
        return Budget(
            name=conf.name,
            scope=tuple(sorted(scope.items())),
            period=conf.period,
            tz=ZoneInfo(conf.timezone),
            limit_usd=Decimal(str(conf.limit_usd)) if conf.limit_usd is not None else None,
            limit_tokens=conf.limit_tokens,
            block=conf.enforce == Enforce.BLOCK,
        )

    found = [one(b, {"key": k.name}) for k in settings.keys for b in k.budgets]
    found += [one(b, b.scope) for b in settings.budgets]
    return found


def call_attrs(key: str | None, customer: str | None, feature: str | None,
               tags: dict[str, str] | None, trace: str | None = None
               ) -> dict[str, str | None]:
    attrs: dict[str, str | None] = {"key": key, "customer": customer, "feature": feature,
                                    "trace": trace}
    for name, value in (tags or {}).items():
        attrs[f"tag:{name}"] = value
    return attrs


@dataclass(slots=True)
class Reservation:
    holds: list[tuple[Budget, str, Hold]]
    windows: int = 0  # rate windows the call was entered in (settled by the ledger)
    unreserved: bool = False  # admitted while the ledger was unreachable (policy open)


class Alerts:
    """Threshold alerts, once per budget period and threshold: a log event, a gauge, a POST."""

    def __init__(self, thresholds: Iterable[float], webhook_url: str | None,
                 spawn: Callable[[Any], None], session: aiohttp.ClientSession | None,
                 claim: Callable[[str, Decimal], Awaitable[bool]] | None = None,
                 fired: set[tuple[str, Decimal]] | None = None,
                 seen: set[str] | None = None) -> None:
        self.thresholds = sorted(Decimal(str(t)) for t in thresholds)
        self.webhook_url = webhook_url
        self.spawn = spawn
        self.session = session
        # A shared ledger's claim_alert: once across instances, not once per instance.
        self.claim = claim
        # Carried over from the previous configuration, so a reload fires nothing twice.
        self.fired: set[tuple[str, Decimal]] = fired if fired is not None else set()
        # Every concrete scope any snapshot has observed (`customer=acme` of a `*` budget),
        # shared with the next snapshot by reference: a call still running on the old one
        # when a reload swaps it settles here too, so the admin API and the dashboard keep
        # showing that customer's period before the customer calls again.
        self.seen: set[str] = seen if seen is not None else set()
        self.utilisation: dict[str, tuple[Budget, str, float]] = {}

    def observe(self, budget: Budget, scope: str, hold_key: str, balance: Balance,
                *, quiet: bool = False) -> None:
        if budget.per_trace:
            return  # one per agent run: its refusal is the signal, not thresholds
        self.seen.add(scope)
        if budget.limit_usd is not None and budget.limit_usd > 0:
            ratio = balance.spent_usd / budget.limit_usd
        elif budget.limit_tokens:
            ratio = Decimal(balance.spent_tokens) / Decimal(budget.limit_tokens)
        else:
            return
        self.utilisation[hold_key] = (budget, scope, float(ratio))
        for threshold in self.thresholds:
            if ratio >= threshold and (hold_key, threshold) not in self.fired:
                self.fired.add((hold_key, threshold))
                if not quiet:
                    self._fire(budget, scope, hold_key, balance, threshold)

    def _fire(self, budget: Budget, scope: str, hold_key: str, balance: Balance,
              threshold: Decimal) -> None:
        event = {"budget": hold_key, "scope": scope, "name": budget.name,
                 "period": budget.period, "spent_usd": money.exact(balance.spent_usd),
                 "limit_usd": None if budget.limit_usd is None else money.exact(budget.limit_usd),
                 "spent_tokens": balance.spent_tokens, "limit_tokens": budget.limit_tokens,
                 "threshold": float(threshold)}
        if self.claim is None:
            self._announce(event)
        else:
            self.spawn(self._claim_then_announce(hold_key, threshold, event))

    async def _claim_then_announce(self, hold_key: str, threshold: Decimal,
                                   event: dict[str, Any]) -> None:
        """With a shared ledger, only the instance that claims the alert announces it."""
        assert self.claim is not None
        try:
            won = await self.claim(hold_key, threshold)
        except LedgerUnavailable:
            won = True  # better twice than never
        if won:
            self._announce(event)

    def _announce(self, event: dict[str, Any]) -> None:
        log.warning("budget_alert", **event)
        if self.webhook_url and self.session is not None:
            self.spawn(self._post(event))

    async def _post(self, event: dict[str, Any]) -> None:
        assert self.session is not None and self.webhook_url is not None
        if not await post_event(self.session, self.webhook_url, event, "budget"):
            log.error("budget_webhook_gave_up", budget=event["budget"])


class Budgets:
    """Reserve and settle against the ledger for every budget that applies to a call."""

    def __init__(self, budgets: list[Budget], ledger: Ledger, prices: PriceBook,
                 settings: Settings, alerts: Alerts, spawn: Callable[[Any], None],
                 clock: Callable[[], datetime] | None = None,
                 limits: list[RateLimit] | None = None) -> None:
        self.budgets = budgets
        self.limits = limits or []
        self.ledger = ledger
        self.prices = prices
        self.ttl_s = settings.reservations.ttl_s
        self.default_output = settings.reservations.default_max_output_tokens
        self.spawn = spawn
        self.clock = clock or (lambda: datetime.now(UTC))
        self.ledger_failure = settings.storage.ledger_failure
        self.refusal_status = settings.server.refusal_status
        self.allow_unpriced = settings.pricing.unpriced is Unpriced.ALLOW
        self.alerts = alerts
        self.count_bytes_up_to = settings.server.estimate_bytes_above_kb * 1024
        # Each budget's current period and each scope's ledger key, kept between calls.
        self._periods: list[tuple[datetime, datetime | None] | None] = [None] * len(budgets)
        self._keys: dict[tuple[int, str], tuple[datetime, str]] = {}
        self._seen: dict[str, Balance] = {}  # each ledger key's latest balance
        # The embedded ledger reserves and settles in place: no task per call.
        self._reserve_now = getattr(ledger, "reserve_now", None)
        self._settle_now = getattr(ledger, "settle_now", None)
        self._balance_now = getattr(ledger, "balance_now", None)

    def applicable(self, attrs: dict[str, str | None], now: datetime
                   ) -> list[tuple[Budget, str, str, datetime | None]]:
        found = []
        for i, budget in enumerate(self.budgets):
            scope = budget.concrete_scope(attrs)
            if scope is not None:
                start, end = self._period(i, now)
                found.append((budget, scope, self._key(i, scope, start), end))
        return found

    def windows_of(self, attrs: dict[str, str | None]) -> list[tuple[RateLimit, str]]:
        found = []
        for limit in self.limits:
            scope = scope_of(limit.scope, attrs)
            if scope is not None:
                found.append((limit, scope))
        return found

    def _period(self, i: int, now: datetime) -> tuple[datetime, datetime | None]:
        """budgets[i].bounds(now), computed again only when `now` leaves the cached period."""
        cached = self._periods[i]
        if cached is not None and cached[0] <= now and (cached[1] is None or now < cached[1]):
            return cached
        cached = self._periods[i] = self.budgets[i].bounds(now)
        return cached

    def _key(self, i: int, scope: str, start: datetime) -> str:
        """budgets[i].key(scope, start), kept per scope for its current period."""
        cached = self._keys.get((i, scope))
        if cached is not None and cached[0] == start:
            return cached[1]
        if len(self._keys) >= _KEY_CACHE_LIMIT:  # scopes come from clients: bound it
            self._keys.clear()
        key = self.budgets[i].key(scope, start)
        self._keys[(i, scope)] = (start, key)
        return key

    async def reserve(self, x: Exchange) -> None:
        """Hold the call's maximum cost on every budget that applies and enter it in every
        rate window that applies, or refuse it (429)."""
        now = x.started
        attrs = call_attrs(x.key_name, x.customer, x.feature, x.tags, x.trace_id)
        applicable = self.applicable(attrs, now)
        limits = self.windows_of(attrs) if self.limits else []
        if not applicable and not limits:
            return
        usd_budget = next(((b, scope) for b, scope, _, _ in applicable
                           if b.block and b.limit_usd is not None), None)
        if not x.call.metered:  # an endpoint opened by allow_unmetered: it has no price
            if usd_budget is not None:
                raise MeterError(
                    Kind.PERMISSION, f"endpoint_not_metered: {x.call.endpoint} is open but not "
                    f"metered, so it cannot run under {usd_budget[0].describe(usd_budget[1])}",
                    code="endpoint_not_metered")
            if not any(limit.requests is not None for limit, _ in limits):
                return
            applicable = []  # only its requests are counted
        priced_for = None
        prompt, usd, count = 0, ZERO, 0  # requests-only limits: no need to count the prompt
        countable = counted = False
        if applicable or any(limit.counts_amounts for limit, _ in limits):
            # A USD rate limit, like a USD budget, cannot count a model with no price.
            priced_for = usd_budget or next(((limit, scope) for limit, scope in limits
                                             if limit.usd is not None), None)
            await self._refuse_deep(x)
            # The body's bytes bound its prompt's tokens at no cost; the prompt is counted
            # only where the bound's few-fold excess could decide: near a limit.
            prompt = tokens.utf8_bound(x.body)
            usd, count = self.estimate(x, now, priced_for, prompt)
            # (Megabytes are never tokenized: that would hold other calls up.)
            countable = len(x.body) <= self.count_bytes_up_to
            if countable and self._near(applicable, limits, usd, count):
                prompt, counted = await self._count(x), True
                usd, count = self.estimate(x, now, priced_for, prompt)
        try:
            holds, windows, result = await self._hold(x, applicable, limits, usd, count)
            if (result.refused is not None or result.limited is not None) \
                    and countable and not counted:
                # Refused on the bound (a balance that moved since this instance saw it):
                # counted exactly and tried once more, so no call is refused for the bound.
                exact = await self._count(x)
                if exact < prompt:
                    usd, count = self.estimate(x, now, priced_for, exact)
                    holds, windows, result = await self._hold(x, applicable, limits, usd,
                                                              count)
        except LedgerUnavailable as exc:
            log.error("ledger_unavailable", request_id=x.id, policy=self.ledger_failure,
                      error=str(exc))
            if self.ledger_failure != LedgerFailure.OPEN:
                raise MeterError(Kind.UNAVAILABLE, "meterproxy cannot reach its budget ledger, "
                                 "so it cannot check this call's budget; retry shortly",
                                 headers={"Retry-After": "1"}) from None
            holds = self._holds(applicable, usd, count)
            x.reservation = Reservation([(b, scope, h) for (b, scope, _, _), h
                                         in zip(applicable, holds, strict=True)],
                                        unreserved=True)
            return
        if result.limited is not None:
            limit, scope = limits[windows.index(result.limited)]
            raise RateLimited(limit, scope, result.retry_after_s)
        if result.refused is not None:
            budget, scope, _, end = applicable[holds.index(result.refused)]
            headers = {"x-should-retry": "false"}
            if end is not None:
                headers["Retry-After"] = str(max(1, math.ceil((end - now).total_seconds())))
                when = f"it resets at {end:%Y-%m-%dT%H:%M:%SZ}"
            else:
                when = "it does not reset"
            status = x.key.refusal_status if x.key is not None else None
            raise MeterError(Kind.BUDGET_EXCEEDED,
                             f"budget_exceeded: {budget.describe(scope)} has no room for this "
                             f"call; {when}", headers=headers,
                             status=status or self.refusal_status)
        x.reservation = Reservation([(b, scope, h) for (b, scope, _, _), h
                                     in zip(applicable, holds, strict=True)], len(windows))
        self._saw(zip(holds, result.balances, strict=True))
        # Only the caller's own key budgets: another scope's balance is not its business.
        remaining = [h.limit_usd - bal.spent_usd - bal.reserved_usd
                     for (b, _, _, _), h, bal in zip(applicable, holds, result.balances,
                                                     strict=True)
                     if h.limit_usd is not None and any(d == "key" for d, _ in b.scope)]
        if remaining:
            x.budget_remaining = max(min(remaining), ZERO)

    def _near(self, applicable: list[tuple[Budget, str, str, datetime | None]],
              limits: list[tuple[RateLimit, str]], usd: Decimal, count: int) -> bool:
        """Whether a hold of `usd` and `count` could decide admission: a rate window counts
        amounts (windows are small), or a blocking budget has room for fewer than NEAR such
        holds, or (a shared ledger) this instance has not seen its balance yet. Counting
        those exactly keeps a burst of up to NEAR concurrent calls admitted as if every
        prompt were counted."""
        if any(limit.counts_amounts for limit, _ in limits):
            return True
        for budget, _, key, _ in applicable:
            if not budget.block:
                continue
            seen = self._balance_now(key) if self._balance_now else self._seen.get(key)
            if seen is None:
                return True
            if budget.limit_usd is not None and \
                    budget.limit_usd - seen.spent_usd - seen.reserved_usd < usd * NEAR:
                return True
            if budget.limit_tokens is not None and \
                    budget.limit_tokens - seen.spent_tokens - seen.reserved_tokens < count * NEAR:
                return True
        return False

    @staticmethod
    async def _count(x: Exchange) -> int:
        """The prompt's exact tokens, on the tokenizer pool."""
        return await tokens.off_loop(count_prompt, x.dialect, x.call, x.payload,
                                     tenant=x.key_name or "")

    @staticmethod
    def _holds(applicable: list[tuple[Budget, str, str, datetime | None]], usd: Decimal,
               count: int) -> list[Hold]:
        return [Hold(key=key, usd=usd, tokens=count, limit_usd=b.limit_usd,
                     limit_tokens=b.limit_tokens, block=b.block, period_end=end,
                     idle_s=b.idle_s)
                for b, _, key, end in applicable]

    async def _hold(self, x: Exchange, applicable: list[tuple[Budget, str, str, datetime | None]],
                    limits: list[tuple[RateLimit, str]], usd: Decimal, count: int
                    ) -> tuple[list[Hold], list[Any], Reserved]:
        """Hold `usd` and `count` on every applicable budget and window (or be refused)."""
        holds = self._holds(applicable, usd, count)
        windows = [limit.window(scope, count, usd) for limit, scope in limits]
        return holds, windows, await self._reserve(x.id, holds, windows)

    async def _refuse_deep(self, x: Exchange) -> None:
        """400 for a body nested too deep for the prompt's walk (which recurses). Only a
        body with that many brackets can be: most are cleared by two byte counts."""
        if x.body.count(b"[") + x.body.count(b"{") <= tokens.MAX_DEPTH:
            return
        try:
            await tokens.off_loop(tokens.check_depth, x.payload, tenant=x.key_name or "")
        except tokens.TooDeep as exc:
            raise MeterError(Kind.INVALID_REQUEST, str(exc)) from None

    async def _reserve(self, call_id: str, holds: list[Hold], windows: list[Any]) -> Reserved:
        """The ledger's reserve. The embedded ledger's runs in place (it never awaits, so
        no cancel can land inside it). A shared ledger's is shielded: a client that goes
        away mid-reserve must not leave a hold behind, so a reserve that completes after
        the cancel is released at once."""
        if self._reserve_now is not None:
            return self._reserve_now(call_id, holds, windows, self.clock())
        pending = asyncio.ensure_future(self.ledger.reserve(call_id, holds, self.ttl_s,
                                                            windows, self.clock()))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(lambda done: self._release_orphan(done, call_id))
            raise

    def _release_orphan(self, done: asyncio.Future, call_id: str) -> None:
        """A reserve whose caller was cancelled: give back whatever it held."""
        if done.cancelled() or done.exception() is not None:
            return
        if done.result().refused is None:
            self.spawn(self.ledger.settle(call_id, ZERO, 0))

    def estimate(self, x: Exchange, now: datetime,
                 usd_budget: tuple[Budget | RateLimit, str] | None, prompt: int
                 ) -> tuple[Decimal, int]:
        """The call's most expensive outcome: `prompt` tokens (with any context the
        provider keeps for it) plus its whole output allowance for every answer it asks for.

        A model without a price cannot be held against a USD budget: it is refused
        unless pricing.unpriced is `allow`."""
        model = x.call.model
        table = x.upstream.pricing_table
        price = self.prices.lookup(table, (model,), now)
        if price is None and usd_budget is not None and not self.allow_unpriced:
            raise MeterError(
                Kind.PERMISSION,
                f"model_unpriced: {x.upstream.name} model {model!r} has no price, so it cannot "
                f"run under {usd_budget[0].describe(usd_budget[1])}; give it one in "
                "pricing.overrides (or set pricing.unpriced: allow)", param="model",
                code="model_unpriced")
        entry = self.prices.model(table, (model,))
        if x.call.server_context:
            prompt += entry.context_window if entry and entry.context_window \
                else DEFAULT_CONTEXT_WINDOW
        output = x.call.max_output_tokens
        if output is None:
            output = entry.max_output_tokens if entry and entry.max_output_tokens \
                else self.default_output
        output *= x.call.choices
        usage = Usage(input_tokens=prompt, output_tokens=output)
        usd = cost(usage, price, now, breakdown=False).total if price is not None else ZERO
        return usd, prompt + output

    def settle(self, x: Exchange) -> None:
        """Replace the call's holds by its actual cost (zero for a refused or failed call)."""
        reservation: Reservation | None = x.reservation
        if reservation is None:
            return
        x.reservation = None
        usd = x.cost if x.cost is not None else ZERO
        usage = x.usage or Usage()
        count = usage.prompt_tokens + usage.output_tokens
        if self._settle_now is not None and not reservation.unreserved:
            self._observe(self._settle_now(x.id, usd, count), reservation)
            return
        self.spawn(self._settle(x.id, usd, count, reservation))

    async def _settle(self, call_id: str, usd: Decimal, count: int,
                      reservation: Reservation) -> None:
        # Settles are idempotent, so a shared ledger that is briefly away is simply retried;
        # a call admitted without a hold (policy open) is charged the same way once it is back.
        for delay in (0.25, 0.5, 1, 2, 4, None):
            try:
                if reservation.unreserved:
                    await self.ledger.reserve(call_id, [replace(h, block=False) for _, _, h
                                                        in reservation.holds], self.ttl_s)
                settled = await self.ledger.settle(call_id, usd, count)
                break
            except LedgerUnavailable as exc:
                if delay is None:
                    log.error("ledger_settle_failed", request_id=call_id, usd=str(usd),
                              error=str(exc))
                    return
                await asyncio.sleep(delay)
        self._observe(settled, reservation)

    def _saw(self, balances: Iterable[tuple[Hold, Balance]]) -> None:
        """Keep the balances a shared ledger's reserve or settle returned, for `_near`
        (the embedded ledger's are read in place)."""
        if self._balance_now is not None:
            return
        for hold, balance in balances:
            if hold.key not in self._seen and len(self._seen) >= _KEY_CACHE_LIMIT:
                self._seen.clear()  # scopes come from clients: bound it
            self._seen[hold.key] = balance

    def _observe(self, settled: list[tuple[Hold, Balance]], reservation: Reservation) -> None:
        self._saw(settled)
        scopes = {h.key: (b, scope) for b, scope, h in reservation.holds}
        for hold, balance in settled:
            budget, scope = scopes[hold.key]
            self.alerts.observe(budget, scope, hold.key, balance)

    async def status(self) -> list[dict[str, Any]]:
        """Every current budget period the ledger has seen, for the admin API."""
        periods = current_periods(self.budgets, self.alerts.seen, self.clock())
        balances = await self.ledger.balances([key for _, _, key, _ in periods])
        return [status_row(b, scope, balances[key], end) for b, scope, key, end in periods]

    async def rebuild(self, totals: dict[tuple[str, str], tuple[Decimal, int]],
                      seen: Iterable[str] = ()) -> None:
        """Seed the ledger with spend summed from the usage log (periods it knows nothing
        of), then mark the thresholds already passed for those and the `seen` scopes."""
        now = self.clock()
        periods = current_periods(self.budgets, {scope for _, scope in totals} | set(seen),
                                  now)
        # Per-trace `total` budgets are seeded to be forgotten like live ones.
        idle = {key: b.idle_s for b, _, key, _ in periods if b.idle_s}
        await self.ledger.seed({key: amounts for (key, _), amounts in totals.items()}, idle,
                               now)
        watched = [p for p in periods if not p[0].per_trace]  # they raise no alerts
        balances = await self.ledger.balances([key for _, _, key, _ in watched])
        for budget, scope, key, _ in watched:
            self.alerts.observe(budget, scope, key, balances[key], quiet=True)


def count_prompt(dialect: Any, call: Any, payload: Any) -> int:
    """The prompt's tokens with tiktoken (on the tokenizer pool; refuses deep nesting)."""
    tokens.check_depth(payload)
    texts, overhead = dialect.prompt_texts(call, payload)
    return tokens.count_texts(texts, call.model) + overhead


def current_periods(budgets: list[Budget], seen: Iterable[str], now: datetime
                    ) -> list[tuple[Budget, str, str, datetime | None]]:
    """Each budget's current period for every scope seen (and its own, if not `*`)."""
    found = []
    for budget in budgets:
        scopes = {s for s in seen if budget.concrete_scope(_attrs_of(s)) == s}
        if all(want != "*" for _, want in budget.scope):
            scopes.add(budget.concrete_scope(dict(budget.scope)) or "")
        start, end = budget.bounds(now)
        found += [(budget, scope, budget.key(scope, start), end) for scope in sorted(scopes)]
    return found


def _attrs_of(scope: str) -> dict[str, str | None]:
    """The attributes a scope from Budget.concrete_scope was built from."""
    attrs: dict[str, str | None] = {}
    for part in scope.split(",") if scope else ():
        dim, _, value = part.partition("=")
        attrs[dim] = unquote(value)
    return attrs


def status_row(budget: Budget, scope: str, balance: Balance,
               end: datetime | None) -> dict[str, Any]:
    remaining = None
    if budget.limit_usd is not None:
        remaining = max(budget.limit_usd - balance.spent_usd - balance.reserved_usd, ZERO)
    return {
        "scope": scope, "name": budget.name, "period": budget.period,
        "limit_usd": budget.limit_usd, "spent_usd": balance.spent_usd,
        "reserved_usd": balance.reserved_usd, "remaining_usd": remaining,
        "limit_tokens": budget.limit_tokens, "spent_tokens": balance.spent_tokens,
        "enforce": Enforce.BLOCK if budget.block else Enforce.ALERT_ONLY,
        "resets_at": end.strftime("%Y-%m-%dT%H:%M:%SZ") if end else None,
    }


def spend_from_log(reader: LogReader, budgets: list[Budget], now: datetime
                   ) -> dict[tuple[str, str], tuple[Decimal, int]]:
    """Each current budget period's spend, summed exactly from the usage log.

    Budgets are taken in sets that scope on the same dimensions; each set's rows are
    grouped by just those dimensions and by hour (so each lands in its own period,
    whatever the budget's time zone). A set on dimensions an hourly rollup has (key,
    feature; customer) reads the rollup, a few rows per hour; others one range scan.
    """
    if not budgets:
        return {}
    by_dims: dict[tuple[str, ...], list[Budget]] = {}
    for budget in budgets:
        by_dims.setdefault(tuple(sorted({dim for dim, _ in budget.scope})), []).append(budget)
    totals: dict[tuple[str, str], tuple[Decimal, int]] = {}
    for dims, group in by_dims.items():
        periods = [(b, b.rebuild_since(now), *b.bounds(now)) for b in group]
        since = min(since_b for _, since_b, _, _ in periods)
        for spent in reader.spend_by_hour(list(dims), since):
            for budget, since_b, start, end in periods:
                scope = budget.concrete_scope(spent.attrs)
                if scope is None or spent.hour < since_b or (
                        end is not None and spent.hour >= end):
                    continue
                k = (budget.key(scope, start), scope)
                usd, count = totals.get(k, (ZERO, 0))
                totals[k] = (usd + spent.usd, count + spent.tokens)
    return totals
