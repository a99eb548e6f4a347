"""Dialect adapters, one per API family; `for_name` picks one by its config name."""

from __future__ import annotations

import importlib
from functools import cache

from proxy.dialects.base import Dialect
from proxy.dialects.openai import OpenAIDialect

# Errors for paths that name no provider are shaped like OpenAI's, the most common SDK.
DEFAULT: Dialect = OpenAIDialect()
_CLASSES = {"openai": "OpenAIDialect", "anthropic": "AnthropicDialect",
            "gemini": "GeminiDialect"}


@cache
def for_name(name: str) -> Dialect:
    """The (stateless, shared) adapter for a dialect name from config."""
    if name == "openai":
        return DEFAULT
    if name not in _CLASSES:
        raise ValueError(f"no dialect named {name!r}")
    module = importlib.import_module(f"proxy.dialects.{name}")
    return getattr(module, _CLASSES[name])()
