"""The stable prefix of a prompt: a keyed hash of it and its share of the prompt's tokens.

A dialect splits a request into its stable prefix (system prompt or instructions, tools,
the leading messages; `Dialect.split_prefix`) and the rest. Here the prefix is walked once
in a canonical order (dict keys sorted, `cache_control` markers left out, so adding a
breakpoint keeps the hash) and hashed with keyed BLAKE2b under a per-install secret: a
short system prompt could be found from a plain hash by trying candidate texts, never from
a keyed one without the secret. The text itself is never kept.

Bounded on purpose, since it runs on the event loop once per call: at most HASH_BYTES of
the prefix are hashed (prefixes that agree on their first 128 KiB share a hash; a cache
would serve at least that much of them) and at most MAX_NODES JSON values are visited.

`prefix_tokens` is not a tokenization: it is the provider's reported prompt tokens times
the prefix's share of the prompt's characters (text, keys and values), so it costs no
tokenizer time and sums to the provider's own count.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HASH_BYTES = 128 * 1024
MAX_NODES = 10_000
DIGEST_BYTES = 16  # 32 hex characters
SECRET_BYTES = 32
_SKIPPED_KEYS = frozenset({"cache_control"})
_NUMBER_CHARS = 4  # what a number, boolean or null counts for in the share


@dataclass(frozen=True, slots=True)
class Prefix:
    """A prompt's stable prefix: its keyed hash, and its characters against the prompt's."""

    hash: str
    chars: int
    total_chars: int
    complete: bool  # False: MAX_NODES stopped the walk, so the share is unknown

    def tokens(self, prompt_tokens: int) -> int | None:
        """The prefix's part of `prompt_tokens`, apportioned by characters."""
        if not self.complete or self.total_chars <= 0 or prompt_tokens <= 0:
            return None
        return prompt_tokens * self.chars // self.total_chars


class _Walk:
    """One bounded, canonical pass over JSON values: feeds a hash, counts characters."""

    __slots__ = ("budget", "chars", "hasher", "nodes")

    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher
        self.budget = HASH_BYTES if hasher is not None else 0
        self.chars = 0
        self.nodes = 0

    def feed(self, data: bytes) -> None:
        if self.budget <= 0:
            return
        if len(data) > self.budget:
            data = data[:self.budget]
        self.budget -= len(data)
        self.hasher.update(data)

    def text(self, tag: bytes, value: str) -> None:
        self.chars += len(value)
        if self.budget > 0:
            # Never encode more than the budget can take (a 1 MB string costs a slice).
            head = value[:self.budget] if len(value) > self.budget else value
            data = head.encode("utf-8", "surrogatepass")
            self.feed(tag + str(len(data)).encode() + b":" + data)

    def value(self, value: Any, depth: int = 0) -> bool:
        """Walk `value`; False once MAX_NODES is reached (the walk stops there)."""
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > 64:
            return False
        if isinstance(value, str):
            self.text(b"s", value)
        elif isinstance(value, dict):
            self.feed(b"{")
            for key in sorted(k for k in value if k not in _SKIPPED_KEYS):
                self.text(b"k", str(key))
                if not self.value(value[key], depth + 1):
                    return False
            self.feed(b"}")
        elif isinstance(value, list):
            self.feed(b"[")
            for item in value:
                if not self.value(item, depth + 1):
                    return False
            self.feed(b"]")
        else:
            self.chars += _NUMBER_CHARS
            self.feed(b"n" + repr(value).encode() + b";")
        return True


def fingerprint(stable: list[Any], rest: list[Any], secret: bytes) -> Prefix | None:
    """The prefix of a split request (None when it has no stable prefix)."""
    if not stable:
        return None
    hasher = hashlib.blake2b(digest_size=DIGEST_BYTES, key=secret[:64])
    walk = _Walk(hasher)
    complete = all(walk.value(part) for part in stable)
    chars = walk.chars
    counter = _Walk(None)
    complete = complete and all(counter.value(part) for part in rest)
    if walk.budget <= 0:
        hasher.update(b"~")  # a truncated prefix never equals a whole one of that length
    return Prefix(hasher.hexdigest(), chars, chars + counter.chars, complete)


def secret_path(usage_log: str, spool_dir: str) -> Path:
    """Where the per-install secret is kept when no environment variable gives it: beside
    a SQLite log, in the spool directory for PostgreSQL."""
    if usage_log.startswith("sqlite:///"):
        return Path(usage_log.removeprefix("sqlite:///") + ".prefix-key")
    return Path(spool_dir) / "prefix.key"


def load_secret(env_value: str | None, path: Path) -> bytes:
    """The hashing secret: the environment's (shared by every instance), else the install's
    file, made once with 0600 (blocking I/O: call it off the loop). Workers that race to
    make it all end up reading the one that won."""
    if env_value:
        return env_value.encode()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(SECRET_BYTES) + "\n")
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())
