"""Which headers cross the proxy, in either direction.

One function, like Go's ReverseProxy `removeHopByHopHeaders`: hop-by-hop headers (RFC 9110
section 7.6.1) and every header a `Connection:` value names stay on their own hop. Toward
the provider we also drop what belongs to no provider: the browser's `Cookie`, our own
`X-Meter-*` headers, and other gateways' control headers and credentials (Helicone,
Portkey, Cloudflare AI Gateway), so a key meant for one gateway never reaches a vendor.
"""

from __future__ import annotations

from functools import lru_cache

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# Headers the proxy or its HTTP client sets itself on each side.
FRAMING = frozenset({"host", "content-length"})
# Toward the provider only: not the provider's business.
NOT_FOR_PROVIDERS = frozenset({"cookie", "accept-encoding"})
GATEWAY_PREFIXES = ("x-meter-", "helicone-", "x-portkey-", "cf-aig-")

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def connection_named(headers: Headers) -> set[str]:
    """The header names listed in every `Connection:` header (lower case)."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return names


def strip(headers: Headers, *, toward_provider: bool,
          drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """A copy of `headers` fit for the next hop; `drop` names more to leave out."""
    dropped = _dropped(toward_provider, drop)
    if "Connection" in headers:
        dropped = dropped | connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in dropped or (toward_provider and lower.startswith(GATEWAY_PREFIXES)):
            continue
        out.add(name, value)
    return out


@lru_cache(maxsize=8)
def _dropped(toward_provider: bool, drop: tuple[str, ...]) -> frozenset[str]:
    """The names `strip` always leaves out for a direction and `drop` (callers pass a few
    constant tuples: built once each, not per request)."""
    dropped = HOP_BY_HOP | FRAMING | {d.lower() for d in drop}
    return dropped | NOT_FOR_PROVIDERS if toward_provider else dropped
