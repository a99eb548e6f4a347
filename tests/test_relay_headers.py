"""Response headers go back as the provider sent them, repeated ones included."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from multidict import CIMultiDict

from proxy.stages.relay import response_headers


def test_repeated_headers_survive_and_hop_by_hop_ones_go() -> None:
    """Two Set-Cookie headers reach the client; Connection and Content-Length do not."""
    upstream: Any = SimpleNamespace(headers=CIMultiDict([
        ("Content-Type", "application/json"), ("Set-Cookie", "__cf_bm=a; path=/"),
        ("Set-Cookie", "_cfuvid=b; path=/"), ("Connection", "keep-alive"),
        ("Content-Length", "12"), ("Content-Encoding", "gzip"), ("x-request-id", "req_1")]))
    exchange: Any = SimpleNamespace(id="01ABC", budget_remaining=None)
    headers = response_headers(upstream, exchange)
    assert headers.getall("Set-Cookie") == ["__cf_bm=a; path=/", "_cfuvid=b; path=/"]
    assert "Connection" not in headers and "Content-Length" not in headers
    assert "Content-Encoding" not in headers
    assert headers["x-request-id"] == "req_1" and headers["X-Meter-Request-Id"] == "01ABC"
