"""Passthrough mode: the client's own provider key goes upstream, fingerprinted in the log."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Stack

CLIENT_KEY = "sk-client-own-key-abcdef123456"


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("pt"), {"auth": {"mode": "passthrough"}})
    yield s
    s.close()


def test_client_key_goes_upstream_and_row_has_fingerprint(passthrough: Stack) -> None:
    """The provider sees the client's key; the row names it by prefix and hash only."""
    client = openai.OpenAI(base_url=passthrough.base(), api_key=CLIENT_KEY, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini",
                                   messages=[{"role": "user", "content": "hi"}])
    sent = {k.lower(): v for k, v in passthrough.sim.received[-1].headers.items()}
    assert sent["authorization"] == f"Bearer {CLIENT_KEY}"
    row = passthrough.rows(1)[-1]
    digest = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    assert row["key_name"] == f"sk-c…{digest[:12]}"
    assert CLIENT_KEY not in str(row)
    db = Path(passthrough.db)
    stored = b"".join(f.read_bytes() for p in db.parent.glob(db.name + "*")  # db, -wal, -shm
                      for f in ([p] if p.is_file() else p.iterdir()))  # and the journal
    assert row["id"].encode() in stored
    assert CLIENT_KEY.encode() not in stored
