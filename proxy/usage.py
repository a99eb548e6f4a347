"""The normalised usage of one call: token classes that pricing and the log share."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Usage:
    """Token counts by billing class, already normalised by a dialect.

    `input_tokens` is uncached prompt text; `cached_input_tokens` are cache reads;
    `cache_write_tokens` counts every cache write and `cache_write_1h_tokens` the part of
    it written for one hour. `output_tokens` includes `reasoning_tokens`. Audio counts are
    the audio part of input and output, for tables that price audio apart.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    web_search_requests: int = 0
    service_tier: str | None = None

    @property
    def prompt_tokens(self) -> int:
        """Every input token of the call, cache reads and writes included."""
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens

    def as_dict(self) -> dict[str, int | str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def count(value: object) -> int:
    """A token count from a provider body: absent, null and junk all mean zero."""
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
