"""Nothing leaked: provider and virtual keys never appear in logs, rows, errors or metrics."""

from __future__ import annotations

import os
from pathlib import Path

import anthropic
import openai
import pytest

from proxy.simulator import Scenario
from tests.conftest import PROVIDER_KEY, VIRTUAL_KEY, Stack, http


def test_keys_never_leak(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """After ok, streamed, failed, refused and rejected calls no key is anywhere visible."""
    os.environ["METERPROXY_TEST_SEC_ADMIN"] = "sec-admin"
    stack = Stack(tmp_path, {"server": {"admin_key_env": "METERPROXY_TEST_SEC_ADMIN"},
                             "budgets": [{"scope": {"customer": "broke"}, "period": "day",
                                          "limit_usd": 0}]})
    seen: list[str] = []
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "secret prompt"}])
        list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "s"}]))
        stack.sim.then(Scenario(status=500))
        ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        failing = [
            (openai.APIError, lambda: client.chat.completions.create(**ask)),
            (openai.APIError, lambda: client.chat.completions.create(
                **ask, extra_headers={"X-Meter-Customer": "broke"})),
            (openai.APIError, lambda: openai.OpenAI(
                base_url=stack.base(), api_key=PROVIDER_KEY, max_retries=0).models.list()),
            (anthropic.APIError, lambda: anthropic.Anthropic(
                base_url=stack.base("anthropic", ""), api_key="sk-ant-wrong-key",
                max_retries=0).messages.create(model="claude-haiku-4-5", max_tokens=5,
                                               messages=ask["messages"])),
        ]
        for error, call in failing:
            with pytest.raises(error) as err:
                call()
            seen.append(str(err.value.body) + str(err.value.response.headers))
        rows = stack.rows(6)
        admin = {"Authorization": "Bearer sec-admin"}
        seen.append(http("GET", f"{stack.url}/metrics", None, admin).content.decode())
        seen.append(http("GET", f"{stack.url}/_meter/usage?group_by=key_name", None,
                         admin).content.decode())
    finally:
        stack.close()
    # The two wrong keys are refused before any key is known: no rows for them.
    assert [r["outcome"] for r in rows] == ["ok", "ok", "upstream_error", "budget_exceeded"]
    # the database, its -wal and -shm, and the journal directory's files, if any are left
    stored = b"".join(f.read_bytes() for p in tmp_path.glob("usage.db*")
                      for f in ([p] if p.is_file() else p.iterdir()))
    logs = capsys.readouterr()
    for secret in (PROVIDER_KEY, VIRTUAL_KEY, "sk-ant-wrong-key"):
        assert secret not in logs.out + logs.err
        assert secret.encode() not in stored
        assert not [s for s in seen if secret in s]
    assert "secret prompt" not in logs.err and b"secret prompt" not in stored
