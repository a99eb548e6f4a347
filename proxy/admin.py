"""The admin HTTP API under /_meter/ (bearer admin key) and /healthz (open).

The dashboard's login form POSTs the key to /_meter/login (never in a URL, so never in an
access log); the answer is an HttpOnly, SameSite=Strict session cookie: a random id with
its expiry, signed with the admin key (so every worker checks it, and changing the key ends
every session). That cookie opens the other GET endpoints under /_meter/ too, so the
page's links work; it never opens a POST. Every admin answer says `nosniff`, and every
error, a crash included, is JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy import dashboard, money, query
from proxy.keys import APP_SERVER, runtime_of
from proxy.output import csv_lines
from proxy.report import build_report, render_text
from proxy.storage import LedgerUnavailable
from proxy.storage.readers import open_reader
from proxy.timeparse import parse_time

log = structlog.get_logger("meterproxy")

SESSION_COOKIE = "meterproxy_admin"
SESSION_DAYS = 7
EXPORT_BATCH_ROWS = 1000
REPORT_TTL_S = 30  # a report over a million rows takes seconds; the page may be reloaded
DASHBOARD_ADVICE_CALLS = 200_000  # above this many calls the page does not build advice


@dataclass
class ReportCache:
    """Recent reports by their parameters, so reloads and many viewers cost one build."""

    entries: dict[tuple, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    locks: dict[tuple, asyncio.Lock] = field(default_factory=dict)


APP_REPORTS = web.AppKey("meterproxy_reports", ReportCache)
PAGE_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                           "form-action 'self'; frame-ancestors 'none'"}


def _not_allowed(allowed: set[str]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPMethodNotAllowed(request.method, allowed, content_type="application/json",
                                       text='{"error": "method not allowed here"}')
    return handler


async def _no_such_path(request: web.Request) -> web.Response:
    raise web.HTTPNotFound(text='{"error": "no such admin path"}',
                           content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    rt = runtime_of(request)
    writer = rt.writer
    ok = writer.healthy and not writer.dropped
    return json_response({"status": "ok" if ok else "degraded",
                          "pending_rows": writer.pending, "write_failures": writer.failures,
                          "dropped_rows": writer.dropped})


async def metrics(request: web.Request) -> web.Response:
    _authorized(request)
    text = runtime_of(request).metrics.render()
    return web.Response(body=text.encode(), headers={
        "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _authorized(request: web.Request) -> None:
    rt = runtime_of(request)
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if rt.admin_key and hmac.compare_digest(token.encode(), rt.admin_key.encode()):
        return
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if rt.admin_key and cookie and request.method in ("GET", "HEAD") and session_valid(
            rt.admin_key, cookie, time.time()):
        return
    raise web.HTTPUnauthorized(
        text='{"error": "admin key required: Authorization: Bearer <admin key>"}',
        content_type="application/json")


def new_session(admin_key: str, now: float) -> str:
    """A fresh session: a random id, its expiry, and their signature with the admin key."""
    claim = f"{secrets.token_urlsafe(24)}.{int(now + SESSION_DAYS * 86400)}"
    return f"{claim}.{_sign(admin_key, claim)}"


def session_valid(admin_key: str, token: str, now: float) -> bool:
    """Whether a session cookie was signed with this admin key and has not expired."""
    claim, _, signature = token.rpartition(".")
    expires = claim.rpartition(".")[2]
    return (expires.isdigit() and int(expires) > now
            and hmac.compare_digest(signature.encode(), _sign(admin_key, claim).encode()))


def _sign(admin_key: str, claim: str) -> str:
    return hmac.new(admin_key.encode(), b"meterproxy session " + claim.encode(),
                    hashlib.sha256).hexdigest()


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=orjson.dumps({"error": message}).decode(),
                              content_type="application/json")


def _usage_query(request: web.Request) -> query.UsageQuery:
    """The CLI's `usage` options as query parameters (where= repeats; k!=v excludes)."""
    params = request.query
    now = runtime_of(request).now()
    try:
        where, exclude = query.parse_filters(params.getall("where", []))
        return query.UsageQuery(
            since=parse_time(params["since"], now) if params.get("since") else None,
            until=parse_time(params["until"], now) if params.get("until") else None,
            group_by=[g for g in params.get("group_by", "").split(",") if g],
            where=where, exclude=exclude,
            order_by=params.get("order_by") or None,
            limit=_whole(params, "limit", 0, None),
            durations=_flag(params, "durations"),
        )
    except ValueError as exc:
        raise _bad_request(str(exc)) from None


async def usage(request: web.Request) -> web.Response:
    _authorized(request)
    q = _usage_query(request)
    rows = await _read(request, lambda log: log.usage(q))
    return json_response(rows)


async def usage_row(request: web.Request) -> web.Response:
    """One call's row, plus `explain`: its price period, each class x rate, the total."""
    _authorized(request)
    found = await _read(request, lambda log: query.explain(log, request.match_info["id"]))
    if found is None:
        raise web.HTTPNotFound(text='{"error": "no such call"}', content_type="application/json")
    row = found.pop("row")
    return json_response({**row, "explain": found})


async def report(request: web.Request) -> web.Response:
    """The report as JSON (or `?format=text`), `?since=` (default 30d), `until=`, `top=`."""
    _authorized(request)
    data = await _report(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "text"):
        raise _bad_request("format takes json or text")
    if fmt == "text":
        return web.Response(text=render_text(data) + "\n", content_type="text/plain")
    return json_response(data)


async def forecast_view(request: web.Request) -> web.Response:
    """This month's forecast: total, top customers, budgets (the report's `forecast`)."""
    _authorized(request)
    from proxy import forecast
    from proxy.budgets import budgets_from

    rt = runtime_of(request)
    now = rt.now()
    budgets = budgets_from(rt.settings)
    return json_response(await _read(request, lambda log: forecast.forecast_month(
        log, now, budgets, _top(request))))


def _top(request: web.Request) -> int:
    return _whole(request.query, "top", 1, 1000) or 10


def _whole(params: Any, name: str, low: int, high: int | None) -> int | None:
    """An optional whole-number parameter within bounds; anything else is a 400."""
    text = params.get(name)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f"at least {low}"
        raise _bad_request(f"{name} takes a whole number, {bound}")
    return value


def _flag(params: Any, name: str) -> bool:
    """An absent flag is off; a present one must say which (`?durations=` is a 400)."""
    if name not in params:
        return False
    text = params[name].lower()
    if text not in _FLAGS:
        raise _bad_request(f"{name} takes one of {', '.join(sorted(_FLAGS))}")
    return _FLAGS[text]


_FLAGS = {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}


def _window(request: web.Request) -> tuple[datetime, datetime | None, datetime]:
    """The `since=` (default 30d) and `until=` of a report-like view, and now."""
    now = runtime_of(request).now()
    params = request.query
    try:
        since = parse_time(params.get("since") or "30d", now)
        until = parse_time(params["until"], now) if params.get("until") else None
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return since, until, now


async def _cached(request: web.Request, key: tuple,
                  build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`build()` run off the loop once per key and REPORT_TTL_S; concurrent askers wait
    for the one run rather than each reading the whole log."""
    cache = request.app[APP_REPORTS]
    async with cache.locks.setdefault(key, asyncio.Lock()):
        hit = cache.entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        data = await asyncio.get_running_loop().run_in_executor(None, build)
        cache.entries = {k: v for k, v in cache.entries.items() if v[0] > time.monotonic()}
        cache.entries[key] = (time.monotonic() + REPORT_TTL_S, data)
        return data


async def _report(request: web.Request) -> dict[str, Any]:
    since, until, now = _window(request)
    settings = runtime_of(request).settings
    top = _top(request)
    params = request.query
    key = (params.get("since") or "30d", params.get("until"), top, id(settings))

    def run() -> dict[str, Any]:
        return build_report(lambda: open_reader(settings.storage.usage_log), settings, since,
                            until, now, top)

    return await _cached(request, key, run)


async def advise_view(request: web.Request) -> web.Response:
    """The savings advisor (docs/advise.md): JSON with exact decimal strings, or
    `?format=text`; `since=` (default 30d), `until=`. Admin only: it reads every tenant."""
    _authorized(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "text"):
        raise _bad_request("format takes json or text")
    from proxy.advise.render import advice_text, to_json

    data = await _advice(request)
    if fmt == "text":
        return web.Response(text=advice_text(data) + "\n", content_type="text/plain")
    return web.Response(body=to_json(data), content_type="application/json")


async def _advice(request: web.Request) -> dict[str, Any]:
    """The advice for the request's window, built off the loop and kept REPORT_TTL_S."""
    from proxy.advise import advise

    since, until, now = _window(request)
    rt = runtime_of(request)
    settings, prices = rt.settings, rt.prices
    params = request.query
    key = ("advise", params.get("since") or "30d", params.get("until"), id(settings))

    def run() -> dict[str, Any]:
        with open_reader(settings.storage.usage_log) as log:
            return advise(log, settings, prices, since, until, now)

    return await _cached(request, key, run)


async def to_dashboard(request: web.Request) -> web.Response:
    raise web.HTTPFound("/_meter/")


async def login(request: web.Request) -> web.Response:
    """The login form's POST: the key in the body, a session cookie and the dashboard back."""
    rt = runtime_of(request)
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPUnsupportedMediaType(
            text='{"error": "send the login form: application/x-www-form-urlencoded"}',
            content_type="application/json")
    form = await request.post()
    key = form.get("key")
    if not isinstance(key, str) or not rt.admin_key or not hmac.compare_digest(
            key.encode(), rt.admin_key.encode()):
        return _html(dashboard.login_page("That is not the admin key."), 401)
    found = web.HTTPSeeOther("/_meter/", headers={"Cache-Control": "no-store"})
    found.set_cookie(SESSION_COOKIE, new_session(rt.admin_key, time.time()), path="/_meter",
                     httponly=True, samesite="Strict", secure=request.secure,
                     max_age=int(timedelta(days=SESSION_DAYS).total_seconds()))
    raise found


async def dashboard_page(request: web.Request) -> web.Response:
    """The dashboard, or its login form."""
    rt = runtime_of(request)
    try:
        _authorized(request)
    except web.HTTPUnauthorized:
        unset = "" if rt.admin_key else (
            f"No admin key is set: start the proxy with ${rt.settings.server.admin_key_env}.")
        return _html(dashboard.login_page(unset), 401)
    window = request.query.get("since") or "30d"
    data = await _report(request)
    # The advisor reads every call of the window: on a very busy log the page links to
    # it instead of holding every viewer up (docs/advise.md, "Cost").
    calls = data["totals"]["calls"] or 0
    advice = await _advice(request) if calls <= DASHBOARD_ADVICE_CALLS else {"too_many": calls}
    live = await rt.budgets.status() if rt.budgets is not None else []
    page = dashboard.render_page(data, live, window, rt.settings.source, advice)
    return _html(page)


def _html(page: str, status: int = 200) -> web.Response:
    return web.Response(text=page, status=status, content_type="text/html",
                        headers=PAGE_HEADERS)


async def export_csv(request: web.Request) -> web.StreamResponse:
    """The filtered rows as CSV, streamed from a cursor a batch at a time (`columns=a,b`)."""
    _authorized(request)
    q = _usage_query(request)
    wanted = [c for c in request.query.get("columns", "").split(",") if c]
    loop = asyncio.get_running_loop()
    rt = runtime_of(request)
    log = await loop.run_in_executor(None, open_reader, rt.settings.storage.usage_log)
    try:
        columns = wanted or list(query.COLUMNS)
        cursor = await loop.run_in_executor(None, log.export, q, columns)
    except query.QueryError as exc:
        await loop.run_in_executor(None, log.close)
        raise _bad_request(str(exc)) from None
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
        "Content-Disposition": 'attachment; filename="meterproxy-usage.csv"'})
    try:
        await response.prepare(request)
        await response.write(_csv_lines([columns]))
        while batch := await loop.run_in_executor(None, cursor.fetchmany, EXPORT_BATCH_ROWS):
            await response.write(_csv_lines(batch))
        await response.write_eof()
    finally:
        def close() -> None:
            cursor.close()
            log.close()

        await loop.run_in_executor(None, close)
    return response


async def export_focus(request: web.Request) -> web.StreamResponse:
    """FOCUS 1.2 rows as CSV (`meterproxy export focus`), streamed from a cursor."""
    from proxy import focus

    _authorized(request)
    rt = runtime_of(request)
    params, now = request.query, rt.now()
    try:
        since = parse_time(params["since"], now) if params.get("since") else None
        until = parse_time(params["until"], now) if params.get("until") else None
        granularity = focus.Granularity(params.get("granularity", "day"))
        unpriced = focus.Unpriced(params.get("unpriced", "omit"))
    except ValueError as exc:
        raise _bad_request(f"{exc} (granularity: hour or day; unpriced: omit or include)") \
            from None
    loop = asyncio.get_running_loop()
    chunks = focus.csv_chunks(focus.export(rt.settings, since, until, granularity, unpriced))
    first = await loop.run_in_executor(None, next, chunks)  # opens the log: errors come now
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
        "Content-Disposition": 'attachment; filename="meterproxy-focus.csv"'})
    try:
        await response.prepare(request)
        await response.write(first.encode())
        while chunk := await loop.run_in_executor(None, next, chunks, ""):
            await response.write(chunk.encode())
        await response.write_eof()
    finally:
        await loop.run_in_executor(None, chunks.close)
    return response


def _csv_lines(rows: Any) -> bytes:
    return csv_lines(rows).encode()


async def budgets(request: web.Request) -> web.Response:
    _authorized(request)
    rt = runtime_of(request)
    try:
        return json_response(await rt.budgets.status() if rt.budgets is not None else [])
    except LedgerUnavailable as exc:
        return web.Response(status=503, content_type="application/json",
                            body=orjson.dumps({"error": str(exc)}))


async def reconcile(request: web.Request) -> web.Response:
    """The meter against the provider's bill (the CLI's `reconcile --format json`).

    Gemini's export file comes from `reconcile.gemini.billing_export` only: a file path is
    never taken from a request."""
    _authorized(request)
    from proxy.reconcile.bill import BillingNotConfigured, BillingSourceError
    from proxy.reconcile.render import reconcile_range
    from proxy.reconcile.run import run

    rt = runtime_of(request)
    params = request.query
    try:
        since, until = reconcile_range(params.get("since"), params.get("until"), rt.now())
        tolerance = Decimal(params["tolerance_pct"]) if params.get("tolerance_pct") else None
        if tolerance is not None and not Decimal(0) <= tolerance <= Decimal(100):
            raise ValueError("tolerance_pct takes a percentage, 0 to 100")
        by = tuple(b for b in params.get("by", "day,model").split(",") if b)
        result = await run(rt.settings, rt.prices, params.get("provider", ""), since, until,
                           tolerance_pct=tolerance, by=by, session=rt.session)
    except (ValueError, ArithmeticError) as exc:
        raise _bad_request(str(exc) or "tolerance_pct takes a number") from None
    except BillingNotConfigured as exc:
        return web.Response(status=409, content_type="application/json",
                            body=orjson.dumps({"error": str(exc)}))
    except BillingSourceError as exc:
        return web.Response(status=502, content_type="application/json",
                            body=orjson.dumps({"error": str(exc)}))
    return json_response(result.to_json())


async def anomalies(request: web.Request) -> web.Response:
    """Spend anomaly episodes: the active ones, and with `?all=true` those that ended in
    the past 7 days too (scope values are tenants' names: admin only)."""
    _authorized(request)
    from proxy.storage.anomalies import open_anomalies

    rt = runtime_of(request)
    ended_since = rt.now() - timedelta(days=7) if _flag(request.query, "all") else None

    def run() -> list[dict[str, Any]]:
        with open_anomalies(rt.settings.storage.usage_log) as store:
            found = store.recent(ended_since) if ended_since is not None else store.active()
        return [a.to_json() for a in found]

    return json_response(await asyncio.get_running_loop().run_in_executor(None, run))


async def clear_anomaly(request: web.Request) -> web.Response:
    """End an active episode; a blocked scope's calls pass again (on other instances at
    their next check)."""
    _authorized(request)
    rt = runtime_of(request)
    anomaly_id = request.match_info["id"]
    cleared = await request.app[APP_SERVER].services.anomalies.clear(rt, anomaly_id,
                                                                     "admin-api")
    if cleared is None:
        raise web.HTTPNotFound(text='{"error": "no active anomaly with this id"}',
                               content_type="application/json")
    return json_response({"status": "cleared", "anomaly": cleared.to_json()})


async def reload(request: web.Request) -> web.Response:
    """Re-read the configuration file; a bad one is refused and the old one stays."""
    _authorized(request)
    error = await request.app[APP_SERVER].reload_from_source()
    if error is not None:
        return web.Response(status=400, content_type="application/json",
                            body=orjson.dumps({"status": "refused", "error": error}))
    return json_response({"status": "reloaded"})


async def _read(request: web.Request, fn: Any) -> Any:
    """fn(log) on a fresh LogReader of the usage log, off the loop."""
    url = runtime_of(request).settings.storage.usage_log

    def run() -> Any:
        with open_reader(url) as log:
            try:
                return fn(log)
            except query.QueryError as exc:
                raise _bad_request(str(exc)) from None

    return await asyncio.get_running_loop().run_in_executor(None, run)


def json_response(data: Any) -> web.Response:
    """JSON with money as exact decimal strings (proxy.money), as the CLI prints it."""
    return web.Response(body=money.dumps(data), content_type="application/json")


_USAGE_PARAMS = ("since", "until", "group_by", "where", "order_by", "limit", "durations")
# (method, path, handler, the query parameters it takes): anything else is a 400, as an
# unknown config key is an error, so a typo never silently changes an answer.
ROUTES: tuple[tuple[str, str, Any, tuple[str, ...]], ...] = (
    ("GET", "/healthz", healthz, ()),
    ("GET", "/metrics", metrics, ()),
    ("GET", "/_meter/", dashboard_page, ("since", "until", "top")),
    ("POST", "/_meter/login", login, ()),
    ("GET", "/_meter", to_dashboard, ()),
    ("GET", "/_meter/usage", usage, _USAGE_PARAMS),
    ("GET", "/_meter/usage/{id}", usage_row, ()),
    ("GET", "/_meter/budgets", budgets, ()),
    ("GET", "/_meter/report", report, ("since", "until", "top", "format")),
    ("GET", "/_meter/forecast", forecast_view, ("top",)),
    ("GET", "/_meter/advise", advise_view, ("since", "until", "format")),
    ("GET", "/_meter/export.csv", export_csv, (*_USAGE_PARAMS, "columns")),
    ("GET", "/_meter/export.focus.csv", export_focus,
     ("since", "until", "granularity", "unpriced")),
    ("GET", "/_meter/reconcile", reconcile, ("provider", "since", "until", "by",
                                             "tolerance_pct")),
    ("POST", "/_meter/reload", reload, ()),
    ("GET", "/_meter/anomalies", anomalies, ("all",)),
    ("POST", "/_meter/anomalies/{id}/clear", clear_anomaly, ()),
)


def add_routes(app: web.Application) -> None:
    """The admin routes; other methods on them are a 405, unknown /_meter/ paths a 404."""
    app[APP_REPORTS] = ReportCache()
    app.on_response_prepare.append(nosniff)
    for method, path, handler, params in ROUTES:
        app.router.add_route(method, path, _checked(handler, frozenset(params)))
    for path in dict.fromkeys(path for _, path, _, _ in ROUTES):
        allowed = {m for m, p, _, _ in ROUTES if p == path}
        app.router.add_route("*", path, _not_allowed(allowed))
    app.router.add_route("*", "/_meter/{tail:.*}", _no_such_path)


def _checked(handler: Any, params: frozenset[str]) -> Any:
    async def checked(request: web.Request) -> web.StreamResponse:
        unknown = [name for name in request.query if name not in params]
        if unknown:
            raise _bad_request(f"unknown parameter {unknown[0]!r}"
                               + (f" (known here: {', '.join(sorted(params))})" if params else ""))
        return await json_errors(handler)(request)
    return checked


def json_errors(handler: Any) -> Any:
    """Errors as JSON, a crash included: never aiohttp's plain-text 500."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.content_type != "application/json":
                exc.text = orjson.dumps({"error": exc.reason}).decode()
                exc.content_type = "application/json"
            raise
        except Exception:
            log.exception("admin_error", path=request.path)
            return web.Response(status=500, content_type="application/json",
                                body=orjson.dumps({"error": "meterproxy failed on this admin "
                                                   "request; the log has the details"}))
    return wrapped


async def nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: admin answers are never sniffed into another type."""
    if request.path.startswith(("/_meter", "/metrics", "/healthz")):
        response.headers["X-Content-Type-Options"] = "nosniff"
