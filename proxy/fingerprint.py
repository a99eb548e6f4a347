"""The stable prefix of a prompt: a keyed hash of it and its share of the prompt's tokens.

A dialect splits a request into its stable prefix (system prompt or instructions, tools,
the leading messages; `Dialect.split_prefix`) and the rest. Here the prefix is walked once
in a canonical order (dict keys sorted, `cache_control` markers left out, so adding a
breakpoint keeps the hash) and hashed with keyed BLAKE2b under a per-install secret: a
short system prompt could be found from a plain hash by trying candidate texts, never from
a keyed one without the secret. The text itself is never kept.

Bounded on purpose, since it runs on the event loop once per call: about HASH_CHARS characters of
the prefix are hashed (prefixes that agree on their first 128 Ki characters share a hash;
a cache would serve at least that much of them) and at most MAX_NODES JSON values are
visited (a walk stopped there hashes what it saw and gives no token share).

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

HASH_CHARS = 128 * 1024
MAX_NODES = 2_000
MAX_DEPTH = 64
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
    """One bounded, canonical pass over JSON values: the canonical text (type tags and
    lengths, so no two values share one) in pieces, and the characters counted."""

    __slots__ = ("budget", "chars", "nodes", "pieces")

    def __init__(self, budget: int) -> None:
        self.pieces: list[str] = []
        self.budget = budget  # characters of text still to keep
        self.chars = 0
        self.nodes = 0

    def text(self, tag: str, value: str) -> None:
        size = len(value)
        self.chars += size
        if self.budget > 0:
            # Never copy more than the budget takes (a 1 MB string costs a slice).
            kept = value if size <= self.budget else value[:self.budget]
            self.budget -= len(kept) + 8
            self.pieces += (tag, str(len(kept)), ":", kept)

    def value(self, value: Any, depth: int = 0) -> bool:
        """Walk `value`; False once MAX_NODES or MAX_DEPTH is reached (the walk stops)."""
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            return False
        if isinstance(value, str):
            self.text("s", value)
        elif isinstance(value, dict):
            if self.nodes + len(value) > MAX_NODES:
                return False  # never sort a million keys to find the walk is over
            self.pieces.append("{")
            for key in sorted(value):
                if key in _SKIPPED_KEYS:
                    continue
                self.text("k", str(key))
                if not self.value(value[key], depth + 1):
                    return False
            self.pieces.append("}")
        elif isinstance(value, list):
            self.pieces.append("[")
            for item in value:
                if not self.value(item, depth + 1):
                    return False
            self.pieces.append("]")
        else:
            self.chars += _NUMBER_CHARS
            self.budget -= 8
            self.pieces += ("n", repr(value), ";")
        return True


def fingerprint(stable: list[Any], rest: list[Any], secret: bytes) -> Prefix | None:
    """The prefix of a split request (None when it has no stable prefix)."""
    if not stable:
        return None
    walk = _Walk(HASH_CHARS)
    complete = all(walk.value(part) for part in stable)
    chars = walk.chars
    counter = _Walk(0)
    complete = complete and all(counter.value(part) for part in rest)
    if walk.budget <= 0:
        walk.pieces.append("~")  # a cut prefix never equals a whole one of that length
    hasher = hashlib.blake2b("".join(walk.pieces).encode("utf-8", "surrogatepass"),
                             digest_size=DIGEST_BYTES, key=secret[:64])
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
