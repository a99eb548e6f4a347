"""The admin HTTP API under /_meter/ (bearer admin key) and /healthz (open)."""

from __future__ import annotations

import asyncio
import hmac
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from proxy import query
from proxy.keys import APP_RUNTIME
from proxy.runtime import reload_from_source
from proxy.storage.sqlite import connect, sqlite_path
from proxy.timeparse import parse_time


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/_meter/usage", usage)
    app.router.add_get("/_meter/usage/{id}", usage_row)
    app.router.add_get("/_meter/budgets", budgets)
    app.router.add_post("/_meter/reload", reload)


async def healthz(request: web.Request) -> web.Response:
    rt = request.app[APP_RUNTIME]
    writer = rt.writer
    ok = writer.healthy and not writer.dropped
    return json_response({"status": "ok" if ok else "degraded",
                          "pending_rows": writer.pending, "write_failures": writer.failures,
                          "dropped_rows": writer.dropped})


async def metrics(request: web.Request) -> web.Response:
    _authorized(request)
    text = request.app[APP_RUNTIME].metrics.render()
    return web.Response(body=text.encode(), headers={
        "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _authorized(request: web.Request) -> None:
    rt = request.app[APP_RUNTIME]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not rt.admin_key or not hmac.compare_digest(token.encode(), rt.admin_key.encode()):
        raise web.HTTPUnauthorized(
            text='{"error": "admin key required: Authorization: Bearer <admin key>"}',
            content_type="application/json")


async def usage(request: web.Request) -> web.Response:
    _authorized(request)
    params = request.query
    try:
        q = query.UsageQuery(
            since=parse_time(params["since"]) if params.get("since") else None,
            until=parse_time(params["until"]) if params.get("until") else None,
            group_by=[g for g in params.get("group_by", "").split(",") if g],
            where=query.parse_where(params.getall("where", [])),
            order_by=params.get("order_by") or None,
            limit=int(params["limit"]) if params.get("limit") else None,
        )
    except ValueError as exc:
        raise web.HTTPBadRequest(text=orjson.dumps({"error": str(exc)}).decode(),
                                 content_type="application/json") from None
    rows = await _read(request, lambda conn: query.usage(conn, q))
    return json_response(rows)


async def usage_row(request: web.Request) -> web.Response:
    _authorized(request)
    row = await _read(request, lambda conn: query.call(conn, request.match_info["id"]))
    if row is None:
        raise web.HTTPNotFound(text='{"error": "no such call"}', content_type="application/json")
    return json_response(row)


async def budgets(request: web.Request) -> web.Response:
    _authorized(request)
    rt = request.app[APP_RUNTIME]
    return json_response(await rt.budgets.status() if rt.budgets is not None else [])


async def reload(request: web.Request) -> web.Response:
    """Re-read the configuration file; a bad one is refused and the old one stays."""
    _authorized(request)
    error = await reload_from_source(request.app[APP_RUNTIME])
    if error is not None:
        return web.Response(status=400, content_type="application/json",
                            body=orjson.dumps({"status": "refused", "error": error}))
    return json_response({"status": "reloaded"})


async def _read(request: web.Request, fn: Any) -> Any:
    rt = request.app[APP_RUNTIME]
    path = sqlite_path(rt.settings.storage.usage_log)

    def run() -> Any:
        conn = connect(path, readonly=True)
        try:
            return fn(conn)
        except query.QueryError as exc:
            raise web.HTTPBadRequest(text=orjson.dumps({"error": str(exc)}).decode(),
                                     content_type="application/json") from None
        finally:
            conn.close()

    return await asyncio.get_running_loop().run_in_executor(None, run)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError


def json_response(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=_default),
                        content_type="application/json")
