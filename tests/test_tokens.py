"""Offline tiktoken: verified encodings and OpenAI's documented chat and tool counts."""

from __future__ import annotations

import gzip
import threading
from typing import Any

import pytest

from proxy import tokens
from proxy.dialects.base import Call, TextTally
from proxy.dialects.openai import OpenAIDialect

# The six-message example of OpenAI's cookbook "How to count tokens with tiktoken".
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
     "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user",
     "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have "
     "more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
     "for the client deliverable."},
]
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string",
                     "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]}}}}}]
WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions "
     "about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def prompt_tokens(model: str, body: dict[str, Any]) -> int:
    texts, overhead = OpenAIDialect().prompt_texts(Call("chat.completions", model=model), body)
    return tokens.count_texts(texts, model) + overhead


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 129), ("gpt-3.5-turbo", 129),
                                                 ("gpt-4o", 124), ("gpt-4o-mini", 124)])
def test_cookbook_chat_example(model: str, expected: int) -> None:
    """The cookbook's six messages count 129 with cl100k_base and 124 with o200k_base."""
    assert prompt_tokens(model, {"messages": COOKBOOK_MESSAGES}) == expected


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 105), ("gpt-4o", 101)])
def test_cookbook_tools_example(model: str, expected: int) -> None:
    """With the cookbook's weather tool the prompt counts 105 (cl100k) / 101 (o200k)."""
    body = {"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOLS}
    assert prompt_tokens(model, body) == expected


def test_encodings_match_tiktokens_hashes_and_reject_tampering(monkeypatch) -> None:
    """The shipped files are checked against tiktoken's expected sha256; a changed file fails."""
    for name in ("o200k_base", "cl100k_base"):
        assert len(tokens.load_ranks(name)) > 100_000
    real = gzip.decompress

    monkeypatch.setattr(tokens.gzip, "decompress", lambda blob: real(blob) + b"\n")
    with pytest.raises(tokens.TokenizerError, match="does not match"):
        tokens.load_ranks("cl100k_base")


def test_encoding_choice() -> None:
    """Older OpenAI models use cl100k_base; current ones and other vendors o200k_base."""
    assert tokens.encoding_name("gpt-4-turbo") == "cl100k_base"
    assert tokens.encoding_name("text-embedding-3-small") == "cl100k_base"
    assert tokens.encoding_name("gpt-4o-2024-08-06") == "o200k_base"
    assert tokens.encoding_name("gpt-4.1-mini") == "o200k_base"
    assert tokens.encoding_name("claude-sonnet-4-5") == "o200k_base"
    assert not tokens.is_exact_for("claude-sonnet-4-5") and tokens.is_exact_for("o3")


def test_text_tally_folds_long_streams_without_changing_the_count(monkeypatch) -> None:
    """A long stream is counted in folds (flat memory) to the same total as all at once,
    and the folds are counted on the tokenizer pool: feeding text never tokenizes on the
    caller's thread (the event loop's)."""
    pieces = [f" word{i % 97} and more" for i in range(40_000)]
    real = tokens.count_text
    threads: list[str] = []

    def spy(text: str, model: str | None = None) -> int:
        threads.append(threading.current_thread().name)
        return real(text, model)

    monkeypatch.setattr(tokens, "count_text", spy)
    tally = TextTally("gpt-4o")
    for piece in pieces:
        tally.add(piece)
    assert tally.folds > 0 and tally.held <= TextTally.FOLD_CHARS
    assert threading.current_thread().name not in threads  # only pool threads so far
    assert tally.count() == real("".join(pieces), "gpt-4o")
