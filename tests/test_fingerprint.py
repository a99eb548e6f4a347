"""The stable-prefix fingerprint, recorded through the real proxy for each official SDK."""

from __future__ import annotations

import os
import re
import stat

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

from proxy.fingerprint import HASH_CHARS, fingerprint, load_secret
from proxy.simulator import Scenario
from tests.conftest import VIRTUAL_KEY, Stack

SYSTEM = "You are the billing assistant of Example Corp. Answer in one short paragraph. " * 8
OTHER_SYSTEM = "You are a pirate. Answer every question in rhyme, however serious it is. " * 8
HEX32 = re.compile(r"[0-9a-f]{32}")


def _secret_free(row: dict) -> None:
    """Neither system prompt, nor any piece of it, is anywhere in the row."""
    text = repr(row)
    assert "billing assistant" not in text and "pirate" not in text


def _three(stack: Stack, send) -> list[dict]:
    before = len(stack.rows())
    send(SYSTEM, "What is an invoice?")
    send(SYSTEM, "And what is a credit note, please?")
    send(OTHER_SYSTEM, "What is an invoice?")
    rows = stack.rows(before + 3)[before:]
    assert len(rows) == 3
    for row in rows:
        _secret_free(row)
    return rows


def _same_then_different(rows: list[dict]) -> None:
    first, second, third = (r["prefix_hash"] for r in rows)
    assert HEX32.fullmatch(first)
    assert first == second  # the same system prompt, another question
    assert third != first  # another system prompt


def test_openai_chat_prefix_is_recorded(stack: Stack) -> None:
    """openai SDK: same system prompt, same hash; its token share is the hand-computed one."""
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)

    def send(system: str, question: str) -> None:
        stack.sim.then(Scenario(usage={"prompt_tokens": 500, "completion_tokens": 7,
                                       "total_tokens": 507}))
        client.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}])

    rows = _three(stack, send)
    _same_then_different(rows)
    # The share by characters (docs/advise.md): the stable part is ["messages", [system
    # message]], the rest the user message; every key and string counts its characters.
    stable = len("messages") + len("role") + len("system") + len("content") + len(SYSTEM)
    rest = len("role") + len("user") + len("content") + len("What is an invoice?")
    assert rows[0]["prefix_tokens"] == 500 * stable // (stable + rest)
    assert rows[0]["input_tokens"] == 500


def test_openai_single_message_has_no_prefix(stack: Stack) -> None:
    """A lone user message has nothing stable to cache: no hash, no token count."""
    client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
    before = len(stack.rows())
    client.chat.completions.create(model="gpt-4o-mini",
                                   messages=[{"role": "user", "content": "hello"}])
    row = stack.rows(before + 1)[-1]
    assert (row["prefix_hash"], row["prefix_tokens"]) == (None, None)


def test_anthropic_prefix_is_recorded(stack: Stack) -> None:
    """anthropic SDK, streamed and not; a cache breakpoint does not change the hash."""
    client = anthropic.Anthropic(base_url=stack.base("anthropic", ""), api_key=VIRTUAL_KEY,
                                 max_retries=0)
    calls = iter((False, True, False))

    def send(system: str, question: str) -> None:
        kwargs = {"model": "claude-haiku-4-5", "max_tokens": 64, "system": system,
                  "messages": [{"role": "user", "content": question}]}
        if next(calls):
            with client.messages.stream(**kwargs) as events:
                events.until_done()
        else:
            client.messages.create(**kwargs)

    rows = _three(stack, send)
    _same_then_different(rows)
    assert 0 < rows[0]["prefix_tokens"] < rows[0]["input_tokens"]
    before = len(stack.rows())
    client.messages.create(model="claude-haiku-4-5", max_tokens=64, system=[
        {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "What is an invoice?"}])
    marked = stack.rows(before + 1)[-1]
    plain = client.messages.create  # the same prefix as blocks without the breakpoint
    plain(model="claude-haiku-4-5", max_tokens=64, system=[{"type": "text", "text": SYSTEM}],
          messages=[{"role": "user", "content": "What is an invoice?"}])
    unmarked = stack.rows(before + 2)[-1]
    assert marked["prefix_hash"] == unmarked["prefix_hash"] != rows[0]["prefix_hash"]
    _secret_free(marked)


def test_gemini_prefix_is_recorded(stack: Stack) -> None:
    """google-genai SDK: system_instruction is the stable prefix."""
    client = genai.Client(api_key=VIRTUAL_KEY,
                          http_options=types.HttpOptions(base_url=f"{stack.url}/gemini"))

    def send(system: str, question: str) -> None:
        client.models.generate_content(
            model="gemini-2.5-flash", contents=question,
            config=types.GenerateContentConfig(system_instruction=system))

    rows = _three(stack, send)
    _same_then_different(rows)
    assert 0 < rows[0]["prefix_tokens"] < rows[0]["input_tokens"]


def test_hash_is_keyed_by_the_install_secret(tmp_path) -> None:
    """Another install's secret gives another hash (a short prompt cannot be looked up)."""
    stable, rest = [["system", "Be brief."]], [{"role": "user", "content": "hi"}]
    one = fingerprint(stable, rest, b"a" * 32)
    assert one is not None and one.hash != fingerprint(stable, rest, b"b" * 32).hash
    assert one.hash == fingerprint(stable, [{"other": "turn"}], b"a" * 32).hash
    path = tmp_path / "usage.db.prefix-key"
    secret = load_secret(None, path)
    assert len(secret) == 32 and load_secret(None, path) == secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret("shared-by-env", path) == b"shared-by-env"


def test_huge_prefix_is_bounded() -> None:
    """Only the first 128 Ki characters are hashed: prefixes that agree that far share a hash, and a
    10 MB system prompt costs a slice, not a re-encoding (its share is still counted)."""
    head = "x" * HASH_CHARS
    one = fingerprint([["system", head + "a" * 10_000_000]], ["q"], b"k")
    two = fingerprint([["system", head + "b" * 10]], ["q"], b"k")
    whole = fingerprint([["system", head[:-20]]], ["q"], b"k")
    assert one.hash == two.hash != whole.hash
    assert one.chars == len("system") + HASH_CHARS + 10_000_000


@pytest.mark.parametrize("depth", [5000])
def test_deep_nesting_stops_the_walk(depth: int) -> None:
    """A tool schema nested thousands deep ends the walk (no RecursionError, no share)."""
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    found = fingerprint([["tools", value]], ["q"], b"k")
    assert found is not None and found.tokens(100) is None
