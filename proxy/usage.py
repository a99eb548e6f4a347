"""The normalised usage of one call: counts by billing class, as a dialect reports them.

`Usage` has one int field per column of `proxy.token_classes` (`input_tokens` is uncached
prompt, `output_tokens` includes reasoning, parts such as `audio_input_tokens` are inside
their parent's count), plus what the provider says about how the call was served.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass
from typing import Any

from proxy.token_classes import COLUMNS, PROMPT_COLUMNS


def _prompt_tokens(self: Any) -> int:
    """Every input token of the call, cache reads and writes included."""
    return sum(getattr(self, c) for c in PROMPT_COLUMNS)


def _billable(self: Any) -> bool:
    """Whether anything in it can cost money (a token or a unit charge)."""
    return any(getattr(self, c) for c in COLUMNS)


def _as_dict(self: Any) -> dict[str, int | str | None]:
    return {f.name: getattr(self, f.name) for f in fields(self)}


def _counts(self: Any) -> dict[str, int]:
    """The class columns only, as the log stores them."""
    return {c: getattr(self, c) for c in COLUMNS}


Usage = make_dataclass(
    "Usage",
    [*((c, int, field(default=0)) for c in COLUMNS),
     # The tier the provider says served the call (priced by it, not by the request's).
     ("service_tier", str | None, field(default=None)),
     # Anthropic `speed` (`fast` mode has its own rates).
     ("speed", str | None, field(default=None)),
     # Usage of other models inside the call (Anthropic advisor iterations): (model, Usage).
     ("nested", list, field(default_factory=list))],
    slots=True,
    namespace={"prompt_tokens": property(_prompt_tokens), "billable": property(_billable),
               "as_dict": _as_dict, "counts": _counts, "__module__": __name__,
               "__doc__": "Counts by billing class (proxy.token_classes), normalised by a "
                          "dialect."},
)


def count(value: object) -> int:
    """A token count from a provider body: absent, null and junk all mean zero."""
    if value.__class__ is int:  # the common cases first, without a call (bool is not int)
        return value if value > 0 else 0
    if value is None:
        return 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value >= 0:
        return int(value)
    return 0


def sub(mapping: object, key: str) -> dict:
    """A nested detail object, or an empty one when absent or null."""
    if isinstance(mapping, dict):
        value = mapping.get(key)
        if isinstance(value, dict):
            return value
    return {}
