"""The dialect registry: every API family the proxy speaks, one module each.

A dialect is a module in this package that defines `SPEC`, a `DialectSpec` (its name, wire
adapter, key headers, built-in providers, model families for token estimates, standard
service-tier names and endpoint policy). Nothing outside this package lists dialects: the
config, the authenticate stage, the tokenizer, the pricing engine and the simulator all
ask the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType

from proxy.dialects.base import BuiltinProvider, Dialect, DialectSpec
from proxy.dialects.openai import SPEC as OPENAI

# Errors for paths that name no provider are shaped like OpenAI's, the most common SDK.
DEFAULT: Dialect = OPENAI.adapter


@cache
def registry() -> Mapping[str, DialectSpec]:
    """Every dialect module's SPEC, by name (modules are imported on the first call)."""
    found: dict[str, DialectSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, DialectSpec):
            if spec.name in found:
                raise RuntimeError(f"two dialects are named {spec.name!r}")
            found[spec.name] = spec
    return MappingProxyType(found)


def for_name(name: str) -> Dialect:
    """The (stateless, shared) adapter for a dialect name from config."""
    spec = registry().get(name)
    if spec is None:
        raise ValueError(f"no dialect named {name!r}")
    return spec.adapter


def builtin_providers() -> dict[str, tuple[str, BuiltinProvider]]:
    """Provider name -> (dialect name, provider) for every dialect's built-in providers."""
    return {name: (spec.name, provider) for spec in registry().values()
            for name, provider in spec.providers.items()}


@cache
def key_headers() -> frozenset[str]:
    """Every header any dialect carries keys in (lower case)."""
    return frozenset(h.lower() for spec in registry().values() for h in spec.key_headers)


@cache
def standard_tiers() -> frozenset[str]:
    """Service-tier names that mean the standard price, in any dialect's vocabulary."""
    return frozenset(t for spec in registry().values() for t in spec.standard_tiers)
