"""What an operator should hear at start-up: settings that make every call fail."""

from __future__ import annotations

import os
from typing import Any

from proxy.runtime import Runtime


def warnings(rt: Runtime) -> list[tuple[str, dict[str, Any]]]:
    """(event, fields) for each problem: no keys, no admin key, unset provider key vars."""
    settings = rt.settings
    found: list[tuple[str, dict[str, Any]]] = []
    if settings.auth.mode == "virtual_keys" and not rt.keys:
        found.append(("no_keys_configured", {
            "hint": "every call will be a 401: add keys with `meterproxy keys new NAME`, "
                    "or set auth.mode: passthrough"}))
    if rt.admin_key is None:
        found.append(("admin_key_unset", {
            "env": settings.server.admin_key_env,
            "hint": "the admin API, dashboard and /metrics refuse every request"}))
    if settings.auth.mode == "virtual_keys":
        missing = sorted(f"{u.name} ({u.api_key_env})" for u in rt.upstreams.values()
                         if u.api_key_env and not os.environ.get(u.api_key_env))
        if missing:
            found.append(("provider_keys_missing", {
                "providers": missing,
                "hint": "calls to these providers get a 503 until their key is set"}))
    return found
