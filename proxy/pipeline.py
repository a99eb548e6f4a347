"""One call through the proxy: the named stages, in order.

    route -> authenticate -> read_body -> attribute -> inspect -> authorize -> guard
          -> reserve -> forward -> relay (metering on the side) -> price -> record

Route and authenticate look at the request line and headers only: a stranger's body
is never read.

Request-side stages may end the call with a MeterError, which becomes the provider's own
error shape here and nowhere else. `record` runs in `finally`: one row per call, always.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import structlog
from aiohttp import web

from proxy.errors import FINAL, Kind, MeterError
from proxy.exchange import Exchange
from proxy.keys import runtime_of
from proxy.outcome import Outcome
from proxy.stages.attribute import attribute, keep_readable
from proxy.stages.authenticate import authenticate, authorize, recognise
from proxy.stages.forward import forward
from proxy.stages.guard import guard
from proxy.stages.record import began, price, record
from proxy.stages.relay import relay
from proxy.stages.reserve import reserve
from proxy.stages.route import inspect, read_body, route

log = structlog.get_logger("meterproxy")


async def handle(request: web.Request) -> web.StreamResponse:
    rt = runtime_of(request)
    x = Exchange.begin(request, rt.clock() if rt.clock is not None else None)
    try:
        route(rt, x)
        authenticate(rt, x)
        await read_body(rt, x)  # only a known key's body is ever read
        attribute(x)
        inspect(x)
        authorize(x)
        guard(rt, x)
        await reserve(rt, x)
        began(rt, x)
        upstream = await forward(rt.session, x)
        return await relay(x, upstream, lambda ex: price(rt, ex))
    except MeterError as err:
        if x.key_name is None:
            recognise(rt, x)
        return refuse(x, err)
    except asyncio.CancelledError:
        x.outcome, x.error = Outcome.CLIENT_DISCONNECT, x.error or "client went away"
        raise
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        x.outcome = Outcome.CLIENT_DISCONNECT
        raise
    except Exception as exc:
        log.exception("proxy_error", request_id=x.id)
        if x.status is not None and x.outcome == Outcome.OK:
            # The response had begun: its status stands, the row says what broke.
            x.outcome, x.error = Outcome.PROXY_ERROR, f"{type(exc).__name__}: {exc}"
            raise
        return refuse(x, MeterError(Kind.INTERNAL,
                                    f"meterproxy failed on this call (request {x.id})"))
    finally:
        record(rt, x)


def refuse(x: Exchange, err: MeterError) -> web.Response:
    """End the call with the proxy's own error, in the provider's shape; its row keeps what
    was readable of the request (endpoint and model, customer, feature and trace id)."""
    if x.upstream is not None and x.call.endpoint == "unknown":
        with contextlib.suppress(Exception):  # a request too broken to describe stays unknown
            x.call = x.dialect.describe(x.request.method, x.path, x.payload)
    keep_readable(x)
    x.status = err.status
    x.outcome = err.outcome
    x.error = err.message
    headers = {"Content-Type": "application/json", "X-Meter-Request-Id": x.id, **err.headers}
    if err.kind in FINAL:
        headers.setdefault("x-should-retry", "false")
    return web.Response(status=err.status, body=x.dialect.error_body(err), headers=headers)
