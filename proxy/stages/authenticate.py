"""authenticate and authorize: who is calling, and with which provider key upstream."""

from __future__ import annotations

from multidict import MultiDict

from proxy import headers
from proxy.config import AuthMode
from proxy.dialects import key_headers
from proxy.dialects.base import EndpointKind
from proxy.errors import Kind, MeterError
from proxy.exchange import Exchange
from proxy.runtime import Runtime, fingerprint, key_digest

# The only encodings the upstream client decodes on its own; the client gets plain bytes.
UPSTREAM_ACCEPT_ENCODING = "gzip, deflate"


def authenticate(rt: Runtime, x: Exchange) -> None:
    """Match the client's key, then prepare upstream headers with the provider's key.

    Runs on the headers alone, before a byte of the body is read: a stranger's 60 MB body
    costs us nothing."""
    assert x.upstream is not None
    request = x.request
    dialect = x.dialect
    client_key = dialect.client_key(request)
    x.headers = headers.strip(request.headers, toward_provider=True)
    x.headers["Accept-Encoding"] = UPSTREAM_ACCEPT_ENCODING
    if request.query_string:  # else the Exchange's own empty one
        x.query = MultiDict(request.query)
    if rt.settings.auth.mode == AuthMode.PASSTHROUGH:
        x.key_name = fingerprint(client_key) if client_key else None
        return
    if not client_key:
        raise MeterError(Kind.AUTHENTICATION,
                         "missing API key: send your meterproxy virtual key as the SDK's api_key")
    key = rt.keys.get(key_digest(client_key))
    if key is None:
        raise MeterError(Kind.AUTHENTICATION, "unknown API key: this meterproxy does not know it")
    x.key = key
    x.key_name = key.name
    upstream = x.upstream
    if upstream.api_key_env and not upstream.api_key:
        raise MeterError(Kind.UNAVAILABLE,
                         f"meterproxy has no key for provider {upstream.name!r}: "
                         f"set {upstream.api_key_env} where it runs",
                         headers={"x-should-retry": "false"})  # SDKs would retry a 503
    dialect.set_upstream_key(x.headers, x.query, upstream.api_key or "", upstream.auth_header)
    if not upstream.api_key:  # a local provider (vLLM, Ollama) that wants no key
        for name in key_headers():
            x.headers.popall(name, None)


def recognise(rt: Runtime, x: Exchange) -> None:
    """Name the caller of a call refused before authenticate ran (an unknown provider),
    so a known key's mistake still gets its row."""
    client_key = x.dialect.client_key(x.request)
    if not client_key:
        return
    if rt.settings.auth.mode == "passthrough":
        x.key_name = fingerprint(client_key)
    elif (key := rt.keys.get(key_digest(client_key))) is not None:
        x.key, x.key_name = key, key.name


def authorize(x: Exchange) -> None:
    """Refuse endpoints the proxy cannot meter unless opened; a key limited to some
    models may call only those."""
    assert x.upstream is not None
    call = x.call
    if call.policy is EndpointKind.NOT_METERED:
        if call.endpoint not in x.upstream.allow_unmetered:
            why = call.unmetered_reason or "meterproxy cannot meter what it costs"
            raise MeterError(
                Kind.PERMISSION,
                f"endpoint_not_metered: {x.request.method} {call.endpoint} on "
                f"{x.upstream.name} is refused: {why}. An operator may open it with "
                f"providers.{x.upstream.name}.allow_unmetered: [{call.endpoint}] (its calls "
                "are then logged unpriced and refused under any USD budget)",
                code="endpoint_not_metered")
        x.priced = False
    if x.key is None or not x.key.models or call.policy is EndpointKind.FREE:
        return
    if x.call.model not in x.key.models:
        raise MeterError(Kind.PERMISSION,
                         f"key {x.key.name!r} may not call model {x.call.model!r}",
                         param="model")
